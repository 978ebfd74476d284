"""A whole fleet on one machine, on loopback: a broker, the controller and agents as real processes.

Used by the demo (`python -m edgeship.demo`) and by the end-to-end tests. Every process starts in
its own process group and is registered in a `Processes` set, which stops them all (SIGTERM to
the group, then SIGKILL) on `close()`, at interpreter exit and on SIGINT/SIGTERM, so an
interrupted run leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit


class StackError(RuntimeError):
    """A local process that would not start or answer; the message names its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    """One child process, its log file, and how it was started (so it can be started again)."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(repr=False)
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True,  # own process group: killpg reaches its children
        )
        return self

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole group at once: a power cut, no cleanup."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()
        self._close_log()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL whatever is left. Returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        try:  # children that outlived their leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._close_log()
        return self.popen.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def failure(self, what: str) -> StackError:
        code = self.popen.poll() if self.popen else None
        state = f"exited with {code}" if code is not None else "is running"
        return StackError(f"{self.name} {what} ({state}); its log is {self.log}:\n{self.tail()}")


class Processes:
    """Every process a run started; stops them all, in reverse order, exactly once."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self._lock = threading.Lock()
        self._closed = False
        self._last: set[int] = set()
        atexit.register(self.close)

    def start(self, name: str, argv: list[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, stop_last: bool = False) -> Proc:
        """Start and register a process; `stop_last` ones (the broker) stop after all others."""
        full_env = {**os.environ, **(env or {})}
        proc = Proc(name, argv, log, full_env, cwd)
        with self._lock:
            if self._closed:
                raise StackError(f"cannot start {name}: the run is stopping")
            self.procs.append(proc)
            if stop_last:
                self._last.add(id(proc))
        return proc.start()

    def install_signal_handlers(self) -> None:
        """Ctrl-C or SIGTERM: stop every child, then exit 130 / 143."""
        def handler(signum, frame):
            self.close()
            sys.exit(128 + signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(reversed(self.procs))
        first = [p for p in procs if id(p) not in self._last]
        # SIGTERM them all at once, then wait: agents drain in parallel, while the broker still runs
        for group in (first, [p for p in procs if id(p) in self._last]):
            for proc in group:
                proc.signal(signal.SIGTERM)
            for proc in group:
                proc.stop()


def wait_until(check, *, timeout: float, interval: float = 0.2, what: str = "condition",
               proc: Proc | None = None):
    """Poll `check()` until it returns something truthy; StackError (with the log) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise proc.failure(f"died while waiting for {what}")
        if time.monotonic() > deadline:
            if proc is not None:
                raise proc.failure(f"did not reach {what} within {timeout:.0f}s")
            raise StackError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(interval)


# ---- brokers ---------------------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


@dataclass
class LocalBroker:
    url: str
    kind: str  # "mosquitto", "amqtt" or "external"
    proc: Proc | None = None

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 1883


def start_broker(processes: Processes, workdir: Path, *, url: str | None = None, kind: str = "auto") -> LocalBroker:
    """A broker for a local fleet: `url` if given (already running), else our own mosquitto on a
    free loopback port if the binary exists, else the embedded amqtt broker."""
    if url:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise StackError(f"broker URL {url!r} must be mqtt://host:port (the local demo does not do TLS)")
        if not port_open(parts.port or 1883, parts.hostname):
            raise StackError(f"nothing answers at {url}; start that broker or leave out --broker to use our own")
        return LocalBroker(url, "external")
    binary = mosquitto_binary() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise StackError("no mosquitto binary found; install it (apt-get install mosquitto) or use --broker-kind amqtt")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    if binary:
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_packet_size 1048576\n"
            # as root, mosquitto would switch to the 'mosquitto' user, who cannot write our log
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        proc = processes.start("mosquitto", [binary, "-c", str(conf), "-v"], log=workdir / "mosquitto.log",
                               stop_last=True)
        kind_used = "mosquitto"
    else:
        proc = processes.start("amqtt", [sys.executable, "-m", "edgeship.embedded_broker", str(port)],
                               log=workdir / "amqtt.log", stop_last=True)
        kind_used = "amqtt"
    wait_until(lambda: port_open(port), timeout=15, what=f"{kind_used} listening on port {port}", proc=proc)
    return LocalBroker(f"mqtt://127.0.0.1:{port}", kind_used, proc)


# ---- the controller and agents ---------------------------------------------------------------


def edgeship_argv(*args: str) -> list[str]:
    """The `edgeship` command, run by this interpreter (works from a venv without activating it)."""
    return [sys.executable, "-m", "edgeship.cli", *args]


@dataclass
class Agent:
    device_id: str
    labels: dict[str, str]
    state_dir: Path
    api_port: int
    proc: Proc

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


class LocalFleet:
    """A controller and agents on loopback against one broker, each a real `edgeship` process."""

    def __init__(self, workdir: Path, processes: Processes, *, broker_url: str, trusted_keys: list[Path],
                 topic_prefix: str = "edgeship", token: str | None = None, controller_mqtt_url: str | None = None,
                 controller_env: dict[str, str] | None = None, agent_env: dict[str, str] | None = None):
        import json
        import secrets

        self.workdir = Path(workdir)
        self.processes = processes
        self.broker_url = broker_url
        self.controller_mqtt_url = controller_mqtt_url or broker_url  # e.g. another listener of the broker
        self.trusted_keys = [Path(k).resolve() for k in trusted_keys]
        self.topic_prefix = topic_prefix
        self.token = token or secrets.token_hex(16)
        self.http_port = free_port()
        self.controller: Proc | None = None
        self.agents: dict[str, Agent] = {}
        self._controller_env = {
            "EDGESHIP_FLEET_API_TOKEN": self.token,
            "EDGESHIP_FLEET_TRUSTED_KEYS": json.dumps([str(k) for k in self.trusted_keys]),
            "EDGESHIP_FLEET_TOPIC_PREFIX": topic_prefix,
            "EDGESHIP_FLEET_MQTT_CLIENT_ID": f"edgeship-fleet-{self.token[:6]}",
            # a local fleet reacts in seconds, not minutes
            "EDGESHIP_FLEET_TICK_INTERVAL_S": "0.2",
            "EDGESHIP_FLEET_HEARTBEAT_TIMEOUT_S": "15",
            "EDGESHIP_FLEET_RESEND_INTERVAL_S": "5",
            **(controller_env or {}),
        }
        empty = self.workdir / "agent-defaults.toml"  # never pick up a real /etc/edgeship/agent.toml
        empty.parent.mkdir(parents=True, exist_ok=True)
        empty.write_text("# the local fleet configures agents on the command line\n")
        self._agent_env = {"EDGESHIP_AGENT_CONFIG": str(empty), **(agent_env or {})}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "controller"

    def client(self):
        from fleet.client import FleetClient

        return FleetClient(self.url, self.token, timeout=120)

    def start_controller(self, *, env: dict[str, str] | None = None, wait: float = 60) -> Proc:
        """Start (or start again, same port and data) `edgeship fleet serve`; waits for /healthz."""
        argv = edgeship_argv("fleet", "serve", "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                             "--mqtt-url", self.controller_mqtt_url, "--data-dir", str(self.data_dir))
        self.controller = self.processes.start("controller", argv, log=self.workdir / "logs" / "controller.log",
                                               env={**self._controller_env, **(env or {})})
        wait_until(lambda: http_ok(f"{self.url}/healthz"), timeout=wait, what="the controller's /healthz",
                   proc=self.controller)
        return self.controller

    def start_agent(self, device_id: str, *, labels: dict[str, str] | None = None, env: dict[str, str] | None = None,
                    settings: dict[str, str] | None = None, broker_url: str | None = None,
                    wait: bool = True) -> Agent:
        """Start `edgeship agent run` as device `device_id` (again, with the same state, if it ran before)."""
        old = self.agents.get(device_id)
        labels = labels if labels is not None else (old.labels if old else {})
        api_port = old.api_port if old else free_port()
        state_dir = self.workdir / "agents" / device_id
        argv = edgeship_argv("agent", "run", "--device-id", device_id, "--broker-url", broker_url or self.broker_url,
                             "--state-dir", str(state_dir), "--api-bind", f"127.0.0.1:{api_port}",
                             "--set", f"broker.topic_prefix={self.topic_prefix}",
                             "--set", "heartbeat_interval_s=2", "--set", "broker.reconnect_max_s=2")
        for key in self.trusted_keys:
            argv += ["--trusted-key", str(key)]
        for k, v in labels.items():
            argv += ["--label", f"{k}={v}"]
        for k, v in (settings or {}).items():
            argv += ["--set", f"{k}={v}"]
        proc = self.processes.start(device_id, argv, log=self.workdir / "logs" / f"{device_id}.log",
                                    env={**self._agent_env, **(env or {})})
        agent = Agent(device_id, labels, state_dir, api_port, proc)
        self.agents[device_id] = agent
        if wait:
            wait_until(lambda: http_ok(f"{agent.api_url}/healthz"), timeout=60, what=f"{device_id}'s local API",
                       proc=proc)
        return agent

    def wait_online(self, device_ids: list[str], *, timeout: float = 60) -> list[dict]:
        """Wait until the controller lists every one of `device_ids` as online."""
        client = self.client()

        def check():
            devices = {d["id"]: d for d in client.devices()}
            return [devices[i] for i in device_ids] if all(devices.get(i, {}).get("online") for i in device_ids) else None

        try:
            return wait_until(check, timeout=timeout, what=f"{len(device_ids)} device(s) online at the controller",
                              proc=self.controller)
        finally:
            client.close()


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
