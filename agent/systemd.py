"""systemd integration: sd_notify over $NOTIFY_SOCKET (stdlib only) and the hardened unit file.

The notify protocol is one datagram of newline-separated KEY=VALUE lines to the unix socket in
$NOTIFY_SOCKET ('@' = abstract namespace). Outside systemd the variable is unset and every call
is a cheap no-op.

Errors:

    UnitError(ValueError)   bad install-service input (user name, device path, unit dir)
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

UNIT_NAME = "edgeship-agent.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CONFIG = Path("/etc/edgeship/agent.toml")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# RestartSteps= and RestartMaxDelaySec= (restart backoff) came with systemd 254; older ones warn and ignore them.
BACKOFF_SYSTEMD = 254
# Where a service finds what LoadCredential= handed it (systemd's %d specifier, $CREDENTIALS_DIRECTORY).
CREDENTIALS = Path("%d")


class UnitError(ValueError):
    """install-service was given something that cannot go in a unit file."""


# ---- sd_notify ------------------------------------------------------------------------------


class Notifier:
    """Sends sd_notify messages; a no-op when $NOTIFY_SOCKET is unset (not under systemd)."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + raw[1:]) if raw.startswith("@") else (raw or None)
        self.watchdog_interval_s = watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; False when not under systemd or the socket is gone (never raises)."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(data)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading configuration")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")


def watchdog_interval(environ: dict[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when no watchdog is asked."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # the watchdog belongs to another process (e.g. our parent)
    return int(usec) / 2 / 1_000_000


# ---- the unit file --------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitOptions:
    """What `install-service` may vary; everything else is fixed hardening."""

    exec_start: list[str]
    user: str | None = None  # None: DynamicUser=yes
    watchdog_s: int = 60
    devices: list[str] = field(default_factory=list)  # device nodes an NPU/GPU runtime needs
    # Root-only (0600) files the service's own user could not read: systemd copies them to the
    # service's private credentials directory (LoadCredential=). `exec_start` must then read
    # the config from CREDENTIALS / "agent.toml".
    config_credential: Path | None = None
    key_credential: Path | None = None  # broker.key_file; the agent is pointed at the copy
    restart_backoff: bool = False  # systemd >= 254: RestartSteps=/RestartMaxDelaySec=

    def __post_init__(self) -> None:
        if self.user is not None and not USER_RE.match(self.user):
            raise UnitError(f"invalid user name {self.user!r}: use a system user name like 'edgeship'")
        for dev in self.devices:
            if not dev.startswith("/dev/") or any(c.isspace() for c in dev):
                raise UnitError(f"invalid device {dev!r}: give a /dev path such as /dev/fastrpc-cdsp")
        if not 10 <= self.watchdog_s <= 3600:
            raise UnitError(f"watchdog of {self.watchdog_s}s is out of range; use 10-3600 seconds")
        for path in (self.config_credential, self.key_credential):
            if path is not None and (not path.is_absolute() or any(c.isspace() or c in ":%" for c in str(path))):
                raise UnitError(f"credential file {str(path)!r} cannot go in LoadCredential=: give an absolute path "
                                "without spaces, ':' or '%'")


def systemd_version(run=subprocess.run) -> int | None:
    """The running systemd's version (`systemctl --version`), None if there is none to ask."""
    try:
        out = run(["systemctl", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else None


def credentials_for(config: Path) -> tuple[Path | None, Path | None]:
    """(config, broker key) to hand over with LoadCredential=; (None, None) when `config` is not there yet."""
    try:
        broker = tomllib.loads(config.read_text()).get("broker", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None, None
    key = broker.get("key_file") if isinstance(broker, dict) else None
    return config.resolve(), Path(key) if isinstance(key, str) and key else None


# The ExecStart of the copy in configs/systemd/ (a `pip install edgeship[agent]` as root), for a
# device set up with `edgeship fleet device enroll`: agent.toml and device.key are root-only.
EXAMPLE_EXEC_START = ["/usr/local/bin/edgeship", "agent", "run", "--config", str(CREDENTIALS / DEFAULT_CONFIG.name)]
EXAMPLE_OPTIONS = UnitOptions(exec_start=EXAMPLE_EXEC_START, config_credential=DEFAULT_CONFIG,
                              key_credential=DEFAULT_CONFIG.parent / "device.key")


def default_exec_start(config: Path = DEFAULT_CONFIG) -> list[str]:
    """The installed `edgeship` next to this interpreter (venvs included), else `python -m`."""
    script = Path(sys.executable).parent / "edgeship"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "edgeship.cli"]
    return [*head, "agent", "run", "--config", str(config)]


CREDENTIALS_NAME_CONFIG, CREDENTIALS_NAME_KEY = DEFAULT_CONFIG.name, "device.key"


def render_unit(options: UnitOptions) -> str:
    """The unit text. Each hardening line carries the reason it is safe for this service."""
    user = (
        "# A dedicated account that exists on the device (install-service --user).\n"
        f"User={options.user}\nGroup={options.user}\n"
        if options.user
        else "# A transient uid/gid per run; StateDirectory= keeps /var/lib/edgeship owned by it.\n"
        "DynamicUser=yes\n"
    )
    if options.devices:
        devices = (
            "# The NPU/GPU runtime needs these nodes, so /dev stays real but the cgroup device\n"
            "# policy admits only them (plus the pseudo devices DevicePolicy=closed allows).\n"
            "PrivateDevices=no\nDevicePolicy=closed\n"
            + "".join(f"DeviceAllow={d} rw\n" for d in options.devices)
        )
    else:
        devices = (
            "# CPU inference needs no device nodes. An NPU (e.g. /dev/fastrpc-*) does: reinstall with\n"
            "# --allow-device /dev/... which turns this off and admits only those nodes.\n"
            "PrivateDevices=yes\n"
        )
    credentials = ""
    if options.config_credential or options.key_credential:
        credentials = ("# Root-only (0600) files the service's user cannot read: systemd hands it private copies in\n"
                       "# $CREDENTIALS_DIRECTORY (%d), made at each start (edit, then restart: reload reads the copy).\n")
    if options.config_credential:
        credentials += f"LoadCredential={CREDENTIALS_NAME_CONFIG}:{options.config_credential}\n"
    if options.key_credential:
        credentials += (f"LoadCredential={CREDENTIALS_NAME_KEY}:{options.key_credential}\n"
                        f"Environment=EDGESHIP_AGENT_BROKER__KEY_FILE={CREDENTIALS / CREDENTIALS_NAME_KEY}\n")
    backoff = (
        "# Each failed start waits longer, up to 10 minutes between tries.\nRestartSteps=10\nRestartMaxDelaySec=600\n"
        if options.restart_backoff
        else f"# With systemd >= {BACKOFF_SYSTEMD}, install-service adds RestartSteps=/RestartMaxDelaySec= (backoff).\n"
    )
    return f"""\
# edgeship agent: serves the active bundle to local apps and reports to the fleet over MQTT.
# Written by `edgeship agent install-service`; docs/AGENT.md explains every line.
[Unit]
Description=edgeship edge agent (local inference and fleet updates)
Wants=network-online.target
After=network-online.target
# Never give up for good: an unattended device keeps trying (a broker, a disk, a bad bundle may recover).
StartLimitIntervalSec=0

[Service]
# READY=1 comes only after the model is loaded (or none is installed) and the API listens.
Type=notify
NotifyAccess=main
{credentials}ExecStart={shlex.join(options.exec_start)}
# SIGHUP reloads labels, heartbeat interval and log level, and re-publishes state.
ExecReload=/bin/kill -HUP $MAINPID
# WATCHDOG=1 comes from the owner loop every WatchdogSec/2, only while inference answers (a request
# or a tiny probe did within liveness.max_silence_s): a hung agent or a wedged runtime is restarted.
WatchdogSec={options.watchdog_s}
Restart=on-failure
RestartSec=5
{backoff}# The agent is the device's main workload, but a runaway (a leak, a model too big for the board)
# must not take sshd and the OS down with it: reclaim above MemoryHigh, OOM-kill (then restart) at
# MemoryMax. Percentages are of the device's RAM.
MemoryHigh=80%
MemoryMax=90%
# onnxruntime's threads (one per core) + one per API connection + MQTT, probe and update threads.
TasksMax=512
# Loading a large bundle from slow flash can take minutes.
TimeoutStartSec=300
# SIGTERM drains in-flight requests (api.drain_timeout_s, 10 s) then publishes the offline state.
TimeoutStopSec=30
{user}StateDirectory=edgeship
StateDirectoryMode=0750
ConfigurationDirectory=edgeship
# For api.bind = "unix:/run/edgeship/api.sock".
RuntimeDirectory=edgeship
RuntimeDirectoryMode=0755
UMask=0027

# -- hardening: each line is something the agent never needs --
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
# The whole file system is read-only except StateDirectory/RuntimeDirectory.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
{devices}ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other processes are invisible. ProcSubset=pid is NOT set: the agent reads /proc/cpuinfo,
# /proc/meminfo and /proc/stat for device facts and heartbeats.
ProtectProc=invisible
# MQTT and HTTP over IPv4/IPv6, the API's unix socket, sd_notify.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# onnxruntime's CPU kernels are ahead-of-time compiled (no JIT), and nothing else in the agent
# maps W+X memory: tests/test_systemd.py runs inference under the same kernel rule (PR_SET_MDWE).
# An EP that JIT-compiles (some GPU/NPU stacks) needs this removed.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def install_unit(text: str, unit_dir: Path = DEFAULT_UNIT_DIR) -> Path:
    """Write the unit atomically into `unit_dir` (mode 0644); returns its path."""
    unit_dir = Path(unit_dir)
    if not unit_dir.is_dir():
        raise UnitError(f"unit directory {unit_dir} does not exist; pass an existing --unit-dir")
    path = unit_dir / UNIT_NAME
    tmp = path.with_name(f".{UNIT_NAME}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except PermissionError:
        tmp.unlink(missing_ok=True)
        raise UnitError(f"cannot write {path}: permission denied (run as root, or --unit-dir DIR)") from None
    return path
