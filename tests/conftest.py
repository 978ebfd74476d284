"""Shared fixtures: a real broker, unique topic prefixes, signing keys, tiny models."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support.broker import Broker, start_broker


def pytest_report_header(config):
    from tests.support.broker import mosquitto_binary

    mq = mosquitto_binary()
    return f"mqtt broker for tests: {mq or 'embedded amqtt (no mosquitto binary found)'}"


@pytest.fixture(scope="session")
def broker() -> Broker:
    """Our own mosquitto on a free loopback port for the whole session."""
    b = start_broker()
    yield b
    b.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    """(private, public) Ed25519 key paths, made once per session."""
    from agent.bundle import generate_keypair

    pair = generate_keypair(tmp_path_factory.mktemp("keys"), "test")
    return pair.private_path, pair.public_path


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory) -> tuple[Path, Path]:
    from agent.bundle import generate_keypair

    pair = generate_keypair(tmp_path_factory.mktemp("keys-other"), "other")
    return pair.private_path, pair.public_path


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny random models of real architectures (llama, qwen2, mistral, phi3, gemma, bert), built once."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.support.models import TINY_CONFIGS, tiny_model

    return {arch: tiny_model(arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def trusted(keypair):
    """The pinned keys that accept bundles signed by `keypair`."""
    from agent.bundle import TrustedKeys

    return TrustedKeys.from_paths([keypair[1]])


@pytest.fixture(scope="module")
def lm(tmp_path_factory, keypair, trusted):
    """A loaded tiny-llama LM bundle (optimum decoder-with-past, sealed), one per test module."""
    from agent.bundle import open_bundle
    from agent.runtime import load_model
    from tests.support.lm_bundle import make_lm_bundle

    d = tmp_path_factory.mktemp("lm")
    make_lm_bundle(d, keypair[0])
    model = load_model(open_bundle(d, trusted))
    yield model
    model.close()


@pytest.fixture(scope="session")
def smollm2_agent(tmp_path_factory):
    """A real agent process (`edgeship serve`) serving the real SmolLM2-135M-Instruct Q4_1 GGUF, exported at
    `--accuracy-level exact` (its answers do not depend on batching or the prefix cache; see
    tests.support.models.smollm2_exact_bundle).

    The first run exports the GGUF into the test cache (minutes on 2 cores); later runs reuse the bundle.
    Yields the API's base URL (…/v1).
    """
    import os
    import signal
    import subprocess
    import sys

    from tests.support.models import cache_dir, smollm2_exact_bundle

    env = {**os.environ, "EDGESHIP_CACHE": str(cache_dir()), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tmp_path_factory.mktemp("smollm2-agent") / "stderr.log"
    bundle, key = smollm2_exact_bundle()
    with open(log, "w") as err:  # a file, not a pipe: nobody reads the log while the tests run
        proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "serve", str(bundle), "--trusted-key", str(key),
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        ready = proc.stdout.readline()
        if not ready.startswith("serving "):
            proc.kill()
            raise RuntimeError(f"edgeship serve did not start: {ready!r} {log.read_text()[-3000:]}")
        yield ready.split(" at ", 1)[1].split(" ", 1)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
