"""A device install: `pip install -e '.[agent]'` into a fresh venv (no system site-packages) gives a
working `edgeship agent`, without torch or transformers anywhere, and an agent that really serves.

Slow (one pip install, ~1 min on 2 busy cores; pip's wheel cache keeps repeat runs quicker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_agent_service import Agent, NotifySocket

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                          "-e", f"{ROOT}[agent]"], capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return venv


def run(venv: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=clean, cwd="/")


def test_agent_help_works(device_venv):
    proc = run(device_venv, str(device_venv / "bin" / "edgeship"), "agent", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "install-service", "verify"):
        assert command in proc.stdout
    assert run(device_venv, str(device_venv / "bin" / "edgeship"), "--version").returncode == 0


def test_no_torch_or_transformers_installed_or_imported(device_venv):
    python = str(device_venv / "bin" / "python")
    code = (
        "import importlib.util, sys\n"
        "import agent, agent.bundle, agent.protocol, agent.runtime, agent.api, agent.update.manager\n"
        "import agent.config, agent.link, agent.facts, agent.systemd, agent.service, agent.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('transformers') is None\n"
        "print(sys.prefix)\n"
    )
    proc = run(device_venv, python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(device_venv)  # the fresh venv, not the dev one
    listed = run(device_venv, python, "-m", "pip", "list", "--format=json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "transformers", "optimum", "optimum-onnx", "accelerate"}, names
    assert {"onnxruntime", "paho-mqtt", "pydantic-settings", "tokenizers"} <= names


def test_export_without_its_extra_says_what_to_install(device_venv):
    proc = run(device_venv, str(device_venv / "bin" / "edgeship"), "export", "--help")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgeship[export]'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_agent_from_the_device_install_serves(device_venv, tmp_path, broker, topic_prefix, keypair):
    """Not only importable: the agent extra alone loads a bundle, says READY and answers."""
    from tests.support.bundles import make_bundle

    make_bundle(tmp_path / "b", keypair[0])
    notify = NotifySocket()
    a = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], env={"NOTIFY_SOCKET": notify.env})
    a.install(tmp_path / "b", keypair[1])
    a.env.pop("PYTHONPATH", None)
    out = open(a.log, "w")
    a.proc = subprocess.Popen([str(device_venv / "bin" / "edgeship"), "agent", "run", "--config", str(a.config)],
                              stdout=out, stderr=subprocess.STDOUT, env=a.env, cwd="/")
    try:
        notify.wait_for("READY=1")
        status, body = a.http("POST", "/v1/embeddings", {"model": "tiny", "input": [[0.5] * 8]})
        assert status == 200, body
        a.signal(signal.SIGTERM)
        assert a.wait() == 0, a.output()
    finally:
        a.stop()
        out.close()
        notify.close()
