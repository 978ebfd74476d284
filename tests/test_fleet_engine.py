"""The engine in-process on a real database (SQLite file and PostgreSQL): message intake paths,
silence detection, spoofed and malformed messages. MQTT is not involved: messages are handed
to `Engine.deliver` exactly as the MQTT thread hands them over."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select

from agent.protocol import Channel, DeviceFacts, HealthMessage, InferenceStats, OfflineMessage, StateMessage, Topics, encode
from fleet.db import make_engine, migrate, sessions
from fleet.errors import InvalidRequest
from fleet.models import Bundle, Device, Rollout
from fleet.registry import Selector, device_view, parse_labels
from fleet.rollout.engine import Engine
from fleet.rollout.plan import RolloutSpec
from fleet.rollout.state import RolloutEvent
from tests.support.fleet import make_database, wait_for

DBS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DBS)
def engine(request, tmp_path):
    db = make_database(request.param, tmp_path)
    sql = make_engine(db.url, schema=db.schema)
    migrate(sql)
    published: list[tuple[str, bytes]] = []
    eng = Engine(sessions(sql), topics=Topics("t"), publish=lambda t, p: published.append((t, p)),
                 base_url="http://127.0.0.1:1", tick_interval_s=0.05, heartbeat_timeout_s=0.6)
    eng.published = published  # what it sent, for the tests to read
    eng.start()
    yield eng
    eng.stop()
    sql.dispose()
    db.drop()


def device(eng: Engine, device_id: str) -> Device | None:
    with eng.sessions() as s:
        return s.scalar(select(Device).where(Device.id == device_id))


def send(eng: Engine, device_id: str, channel: Channel, msg) -> None:
    eng.deliver(eng.topics.device(device_id, channel), encode(msg))


def beat(eng: Engine, device_id: str, session: str, seq: int, requests: int = 5) -> None:
    send(eng, device_id, Channel.HEALTH, HealthMessage(device_id=device_id, session=session, seq=seq,
                                                       inference=InferenceStats(requests=requests, errors=1, p95_ms=12.0)))


def test_intake_silence_and_return(engine):
    send(engine, "a", Channel.STATE, StateMessage(device_id="a", session="s1", seq=0, agent_version="0.1.0" + "x" * 100,
                                                  facts=DeviceFacts(arch="aarch64"), labels={"site": "x"}))
    beat(engine, "a", "s1", 1)
    beat(engine, "b", "s9", 0)  # a heartbeat before any birth still registers the device
    d = wait_for(lambda: (x := device(engine, "a")) and x.health and x, what="birth and heartbeat applied")
    assert d.online and d.facts["arch"] == "aarch64" and d.labels == {"site": "x"} and len(d.agent_version) == 64
    assert d.health["inference"] == {"requests": 5, "errors": 1, "p95_ms": 12.0, "queue_depth": 0}
    assert wait_for(lambda: device(engine, "b")).online
    for seq in range(2, 8):  # 'a' keeps beating (the fast path); 'b' falls silent
        beat(engine, "a", "s1", seq, requests=seq)
        wait_for(lambda: device(engine, "a").health["inference"]["requests"] == seq, what="heartbeat applied")
        engine._stop.wait(0.15)
    b = wait_for(lambda: (x := device(engine, "b")) and not x.online and x, what="silence detected")
    assert b.offline_reason == "silent" and device(engine, "a").online
    beat(engine, "b", "s9", 1)  # it speaks again: online at once
    wait_for(lambda: device(engine, "b").online, what="back online")
    send(engine, "a", Channel.STATE, OfflineMessage(device_id="a", session="old-session"))  # an older connection's will
    beat(engine, "a", "s1", 9)
    wait_for(lambda: device(engine, "a").health["inference"]["requests"] == 5, what="later heartbeat")
    assert device(engine, "a").online
    send(engine, "a", Channel.STATE, OfflineMessage(device_id="a", session="s1"))
    wait_for(lambda: not device(engine, "a").online, what="its own will")
    assert device(engine, "a").offline_reason == "lwt"


def test_spoofed_and_malformed_messages_are_counted_not_applied(engine):
    engine.deliver(engine.topics.device("victim", Channel.STATE),
                   encode(StateMessage(device_id="intruder", session="s", seq=0, agent_version="1")))
    engine.deliver(engine.topics.device("x", Channel.HEALTH), b"{not json")
    engine.deliver(engine.topics.device("x", Channel.HEALTH),
                   encode(StateMessage(device_id="x", session="s", seq=0, agent_version="1")))  # wrong channel
    engine.deliver("elsewhere/topic", b"{}")
    wait_for(lambda: engine.stats.rejected == 3, what="three rejections")
    assert dict(engine.stats.reject_codes) == {"spoofed": 1, "bad_json": 1, "wrong_channel": 1}
    with engine.sessions() as s:
        assert s.scalars(select(Device.id)).all() == []


def born(eng: Engine, device_id: str, **labels: str) -> None:
    send(eng, device_id, Channel.STATE, StateMessage(device_id=device_id, session="s", seq=0, agent_version="1",
                                                     facts=DeviceFacts(arch="x86_64"), labels=labels))


def test_reported_labels_never_shadow_reserved_selector_keys(engine, caplog):
    born(engine, "dev-victim", site="a")
    born(engine, "dev-evil", id="dev-victim", arch="aarch64", online="false", bundle="tiny@9.9.9", os="none", site="a")
    d = wait_for(lambda: device(engine, "dev-evil"), what="the reporting device registered")
    wait_for(lambda: device(engine, "dev-victim"), what="the victim registered")
    assert d.labels == {"site": "a"}  # dropped at intake
    assert "dev-evil reported label(s) arch, bundle, id, online, os" in caplog.text and "dropped" in caplog.text
    with engine.sessions() as s:
        views = {x.id: device_view(x) for x in s.scalars(select(Device))}
    assert [i for i, v in views.items() if Selector.parse("id=dev-victim").matches(v)] == ["dev-victim"]
    assert views["dev-evil"]["arch"] == "x86_64" and views["dev-evil"]["online"] == "true" and "bundle" not in views["dev-evil"]

    def legacy(s):  # a row stored before intake dropped them: the view still takes the controller's own values
        s.get(Device, "dev-evil").labels = {"id": "dev-victim", "bundle": "tiny@9.9.9"}
        s.get(Device, "dev-evil").op_labels = {"arch": "aarch64"}

    engine.call(legacy)
    with engine.sessions() as s:
        view = device_view(s.get(Device, "dev-evil"))
    assert view["id"] == "dev-evil" and view["arch"] == "x86_64" and "bundle" not in view
    with pytest.raises(InvalidRequest, match="label key 'id' is reserved .*choose another key"):
        parse_labels(["id=dev-victim"])
    assert parse_labels(["arch="]) == {"arch": None}  # removing one stored before the fix stays possible


def _bundle(s) -> None:
    s.add(Bundle(manifest_sha256="a" * 64, name="tiny", version="1.0.0", key_id="k", manifest={"target": {}},
                 archive_sha256="b" * 64, size=10, stored=True, urls=[], url_only=False, created_at=0.0))


def test_a_rollout_that_cannot_be_driven_blocks_no_other(engine, caplog):
    """A rollout stored with an unbounded deadline (before specs were bounded) fails every tick; the
    other rollout still deploys, the bad one is paused with the reason, and the error is logged once."""
    born(engine, "dev-bad")
    born(engine, "dev-good")
    wait_for(lambda: device(engine, "dev-good") and device(engine, "dev-bad"), what="devices registered")
    engine.call(_bundle)
    unbounded = RolloutSpec.model_construct(waves=["100%"], max_failure_rate=0.0, health_window_s=1.0,
                                            device_deadline_s=99999999 * 3600.0)
    bad = engine.call(lambda s: engine.create_rollout(s, bundle_ref="tiny@1.0.0", selector="id=dev-bad", spec=unbounded))
    good = engine.call(lambda s: engine.create_rollout(s, bundle_ref="tiny@1.0.0", selector="id=dev-good", spec=RolloutSpec(
        waves=["100%"], max_failure_rate=0.0, health_window_s=1.0, device_deadline_s=60.0)))

    def rollout(rid: str) -> Rollout:
        with engine.sessions() as s:
            return s.get(Rollout, rid)

    wait_for(lambda: any(t == engine.topics.device("dev-good", Channel.CMD) for t, _ in engine.published),
             what="the healthy rollout's deploy")
    assert rollout(good).state == "running"
    paused = wait_for(lambda: (r := rollout(bad)).state == "paused" and r, what="the bad rollout paused")
    assert f"failed to drive this rollout {engine.fault_limit} times in a row" in paused.reason
    assert "device_deadline_s" in paused.reason and "abort it, or fix the cause and resume" in paused.reason
    assert "\n" not in paused.reason
    engine._stop.wait(engine.tick_interval_s * 10)  # it is left aside now: no more tries, no more log lines
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and bad in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in errors]
    assert not any(t == engine.topics.device("dev-bad", Channel.CMD) for t, _ in engine.published)
    engine.call(lambda s: engine.operate(s, bad, RolloutEvent.RESUME))  # the operator asks again: tried again
    wait_for(lambda: rollout(bad).state == "paused", what="the bad rollout paused again")
    assert rollout(good).state == "running"
    engine.call(lambda s: engine.operate(s, bad, RolloutEvent.ABORT))  # and can always end it
    assert rollout(bad).state == "aborted"
