"""The pure parts of agent/update: transition table, recovery decisions, acceptance, watch verdicts,
persisted state and the store's pointer."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from agent.bundle import TrustedKeys
from agent.protocol import BundleRef, DeployCommand, UpdateState as S, WatchPolicy
from agent.update import decide
from agent.update.errors import StateFileError, StoreError
from agent.update.persist import PersistedState, StateFile, UpdateRecord
from agent.update.state import REST, TRANSITIONS, Event, InvalidTransition, next_state, recovery_event
from agent.update.store import BundleStore
from tests.support.bundles import make_bundle

SHA_A, SHA_B = "a" * 64, "b" * 64
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def deploy(version="1.1.0", sha=SHA_B, **kw) -> DeployCommand:
    return DeployCommand(id="c1", device_id="dev1", rollout_id="r1",
                         bundle=BundleRef(name="tiny", version=version, manifest_sha256=sha),
                         urls=["http://127.0.0.1:1/b.tar"], **{"deadline": NOW + timedelta(hours=1), **kw})


def test_happy_path_walks_every_state_in_order():
    path = [S.IDLE]
    for event in (Event.DEPLOY, Event.DOWNLOADED, Event.VERIFIED, Event.STAGED, Event.SMOKE_PASSED,
                  Event.SWITCHED, Event.WATCH_PASSED):
        path.append(next_state(path[-1], event))
    assert path == [S.IDLE, S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SMOKE_TESTING, S.SWITCHING, S.WATCHING,
                    S.COMMITTED]


@pytest.mark.parametrize("state", [S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SMOKE_TESTING])
def test_failures_before_the_switch_end_failed(state):
    assert next_state(state, Event.FAIL) == S.FAILED
    assert next_state(state, Event.CANCEL) == S.FAILED


@pytest.mark.parametrize("state,event", [(S.SWITCHING, Event.FAIL), (S.WATCHING, Event.BREACH),
                                         (S.WATCHING, Event.ROLLBACK), (S.WATCHING, Event.CRASHED)])
def test_failures_after_the_switch_roll_back(state, event):
    assert next_state(state, event) == S.ROLLED_BACK


def test_every_rest_state_takes_a_deploy_and_a_rollback_and_nothing_else_does():
    for (state, event), _ in TRANSITIONS.items():
        if event in (Event.DEPLOY,):
            assert state in REST
    for rest in REST:
        assert next_state(rest, Event.DEPLOY) == S.DOWNLOADING
        assert next_state(rest, Event.ROLLBACK) == S.SWITCHING
    with pytest.raises(InvalidTransition, match="'deploy' is not allowed in state 'watching'"):
        next_state(S.WATCHING, Event.DEPLOY)
    with pytest.raises(InvalidTransition):
        next_state(S.SWITCHING, Event.CANCEL)  # too late to cancel: rollback instead


def test_a_damaged_active_bundle_found_at_rest_rolls_back_and_only_at_rest():
    for rest in REST:
        assert next_state(rest, Event.ACTIVE_DAMAGED) == S.ROLLED_BACK
    with pytest.raises(InvalidTransition):
        next_state(S.DOWNLOADING, Event.ACTIVE_DAMAGED)  # an update in progress keeps its own record


def test_recovery_resumes_before_the_switch_and_rolls_back_after():
    assert recovery_event(S.DOWNLOADING, 1, max_attempts=3).resume
    r = recovery_event(S.WATCHING, 1, max_attempts=3)
    assert not r.resume and r.event == Event.CRASHED and r.code == "crashed_after_switch"
    assert recovery_event(S.SWITCHING, 1, max_attempts=3).event == Event.CRASHED


def test_recovery_stops_a_loop_in_a_safe_state():
    r = recovery_event(S.SMOKE_TESTING, 3, max_attempts=3)
    assert (r.resume, r.event, r.code) == (False, Event.FAIL, "loop_detected")
    assert next_state(S.SMOKE_TESTING, r.event) == S.FAILED
    r = recovery_event(S.DOWNLOADING, 1, max_attempts=3, deadline_passed=True)
    assert r.code == "deadline_passed"


INSTALLED = decide.Installed(state=S.COMMITTED, active_sha=SHA_A, active_version="1.0.0", active_name="tiny",
                             free_bytes=10**9)


@pytest.mark.parametrize("cmd,installed,code", [
    (deploy(version="0.9.0"), INSTALLED, "downgrade_refused"),
    (deploy(version="1.0.0"), INSTALLED, "version_conflict"),
    (deploy(), decide.Installed(state=S.DOWNLOADING), "busy"),
    (deploy(deadline=NOW - timedelta(seconds=1)), INSTALLED, "deadline_passed"),
    (deploy(size=10**9), INSTALLED, "insufficient_disk"),
    (deploy(version="latest"), INSTALLED, "invalid_version"),
])
def test_deploys_refused_before_a_byte_is_downloaded(cmd, installed, code):
    v = decide.check_deploy(cmd, installed, at=NOW, margin=0)
    assert (v.ok, v.code) == (False, code)
    assert v.reason


def test_a_newer_version_is_accepted_and_the_active_one_is_a_no_op():
    assert decide.check_deploy(deploy(size=1000), INSTALLED, at=NOW, margin=0).ok
    v = decide.check_deploy(deploy(sha=SHA_A), INSTALLED, at=NOW, margin=0)
    assert (v.ok, v.code) == (True, "already_active")
    assert next_state(S.ROLLED_BACK, Event.ALREADY_ACTIVE) == S.COMMITTED


def test_manifest_checks(tmp_path, keypair):
    from agent.bundle import Manifest, ExecutionProvider, Runtime

    m = make_bundle(tmp_path / "b", keypair[0], version="1.1.0", arch=["aarch64"])
    want = BundleRef(name="tiny", version="1.1.0", manifest_sha256=SHA_B)
    dev = decide.DeviceTarget(arch="x86_64", agent_version="0.1.0", execution_providers=("CPUExecutionProvider",))
    assert decide.check_manifest(m, want, dev, free_bytes=10**9, margin=0).code == "arch_mismatch"
    dev = decide.DeviceTarget(arch="aarch64", agent_version="0.1.0", execution_providers=("CPUExecutionProvider",))
    assert decide.check_manifest(m, want, dev, free_bytes=10**9, margin=0).ok
    assert decide.check_manifest(m, want, dev, free_bytes=10, margin=0).code == "insufficient_disk"
    other = BundleRef(name="other", version="1.1.0", manifest_sha256=SHA_B)
    assert decide.check_manifest(m, other, dev, free_bytes=10**9, margin=0).code == "bundle_mismatch"
    picky = decide.DeviceTarget(arch="aarch64", agent_version="0.1.0", execution_providers=("CPUExecutionProvider",),
                                profiles=("rpi5",))
    assert decide.check_manifest(m, want, picky, free_bytes=10**9, margin=0).code == "target_mismatch"
    qnn = Manifest.model_validate({**m.model_dump(), "runtime": Runtime(
        execution_providers=[ExecutionProvider(name="QNNExecutionProvider")]).model_dump()})
    assert decide.check_manifest(qnn, want, dev, free_bytes=10**9, margin=0).code == "ep_unavailable"
    newer = Manifest.model_validate({**m.model_dump(), "min_agent_version": "9.0.0"})
    assert decide.check_manifest(newer, want, dev, free_bytes=10**9, margin=0).code == "agent_too_old"


def judge(current, baseline=decide.WatchSample(100, 0, 10.0), elapsed=0.1, policy=WatchPolicy(window_s=5)):
    return decide.judge_watch(policy, baseline=baseline, current=current, elapsed_s=elapsed, max_watch_s=60,
                              min_sample=5)


def test_watch_verdicts():
    assert not judge(decide.WatchSample(3, 3, 10.0)).done  # too few requests to judge
    v = judge(decide.WatchSample(20, 5, 10.0))
    assert v.breach and "error rate 25.0%" in v.reason and v.metrics["errors"] == 5
    v = judge(decide.WatchSample(20, 0, 30.0))
    assert v.breach and v.metrics["p95_ratio"] == 3.0
    assert not judge(decide.WatchSample(20, 0, 12.0)).done
    v = judge(decide.WatchSample(20, 0, 12.0), elapsed=5.0)
    assert v.done and not v.breach
    v = judge(decide.WatchSample(0, 0, None), elapsed=61, policy=WatchPolicy(window_s=5, min_requests=10))
    assert v.done and not v.breach and "only 0 of 10" in v.reason


def test_state_file_round_trip_and_refuses_unknown_schema(tmp_path):
    f = StateFile(tmp_path / "update.json")
    assert f.load().update is None
    st = PersistedState(update=UpdateRecord(command_id="c1", state=S.STAGING, attempts={"staging": 2}))
    f.save(st)
    assert f.load().update.attempts == {"staging": 2}
    assert not list(tmp_path.glob(".*.tmp"))
    data = json.loads((tmp_path / "update.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "update.json").write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="schema_version 99"):
        f.load()
    (tmp_path / "update.json").write_text("{not json")
    with pytest.raises(StateFileError, match="not JSON"):
        f.load()


def test_store_pointer_switch_keeps_previous_and_gcs_older(tmp_path, keypair):
    trusted = TrustedKeys.from_paths([keypair[1]])
    store = BundleStore(tmp_path / "state", trusted=trusted)
    shas = []
    for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0")):
        make_bundle(tmp_path / v, keypair[0], version=v, seed=i)
        shas.append(store.add_directory(tmp_path / v).manifest_sha256)
    store.switch(shas[1], shas[0])
    assert store.active().manifest.version == "1.1.0" and store.previous().manifest.version == "1.0.0"
    store.switch(shas[2], shas[1])
    assert store.gc() == [shas[0]]
    assert store.previous().manifest.version == "1.1.0" and not store.has(shas[0])
    with pytest.raises(StoreError, match="not in the store"):
        store.switch(shas[0], None)


def test_store_stage_is_one_rename_and_gc_clears_half_done_work(tmp_path, keypair):
    from agent.bundle import open_bundle

    trusted = TrustedKeys.from_paths([keypair[1]])
    store = BundleStore(tmp_path / "state", trusted=trusted)
    make_bundle(tmp_path / "b", keypair[0])
    sha = open_bundle(tmp_path / "b", trusted).manifest_sha256
    with pytest.raises(StoreError) as err:
        store.stage(sha)
    assert err.value.code == "staging_lost"
    import shutil

    shutil.copytree(tmp_path / "b", store.staging_path(sha))
    assert store.stage(sha).manifest_sha256 == sha and store.stage(sha).manifest_sha256 == sha  # idempotent
    shutil.copytree(tmp_path / "b", store.staging_path("c" * 64))
    store.download_path("d" * 64).write_bytes(b"partial")
    store.gc()
    assert list(store.downloads_dir.iterdir()) == [] and not store.has(sha)


# ---- issue 19.8: the watch judges a margin over the device's own baseline --------------------------

MARGIN = WatchPolicy(window_s=5, min_judged_requests=20, max_error_rate_increase=0.05)  # what the controller sends


@pytest.mark.parametrize("baseline,current,breach", [
    (decide.WatchSample(200, 12, 10.0), decide.WatchSample(100, 6, 10.0), False),  # 6 % before, 6 % after
    (decide.WatchSample(200, 12, 10.0), decide.WatchSample(100, 10, 10.0), False),  # +4 %: inside the margin
    (decide.WatchSample(200, 12, 10.0), decide.WatchSample(100, 12, 10.0), True),  # +6 %: past it
    (decide.WatchSample(200, 0, 10.0), decide.WatchSample(100, 6, 10.0), True),  # 0 % -> 6 %
    (decide.WatchSample(3, 3, 10.0), decide.WatchSample(100, 6, 10.0), True),  # a 3-request baseline is no excuse
])
def test_the_watch_judges_the_increase_over_the_old_models_own_error_rate(baseline, current, breach):
    v = judge(current, baseline=baseline, elapsed=5.0, policy=MARGIN)
    assert (v.done, v.breach) == (True, breach), v.reason
    if breach:
        assert "margin" in v.reason and v.metrics["max_error_rate_increase"] == 0.05


def test_the_watch_judges_nothing_below_the_commands_min_judged_requests():
    v = judge(decide.WatchSample(19, 19, 10.0), baseline=decide.WatchSample(200, 0, 10.0), elapsed=5.0, policy=MARGIN)
    assert (v.done, v.breach) == (True, False)  # 19 of 19 failed, but the gate needs 20 to judge: passed unjudged
    assert not judge(decide.WatchSample(0, 0, None), elapsed=4.9, policy=MARGIN).done  # and it never waits past the window
    assert judge(decide.WatchSample(0, 0, None), elapsed=5.0, policy=MARGIN).done
    assert judge(decide.WatchSample(20, 20, 10.0), baseline=decide.WatchSample(200, 0, 10.0), policy=MARGIN).breach


def test_an_old_controllers_watch_keeps_its_absolute_meaning_and_both_limits_apply_together():
    legacy = WatchPolicy.model_validate({"window_s": 5, "max_error_rate": 0.05})  # what v1 controllers sent
    assert legacy.max_error_rate_increase is None
    six = decide.WatchSample(200, 12, 10.0)
    assert judge(decide.WatchSample(100, 6, 10.0), baseline=six, elapsed=5.0, policy=legacy).breach
    assert WatchPolicy().max_error_rate == 0.05  # no limit given at all: the v1 default, 5 % absolute
    both = WatchPolicy(window_s=5, max_error_rate=0.08, max_error_rate_increase=0.05)
    v = judge(decide.WatchSample(100, 9, 10.0), baseline=six, elapsed=5.0, policy=both)
    assert v.breach and "ceiling 8.0%" in v.reason


# ---- issue 19.9: names a device may run, deadlines, rollbacks that cannot be replayed harmfully ----

def test_a_deploy_of_another_name_needs_replaces_and_the_devices_list():
    other = deploy(version="0.1.0")
    other = other.model_copy(update={"bundle": BundleRef(name="embedder", version="0.1.0", manifest_sha256=SHA_B)})
    v = decide.check_deploy(other, INSTALLED, at=NOW, margin=0)
    assert (v.ok, v.code) == (False, "name_change_refused") and "--replaces tiny" in v.reason
    ok = other.model_copy(update={"replaces": ["tiny"]})
    assert decide.check_deploy(ok, INSTALLED, at=NOW, margin=0).ok
    v = decide.check_deploy(ok, INSTALLED, at=NOW, margin=0, allowed_names=("tiny",))
    assert (v.ok, v.code) == (False, "bundle_not_allowed") and "bundle_names" in v.reason
    first = decide.Installed(state=S.IDLE, free_bytes=10**9)  # nothing installed yet: the list still holds
    assert decide.check_deploy(other, first, at=NOW, margin=0).ok
    assert decide.check_deploy(other, first, at=NOW, margin=0, allowed_names=("tiny",)).code == "bundle_not_allowed"


def test_an_expired_deploy_is_refused_before_anything_else_even_the_active_bundle():
    late = deploy(sha=SHA_A, deadline=NOW)
    v = decide.check_deploy(late, decide.Installed(state=S.DOWNLOADING), at=NOW, margin=0)
    assert (v.ok, v.code) == (False, "deadline_passed") and "never applied" in v.reason


def last(rollout_id="r1", state=S.COMMITTED, kind="deploy", changed=True):
    return decide.LastUpdate(kind=kind, rollout_id=rollout_id, state=state, changed_active=changed)


ROLLBACK_INSTALLED = decide.Installed(state=S.COMMITTED, active_sha=SHA_B, previous_sha=SHA_A)


@pytest.mark.parametrize("cmd,now,prior,code", [
    (dict(rollout_id="r1"), ROLLBACK_INSTALLED, last(), ""),  # rollout r1 installed the active bundle: back
    (dict(rollout_id="r1"), ROLLBACK_INSTALLED, last("r2"), "rollout_not_active"),  # r2 came after r1: no
    (dict(rollout_id="r1"), ROLLBACK_INSTALLED, None, "rollout_not_active"),
    (dict(rollout_id="r1"), ROLLBACK_INSTALLED, last(state=S.ROLLED_BACK, kind="rollback"), "already_rolled_back"),
    (dict(rollout_id="r1"), ROLLBACK_INSTALLED, last(changed=False), "already_rolled_back"),  # r1 changed nothing
    (dict(rollout_id="r1"), decide.Installed(state=S.WATCHING), last(state=S.WATCHING), "rollback_now"),
    (dict(rollout_id="r2"), decide.Installed(state=S.WATCHING), last(state=S.WATCHING), "rollout_not_active"),
    (dict(), ROLLBACK_INSTALLED, last(), "deadline_missing"),
    (dict(deadline=NOW), ROLLBACK_INSTALLED, last(), "deadline_passed"),
    (dict(rollout_id="r1", deadline=NOW - timedelta(days=1)), ROLLBACK_INSTALLED, last(), "deadline_passed"),
    (dict(deadline=NOW + timedelta(minutes=5)), ROLLBACK_INSTALLED, last("r9"), ""),
    (dict(deadline=NOW + timedelta(minutes=5)), decide.Installed(state=S.COMMITTED, active_sha=SHA_B), None,
     "no_previous"),
])
def test_rollback_decisions(cmd, now, prior, code):
    from agent.protocol import RollbackCommand

    v = decide.check_rollback(RollbackCommand(id="rb", device_id="dev1", **cmd), now, prior, at=NOW)
    assert v.code == code, v.reason
    assert v.ok == (code in ("", "already_rolled_back", "rollback_now"))
