"""The `edgeship` command: groups, --help, --version, and the one-line missing-extra error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edgeship import __version__


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = run("--help")
    assert r.returncode == 0
    for group in ("export", "agent", "fleet", "keys"):
        assert group in r.stdout


@pytest.mark.parametrize("group", ["agent", "keys"])
def test_group_help(group):
    r = run(group, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_missing_extra_is_one_line(tmp_path):
    # Hide sqlalchemy as if the fleet extra were not installed: a meta-path finder that refuses it.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "sqlalchemy" or name.startswith("sqlalchemy."):
                    raise ModuleNotFoundError(name)
                return None
        sys.meta_path.insert(0, _Hide())
    """))
    r = run("fleet", "devices", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'edgeship[fleet]'" in lines[0] and "sqlalchemy" in lines[0]
