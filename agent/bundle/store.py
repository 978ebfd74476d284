"""Write (seal) and read (verify) a bundle directory.

Layout:  <bundle>/manifest.json   canonical JSON of `Manifest`
         <bundle>/manifest.sig    detached Ed25519 signature over manifest.json's bytes
         <bundle>/...             every file listed in the manifest, and nothing else
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle.errors import (
    ExtraFile,
    HashMismatch,
    ManifestError,
    MissingFile,
    SizeMismatch,
)
from agent.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    FileRole,
    Manifest,
)
from agent.bundle.signing import TrustedKeys, key_id, require_signature, sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def guess_role(rel: str) -> FileRole:
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("golden/"):
        return FileRole.GOLDEN
    if name.endswith("_ctx.onnx") or name.endswith(".bin") and "ctx" in name:
        return FileRole.EP_CONTEXT
    if name.endswith(".onnx"):
        return FileRole.MODEL
    if name.endswith((".onnx.data", ".onnx_data", ".data")):
        return FileRole.EXTERNAL_DATA
    if name.startswith("tokenizer") or name in ("vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json") \
            or name.endswith((".model", ".jinja")):
        return FileRole.TOKENIZER
    if name.endswith((".json", ".toml", ".txt")):
        return FileRole.CONFIG
    return FileRole.OTHER


def _walk_files(directory: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel not in (MANIFEST_NAME, SIGNATURE_NAME):
                out.append(rel)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seal_bundle(directory: Path, *, private_key: Ed25519PrivateKey, **fields: Any) -> Manifest:
    """Hash every file under `directory`, write manifest.json from `fields`, and sign it.

    `fields` are Manifest fields except `files` (computed here). Roles are guessed from paths
    unless `roles={path: FileRole}` is given.
    """
    directory = Path(directory)
    roles: dict[str, FileRole] = fields.pop("roles", {}) or {}
    entries = []
    for rel in _walk_files(directory):
        p = directory / rel
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"{p} is not a regular file; a bundle holds only regular files")
        entries.append(
            FileEntry(path=rel, sha256=sha256_file(p), size=p.stat().st_size, role=roles.get(rel, guess_role(rel)))
        )
    manifest = Manifest(files=entries, **fields)
    if manifest.model.entry not in {e.path for e in entries}:
        raise ValueError(f"model entry {manifest.model.entry!r} is not a file of the bundle")
    raw = manifest.canonical_bytes()
    _atomic_write(directory / MANIFEST_NAME, raw)
    _atomic_write(directory / SIGNATURE_NAME, sign(raw, private_key))
    return manifest


def resign_bundle(directory: Path, manifest: Manifest, private_key: Ed25519PrivateKey) -> None:
    """Rewrite manifest.json (e.g. after adding a report) and its signature."""
    raw = manifest.canonical_bytes()
    _atomic_write(Path(directory) / MANIFEST_NAME, raw)
    _atomic_write(Path(directory) / SIGNATURE_NAME, sign(raw, private_key))


UNVERIFIED = "unverified"  # key_id of a bundle opened without checking its signature


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    key_id: str
    manifest_sha256: str  # sha256 of manifest.json's bytes: the bundle's identity on the wire

    def file_path(self, rel: str) -> Path:
        return self.path / rel


def _read_limited(path: Path, limit: int, what: str) -> bytes | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{what} {path} is not a regular file")
    if st.st_size > limit:
        raise ManifestError(f"{what} {path} is {st.st_size} bytes, over the {limit} limit")
    return path.read_bytes()


def open_bundle(directory: Path, trusted: TrustedKeys, *, check_hashes: bool = True,
                verify_signature: bool = True) -> VerifiedBundle:
    """Verify a bundle directory: signature first, then manifest, then every file.

    `verify_signature=False` (`edgeship serve` without a key) still requires manifest.sig and
    checks every file against the manifest; the bundle's key_id is then "unverified".
    Raises a specific BundleError subclass for each way a bundle can be wrong.
    """
    directory = Path(directory)
    raw = _read_limited(directory / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")
    if raw is None:
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}; is it a bundle directory?")
    sig = require_signature(_read_limited(directory / SIGNATURE_NAME, 4096, "signature"))
    kid = trusted.verify(raw, sig) if verify_signature else UNVERIFIED
    manifest = Manifest.from_bytes(raw)
    listed = {e.path for e in manifest.files}
    for entry in manifest.files:
        p = directory / entry.path
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise MissingFile(f"bundle file {entry.path!r} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise MissingFile(f"bundle file {entry.path!r} is not a regular file")
        if st.st_size != entry.size:
            raise SizeMismatch(f"bundle file {entry.path!r} is {st.st_size} bytes, manifest says {entry.size}")
        if check_hashes and sha256_file(p) != entry.sha256:
            raise HashMismatch(f"bundle file {entry.path!r} does not match its sha256 (corrupt or tampered)")
    extra = sorted(set(_walk_files(directory)) - listed)
    if extra:
        raise ExtraFile(f"bundle has files not in its manifest: {', '.join(extra[:5])}")
    return VerifiedBundle(directory, manifest, kid, hashlib.sha256(raw).hexdigest())


def signer_id(private_key: Ed25519PrivateKey) -> str:
    return key_id(private_key.public_key())
