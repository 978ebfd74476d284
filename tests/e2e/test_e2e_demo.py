"""`python -m edgeship.demo` itself, on a tiny random llama (the real SmolLM2 export is what
`make demo` shows; it takes minutes): the whole story runs, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.models import tiny_model

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _demo(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.Popen([sys.executable, "-m", "edgeship.demo", "--model", str(tiny_model("llama")),
                             "--workdir", str(workdir), "--agents", "3", "--no-encoder", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _left_behind(workdir: Path) -> list[str]:
    """Command lines of live processes that mention the demo's work directory."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd and int(pid) != os.getpid():
            out.append(f"{pid}: {cmd[:200]}")
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Shared by both tests, in order: the second reuses the first's export, as a user's re-run does."""
    return tmp_path_factory.mktemp("demo")


def test_the_demo_tells_the_whole_story(workdir):
    p = _demo(workdir)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    for expected in ("1. export", "2. start", "rollout", "[completed]", "assistant:", "5. version 1.1.0",
                     "[rolled_back]", "golden_mismatch", "tiny-llama@1.1.0", "7. the fleet", "done in"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out[-3000:]}"
    assert not _left_behind(workdir)


def test_ctrl_c_stops_everything_the_demo_started(workdir):
    p = _demo(workdir)
    seen = []
    deadline = time.monotonic() + 300
    for line in p.stdout:  # wait until the broker, the controller and the agents run
        seen.append(line)
        if "agent edge-03" in line or time.monotonic() > deadline:
            break
    assert "reusing" in "".join(seen)
    assert _left_behind(workdir), "the demo started no processes?\n" + "".join(seen)
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGINT, "".join(seen) + rest
    assert "stopping everything" in rest
    assert _left_behind(workdir) == []
