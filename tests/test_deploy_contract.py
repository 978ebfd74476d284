"""The deploy command contract between controller and agent (issue 19, items 8 and 9).

The controller's real engine (on a real database) builds and publishes the deploy; a real agent update
manager (real bundle store, real onnxruntime model, real HTTP download) judges it and answers; its
acks and events go back into the engine. Only MQTT is left out: payloads are handed over exactly as
the MQTT threads hand them over. The replay cases run through the broker with the update harness.
"""

from __future__ import annotations

import hashlib
import json
import platform
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from agent.bundle import TrustedKeys
from agent.protocol import Channel, DeviceFacts, ReportCommand, RollbackCommand, StateMessage, Topics, encode
from agent.runtime import ModelHost, load_model
from agent.update.manager import UpdateConfig, UpdateManager
from agent.update.store import BundleStore
from fleet.db import make_engine, migrate, sessions
from fleet.models import Bundle, Device as DeviceRow, Rollout, RolloutDevice
from fleet.rollout.engine import Engine
from fleet.rollout.plan import RolloutSpec
from tests.support.fleet import make_database, wait_for
from tests.support.http import FileServer
from tests.support.update_harness import CHANNEL_OF, Bundles, deadline_in
from tests.test_update_faults import Env, env  # noqa: F401  (the harness fixture: broker, HTTP server, device)

GOOD, BAD = np.full((1, 8), 0.25, np.float32), np.full((1, 16), 0.25, np.float32)  # BAD: wrong width, fails


def _traffic(host: ModelHost, stop: threading.Event, every: dict[str, int], default: int) -> None:
    """Real requests on whatever model serves; every `n`-th fails (wrong input width), n by bundle sha."""
    i = 0
    while not stop.is_set():
        i += 1
        t0, ok = time.perf_counter(), True
        try:
            with host.acquire() as model:
                model.embed(BAD if i % every.get(Path(model.path).name, default) == 0 else GOOD)
        except Exception:  # noqa: BLE001 - a failed request is what is being counted
            ok = False
        host.stats.record((time.perf_counter() - t0) * 1000, ok=ok)
        time.sleep(0.002)


class Traffic:
    """Client traffic at a fixed error rate per model, for the length of a `with` block."""

    def __init__(self, host: ModelHost, *, every: dict[str, int], default: int = 16):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_traffic, args=(host, self.stop, every, default), daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class Device:
    """A real UpdateManager whose commands come from the engine's publish and whose answers go to `deliver`."""

    def __init__(self, state_dir: Path, trusted: TrustedKeys, install: Path, eng: Engine, **config_kw):
        self.id, self.eng = "dev1", eng
        self.store = BundleStore(state_dir, trusted=trusted)
        vb = self.store.add_directory(install)
        self.store.switch(vb.manifest_sha256, None)
        self.host = ModelHost(load_model(self.store.active()))
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.commands: list[dict] = []
        config = UpdateConfig(state_dir=state_dir, device_id=self.id, agent_version="0.1.0", watch_poll_s=0.05,
                              drain_timeout_s=5, max_watch_s=30, **config_kw)
        self.manager = UpdateManager(config=config, store=self.store, host=self.host, publish=self.publish,
                                     trusted=trusted, on_state_change=self.birth)
        self.manager.recover()
        self.owner = threading.Thread(target=self._serve, daemon=True)
        self.owner.start()

    def publish(self, msg) -> None:
        self.eng.deliver(self.eng.topics.device(self.id, CHANNEL_OF[msg.type]), encode(msg))

    def birth(self) -> None:
        self.publish(StateMessage(device_id=self.id, session=self.manager.config.session, seq=self.manager._seq(),
                                  agent_version="0.1.0", facts=DeviceFacts(arch=platform.machine()),
                                  **self.manager.snapshot()))

    def receive(self, topic: str, payload: bytes) -> None:  # the engine's publish: the broker's job
        if self.eng.topics.parse(topic) == (self.id, Channel.CMD):
            self.commands.append(json.loads(payload))
            self.inbox.put(payload)

    def _serve(self) -> None:
        while (payload := self.inbox.get()) is not None:
            self.publish(self.manager.handle_payload(payload))

    def close(self) -> None:
        self.inbox.put(None)
        self.manager.close()
        self.manager.wait_idle(10)
        self.host.current.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fleet(request, tmp_path, keypair):
    srv = FileServer().start()
    bundles = Bundles(tmp_path / "bundles", keypair[0])
    v1_dir, _, _ = bundles.make("v1", version="1.0.0")
    db = make_database(request.param, tmp_path)
    sql = make_engine(db.url, schema=db.schema)
    migrate(sql)
    devices: list[Device] = []
    eng = Engine(sessions(sql), topics=Topics("t"), publish=lambda t, p: [d.receive(t, p) for d in devices],
                 base_url=srv.url("").rstrip("/"), tick_interval_s=0.05, heartbeat_timeout_s=600)
    eng.start()
    dev = Device(tmp_path / "state", TrustedKeys.from_paths([keypair[1]]), v1_dir, eng)
    devices.append(dev)
    dev.birth()
    wait_for(lambda: eng.call(lambda s: (d := s.get(DeviceRow, dev.id)) is not None and d.online), what="device online")
    yield eng, dev, bundles, srv
    dev.close()
    eng.stop()
    sql.dispose()
    db.drop()
    srv.stop()


def push(eng: Engine, bundles: Bundles, srv: FileServer, label: str, **make) -> str:
    """Make bundle `label`, serve it at the controller's bundle URL and register it; returns its sha."""
    d, tar, sha = bundles.make(label, **make)
    srv.add(f"bundles/{sha}.tar", tar)
    manifest = json.loads((d / "manifest.json").read_text())

    def register(s):
        s.add(Bundle(manifest_sha256=sha, name=manifest["name"], version=manifest["version"], key_id="test",
                     manifest=manifest, archive_sha256=hashlib.sha256(tar.read_bytes()).hexdigest(),
                     size=tar.stat().st_size, stored=True, urls=[], url_only=False, created_at=time.time()))

    eng.call(register)
    return sha


def roll_out(eng: Engine, ref: str, **spec) -> RolloutDevice:
    """Create a one-wave rollout of `ref` to every device; the device's row once it is done."""
    spec = RolloutSpec(**{"waves": ["100%"], "max_failure_rate": 1.0, "health_window_s": 1.5,
                          "device_deadline_s": 60, "max_p95_ratio": 1000, **spec})
    rid = eng.call(lambda s: eng.create_rollout(s, bundle_ref=ref, selector="", spec=spec))

    def done(s):  # the rollout finished (its health window too), so the next one may start
        rd = s.scalar(select(RolloutDevice).where(RolloutDevice.rollout_id == rid))
        return rd if s.get(Rollout, rid).finished_at is not None else None

    return wait_for(lambda: eng.call(done), timeout=90, what=f"rollout of {ref} done on the device")


# ---- item 8: the controller's margin is judged over the device's own baseline --------------------

@pytest.mark.parametrize("new_every,outcome", [(16, ("committed", "", "committed")),
                                               (4, ("failed", "watch_regression", "rolled_back"))],
                         ids=["6pct-stays-6pct", "6pct-jumps-to-25pct"])
def test_a_device_whose_old_model_erred_at_6pct_is_judged_on_the_increase(fleet, new_every, outcome):
    eng, dev, bundles, srv = fleet
    v2 = push(eng, bundles, srv, "v2", version="1.1.0")
    v1 = dev.store.active_sha()
    with Traffic(dev.host, every={v2: new_every}, default=16):  # the old model: 1 in 16 requests fail (6.25 %)
        wait_for(lambda: dev.host.stats.window(0)[0] >= 60, what="a baseline of the old model")
        rd = roll_out(eng, "tiny@1.1.0", max_error_rate_increase=0.05, min_requests=20)
    assert (rd.state, rd.code, dev.manager.status.state.value) == outcome, rd.reason
    assert dev.store.active_sha() == (v2 if outcome[0] == "committed" else v1)
    watch = dev.commands[0]["watch"]  # the rollout's gate, as the device applies it to itself
    assert watch == {"window_s": 1.5, "min_requests": 0, "min_judged_requests": 20, "max_error_rate_increase": 0.05,
                     "max_p95_ratio": 1000.0}


# ---- item 9: which names a device may run ----------------------------------------------------------

def test_a_deploy_of_another_name_is_refused_unless_the_rollout_says_it_replaces_the_active_one(fleet):
    eng, dev, bundles, srv = fleet
    other = push(eng, bundles, srv, "embedder", name="embedder", version="0.1.0")
    rd = roll_out(eng, "embedder@0.1.0")
    assert (rd.state, rd.code) == ("failed", "name_change_refused") and "--replaces tiny" in rd.reason
    assert srv.requests == [] and dev.store.active().manifest.name == "tiny"  # refused from the command alone
    rd = roll_out(eng, "embedder@0.1.0", replaces=["tiny"])  # no traffic: the watch is not held waiting for it
    assert dev.commands[-1]["replaces"] == ["tiny"]
    assert rd.state == "committed", rd.reason
    assert dev.store.active_sha() == other


def test_a_rollout_refuses_a_replaces_that_is_no_bundle_name():
    from fleet.api import RolloutBody
    from fleet.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"rollout option replaces\.0: String should match pattern"):
        RolloutBody(bundle="embedder@0.1.0", replaces=["Tiny Chat"]).spec()
    assert RolloutBody(bundle="embedder@0.1.0", replaces=["tiny"]).spec().replaces == ["tiny"]


# ---- item 9: replays, through the broker and the update harness ------------------------------------

def test_replayed_commands_after_the_id_memory_rolled_over_change_nothing(env: Env):
    from agent.update.persist import MAX_ACKS

    first = env.deploy("v2", version="1.1.0", deadline=deadline_in(3))
    assert env.ctl.final_event(first).state.value == "committed"
    v2 = env.bundles.made["v2"][2]
    env.ctl.send(RollbackCommand(id="rb-r1", device_id="dev1", rollout_id="r1"))
    assert env.ctl.final_event("rb-r1").state.value == "rolled_back"
    env.dev.manager.wait_idle(10)
    second = env.deploy("v3", version="1.2.0", rollout_id="r2")  # a later rollout installs 1.2.0 over 1.0.0
    assert env.ctl.final_event(second).state.value == "committed"
    env.dev.manager.wait_idle(10)
    v3 = env.bundles.made["v3"][2]
    for i in range(MAX_ACKS):  # every id the device remembers is now a report
        env.dev.manager.handle(ReportCommand(id=f"rep{i}", device_id="dev1"))
    assert "rb-r1" not in env.dev.manager._state.acks and first not in env.dev.manager._state.acks
    old_deploy = env.ctl.sent[first]
    expiry = datetime.fromisoformat(json.loads(old_deploy)["deadline"])
    time.sleep(max(0.0, (expiry - datetime.now(timezone.utc)).total_seconds() + 0.1))
    requests = len(env.srv.requests)

    env.ctl.send(RollbackCommand(id="rb-r1", device_id="dev1", rollout_id="r1"))  # the old rollback again
    ack = env.ctl.wait(lambda m: m.type == "ack" and m.command_id == "rb-r1" and not m.accepted, 15, "rollback refused")
    assert ack.code == "rollout_not_active" and not ack.duplicate, ack.reason
    env.ctl.send_raw("dev1", old_deploy)  # the old deploy again, byte for byte
    ack = env.ctl.wait(lambda m: m.type == "ack" and m.command_id == first and not m.accepted, 15, "deploy refused")
    assert ack.code == "deadline_passed" and "never applied" in ack.reason
    no_deadline = json.loads(env.ctl.sent[second])
    no_deadline.pop("deadline")
    no_deadline["id"] = "forever"
    env.ctl.send_raw("dev1", json.dumps(no_deadline).encode())
    assert env.ctl.ack("forever").code == "deadline_missing"
    env.dev.manager.wait_idle(10)
    assert env.dev.store.pointer() == (v3, env.v1_sha) and env.dev.serving_sha() == v3
    assert len(env.srv.requests) == requests and v2 not in {p.name for p in env.dev.store.bundles_dir.iterdir()}


def test_the_device_list_of_bundle_names_holds_whatever_the_command_says(tmp_path, broker, topic_prefix, keypair):
    from tests.support.update_harness import Controller, InProcessDevice

    srv = FileServer().start()
    bundles = Bundles(tmp_path / "bundles", keypair[0])
    v1_dir, _, _ = bundles.make("v1", version="1.0.0")
    _, tar, sha = bundles.make("other", name="other", version="9.0.0")
    ctl = Controller(broker.port, topic_prefix)
    dev = InProcessDevice(tmp_path / "state", broker.port, topic_prefix, TrustedKeys.from_paths([keypair[1]]),
                          install=v1_dir, bundle_names=("tiny",))
    try:
        from agent.protocol import BundleRef, DeployCommand

        ctl.send(DeployCommand(id="o1", device_id="dev1", rollout_id="r1", urls=[srv.add("other.tar", tar)],
                               deadline=deadline_in(), replaces=["tiny"],
                               bundle=BundleRef(name="other", version="9.0.0", manifest_sha256=sha)))
        ack = ctl.ack("o1")
        assert (ack.accepted, ack.code) == (False, "bundle_not_allowed") and "bundle_names" in ack.reason
        assert srv.requests == [] and dev.store.active().manifest.name == "tiny"
    finally:
        dev.close()
        ctl.close()
        srv.stop()

