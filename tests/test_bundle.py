"""The bundle contract: write -> sign -> archive -> extract -> verify, and every tampering refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from agent.bundle import (
    ArchiveTooLarge,
    ExtraFile,
    HashMismatch,
    Manifest,
    ManifestError,
    MissingFile,
    MissingSignature,
    SizeMismatch,
    TrustedKeys,
    UnknownSchemaVersion,
    UnsafeMember,
    UntrustedKey,
    open_bundle,
    pack,
    unpack,
)
from agent.bundle.manifest import canonical_json, semver_key
from agent.bundle.signing import sign, load_private_key
from tests.support.bundles import make_bundle


@pytest.fixture
def bundle(tmp_path, keypair) -> Path:
    d = tmp_path / "b"
    make_bundle(d, keypair[0], extra_files={"tokenizer.json": b"{}", "sub/config.json": b'{"a": 1}'})
    return d


def test_round_trip_dir_archive_extract_verify(bundle, trusted, tmp_path):
    vb = open_bundle(bundle, trusted)
    assert vb.manifest.ref == "tiny@1.0.0"
    roles = {f.path: f.role.value for f in vb.manifest.files}
    assert roles == {
        "model.onnx": "model",
        "golden/inputs.npz": "golden",
        "golden/outputs.npz": "golden",
        "tokenizer.json": "tokenizer",
        "sub/config.json": "config",
    }
    archive = pack(bundle, tmp_path / "b.tar")
    out = unpack(archive, tmp_path / "x", trusted)
    assert out.manifest == vb.manifest
    assert out.manifest_sha256 == vb.manifest_sha256
    # Deterministic archive: packing twice gives the same bytes.
    assert pack(bundle, tmp_path / "b2.tar").read_bytes() == archive.read_bytes()
    with tarfile.open(archive) as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.sig"]


def test_manifest_is_canonical_and_private_key_never_enters(bundle, keypair):
    raw = (bundle / "manifest.json").read_bytes()
    assert raw == canonical_json(json.loads(raw))
    key_bytes = Path(keypair[0]).read_bytes()
    for p in bundle.rglob("*"):
        if p.is_file():
            assert key_bytes not in p.read_bytes()


def _flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, error",
    [
        (lambda d: _flip_byte(d / "model.onnx"), HashMismatch),
        (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes() + b"x"), SizeMismatch),
        (lambda d: (d / "golden" / "inputs.npz").unlink(), MissingFile),
        (lambda d: (d / "extra.bin").write_bytes(b"surprise"), ExtraFile),
        (lambda d: (d / "manifest.sig").unlink(), MissingSignature),
        (lambda d: _flip_byte(d / "manifest.json", 30), UntrustedKey),
        (lambda d: (d / "manifest.json").unlink(), ManifestError),
    ],
    ids=["byte-flipped", "size", "missing-file", "extra-file", "no-signature", "manifest-edited", "no-manifest"],
)
def test_tampering_rejected_with_specific_error(bundle, trusted, tamper, error):
    tamper(bundle)
    with pytest.raises(error) as exc:
        open_bundle(bundle, trusted)
    assert str(exc.value)  # one readable line, never a bare traceback
    assert "\n" not in str(exc.value)


def test_symlinked_bundle_file_rejected(bundle, trusted):
    target = bundle / "model.onnx"
    real = bundle.parent / "model-real.onnx"
    shutil.move(target, real)
    os.symlink(real, target)
    with pytest.raises(MissingFile, match="not a regular file"):
        open_bundle(bundle, trusted)


def test_signed_by_unknown_key(tmp_path, keypair, other_keypair, trusted):
    d = tmp_path / "o"
    make_bundle(d, other_keypair[0])
    with pytest.raises(UntrustedKey, match="not among the trusted keys"):
        open_bundle(d, trusted)
    # ...but accepted once that key is pinned too.
    both = TrustedKeys.from_paths([keypair[1], other_keypair[1]])
    assert open_bundle(d, both).manifest.name == "tiny"


def test_resigned_with_a_different_manifest_is_detected(bundle, trusted, other_keypair):
    """An attacker who edits the manifest and re-signs with their own key is not trusted."""
    m = json.loads((bundle / "manifest.json").read_bytes())
    m["version"] = "9.9.9"
    raw = canonical_json(m)
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(sign(raw, load_private_key(other_keypair[0])))
    with pytest.raises(UntrustedKey):
        open_bundle(bundle, trusted)


def test_unknown_schema_version(bundle, trusted, keypair):
    m = json.loads((bundle / "manifest.json").read_bytes())
    m["schema_version"] = 99
    raw = canonical_json(m)
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(sign(raw, load_private_key(keypair[0])))
    with pytest.raises(UnknownSchemaVersion, match="upgrade edgeship"):
        open_bundle(bundle, trusted)


@pytest.mark.parametrize(
    "field, value",
    [("name", "Bad Name"), ("version", "1.0"), ("files", [{"path": "../x", "sha256": "0" * 64, "size": 1}])],
)
def test_invalid_manifest_fields_signed_by_trusted_key(bundle, trusted, keypair, field, value):
    m = json.loads((bundle / "manifest.json").read_bytes())
    m[field] = value
    raw = canonical_json(m)
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(sign(raw, load_private_key(keypair[0])))
    with pytest.raises(ManifestError, match=field):
        open_bundle(bundle, trusted)


def _tar_with(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.parametrize(
    "member, match",
    [
        (_file("/etc/passwd"), "relative"),
        (_file("../escape"), "relative"),
        (_file("a/../../escape"), "relative"),
        (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_special("hard", tarfile.LNKTYPE, "manifest.json"), "link"),
        (_special("dev", tarfile.CHRTYPE), "device"),
        (_special("blk", tarfile.BLKTYPE), "device"),
        (_special("fifo", tarfile.FIFOTYPE), "device or fifo"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_unsafe_archive_members_rejected(tmp_path, trusted, member, match):
    archive = _tar_with(tmp_path, [_file("manifest.json", b"{}"), member])
    with pytest.raises(UnsafeMember, match=match):
        unpack(archive, tmp_path / "out", trusted)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir()), "temp dir left behind"


def test_archive_over_size_limit(bundle, trusted, tmp_path):
    archive = pack(bundle, tmp_path / "b.tar")
    with pytest.raises(ArchiveTooLarge):
        unpack(archive, tmp_path / "out", trusted, max_bytes=100)
    assert not (tmp_path / "out").exists()


def test_tampered_archive_leaves_nothing(bundle, trusted, tmp_path):
    _flip_byte(bundle / "model.onnx")
    # pack() does not verify: an attacker can make such an archive; unpack must refuse it.
    archive = pack(bundle, tmp_path / "b.tar")
    with pytest.raises(HashMismatch):
        unpack(archive, tmp_path / "out", trusted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar"]


def test_garbage_archive(tmp_path, trusted):
    p = tmp_path / "junk.tar"
    p.write_bytes(os.urandom(3000))
    with pytest.raises(Exception) as exc:
        unpack(p, tmp_path / "out", trusted)
    assert exc.type.__name__ in ("ArchiveError", "ManifestError", "UnsafeMember")


def test_semver_ordering():
    versions = ["1.0.0", "1.0.0-rc.1", "0.9.10", "1.0.0-alpha", "0.9.9", "1.10.0", "1.2.0"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "0.9.10", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]


def test_manifest_from_bytes_never_raises_other_errors():
    for raw in [b"", b"\xff", b"[]", b'{"schema_version": 1}', b'{"schema_version": "1"}', b"1e999999"]:
        with pytest.raises(ManifestError):
            Manifest.from_bytes(raw)


def test_keys_generate_permissions(tmp_path):
    from click.testing import CliRunner

    from agent.keys_cli import cli

    r = CliRunner().invoke(cli, ["generate", "--out", str(tmp_path / "k"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert os.stat(info["private_key"]).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o700
    again = CliRunner().invoke(cli, ["generate", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "--overwrite" in again.output


# ---- members the signed manifest does not list are refused before a byte of them is written --------

_UNPACK_UNDER_LIMIT = """
import resource, sys
from agent.bundle import BundleError, TrustedKeys, unpack
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))  # SIGXFSZ: Python ignores it
try:
    unpack(sys.argv[1], sys.argv[2], TrustedKeys.from_paths([sys.argv[3]]))
    print("ok")
except BundleError as exc:
    print(type(exc).__name__, exc.code)
except OSError as exc:
    print("OSError", exc.errno)
"""


def _unpack_with_file_size_limit(archive: Path, dest: Path, public_key: Path, limit: int) -> str:
    """Unpack in a child whose kernel file-size limit is `limit`: writing more fails with EFBIG."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _UNPACK_UNDER_LIMIT, str(archive), str(dest), str(public_key),
                          str(limit)], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def _repack(bundle: Path, archive: Path, *, add: dict[str, bytes] | None = None,
            replace: dict[str, bytes] | None = None, first: bool = False) -> Path:
    """pack(), then rewrite the tar with members added (before the others if `first`) or replaced."""
    src = pack(bundle, archive.with_name("src.tar"))
    added = [_file(name, data) for name, data in (add or {}).items()]
    with tarfile.open(src) as tin, tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tout:
        if first:
            for info, data in added:
                tout.addfile(info, io.BytesIO(data))
        for m in tin.getmembers():
            data = (replace or {}).get(m.name)
            if data is None:
                data = tin.extractfile(m).read()
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
        if not first:
            for info, data in added:
                tout.addfile(info, io.BytesIO(data))
    return archive


@pytest.mark.parametrize("first", [True, False], ids=["junk-first", "junk-last"])
def test_an_unlisted_member_is_refused_before_its_bytes_are_written(bundle, keypair, tmp_path, first):
    archive = _repack(bundle, tmp_path / "junk.tar", add={"junk.bin": os.urandom(8 * 1024 * 1024)}, first=first)
    # 2 MiB per file: writing any of the 8 MiB of junk would fail with EFBIG, not ExtraFile
    got = _unpack_with_file_size_limit(archive, tmp_path / "out", keypair[1], 2 * 1024 * 1024)
    assert got == "ExtraFile file_extra"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "junk.tar", "src.tar"]  # nothing left behind


def test_a_member_larger_than_its_listed_size_is_refused_before_it_is_written(bundle, keypair, tmp_path):
    archive = _repack(bundle, tmp_path / "big.tar", replace={"model.onnx": os.urandom(8 * 1024 * 1024)})
    got = _unpack_with_file_size_limit(archive, tmp_path / "out", keypair[1], 2 * 1024 * 1024)
    assert got == "SizeMismatch file_size_mismatch"
    assert not (tmp_path / "out").exists()


def test_the_manifest_is_found_wherever_it_sits_in_the_archive(bundle, trusted, tmp_path):
    src = pack(bundle, tmp_path / "src.tar")
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "last.tar", "w") as tout:
        members = tin.getmembers()
        for m in members[2:] + members[:2]:  # manifest.json and manifest.sig after the model
            tout.addfile(m, tin.extractfile(m))
    vb = unpack(tmp_path / "last.tar", tmp_path / "out", trusted)
    assert vb.manifest_sha256 == open_bundle(bundle, trusted).manifest_sha256


def test_an_archive_never_outgrows_its_manifests_ceiling(tmp_path, keypair):
    from agent.bundle import pack
    from agent.bundle.archive import archive_ceiling

    deep = "d/" * 40 + "x" * 120  # a name past tar's 100 bytes: a PAX header of its own
    manifest = make_bundle(tmp_path / "b", keypair[0], extra_files={deep: b"1" * 1000, "e/f.bin": b"", "g": b"2" * 513})
    tar = pack(tmp_path / "b", tmp_path / "b.tar")
    head = (tmp_path / "b" / "manifest.json").stat().st_size + (tmp_path / "b" / "manifest.sig").stat().st_size
    assert tar.stat().st_size <= archive_ceiling(manifest, head_bytes=head + 1024)
