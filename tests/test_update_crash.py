"""Table-driven crash recovery: SIGKILL the agent in every update state (and in the middle of the
download and of the pointer switch), restart it, and check it ends serving a valid bundle and
reporting a consistent state. The power-cut column also drops every write that was not fsynced
before the restart, and every run checks that nothing was published by a rename before it (and
its directory) reached the disk.

The agent here is tests/support/update_driver.py: a real process with BundleStore, ModelHost,
UpdateManager and paho MQTT to the test broker; EDGESHIP_CRASH_AT picks the kill point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.bundle import TrustedKeys, open_bundle
from agent.protocol import BundleRef, DeployCommand, WatchPolicy
from tests.support import powercut
from tests.support.http import FileServer
from tests.support.powercut import cut_power
from tests.support.update_harness import Bundles, Controller, deadline_in, regressing_bundle

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    crash_at: str
    final: str  # the update's end state after recovery
    serves: str  # "v1" (old) or "v2" (new)
    bundle: str = "good"  # "good" | "big" (for a mid-download kill) | "bad_golden" | "regressing"
    code: str = ""  # expected reason code of the final state ("" = any)
    rps: float = 0.0


ROWS = [
    Row("state:downloading", "committed", "v2"),
    Row("download:50%", "committed", "v2", bundle="big"),
    Row("state:verifying", "committed", "v2"),
    Row("state:staging", "committed", "v2"),
    Row("state:smoke_testing", "committed", "v2"),
    Row("state:switching", "rolled_back", "v1", code="crashed_after_switch"),
    Row("switch:before_rename", "rolled_back", "v1", code="crashed_after_switch"),
    Row("switch:after_rename", "rolled_back", "v1", code="crashed_after_switch"),
    Row("state:watching", "rolled_back", "v1", code="crashed_after_switch"),
    Row("state:committed", "committed", "v2"),
    Row("state:failed", "failed", "v1", bundle="bad_golden", code="golden_mismatch"),
    Row("state:rolled_back", "rolled_back", "v1", bundle="regressing", code="watch_regression", rps=100),
]


class Agent:
    def __init__(self, tmp: Path, port: int, prefix: str, pub: Path, install: Path):
        self.args = [sys.executable, "-m", "tests.support.update_driver", "--state-dir", str(tmp / "state"),
                     "--port", str(port), "--prefix", prefix, "--trusted-key", str(pub), "--install", str(install),
                     "--max-watch-s", "20"]
        self.log = tmp / "driver.log"
        self.fsync_log = tmp / "fsync.jsonl"  # every fsync and rename under the state dir
        self.proc: subprocess.Popen | None = None

    def start(self, *, crash_at: str | None = None, rps: float = 0.0) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "EDGESHIP_CRASH_AT"}
        env[powercut.ENV] = str(self.fsync_log)
        if crash_at:
            env["EDGESHIP_CRASH_AT"] = crash_at
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args + ["--rps", str(rps)], cwd=ROOT, env=env, stdout=log, stderr=log)
        return self.proc

    def wait_killed(self, timeout: float = 90) -> None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"driver was not killed at its crash point; log:\n{self.log.read_text()[-3000:]}")
        assert rc == -signal.SIGKILL, f"driver exited {rc}, not by SIGKILL; log:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def rig(tmp_path, broker, topic_prefix, keypair):
    srv = FileServer().start()
    bundles = Bundles(tmp_path / "bundles", keypair[0])
    bundles.make("v1", version="1.0.0")
    ctl = Controller(broker.port, topic_prefix)
    agent = Agent(tmp_path, broker.port, topic_prefix, keypair[1], bundles.made["v1"][0])
    yield srv, bundles, ctl, agent, keypair
    agent.stop()
    ctl.close()
    srv.stop()


def _make_v2(bundles: Bundles, kind: str, tmp: Path, private_key: Path) -> tuple[Path, str]:
    if kind == "good":
        _, tar, sha = bundles.make("v2", version="1.1.0", seed=3)
    elif kind == "big":
        _, tar, sha = bundles.make("v2", version="1.1.0", seed=3, extra_files={"pad.bin": os.urandom(3_000_000)})
    elif kind == "bad_golden":
        _, tar, sha = bundles.make("v2", version="1.1.0", seed=3, golden_scale=2.0)
    else:
        tar, sha = regressing_bundle(tmp / "regressing", private_key)
    return tar, sha


def _wait_ready(ctl: Controller, sessions_before: set[str], timeout: float = 60) -> str:
    st = ctl.wait(lambda m: m.type == "state" and m.session not in sessions_before, timeout, "driver's state message")
    return st.session


@pytest.mark.parametrize("cut", [False, True], ids=["kill", "power_cut"])
@pytest.mark.parametrize("row", ROWS, ids=[r.crash_at for r in ROWS])
def test_sigkill_in_every_state_then_recover(rig, row, cut, tmp_path):
    """kill: SIGKILL, nothing written is lost. power_cut: SIGKILL, then every write that was not
    fsynced is dropped (tests/support/powercut.py) before the restart. Both end the same way."""
    srv, bundles, ctl, agent, keypair = rig
    tar, v2_sha = _make_v2(bundles, row.bundle, tmp_path, keypair[0])
    v1_sha = bundles.made["v1"][2]
    url = srv.add("v2.tar", tar)

    agent.start(crash_at=row.crash_at, rps=row.rps)
    first = _wait_ready(ctl, set())
    ctl.send(DeployCommand(id="d1", device_id="dev1", rollout_id="r1", urls=[url], size=tar.stat().st_size,
                           deadline=deadline_in(),
                           bundle=BundleRef(name="tiny", version="1.1.0", manifest_sha256=v2_sha),
                           watch=WatchPolicy(window_s=0.5, max_p95_ratio=1000)))
    agent.wait_killed()
    if cut:
        removed, emptied = cut_power(tmp_path / "state", powercut.read_log(agent.fsync_log))
        print(f"power cut at {row.crash_at}: removed {removed}, emptied {emptied}")
        if row.crash_at == "download:50%":  # the half-written archive was never fsynced
            assert any(p.endswith(".tar.part") for p in removed + emptied), (removed, emptied)

    agent.start(rps=row.rps)
    second = _wait_ready(ctl, {first})
    final = ctl.wait(lambda m: m.type == "event" and m.session == second and m.command_id == "d1"
                     and m.state.value in ("committed", "failed", "rolled_back"), 90, "final event after restart")
    assert final.state.value == row.final, f"{final.state.value}: {final.code} {final.reason}"
    if row.code:
        assert final.code == row.code, final.reason
    expected = v2_sha if row.serves == "v2" else v1_sha
    state = ctl.wait(lambda m: m.type == "state" and m.session == second and m.update is not None
                     and m.update.state.value == row.final, 30, "state message after recovery")
    time.sleep(0.3)
    state = [m for m in ctl.states() if m.session == second][-1]
    agent.stop()

    # what it reports == what it serves == what is on disk, and that bundle is intact
    assert state.labels["serving"] == expected
    assert state.active is not None and state.active.manifest_sha256 == expected
    assert state.update.state.value == row.final and state.update.command_id == "d1"
    store = tmp_path / "state"
    pointer = json.loads((store / "pointer.json").read_text())
    assert pointer["active"] == expected
    assert pointer["previous"] == (v1_sha if expected == v2_sha else None)
    open_bundle(store / "bundles" / expected, TrustedKeys.from_paths([keypair[1]]))
    persisted = json.loads((store / "update.json").read_text())
    assert persisted["update"]["state"] == row.final and persisted["schema_version"] == 1
    assert sorted(p.name for p in (store / "bundles").iterdir()) == sorted({expected, v1_sha})
    assert list((store / "downloads").iterdir()) == []
    if row.crash_at == "download:50%" and not cut:  # after a power cut the unsynced half is gone
        assert any(r[1].startswith("bytes=") and not r[1].startswith("bytes=0-") for r in srv.requests), \
            f"the download was not resumed with Range: {srv.requests}"
    # every bundle file, unpacked copy, pointer and state file was on disk before its rename published it
    assert powercut.unsynced_publications(powercut.read_log(agent.fsync_log)) == []


def test_a_crash_loop_in_the_smoke_test_is_stopped_safely(rig, tmp_path):
    srv, bundles, ctl, agent, keypair = rig
    tar, v2_sha = _make_v2(bundles, "good", tmp_path, keypair[0])
    v1_sha = bundles.made["v1"][2]
    url = srv.add("v2.tar", tar)
    sessions: set[str] = set()
    agent.start(crash_at="state:smoke_testing")
    sessions.add(_wait_ready(ctl, sessions))
    ctl.send(DeployCommand(id="loop1", device_id="dev1", rollout_id="r1", urls=[url], deadline=deadline_in(),
                           bundle=BundleRef(name="tiny", version="1.1.0", manifest_sha256=v2_sha)))
    agent.wait_killed()
    for _ in range(2):  # the fault persists: every resume of the smoke test dies again
        agent.start(crash_at="state:smoke_testing")
        agent.wait_killed()
    agent.start(crash_at="state:smoke_testing")
    last = _wait_ready(ctl, {m.session for m in ctl.states()})
    final = ctl.wait(lambda m: m.type == "event" and m.session == last and m.command_id == "loop1"
                     and m.state.value == "failed", 60, "loop detected")
    assert final.code == "loop_detected" and "3 times" in final.reason
    assert agent.proc.poll() is None  # alive, and stays so
    state = ctl.wait(lambda m: m.type == "state" and m.session == last and m.update is not None
                     and m.update.state.value == "failed", 30, "state")
    assert state.labels["serving"] == v1_sha
