"""The single-file form of a bundle: an uncompressed POSIX tar (model weights do not compress).

Unpacking trusts nothing: every member must be a regular file or directory with a safe relative
path; links, devices, fifos, absolute paths, '..', duplicates and oversize archives are refused
before anything is written, and the result is then verified like any bundle directory.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from agent.bundle.errors import ArchiveError, ArchiveTooLarge, UnsafeMember
from agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, check_relative_path
from agent.bundle.signing import TrustedKeys
from agent.bundle.store import VerifiedBundle, open_bundle

DEFAULT_MAX_BYTES = 16 * 1024**3  # 16 GiB: well above a 7B int4 model
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


def unpack(
    archive: Path,
    dest: Path,
    trusted: TrustedKeys,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    verify_signature: bool = True,
) -> VerifiedBundle:
    """Unpack into `dest` (which must not exist) and verify; on any error nothing is left behind."""
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
                for m in members:
                    target = tmp / m.name
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    assert src is not None  # regular file, checked above
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"{archive} is not a readable bundle archive: {exc}") from None
        open_bundle(tmp, trusted, verify_signature=verify_signature)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_bundle(dest, trusted, check_hashes=False, verify_signature=verify_signature)
