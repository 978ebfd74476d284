"""The systemd unit (systemd-analyze verify and security), install-service, sd_notify plumbing, and
the one hardening line that could break inference: MemoryDenyWriteExecute=yes (checked with the
kernel's own PR_SET_MDWE on a real agent serving a real request)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.systemd import (BACKOFF_SYSTEMD, EXAMPLE_EXEC_START, EXAMPLE_OPTIONS, UNIT_NAME, Notifier, UnitError,
                           UnitOptions, render_unit, systemd_version, watchdog_interval)
from tests.test_agent_service import Agent, NotifySocket

ROOT = Path(__file__).resolve().parents[1]


def edgeship(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed, so the unit cannot be verified here: "
                    "apt-get install systemd (scripts/bootstrap.sh does it)")
    return path


@pytest.mark.parametrize("extra", [[], ["--user", "edgeship"], ["--allow-device", "/dev/fastrpc-cdsp", "--watchdog", "30"]],
                         ids=["dynamic-user", "dedicated-user", "npu-device"])
def test_installed_unit_passes_systemd_analyze_verify(tmp_path, extra):
    analyze = systemd_analyze()
    proc = edgeship("install-service", "--unit-dir", str(tmp_path), *extra)
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / UNIT_NAME
    assert f"wrote {unit}" in proc.stdout and oct(unit.stat().st_mode & 0o777) == "0o644"
    check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; anything it prints about our file is a defect
    assert check.returncode == 0 and UNIT_NAME not in check.stdout + check.stderr, check.stdout + check.stderr
    text = unit.read_text()
    if "--user" in extra:
        assert "User=edgeship\nGroup=edgeship\n" in text and "DynamicUser" not in text
    if "--allow-device" in extra:
        assert "PrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=/dev/fastrpc-cdsp rw\n" in text
        assert "WatchdogSec=30\n" in text


def test_hardening_exposure_is_low(tmp_path):
    analyze = systemd_analyze()
    edgeship("install-service", "--unit-dir", str(tmp_path))
    proc = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(tmp_path / UNIT_NAME)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match.group(1)) <= 2.5, proc.stdout  # 10 = unprotected; 1.8 when written


def test_unit_has_the_promised_directives():
    text = render_unit(UnitOptions(exec_start=EXAMPLE_EXEC_START))
    lines = set(text.splitlines())
    for directive in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60", "Restart=on-failure", "DynamicUser=yes",
                      "StateDirectory=edgeship", "ConfigurationDirectory=edgeship", "ProtectSystem=strict",
                      "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                      "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=", "LockPersonality=yes",
                      "RestrictRealtime=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
                      "ProtectControlGroups=yes", "ExecReload=/bin/kill -HUP $MAINPID",
                      # restarts never give up for good; a runaway cannot starve the OS
                      "StartLimitIntervalSec=0", "RestartSec=5", "MemoryHigh=80%", "MemoryMax=90%", "TasksMax=512"):
        assert directive in lines, directive
    assert "ProcSubset=pid" not in lines  # would hide /proc/meminfo and /proc/cpuinfo from facts
    assert not any(line.startswith("StartLimitBurst=") for line in lines)


def test_repository_copy_is_what_install_service_writes():
    copy = (ROOT / "configs" / "systemd" / UNIT_NAME).read_text()
    assert copy == render_unit(EXAMPLE_OPTIONS), \
        "configs/systemd/edgeship-agent.service is stale: regenerate it from agent.systemd.render_unit"


def test_dry_run_prints_and_writes_nothing(tmp_path):
    proc = edgeship("install-service", "--dry-run", "--unit-dir", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith("# edgeship agent") and "Type=notify" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--user", "Root Admin"], "invalid user name 'Root Admin'"),
    (["--allow-device", "/etc/passwd"], "invalid device '/etc/passwd'"),
    (["--watchdog", "2"], "watchdog of 2s is out of range"),
    (["--unit-dir", "/nonexistent/units"], "unit directory /nonexistent/units does not exist"),
])
def test_bad_install_input_is_one_line(args, message):
    proc = edgeship("install-service", *args)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {message}") and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(UnitError):
        UnitOptions(exec_start=["x"], user="Root Admin")


def test_notifier_outside_systemd_and_watchdog_owner():
    assert not Notifier({}).enabled and Notifier({}).send("READY=1") is False
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None  # someone else's
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None and watchdog_interval({}) is None
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert gone.enabled and gone.send("WATCHDOG=1") is False  # never raises


MDWE_RUNNER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE failed (errno {ctypes.get_errno()})")
assert libc.prctl(66, 0, 0, 0, 0) == 1  # PR_GET_MDWE
from edgeship.cli import main
sys.argv = ["edgeship", "agent", "run", "--config", sys.argv[1]]
main()
"""


def test_agent_serves_under_memory_deny_write_execute(tmp_path, broker, topic_prefix, keypair):
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's PR_SET_MDWE is the same rule."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 3):
        pytest.fail(f"kernel {platform.release()} has no PR_SET_MDWE (Linux >= 6.3), so MemoryDenyWriteExecute=yes "
                    "cannot be checked here; run this test on a newer kernel before shipping the unit")
    from tests.support.bundles import make_bundle

    make_bundle(tmp_path / "b", keypair[0])
    notify = NotifySocket()
    a = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], env={"NOTIFY_SOCKET": notify.env})
    a.install(tmp_path / "b", keypair[1])
    out = open(a.log, "w")
    a.proc = subprocess.Popen([sys.executable, "-c", MDWE_RUNNER, str(a.config)], stdout=out, stderr=subprocess.STDOUT,
                              env=a.env, cwd=ROOT)
    try:
        notify.wait_for("READY=1")
        status, body = a.http("POST", "/v1/embeddings", {"model": "tiny", "input": [[0.5] * 8]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 8, body
        a.signal(signal.SIGTERM)
        assert a.wait() == 0, a.output()
    finally:
        a.stop()
        out.close()
        notify.close()
    assert "PR_SET_MDWE failed" not in a.output()


def test_restart_backoff_only_where_this_systemd_knows_it(tmp_path):
    analyze, version = systemd_analyze(), systemd_version()
    assert version is not None, "systemctl --version did not answer"
    unit = tmp_path / UNIT_NAME
    unit.write_text(render_unit(UnitOptions(exec_start=[sys.executable], restart_backoff=True)))
    check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    knows = "Unknown key 'RestartSteps'" not in check.stdout + check.stderr
    assert knows == (version >= BACKOFF_SYSTEMD), (version, check.stdout + check.stderr)
    # install-service asks the running systemd and writes the backoff lines only where they work
    proc = edgeship("install-service", "--dry-run")
    assert ("RestartSteps=10\nRestartMaxDelaySec=600\n" in proc.stdout) == knows


def test_enrolled_files_reach_a_dynamic_user(tmp_path, keypair):
    """DynamicUser= cannot read root's 0600 agent.toml and device.key: the unit hands them over with
    LoadCredential=, and everything else the agent reads stays readable in place. Checked as a real
    unprivileged uid, with the credentials directory laid out as systemd makes it."""
    import tempfile

    from fleet.enroll import enroll
    from fleet.pki import CertificateAuthority

    if os.geteuid() != 0:
        pytest.fail("this test plays systemd (root) handing files to an unprivileged uid; run it as root")
    etc = Path(tempfile.mkdtemp(prefix="edgeship-etc-", dir="/tmp"))  # pytest's tmp_path is 0700: nobody could look in
    try:
        etc.chmod(0o755)
        CertificateAuthority.init(tmp_path / "ca")
        e = enroll("dev-unit", ca_dir=tmp_path / "ca", out_dir=etc, trusted_keys=[keypair[1]],
                   broker_url="mqtts://127.0.0.1:8883")
        assert {p.name: stat_mode(p) for p in (e.key, e.agent_toml)} == {"device.key": 0o600, "agent.toml": 0o600}

        proc = edgeship("install-service", "--dry-run", "--config", str(e.agent_toml))
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert f"LoadCredential=agent.toml:{e.agent_toml}" in lines
        assert f"LoadCredential=device.key:{e.key.resolve()}" in lines
        assert "Environment=EDGESHIP_AGENT_BROKER__KEY_FILE=%d/device.key" in lines
        assert any(line.startswith("ExecStart=") and line.endswith(" --config %d/agent.toml") for line in lines)
        unit = tmp_path / UNIT_NAME
        unit.write_text(proc.stdout)
        check = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert UNIT_NAME not in check.stdout + check.stderr.replace(f"Command {sys.executable}", ""), check.stderr

        # What systemd does at start: copies owned by the service's uid, 0400, in a private directory.
        nobody = 65534
        creds = Path(tempfile.mkdtemp(prefix="edgeship-creds-", dir="/tmp"))
        for name, src in (("agent.toml", e.agent_toml), ("device.key", e.key)):
            shutil.copyfile(src, creds / name)
            os.chown(creds / name, nobody, nobody)
            (creds / name).chmod(0o400)
        os.chown(creds, nobody, nobody)
        # The agent's own settings code says which files it will open (as root here: the checkout and
        # its venv need not be readable by that uid, e.g. a 0700 CI clone); the uid then opens each of
        # them and builds the TLS context with the stdlib alone (-I -S: nothing of the project imported).
        env = {**os.environ, "EDGESHIP_AGENT_BROKER__KEY_FILE": str(creds / "device.key"), "PYTHONDONTWRITEBYTECODE": "1"}
        settings = subprocess.run(
            [sys.executable, "-c", "import json, pathlib, sys; from agent.config import load_settings\n"
             "from agent.bundle import TrustedKeys\n"
             "s = load_settings(pathlib.Path(sys.argv[1])); TrustedKeys.from_paths(s.trusted_keys)\n"
             "print(json.dumps([str(s.broker.ca_file), str(s.broker.cert_file), str(s.broker.key_file),"
             " *map(str, s.trusted_keys)]))", str(creds / "agent.toml")],
            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert settings.returncode == 0, settings.stderr[-2000:]
        ca, cert, key, *trusted = json.loads(settings.stdout)
        assert key == str(creds / "device.key")
        probe = (
            "import ssl, sys; ca, cert, key, *rest = sys.argv[1:]\n"
            "for f in (ca, cert, key, *rest): open(f, 'rb').read()\n"
            "ssl.create_default_context(cafile=ca).load_cert_chain(cert, key); print('read', key)\n"
        )
        as_nobody = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                     os.path.realpath(sys.executable), "-I", "-S", "-c", probe, ca, cert, key, str(creds / "agent.toml"), *trusted]
        run = subprocess.run(as_nobody, capture_output=True, text=True, timeout=60, cwd="/")
        assert run.returncode == 0 and f"read {creds}/device.key" in run.stdout, run.stderr[-2000:]
        # and the root-only originals stay out of its reach
        denied = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "cat", str(e.key)],
                                capture_output=True, text=True, timeout=10)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(locals().get("creds", etc), ignore_errors=True)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
