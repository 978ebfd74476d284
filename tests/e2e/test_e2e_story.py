"""The demo's story as a test: waves, a canary, a broken version rolled back on its own; and the
two refusals every deployment relies on (no token, untrusted signing key)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import check_fleet, rollout, wait_rollout
from tests.support.bundles import make_bundle

pytestmark = pytest.mark.e2e


def test_waves_canary_and_automatic_rollback(stack, versions, keypair):
    fleet = stack(4)
    client = fleet.client()
    for path in (versions.v1, versions.v2, versions.broken):
        client.push(path)

    r = rollout(client, "tiny@1.0.0", waves="1,2,100%")
    assert r["wave_sizes"] == [1, 2, 4]
    done = wait_rollout(client, r["id"])
    assert done["state"] == "completed", done
    assert done["counts"] == {"committed": 4}
    assert [g["passed"] for g in done["gate"]] == [True, True, True]
    check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])

    canary = rollout(client, "tiny@2.0.0", waves="1,100%")
    assert wait_rollout(client, canary["id"])["state"] == "completed"
    check_fleet(fleet, keypair, expect=versions.sha["2.0.0"])

    bad = rollout(client, "tiny@3.0.0", waves="1,100%", auto_rollback=True)
    end = wait_rollout(client, bad["id"], states=("rolled_back", "aborted", "paused", "completed"))
    assert end["state"] == "rolled_back", end
    failed = [d for d in end["devices"] if d["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["wave"] == 1  # the canary caught it; wave 2 never started
    assert "golden" in (failed[0]["code"] + failed[0]["reason"]).lower() or "smoke" in failed[0]["code"], failed
    assert not [d for d in end["devices"] if d["state"] == "committed"]
    check_fleet(fleet, keypair, expect=versions.sha["2.0.0"])  # nobody runs the broken build
    client.close()


def test_the_management_api_refuses_without_a_token(stack):
    fleet = stack(1)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {fleet.token}"}):
        for method, path in (("GET", "/v1/devices"), ("GET", "/v1/bundles"), ("POST", "/v1/rollouts"),
                             ("POST", "/v1/bundles"), ("GET", "/v1/status")):
            resp = httpx.request(method, f"{fleet.url}{path}", headers=headers, timeout=10)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert "token" in resp.json()["error"]
    ok = httpx.get(f"{fleet.url}/v1/devices", headers={"Authorization": f"Bearer {fleet.token}"}, timeout=10)
    assert ok.status_code == 200 and [d["id"] for d in ok.json()] == ["dev-0"]


def test_an_agent_refuses_a_bundle_signed_by_a_key_it_does_not_trust(stack, versions, keypair, other_keypair, tmp_path):
    # The controller trusts both keys; the agents only the release key.
    fleet = stack(2, controller_env={"EDGESHIP_FLEET_TRUSTED_KEYS": f'["{keypair[1]}", "{other_keypair[1]}"]'})
    client = fleet.client()
    client.push(versions.v1)
    assert wait_rollout(client, rollout(client, "tiny@1.0.0")["id"])["state"] == "completed"
    make_bundle(tmp_path / "rogue", other_keypair[0], version="9.0.0", seed=5)
    client.push(tmp_path / "rogue")
    r = wait_rollout(client, rollout(client, "tiny@9.0.0", waves="100%")["id"])
    assert r["state"] in ("paused", "rolled_back"), r
    for d in r["devices"]:
        assert d["state"] == "failed" and "untrusted" in (d["code"] + d["reason"]).lower(), d
    check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])
    client.close()
