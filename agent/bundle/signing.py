"""Ed25519 signing of manifest bytes, and the pinned public keys that verify them.

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public). A key's id is the first 16 hex
digits of the sha256 of its raw 32 public bytes; it names the key in the detached signature so a
device with several pinned keys knows which to try. The private key never enters a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.bundle.errors import MissingSignature, SignatureError, UntrustedKey

SIGNATURE_ALG = "ed25519"
MAX_SIGNATURE_BYTES = 4096


class KeyError_(ValueError):
    """A key file that cannot be read or is not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(directory: Path, name: str = "edgeship", *, overwrite: bool = False) -> KeyPair:
    """Write NAME.key (0600) and NAME.pub (0644) into `directory` (created 0700 if new)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise FileExistsError(f"{private_path} or {public_path} exists; pass --overwrite to replace the key pair")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Create with 0600 from the start: no window in which the private key is world-readable.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem)
    os.chmod(public_path, 0o644)
    return KeyPair(private_path, public_path, key_id(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyError_(f"signing key {path} not found; create one with: edgeship keys generate") from None
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an Ed25519 key; create one with: edgeship keys generate")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyError_(f"public key {path} not found") from None
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_(f"{path} is not an Ed25519 public key")
    return key


class TrustedKeys:
    """The pinned public keys a reader accepts, by key id."""

    def __init__(self, keys: list[Ed25519PublicKey]):
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def from_paths(cls, paths: list[Path] | list[str]) -> TrustedKeys:
        return cls([load_public_key(Path(p)) for p in paths])

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, data: bytes, signature_file: bytes) -> str:
        """Check a detached signature over `data`; returns the signing key id."""
        if len(signature_file) > MAX_SIGNATURE_BYTES:
            raise SignatureError("manifest.sig is too large to be a signature")
        try:
            sig = json.loads(signature_file.decode("utf-8"))
            alg, kid, value = sig["alg"], sig["key_id"], base64.b64decode(sig["signature"], validate=True)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise SignatureError("manifest.sig is not a valid edgeship signature file") from None
        if alg != SIGNATURE_ALG:
            raise SignatureError(f"signature algorithm {alg!r} is not supported (only {SIGNATURE_ALG})")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise UntrustedKey(
                f"bundle signed by key {kid!r}, which is not among the trusted keys {self.ids}; "
                "add its .pub to the trusted keys or re-sign the bundle"
            )
        try:
            key.verify(value, data)
        except InvalidSignature:
            raise UntrustedKey(f"signature by key {kid} does not match manifest.json (tampered manifest?)") from None
        return kid


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The detached signature file's bytes for `data`."""
    sig = {
        "alg": SIGNATURE_ALG,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }
    return json.dumps(sig, sort_keys=True).encode("utf-8") + b"\n"


def require_signature(raw: bytes | None) -> bytes:
    if raw is None:
        raise MissingSignature("bundle has no manifest.sig; it must be signed (edgeship export signs it)")
    return raw
