"""The controller's REST API and every `edgeship fleet` command with --json, against a real
controller process, the real broker and simulated devices, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from agent.bundle import pack
from agent.protocol import BundleRef
from fleet.cli import cli
from fleet.simulator import Behaviour, SimDevice, Simulator, make_devices
from tests.support.bundles import make_bundle
from tests.support.fleet import TOKEN, ControllerProcess, make_database, wait_for

DBS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module")
def bundle_dirs(tmp_path_factory, keypair, other_keypair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-api-bundles")
    make_bundle(root / "v1", keypair[0], name="tiny", version="1.0.0")
    make_bundle(root / "v2", keypair[0], name="tiny", version="2.0.0", seed=3)
    make_bundle(root / "arm", keypair[0], name="armonly", version="1.0.0", arch=["aarch64"])
    make_bundle(root / "foreign", other_keypair[0], name="foreign", version="1.0.0")
    return {"v1": root / "v1", "v2": root / "v2", "arm": root / "arm", "foreign": root / "foreign"}


@pytest.fixture(params=DBS)
def controller(request, broker, topic_prefix, tmp_path, keypair):
    db = make_database(request.param, tmp_path)
    c = ControllerProcess(broker.url, topic_prefix, db, tmp_path / "data", [keypair[1]]).start()
    sim = Simulator(broker.url, prefix=topic_prefix, behaviour=Behaviour(heartbeat_s=0.3),
                    devices=[*make_devices(3, labels={"site": "plant-a"}), SimDevice(id="edge-b", labels={"site": "plant-b"})])
    for d in sim.devices.values():  # a bundle from before the controller's time, to roll back to
        d.active = BundleRef(name="tiny", version="0.9.0", manifest_sha256="0" * 64)
    sim.start()
    wait_for(lambda: len(httpx.get(f"{c.url}/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"}).json()) == 4,
             what="devices registered")
    yield c
    sim.stop()
    assert c.terminate() == 0  # SIGTERM is a clean stop
    db.drop()


def run(c: ControllerProcess, *args: str, token: str | None = TOKEN, code: int = 0):
    """Invoke the CLI with --json; returns the parsed JSON (or list of JSON lines for watch)."""
    base = ["--url", c.url] + (["--token", token] if token is not None else [])
    result = CliRunner().invoke(cli, [*base, *args, "--json"], obj={}, env={"EDGESHIP_FLEET_TOKEN": ""})
    assert result.exit_code == code, (args, result.exit_code, result.output, result.stderr)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if code not in (0, 7, 8):  # watch's 7 and 8 are outcomes, not errors
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    return lines if len(lines) != 1 else lines[0]


def test_api_refuses_requests_without_the_token(controller):
    url = controller.url
    for method, path in (("GET", "/v1/devices"), ("GET", "/v1/rollouts"), ("POST", "/v1/bundles"),
                         ("POST", "/v1/rollouts/ro1/pause"), ("GET", "/v1/status")):
        assert httpx.request(method, url + path).status_code == 401
        wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "wrong API token" in wrong.json()["error"]
    assert httpx.get(url + "/healthz").status_code == 200
    spec = httpx.get(url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/v1/devices", "/v1/bundles", "/v1/rollouts", "/v1/rollouts/{rollout_id}/rollback"} <= set(spec["paths"])
    err = run(controller, "devices", token=None, code=4)
    assert err["ok"] is False and "API token" in err["error"]


def test_every_cli_command_with_json(controller, bundle_dirs, tmp_path):
    c = controller
    devices = run(c, "devices")
    assert {d["id"] for d in devices} == {"sim-00000", "sim-00001", "sim-00002", "edge-b"}
    assert [d["id"] for d in run(c, "devices", "--selector", "site=plant-b")] == ["edge-b"]
    assert run(c, "device", "show", "sim-00001")["labels"] == {"site": "plant-a"}
    assert run(c, "device", "label", "sim-00001", "ring=canary", "tier=gold")["op_labels"] == {"ring": "canary", "tier": "gold"}
    assert run(c, "device", "label", "sim-00001", "tier=")["op_labels"] == {"ring": "canary"}
    assert [d["id"] for d in run(c, "devices", "--selector", "ring=canary")] == ["sim-00001"]
    assert "not found" in run(c, "device", "show", "nope", code=5)["error"]

    pushed = run(c, "bundle", "push", str(bundle_dirs["v1"]))  # a directory: packed by the CLI
    assert pushed["ref"] == "tiny@1.0.0" and pushed["stored"]
    tar = pack(bundle_dirs["v2"], tmp_path / "v2.tar")
    assert run(c, "bundle", "push", str(tar))["ref"] == "tiny@2.0.0"  # a .tar
    assert run(c, "bundle", "push", str(bundle_dirs["v1"]))["manifest_sha256"] == pushed["manifest_sha256"]  # idempotent
    refused = run(c, "bundle", "push", str(bundle_dirs["foreign"]), code=1)
    assert "signature_untrusted" in refused["error"] and "not among the trusted keys" in refused["error"]
    assert [b["ref"] for b in run(c, "bundle", "list")] == ["tiny@1.0.0", "tiny@2.0.0"]
    shown = run(c, "bundle", "show", "tiny@1.0.0")
    assert shown["manifest"]["name"] == "tiny" and shown["files"] == 3
    with_url = run(c, "bundle", "register-url", "tiny@2.0.0", "https://cdn.example.invalid/tiny-2.tar")
    assert with_url["urls"] == ["https://cdn.example.invalid/tiny-2.tar"]

    # downloads: open to devices, with Range
    sha = pushed["manifest_sha256"]
    whole = httpx.get(f"{c.url}/bundles/{sha}.tar")
    assert whole.status_code == 200 and len(whole.content) == pushed["size"]
    part = httpx.get(f"{c.url}/bundles/{sha}.tar", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert httpx.get(f"{c.url}/bundles/{'0' * 64}.tar").status_code == 404

    # rollouts: target mismatch is listed, a second rollout on the same devices is refused
    run(c, "bundle", "push", str(bundle_dirs["arm"]))
    mismatch = run(c, "rollout", "create", "--bundle", "armonly@1.0.0", "--selector", "site=plant-a", code=1)
    assert "does not fit 3 selected device(s)" in mismatch["error"] and "sim-00002: arch x86_64" in mismatch["error"]
    assert "matches no device" in run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--selector", "site=mars", code=1)["error"]
    assert "--health-window" in run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--health-window", "soon", code=1)["error"]
    too_long = run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--device-deadline", "99999999h", code=1)
    assert too_long["error"] == "--device-deadline '99999999h' is out of range; allowed 1s to 720h"
    r = run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--selector", "site=plant-a", "--waves", "1,100%",
            "--health-window", "1s", "--device-deadline", "30s", "--max-failure-rate", "0%",
            "--max-concurrent-downloads", "1")
    assert r["total"] == 3 and r["wave_sizes"] == [1, 3]
    busy = run(c, "rollout", "create", "--bundle", "tiny@2.0.0", "--selector", "site=plant-a", code=6)
    assert "already in an active rollout" in busy["error"] and r["id"] in busy["error"]
    assert "used by active rollout" in run(c, "bundle", "rm", "tiny@1.0.0", code=6)["error"]
    paused = run(c, "rollout", "pause", r["id"])
    assert paused["state"] == "paused"
    assert "cannot pause" in run(c, "rollout", "pause", r["id"], code=6)["error"]
    assert run(c, "rollout", "resume", r["id"])["state"] == "running"
    frames = run(c, "rollout", "watch", r["id"], "--interval", "0.2", "--timeout", "60")
    frames = frames if isinstance(frames, list) else [frames]
    assert frames[-1]["state"] == "completed" and frames[-1]["counts"] == {"committed": 3}
    assert any(f["wave"] == 1 for f in frames) or frames[0]["wave"] == 2
    assert [x["id"] for x in run(c, "rollout", "list")] == [r["id"]]
    shown = run(c, "rollout", "show", r["id"])
    assert {d["device"] for d in shown["devices"]} == {"sim-00000", "sim-00001", "sim-00002"}
    first, second = sorted((d for d in shown["devices"] if d["wave"] == 2), key=lambda d: d["sent_at"])
    assert second["sent_at"] >= first["acked_at"]  # --max-concurrent-downloads 1: one download at a time
    for args in (["devices"], ["bundle", "list"], ["rollout", "list"], ["rollout", "show", r["id"]],
                 ["rollout", "watch", r["id"], "--interval", "0.1"]):  # human output: rich tables, live view
        human = CliRunner().invoke(cli, ["--url", c.url, "--token", TOKEN, *args], obj={})
        assert human.exit_code == 0 and (r["id"] in human.stdout or "sim-00000" in human.stdout or "tiny@1.0.0" in human.stdout), human.stdout
    rolled = run(c, "rollout", "rollback", r["id"])
    assert rolled["state"] == "rolled_back"
    wait_for(lambda: run(c, "rollout", "show", r["id"])["counts"] == {"rolled_back": 3}, what="rollbacks acknowledged")

    r2 = run(c, "rollout", "create", "--bundle", "tiny@2.0.0", "--selector", "id=edge-b", "--waves", "100%",
             "--device-deadline", "30s")
    assert run(c, "rollout", "abort", r2["id"])["state"] == "aborted"
    run(c, "rollout", "watch", r2["id"], code=8)  # watch ends on a stopped rollout with exit 8
    assert run(c, "bundle", "rm", "tiny@2.0.0")["removed"] == "tiny@2.0.0"
    assert not run(c, "bundle", "show", "tiny@2.0.0")["stored"]  # history keeps the record, the archive is gone
    assert "not found" in run(c, "rollout", "show", "ro000000000000", code=5)["error"]


def test_cli_reports_an_unreachable_controller_in_one_line():
    result = subprocess.run([sys.executable, "-m", "edgeship.cli", "fleet", "--url", "http://127.0.0.1:9", "devices"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "cannot reach the controller at http://127.0.0.1:9" in result.stderr


def test_serve_refuses_to_start_without_a_token(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EDGESHIP_FLEET_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "edgeship.cli", "fleet", "serve"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: no API token")


@pytest.mark.parametrize("url", ["postgresql+nodriver://edge:s3cr3t-pw@127.0.0.1/db",  # no such driver
                                 "postgresql+psycopg://edge:s3cr3t-pw@127.0.0.1:notaport/db",  # unparseable port
                                 "edge:s3cr3t-pw@127.0.0.1/db",  # no scheme at all
                                 "postgresql+psycopg://edge:s3cr3t-pw@127.0.0.1:1/db"])  # nothing listens
def test_serve_never_prints_the_database_password(tmp_path, url):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EDGESHIP_FLEET_DATA_DIR": str(tmp_path),
           "EDGESHIP_FLEET_API_TOKEN": "t", "EDGESHIP_FLEET_DATABASE_URL": url}
    result = subprocess.run([sys.executable, "-m", "edgeship.cli", "fleet", "serve"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1 and "s3cr3t-pw" not in result.stderr + result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "edge:***@" in line, result.stderr


def test_bundle_uploads_past_the_limit_get_a_413_and_leave_nothing_on_disk(broker, topic_prefix, tmp_path, keypair,
                                                                           bundle_dirs):
    small = pack(bundle_dirs["v1"], tmp_path / "v1.tar")
    limit = small.stat().st_size + 4096
    db = make_database("sqlite", tmp_path)
    c = ControllerProcess(broker.url, topic_prefix, db, tmp_path / "data", [keypair[1]],
                          settings={"EDGESHIP_FLEET_MAX_UPLOAD_BYTES": str(limit)}).start()
    try:
        big = tmp_path / "big.tar"
        with tarfile.open(big, "w") as tar:  # a real .tar, so the CLI sends it: the controller refuses it by size
            tar.add(bundle_dirs["v2"], arcname="bundle")
            blob = tmp_path / "weights.bin"
            blob.write_bytes(os.urandom(limit))
            tar.add(blob, arcname="bundle/weights.bin")
        err = run(c, "bundle", "push", str(big), code=1)
        assert err["error"] == (f"bundle upload is larger than the controller's limit of {limit:,} bytes (max_upload_bytes); "
                                "raise it with EDGESHIP_FLEET_MAX_UPLOAD_BYTES or max_upload_bytes in the config file")

        def chunked():  # no Content-Length: refused as the bytes pass the limit
            for _ in range(limit // 65536 + 2):
                yield os.urandom(65536)

        resp = httpx.post(f"{c.url}/v1/bundles", content=chunked(), headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 413 and resp.json()["code"] == "upload_too_large"
        assert list((tmp_path / "data" / "uploads").iterdir()) == []
        assert list((tmp_path / "data" / "bundles").rglob("*.tar")) == []
        assert run(c, "bundle", "push", str(small))["ref"] == "tiny@1.0.0"  # within the limit: accepted
        assert list((tmp_path / "data" / "uploads").iterdir()) == []
    finally:
        assert c.terminate() == 0


def status(c: ControllerProcess) -> dict:
    return httpx.get(f"{c.url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()["engine"]


def test_a_revoked_device_is_ignored_never_selected_and_stays_revoked(controller, bundle_dirs):
    c = controller
    run(c, "bundle", "push", str(bundle_dirs["v1"]))
    assert "not found" in run(c, "device", "revoke", "nope", code=5)["error"]  # unknown to the controller, no CA
    bare = httpx.post(f"{c.url}/v1/devices/nope/revoke", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bare.status_code == 404 and "not found" in bare.json()["error"]  # no body needed
    revoked = run(c, "device", "revoke", "edge-b")
    assert revoked["controller"] is True and revoked["crl"] is None
    shown = run(c, "device", "show", "edge-b")
    assert shown["revoked"] is True and shown["online"] is False and shown["offline_reason"] == "revoked"
    seen = shown["last_seen"]
    # the simulator keeps sending edge-b's heartbeats every 0.3 s: every one is dropped
    wait_for(lambda: status(c)["ignored_revoked"] >= 3, what="edge-b's heartbeats ignored")
    assert run(c, "device", "show", "edge-b")["last_seen"] == seen
    assert [d["id"] for d in run(c, "devices", "--selector", "revoked=true")] == ["edge-b"]
    assert "matches no device" in run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--selector", "id=edge-b",
                                      code=1)["error"]
    r = run(c, "rollout", "create", "--bundle", "tiny@1.0.0", "--waves", "100%")
    assert r["total"] == 3
    assert "edge-b" not in {d["device"] for d in run(c, "rollout", "show", r["id"])["devices"]}
    run(c, "rollout", "abort", r["id"])
    assert c.log_path.read_text().count("ignoring messages from revoked device edge-b") == 1
    # persisted: a restarted controller still refuses it
    assert c.terminate() == 0
    c.start()
    time.sleep(1.0)  # several heartbeats of edge-b reach the new process
    shown = run(c, "device", "show", "edge-b")
    assert shown["revoked"] is True and shown["online"] is False and shown["last_seen"] == seen
    assert status(c)["ignored_revoked"] >= 1
    human = CliRunner().invoke(cli, ["--url", c.url, "--token", TOKEN, "devices"], obj={})
    assert "revoked" in human.stdout
