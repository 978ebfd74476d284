"""The bundle store: verify a pushed archive against the controller's trusted keys, keep it
content-addressed (by manifest sha256) as the canonical .tar that `agent.bundle.pack` writes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import BundleError, TrustedKeys, pack, sha256_file, unpack
from agent.bundle.signing import KeyError_
from fleet.errors import BundleRejected, ConfigError, InvalidRequest

SHA_LEN = 64


@dataclass(frozen=True)
class StoredBundle:
    manifest_sha256: str
    manifest: dict[str, Any]
    key_id: str
    archive_sha256: str
    size: int
    path: Path

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]


class BundleStore:
    """Archives under `root/<sha[:2]>/<sha>.tar`; every write is verified first."""

    def __init__(self, root: Path, trusted_key_paths: list[Path]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._key_paths = list(trusted_key_paths)

    def trusted(self) -> TrustedKeys:
        if not self._key_paths:
            raise ConfigError("no trusted keys: set trusted_keys (EDGESHIP_FLEET_TRUSTED_KEYS='[\"/etc/edgeship/keys/release.pub\"]')")
        try:
            return TrustedKeys.from_paths(self._key_paths)
        except KeyError_ as exc:
            raise ConfigError(f"trusted key: {exc}") from None

    def path(self, manifest_sha256: str) -> Path:
        if len(manifest_sha256) != SHA_LEN or any(c not in "0123456789abcdef" for c in manifest_sha256):
            raise InvalidRequest(f"bundle id {manifest_sha256[:80]!r} is not a sha256")
        return self.root / manifest_sha256[:2] / f"{manifest_sha256}.tar"

    def ingest(self, archive: Path) -> StoredBundle:
        """Verify `archive` (signature, manifest, every file hash) and store its canonical form."""
        trusted = self.trusted()
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".push-") as tmp:
            try:
                vb = unpack(archive, Path(tmp) / "b", trusted)
            except BundleError as exc:
                raise BundleRejected(f"bundle refused ({exc.code}): {exc}") from None
            dest = self.path(vb.manifest_sha256)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                staged = pack(Path(tmp) / "b", Path(tmp) / "canonical.tar")
                os.replace(staged, dest)
            manifest = vb.manifest.model_dump(mode="json")
            return StoredBundle(vb.manifest_sha256, manifest, vb.key_id, sha256_file(dest), dest.stat().st_size, dest)

    def remove(self, manifest_sha256: str) -> None:
        self.path(manifest_sha256).unlink(missing_ok=True)
