"""Faults in the middle of a rollout. Each test ends with `check_fleet`: nothing lost, every
device online and serving a valid bundle that the controller knows, the one it believes."""

from __future__ import annotations

import re
import signal
import threading

import pytest

from agent.bundle import pack
from tests.e2e.conftest import check_fleet, device_states, explain, rollout, wait_for, wait_rollout
from tests.support.http import Fault, FileServer

pytestmark = pytest.mark.e2e


def _in_wave_one(client, rollout_id: str) -> None:
    wait_for(lambda: any(s in ("sent", "accepted", "updating", "committed")
                         for s in device_states(client, rollout_id).values()), timeout=30, what="wave 1 under way")


def test_broker_restarted_mid_wave(stack, versions, keypair, mqtt):
    fleet = stack(3)
    client = fleet.client()
    client.push(versions.v1)
    r = rollout(client, "tiny@1.0.0", waves="1,100%", window="2s")
    _in_wave_one(client, r["id"])
    mqtt.restart(downtime=1.0)  # no persistence: retained state and sessions are gone too
    assert wait_rollout(client, r["id"], timeout=120)["state"] == "completed"
    check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])
    client.close()


@pytest.mark.parametrize("crash_at, resumes", [
    ("download:50%", True),  # the download resumes where it stopped and the update finishes
    ("switch:after_rename", False),  # a crash mid-switch rolls back to the old bundle and says so
])
def test_agent_killed_mid_update(stack, versions, keypair, crash_at, resumes):
    """The agent SIGKILLs itself at `crash_at` (agent/update/crashpoint.py): a power cut there."""
    fleet = stack(3)
    client = fleet.client()
    client.push(versions.v1)
    assert wait_rollout(client, rollout(client, "tiny@1.0.0", waves="100%")["id"])["state"] == "completed"
    client.push(versions.v2)
    fleet.agents["dev-1"].proc.stop()
    victim = fleet.start_agent("dev-1", env={"EDGESHIP_CRASH_AT": crash_at})
    r = rollout(client, "tiny@2.0.0", waves="100%", window="2s")
    wait_for(lambda: not victim.proc.alive(), timeout=60, what=f"dev-1 to die at {crash_at}")
    assert victim.proc.popen.returncode == -signal.SIGKILL
    fleet.start_agent("dev-1")  # same state directory: it must recover first
    done = wait_rollout(client, r["id"], timeout=120)
    v1, v2 = versions.sha["1.0.0"], versions.sha["2.0.0"]
    if resumes:
        assert done["state"] == "completed", explain(done)
        check_fleet(fleet, keypair, expect=v2)
    else:
        assert done["state"] == "paused", done  # the gate saw the failure and held the rollout
        states = {d["device"]: (d["state"], d["code"]) for d in done["devices"]}
        assert states["dev-1"][0] == "failed" and "crash" in states["dev-1"][1], states
        check_fleet(fleet, keypair, expect={"dev-0": v2, "dev-1": v1, "dev-2": v2})
        client.operate(r["id"], "abort")
        retry = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%", selector="id=dev-1")["id"])
        assert retry["state"] == "completed", explain(retry)
        check_fleet(fleet, keypair, expect=v2)
    client.close()


def test_controller_killed_mid_wave(stack, versions, keypair):
    fleet = stack(3)
    client = fleet.client()
    client.push(versions.v1)
    r = rollout(client, "tiny@1.0.0", waves="1,100%", window="3s")
    wait_for(lambda: "committed" in device_states(client, r["id"]).values(), timeout=60, what="the canary committed")
    fleet.controller.kill()  # SIGKILL while the wave's health window is open
    client.close()
    fleet.start_controller()  # same database, same port
    client = fleet.client()
    done = wait_rollout(client, r["id"], timeout=120)
    assert done["state"] == "completed", explain(done)
    assert done["counts"] == {"committed": 3}
    check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])
    client.close()


def test_device_offline_for_the_whole_rollout_comes_back_later(stack, versions, keypair):
    fleet = stack(3)
    client = fleet.client()
    client.push(versions.v1)
    client.push(versions.v2)
    assert wait_rollout(client, rollout(client, "tiny@1.0.0", waves="100%")["id"])["state"] == "completed"
    fleet.agents["dev-2"].proc.stop()  # a clean shutdown publishes 'offline'
    wait_for(lambda: not client.device("dev-2")["online"], timeout=30, what="dev-2 offline at the controller")
    r = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%", offline_policy="skip",
                                     device_deadline="4s")["id"])
    assert r["state"] == "completed" and device_states(client, r["id"]) == {
        "dev-0": "committed", "dev-1": "committed", "dev-2": "skipped"}
    fleet.start_agent("dev-2")
    # back on the bundle it had: valid, and the controller knows it
    check_fleet(fleet, keypair, expect={"dev-0": versions.sha["2.0.0"], "dev-1": versions.sha["2.0.0"],
                                        "dev-2": versions.sha["1.0.0"]})
    catch_up = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%", selector="id=dev-2")["id"])
    assert catch_up["state"] == "completed" and catch_up["total"] == 1
    check_fleet(fleet, keypair, expect=versions.sha["2.0.0"])
    client.close()


class PayloadFaults(FileServer):
    """Faults only on the payload download, not on the agent's first small request for the
    archive's manifest (a Range request `bytes=0-N`)."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def _handle(self, h) -> None:
        self._local.head = bool(re.match(r"^bytes=0-\d+$", h.headers.get("Range", "")))
        super()._handle(h)

    def _take_fault(self):
        return None if getattr(self._local, "head", False) else super()._take_fault()


FAULTS = {  # fresh Fault objects per test: a Fault counts itself down
    "500": lambda: Fault("500", times=3),
    "hang": lambda: Fault("hang", times=2, hang_s=2.0),
    "truncate": lambda: Fault("truncate", times=2, at=100_000),
}


def _roll_out_through(server: FileServer, fault: Fault, fleet, versions, keypair, tmp_path) -> None:
    client = fleet.client()
    try:
        client.push(versions.v1)
        url = server.add("v1.tar", pack(versions.v1, tmp_path / "v1.tar"))
        client.register_url("tiny@1.0.0", url, only=True)  # devices download only from this server
        server.fault = fault
        r = wait_rollout(client, rollout(client, "tiny@1.0.0", waves="100%")["id"], timeout=120)
        assert r["state"] == "completed", explain(r)
        assert fault.times == 0  # every planned failure really happened
        check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])
    finally:
        server.stop()
        client.close()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_artifact_server_failing_for_some_downloads(stack, versions, keypair, tmp_path, fault):
    _roll_out_through(PayloadFaults().start(), FAULTS[fault](), stack(2), versions, keypair, tmp_path)


@pytest.mark.parametrize("fault", ["500"])
def test_artifact_server_failing_on_the_first_request(stack, versions, keypair, tmp_path, fault):
    _roll_out_through(FileServer().start(), FAULTS[fault](), stack(2), versions, keypair, tmp_path)


def test_tampered_bundle_on_the_artifact_server(stack, versions, keypair, tmp_path):
    fleet = stack(2)
    client = fleet.client()
    client.push(versions.v1)
    client.push(versions.v2)
    assert wait_rollout(client, rollout(client, "tiny@1.0.0", waves="100%")["id"])["state"] == "completed"
    good = pack(versions.v2, tmp_path / "v2.tar")
    data = bytearray(good.read_bytes())
    at = data.index(bytes(range(256)) * 4) + 1000  # inside weights/extra.bin, past every header
    data[at] ^= 0xFF
    bad = tmp_path / "v2-tampered.tar"
    bad.write_bytes(bytes(data))
    server = FileServer().start()
    try:
        client.register_url("tiny@2.0.0", server.add("v2.tar", bad), only=True)
        r = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%", auto_rollback=True)["id"])
        assert r["state"] == "rolled_back", explain(r)
        for d in r["devices"]:
            assert d["state"] == "failed" and ("hash" in d["code"] or "sha256" in d["reason"]), d
        check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])  # still on the good old bundle
        server.files["v2.tar"] = good  # the mirror is repaired: the same version now goes through
        again = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%")["id"])
        assert again["state"] == "completed", explain(again)
        check_fleet(fleet, keypair, expect=versions.sha["2.0.0"])
    finally:
        server.stop()
        client.close()
