"""The broker harness: our own mosquitto per session, restartable on the same port, and the
embedded amqtt fallback for machines without mosquitto."""

from __future__ import annotations

import queue
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import Broker, free_port, mosquitto_binary


def _roundtrip(port: int, topic: str) -> bytes:
    got: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = lambda cl, u, m: got.put(m.payload)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe(topic, qos=1)
        time.sleep(0.3)
        c.publish(topic, b"ping", qos=1).wait_for_publish(5)
        return got.get(timeout=5)
    finally:
        c.loop_stop()
        c.disconnect()


def test_session_broker_is_mosquitto_and_restarts_on_same_port(broker, topic_prefix):
    if mosquitto_binary():
        assert broker.kind == "mosquitto"
    port = broker.port
    assert _roundtrip(port, f"{topic_prefix}/a") == b"ping"
    broker.restart()
    assert broker.port == port
    assert _roundtrip(port, f"{topic_prefix}/b") == b"ping"


def test_embedded_amqtt_fallback_works(topic_prefix):
    b = Broker(port=free_port(), kind="amqtt", workdir=Path(tempfile.mkdtemp())).start()
    try:
        assert _roundtrip(b.port, f"{topic_prefix}/c") == b"ping"
    finally:
        b.stop()
