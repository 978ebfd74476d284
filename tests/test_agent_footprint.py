"""An agent with nothing to serve stays small: the real `edgeship agent run` process never imports
onnxruntime, numpy or cryptography while idle, and what replaces them in-process (the child probe
of the execution providers, pinned keys read without cryptography) gives the same answers."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import TrustedKeys, open_bundle
from agent.bundle.signing import KeyError_, ed25519_spki_raw, key_id, load_public_key
from agent.facts import execution_providers, execution_providers_in_child
from agent.protocol import Channel
from tests.support.bundles import make_bundle
from tests.test_agent_link import Watcher
from tests.test_agent_service import ROOT, Agent, state_of

HEAVY = ("onnxruntime", "numpy", "cryptography")
# `edgeship agent run`, plus a note of every module the process held when it exited.
LAUNCHER = textwrap.dedent("""
    import atexit, json, os, sys
    out = os.environ["EDGESHIP_TEST_MODULES_OUT"]
    atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
    sys.argv = ["edgeship", *sys.argv[1:]]
    from edgeship.cli import main
    main()
""")


class RecordingAgent(Agent):
    """The real service through the real CLI entry, writing its sys.modules at exit."""

    def start(self) -> RecordingAgent:
        self.modules_out = self.tmp / "modules.json"
        self.env["EDGESHIP_TEST_MODULES_OUT"] = str(self.modules_out)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "agent", "run", "--config", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        return self

    def modules(self) -> set[str]:
        return set(json.loads(self.modules_out.read_text()))


@pytest.fixture
def agent_slot():
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def test_idle_agent_without_bundle_never_imports_onnxruntime_numpy_or_cryptography(
        tmp_path, broker, topic_prefix, keypair, agent_slot):
    w = Watcher(broker.port, topic_prefix)
    a = RecordingAgent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], config="heartbeat_interval_s = 1\n")
    agent_slot.append(a.start())
    state = state_of(w, type="state")
    assert "active" not in state and "CPUExecutionProvider" in state["facts"]["execution_providers"]
    assert state["facts"]["onnxruntime"]  # the child probe answered for onnxruntime it did not load itself
    w.next(Channel.HEALTH)  # and a heartbeat went out
    assert a.http("GET", "/readyz")[0] == 503 and a.http("GET", "/v1/models")[0] == 200
    a.signal(signal.SIGTERM)
    assert a.wait() == 0, a.output()
    modules = a.modules()
    assert {"agent.service", "agent.link", "agent.api.server", "paho.mqtt.client"} <= modules  # the service really ran
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert loaded == [], f"an idle agent imported {loaded[:5]}"
    assert "agent.api.schemas" not in modules  # request models wait for the first request


def test_execution_providers_from_a_child_process_match_the_in_process_probe(monkeypatch, tmp_path, caplog):
    assert execution_providers_in_child() == execution_providers()
    # No answer from the child (cannot start, fails): None and a warning; the caller probes in-process.
    for broken in (str(tmp_path / "no-python"), "/bin/false"):
        monkeypatch.setattr(sys, "executable", broken)
        assert execution_providers_in_child() is None
    assert sum("cannot probe the execution providers" in r.message for r in caplog.records) == 2


def test_pinned_keys_read_without_cryptography_still_verify(tmp_path, keypair, other_keypair):
    make_bundle(tmp_path / "b", keypair[0], name="tiny", version="1.0.0")
    code = textwrap.dedent(f"""
        import sys
        from agent.bundle import TrustedKeys, open_bundle
        trusted = TrustedKeys.from_paths([{str(keypair[1])!r}, {str(other_keypair[1])!r}])
        print(len(trusted), "cryptography" in sys.modules)
        vb = open_bundle({str(tmp_path / "b")!r}, trusted)
        print(vb.key_id, "cryptography" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["2", "False", key_id(load_public_key(keypair[1])), "True"]
    # The same key ids, and the same verdicts, as keys cryptography parsed itself.
    raw = TrustedKeys.from_paths([keypair[1]])
    parsed = TrustedKeys([load_public_key(keypair[1])])
    assert raw.ids == parsed.ids == [key_id(load_public_key(keypair[1]))]
    assert open_bundle(tmp_path / "b", raw).key_id == open_bundle(tmp_path / "b", parsed).key_id


def test_unusual_or_wrong_key_files_fail_with_one_line(tmp_path, keypair):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = keypair[1].read_bytes()
    crlf = tmp_path / "crlf.pub"
    crlf.write_bytes(pem.replace(b"\n", b"\r\n"))
    assert ed25519_spki_raw(crlf.read_bytes()) is not None
    assert TrustedKeys.from_paths([crlf]).ids == TrustedKeys.from_paths([keypair[1]]).ids

    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    for path, words in [(ec_pub, "is not an Ed25519 public key"), (garbage, "is not a PEM public key"),
                        (tmp_path / "absent.pub", "not found"), (tmp_path, "cannot read public key")]:
        with pytest.raises(KeyError_, match=words):
            TrustedKeys.from_paths([Path(path)])


def test_clean_file_pages_of_the_bundle_are_released_and_come_back_intact(tmp_path):
    """release_clean_file_pages drops resident pages of clean mappings under the directory only: a written
    (dirty) private page and a mapping of another directory stay; dropped pages read back the file's bytes."""
    import mmap

    from agent.runtime.memory import file_mappings, release_clean_file_pages

    bundle, other = tmp_path / "bundle", tmp_path / "other"
    bundle.mkdir()
    other.mkdir()
    size = 64 * mmap.PAGESIZE
    data = bytes(range(256)) * (size // 256)
    for d in (bundle, other):
        for name in ("clean.data", "dirty.data"):
            with open(d / name, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())  # written back: its page-cache pages are clean, as a bundle's are
    opened = {}
    for d in (bundle, other):
        for name, access in (("clean.data", mmap.ACCESS_READ), ("dirty.data", mmap.ACCESS_COPY)):
            f = open(d / name, "rb")
            m = mmap.mmap(f.fileno(), size, access=access)
            assert sum(m[i] for i in range(0, size, mmap.PAGESIZE)) >= 0  # touch every page: resident
            opened[d, name] = (f, m)
    opened[bundle, "dirty.data"][1][5] = 250  # a private copy now differs from the file

    def resident(d: Path) -> dict[int, tuple[int, int]]:
        return {start: (rss, dirty) for start, _, rss, dirty in file_mappings(d)}

    before = resident(bundle)
    assert len(before) == 2 and all(rss >= size // 1024 for rss, _ in before.values())
    released = release_clean_file_pages(bundle)
    assert released == size  # the clean mapping only
    after = resident(bundle)
    assert sorted(rss for rss, _ in after.values()) == [0, size // 1024]
    assert all(rss >= size // 1024 for rss, _ in resident(other).values())  # not ours: untouched
    assert opened[bundle, "clean.data"][1][:] == data  # read back from the file
    dirty = opened[bundle, "dirty.data"][1][:]
    assert dirty[5] == 250 and dirty[:5] == data[:5] and dirty[6:] == data[6:]
    assert release_clean_file_pages(tmp_path / "nothing-mapped") == 0
    for f, m in opened.values():
        m.close()
        f.close()


def test_weights_memory_collapses_to_huge_pages_with_the_same_contents():
    """collapse_to_huge_pages backs an anonymous region with 2 MiB pages where the kernel can (THP not
    "never", MADV_COLLAPSE from Linux 6.1), keeps every byte, and does nothing where it cannot."""
    import platform

    from agent.runtime.memory import anonymous_regions, collapse_to_huge_pages, huge_pages_available

    before = anonymous_regions()
    size = 16 << 20
    pattern = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    # A private anonymous mapping of its own, like onnxruntime's packed weights. (A plain malloc of
    # 16 MiB may land in a region that already existed: glibc raises its mmap threshold after frees.)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(region, dtype=np.uint8)
    buf[:] = pattern
    addr = buf.ctypes.data
    new = anonymous_regions() - before
    assert sum(max(0, min(e, addr + size) - max(s, addr)) for s, e in new) >= size - 4096  # seen as new
    done = collapse_to_huge_pages(new)
    assert np.array_equal(buf, pattern)
    major, minor = (int(p) for p in platform.release().split(".")[:2])
    if huge_pages_available() and (major, minor) >= (6, 1):
        assert done >= size - (4 << 20)  # the 2 MiB-aligned inside
        huge = 0
        with open("/proc/self/smaps") as f:  # madvise splits the mapping: sum what overlaps the buffer
            inside = False
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    inside = start < addr + size and end > addr
                elif inside and line.startswith("AnonHugePages:"):
                    huge += int(line.split()[1]) * 1024
        assert huge >= size - (4 << 20)
    else:
        assert done == 0
    assert collapse_to_huge_pages({(0, 1 << 20)}) == 0  # too small: left alone
    del buf
    region.close()
