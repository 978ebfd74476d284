"""The fleet's own small PKI for the MQTT broker: a CA, the broker's server certificate, client
certificates for devices and the controller, revocation (a CRL the broker reads), and Mosquitto
password-file entries.

Everything is ECDSA P-256 (what every TLS stack on a gateway speaks) and written with private
files 0600 in 0700 directories. The CN of a client certificate is its MQTT identity: mosquitto's
`use_identity_as_username` turns it into the username that the ACL's `%u` patterns match.
Every certificate the CA signs is kept (public) in `issued/SERIAL.pem`, so `revoke(name)` can find
the serials to put in `crl.pem`, the CRL mosquitto's `crlfile` names.

    PkiError(ValueError)     bad input or a CA that cannot be read; the message says what to do
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The controller's MQTT identity. '@' is not allowed in a device id (agent/protocol/topics.py),
# so no device can ever be enrolled under the controller's name and inherit its ACL.
CONTROLLER_IDENTITY = "fleet@controller"
CA_CERT, CA_KEY, CRL_FILE, ISSUED_DIR = "ca.crt", "ca.key", "crl.pem", "issued"
CA_DAYS, LEAF_DAYS = 3650, 825
# Mosquitto 2.x password hashes: "$7$" is PBKDF2-SHA512; 101 iterations is mosquitto_passwd's default.
PASSWD_ITERATIONS = 101


class PkiError(ValueError):
    """A CA, certificate or identity that cannot be used; says what to do instead."""


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` created 0600, so a secret is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CertificateAuthority:
    """The fleet CA: signs the broker's server certificate and every client certificate."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    @classmethod
    def init(cls, directory: Path, *, name: str = "edgeship fleet CA", overwrite: bool = False) -> CertificateAuthority:
        """Create a new CA in `directory` (ca.key 0600, ca.crt 0644)."""
        directory = Path(directory)
        if not overwrite and ((directory / CA_KEY).exists() or (directory / CA_CERT).exists()):
            raise PkiError(f"a CA already exists in {directory}; use it, or pass --overwrite to replace it "
                           "(every certificate it signed stops working)")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / CA_KEY, _key_pem(key))
        write_public(directory / CA_CERT, _cert_pem(cert))
        authority = cls(cert, key, directory)
        authority.write_crl()  # mosquitto's crlfile must exist before anything is revoked
        return authority

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        except FileNotFoundError:
            raise PkiError(f"no fleet CA in {directory} (need {CA_KEY} and {CA_CERT}); "
                           "create one with: edgeship fleet ca init --dir DIR") from None
        except ValueError as exc:
            raise PkiError(f"the CA in {directory} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / CA_KEY} is not an EC key; create the CA with: edgeship fleet ca init")
        return cls(cert, key, directory)

    def issue(self, common_name: str, *, server_names: list[str] | None = None,
              days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a client (no `server_names`) or a server."""
        if not common_name or len(common_name) > 64:
            raise PkiError(f"certificate name {common_name!r} must be 1-64 characters")
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in server_names]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        write_public(self.directory / ISSUED_DIR / f"{cert.serial_number:x}.pem", _cert_pem(cert))
        return _cert_pem(cert), _key_pem(key)

    def issued(self, common_name: str) -> list[x509.Certificate]:
        """Every certificate this CA signed for `common_name` (from issued/)."""
        found = []
        for path in sorted((self.directory / ISSUED_DIR).glob("*.pem")):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if _common_name(cert) == common_name:
                found.append(cert)
        return found

    def revoked(self) -> dict[int, dt.datetime]:
        """serial -> revocation time, as listed in crl.pem (empty if there is none yet)."""
        if not self.crl_path.exists():
            return {}
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except ValueError as exc:
            raise PkiError(f"{self.crl_path} cannot be read ({exc}); restore it from a backup before revoking more") from None
        return {r.serial_number: r.revocation_date_utc for r in crl}

    def revoke(self, common_name: str, *, certificates: list[x509.Certificate] = ()) -> list[int]:
        """Add every certificate issued to `common_name` (and `certificates`, e.g. from before issued/
        existed) to crl.pem; returns the serials newly revoked."""
        for cert in certificates:
            try:
                cert.verify_directly_issued_by(self.cert)  # the signature, not the issuer's name: CAs share names
                signed = True
            except (ValueError, TypeError, InvalidSignature):
                signed = False
            if not signed or _common_name(cert) != common_name:
                raise PkiError(f"certificate {cert.serial_number:x} ({_common_name(cert)!r}) is not {common_name!r} "
                               "signed by this CA; pass that device's own device.crt")
        certs = [*self.issued(common_name), *certificates]
        if not certs:
            raise PkiError(f"the CA in {self.directory} issued no certificate to {common_name!r}; "
                           f"check the id (issued certificates are in {self.directory / ISSUED_DIR})")
        revoked = self.revoked()
        new = [c.serial_number for c in certs if c.serial_number not in revoked]
        now = _now()
        self.write_crl({**revoked, **{serial: now for serial in new}})
        return new

    def write_crl(self, revoked: dict[int, dt.datetime] | None = None) -> Path:
        """Sign and write crl.pem listing `revoked` (default: what it lists now, re-signed)."""
        revoked = self.revoked() if revoked is None else revoked
        # OpenSSL refuses every client once a CRL's nextUpdate has passed: make it last as long as the CA.
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - dt.timedelta(minutes=5)).next_update(self.cert.not_valid_after_utc)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False))
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def mosquitto_password_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a Mosquitto 2.x password file (what `mosquitto_passwd -b` writes)."""
    if ":" in username or "\n" in username or not username:
        raise PkiError(f"username {username!r} cannot go in a password file (no ':' or newline, not empty)")
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PASSWD_ITERATIONS)
    return (f"{username}:$7${PASSWD_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def set_password(password_file: Path, username: str, password: str) -> None:
    """Add or replace `username` in a Mosquitto password file (kept 0600); send SIGHUP to reload."""
    kept = _password_lines_without(Path(password_file), username)
    kept.append(mosquitto_password_line(username, password))
    write_private(Path(password_file), ("\n".join(kept) + "\n").encode())


def remove_password(password_file: Path, username: str) -> bool:
    """Remove `username` from a Mosquitto password file; False if it had no entry. SIGHUP to reload."""
    password_file = Path(password_file)
    lines = password_file.read_text().splitlines() if password_file.exists() else []
    kept = _password_lines_without(password_file, username)
    if len(kept) == len([ln for ln in lines if ln.strip()]):
        return False
    write_private(password_file, ("\n".join(kept) + "\n").encode() if kept else b"")
    return True


def _password_lines_without(password_file: Path, username: str) -> list[str]:
    lines = password_file.read_text().splitlines() if password_file.exists() else []
    return [ln for ln in lines if ln.strip() and ln.split(":", 1)[0] != username]
