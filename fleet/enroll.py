"""Enrolment: everything a device needs to join the fleet's broker, in one directory.

    edgeship fleet ca init --dir CA                  the fleet CA (once)
    edgeship fleet ca server-cert --dir CA HOST...   the broker's TLS certificate
    edgeship fleet ca client-cert --dir CA           the controller's client certificate
    edgeship fleet device enroll ID --ca-dir CA --trusted-key signing.pub --broker mqtts://host:8883

`enroll` writes into OUT/ID (mode 0755): device.crt + device.key (CN = ID, signed by the fleet
CA), ca.crt (to verify the broker), trusted/*.pub (the pinned bundle keys) and agent.toml (0600);
with `--password-file` also a random password, in agent.toml and added to the broker's password file.
Copy the directory to the device (e.g. /etc/edgeship/) and start `edgeship agent run`.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
from cryptography import x509

from agent.bundle.signing import KeyError_, key_id, load_public_key
from agent.protocol.topics import DEFAULT_PREFIX, Topics, check_device_id
from fleet.pki import (CONTROLLER_IDENTITY, CertificateAuthority, PkiError, remove_password, set_password, write_private,
                       write_public)


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    directory: Path
    certificate: Path
    key: Path
    broker_ca: Path
    trusted_keys: list[Path]
    agent_toml: Path
    has_password: bool


def _check_broker_url(url: str, *, password: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise PkiError(f"broker URL {url!r} must be mqtts://HOST:PORT: enrolled devices talk to the broker over TLS "
                       f"(port 8883 with a certificate{', 8884 with a password' if password else ''})")
    return url


def agent_toml(*, device_id: str, broker_url: str, topic_prefix: str, directory: Path, trusted: list[Path],
               password: str | None) -> str:
    """The agent settings (agent/config.py) a device needs to connect, with paths under `directory`."""
    q = json.dumps
    lines = [
        "# Written by `edgeship fleet device enroll` (every option: configs/agent.toml). Paths assume",
        f"# this directory is installed as {directory}; change them if you copy it elsewhere.",
        f"device_id = {q(device_id)}",
        "trusted_keys = [" + ", ".join(q(str(directory / "trusted" / p.name)) for p in trusted) + "]",
        "",
        "[broker]",
        f"url = {q(broker_url)}",
        f"topic_prefix = {q(topic_prefix)}",
        f"ca_file = {q(str(directory / 'ca.crt'))}",
    ]
    if password is None:
        lines += [f"cert_file = {q(str(directory / 'device.crt'))}", f"key_file = {q(str(directory / 'device.key'))}"]
    else:
        lines += [f"username = {q(device_id)}", f"password = {q(password)}"]
    return "\n".join(lines) + "\n"


def enroll(device_id: str, *, ca_dir: Path, out_dir: Path, trusted_keys: list[Path], broker_url: str,
           topic_prefix: str = DEFAULT_PREFIX, password_file: Path | None = None,
           install_dir: Path | None = None, broker_ca: Path | None = None, overwrite: bool = False) -> Enrollment:
    """Issue a device's certificate (and password if `password_file`) and write its directory."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    Topics(topic_prefix)  # validates
    _check_broker_url(broker_url, password=password_file is not None)
    if not trusted_keys:
        raise PkiError("no trusted bundle key given: pass --trusted-key with the .pub that signs your bundles")
    try:
        for p in trusted_keys:
            key_id(load_public_key(p))
    except KeyError_ as exc:
        raise PkiError(str(exc)) from None
    ca = CertificateAuthority.load(ca_dir)
    directory = Path(out_dir) / device_id
    if directory.exists() and not overwrite:
        raise PkiError(f"{directory} exists: device {device_id!r} was enrolled already; pass --overwrite to re-issue")
    # 0755 with the secrets (device.key, agent.toml) 0600: the agent's DynamicUser= reads the public files in
    # place and gets the secrets from systemd's LoadCredential= (agent/systemd.py), which reads them as root.
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    directory.chmod(0o755)

    cert_pem, key_pem = ca.issue(device_id)
    write_public(directory / "device.crt", cert_pem)
    write_private(directory / "device.key", key_pem)
    write_public(directory / "ca.crt", Path(broker_ca).read_bytes() if broker_ca else ca.cert_path.read_bytes())
    trusted_dir = directory / "trusted"
    trusted_dir.mkdir(exist_ok=True, mode=0o755)
    trusted_dir.chmod(0o755)
    copied = []
    for p in trusted_keys:
        dest = trusted_dir / Path(p).name
        shutil.copyfile(p, dest)
        dest.chmod(0o644)
        copied.append(dest)
    password = None
    if password_file is not None:
        password = secrets.token_urlsafe(24)
        set_password(Path(password_file), device_id, password)
    toml = directory / "agent.toml"
    # 0600: with --password-file it holds the device's password.
    write_private(toml, agent_toml(device_id=device_id, broker_url=broker_url, topic_prefix=topic_prefix,
                                   directory=Path(install_dir) if install_dir else directory.resolve(),
                                   trusted=copied, password=password).encode())
    return Enrollment(device_id, directory, directory / "device.crt", directory / "device.key",
                      directory / "ca.crt", copied, toml, password is not None)


# ---- CLI ---------------------------------------------------------------------------------------


def _fail(exc: Exception | str, *, code: int = 2, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": str(exc), "code": type(exc).__name__ if isinstance(exc, Exception) else "error"}))
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


@click.group("ca")
def ca() -> None:
    """The fleet CA that signs the broker's and every client's TLS certificate."""


@ca.command("init")
@click.option("--dir", "ca_dir", type=click.Path(path_type=Path), required=True, help="Where ca.key (0600) and ca.crt go.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CA (every certificate it signed stops working).")
def ca_init(ca_dir: Path, overwrite: bool) -> None:
    """Create the fleet CA."""
    try:
        authority = CertificateAuthority.init(ca_dir, overwrite=overwrite)
    except PkiError as exc:
        _fail(exc)
    click.echo(f"CA certificate: {authority.cert_path} (give to the broker as cafile, and to devices)")
    click.echo(f"CA key:         {ca_dir / 'ca.key'} (keep secret, offline if you can)")


@ca.command("server-cert")
@click.argument("names", nargs=-1, required=True)
@click.option("--dir", "ca_dir", type=click.Path(path_type=Path), required=True, help="The CA directory.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Default: the CA directory.")
def ca_server_cert(names: tuple[str, ...], ca_dir: Path, out_dir: Path | None) -> None:
    """Issue the broker's certificate for its host NAMES (DNS names or IP addresses)."""
    try:
        cert, key = CertificateAuthority.load(ca_dir).issue(names[0], server_names=list(names))
    except PkiError as exc:
        _fail(exc)
    out = out_dir or ca_dir
    write_public(out / "server.crt", cert)
    write_private(out / "server.key", key)
    click.echo(f"broker certificate: {out / 'server.crt'} and key {out / 'server.key'} (certfile/keyfile in mosquitto.conf)")


@ca.command("client-cert")
@click.option("--dir", "ca_dir", type=click.Path(path_type=Path), required=True, help="The CA directory.")
@click.option("--name", default=CONTROLLER_IDENTITY, show_default=True, help="The CN, i.e. the MQTT username.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Default: the CA directory.")
def ca_client_cert(ca_dir: Path, name: str, out_dir: Path | None) -> None:
    """Issue a client certificate; by default the controller's (the ACL's `user fleet@controller`)."""
    try:
        cert, key = CertificateAuthority.load(ca_dir).issue(name)
    except PkiError as exc:
        _fail(exc)
    out = out_dir or ca_dir
    stem = "controller" if name == CONTROLLER_IDENTITY else name
    write_public(out / f"{stem}.crt", cert)
    write_private(out / f"{stem}.key", key)
    click.echo(f"client certificate for {name!r}: {out / f'{stem}.crt'} and key {out / f'{stem}.key'}")


@ca.command("crl")
@click.option("--dir", "ca_dir", type=click.Path(path_type=Path), required=True, help="The CA directory.")
def ca_crl(ca_dir: Path) -> None:
    """Write (or re-sign) crl.pem: needed once for a CA made before revocation existed."""
    try:
        authority = CertificateAuthority.load(ca_dir)
        path = authority.write_crl()
    except PkiError as exc:
        _fail(exc)
    click.echo(f"CRL: {path} ({len(authority.revoked())} revoked; crlfile in mosquitto.conf, reload with SIGHUP)")


@click.command("enroll")
@click.argument("device_id")
@click.option("--ca-dir", type=click.Path(path_type=Path), required=True, help="The fleet CA directory.")
@click.option("--trusted-key", "trusted_keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Public key that signs bundles (repeatable).")
@click.option("--broker", "broker_url", required=True, help="mqtts://HOST:PORT the device connects to.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("enrolled"), show_default=True)
@click.option("--topic-prefix", default=DEFAULT_PREFIX, show_default=True)
@click.option("--password-file", type=click.Path(path_type=Path), default=None,
              help="Also give the device a random password, added to this Mosquitto password file.")
@click.option("--install-dir", type=click.Path(path_type=Path), default=None,
              help="Where the directory will live on the device (paths in agent.toml); default: where it is written.")
@click.option("--broker-ca", type=click.Path(path_type=Path, exists=True), default=None,
              help="CA of the broker's certificate if the fleet CA did not sign it.")
@click.option("--overwrite", is_flag=True, help="Re-issue the credentials of an enrolled device.")
@click.option("--json", "as_json", is_flag=True)
def enroll_command(device_id: str, ca_dir: Path, trusted_keys: tuple[Path, ...], broker_url: str, out_dir: Path,
                   topic_prefix: str, password_file: Path | None, install_dir: Path | None, broker_ca: Path | None,
                   overwrite: bool, as_json: bool) -> None:
    """Write what device DEVICE_ID needs to connect: certificate, broker CA, bundle keys, agent.toml."""
    try:
        e = enroll(device_id, ca_dir=ca_dir, out_dir=out_dir, trusted_keys=list(trusted_keys), broker_url=broker_url,
                   topic_prefix=topic_prefix, password_file=password_file, install_dir=install_dir,
                   broker_ca=broker_ca, overwrite=overwrite)
    except (PkiError, OSError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"device_id": e.device_id, "directory": str(e.directory), "certificate": str(e.certificate),
                               "key": str(e.key), "broker_ca": str(e.broker_ca), "agent_toml": str(e.agent_toml),
                               "trusted_keys": [str(p) for p in e.trusted_keys],
                               "password": e.has_password}))
        return
    click.echo(f"enrolled {e.device_id}: {e.directory} (device.key and agent.toml 0600, root-only on the device)")
    click.echo(f"  certificate {e.certificate.name}, key {e.key.name} (0600), broker CA {e.broker_ca.name}, "
               f"{len(e.trusted_keys)} trusted bundle key(s), {e.agent_toml.name}")
    if e.has_password:
        click.echo(f"  a random password is in {e.agent_toml.name} (0600) and in {password_file}; "
                   "reload the broker (SIGHUP) to accept it")
    click.echo(f"  copy the directory to the device and run: edgeship agent run --config {e.agent_toml.name}")


@dataclass(frozen=True)
class Revocation:
    device_id: str
    crl: Path | None  # None when no CA directory was given
    serials: list[int]  # certificates newly listed in the CRL
    password_removed: bool


def revoke_credentials(device_id: str, *, ca_dir: Path | None, password_file: Path | None = None,
                       certificates: list[Path] = ()) -> Revocation:
    """Put every certificate the CA issued to `device_id` (and `certificates`) in its CRL; drop its broker password."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    crl, serials = None, []
    if ca_dir is not None:
        authority = CertificateAuthority.load(ca_dir)
        serials = authority.revoke(device_id, certificates=[_load_cert(p) for p in certificates])
        crl = authority.crl_path
    removed = remove_password(Path(password_file), device_id) if password_file is not None else False
    return Revocation(device_id, crl, serials, removed)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path} is not a readable PEM certificate ({exc}); pass the device's device.crt") from None


@click.command("revoke")
@click.argument("device_id")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="The fleet CA directory: its crl.pem gets every certificate issued to DEVICE_ID.")
@click.option("--password-file", type=click.Path(path_type=Path), default=None,
              help="Also remove DEVICE_ID from this Mosquitto password file.")
@click.option("--cert", "certificates", multiple=True, type=click.Path(path_type=Path),
              help="A certificate of DEVICE_ID to revoke too (one issued before the CA kept issued/).")
@click.option("--no-controller", is_flag=True, help="Only the broker's files; do not tell the controller.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def revoke_command(ctx: click.Context, device_id: str, ca_dir: Path | None, password_file: Path | None,
                   certificates: tuple[Path, ...], no_controller: bool, as_json: bool) -> None:
    """Revoke DEVICE_ID: the broker refuses its certificate (after a reload), the controller ignores it."""
    from fleet.client import ClientError, FleetClient

    if ca_dir is None and no_controller:
        _fail(PkiError("nothing to revoke with: pass --ca-dir (the broker's CRL), or drop --no-controller"), as_json=as_json)
    try:
        r = revoke_credentials(device_id, ca_dir=ca_dir, password_file=password_file, certificates=list(certificates))
    except (PkiError, OSError) as exc:
        _fail(exc, as_json=as_json)
    told = None
    if not no_controller:
        obj = ctx.find_root().obj or {}
        client = FleetClient(obj.get("url"), obj.get("token"))
        try:
            told = client.revoke(device_id, enrolled=r.crl is not None)
        except ClientError as exc:
            done = f"the CRL {r.crl} lists it, but the controller was not told: " if r.crl else ""
            _fail(f"{done}{exc}", code=exc.exit_code, as_json=as_json)
        finally:
            client.close()
    if as_json:
        click.echo(json.dumps({"device_id": device_id, "crl": str(r.crl) if r.crl else None,
                               "serials": [f"{s:x}" for s in r.serials], "password_removed": r.password_removed,
                               "controller": told is not None}))
        return
    if r.crl is not None:
        click.echo(f"revoked {device_id}: {len(r.serials)} certificate(s) newly in {r.crl}; "
                   "reload the broker to refuse them: systemctl reload mosquitto (SIGHUP)")
    if r.password_removed:
        click.echo(f"removed {device_id} from {password_file} (also read on reload)")
    if told is not None:
        click.echo(f"the controller ignores {device_id} from now on and never selects it for a rollout")


@click.group("device")
def device() -> None:
    """Enrol and revoke devices."""


device.add_command(enroll_command)
device.add_command(revoke_command)
