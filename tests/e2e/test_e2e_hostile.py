"""A hostile MQTT client on an open broker: garbage, oversized and spoofed messages on the device
and command topics. The controller and the agents reject them, keep running, lose nothing, and
the next rollout goes through. (On a production broker the ACL of configs/mosquitto/ stops most
of this before it is delivered: tests/test_broker_security.py.)"""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.bundle import pack
from agent.protocol import (
    AckMessage,
    BundleRef,
    Channel,
    DeployCommand,
    HealthMessage,
    OfflineMessage,
    StateMessage,
    Topics,
    encode,
)
from tests.e2e.conftest import check_fleet, explain, rollout, wait_for, wait_rollout
from tests.support.bundles import make_bundle
from tests.support.http import FileServer
from tests.support.update_harness import deadline_in

pytestmark = pytest.mark.e2e

GARBAGE = [b"", b"\x00\xff\xfe garbage", b"{", b"[]", b'{"v": 99, "type": "state"}', b'{"v": 1}',
           b"\xed\xa0\x80", json.dumps({"v": 1, "type": "health", "device_id": "x" * 5000}).encode(),
           b"[" * 100_000 + b"]" * 100_000]
OVERSIZED = json.dumps({"v": 1, "type": "health", "device_id": "dev-0", "session": "s", "seq": 1,
                        "pad": "x" * 200_000}).encode()


def _publish_all(url: str, messages: list[tuple[str, bytes, bool]]) -> None:
    port = int(url.rsplit(":", 1)[1])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for topic, payload, retain in messages:
            c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def test_garbage_oversized_and_spoofed_messages_change_nothing(stack, versions, keypair, other_keypair, tmp_path):
    fleet = stack(2)
    client = fleet.client()
    client.push(versions.v1)
    client.push(versions.v2)
    assert wait_rollout(client, rollout(client, "tiny@1.0.0", waves="100%")["id"])["state"] == "completed"
    t = Topics(fleet.topic_prefix)
    v1 = versions.sha["1.0.0"]
    before = client.status()["engine"]["rejected"]

    # a deploy of a bundle signed by a key nobody trusts, served by the attacker
    make_bundle(tmp_path / "evil", other_keypair[0], version="6.6.6", seed=9)
    evil = FileServer().start()
    evil_url = evil.add("evil.tar", pack(tmp_path / "evil", tmp_path / "evil.tar"))
    from agent.bundle import TrustedKeys, open_bundle

    evil_sha = open_bundle(tmp_path / "evil", TrustedKeys.from_paths([other_keypair[1]])).manifest_sha256
    evil_ref = BundleRef(name="tiny", version="6.6.6", manifest_sha256=evil_sha)

    msgs: list[tuple[str, bytes, bool]] = []
    for ch in Channel:
        for junk in GARBAGE + [OVERSIZED]:
            msgs.append((t.device("dev-0", ch), junk, False))
    msgs += [
        # spoofed: another device's id, or the wrong message type, on dev-0's topics
        (t.device("dev-0", Channel.HEALTH), encode(HealthMessage(device_id="dev-1", session="evil", seq=1)), False),
        (t.device("dev-1", Channel.STATE), encode(StateMessage(device_id="dev-0", session="evil", seq=1,
                                                                agent_version="6.6.6", active=evil_ref)), True),
        (t.device("dev-0", Channel.HEALTH), encode(AckMessage(device_id="dev-0", session="evil", seq=2,
                                                              command_id="x", accepted=True)), False),
        # a Last Will from a session that is not the device's current one
        (t.device("dev-0", Channel.STATE), encode(OfflineMessage(device_id="dev-0", session="not-the-real-one")), False),
        # commands: for another device, with a file:// URL, and a deploy of an untrusted bundle
        (t.device("dev-0", Channel.CMD), encode(DeployCommand(
            id="evil-1", device_id="dev-1", rollout_id="evil", bundle=evil_ref, urls=[evil_url], deadline=deadline_in())), False),
        (t.device("dev-0", Channel.CMD), json.dumps({"v": 1, "type": "command", "kind": "deploy", "id": "evil-2",
                                                     "device_id": "dev-0", "rollout_id": "evil",
                                                     "bundle": evil_ref.model_dump(),
                                                     "urls": ["file:///etc/passwd"]}).encode(), False),
        (t.device("dev-1", Channel.CMD), encode(DeployCommand(
            id="evil-3", device_id="dev-1", rollout_id="evil", bundle=evil_ref, urls=[evil_url], deadline=deadline_in())), False),
    ]
    try:
        _publish_all(fleet.broker_url, msgs)
        # dev-1 fetched the attacker's manifest and refused it: untrusted key
        wait_for(lambda: (client.device("dev-1").get("update") or {}).get("command_id") == "evil-3"
                 and client.device("dev-1")["update"]["state"] == "failed", timeout=30,
                 what="dev-1 to refuse the untrusted deploy")
        assert "untrusted" in (client.device("dev-1")["update"].get("code", "")
                               + client.device("dev-1")["update"].get("reason", "")).lower()
    finally:
        evil.stop()
    assert wait_for(lambda: client.status()["engine"]["rejected"] >= before + len(GARBAGE), timeout=20,
                    what="the controller to count the rejected messages")
    assert sorted(d["id"] for d in client.devices()) == ["dev-0", "dev-1"]  # no ghost devices
    for a in fleet.agents.values():
        assert a.proc.alive(), f"{a.device_id} died"
    time.sleep(1)
    check_fleet(fleet, keypair, expect=v1)
    # the attacker's retained fake state for dev-1 is overwritten by dev-1's own on its next change
    r = wait_rollout(client, rollout(client, "tiny@2.0.0", waves="100%")["id"])
    assert r["state"] == "completed", explain(r)
    check_fleet(fleet, keypair, expect=versions.sha["2.0.0"])
    client.close()
