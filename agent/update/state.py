"""The update state machine: states, events and ONE transition table. Pure: no I/O here.

    idle/committed/failed/rolled_back (rest) ──deploy──▶ downloading ──downloaded──▶ verifying
      ──verified──▶ staging ──staged──▶ smoke_testing ──smoke_passed──▶ switching ──switched──▶
      watching ──watch_passed──▶ committed
    before the switch: fail | cancel ──▶ failed          (the old model never stopped serving)
    after the switch:  fail | breach | rollback | crashed ──▶ rolled_back
    rest ──rollback──▶ switching ──reverted──▶ rolled_back   (explicit rollback to the previous bundle)
    rest ──already_active──▶ committed; rest ──already_rolled_back──▶ rolled_back   (idempotent no-ops)
    rest ──active_damaged──▶ rolled_back   (at start the active bundle failed to verify or load:
                                            the previous one serves and becomes active)

The manager (agent/update/manager.py) persists the new state BEFORE carrying out its entry action,
so a crash at any point leaves a record of what was in progress; `recovery_event` decides what to
do with it on the next start.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.protocol import UpdateState as S


class Event(StrEnum):
    DEPLOY = "deploy"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    SMOKE_PASSED = "smoke_passed"
    SWITCHED = "switched"
    WATCH_PASSED = "watch_passed"
    FAIL = "fail"
    CANCEL = "cancel"
    BREACH = "breach"
    ROLLBACK = "rollback"
    REVERTED = "reverted"
    CRASHED = "crashed"  # the agent restarted while this state was in progress
    ALREADY_ACTIVE = "already_active"  # a deploy of the bundle already serving: nothing to do
    ALREADY_ROLLED_BACK = "already_rolled_back"  # a rollback of a rollout that is not active here
    ACTIVE_DAMAGED = "active_damaged"  # at start the active bundle failed to verify or load


REST = frozenset({S.IDLE, S.COMMITTED, S.FAILED, S.ROLLED_BACK})
BEFORE_SWITCH = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SMOKE_TESTING})
AFTER_SWITCH = frozenset({S.SWITCHING, S.WATCHING})

E = Event
TRANSITIONS: dict[tuple[S, Event], S] = {
    **{(rest, E.DEPLOY): S.DOWNLOADING for rest in REST},
    **{(rest, E.ROLLBACK): S.SWITCHING for rest in REST},
    **{(rest, E.ALREADY_ACTIVE): S.COMMITTED for rest in REST},
    **{(rest, E.ALREADY_ROLLED_BACK): S.ROLLED_BACK for rest in REST},
    **{(rest, E.ACTIVE_DAMAGED): S.ROLLED_BACK for rest in REST},
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.STAGING,
    (S.STAGING, E.STAGED): S.SMOKE_TESTING,
    (S.SMOKE_TESTING, E.SMOKE_PASSED): S.SWITCHING,
    (S.SWITCHING, E.SWITCHED): S.WATCHING,
    (S.WATCHING, E.WATCH_PASSED): S.COMMITTED,
    **{(s, e): S.FAILED for s in BEFORE_SWITCH for e in (E.FAIL, E.CANCEL, E.CRASHED)},
    (S.SWITCHING, E.FAIL): S.ROLLED_BACK,
    (S.SWITCHING, E.CRASHED): S.ROLLED_BACK,
    (S.SWITCHING, E.REVERTED): S.ROLLED_BACK,
    (S.WATCHING, E.FAIL): S.ROLLED_BACK,
    (S.WATCHING, E.BREACH): S.ROLLED_BACK,
    (S.WATCHING, E.ROLLBACK): S.ROLLED_BACK,
    (S.WATCHING, E.CRASHED): S.ROLLED_BACK,
}


class InvalidTransition(ValueError):
    """An event that the table does not allow in the current state (a bug, or a late command)."""


def next_state(state: S, event: Event) -> S:
    """The state after `event` in `state`, or InvalidTransition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"event {event.value!r} is not allowed in state {state.value!r}") from None


def is_rest(state: S) -> bool:
    return state in REST


@dataclass(frozen=True)
class Recovery:
    """What to do on start with a persisted in-progress state."""

    resume: bool  # re-enter the same state (its entry action is idempotent)
    event: Event | None = None  # or fire this event
    code: str = ""
    reason: str = ""


def recovery_event(state: S, attempts: int, *, max_attempts: int, deadline_passed: bool = False) -> Recovery:
    """Finish or undo an update found in progress after a restart.

    Before the switch the old model still serves: resume (downloads continue with Range), unless
    this state already crashed `max_attempts` times (a loop) or the deadline passed. After the
    switch an unexplained restart is treated as the new model's fault: roll back.
    """
    if state in REST:
        return Recovery(resume=True)  # re-assert the rest state's pointer (idempotent)
    if state in AFTER_SWITCH:
        return Recovery(resume=False, event=E.CRASHED, code="crashed_after_switch",
                        reason=f"the agent restarted while {state.value}; rolled back to the previous bundle")
    if attempts >= max_attempts:
        return Recovery(resume=False, event=E.FAIL, code="loop_detected",
                        reason=f"the agent restarted {attempts} times while {state.value}; stopped, old model kept")
    if deadline_passed:
        return Recovery(resume=False, event=E.FAIL, code="deadline_passed",
                        reason=f"the deploy deadline passed while {state.value} (agent was down)")
    return Recovery(resume=True)
