"""The single-file form of a bundle: an uncompressed POSIX tar (model weights do not compress).

Unpacking trusts nothing: every member must be a regular file or directory with a safe relative
path; links, devices, fifos, absolute paths, '..', duplicates and oversize archives are refused
before anything is written. The signed manifest is then read and verified, and any member it does
not list, or whose size is not the listed one, is refused before its bytes are written; each file
is hashed as it is written, and the result is checked like any bundle directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from agent.bundle.durable import fsync_dir, fsync_tree
from agent.bundle.errors import (
    ArchiveError,
    ArchiveTooLarge,
    ExtraFile,
    HashMismatch,
    ManifestError,
    SizeMismatch,
    UnsafeMember,
)
from agent.bundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, Manifest, check_relative_path
from agent.bundle.signing import MAX_SIGNATURE_BYTES, TrustedKeys, require_signature
from agent.bundle.store import VerifiedBundle, open_bundle

DEFAULT_MAX_BYTES = 16 * 1024**3  # 16 GiB: well above a 7B int4 model


def archive_ceiling(manifest: Manifest, *, head_bytes: int = 0) -> int:
    """The most bytes `pack` can write for this manifest: each file padded to 512 with its header,
    room for a long-name (PAX) header and a directory entry per file, the head, the end blocks and
    the last record's padding. A download without a size stops past it."""
    per_file = sum(-(-e.size // 512) * 512 + 4 * 512 for e in manifest.files)
    return per_file + -(-head_bytes // 512) * 512 + 8 * 512 + tarfile.RECORDSIZE
DEFAULT_MAX_MEMBERS = 10_000
SUFFIX = ".tar"


def pack(directory: Path, archive: Path) -> Path:
    """Write `directory` (a sealed bundle) as a tar, manifest first, deterministic order."""
    directory, archive = Path(directory), Path(archive)
    names = [MANIFEST_NAME, SIGNATURE_NAME]
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel not in names:
                names.append(rel)
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in names:
            info = tar.gettarinfo(str(directory / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(directory / rel, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, archive)
    return archive


def check_members(
    members: list[tarfile.TarInfo], *, max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS
) -> None:
    """Refuse any archive member that could write outside the target or is not plain data."""
    if len(members) > max_members:
        raise ArchiveTooLarge(f"archive has {len(members)} members, over the limit of {max_members}")
    total, seen = 0, set()
    for m in members:
        name = m.name[:-1] if m.name.endswith("/") and m.isdir() else m.name
        try:
            check_relative_path(name)
        except ValueError as exc:
            raise UnsafeMember(f"archive member {m.name!r}: {exc}") from None
        if m.issym() or m.islnk():
            raise UnsafeMember(f"archive member {m.name!r} is a link; bundles hold only regular files")
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeMember(f"archive member {m.name!r} is a device or fifo; bundles hold only regular files")
        if not (m.isfile() or m.isdir()):
            raise UnsafeMember(f"archive member {m.name!r} has an unsupported type")
        if name in seen:
            raise UnsafeMember(f"archive member {m.name!r} appears twice")
        seen.add(name)
        total += max(m.size, 0)
        if total > max_bytes:
            raise ArchiveTooLarge(f"archive unpacks to more than {max_bytes} bytes; refusing it")


def _read_head(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> tuple[bytes, bytes | None]:
    """(manifest.json bytes, manifest.sig bytes or None) from anywhere in the archive, size-limited."""
    found: dict[str, bytes] = {}
    for m in members:
        if m.name in (MANIFEST_NAME, SIGNATURE_NAME) and m.isfile():
            limit = MAX_MANIFEST_BYTES if m.name == MANIFEST_NAME else MAX_SIGNATURE_BYTES
            if m.size > limit:
                raise ManifestError(f"archive member {m.name!r} is {m.size} bytes, over the {limit} limit")
            f = tar.extractfile(m)
            assert f is not None  # a regular file
            found[m.name] = f.read()
    if MANIFEST_NAME not in found:
        raise ManifestError(f"archive has no {MANIFEST_NAME}; is it an edgeship bundle .tar?")
    return found[MANIFEST_NAME], found.get(SIGNATURE_NAME)


def check_listed(members: list[tarfile.TarInfo], manifest: Manifest) -> None:
    """Refuse any member the signed manifest does not list, or whose size is not the listed one."""
    sizes = {e.path: e.size for e in manifest.files}
    parents = {p.as_posix() for e in manifest.files for p in PurePosixPath(e.path).parents}
    for m in members:
        name = m.name.rstrip("/")
        if name in (MANIFEST_NAME, SIGNATURE_NAME) or (m.isdir() and name in parents):
            continue
        if name not in sizes:
            raise ExtraFile(f"archive member {name!r} is not listed in the signed manifest; "
                            "refused before writing it (re-pack the bundle with `edgeship export`)")
        if m.size != sizes[name]:
            raise SizeMismatch(f"archive member {name!r} is {m.size} bytes, the signed manifest says "
                               f"{sizes[name]}; refused before writing it")


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path, want_sha256: str) -> None:
    """Copy one checked member to `target`, hashing on the way; a wrong hash is HashMismatch."""
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(m)
    assert src is not None  # a regular file, checked by check_members
    h = hashlib.sha256()
    with src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != want_sha256:
        raise HashMismatch(f"bundle file {m.name!r} does not match its sha256 (corrupt or tampered)")


def unpack(
    archive: Path,
    dest: Path,
    trusted: TrustedKeys,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    verify_signature: bool = True,
) -> VerifiedBundle:
    """Unpack into `dest` (which must not exist) and verify; on any error nothing is left behind.

    The signed manifest is read and verified first; a member it does not list (or of another
    size) is refused before a byte of it is written. Every file and directory is fsynced before
    the rename that publishes `dest`, so a power cut leaves either no `dest` or a complete one.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ArchiveError(f"unpack destination {dest} already exists")
    if archive.stat().st_size > max_bytes + 10 * 1024 * 1024:
        raise ArchiveTooLarge(f"archive {archive} is {archive.stat().st_size} bytes, over the {max_bytes} limit")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:") as tar:
                members = tar.getmembers()
                check_members(members, max_bytes=max_bytes)
                raw, sig = _read_head(tar, members)
                sig = require_signature(sig)
                if verify_signature:  # False only for `edgeship serve` without a key: hashes still checked
                    trusted.verify(raw, sig)
                manifest = Manifest.from_bytes(raw)
                check_listed(members, manifest)
                hashes = {e.path: e.sha256 for e in manifest.files}
                for m in members:
                    name = m.name.rstrip("/")
                    if m.isdir():
                        (tmp / name).mkdir(parents=True, exist_ok=True)
                    elif name in hashes:
                        _extract(tar, m, tmp / name, hashes[name])
                (tmp / MANIFEST_NAME).write_bytes(raw)
                (tmp / SIGNATURE_NAME).write_bytes(sig)
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"{archive} is not a readable bundle archive: {exc}") from None
        # every listed file present, nothing extra
        open_bundle(tmp, trusted, check_hashes=False, verify_signature=verify_signature)
        fsync_tree(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_bundle(dest, trusted, check_hashes=False, verify_signature=verify_signature)
