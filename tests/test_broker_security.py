"""The production broker example (configs/mosquitto/) on a real Mosquitto: TLS, per-device
identities from `edgeship fleet device enroll`, and the ACL that keeps devices to their own topics.

The broker runs the shipped mosquitto.conf and acl, with only paths, ports and logging changed.
"""

from __future__ import annotations

import json
import queue
import shutil
import ssl
import stat
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Channel, Topics
from fleet.cli import cli as fleet_cli
from fleet.enroll import enroll
from fleet.pki import CONTROLLER_IDENTITY, CertificateAuthority, PkiError
from tests.support.secure_broker import SecureBroker, start_secure_broker

TOPICS = Topics("edgeship")  # the ACL example is written for the default prefix


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keypair) -> SecureBroker:
    s = start_secure_broker(tmp_path_factory.mktemp("secure-broker"), keypair[1])
    yield s
    s.stop()


class Client:
    """A paho client (MQTT 5) that records what it receives and the reason codes it is given."""

    def __init__(self, fleet: SecureBroker, *, identity: str | None, cert: tuple[Path, Path] | None = None,
                 password: str | None = None, port: int | None = None, client_id: str | None = None):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{identity or 'anon'}-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(fleet.workdir / "ca.crt"),
                       certfile=str(cert[0]) if cert else None, keyfile=str(cert[1]) if cert else None)
        if password is not None or (identity and cert is None):
            self.c.username_pw_set(identity, password)
        self.c.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        # the server may drop a TLS 1.3 connection after the client's handshake ended: no CONNACK then
        self.c.on_disconnect = lambda c, u, flags, rc, props: self.connack.put(None)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.port = port or fleet.cert_port

    def connect(self):
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        rc = self.connack.get(timeout=10)
        if rc is None:
            self.c.loop_stop()
            raise ConnectionError("the broker closed the connection before CONNACK")
        if rc.is_failure:
            self.close()
        return rc

    def subscribe(self, topic: str) -> list:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes | str) -> None:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)

    def received(self, *, until: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including the payload `until` (a marker sent last)."""
        got = []
        while True:
            topic, payload = self.messages.get(timeout=timeout)
            got.append((topic, payload))
            if payload == until:
                return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device(fleet: SecureBroker, dev: str, *, client_id: str | None = None) -> Client:
    d = fleet.devices[dev]
    if dev in fleet.passwords:
        c = Client(fleet, identity=dev, password=fleet.passwords[dev], port=fleet.password_port, client_id=client_id)
    else:
        c = Client(fleet, identity=dev, cert=(d / "device.crt", d / "device.key"), client_id=client_id)
    assert not c.connect().is_failure
    return c


def controller(fleet: SecureBroker) -> Client:
    c = Client(fleet, identity=CONTROLLER_IDENTITY, cert=(fleet.workdir / "controller.crt", fleet.workdir / "controller.key"))
    assert not c.connect().is_failure
    for ch in (Channel.STATE, Channel.HEALTH, Channel.ACK, Channel.EVENTS):
        assert not c.subscribe(TOPICS.all_devices(ch))[0].is_failure
    return c


def marker() -> bytes:
    return json.dumps({"marker": uuid.uuid4().hex}).encode()


@pytest.mark.parametrize("dev", ["dev-a", "dev-c"])  # certificate identity, password identity
def test_a_device_cannot_publish_as_another_device(fleet, dev):
    ctl, d = controller(fleet), device(fleet, dev)
    try:
        for ch in (Channel.STATE, Channel.HEALTH, Channel.ACK, Channel.EVENTS):
            d.publish(TOPICS.device("dev-b", ch), b'{"spoofed": true}')
        end = marker()
        d.publish(TOPICS.device(dev, Channel.HEALTH), end)
        got = ctl.received(until=end)
        assert got == [(TOPICS.device(dev, Channel.HEALTH), end)], got
    finally:
        ctl.close()
        d.close()


def test_a_device_publishes_every_channel_of_its_own(fleet):
    ctl, d = controller(fleet), device(fleet, "dev-a")
    try:
        sent = [(TOPICS.device("dev-a", ch), marker()) for ch in (Channel.STATE, Channel.HEALTH, Channel.ACK, Channel.EVENTS)]
        for topic, payload in sent:
            d.publish(topic, payload)
        got = ctl.received(until=sent[-1][1])
        # retained state from earlier tests may come first; everything we sent arrives, in order
        assert [m for m in got if m in sent] == sent
    finally:
        ctl.close()
        d.close()


def test_a_device_cannot_send_commands(fleet):
    ctl, a, b = controller(fleet), device(fleet, "dev-a"), device(fleet, "dev-b")
    try:
        b.subscribe(TOPICS.device("dev-b", Channel.CMD))
        a.subscribe(TOPICS.device("dev-a", Channel.CMD))
        a.publish(TOPICS.device("dev-b", Channel.CMD), b'{"forged": "command"}')
        a.publish(TOPICS.device("dev-a", Channel.CMD), b'{"forged": "to itself"}')
        end = marker()
        ctl.publish(TOPICS.device("dev-b", Channel.CMD), end)
        assert b.received(until=end) == [(TOPICS.device("dev-b", Channel.CMD), end)]
        end_a = marker()
        ctl.publish(TOPICS.device("dev-a", Channel.CMD), end_a)
        assert a.received(until=end_a) == [(TOPICS.device("dev-a", Channel.CMD), end_a)]
    finally:
        for c in (ctl, a, b):
            c.close()


@pytest.mark.parametrize("pattern", ["{root}/dev-b/cmd", "{root}/+/cmd", "{root}/#", "#"])
def test_a_device_cannot_read_other_devices_commands(fleet, pattern):
    ctl, a = controller(fleet), device(fleet, "dev-a")
    try:
        a.subscribe(pattern.format(root=TOPICS.root))
        a.subscribe(TOPICS.device("dev-a", Channel.CMD))
        ctl.publish(TOPICS.device("dev-b", Channel.CMD), b'{"secret": "for dev-b"}')
        end = marker()
        ctl.publish(TOPICS.device("dev-a", Channel.CMD), end)
        got = a.received(until=end)
        assert all(topic == TOPICS.device("dev-a", Channel.CMD) for topic, _ in got), got
    finally:
        ctl.close()
        a.close()


def test_a_device_cannot_read_other_devices_reports(fleet):
    a, b = device(fleet, "dev-a"), device(fleet, "dev-b")
    try:
        a.subscribe(f"{TOPICS.root}/+/health")
        a.subscribe(TOPICS.device("dev-a", Channel.CMD))
        b.publish(TOPICS.device("dev-b", Channel.HEALTH), b'{"private": 1}')
        ctl = controller(fleet)
        end = marker()
        ctl.publish(TOPICS.device("dev-a", Channel.CMD), end)
        ctl.close()
        assert a.received(until=end) == [(TOPICS.device("dev-a", Channel.CMD), end)]
    finally:
        a.close()
        b.close()


def test_the_controller_reads_all_and_commands_all(fleet):
    ctl, a, c = controller(fleet), device(fleet, "dev-a"), device(fleet, "dev-c")
    try:
        a.subscribe(TOPICS.device("dev-a", Channel.CMD))
        c.subscribe(TOPICS.device("dev-c", Channel.CMD))
        ma, mc = marker(), marker()
        a.publish(TOPICS.device("dev-a", Channel.EVENTS), ma)
        c.publish(TOPICS.device("dev-c", Channel.ACK), mc)
        got = ctl.received(until=ma) + ctl.received(until=mc)
        assert (TOPICS.device("dev-a", Channel.EVENTS), ma) in got
        assert (TOPICS.device("dev-c", Channel.ACK), mc) in got
        ca_, cc = marker(), marker()
        ctl.publish(TOPICS.device("dev-a", Channel.CMD), ca_)
        ctl.publish(TOPICS.device("dev-c", Channel.CMD), cc)
        assert a.received(until=ca_)[-1] == (TOPICS.device("dev-a", Channel.CMD), ca_)
        assert c.received(until=cc)[-1] == (TOPICS.device("dev-c", Channel.CMD), cc)
    finally:
        for x in (ctl, a, c):
            x.close()


def test_a_client_without_credentials_is_refused(fleet, tmp_path):
    # no client certificate on the certificate listener: the TLS handshake fails
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = Client(fleet, identity=None)
        try:
            c.connect()
        finally:
            c.c.loop_stop()
    # no username on the password listener
    c = Client(fleet, identity=None, port=fleet.password_port)
    assert c.connect().is_failure
    # a wrong password
    c = Client(fleet, identity="dev-c", password="wrong", port=fleet.password_port)
    assert c.connect().is_failure
    # a device with a certificate only has no password: claiming its name on the password listener fails
    c = Client(fleet, identity="dev-a", password="", port=fleet.password_port)
    assert c.connect().is_failure


def test_a_certificate_from_another_ca_is_refused(fleet, tmp_path):
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    cert, key = rogue.issue(CONTROLLER_IDENTITY)
    (tmp_path / "c.crt").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(key)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = Client(fleet, identity=CONTROLLER_IDENTITY, cert=(tmp_path / "c.crt", tmp_path / "c.key"))
        try:
            c.connect()
        finally:
            c.c.loop_stop()


def test_enrolment_directory_is_private_and_loads_as_agent_settings(fleet):
    from agent.config import load_settings

    d = fleet.devices["dev-a"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o755  # the public files stay readable by the agent's DynamicUser
    for name in ("device.key", "agent.toml"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    settings = load_settings(d / "agent.toml")
    assert settings.device_id == "dev-a"
    assert settings.broker.tls and settings.broker.cert_file == d.resolve() / "device.crt"
    assert [p.name for p in settings.trusted_keys] == ["test.pub"]
    settings_c = load_settings(fleet.devices["dev-c"] / "agent.toml")
    assert settings_c.broker.username == "dev-c" and settings_c.broker.password.get_secret_value() == fleet.passwords["dev-c"]
    assert stat.S_IMODE((fleet.workdir / "passwd").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad, fix", [
    (CONTROLLER_IDENTITY, "invalid device id"),
    ("a/b", "invalid device id"),
    ("+", "invalid device id"),
])
def test_enrol_refuses_names_that_would_widen_the_acl(fleet, keypair, bad, fix):
    with pytest.raises(PkiError, match=fix):
        enroll(bad, ca_dir=fleet.workdir / "ca", out_dir=fleet.workdir / "x", trusted_keys=[keypair[1]],
               broker_url="mqtts://127.0.0.1:8883")


def test_enrol_cli(fleet, keypair, tmp_path):
    runner = CliRunner()
    args = ["device", "enroll", "dev-cli", "--ca-dir", str(fleet.workdir / "ca"), "--trusted-key", str(keypair[1]),
            "--broker", "mqtts://broker.example:8883", "--out", str(tmp_path), "--json"]
    r = runner.invoke(fleet_cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert Path(out["certificate"]).is_file() and out["password"] is False
    again = runner.invoke(fleet_cli, args)
    assert again.exit_code == 2 and "was enrolled already" in again.output
    plain = runner.invoke(fleet_cli, args[:-1] + ["--overwrite"])
    assert plain.exit_code == 0
    bad = runner.invoke(fleet_cli, ["device", "enroll", "dev-x", "--ca-dir", str(tmp_path / "nope"), "--trusted-key",
                                     str(keypair[1]), "--broker", "mqtt://broker:1883", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "mqtts://" in bad.output
    ca_dir = tmp_path / "ca2"
    assert runner.invoke(fleet_cli, ["ca", "init", "--dir", str(ca_dir)]).exit_code == 0
    assert runner.invoke(fleet_cli, ["ca", "server-cert", "--dir", str(ca_dir), "broker.example", "10.0.0.5"]).exit_code == 0
    assert runner.invoke(fleet_cli, ["ca", "client-cert", "--dir", str(ca_dir)]).exit_code == 0
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert {p.name for p in ca_dir.iterdir()} == {"ca.key", "ca.crt", "crl.pem", "issued", "server.crt", "server.key",
                                                  "controller.crt", "controller.key"}
    assert len(list((ca_dir / "issued").glob("*.pem"))) == 2  # what a later `device revoke` looks up
    again = runner.invoke(fleet_cli, ["ca", "init", "--dir", str(ca_dir)])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("dev", ["dev-a", "dev-c"])  # certificate listener, password listener
def test_a_device_presenting_another_devices_client_id_cannot_disconnect_it(fleet, dev):
    b = device(fleet, "dev-b", client_id="dev-b")
    b.subscribe(TOPICS.device("dev-b", Channel.CMD))
    a = device(fleet, dev, client_id="dev-b")
    try:
        # mosquitto ends the older of two sessions with one client id at once ("session taken over")
        with pytest.raises(queue.Empty):
            got = b.connack.get(timeout=3)
            pytest.fail(f"dev-b was disconnected (then {got}) when {dev} connected with client id dev-b")
        ctl = controller(fleet)
        end = marker()
        ctl.publish(TOPICS.device("dev-b", Channel.CMD), end)
        ctl.close()
        assert b.received(until=end)[-1] == (TOPICS.device("dev-b", Channel.CMD), end)
    finally:
        a.close()
        b.close()


def _connects(fleet: SecureBroker, directory: Path) -> bool:
    c = Client(fleet, identity=directory.name, cert=(directory / "device.crt", directory / "device.key"))
    try:
        rc = c.connect()
    except (ssl.SSLError, ConnectionError, OSError):
        c.c.loop_stop()
        return False
    c.close()
    return not rc.is_failure


def test_a_revoked_device_is_refused_by_the_broker_after_reload(fleet, keypair):
    doomed = enroll("dev-revoked", ca_dir=fleet.workdir / "ca", out_dir=fleet.workdir / "enrolled",
                    trusted_keys=[keypair[1]], broker_url=f"mqtts://127.0.0.1:{fleet.cert_port}").directory
    assert _connects(fleet, doomed)
    r = CliRunner().invoke(fleet_cli, ["device", "revoke", "dev-revoked", "--ca-dir", str(fleet.workdir / "ca"),
                                       "--no-controller"])
    assert r.exit_code == 0, r.output
    assert "systemctl reload mosquitto" in r.output
    assert _connects(fleet, doomed)  # mosquitto reads crlfile at start and on SIGHUP only (README says so)
    live = Client(fleet, identity="dev-revoked", cert=(doomed / "device.crt", doomed / "device.key"))
    assert not live.connect().is_failure
    fleet.reload()  # returns once mosquitto has handled the SIGHUP
    assert not _connects(fleet, doomed)
    assert _connects(fleet, fleet.devices["dev-a"])  # everyone else still gets in
    assert _connects(fleet, fleet.devices["dev-b"])
    # the CRL is checked at the TLS handshake: a connection open before the reload stays (README says so)
    assert live.c.is_connected()
    live.close()


def test_revoking_an_unknown_device_is_one_line_and_fails(fleet):
    crl = (fleet.workdir / "ca" / "crl.pem").read_bytes()
    r = CliRunner().invoke(fleet_cli, ["device", "revoke", "dev-never", "--ca-dir", str(fleet.workdir / "ca"),
                                       "--no-controller"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"error: the CA in {fleet.workdir / 'ca'} issued no certificate to 'dev-never'; "
        f"check the id (issued certificates are in {fleet.workdir / 'ca' / 'issued'})"]
    assert (fleet.workdir / "ca" / "crl.pem").read_bytes() == crl


def test_the_controller_logs_in_with_its_client_certificate(fleet):
    from fleet.config import FleetSettings
    from fleet.mqtt import ControllerLink

    settings = FleetSettings.load(mqtt_url=f"mqtts://127.0.0.1:{fleet.cert_port}", mqtt_ca_file=fleet.ca_file,
                                  mqtt_cert_file=fleet.workdir / "controller.crt",
                                  mqtt_key_file=fleet.workdir / "controller.key",
                                  mqtt_client_id=f"ctl-{uuid.uuid4().hex[:6]}")
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    link = ControllerLink.from_settings(settings, deliver=lambda topic, payload: got.put((topic, payload)))
    link.start(timeout=10)
    try:
        assert link.connected.is_set()
        d = device(fleet, "dev-a")
        end = marker()
        d.publish(TOPICS.device("dev-a", Channel.HEALTH), end)  # the ACL lets fleet@controller read it
        d.close()
        while got.get(timeout=10) != (TOPICS.device("dev-a", Channel.HEALTH), end):
            pass
    finally:
        link.stop()


@pytest.mark.parametrize("overrides, fix", [
    ({"mqtt_cert_file": "controller.crt"}, "mqtt_cert_file and mqtt_key_file go together"),
    ({"mqtt_cert_file": "controller.crt", "mqtt_key_file": "controller.key", "mqtt_url": "mqtt://127.0.0.1:1883"},
     "a client certificate needs TLS"),
    ({"mqtt_cert_file": "missing.crt", "mqtt_key_file": "controller.key"}, "no such file"),
])
def test_controller_certificate_settings_say_what_is_wrong(fleet, overrides, fix):
    from fleet.config import FleetSettings
    from fleet.errors import ConfigError

    values = {"mqtt_url": f"mqtts://127.0.0.1:{fleet.cert_port}"}
    values.update({k: (v if k == "mqtt_url" else fleet.workdir / v) for k, v in overrides.items()})
    with pytest.raises(ConfigError, match=fix):
        FleetSettings.load(**values)


def test_revoke_a_password_device_and_a_certificate_from_before_the_index(tmp_path, keypair):
    from cryptography import x509

    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    (ca_dir / "crl.pem").unlink()  # a CA made before revocation existed
    r = runner.invoke(fleet_cli, ["ca", "crl", "--dir", str(ca_dir)])
    assert r.exit_code == 0 and "0 revoked" in r.output and (ca_dir / "crl.pem").is_file()
    e = enroll("dev-old", ca_dir=ca_dir, out_dir=tmp_path / "enrolled", trusted_keys=[keypair[1]],
               broker_url="mqtts://127.0.0.1:8884", password_file=tmp_path / "passwd")
    shutil.rmtree(ca_dir / "issued")  # issued before the CA kept issued/
    revoke = ["device", "revoke", "dev-old", "--ca-dir", str(ca_dir), "--password-file", str(tmp_path / "passwd"),
              "--no-controller"]
    r = runner.invoke(fleet_cli, revoke)
    assert r.exit_code == 2 and "issued no certificate to 'dev-old'" in r.output
    assert "dev-old:" in (tmp_path / "passwd").read_text()  # nothing half-done
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    (tmp_path / "rogue.crt").write_bytes(rogue.issue("dev-old")[0])
    r = runner.invoke(fleet_cli, [*revoke, "--cert", str(tmp_path / "rogue.crt")])
    assert r.exit_code == 2 and "is not 'dev-old' signed by this CA" in r.output
    r = runner.invoke(fleet_cli, [*revoke, "--cert", str(e.certificate), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    serial = x509.load_pem_x509_certificate(e.certificate.read_bytes()).serial_number
    assert out["serials"] == [f"{serial:x}"] and out["password_removed"] is True
    assert "dev-old:" not in (tmp_path / "passwd").read_text()
    assert serial in CertificateAuthority.load(ca_dir).revoked()
