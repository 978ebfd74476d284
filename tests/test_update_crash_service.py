"""Two rows of the crash table through the real service (`edgeship agent run`): a SIGKILL in the
middle of the download and right after the pointer switch, then a restart."""

from __future__ import annotations

import json
import os
import signal

import pytest

from agent.bundle import TrustedKeys, open_bundle
from agent.protocol import BundleRef, DeployCommand, WatchPolicy
from tests.support.http import FileServer
from tests.support.update_harness import Bundles, Controller, deadline_in
from tests.test_agent_service import Agent


@pytest.mark.parametrize("crash_at,final,serves", [
    ("download:50%", "committed", "v2"),
    ("switch:after_rename", "rolled_back", "v1"),
])
def test_edgeship_agent_run_recovers_from_sigkill(tmp_path, broker, topic_prefix, keypair, crash_at, final, serves):
    srv = FileServer().start()
    ctl = Controller(broker.port, topic_prefix)
    bundles = Bundles(tmp_path / "bundles", keypair[0])
    v1_dir, _, v1_sha = bundles.make("v1", version="1.0.0")
    _, tar, v2_sha = bundles.make("v2", version="1.1.0", seed=3, extra_files={"pad.bin": os.urandom(3_000_000)})
    url = srv.add("v2.tar", tar)
    agent = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], env={"EDGESHIP_CRASH_AT": crash_at})
    agent.install(v1_dir, keypair[1])
    dev = agent.device_id
    try:
        agent.start()
        first = ctl.wait(lambda m: m.type == "state" and m.device_id == dev, 60, "birth").session
        ctl.send(DeployCommand(id="d1", device_id=dev, rollout_id="r1", urls=[url], size=tar.stat().st_size,
                               deadline=deadline_in(),
                               bundle=BundleRef(name="tiny", version="1.1.0", manifest_sha256=v2_sha),
                               watch=WatchPolicy(window_s=0.5, max_p95_ratio=1000)))
        assert agent.wait(90) == -signal.SIGKILL, agent.output()[-2000:]

        agent.env.pop("EDGESHIP_CRASH_AT")
        agent.start()
        ev = ctl.wait(lambda m: m.type == "event" and m.session != first and m.command_id == "d1"
                      and m.state.value in ("committed", "failed", "rolled_back"), 90, "final event")
        assert ev.state.value == final, ev.reason
        expected = v2_sha if serves == "v2" else v1_sha
        ctl.wait(lambda m: m.type == "state" and m.session != first and m.update is not None
                 and m.update.state.value == final and m.active and m.active.manifest_sha256 == expected, 30, "state")
        status, models = agent.http("GET", "/v1/models")
        assert status == 200 and models["data"][0]["version"] == ("1.1.0" if serves == "v2" else "1.0.0"), models
    finally:
        if agent.proc and agent.proc.poll() is None:
            agent.signal(signal.SIGTERM)
            agent.wait(30)
        ctl.close()
        srv.stop()
    pointer = json.loads((agent.state_dir / "pointer.json").read_text())
    assert pointer["active"] == expected
    open_bundle(agent.state_dir / "bundles" / expected, TrustedKeys.from_paths([keypair[1]]))
    if crash_at.startswith("download"):
        assert any(r[1].startswith("bytes=") and not r[1].startswith("bytes=0-") for r in srv.requests)


def test_edgeship_agent_run_serves_the_previous_bundle_when_the_active_one_is_damaged(tmp_path, broker, topic_prefix,
                                                                                      keypair):
    """One flipped byte in the active bundle (a power cut, a bad sector): the device serves the previous
    bundle, reports it, and the next start does not try the broken one again."""
    from agent.update.store import BundleStore

    ctl = Controller(broker.port, topic_prefix)
    bundles = Bundles(tmp_path / "bundles", keypair[0])
    v1_dir, _, v1_sha = bundles.make("v1", version="1.0.0")
    v2_dir, _, v2_sha = bundles.make("v2", version="1.1.0", seed=3)
    agent = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1])
    agent.install(v1_dir, keypair[1])
    store = BundleStore(agent.state_dir, trusted=TrustedKeys.from_paths([keypair[1]]))
    store.add_directory(v2_dir)
    store.switch(v2_sha, v1_sha)
    model = store.path(v2_sha) / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    dev = agent.device_id
    try:
        for start in range(2):
            agent.start()
            st = ctl.wait(lambda m: m.type == "state" and m.device_id == dev and m.update is not None
                          and len({s.session for s in ctl.states()}) == start + 1, 60, "state with the fallback")
            assert (st.update.state.value, st.update.code) == ("rolled_back", "active_bundle_damaged"), st.update
            assert "file_hash_mismatch" in st.update.reason
            assert st.active.manifest_sha256 == v1_sha and st.previous is None
            status, models = agent.http("GET", "/v1/models")
            assert status == 200 and models["data"][0]["version"] == "1.0.0", models
            agent.signal(signal.SIGTERM)
            assert agent.wait(30) == 0
            assert json.loads((agent.state_dir / "pointer.json").read_text())["active"] == v1_sha
            assert not store.path(v2_sha).exists()
            # the first start found the damage; the second never tried the broken bundle again
            assert agent.output().count("failed to verify") == (1 if start == 0 else 0), agent.output()[-2000:]
    finally:
        agent.stop()
        ctl.close()
