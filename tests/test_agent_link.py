"""MqttLink against a real mosquitto: birth, commands, rejects, buffering across a broker restart."""

from __future__ import annotations

import json
import queue
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import BrokerSettings
from agent.link import Backoff, MqttLink, recover_command_id
from agent.protocol import (
    AckMessage,
    Channel,
    DeployCommand,
    EventMessage,
    HealthMessage,
    ReportCommand,
    StateMessage,
    Topics,
    UpdateState,
    encode,
    parse_device_message,
)
from tests.support.broker import Broker, free_port, mosquitto_binary
from tests.support.update_harness import deadline_in

SHA = "ab" * 32


class Watcher:
    """A controller-side client that records everything under a prefix."""

    def __init__(self, port: int, prefix: str, *, client_id: str | None = None):
        """With a `client_id` the session is persistent: what arrives while it is away waits for it."""
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"w-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=client_id is None)
        subscribed = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), m.retain))
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.get(timeout=10)

    def next(self, channel: Channel | None = None, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            topic, payload, retain = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if channel is None or topic.endswith("/" + channel.value):
                return topic, json.loads(payload), retain

    def quiet(self, channel: Channel, seconds: float) -> list:
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                topic, payload, _ = self.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if topic.endswith("/" + channel.value):
                got.append(json.loads(payload))
        return got

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """An MqttLink with its commands and connect events collected into queues."""

    def __init__(self, port: int, prefix: str, device_id: str | None = None, **broker):
        self.commands: queue.Queue = queue.Queue()
        self.connects: queue.Queue = queue.Queue()
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        settings = BrokerSettings(url=f"mqtt://127.0.0.1:{port}", topic_prefix=prefix, **broker)
        self.link = MqttLink(settings, device_id=self.device_id, on_command=self.commands.put,
                             on_connected=lambda: self.connects.put(True))

    def state(self, **kw) -> StateMessage:
        return StateMessage(device_id=self.device_id, session="x", seq=0, agent_version="0.1.0", **kw)

    def event(self, state: UpdateState, n: int = 0) -> EventMessage:
        return EventMessage(device_id=self.device_id, session="x", seq=0, command_id=f"c{n}", state=state)

    def health(self) -> HealthMessage:
        return HealthMessage(device_id=self.device_id, session="x", seq=0)


def restartable_broker() -> Broker:
    """A broker of a test's own that keeps sessions across a restart (mosquitto persistence).

    A controller-side Watcher with a fixed client id then receives everything the device sent
    after the restart, however quickly the device reconnects: no race with the device's backoff.
    """
    if mosquitto_binary() is None:
        pytest.fail("this test needs mosquitto (apt-get install mosquitto): amqtt keeps no sessions across restarts")
    workdir = Path(tempfile.mkdtemp(prefix="edgeship-broker-"))
    workdir.chmod(0o777)  # mosquitto started as root drops to its own user, which must write the db here
    port = free_port()
    conf = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nlog_dest file {workdir / 'mosquitto.log'}\n")
    return Broker(port=port, kind="mosquitto", workdir=workdir, extra_config=conf).start()


def command(device_id: str, cid: str = "cmd-1", **kw) -> bytes:
    body = {"v": 1, "type": "command", "kind": "deploy", "id": cid, "device_id": device_id, "rollout_id": "r1",
            "bundle": {"name": "m", "version": "1.0.0", "manifest_sha256": SHA}, "urls": ["http://127.0.0.1/x.tar"],
            "deadline": deadline_in().isoformat()}
    body.update(kw)
    return json.dumps(body).encode()


# ---- pure parts --------------------------------------------------------------------------------


def test_backoff_is_jittered_exponential_and_capped():
    b = Backoff(min_s=1.0, max_s=8.0, rng=lambda: 1.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0
    low = Backoff(min_s=1.0, max_s=8.0, rng=lambda: 0.0)
    assert {low.next() for _ in range(5)} == {1.0}  # never below the minimum
    real = Backoff(min_s=0.5, max_s=30.0)
    waits = [real.next() for _ in range(20)]
    assert all(0.5 <= w <= 30.0 for w in waits) and len(set(waits)) > 10


@pytest.mark.parametrize("payload, expected", [
    (b'{"v": 1, "id": "abc-1", "kind": "nope"}', "abc-1"),
    (b'{"v": 99, "id": "x:y"}', "x:y"),
    (b'{"id": "bad id with spaces"}', None),
    (b'{"id": 5}', None),
    (b'\xff\xfe{"id": "raw-1"', "raw-1"),  # not JSON, but an id is readable
    (b'[1, 2]', None),
    (b'', None),
    (b'{"id": "' + b"a" * 65 + b'"}', None),
])
def test_recover_command_id(payload, expected):
    assert recover_command_id(payload) == expected


# ---- against mosquitto ---------------------------------------------------------------------------


def test_birth_state_is_retained_and_stamped(broker, topic_prefix):
    dev = Device(broker.port, topic_prefix)
    dev.link.start()
    try:
        assert dev.connects.get(timeout=10)
        early = Watcher(broker.port, topic_prefix)
        dev.link.publish(dev.state(labels={"site": "a"}))
        dev.link.publish(dev.health())
        early.next(Channel.STATE)  # the broker has it (publish is asynchronous: subscribing too soon sees it live)
        early.close()
        late = Watcher(broker.port, topic_prefix)  # subscribes after: sees the retained state
        topic, body, retain = late.next(Channel.STATE)
        assert retain and topic == Topics(topic_prefix).device(dev.device_id, Channel.STATE)
        msg = parse_device_message(json.dumps(body), channel=Channel.STATE, device_id=dev.device_id)
        assert msg.labels == {"site": "a"} and msg.session == dev.link.session and msg.seq == 1
        late.close()
    finally:
        dev.link.stop()


def test_commands_reach_the_owner_and_bad_ones_are_rejected(broker, topic_prefix):
    dev = Device(broker.port, topic_prefix)
    w = Watcher(broker.port, topic_prefix)
    dev.link.start()
    cmd_topic = dev.link.topic(Channel.CMD)
    try:
        dev.connects.get(timeout=10)
        w.send(cmd_topic, command(dev.device_id, "good-1"))
        got = dev.commands.get(timeout=10)
        assert isinstance(got, DeployCommand) and got.id == "good-1" and got.bundle.manifest_sha256 == SHA
        w.send(cmd_topic, json.dumps({"v": 1, "type": "command", "kind": "report", "id": "r-1",
                                      "device_id": dev.device_id}).encode())
        assert isinstance(dev.commands.get(timeout=10), ReportCommand)

        w.send(cmd_topic, command(dev.device_id, "bad-1", urls=["ftp://x"]))  # invalid -> rejected ack
        _, ack, _ = w.next(Channel.ACK)
        assert (ack["command_id"], ack["accepted"], ack["code"]) == ("bad-1", False, "invalid")
        w.send(cmd_topic, command("someone-else", "other-1"))
        _, ack, _ = w.next(Channel.ACK)
        assert (ack["command_id"], ack["code"]) == ("other-1", "wrong_device")
        w.send(cmd_topic, b'{"v": 1, "type": "command", "id": "big-1", "pad": "' + b"x" * 70_000 + b'"}')
        _, ack, _ = w.next(Channel.ACK)
        assert (ack["command_id"], ack["code"]) == ("big-1", "too_large")
        w.send(cmd_topic, b"\x00garbage without an id")
        assert w.quiet(Channel.ACK, 0.5) == []  # nothing to answer: logged only
        assert dev.commands.empty()
        seqs = [m["seq"] for m in (ack,)]
        assert seqs[0] >= 3  # every message of the session got its own seq
    finally:
        dev.link.stop()
        w.close()


def test_commands_sent_while_offline_arrive_after_reconnect(broker, topic_prefix):
    """Persistent session (clean_session=False, client id = device id): QoS 1 commands wait for us."""
    dev = Device(broker.port, topic_prefix)
    dev.link.start()
    dev.connects.get(timeout=10)
    dev.link.stop()
    w = Watcher(broker.port, topic_prefix)
    w.send(dev.link.topic(Channel.CMD), command(dev.device_id, "while-away"))
    again = Device(broker.port, topic_prefix, device_id=dev.device_id)
    again.link.start()
    try:
        assert again.commands.get(timeout=10).id == "while-away"
    finally:
        again.link.stop()
        w.close()


def test_messages_leave_in_seq_order_whichever_thread_sends(broker, topic_prefix):
    """Receivers drop a seq that is not newer than the last: concurrent senders must not reorder."""
    import threading

    dev = Device(broker.port, topic_prefix)
    w = Watcher(broker.port, topic_prefix)
    dev.link.start()
    try:
        dev.connects.get(timeout=10)
        per_thread = 150

        def burst(k: int) -> None:
            for n in range(per_thread):
                dev.link.publish(dev.event(UpdateState.DOWNLOADING, k * 1000 + n))

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seqs = [w.next(Channel.EVENTS)[1]["seq"] for _ in range(4 * per_thread)]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        dev.link.stop()
        w.close()


def test_clean_stop_publishes_retained_offline(broker, topic_prefix):
    dev = Device(broker.port, topic_prefix)
    dev.link.start()
    dev.connects.get(timeout=10)
    dev.link.publish(dev.state())
    assert dev.link.stop() is True
    w = Watcher(broker.port, topic_prefix)
    _, body, retain = w.next(Channel.STATE)
    assert retain and body["type"] == "offline" and body["reason"] == "shutdown" and body["session"] == dev.link.session
    w.close()


def test_buffered_events_are_sent_in_order_after_the_broker_restarts(topic_prefix):
    own = restartable_broker()  # a broker of its own: this test stops it
    dev = Device(own.port, topic_prefix, reconnect_min_s=0.2, reconnect_max_s=1.0, buffer_size=4)
    controller_id = f"ctl-{uuid.uuid4().hex[:8]}"
    Watcher(own.port, topic_prefix, client_id=controller_id).close()  # its session now waits on the broker
    dev.link.start()
    try:
        dev.connects.get(timeout=10)
        own.stop()
        deadline = time.monotonic() + 10
        while dev.link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dev.link.connected
        states = [UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGING, UpdateState.SMOKE_TESTING,
                  UpdateState.SWITCHING, UpdateState.WATCHING]
        for n, st in enumerate(states):
            dev.link.publish(dev.event(st, n))
            dev.link.publish(dev.health())  # heartbeats while offline are not kept
        dev.link.publish(AckMessage(device_id=dev.device_id, session="x", seq=0, command_id="c9", accepted=True))
        assert dev.link.buffered == 4 and dev.link.dropped == 3  # bounded: the oldest went first
        own.start()
        dev.connects.get(timeout=15)
        w = Watcher(own.port, topic_prefix, client_id=controller_id)  # gets what was queued for it
        got = []
        while len(got) < 4:  # the state topic may carry the Last Will of the connection the restart cut
            topic, body, _ = w.next()
            if not topic.endswith("/state"):
                got.append(body)
        assert [(m["type"], m.get("state") or m.get("command_id")) for m in got] == [
            ("event", "smoke_testing"), ("event", "switching"), ("event", "watching"), ("ack", "c9")]
        seqs = [m["seq"] for m in got]
        assert seqs == sorted(seqs)
        assert w.quiet(Channel.HEALTH, 0.5) == []
        dev.link.publish(dev.state())  # what the service does on the connect event
        body = w.next(Channel.STATE)[1]
        while body["type"] != "state":
            body = w.next(Channel.STATE)[1]
        assert body["seq"] > seqs[-1]
        w.close()
    finally:
        dev.link.stop()
        own.stop()


def test_heartbeat_is_small(broker, topic_prefix):
    from agent.protocol import BundleRef, InferenceStats

    dev = Device(broker.port, topic_prefix, device_id="d" * 128)
    big = HealthMessage(device_id=dev.device_id, session="s" * 16, seq=10**9, uptime_s=10**7, cpu_percent=99.9,
                        rss_bytes=2**40, mem_available_bytes=2**40, disk_free_bytes=2**50, temperature_c=85.5,
                        active=BundleRef(name="n" * 64, version="v" * 64, manifest_sha256=SHA),
                        update_state=UpdateState.SMOKE_TESTING,
                        inference=InferenceStats(requests=10**9, errors=10**9, p50_ms=123456.789, p95_ms=123456.789,
                                                 prefill_tok_s=12345.6789, decode_tok_s=12345.6789, queue_depth=10**4))
    assert len(encode(dev.link.stamp(big))) < 1024


# ---- TLS, mTLS and passwords: the production broker example with enrolled devices ---------------------

from tests.test_broker_security import controller, fleet  # noqa: E402,F401  (the secure broker fixture)


@pytest.mark.parametrize("dev", ["dev-a", "dev-c"], ids=["mtls-certificate", "tls-password"])
def test_enrolled_device_talks_over_tls(fleet, dev):  # noqa: F811
    """The agent.toml `edgeship fleet device enroll` writes is all MqttLink needs; the ACL lets it
    publish its state and receive its own commands."""
    from agent.config import load_settings

    settings = load_settings(fleet.devices[dev] / "agent.toml")
    assert settings.broker.tls and settings.device_id == dev
    ctl = controller(fleet)
    commands: queue.Queue = queue.Queue()
    connected: queue.Queue = queue.Queue()
    link = MqttLink(settings.broker, device_id=dev, on_command=commands.put, on_connected=lambda: connected.put(1))
    link.start()
    try:
        connected.get(timeout=15)
        link.publish(StateMessage(device_id=dev, session="x", seq=0, agent_version="0.1.0"))
        want = Topics("edgeship").device(dev, Channel.STATE)
        while True:  # skip what other devices left retained
            topic, payload = ctl.messages.get(timeout=10)
            if topic == want and json.loads(payload)["type"] == "state":
                break
        ctl.publish(Topics("edgeship").device(dev, Channel.CMD), command(dev, "tls-1"))
        assert commands.get(timeout=10).id == "tls-1"
    finally:
        assert link.stop() is True  # the offline state went out over TLS too
        ctl.close()


def test_wrong_password_keeps_retrying_without_crashing(fleet):  # noqa: F811
    from agent.config import load_settings

    settings = load_settings(fleet.devices["dev-c"] / "agent.toml")
    from pydantic import SecretStr

    bad = settings.broker.model_copy(update={"password": SecretStr("wrong"), "reconnect_min_s": 0.2,
                                             "reconnect_max_s": 0.5})
    link = MqttLink(bad, device_id="dev-c", on_command=lambda c: None, on_connected=lambda: None)
    link.start()
    try:
        deadline = time.monotonic() + 10
        while link.refusals < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link.refusals >= 2 and not link.connected and link.connects == 0  # refused, and still trying
    finally:
        link.stop()
