"""The fleet controller end to end: a real controller subprocess, the real broker, simulated
devices speaking the real protocol, real HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

from agent.bundle import open_bundle, TrustedKeys
from agent.protocol import BundleRef
from fleet.client import FleetClient
from fleet.simulator import Behaviour, SimDevice, Simulator, make_devices
from tests.support.bundles import make_bundle
from tests.support.fleet import TOKEN, ControllerProcess, make_database, wait_for

DBS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keypair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-bundles")
    out = {}
    for version, seed in (("1.0.0", 0), ("2.0.0", 1)):
        make_bundle(root / version, keypair[0], name="tiny", version=version, seed=seed)
        out[version] = root / version
    make_bundle(root / "arm", keypair[0], name="armonly", version="1.0.0", arch=["aarch64"])
    out["arm"] = root / "arm"
    return out


def ref(path: Path, keypair) -> BundleRef:
    vb = open_bundle(path, TrustedKeys.from_paths([keypair[1]]))
    return BundleRef(name=vb.manifest.name, version=vb.manifest.version, manifest_sha256=vb.manifest_sha256)


@pytest.fixture(params=DBS)
def fleet(request, broker, topic_prefix, tmp_path, keypair):
    """A factory for controller processes sharing one database; all are stopped afterwards."""
    db = make_database(request.param, tmp_path)
    procs: list[ControllerProcess] = []

    def start(port: int | None = None, **settings: str) -> ControllerProcess:
        p = ControllerProcess(broker.url, topic_prefix, db, tmp_path / "data", [keypair[1]],
                              settings={f"EDGESHIP_FLEET_{k.upper()}": str(v) for k, v in settings.items()})
        if port is not None:
            p.port = port  # a controller restarted at the address devices download from
        procs.append(p)
        return p.start()

    yield start
    for p in procs:
        p.terminate()
    db.drop()


@pytest.fixture
def sims(broker, topic_prefix):
    made: list[Simulator] = []

    def start(devices: list[SimDevice], behaviour: Behaviour = Behaviour(heartbeat_s=0.3), *, online: bool = True) -> Simulator:
        s = Simulator(broker.url, prefix=topic_prefix, devices=devices, behaviour=behaviour)
        made.append(s)
        return s.start(online=online)

    yield start
    for s in made:
        s.stop()


def client_for(c: ControllerProcess) -> FleetClient:
    return FleetClient(c.url, TOKEN)


def online_ids(client: FleetClient) -> set[str]:
    return {d["id"] for d in client.devices() if d["online"]}


def rollout_state(client: FleetClient, rid: str, *states: str):
    r = client.rollout(rid)
    return r if r["state"] in states else None


def deploys_by_device(sim: Simulator) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for device, kind, cid in list(sim.commands):
        if kind == "deploy":
            out[device].add(cid)
    return out


def test_registry_from_birth_heartbeat_and_last_will(fleet, sims, tmp_path):
    c = fleet()
    api = client_for(c)
    sim = sims(make_devices(3, labels={"site": "plant-a"}), Behaviour(heartbeat_s=0.2, requests_per_beat=10, base_p95_ms=33))
    wait_for(lambda: len(online_ids(api)) == 3, what="3 devices online")
    d = wait_for(lambda: (x := api.device("sim-00000")).get("health") and x, what="a heartbeat")
    assert d["facts"]["arch"] == "x86_64" and d["agent_version"] == "0.1.0" and d["labels"] == {"site": "plant-a"}
    assert d["health"]["inference"]["requests"] == 10 and d["health"]["inference"]["p95_ms"] == 33
    assert [x["id"] for x in api.devices("site=plant-a,arch=x86_64")] == ["sim-00000", "sim-00001", "sim-00002"]
    assert api.devices("site=plant-b") == []

    sim.go_offline(["sim-00000"])  # socket dropped: the broker publishes the Last Will
    sim.go_offline(["sim-00001"], graceful=True)
    wait_for(lambda: online_ids(api) == {"sim-00002"}, what="two devices offline")
    reasons = {x["id"]: x["offline_reason"] for x in api.devices()}
    assert reasons["sim-00000"] == "lwt" and reasons["sim-00001"] == "shutdown"
    sim.go_online(["sim-00000"])
    wait_for(lambda: "sim-00000" in online_ids(api), what="device back online")
    api.close()


def test_retained_state_is_picked_up_after_restart_without_heartbeats(fleet, sims, tmp_path):
    c = fleet()
    api = client_for(c)
    quiet = Behaviour(heartbeat_s=3600)  # no heartbeat during the test: only retained state can tell
    sim = sims(make_devices(2), quiet)
    wait_for(lambda: len(online_ids(api)) == 2, what="births")
    assert c.terminate() == 0  # SIGTERM: a clean stop
    late = sims([SimDevice(id="born-while-down", labels={"k": "v"})], quiet)  # noqa: F841
    sim.go_offline(["sim-00001"])
    c2 = fleet(mqtt_client_id="another-controller")  # a fresh MQTT session: nothing queued for it
    api2 = client_for(c2)
    wait_for(lambda: online_ids(api2) == {"sim-00000", "born-while-down"}, what="retained states")
    assert api2.device("sim-00001")["online"] is False
    assert api2.device("born-while-down")["labels"] == {"k": "v"}


def test_full_rollout_in_waves(fleet, sims, bundles, keypair):
    c = fleet()
    api = client_for(c)
    sim = sims(make_devices(5, labels={"site": "a"}))
    wait_for(lambda: len(online_ids(api)) == 5, what="devices")
    pushed = api.push(bundles["1.0.0"])
    assert pushed["ref"] == "tiny@1.0.0"
    r = api.create_rollout(bundle="tiny@1.0.0", selector="site=a", waves="1,50%,100%", health_window="0.5s",
                           device_deadline="30s", max_failure_rate="0%")
    assert r["state"] == "pending" and r["wave_sizes"] == [1, 3, 5]
    done = wait_for(lambda: rollout_state(api, r["id"], "completed", "paused", "rolled_back"), timeout=60, what="completion")
    assert done["state"] == "completed", done["reason"]
    assert done["counts"] == {"committed": 5}
    assert [g["passed"] for g in done["gate"]] == [True, True, True]
    want = ref(bundles["1.0.0"], keypair)
    wait_for(lambda: all(d["active"] and d["active"]["manifest_sha256"] == want.manifest_sha256 for d in api.devices()),
             what="devices report the new bundle")
    assert all(len(ids) == 1 for ids in deploys_by_device(sim).values())  # one deploy id per device


def test_wave_paused_by_failures_then_resumed(fleet, sims, bundles):
    c = fleet()
    api = client_for(c)
    sim = sims(make_devices(4), Behaviour(heartbeat_s=0.3, fail_ids=frozenset({"sim-00000"})))
    wait_for(lambda: len(online_ids(api)) == 4, what="devices")
    api.push(bundles["1.0.0"])
    r = api.create_rollout(bundle="tiny@1.0.0", waves="1,100%", health_window="0.3s", device_deadline="30s",
                           max_failure_rate="5%")
    paused = wait_for(lambda: rollout_state(api, r["id"], "paused", "completed"), timeout=30, what="pause")
    assert paused["state"] == "paused" and "1 of 1 devices failed" in paused["reason"]
    devices = {d["device"]: d for d in paused["devices"]}
    assert devices["sim-00000"]["state"] == "failed" and devices["sim-00000"]["code"] == "smoke_test_failed"
    assert {d["state"] for k, d in devices.items() if k != "sim-00000"} == {"pending"}
    assert set(deploys_by_device(sim)) == {"sim-00000"}  # nothing went to wave 2
    with pytest.raises(Exception, match="cannot pause a rollout that is paused"):
        api.operate(r["id"], "pause")
    api.operate(r["id"], "resume")
    done = wait_for(lambda: rollout_state(api, r["id"], "completed", "paused"), timeout=30, what="completion")
    assert done["state"] == "completed" and done["counts"] == {"committed": 3, "failed": 1}


def test_health_regression_rolls_back_automatically(fleet, sims, bundles, keypair):
    c = fleet()
    api = client_for(c)
    v1 = ref(bundles["1.0.0"], keypair)
    devices = [SimDevice(id=f"dev-{i}", labels={}, active=v1) for i in range(4)]
    sim = sims(devices, Behaviour(heartbeat_s=0.2, requests_per_beat=50, base_error_rate=0.0,
                                  regress_refs=frozenset({"tiny@2.0.0"}), regress_error_rate=0.4))
    wait_for(lambda: len(online_ids(api)) == 4, what="devices")
    api.push(bundles["2.0.0"])
    wait_for(lambda: all((d.get("health") or {}).get("inference") for d in api.devices()), what="baseline heartbeats")
    r = api.create_rollout(bundle="tiny@2.0.0", waves="2,100%", health_window="1.5s", device_deadline="30s",
                           auto_rollback=True)
    done = wait_for(lambda: rollout_state(api, r["id"], "rolled_back", "completed", "paused"), timeout=40, what="gate")
    assert done["state"] == "rolled_back", done["reason"]
    assert "error rate" in done["reason"] and "wave 1" in done["reason"]
    assert done["gate"][-1]["passed"] is False and done["gate"][-1]["post"]["errors"] > 0
    final = wait_for(lambda: rollout_state(api, r["id"], "rolled_back") if rollout_state(api, r["id"], "rolled_back")["counts"].get("rolled_back") == 2 else None,
                     timeout=20, what="rollbacks confirmed")
    assert final["counts"] == {"rolled_back": 2, "cancelled": 2}
    wait_for(lambda: all(d["active"]["version"] == "1.0.0" for d in api.devices()), what="devices back on 1.0.0")
    assert len(deploys_by_device(sim)) == 2  # wave 2 never got the bad bundle


def test_offline_devices_past_the_deadline(fleet, sims, bundles):
    c = fleet()
    api = client_for(c)
    sim = sims(make_devices(3))
    wait_for(lambda: len(online_ids(api)) == 3, what="devices")
    sim.go_offline(["sim-00002"])
    wait_for(lambda: len(online_ids(api)) == 2, what="one offline")
    api.push(bundles["1.0.0"])
    r = api.create_rollout(bundle="tiny@1.0.0", waves="100%", health_window="0.2s", device_deadline="2s",
                           offline_policy="skip")
    done = wait_for(lambda: rollout_state(api, r["id"], "completed", "paused"), timeout=30, what="completion")
    assert done["state"] == "completed" and done["counts"] == {"committed": 2, "skipped": 1}
    skipped = next(d for d in done["devices"] if d["state"] == "skipped")
    assert skipped["device"] == "sim-00002" and "offline past the device deadline" in skipped["reason"]
    assert "sim-00002" not in deploys_by_device(sim)

    # within the deadline, a device that comes back gets the command then
    api.push(bundles["2.0.0"])
    r2 = api.create_rollout(bundle="tiny@2.0.0", waves="100%", health_window="0.2s", device_deadline="20s",
                            offline_policy="fail")
    wait_for(lambda: api.rollout(r2["id"])["counts"] == {"committed": 2, "waiting": 1}, what="two done, one waiting")
    sim.go_online(["sim-00002"])
    done2 = wait_for(lambda: rollout_state(api, r2["id"], "completed", "paused"), timeout=30, what="completion")
    assert done2["counts"] == {"committed": 3}

    # past the deadline with --offline-policy fail: the failure counts, the gate pauses
    sim.go_offline(["sim-00001"])
    wait_for(lambda: len(online_ids(api)) == 2, what="one offline")
    r3 = api.create_rollout(bundle="tiny@1.0.0", waves="100%", health_window="0.2s", device_deadline="1s",
                            offline_policy="fail", max_failure_rate="10%")
    paused = wait_for(lambda: rollout_state(api, r3["id"], "paused", "completed"), timeout=30, what="pause")
    assert paused["state"] == "paused" and paused["counts"] == {"committed": 2, "failed": 1}
    assert next(d for d in paused["devices"] if d["state"] == "failed")["code"] == "offline"


def test_controller_killed_mid_wave_resumes_without_double_deploys(fleet, sims, bundles):
    c = fleet()
    api = client_for(c)
    sim = sims(make_devices(8), Behaviour(heartbeat_s=0.3, ack_delay_s=0.6, step_delay_s=0.15))
    wait_for(lambda: len(online_ids(api)) == 8, what="devices")
    api.push(bundles["1.0.0"])
    r = api.create_rollout(bundle="tiny@1.0.0", waves="2,100%", health_window="0.3s", device_deadline="60s")
    mid = wait_for(lambda: (x := api.rollout(r["id"]))["wave"] == 2 and x["counts"].get("sent") and x, timeout=30,
                   what="wave 2 under way")
    c.kill()  # SIGKILL in the middle of wave 2
    acked_before = {d["device"] for d in mid["devices"] if d["state"] in ("accepted", "updating", "committed")}
    c2 = fleet(port=c.port)
    api2 = client_for(c2)
    done = wait_for(lambda: rollout_state(api2, r["id"], "completed", "paused"), timeout=60, what="completion")
    assert done["state"] == "completed" and done["counts"] == {"committed": 8}, (done["reason"], [(d["device"], d["code"], d["reason"]) for d in done["devices"]])
    per_device = deploys_by_device(sim)
    assert all(len(ids) == 1 for ids in per_device.values()), per_device  # never a second, different deploy
    received = defaultdict(int)
    for device, kind, _ in list(sim.commands):
        if kind == "deploy":
            received[device] += 1
    assert all(received[d] == 1 for d in acked_before), (acked_before, dict(received))


def test_device_deadlines_do_not_run_while_paused(fleet, sims, bundles):
    c = fleet()
    api = client_for(c)
    sims(make_devices(3), Behaviour(heartbeat_s=0.3, step_delay_s=0.25))
    wait_for(lambda: len(online_ids(api)) == 3, what="devices")
    api.push(bundles["1.0.0"])
    r = api.create_rollout(bundle="tiny@1.0.0", waves="100%", health_window="0.2s", device_deadline="5s",
                           max_concurrent_downloads=1)
    wait_for(lambda: api.rollout(r["id"])["counts"].get("waiting"), what="the wave under way, devices held back")
    api.operate(r["id"], "pause")
    time.sleep(6)  # longer than the device deadline
    paused = api.rollout(r["id"])
    assert paused["state"] == "paused" and paused["counts"].get("waiting", 0) >= 1 and "failed" not in paused["counts"]
    api.operate(r["id"], "resume")
    done = wait_for(lambda: rollout_state(api, r["id"], "completed", "paused"), timeout=30, what="completion")
    assert done["state"] == "completed" and done["counts"] == {"committed": 3}, done["devices"]
