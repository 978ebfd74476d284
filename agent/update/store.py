"""BundleStore: a content-addressed store of verified bundles and an atomically switched pointer.

    <state_dir>/bundles/<manifest sha256>/   one unpacked, verified bundle per directory
    <state_dir>/downloads/<sha>.tar.part     archives being downloaded (resumed with Range)
    <state_dir>/downloads/<sha>.unpacked/    an archive unpacked and verified, about to be staged
    <state_dir>/pointer.json                 {"active": sha, "previous": sha}: ONE file, replaced
                                             atomically, so a crash leaves the old or the new pair

Every file of a bundle and every directory holding one is fsynced before the rename that publishes
it (agent/bundle/durable.py): after a power cut a published bundle is whole, never empty files.

The previous committed bundle is kept for rollback; every other bundle is garbage-collected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agent.bundle import BundleError, TrustedKeys, VerifiedBundle, open_bundle
from agent.bundle.manifest import SHA256_RE
from agent.update.errors import StoreError
from agent.bundle.durable import fsync_dir, fsync_tree
from agent.update.persist import atomic_write

POINTER_SCHEMA = 1


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise StoreError(f"bundle id {sha!r} is not a manifest sha256 (64 lowercase hex digits)")
    return sha


class BundleStore:
    """Bundles by manifest sha256, plus the active/previous pointer."""

    def __init__(self, state_dir: Path, *, trusted: TrustedKeys):
        self.root = Path(state_dir)
        self.trusted = trusted
        self.bundles_dir = self.root / "bundles"
        self.downloads_dir = self.root / "downloads"
        self.pointer_path = self.root / "pointer.json"
        for d in (self.root, self.bundles_dir, self.downloads_dir):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                fsync_dir(d.parent)

    # ---- the pointer ---------------------------------------------------------------------------

    def pointer(self) -> tuple[str | None, str | None]:
        """(active sha, previous sha) as last switched."""
        try:
            data = json.loads(self.pointer_path.read_bytes())
        except FileNotFoundError:
            return None, None
        except ValueError as exc:
            raise StoreError(f"{self.pointer_path} is not JSON ({exc}); the store is damaged") from None
        if not isinstance(data, dict) or data.get("schema_version") != POINTER_SCHEMA:
            raise StoreError(f"{self.pointer_path} has an unknown schema_version; upgrade the agent")
        return data.get("active"), data.get("previous")

    def active_sha(self) -> str | None:
        return self.pointer()[0]

    def previous_sha(self) -> str | None:
        return self.pointer()[1]

    def switch(self, active: str | None, previous: str | None) -> None:
        """Point at `active` (and keep `previous` for rollback) in one atomic rename."""
        for sha in (active, previous):
            if sha is not None and not self.has(_check_sha(sha)):
                raise StoreError(f"cannot switch to bundle {sha[:12]}: it is not in the store")
        body = {"schema_version": POINTER_SCHEMA, "active": active, "previous": previous}
        atomic_write(self.pointer_path, json.dumps(body).encode())

    # ---- bundles -------------------------------------------------------------------------------

    def path(self, sha: str) -> Path:
        return self.bundles_dir / _check_sha(sha)

    def has(self, sha: str) -> bool:
        return (self.bundles_dir / sha / "manifest.json").is_file()

    def bundle(self, sha: str, *, check_hashes: bool = False) -> VerifiedBundle:
        """The stored bundle `sha`, its signature re-verified (and every file hash if asked)."""
        try:
            vb = open_bundle(self.path(sha), self.trusted, check_hashes=check_hashes)
        except BundleError as exc:
            raise StoreError(f"stored bundle {sha[:12]} is damaged: {exc}", code=exc.code) from None
        if vb.manifest_sha256 != sha:
            raise StoreError(f"stored bundle {sha[:12]} has manifest sha256 {vb.manifest_sha256[:12]}; store damaged")
        return vb

    def active(self) -> VerifiedBundle | None:
        sha = self.active_sha()
        return self.bundle(sha) if sha else None

    def previous(self) -> VerifiedBundle | None:
        sha = self.previous_sha()
        return self.bundle(sha) if sha else None

    def download_path(self, sha: str) -> Path:
        return self.downloads_dir / f"{_check_sha(sha)}.tar.part"

    def staging_path(self, sha: str) -> Path:
        """Where a downloaded archive is unpacked and verified before it joins the store."""
        return self.downloads_dir / f"{_check_sha(sha)}.unpacked"

    def stage(self, sha: str) -> VerifiedBundle:
        """Move the verified copy at staging_path(sha) into the store (one rename; idempotent)."""
        if not self.has(sha):
            src = self.staging_path(sha)
            if not src.exists():
                raise StoreError(f"bundle {sha[:12]} is neither staged nor verified; download it again",
                                 code="staging_lost")
            fsync_tree(src)  # unpack synced it; a copy left by an older agent may not be
            src.rename(self.path(sha))
            fsync_dir(self.bundles_dir)
            fsync_dir(self.downloads_dir)
        return self.bundle(sha)

    def add_directory(self, directory: Path) -> VerifiedBundle:
        """Install a bundle directory (first install, tests): copied in, then verified."""
        vb = open_bundle(Path(directory), self.trusted)
        dest = self.path(vb.manifest_sha256)
        if not dest.exists():
            tmp = self.bundles_dir / f".{vb.manifest_sha256}.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(directory, tmp)
            fsync_tree(tmp)
            tmp.rename(dest)
            fsync_dir(self.bundles_dir)
        return self.bundle(vb.manifest_sha256, check_hashes=True)

    def remove(self, sha: str) -> None:
        shutil.rmtree(self.path(sha), ignore_errors=True)

    def gc(self, *, keep: tuple[str, ...] = ()) -> list[str]:
        """Delete bundles and downloads other than active, previous and `keep`; returns removed ids."""
        wanted = {s for s in (*self.pointer(), *keep) if s}
        removed = []
        for p in self.bundles_dir.iterdir():
            if p.name not in wanted:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        for p in self.downloads_dir.iterdir():
            if p.name.split(".", 1)[0] not in wanted:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
