"""The controller's MQTT link (paho-mqtt 2.x).

paho calls back on its own network thread; `on_message` only hands the raw message to the
engine (`deliver`, a thread-safe queue put) and never touches state. The session is persistent
(clean_session=False, a fixed client id) so QoS 1 acks and events sent while the controller was
down are delivered when it comes back; retained device states arrive on every subscribe.
Nothing here assumes a single broker node: no $SYS topics, optional shared subscriptions.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import Channel, Topics
from fleet.config import FleetSettings
from fleet.errors import ConfigError

log = logging.getLogger("edgeship.fleet.mqtt")
SUBSCRIBED = (Channel.STATE, Channel.HEALTH, Channel.ACK, Channel.EVENTS)


class ControllerLink:
    def __init__(
        self,
        url: str,
        *,
        topics: Topics,
        deliver: Callable[[str, bytes], None],
        client_id: str = "edgeship-fleet",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        shared_group: str | None = None,
        keepalive: int = 30,
    ):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.topics = topics
        self.deliver = deliver
        self.shared_group = shared_group
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.max_queued_messages_set(0)  # unbounded: commands queue while the broker is away
        self.client.max_inflight_messages_set(100)
        if username:
            self.client.username_pw_set(username, password)
        if parts.scheme == "mqtts":
            try:
                self.client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"MQTT TLS files (ca {ca_file}, cert {cert_file}, key {key_file}) cannot be used: "
                                  f"{exc}; check mqtt_ca_file, mqtt_cert_file and mqtt_key_file") from None
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @classmethod
    def from_settings(cls, settings: FleetSettings, *, deliver: Callable[[str, bytes], None]) -> ControllerLink:
        """The link `settings` describe: broker URL, password or client certificate, CA."""

        def path(p: object) -> str | None:
            return str(p) if p is not None else None

        return cls(settings.mqtt_url, topics=settings.topics, deliver=deliver, client_id=settings.mqtt_client_id,
                   username=settings.mqtt_username,
                   password=settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
                   ca_file=path(settings.mqtt_ca_file), cert_file=path(settings.mqtt_cert_file),
                   key_file=path(settings.mqtt_key_file), shared_group=settings.mqtt_shared_group,
                   keepalive=settings.mqtt_keepalive_s)

    def filters(self) -> list[str]:
        out = []
        for ch in SUBSCRIBED:
            f = self.topics.all_devices(ch)
            # state stays a plain subscription: brokers send no retained messages to shared ones
            out.append(f"$share/{self.shared_group}/{f}" if self.shared_group and ch != Channel.STATE else f)
        return out

    def start(self, timeout: float = 15.0) -> None:
        try:
            self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot use MQTT broker {self.host}:{self.port}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            log.warning("MQTT broker %s:%s not reachable yet; still trying", self.host, self.port)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; paho is thread-safe here and queues while disconnected."""
        self.client.publish(topic, payload, qos=1)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        client.subscribe([(f, 1) for f in self.filters()])
        self.connected.set()
        log.info("MQTT connected to %s:%s (session present: %s)", self.host, self.port, flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        log.warning("MQTT disconnected: %s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        self.deliver(message.topic, message.payload)
