"""The production broker example (configs/mosquitto/) running for a test: our own mosquitto with
the shipped mosquitto.conf and acl (only paths, ports and logging changed), a fleet CA made for
the run, devices enrolled with `fleet.enroll.enroll`, and the controller's credentials.
"""

from __future__ import annotations

import queue
import secrets
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.enroll import enroll
from fleet.pki import CONTROLLER_IDENTITY, CertificateAuthority, set_password
from tests.support.broker import Broker, free_port, mosquitto_binary, start_broker

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "mosquitto"


def render_conf(workdir: Path, cert_port: int, password_port: int) -> str:
    """configs/mosquitto/mosquitto.conf with paths, ports and logging for a test run."""
    text = (EXAMPLE / "mosquitto.conf").read_text()
    swaps = {
        "/etc/mosquitto/edgeship/": f"{workdir}/",
        "/var/lib/mosquitto/": f"{workdir}/",
        "listener 8883\n": f"listener {cert_port} 127.0.0.1\n",
        "listener 8884\n": f"listener {password_port} 127.0.0.1\n",
        "log_dest syslog\n": f"log_dest file {workdir}/mosquitto.log\n",
    }
    for old, new in swaps.items():
        assert old in text, f"configs/mosquitto/mosquitto.conf no longer has {old!r}; update tests/support/secure_broker.py"
        text = text.replace(old, new)
    # As root, mosquitto drops to the 'mosquitto' user, which cannot read a pytest temp dir.
    return text + "user root\n"


@dataclass
class SecureBroker:
    workdir: Path
    cert_port: int  # client certificates (use_identity_as_username)
    password_port: int  # username + password over TLS
    ca: CertificateAuthority
    broker: Broker | None = None
    devices: dict[str, Path] = field(default_factory=dict)  # device id -> enrolment directory
    passwords: dict[str, str] = field(default_factory=dict)  # password-enrolled device -> password

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    def reload(self, timeout: float = 10.0) -> None:
        """What `systemctl reload mosquitto` does: SIGHUP (re-reads the password file and the CRL).

        Returns once the broker has reloaded: mosquitto logs nothing for it, so a fresh user is added
        to the password file first and the reload is done when that user can log in.
        """
        assert self.broker is not None and self.broker.proc is not None
        marker, password = f"reload-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        set_password(self.workdir / "passwd", marker, password)
        self.broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while not self._password_login(marker, password):
            assert time.monotonic() < deadline, f"mosquitto did not reload within {timeout} s of SIGHUP"
            time.sleep(0.05)

    def _password_login(self, username: str, password: str) -> bool:
        got: queue.Queue = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(self.ca_file))
        c.username_pw_set(username, password)
        c.on_connect = lambda client, userdata, flags, rc, props: got.put(not rc.is_failure)
        c.on_disconnect = lambda client, userdata, flags, rc, props: got.put(False)
        try:
            c.connect("127.0.0.1", self.password_port, keepalive=10)
            c.loop_start()
            return got.get(timeout=5)
        except (OSError, queue.Empty):
            return False
        finally:
            c.disconnect()
            c.loop_stop()

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


def start_secure_broker(workdir: Path, trusted_key: Path, *, cert_devices: tuple[str, ...] = ("dev-a", "dev-b"),
                        password_devices: tuple[str, ...] = ("dev-c",)) -> SecureBroker:
    assert mosquitto_binary(), "the secure broker needs the mosquitto binary (apt-get install mosquitto)"
    work = Path(workdir)
    ca = CertificateAuthority.init(work / "ca")
    cert, key = ca.issue("127.0.0.1", server_names=["127.0.0.1", "localhost"])
    (work / "server.crt").write_bytes(cert)
    (work / "server.key").write_bytes(key)
    (work / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    # the broker reads the CRL where `edgeship fleet device revoke --ca-dir ca` writes it
    (work / "crl.pem").symlink_to(ca.crl_path)
    cert, key = ca.issue(CONTROLLER_IDENTITY)
    (work / "controller.crt").write_bytes(cert)
    (work / "controller.key").write_bytes(key)
    (work / "acl").write_text((EXAMPLE / "acl").read_text())
    s = SecureBroker(work, free_port(), free_port(), ca)
    for dev in cert_devices:
        s.devices[dev] = enroll(dev, ca_dir=work / "ca", out_dir=work / "enrolled", trusted_keys=[trusted_key],
                                broker_url=f"mqtts://127.0.0.1:{s.cert_port}").directory
    for dev in password_devices:
        e = enroll(dev, ca_dir=work / "ca", out_dir=work / "enrolled", trusted_keys=[trusted_key],
                   broker_url=f"mqtts://127.0.0.1:{s.password_port}", password_file=work / "passwd")
        s.devices[dev] = e.directory
        s.passwords[dev] = tomllib.loads(e.agent_toml.read_text())["broker"]["password"]
    (work / "passwd").touch(mode=0o600)  # as README.md's setup does: the config names it even if no device uses one
    s.broker = start_broker(extra_config=render_conf(work, s.cert_port, s.password_port), port=s.cert_port)
    return s
