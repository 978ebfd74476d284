"""End-to-end fixtures: our own mosquitto per test, the real controller and real agents as
subprocesses (edgeship.localstack.LocalFleet, the demo's machinery), tiny real bundles, real HTTP.

Every e2e test ends with `check_fleet`: nothing lost, and every device serving a valid bundle
that the controller knows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.bundle import TrustedKeys, open_bundle
from edgeship.localstack import LocalFleet, Processes
from tests.support.broker import Broker, start_broker
from tests.support.bundles import make_bundle

# Big enough that a download takes many 64 KiB chunks (so "mid-download" exists), small enough to be quick.
PAYLOAD_BYTES = 3 * 1024 * 1024
TERMINAL = ("completed", "paused", "aborted", "rolled_back")


@dataclass(frozen=True)
class Versions:
    v1: Path
    v2: Path
    broken: Path  # golden outputs its model cannot reproduce: the smoke test fails
    sha: dict[str, str]  # version -> manifest sha256


@pytest.fixture(scope="session")
def versions(tmp_path_factory, keypair) -> Versions:
    root = tmp_path_factory.mktemp("e2e-bundles")
    blob = {"weights/extra.bin": bytes(range(256)) * (PAYLOAD_BYTES // 256)}
    make_bundle(root / "v1", keypair[0], version="1.0.0", seed=0, extra_files=blob)
    make_bundle(root / "v2", keypair[0], version="2.0.0", seed=1, extra_files=blob)
    make_bundle(root / "v3", keypair[0], version="3.0.0", seed=2, golden_scale=3.0, extra_files=blob)
    trusted = TrustedKeys.from_paths([keypair[1]])
    sha = {v: open_bundle(root / d, trusted).manifest_sha256 for v, d in (("1.0.0", "v1"), ("2.0.0", "v2"), ("3.0.0", "v3"))}
    return Versions(root / "v1", root / "v2", root / "v3", sha)


@pytest.fixture
def mqtt() -> Broker:
    """A mosquitto of this test's own, so that it can be restarted or killed."""
    b = start_broker()
    yield b
    b.stop()


@pytest.fixture
def processes() -> Processes:
    p = Processes()
    yield p
    p.close()


@pytest.fixture
def stack(tmp_path, mqtt, processes, keypair):
    """A factory: stack(n_agents, **controller_env) -> LocalFleet with a controller and n agents online."""
    made: list[LocalFleet] = []

    def make(agents: int = 3, *, trusted: list[Path] | None = None, controller_env: dict[str, str] | None = None,
             labels=None) -> LocalFleet:
        fleet = LocalFleet(tmp_path / "fleet", processes, broker_url=mqtt.url, trusted_keys=trusted or [keypair[1]],
                           controller_env=controller_env)
        fleet.start_controller()
        ids = [f"dev-{i}" for i in range(agents)]
        for i, device_id in enumerate(ids):
            fleet.start_agent(device_id, labels=(labels or {}).get(device_id, {"ring": "canary" if i == 0 else "main"}),
                              wait=False)
        for a in fleet.agents.values():
            _wait_http(f"{a.api_url}/healthz", a)
        fleet.wait_online(ids)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:  # on failure, the logs say what happened
        for log in sorted((fleet.workdir / "logs").glob("*.log")):
            print(f"---- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def _wait_http(url: str, agent) -> None:
    from edgeship.localstack import http_ok, wait_until

    wait_until(lambda: http_ok(url), timeout=60, what=url, proc=agent.proc)


def wait_rollout(client, rollout_id: str, *, states=TERMINAL, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.rollout(rollout_id)
        if r["state"] in states:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout {rollout_id} still {r['state']} after {timeout}s: {r['counts']} "
                                 f"{[(d['device'], d['state'], d['reason']) for d in r.get('devices', [])]}")
        time.sleep(0.3)


def explain(r: dict) -> str:
    """A rollout's outcome in one readable line, for assertion messages."""
    return (f"{r['state']}: {r['reason']}; gates {[g.get('reason') for g in r.get('gate', [])]}; devices "
            f"{[(d['device'], d['state'], d['code'], d['reason'][:120]) for d in r.get('devices', [])]}")


def wait_for(check, *, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.2)


def rollout(client, ref: str, *, waves: str = "1,100%", window: str = "1s", **opts) -> dict:
    return client.create_rollout(bundle=ref, waves=waves, health_window=window, min_requests=0,
                                 device_deadline=opts.pop("device_deadline", "2m"), **opts)


def device_states(client, rollout_id: str) -> dict[str, str]:
    return {d["device"]: d["state"] for d in client.rollout(rollout_id)["devices"]}


def check_fleet(fleet: LocalFleet, keypair, *, expect: dict[str, str] | str, timeout: float = 60) -> None:
    """Nothing lost: every agent is online at the controller, serves a bundle that verifies on its
    disk, that the controller has in its registry, and that is the one the controller believes it
    runs; `expect` is the manifest sha256 each device must end on (one for all, or per device)."""
    client = fleet.client()
    trusted = TrustedKeys.from_paths([keypair[1]])
    want = expect if isinstance(expect, dict) else {d: expect for d in fleet.agents}
    known = {b["manifest_sha256"] for b in client.bundles()}

    def settled():
        devices = {d["id"]: d for d in client.devices()}
        return all(devices.get(d, {}).get("online") and (devices[d].get("active") or {}).get("manifest_sha256") == sha
                   for d, sha in want.items()) and devices

    try:
        devices = wait_for(settled, timeout=timeout, what=f"every device online on its expected bundle {want}")
    except AssertionError:
        seen = {d["id"]: (d["online"], (d.get("active") or {}).get("version")) for d in client.devices()}
        raise AssertionError(f"fleet did not settle: controller sees {seen}") from None
    finally:
        client.close()
    from agent.update.store import BundleStore

    for device_id, sha in want.items():
        agent = fleet.agents[device_id]
        assert agent.proc.alive(), f"{device_id} is not running"
        assert sha in known, f"{device_id} serves {sha}, which the controller does not know"
        store = BundleStore(agent.state_dir, trusted=trusted)
        assert store.active_sha() == sha
        vb = store.bundle(sha, check_hashes=True)  # signature and every file hash, on the device's disk
        assert vb.manifest_sha256 == sha
        ready = _get_json(f"{agent.api_url}/readyz")
        assert ready["status"] == "ready" and ready["model"] == vb.manifest.ref, ready
        assert devices[device_id]["active"]["version"] == vb.manifest.version


def _get_json(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())
