"""MqttLink: the agent's connection to the fleet (paho-mqtt 2.x, MQTT 3.1.1 so any broker works).

    owner thread (AgentService)                 paho network thread (loop_start)
    ───────────────────────────                 ────────────────────────────────
    publish(msg)  ── stamps session/seq ──▶  connected: straight to paho
                                           offline: bounded buffer (acks, events)
    on_command(cmd) ◀── parse_command ─────  on_message (never raises; bad ones get a rejected ack)
    on_connected()  ◀── after SUBACK ──────  flushes the buffer in order, then tells the owner,
                                             who publishes the fresh retained state

Session choices, and why:
- client id = device id and clean_session=False: the broker keeps our cmd subscription and queues
  QoS 1 commands sent while the device was briefly offline, and delivers them on reconnect.
  (A duplicate delivery is answered with `duplicate: true` by the update manager.)
- Last Will = OfflineMessage(reason="lwt"), QoS 1, retained on the state topic: the retained
  state says "offline" the moment the broker loses us; a clean stop publishes reason="shutdown".
- Reconnect: paho's loop, but every wait is ours: full-jitter exponential backoff (Backoff), so a
  fleet that lost its broker does not reconnect in lockstep.
- The buffer is flushed from on_subscribe (after the SUBACK), not on_connect: paho re-sends its own
  unacknowledged QoS 1 messages right after on_connect returns, and those are older than ours.
- Heartbeats (QoS 0) are never buffered: a stale heartbeat is noise. Retained state snapshots are
  not buffered either: a fresh state is published on every reconnect and supersedes them.

Errors: LinkError(RuntimeError) — the broker settings cannot be used (e.g. TLS files unreadable).
"""

from __future__ import annotations

import json
import logging
import random
import re
import ssl
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from agent.config import BrokerSettings
from agent.protocol import (
    AckMessage,
    Channel,
    EventMessage,
    HealthMessage,
    OfflineMessage,
    ProtocolError,
    StateMessage,
    Topics,
    encode,
    parse_command,
)

log = logging.getLogger("edgeship.agent.link")

_ID_RE = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9._:-]{1,64})"')


class LinkError(RuntimeError):
    """The broker settings cannot be used as given."""


class Backoff:
    """Full-jitter exponential backoff: the n-th wait is uniform in [min, min(max, min * 2**n)]."""

    def __init__(self, *, min_s: float, max_s: float, rng: Callable[[], float] = random.random):
        self.min_s, self.max_s, self._rng, self._n = min_s, max_s, rng, 0

    def next(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(self._n, 30)))
        self._n += 1
        return self.min_s + (cap - self.min_s) * self._rng()

    def reset(self) -> None:
        self._n = 0


def recover_command_id(payload: bytes) -> str | None:
    """The `id` of a command that failed to parse, if one can be read, else None. Never raises."""
    try:
        if len(payload) <= 1 << 20:
            data = json.loads(payload)
            cid = data.get("id") if isinstance(data, dict) else None
            if isinstance(cid, str) and _ID_RE.fullmatch(f'"id":"{cid}"'.encode()):
                return cid
    except Exception:  # any bytes at all may arrive here
        pass
    match = _ID_RE.search(bytes(payload[:4096]))
    return match.group(1).decode() if match else None


@dataclass(frozen=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool


_CHANNEL = {
    StateMessage: Channel.STATE,
    OfflineMessage: Channel.STATE,
    HealthMessage: Channel.HEALTH,
    AckMessage: Channel.ACK,
    EventMessage: Channel.EVENTS,
}


class MqttLink:
    """One device's MQTT session; thread-safe `publish`, commands handed to `on_command`."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        device_id: str,
        on_command: Callable[[Any], None],
        on_connected: Callable[[], None],
        session: str | None = None,
    ):
        self.settings = settings
        self.device_id = device_id
        self.session = session or uuid.uuid4().hex[:16]
        self.topics = Topics(settings.topic_prefix)
        self._on_command = on_command
        self._on_connected = on_connected
        self._lock = threading.Lock()
        self._seq = 0
        self._connected = False
        self._buffer: deque[_Out] = deque()
        self.dropped = 0  # buffered messages lost to the bound
        self.connects = 0
        self.refusals = 0  # CONNACKs that said no (bad credentials, not authorised)
        self._backoff = Backoff(min_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s)
        self._said_offline = False  # one log line per change of connection state, not one per attempt
        self._client = self._make_client()

    # ---- set-up -------------------------------------------------------------------------------

    def topic(self, channel: Channel) -> str:
        return self.topics.device(self.device_id, channel)

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=True,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls:
            try:
                client.tls_set(
                    ca_certs=str(s.ca_file) if s.ca_file else None,
                    certfile=str(s.cert_file) if s.cert_file else None,
                    keyfile=str(s.key_file) if s.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:
                raise LinkError(f"cannot use the broker TLS files ({exc}); check broker.ca_file/cert_file/key_file") from None
        will = OfflineMessage(device_id=self.device_id, session=self.session, reason="lwt")
        client.will_set(self.topic(Channel.STATE), encode(will), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_message = self._handle_message
        return client

    def start(self) -> None:
        """Connect in the background; the agent serves inference whether or not this succeeds."""
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self._client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # ---- publishing (any thread) --------------------------------------------------------------

    def stamp(self, msg: BaseModel) -> BaseModel:
        """The message with this session and the next seq (OfflineMessage has no seq)."""
        with self._lock:
            return self._stamp(msg)

    def _stamp(self, msg: BaseModel) -> BaseModel:
        if isinstance(msg, OfflineMessage):
            return msg.model_copy(update={"session": self.session})
        self._seq += 1
        return msg.model_copy(update={"session": self.session, "seq": self._seq, "device_id": self.device_id})

    def publish(self, msg: BaseModel) -> BaseModel:
        """Send a device message on its channel; returns it as stamped. Never raises for the network.

        Stamping and queueing happen under one lock, so messages leave in seq order whichever
        thread sends them (receivers drop a seq that is not newer than the last one seen).
        """
        channel = _CHANNEL[type(msg)]
        topic = self.topic(channel)
        with self._lock:
            msg = self._stamp(msg)
            out = _Out(topic, encode(msg), 0 if channel is Channel.HEALTH else 1, channel is Channel.STATE)
            if self._connected:
                info = self._client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
                # NO_CONN: paho keeps a QoS 1 message and re-sends it after the reconnect itself.
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    log.warning("publish on %s failed: %s", out.topic, mqtt.error_string(info.rc))
            elif channel in (Channel.ACK, Channel.EVENTS):
                if len(self._buffer) >= self.settings.buffer_size:
                    self._buffer.popleft()
                    self.dropped += 1
                self._buffer.append(out)
        return msg

    def stop(self, *, reason_shutdown: bool = True, timeout_s: float = 5.0) -> bool:
        """Publish the retained offline state (if connected), disconnect cleanly; True if it got out."""
        sent = False
        if reason_shutdown and self._connected:
            bye = OfflineMessage(device_id=self.device_id, session=self.session, reason="shutdown")
            info = self._client.publish(self.topic(Channel.STATE), encode(bye), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
                sent = info.is_published()
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline state: %s", exc)
        with self._lock:
            self._connected = False
            lost = len(self._buffer)
        if lost:
            log.warning("%d buffered acks/events were not delivered (broker unreachable at shutdown)", lost)
        self._client.disconnect()
        self._client.loop_stop()
        return sent

    # ---- paho callbacks (network thread; none may raise) ---------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refusals += 1
            log.warning("broker %s refused the connection: %s", self.settings.url, reason_code)
            client.reconnect_delay_set(min_delay=self._backoff.next(), max_delay=self.settings.reconnect_max_s)
            return
        self._backoff.reset()
        self.connects += 1
        self._said_offline = False
        log.info("connected to %s (session present: %s)", self.settings.url, flags.session_present)
        # Subscribing again is harmless with a persistent session and needed without one.
        client.subscribe(self.topic(Channel.CMD), qos=1)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused the subscription to %s (ACL?): %s", self.topic(Channel.CMD), reason_codes)
        with self._lock:
            while self._buffer:
                out = self._buffer.popleft()
                client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
            self._connected = True
        try:
            self._on_connected()
        except Exception:
            log.exception("on_connected callback failed")

    def _handle_connect_fail(self, client, userdata) -> None:
        delay = self._backoff.next()
        if not self._said_offline:
            self._said_offline = True
            log.warning("broker %s unreachable; serving anyway, retrying with backoff (up to %.0fs apart)",
                        self.settings.url, self.settings.reconnect_max_s)
        client.reconnect_delay_set(min_delay=delay, max_delay=self.settings.reconnect_max_s)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
        delay = self._backoff.next()
        client.reconnect_delay_set(min_delay=delay, max_delay=self.settings.reconnect_max_s)
        if was:
            self._said_offline = True
            log.warning("lost the broker (%s); serving anyway, reconnecting with backoff", reason_code)

    def _handle_message(self, client, userdata, message) -> None:
        if message.topic != self.topic(Channel.CMD):
            return
        payload = bytes(message.payload)
        try:
            cmd = parse_command(payload)
            if cmd.device_id != self.device_id:
                raise ProtocolError("wrong_device", f"command for device {cmd.device_id!r} arrived on {self.device_id!r}'s topic")
        except ProtocolError as exc:
            self._reject(payload, exc)
            return
        try:
            self._on_command(cmd)
        except Exception:
            log.exception("on_command callback failed for %s", cmd.id)

    def _reject(self, payload: bytes, exc: ProtocolError) -> None:
        cid = recover_command_id(payload)
        if cid is None:
            log.warning("dropped a malformed command without a readable id (%s: %s)", exc.code, exc)
            return
        log.warning("rejected command %s: %s: %s", cid, exc.code, exc)
        ack = AckMessage(device_id=self.device_id, session=self.session, seq=0, command_id=cid,
                         accepted=False, code=exc.code, reason=str(exc)[:2000])
        self.publish(ack)
