"""The rollout state machine: one enum of states, one of events, ONE transition table.

    pending ──start──▶ running ──(wave passed: next wave)──▶ running ──last wave passed──▶ completed
     │                  │  ▲
     │    pause / gate  │  │ resume
     │    failed        ▼  │
     └──────pause────▶ paused
    running, paused, pending ──abort──▶ aborted
    running, paused, completed, aborted ──rollback / auto-rollback──▶ rolled_back
    pending, running ──fault (the engine failed to drive it N ticks in a row)──▶ paused

Per-device states within a rollout (DeviceState) move on acks and events; see `device_state_for`.
"""

from __future__ import annotations

from enum import StrEnum

from agent.protocol import UpdateState
from fleet.errors import TransitionError


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class RolloutEvent(StrEnum):
    START = "start"
    WAVE_PASSED = "wave_passed"
    LAST_WAVE_PASSED = "last_wave_passed"
    GATE_FAILED = "gate_failed"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    AUTO_ROLLBACK = "auto_rollback"
    FAULT = "fault"


S, E = RolloutState, RolloutEvent
TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (S.PENDING, E.START): S.RUNNING,
    (S.PENDING, E.ABORT): S.ABORTED,
    (S.PENDING, E.PAUSE): S.PAUSED,
    (S.PENDING, E.FAULT): S.PAUSED,
    (S.RUNNING, E.WAVE_PASSED): S.RUNNING,
    (S.RUNNING, E.LAST_WAVE_PASSED): S.COMPLETED,
    (S.RUNNING, E.GATE_FAILED): S.PAUSED,
    (S.RUNNING, E.AUTO_ROLLBACK): S.ROLLED_BACK,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.RUNNING, E.ABORT): S.ABORTED,
    (S.RUNNING, E.FAULT): S.PAUSED,
    (S.RUNNING, E.ROLLBACK): S.ROLLED_BACK,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.PAUSED, E.ABORT): S.ABORTED,
    (S.PAUSED, E.ROLLBACK): S.ROLLED_BACK,
    (S.COMPLETED, E.ROLLBACK): S.ROLLED_BACK,
    (S.ABORTED, E.ROLLBACK): S.ROLLED_BACK,
}
ACTIVE = frozenset({S.PENDING, S.RUNNING, S.PAUSED})  # states that hold their devices
TERMINAL = frozenset({S.COMPLETED, S.ABORTED, S.ROLLED_BACK})


def next_state(state: RolloutState | str, event: RolloutEvent | str) -> RolloutState:
    """The state after `event`, or TransitionError naming what is allowed."""
    state, event = RolloutState(state), RolloutEvent(event)
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == state and e in USER_EVENTS)
        raise TransitionError(
            f"cannot {event.value} a rollout that is {state.value}; allowed now: {', '.join(allowed) or 'nothing'}"
        ) from None


USER_EVENTS = frozenset({E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK})


class DeviceState(StrEnum):
    """A device's progress within one rollout."""

    PENDING = "pending"  # its wave has not started
    WAITING = "waiting"  # its wave started; offline or held back by --max-concurrent-downloads
    SENT = "sent"  # deploy published, no ack yet (re-sent with the same id until acked)
    ACCEPTED = "accepted"
    UPDATING = "updating"  # downloading .. watching
    COMMITTED = "committed"
    FAILED = "failed"
    SKIPPED = "skipped"  # offline past the deadline with --offline-policy skip
    CANCELLED = "cancelled"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


DONE = frozenset({DeviceState.COMMITTED, DeviceState.FAILED, DeviceState.SKIPPED, DeviceState.CANCELLED,
                  DeviceState.ROLLED_BACK})
DOWNLOADING = frozenset({DeviceState.SENT, DeviceState.ACCEPTED})  # count against --max-concurrent-downloads

_FROM_UPDATE: dict[UpdateState, DeviceState] = {
    UpdateState.IDLE: DeviceState.ACCEPTED,
    UpdateState.DOWNLOADING: DeviceState.UPDATING,
    UpdateState.VERIFYING: DeviceState.UPDATING,
    UpdateState.STAGING: DeviceState.UPDATING,
    UpdateState.SMOKE_TESTING: DeviceState.UPDATING,
    UpdateState.SWITCHING: DeviceState.UPDATING,
    UpdateState.WATCHING: DeviceState.UPDATING,
    UpdateState.COMMITTED: DeviceState.COMMITTED,
    UpdateState.FAILED: DeviceState.FAILED,
    UpdateState.ROLLED_BACK: DeviceState.FAILED,  # the agent's own watch rolled it back
}


def device_state_for(current: DeviceState | str, update: UpdateState) -> DeviceState:
    """The device state after the agent reports `update` for this rollout's deploy.

    A finished device never moves again on deploy events (late or duplicated QoS 1 messages),
    except that a device being rolled back finishes on `rolled_back`.
    """
    current = DeviceState(current)
    if current == DeviceState.ROLLING_BACK:
        return DeviceState.ROLLED_BACK if update in (UpdateState.ROLLED_BACK, UpdateState.IDLE) else current
    if current in DONE:
        return current
    if current == DeviceState.UPDATING and update == UpdateState.IDLE:
        return current
    return _FROM_UPDATE[update]
