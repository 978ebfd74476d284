"""The rollout state machine, plan arithmetic, health gate, selectors and settings: pure logic."""

from __future__ import annotations

import pytest

from agent.protocol import UpdateState
from fleet.config import FleetSettings
from fleet.errors import ConfigError, InvalidRequest, TransitionError
from fleet.registry import Selector, parse_labels
from fleet.rollout.engine import command_id, split_command_id
from fleet.rollout.plan import (
    DEVICE_DEADLINE,
    HEALTH_WINDOW,
    HealthNumbers,
    RolloutSpec,
    judge_wave,
    parse_duration,
    parse_rate,
    parse_waves,
    target_mismatch,
    wave_sizes,
)
from fleet.rollout.state import TRANSITIONS, DeviceState, RolloutEvent, RolloutState, device_state_for, next_state

S, E, D = RolloutState, RolloutEvent, DeviceState

# Scenarios: the events in order, and the state after each.
SCENARIOS = {
    "happy path": [(E.START, S.RUNNING), (E.WAVE_PASSED, S.RUNNING), (E.LAST_WAVE_PASSED, S.COMPLETED)],
    "gate pauses, operator resumes": [(E.START, S.RUNNING), (E.GATE_FAILED, S.PAUSED), (E.RESUME, S.RUNNING),
                                      (E.LAST_WAVE_PASSED, S.COMPLETED)],
    "auto rollback": [(E.START, S.RUNNING), (E.AUTO_ROLLBACK, S.ROLLED_BACK)],
    "abort then roll back": [(E.START, S.RUNNING), (E.PAUSE, S.PAUSED), (E.ABORT, S.ABORTED), (E.ROLLBACK, S.ROLLED_BACK)],
    "completed, then rolled back": [(E.START, S.RUNNING), (E.LAST_WAVE_PASSED, S.COMPLETED), (E.ROLLBACK, S.ROLLED_BACK)],
    "abort before start": [(E.ABORT, S.ABORTED)],
    "paused before its first wave": [(E.PAUSE, S.PAUSED), (E.RESUME, S.RUNNING), (E.LAST_WAVE_PASSED, S.COMPLETED)],
    "engine fault pauses, operator aborts": [(E.START, S.RUNNING), (E.FAULT, S.PAUSED), (E.ABORT, S.ABORTED)],
    "engine fault before start": [(E.FAULT, S.PAUSED), (E.RESUME, S.RUNNING)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rollout_scenarios(name):
    state = S.PENDING
    for event, expected in SCENARIOS[name]:
        state = next_state(state, event)
        assert state == expected, (name, event)


@pytest.mark.parametrize("state, event", [(S.COMPLETED, E.RESUME), (S.ROLLED_BACK, E.ROLLBACK), (S.PAUSED, E.PAUSE),
                                          (S.ABORTED, E.RESUME), (S.PENDING, E.GATE_FAILED)])
def test_forbidden_transitions_name_what_is_allowed(state, event):
    with pytest.raises(TransitionError, match=f"cannot {event.value} a rollout that is {state.value}; allowed now"):
        next_state(state, event)


def test_terminal_states_only_allow_rollback():
    for (state, event), _ in TRANSITIONS.items():
        if state in (S.ROLLED_BACK,):
            pytest.fail(f"{state} must be final, but allows {event}")
        if state in (S.COMPLETED, S.ABORTED):
            assert event == E.ROLLBACK


@pytest.mark.parametrize("current, update, expected", [
    (D.SENT, UpdateState.DOWNLOADING, D.UPDATING),
    (D.ACCEPTED, UpdateState.COMMITTED, D.COMMITTED),
    (D.UPDATING, UpdateState.FAILED, D.FAILED),
    (D.UPDATING, UpdateState.ROLLED_BACK, D.FAILED),  # the agent's own watch undid it
    (D.COMMITTED, UpdateState.DOWNLOADING, D.COMMITTED),  # a late duplicate never moves a finished device
    (D.FAILED, UpdateState.COMMITTED, D.FAILED),
    (D.ROLLING_BACK, UpdateState.ROLLED_BACK, D.ROLLED_BACK),
    (D.ROLLING_BACK, UpdateState.WATCHING, D.ROLLING_BACK),
    (D.UPDATING, UpdateState.IDLE, D.UPDATING),
])
def test_device_states_follow_agent_updates(current, update, expected):
    assert device_state_for(current, update) == expected


def test_parsers_and_wave_sizes():
    assert parse_duration("10m", what="x") == 600 and parse_duration("250ms", what="x") == 0.25
    assert parse_duration("3", what="x") == 3
    with pytest.raises(InvalidRequest, match="'ten' is not a duration"):
        parse_duration("ten", what="--health-window")
    assert parse_rate("5%", what="x") == 0.05 and parse_rate("0.2", what="x") == 0.2
    with pytest.raises(InvalidRequest, match="between 0% and 100%"):
        parse_rate("150%", what="--max-failure-rate")
    assert parse_waves("1,10%,50%") == ["1", "10%", "50%", "100%"]
    with pytest.raises(InvalidRequest, match="wave 'x'"):
        parse_waves("1,x")
    assert wave_sizes(["1", "10%", "50%", "100%"], 1000) == [1, 100, 500, 1000]
    assert wave_sizes(["1", "10%", "50%", "100%"], 3) == [1, 2, 3]  # 10% of 3 rounds up to 1: merged
    assert wave_sizes(["5", "100%"], 2) == [2]


@pytest.mark.parametrize("allowed, text, ok", [
    (DEVICE_DEADLINE, "99999999h", False), (DEVICE_DEADLINE, "721h", False), (DEVICE_DEADLINE, "500ms", False),
    (DEVICE_DEADLINE, "720h", True), (DEVICE_DEADLINE, "1s", True),
    (HEALTH_WINDOW, "25h", False), (HEALTH_WINDOW, "0", True), (HEALTH_WINDOW, "24h", True),
])
def test_durations_are_bounded_and_the_error_names_the_range(allowed, text, ok):
    if ok:
        assert parse_duration(text, what=allowed.option, allowed=allowed) >= 0
        return
    with pytest.raises(InvalidRequest, match=f"^{allowed.option} '{text}' is out of range; allowed "
                                             f"{'1s to 720h' if allowed is DEVICE_DEADLINE else '0s to 24h'}$"):
        parse_duration(text, what=allowed.option, allowed=allowed)


def test_spec_refuses_unbounded_durations_however_it_is_built():
    with pytest.raises(ValueError, match="device_deadline_s"):
        RolloutSpec(waves=["100%"], max_failure_rate=0, health_window_s=1, device_deadline_s=99999999 * 3600.0)
    stored = {"schema_version": 1, "waves": ["100%"], "max_failure_rate": 0, "health_window_s": 1e12, "device_deadline_s": 60}
    with pytest.raises(ValueError, match="health_window_s"):
        RolloutSpec.load(stored)
    with pytest.raises(ValueError, match="max_p95_ratio"):
        RolloutSpec(waves=["100%"], max_failure_rate=0, health_window_s=1, device_deadline_s=60, max_p95_ratio=float("inf"))
    for field, value in [("min_requests", 10**12), ("max_concurrent_downloads", 10**12), ("max_p95_ratio", 1e9)]:
        with pytest.raises(ValueError, match=field):  # counts too: a huge one would only fail later, on the device
            RolloutSpec(waves=["100%"], max_failure_rate=0, health_window_s=1, device_deadline_s=60, **{field: value})


def test_command_ids_are_deterministic_and_fit_the_wire():
    a = command_id("ro0123456789ab", "deploy", "device-with.a:long-name" * 5)
    assert a == command_id("ro0123456789ab", "deploy", "device-with.a:long-name" * 5)
    assert len(a) <= 64 and split_command_id(a) == ("ro0123456789ab", "deploy")
    assert command_id("ro0123456789ab", "deploy", "a") != command_id("ro0123456789ab", "deploy", "b")
    assert split_command_id("someone-else's") is None


def spec(**kw) -> RolloutSpec:
    return RolloutSpec(waves=["100%"], max_failure_rate=kw.pop("max_failure_rate", 0.05), health_window_s=1,
                       device_deadline_s=10, **kw)


def test_health_gate():
    base = HealthNumbers(1000, 10, 50.0)
    assert judge_wave(spec(), failed=0, judged=10, baseline=base, post=HealthNumbers(500, 6, 60.0)).passed
    v = judge_wave(spec(), failed=1, judged=10, baseline=base, post=HealthNumbers(500, 5, 50.0))
    assert not v.passed and "1 of 10 devices failed" in v.reason
    v = judge_wave(spec(), failed=0, judged=10, baseline=base, post=HealthNumbers(100, 20, 50.0))
    assert not v.passed and v.reason.startswith("error rate 20.0% vs baseline 1.0%")
    v = judge_wave(spec(), failed=0, judged=10, baseline=base, post=HealthNumbers(100, 1, 120.0))
    assert not v.passed and "p95 latency 120 ms vs baseline 50 ms" in v.reason
    quiet = judge_wave(spec(), failed=0, judged=10, baseline=base, post=HealthNumbers(0, 0, None))
    assert quiet.passed and "not judged" in quiet.reason


def test_spec_rejects_unknown_schema_versions():
    data = spec().model_dump(mode="json")
    assert RolloutSpec.load(data) == spec()
    with pytest.raises(InvalidRequest, match="schema_version 2 is unknown"):
        RolloutSpec.load({**data, "schema_version": 2})


def test_target_mismatch():
    assert target_mismatch({"arch": ["x86_64"]}, {"arch": "x86_64"}) is None
    assert target_mismatch({"arch": ["aarch64"]}, {"arch": "x86_64"}) == "arch x86_64 not in ['aarch64']"
    assert "lacks cpu features ['avx512f']" == target_mismatch({"arch": [], "cpu_features": ["avx512f"]},
                                                                 {"arch": "x86_64", "cpu_features": ["avx2"]})


def test_selectors_and_labels():
    sel = Selector.parse("site=plant-a, arch=aarch64")
    assert sel.matches({"site": "plant-a", "arch": "aarch64", "x": "y"})
    assert not sel.matches({"site": "plant-a", "arch": "x86_64"})
    assert Selector.parse("").matches({})
    with pytest.raises(InvalidRequest, match="selector part 'site' in 'site' is not key=value"):
        Selector.parse("site")
    assert parse_labels(["a=b", "gone="]) == {"a": "b", "gone": None}
    with pytest.raises(InvalidRequest, match="label 'a b' is not key=value"):
        parse_labels(["a b"])


def test_settings_order_and_errors(tmp_path, monkeypatch):
    toml = tmp_path / "fleet.toml"
    toml.write_text('http_port = 9000\ntopic_prefix = "from-file"\napi_token = "file-token"\n')
    monkeypatch.setenv("EDGESHIP_FLEET_TOPIC_PREFIX", "from-env")
    s = FleetSettings.load(toml, http_port=9100)
    assert (s.http_port, s.topic_prefix, s.token()) == (9100, "from-env", "file-token")  # init > env > file
    monkeypatch.setenv("EDGESHIP_FLEET_MQTT_URL", "http://nope")
    with pytest.raises(ConfigError, match="setting mqtt_url: .*mqtt://host:1883"):
        FleetSettings.load(toml)
    with pytest.raises(ConfigError, match="config file .* not found"):
        FleetSettings.load(tmp_path / "missing.toml")
    monkeypatch.delenv("EDGESHIP_FLEET_MQTT_URL")
    with pytest.raises(ConfigError, match="no API token"):
        FleetSettings.load().token()


def test_the_controller_shows_where_a_devices_bundle_came_from():
    from agent.protocol import LOCAL_ROLLOUT, BundleRef, StateMessage, UpdateStatus
    from fleet.registry import apply_state, device_dict, new_device

    v2 = BundleRef(name="tiny", version="1.1.0", manifest_sha256="b" * 64)
    v1 = BundleRef(name="tiny", version="1.0.0", manifest_sha256="a" * 64)

    def shown(active, update) -> str:
        device = new_device("dev-1", 0.0)
        apply_state(device, StateMessage(device_id="dev-1", session="s", seq=0, agent_version="0.1.0", active=active,
                                         update=update), 1.0)
        return device_dict(device)["source"]

    local = UpdateStatus(command_id="local-1", rollout_id=LOCAL_ROLLOUT, state=UpdateState.COMMITTED, bundle=v2)
    assert shown(v2, local) == "local"  # `edgeship agent install` while the broker was away
    fleet = UpdateStatus(command_id="c", rollout_id="ro1", state=UpdateState.WATCHING, bundle=v2)
    assert shown(v2, fleet) == "rollout:ro1"
    failed = UpdateStatus(command_id="c", rollout_id="ro1", state=UpdateState.FAILED, bundle=v2)
    assert shown(v1, failed) == ""  # the last update is about another bundle: nothing to say
    damaged = UpdateStatus(command_id="fallback-s", state=UpdateState.ROLLED_BACK, code="active_bundle_damaged")
    assert shown(v1, damaged) == "fallback"
    assert shown(None, None) == ""
