"""A device without a fleet, with real processes: `edgeship serve`, `edgeship agent install` into a
stopped and a running agent, `edgeship agent status`, the refusals, and SIGKILL during a local install."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import openai
import pytest

from agent.bundle import TrustedKeys, open_bundle, pack
from agent.protocol import Channel
from tests.support.broker import free_port
from tests.support.bundles import make_bundle
from tests.support.lm_bundle import make_gqa_lm_bundle
from tests.test_agent_link import Watcher
from tests.test_agent_service import ROOT, Agent, state_of

# Watch briefly and judge errors only: these tests time the switch, not the model.
FAST_WATCH = "[watch]\nwindow_s = 0.5\nmax_p95_ratio = 1000.0\n"


def edgeship(*args: str, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def served_version(agent: Agent) -> str:
    status, models = agent.http("GET", "/v1/models")
    assert status == 200, models
    return models["data"][0]["version"]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and not any("Traceback" in ln for ln in proc.stderr.splitlines()), proc.stderr
    return lines[0]


@pytest.fixture
def tiny(tmp_path, keypair) -> dict[str, Path]:
    """tiny@1.0.0 and tiny@1.1.0 directories, and 1.1.0 as a .tar."""
    make_bundle(tmp_path / "v1", keypair[0], version="1.0.0")
    make_bundle(tmp_path / "v2", keypair[0], version="1.1.0", seed=3)
    return {"v1": tmp_path / "v1", "v2": tmp_path / "v2", "v2.tar": pack(tmp_path / "v2", tmp_path / "v2.tar")}


# ---- edgeship serve ---------------------------------------------------------------------------


def test_serve_a_bundle_archive_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path, keypair):
    make_gqa_lm_bundle(tmp_path / "lm", keypair[0], shared_kv=True)
    archive = pack(tmp_path / "lm", tmp_path / "lm.tar")
    port = free_port()
    (tmp_path / "token").write_text("s3cret-token\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "serve", str(archive), "--port", str(port),
                             "--token-file", str(tmp_path / "token")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith(f"serving tiny-gqa@1.0.0 at http://127.0.0.1:{port}/v1") and "curl " in ready, ready
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-token", max_retries=0,
                               timeout=30)
        out = client.chat.completions.create(model="tiny-gqa", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "the signature was not checked" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_checks_the_signature_with_a_key_and_every_hash_without(tmp_path, keypair, other_keypair, tiny):
    with_other_key = edgeship("serve", tiny["v1"], "--port", free_port(), "--trusted-key", other_keypair[1])
    assert with_other_key.returncode == 1 and "untrusted" in one_error_line(with_other_key).lower()
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny["v1"], tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    no_key = edgeship("serve", tampered, "--port", free_port())
    assert no_key.returncode == 1 and "hash_mismatch" in one_error_line(no_key)
    (tmp_path / "notes.txt").write_text("not a model")
    junk = edgeship("serve", tmp_path / "notes.txt", "--port", free_port())
    assert junk.returncode == 1 and "pass a bundle directory" in one_error_line(junk)
    (tmp_path / "spaced").write_text("two words")
    bad_token = edgeship("serve", tiny["v1"], "--port", free_port(), "--token-file", tmp_path / "spaced")
    assert bad_token.returncode == 2 and "one token without spaces" in one_error_line(bad_token)


# ---- edgeship agent install / status ------------------------------------------------------------


def test_install_into_a_stopped_agent_then_run_without_a_broker_serves_it(tmp_path, topic_prefix, keypair, tiny):
    agent = Agent(tmp_path, free_port(), topic_prefix, public_key=keypair[1])  # nothing listens on that port
    first = edgeship("agent", "install", tiny["v1"], "--config", agent.config)
    assert first.returncode == 0 and "installed tiny@1.0.0 (committed)" in first.stdout, first.stderr
    second = edgeship("agent", "install", tiny["v2.tar"], "--config", agent.config)
    assert second.returncode == 0, second.stderr
    again = edgeship("agent", "install", tiny["v2"], "--config", agent.config)
    assert again.returncode == 0 and "tiny@1.1.0 is already the active bundle" in again.stdout, again.stderr
    status = json.loads(edgeship("agent", "status", "--json", "--config", agent.config).stdout)
    assert status["active"]["version"] == "1.1.0" and status["previous"]["version"] == "1.0.0"
    assert status["update"]["source"] == "local" and status["update"]["state"] == "committed"
    assert not status["agent_running"]
    assert not any((agent.state_dir / "incoming").iterdir())  # the received copy is gone once installed

    started = time.monotonic()
    agent.start()
    try:
        while time.monotonic() - started < 20:
            try:
                if agent.http("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert time.monotonic() - started < 20, agent.output()
        assert served_version(agent) == "1.1.0"
        time.sleep(4)  # reconnect_min_s 0.5 .. max 2.0: several attempts
        log = agent.output()
        assert log.count("unreachable") == 1, log  # one line per change of connection state
        human = edgeship("agent", "status", "--config", agent.config)
        assert "agent:    running" in human.stdout and "tiny@1.1.0" in human.stdout
        assert "deploy tiny@1.1.0 from local: committed" in human.stdout, human.stdout
    finally:
        agent.stop()


def test_install_into_the_running_agent_switches_while_a_client_streams(tmp_path, broker, topic_prefix, keypair):
    for version in ("1.0.0", "1.1.0"):
        make_gqa_lm_bundle(tmp_path / version, keypair[0], shared_kv=True, version=version)
    agent = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], config=FAST_WATCH)
    agent.install(tmp_path / "1.0.0", keypair[1])
    w = Watcher(broker.port, topic_prefix)
    agent.start()
    stop, results = threading.Event(), []

    def stream() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{agent.api_port}/v1", api_key="x", max_retries=0, timeout=30)
        while not stop.is_set():
            try:
                parts = client.chat.completions.create(model="tiny-gqa", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=8, temperature=0, stream=True)
                results.append(sum(1 for _ in parts) > 0)
            except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                results.append(exc)

    try:
        state_of(w, timeout=60, type="state")
        client_thread = threading.Thread(target=stream, daemon=True)
        client_thread.start()
        while len(results) < 3:
            time.sleep(0.1)
        done = edgeship("agent", "install", tmp_path / "1.1.0", "--config", agent.config)
        assert done.returncode == 0 and "installed tiny-gqa@1.1.0" in done.stdout, done.stderr
        assert served_version(agent) == "1.1.0"
        before = len(results)
        while len(results) < before + 3:
            time.sleep(0.1)
        stop.set()
        client_thread.join(30)
        failures = [r for r in results if r is not True]
        assert not failures and len(results) >= 6, failures
        # The controller hears about it as about any update, and sees where the bundle came from.
        body = state_of(w, timeout=30, type="state")
        while not (body.get("update") and body["update"]["state"] == "committed"):
            body = state_of(w, timeout=30, type="state")
        assert body["update"]["rollout_id"] == "local" and body["active"]["version"] == "1.1.0"
    finally:
        stop.set()
        w.close()
        agent.stop()


def refusal_cases(tmp_path: Path, keypair, other_keypair, tiny) -> list[tuple[str, list, str]]:
    tampered = tmp_path / "tampered"
    make_bundle(tampered, keypair[0], version="1.2.0", seed=5)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    make_bundle(tmp_path / "foreign-key", other_keypair[0], version="1.2.0", seed=6)
    make_bundle(tmp_path / "unsigned", keypair[0], version="1.2.0", seed=9)
    with tarfile.open(tmp_path / "unsigned.tar", "w") as tar:  # `pack` refuses to leave out the signature
        for rel in ("manifest.json", "model.onnx", "golden/inputs.npz", "golden/outputs.npz"):
            tar.add(tmp_path / "unsigned" / rel, arcname=rel)
    make_bundle(tmp_path / "riscv", keypair[0], version="1.2.0", seed=7, arch=["riscv64"])
    make_bundle(tmp_path / "bad-golden", keypair[0], version="1.2.0", seed=8, golden_scale=2.0)
    (tmp_path / "notes.txt").write_text("not a bundle")
    return [
        ("downgrade", [tiny["v1"]], "error: downgrade_refused: tiny@1.0.0 is older"),
        ("hash mismatch", [pack(tampered, tmp_path / "tampered.tar")], "error: file_hash_mismatch:"),
        ("bad signature", [tmp_path / "foreign-key"], "error: signature_untrusted:"),
        ("unsigned", [tmp_path / "unsigned.tar"], "error: signature_missing:"),
        ("another CPU", [tmp_path / "riscv"], "error: arch_mismatch:"),
        ("smoke test failed", [tmp_path / "bad-golden"], "error: golden_mismatch:"),
        ("not a bundle", [tmp_path / "notes.txt"], "is not a bundle archive"),
        ("not a bundle dir", [tmp_path], "is a directory without manifest.json"),
    ]


def test_every_refusal_is_one_line_a_nonzero_exit_and_the_agent_keeps_serving(tmp_path, broker, topic_prefix,
                                                                              keypair, other_keypair, tiny):
    (tmp_path / "dev").mkdir()
    long_watch = "[watch]\nwindow_s = 60.0\nmax_p95_ratio = 1000.0\n"  # the downgrade below is still watched at the end
    agent = Agent(tmp_path / "dev", broker.port, topic_prefix, public_key=keypair[1], config=long_watch)
    agent.install(tiny["v2"], keypair[1])
    agent.start()
    try:
        while True:
            try:
                if agent.http("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        for what, args, expected in refusal_cases(tmp_path, keypair, other_keypair, tiny):
            proc = edgeship("agent", "install", *args, "--config", agent.config)
            assert proc.returncode == 1, (what, proc.stdout, proc.stderr)
            assert one_error_line(proc).startswith(expected) or expected in one_error_line(proc), (what, proc.stderr)
            assert served_version(agent) == "1.1.0", what
        assert not any((agent.state_dir / "incoming").iterdir())
        # --allow-downgrade overrides the downgrade check, explicitly.
        allowed = edgeship("agent", "install", tiny["v1"], "--allow-downgrade", "--config", agent.config)
        assert allowed.returncode == 0, allowed.stderr
        assert served_version(agent) == "1.0.0"
        # A second install while the first is being watched: busy, exit 4.
        busy = edgeship("agent", "install", tiny["v2"], "--config", agent.config)
        assert busy.returncode == 4 and one_error_line(busy).startswith("error: busy:"), busy.stderr
        assert served_version(agent) == "1.0.0"
    finally:
        agent.stop()


def test_a_second_process_cannot_take_the_state_dir(tmp_path, topic_prefix, keypair, tiny):
    agent = Agent(tmp_path, free_port(), topic_prefix, public_key=keypair[1])
    from agent.control import StateDirLock

    lock = StateDirLock(agent.state_dir)
    assert lock.acquire()  # as an install in progress holds it
    try:
        second = edgeship("agent", "install", tiny["v1"], "--config", agent.config)
        assert second.returncode == 4 and "state_dir_locked" in one_error_line(second)
        run = edgeship("agent", "run", "--config", agent.config, timeout=60)
        assert run.returncode == 1 and "in use by another edgeship process" in one_error_line(run)
    finally:
        lock.release()
    assert not (agent.state_dir / "pointer.json").exists()


def test_a_bundle_of_another_name_installs_only_with_replaces(tmp_path, topic_prefix, keypair, tiny):
    agent = Agent(tmp_path, free_port(), topic_prefix, public_key=keypair[1])
    assert edgeship("agent", "install", tiny["v1"], "--config", agent.config).returncode == 0
    make_bundle(tmp_path / "other", keypair[0], name="other", version="0.1.0", seed=4)
    refused = edgeship("agent", "install", tmp_path / "other", "--config", agent.config)
    assert refused.returncode == 1
    assert one_error_line(refused).startswith("error: name_change_refused:") and "--replaces tiny" in refused.stderr
    status = json.loads(edgeship("agent", "status", "--json", "--config", agent.config).stdout)
    assert status["active"]["name"] == "tiny" and status["active"]["version"] == "1.0.0"
    taken = edgeship("agent", "install", tmp_path / "other", "--replaces", "tiny", "--config", agent.config)
    assert taken.returncode == 0, taken.stderr
    status = json.loads(edgeship("agent", "status", "--json", "--config", agent.config).stdout)
    assert status["active"]["name"] == "other" and status["previous"]["name"] == "tiny"


def test_the_controller_shows_a_bundle_installed_locally_once_the_broker_is_there(tmp_path, broker, topic_prefix,
                                                                                  keypair, tiny):
    from tests.support.fleet import ControllerProcess, make_database
    from tests.test_fleet_api_cli import run

    agent = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1])
    assert edgeship("agent", "install", tiny["v1"], "--config", agent.config).returncode == 0  # no controller, no agent
    controller = ControllerProcess(broker.url, topic_prefix, make_database("sqlite", tmp_path), tmp_path / "fleet",
                                   [keypair[1]]).start()
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = run(controller, "devices")
            shown = shown if isinstance(shown, list) else [shown]
            if shown and shown[0].get("active"):
                break
            time.sleep(0.3)
        device = run(controller, "device", "show", agent.device_id)
        assert device["active"]["version"] == "1.0.0" and device["source"] == "local", device
    finally:
        agent.stop()
        controller.terminate()


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs: room for a tiny bundle and the 16 MiB margin, not for a 3 MB one (3x its size + margin)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs for the full-disk case (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_is_refused_in_one_line_and_the_active_bundle_stays(tmp_path, topic_prefix, keypair, tiny, small_disk):
    agent = Agent(tmp_path, free_port(), topic_prefix, public_key=keypair[1])
    agent.state_dir = small_disk / "state"
    agent.config.write_text(agent.config.read_text().replace(str(tmp_path / "state"), str(agent.state_dir)))
    assert edgeship("agent", "install", tiny["v1"], "--config", agent.config).returncode == 0
    make_bundle(tmp_path / "big", keypair[0], version="1.2.0", extra_files={"pad.bin": os.urandom(3_000_000)})
    full = edgeship("agent", "install", tmp_path / "big", "--config", agent.config)
    assert full.returncode == 1 and one_error_line(full).startswith("error: insufficient_disk:"), full.stderr
    status = json.loads(edgeship("agent", "status", "--json", "--config", agent.config).stdout)
    assert status["active"]["version"] == "1.0.0"
    open_bundle(agent.state_dir / "bundles" / status["active"]["manifest_sha256"], TrustedKeys.from_paths([keypair[1]]))


@pytest.mark.parametrize("crash_at,final,serves", [
    ("download:50%", "committed", "1.1.0"),
    ("switch:after_rename", "rolled_back", "1.0.0"),
])
def test_sigkill_during_a_local_install_ends_with_a_valid_bundle_served(tmp_path, topic_prefix, keypair, tiny,
                                                                       crash_at, final, serves):
    make_bundle(tmp_path / "big", keypair[0], version="1.1.0", seed=3, extra_files={"pad.bin": os.urandom(3_000_000)})
    agent = Agent(tmp_path, free_port(), topic_prefix, public_key=keypair[1], config=FAST_WATCH,
                  env={"EDGESHIP_CRASH_AT": crash_at})
    agent.install(tiny["v1"], keypair[1])
    agent.start()
    try:
        while not (agent.state_dir / "control.sock").exists():
            assert agent.proc.poll() is None, agent.output()
            time.sleep(0.1)
        cut = edgeship("agent", "install", tmp_path / "big", "--config", agent.config)
        assert cut.returncode == 1 and "closed the control socket" in one_error_line(cut), cut.stderr
        assert agent.wait(60) == -signal.SIGKILL, agent.output()[-2000:]

        agent.env.pop("EDGESHIP_CRASH_AT")
        agent.start()
        deadline = time.monotonic() + 90
        while True:
            status = json.loads(edgeship("agent", "status", "--json", "--config", agent.config).stdout)
            if status["update"]["state"] in ("committed", "failed", "rolled_back") and status["agent_running"]:
                break
            assert time.monotonic() < deadline, (status, agent.output()[-2000:])
            time.sleep(0.5)
        assert status["update"]["state"] == final, status
        assert served_version(agent) == serves
    finally:
        agent.stop()
    active = status["active"]["manifest_sha256"]
    open_bundle(agent.state_dir / "bundles" / active, TrustedKeys.from_paths([keypair[1]]))


# ---- the pure pieces --------------------------------------------------------------------------


def test_file_urls_come_only_from_the_device_never_off_the_wire(tmp_path, tiny):
    from agent.protocol import ProtocolError, parse_command
    from agent.update.local import LOCAL_ROLLOUT, local_deploy

    cmd = local_deploy(tiny["v2.tar"], device_id="dev-1")
    assert cmd.urls == [tiny["v2.tar"].resolve().as_uri()] and cmd.rollout_id == LOCAL_ROLLOUT
    assert cmd.bundle.ref == "tiny@1.1.0" and cmd.size == tiny["v2.tar"].stat().st_size and cmd.deadline is not None
    with pytest.raises(ProtocolError):
        parse_command(cmd.model_dump_json())  # the same command from the broker is refused


def test_allow_downgrade_is_explicit():
    from datetime import datetime, timedelta, timezone

    from agent.protocol import BundleRef, DeployCommand, UpdateState
    from agent.update.decide import Installed, check_deploy

    now = Installed(state=UpdateState.IDLE, active_sha="a" * 64, active_version="1.1.0", active_name="tiny")
    at = datetime.now(timezone.utc)
    cmd = DeployCommand(id="d", device_id="dev-1", rollout_id="local", urls=["http://127.0.0.1/x.tar"],
                        bundle=BundleRef(name="tiny", version="1.0.0", manifest_sha256="b" * 64),
                        deadline=at + timedelta(hours=1))
    assert check_deploy(cmd, now, at=at, margin=0).code == "downgrade_refused"
    assert check_deploy(cmd, now, at=at, margin=0, allow_downgrade=True).ok


@pytest.mark.parametrize("arch,flags,profile", [
    ("aarch64", set(), "cpu-arm64"),
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "cpu-x86-avx512-vnni"),
    ("x86_64", {"avx2", "fma"}, "cpu-x86-avx2"),
])
def test_serve_exports_with_the_default_profile_for_this_cpu(arch, flags, profile):
    from agent.serve import profile_for

    assert profile_for(arch, frozenset(flags)) == profile


def test_serve_a_gguf_exports_it_once_into_the_cache_and_serves_it(tmp_path):
    from tests.test_gguf_export import write_tiny_gguf

    gguf_path, _ = write_tiny_gguf("llama", tmp_path)
    env = {**os.environ, "EDGESHIP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for run in ("export", "cached"):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "serve", str(gguf_path), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            ready = proc.stdout.readline()
            assert ready.startswith("serving ") and f"127.0.0.1:{port}" in ready, (ready, proc.stderr.read()[-3000:])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
            out = client.completions.create(model=client.models.list().data[0].id, prompt="Edge", max_tokens=3,
                                            temperature=0)
            assert out.usage.completion_tokens >= 1
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            err = proc.stderr.read()
            assert ("exporting" in err) == (run == "export"), err[-2000:]
            assert "the signature was not checked" not in err  # checked against the cache's own key
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len([p for p in (tmp_path / "cache" / "serve").iterdir() if p.name not in ("key", ".lock", "digests.json")]) == 1


def test_serve_cache_knows_a_replaced_file_and_waits_for_another_serves_export(tmp_path, monkeypatch):
    """The cache entry is keyed by the file's contents (a copy elsewhere is found, a new file at the same
    path is exported again), and two `serve`s of one model take turns on the cache's lock."""
    import fcntl

    from agent import serve

    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    first, keys = serve._cache_entry(str(model), "cpu-x86-avx2")
    assert serve._cache_entry(str(model), "cpu-x86-avx2") == (first, keys)
    assert serve._cache_entry(str(model), "cpu-arm64")[0] != first
    shutil.copy(model, tmp_path / "elsewhere.gguf")
    assert serve._cache_entry(str(tmp_path / "elsewhere.gguf"), "cpu-x86-avx2")[0] == first
    model.write_bytes(b"GGUF" + bytes(61))
    assert serve._cache_entry(str(model), "cpu-x86-avx2")[0] != first
    model.write_bytes(b"GGUF" + bytes(60))

    first.parent.mkdir(parents=True, exist_ok=True)
    with open(first.parent / ".lock", "a") as held:  # another serve is exporting
        fcntl.flock(held, fcntl.LOCK_EX)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (_try_serve_cache(serve, str(model)), done.set()), daemon=True)
        worker.start()
        assert not done.wait(1.0)  # waits; never exports beside it
    assert done.wait(60)


def _try_serve_cache(serve, source: str) -> None:
    try:
        serve.export_cached(source)
    except serve.ServeError:
        pass  # 60 zero bytes are no model: refused in one line once the lock is ours
