"""The wire contract: topics, message round trips, and total parsers under hypothesis."""

from __future__ import annotations

import json
import queue
from datetime import datetime, timezone
import uuid

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import (
    MAX_PAYLOAD_BYTES,
    AckMessage,
    BundleRef,
    CancelCommand,
    Channel,
    DeployCommand,
    DeviceFacts,
    EventMessage,
    HealthMessage,
    InferenceStats,
    OfflineMessage,
    ProtocolError,
    ReportCommand,
    RollbackCommand,
    StateMessage,
    Topics,
    UpdateState,
    WatchPolicy,
    encode,
    parse_command,
    parse_device_message,
)

REF = BundleRef(name="smollm2", version="1.2.0", manifest_sha256="a" * 64)

DEVICE_MESSAGES = [
    StateMessage(device_id="dev-1", session="s1", seq=0, agent_version="0.1.0", active=REF,
                 facts=DeviceFacts(arch="x86_64", cores=2, cpu_features=["avx2"], execution_providers=["CPUExecutionProvider"]),
                 labels={"site": "plant-a"}),
    OfflineMessage(device_id="dev-1", session="s1"),
    HealthMessage(device_id="dev-1", session="s1", seq=5, uptime_s=12.5, cpu_percent=40.0, rss_bytes=50_000_000,
                  active=REF, inference=InferenceStats(requests=10, errors=1, p50_ms=20.0, p95_ms=80.5,
                                                       prefill_tok_s=140.0, decode_tok_s=30.2, queue_depth=1)),
    AckMessage(device_id="dev-1", session="s1", seq=6, command_id="c1", accepted=False, code="downgrade_refused",
               reason="1.0.0 is older than committed 1.2.0"),
    EventMessage(device_id="dev-1", session="s1", seq=7, command_id="c1", rollout_id="r1",
                 state=UpdateState.DOWNLOADING, bundle=REF, bytes_done=10, bytes_total=100),
]
COMMANDS = [
    DeployCommand(id="r1.dev-1.deploy", device_id="dev-1", rollout_id="r1", bundle=REF,
                  urls=["http://127.0.0.1:8080/bundles/" + "a" * 64 + ".tar"], size=1234,
                  deadline=datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc), replaces=["smollm2-old"],
                  watch=WatchPolicy(window_s=60, min_judged_requests=20, max_error_rate_increase=0.02)),
    RollbackCommand(id="c2", device_id="dev-1", rollout_id="r1"),
    CancelCommand(id="c3", device_id="dev-1"),
    ReportCommand(id="c4", device_id="dev-1"),
]


@pytest.mark.parametrize("msg", DEVICE_MESSAGES, ids=lambda m: m.type)
def test_device_messages_round_trip(msg):
    assert parse_device_message(encode(msg)) == msg


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.kind)
def test_commands_round_trip(cmd):
    assert parse_command(encode(cmd)) == cmd


def test_heartbeat_is_small():
    hb = DEVICE_MESSAGES[2]
    assert len(encode(hb)) < 1024


def test_unknown_fields_ignored_unknown_version_and_type_refused():
    data = json.loads(encode(DEVICE_MESSAGES[2]))
    data["from_the_future"] = {"x": 1}
    assert parse_device_message(json.dumps(data)).seq == 5
    data["v"] = 2
    with pytest.raises(ProtocolError) as e:
        parse_device_message(json.dumps(data))
    assert e.value.code == "unsupported_version"
    data["v"], data["type"] = 1, "selfdestruct"
    with pytest.raises(ProtocolError) as e:
        parse_device_message(json.dumps(data))
    assert e.value.code == "unknown_type"


def test_channel_and_spoofing_checks():
    health = encode(DEVICE_MESSAGES[2])
    with pytest.raises(ProtocolError) as e:
        parse_device_message(health, channel=Channel.STATE)
    assert e.value.code == "wrong_channel"
    with pytest.raises(ProtocolError) as e:
        parse_device_message(health, channel=Channel.HEALTH, device_id="dev-2")
    assert e.value.code == "spoofed"


def test_oversized_payload():
    with pytest.raises(ProtocolError) as e:
        parse_command(b"{" + b" " * MAX_PAYLOAD_BYTES + b"}")
    assert e.value.code == "too_large"


def test_deploy_rejects_non_http_urls():
    data = json.loads(encode(COMMANDS[0]))
    data["urls"] = ["file:///etc/shadow"]
    with pytest.raises(ProtocolError, match="http"):
        parse_command(json.dumps(data))


def test_topics():
    t = Topics("acme/prod")
    topic = t.device("gw-7", Channel.CMD)
    assert topic == "acme/prod/v1/devices/gw-7/cmd"
    assert t.parse(topic) == ("gw-7", Channel.CMD)
    assert t.parse("acme/prod/v1/devices/gw-7/cmd/extra") is None
    assert t.parse("other/v1/devices/gw-7/cmd") is None
    assert t.all_devices(Channel.STATE) == "acme/prod/v1/devices/+/state"
    for bad in ["a/b", "+", "#", "", "x" * 200]:
        with pytest.raises(ValueError, match="device id"):
            t.device(bad, Channel.STATE)
    with pytest.raises(ValueError, match="prefix"):
        Topics("bad/+/prefix")


# ---- hypothesis: no payload crashes a parser -------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _total(parser, payload) -> None:
    try:
        parser(payload)
    except ProtocolError as e:
        assert e.code and str(e)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(payload):
    _total(parse_command, payload)
    _total(parse_device_message, payload)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(DEVICE_MESSAGES + COMMANDS), st.text(min_size=1, max_size=16), json_values)
def test_mutated_messages_never_crash(msg, key, value):
    data = json.loads(encode(msg))
    # Replace an existing field (or add a new one) with an arbitrary JSON value.
    keys = list(data)
    target = keys[hash(key) % len(keys)] if key.startswith(("_", "a", "b", "c")) else key
    data[target] = value
    payload = json.dumps(data).encode()
    for parser in (parse_command, lambda p: parse_device_message(p, channel=Channel.HEALTH, device_id="dev-1")):
        _total(parser, payload)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(DEVICE_MESSAGES + COMMANDS), st.integers(min_value=0), st.integers(0, 255))
def test_byte_flipped_messages_never_crash(msg, pos, byte):
    raw = bytearray(encode(msg))
    raw[pos % len(raw)] = byte
    _total(parse_command, bytes(raw))
    _total(parse_device_message, bytes(raw))


def test_deeply_nested_json_is_a_protocol_error():
    payload = b'{"v":1,"type":"ack","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    _total(parse_device_message, payload)


# ---- over a real broker -------------------------------------------------------------------------


def test_retained_state_and_last_will_over_real_broker(broker, topic_prefix):
    """Birth state is retained; the Last Will replaces it when the device vanishes."""
    topics = Topics(topic_prefix)
    state_topic = topics.device("dev-1", Channel.STATE)
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-1-{uuid.uuid4().hex[:6]}")
    dev.will_set(state_topic, encode(OfflineMessage(device_id="dev-1", session="s1")), qos=1, retain=True)
    dev.connect("127.0.0.1", broker.port)
    dev.loop_start()
    dev.publish(state_topic, encode(DEVICE_MESSAGES[0]), qos=1, retain=True).wait_for_publish(5)

    got: queue.Queue = queue.Queue()
    ctl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    ctl.on_message = lambda c, u, m: got.put((m.topic, parse_device_message(m.payload, channel=topics.parse(m.topic)[1])))
    ctl.connect("127.0.0.1", broker.port)
    ctl.subscribe(topics.all_devices(Channel.STATE), qos=1)
    ctl.loop_start()
    try:
        topic, msg = got.get(timeout=5)
        assert topic == state_topic and msg.type == "state" and msg.active == REF  # retained, no heartbeat needed
        dev._sock.close()  # vanish without DISCONNECT: the broker sends the will
        topic, msg = got.get(timeout=10)
        assert msg.type == "offline" and msg.reason == "lwt"
    finally:
        dev.loop_stop()
        ctl.publish(state_topic, b"", retain=True).wait_for_publish(5)
        ctl.loop_stop()
        ctl.disconnect()


def test_a_deploy_without_a_deadline_is_refused_with_its_own_code():
    data = json.loads(encode(COMMANDS[0]))
    del data["deadline"]
    with pytest.raises(ProtocolError, match="no 'deadline'") as e:
        parse_command(json.dumps(data))
    assert e.value.code == "deadline_missing"
    data.pop("urls")
    with pytest.raises(ProtocolError) as e:  # more than the deadline wrong: the general code
        parse_command(json.dumps(data))
    assert e.value.code == "invalid"


def test_the_deploy_carries_the_watch_margin_and_replaces_and_an_old_watch_keeps_its_meaning():
    data = json.loads(encode(COMMANDS[0]))
    assert data["watch"] == {"window_s": 60.0, "min_requests": 0, "min_judged_requests": 20,
                             "max_error_rate_increase": 0.02, "max_p95_ratio": 2.0}
    assert data["replaces"] == ["smollm2-old"]
    data["watch"] = {"window_s": 30, "max_error_rate": 0.1}  # a v1 controller before the margin existed
    old = parse_command(json.dumps(data)).watch
    assert (old.max_error_rate, old.max_error_rate_increase) == (0.1, None)
    data["watch"] = {"window_s": 30}
    assert parse_command(json.dumps(data)).watch.max_error_rate == 0.05  # the documented v1 default
