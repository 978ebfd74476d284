"""Ed25519 signing of manifest bytes, and the pinned public keys that verify them.

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public). A key's id is the first 16 hex
digits of the sha256 of its raw 32 public bytes; it names the key in the detached signature so a
device with several pinned keys knows which to try. The private key never enters a bundle.

cryptography is imported when a signature is made or checked (or a key is generated or is
unusual): pinned keys in the usual form are read without it, so an idle agent does not carry it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle.errors import MissingSignature, SignatureError, UntrustedKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_ALG = "ed25519"
MAX_SIGNATURE_BYTES = 4096
# RFC 8410: an Ed25519 SubjectPublicKeyInfo is this DER header followed by the 32 raw key bytes.
ED25519_SPKI_HEADER = bytes.fromhex("302a300506032b6570032100")


class KeyError_(ValueError):
    """A key file that cannot be read or is not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    return raw_key_id(raw_public_bytes(public_key))


def raw_key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(directory: Path, name: str = "edgeship", *, overwrite: bool = False) -> KeyPair:
    """Write NAME.key (0600) and NAME.pub (0644) into `directory` (created 0700 if new)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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


def load_public_key_raw(path: Path) -> bytes:
    """The 32 raw bytes of a PEM Ed25519 public key; the usual form is read without cryptography."""
    path = Path(path)
    try:
        raw = ed25519_spki_raw(path.read_bytes())
    except FileNotFoundError:
        raise KeyError_(f"public key {path} not found") from None
    except OSError as exc:
        raise KeyError_(f"cannot read public key {path}: {exc.strerror}") from None
    # Anything else goes through cryptography, which reads what it can and says what is wrong.
    return raw if raw is not None else raw_public_bytes(load_public_key(path))


def ed25519_spki_raw(pem: bytes) -> bytes | None:
    """The raw key of exactly one PEM Ed25519 SubjectPublicKeyInfo; None for anything else."""
    lines = [line.strip() for line in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----" or lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except ValueError:
        return None
    if len(der) != len(ED25519_SPKI_HEADER) + 32 or not der.startswith(ED25519_SPKI_HEADER):
        return None
    return der[len(ED25519_SPKI_HEADER):]


class TrustedKeys:
    """The pinned public keys a reader accepts, by key id (held as raw bytes until a check needs them)."""

    def __init__(self, keys: list[Ed25519PublicKey]):
        self._keys = {key_id(k): raw_public_bytes(k) for k in keys}

    @classmethod
    def from_paths(cls, paths: list[Path] | list[str]) -> TrustedKeys:
        trusted = cls([])
        for p in paths:
            raw = load_public_key_raw(Path(p))
            trusted._keys[raw_key_id(raw)] = raw
        return trusted

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
        raw = self._keys.get(kid) if isinstance(kid, str) else None
        if raw is None:
            raise UntrustedKey(
                f"bundle signed by key {kid!r}, which is not among the trusted keys {self.ids}; "
                "add its .pub to the trusted keys or re-sign the bundle"
            )
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(value, data)
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
