"""The engine: the ONE thread that changes controller state.

Everything that writes goes through `Engine.inbox`: device messages handed over by the MQTT
thread (`deliver`) and operator calls from the HTTP threads (`submit`, answered by a Future).
The loop drains the inbox in batches, applies a batch in one transaction, ticks the rollouts
(waves, deadlines, the health gate, re-sends), and publishes commands only after the commit
that recorded them, so a crash between the two re-sends the same command (same id) on restart.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from agent.protocol import (
    AckMessage,
    BundleRef,
    CancelCommand,
    Channel,
    DeployCommand,
    EventMessage,
    HealthMessage,
    OfflineMessage,
    ProtocolError,
    RollbackCommand,
    StateMessage,
    Topics,
    UpdateState,
    WatchPolicy,
    encode,
    parse_device_message,
)
from agent.protocol.topics import check_device_id
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.models import Bundle, Device, Rollout, RolloutDevice
from fleet.registry import (Selector, apply_health, apply_offline, apply_state, device_view, health_summary, new_device,
                            revoke)
from fleet.rollout.plan import HealthNumbers, RolloutSpec, judge_wave, target_mismatch, wave_sizes
from fleet.rollout.state import (
    ACTIVE,
    DONE,
    DOWNLOADING,
    DeviceState,
    RolloutEvent,
    RolloutState,
    device_state_for,
    next_state,
)

log = logging.getLogger("edgeship.fleet.engine")
D, R = DeviceState, RolloutState
RECENT_SAMPLES = 240  # per-device heartbeats kept in memory for pre-update baselines


def command_id(rollout_id: str, kind: str, device_id: str) -> str:
    """Deterministic per rollout+device+kind, so a re-send is idempotent at the agent."""
    return f"{rollout_id}-{kind}-{hashlib.sha256(device_id.encode()).hexdigest()[:20]}"


def split_command_id(cid: str) -> tuple[str, str] | None:
    parts = cid.split("-")
    if len(parts) != 3 or not parts[0].startswith("ro"):
        return None
    return parts[0], parts[1]


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    ignored_revoked: int = 0  # messages from revoked devices, dropped
    batches: int = 0
    published: int = 0
    last_batch: int = 0
    last_batch_s: float = 0.0
    lag_s: float = 0.0  # age of the oldest message of the last batch when it was committed
    reject_codes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "rejected": self.rejected, "ignored_revoked": self.ignored_revoked,
                "batches": self.batches,
                "published": self.published, "last_batch": self.last_batch,
                "last_batch_s": round(self.last_batch_s, 4), "lag_s": round(self.lag_s, 4),
                "reject_codes": dict(self.reject_codes)}


class Engine:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        topics: Topics,
        publish: Callable[[str, bytes], None],
        base_url: str,
        tick_interval_s: float = 0.5,
        batch_max: int = 5000,
        resend_interval_s: float = 30.0,
        heartbeat_timeout_s: float = 180.0,
        fault_limit: int = 5,
    ):
        self.sessions = sessions
        self.topics = topics
        self.publish = publish
        self.base_url = base_url.rstrip("/")
        self.tick_interval_s = tick_interval_s
        self.batch_max = batch_max
        self.resend_interval_s = resend_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.fault_limit = fault_limit  # failed ticks in a row before a rollout is paused with the reason
        self.inbox: queue.Queue = queue.Queue()
        self.stats = Stats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[str, bytes]] = []
        self._last_sent: dict[tuple[str, str], float] = {}  # (rollout, device) -> monotonic; empty after restart
        self._recent: dict[str, deque] = {}  # device -> (ts, requests, errors, p95)
        self._presence: dict[str, tuple[bool, str]] | None = None  # device -> (online, session), as committed
        self._revoked: set[str] | None = None  # revoked devices, as committed; their messages are dropped
        self._revoked_logged: set[str] = set()  # one log line per revoked device per controller run
        self._last_health: dict[str, dict | None] = {}  # device -> health row, for baselines after a restart
        self._next_silence_check = 0.0
        self._faults: dict[str, int] = {}  # rollout -> failed ticks in a row
        self._given_up: set[str] = set()  # rollouts paused for faults: not ticked until an operator acts

    # ---- owner-thread hand-over ------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes) -> None:
        """Called on the MQTT thread: only enqueue, never touch state."""
        self.inbox.put(("msg", topic, payload, time.time()))

    def submit(self, fn: Callable[[Session], Any]) -> Future:
        """Run `fn(session)` on the engine thread in its own transaction."""
        fut: Future = Future()
        self.inbox.put(("call", fn, fut))
        return fut

    def call(self, fn: Callable[[Session], Any], timeout: float = 60.0) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise Conflict("the controller's engine is not running; check `edgeship fleet serve` logs")
        return self.submit(fn).result(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                item = self.inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
                items = [item]
                while len(items) < self.batch_max:
                    try:
                        items.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
            except queue.Empty:
                items = []
            msgs = [i for i in items if i[0] == "msg"]
            if msgs and not self._guard(self._ingest, msgs):
                self._salvage(msgs)
            for item in items:
                if item[0] == "call":
                    self._run_call(item[1], item[2])
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.tick_interval_s

    def _guard(self, fn: Callable, *args: Any) -> bool:
        try:
            with self.sessions.begin() as session:
                fn(session, *args)
        except Exception:  # a bad batch must not stop the controller; it is logged and retried
            log.exception("engine step %s failed", fn.__name__)
            self._outbox.clear()
            self._presence = None  # may be ahead of the rolled-back database: reload
            return False
        self._flush_outbox()
        return True

    def _salvage(self, msgs: list[tuple]) -> None:
        """A batch failed: apply its messages one by one, so one bad message loses only itself.

        If the database itself is away, keep the failed ones, wait, and try again.
        """
        failed = [m for m in msgs if not self._guard(self._ingest, [m])] if len(msgs) > 1 else msgs
        if failed and not self._database_up() and not self._stop.is_set():
            log.error("database unavailable: keeping %d messages and retrying", len(failed))
            self._stop.wait(1.0)
            for m in failed:
                self.inbox.put(m)
        elif failed:
            log.error("dropped %d message(s) that cannot be applied", len(failed))

    def _database_up(self) -> bool:
        try:
            with self.sessions() as session:
                session.execute(select(1))
            return True
        except Exception:
            return False

    def _run_call(self, fn: Callable, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            with self.sessions.begin() as session:
                result = fn(session)
        except BaseException as exc:
            self._outbox.clear()
            fut.set_exception(exc)
            return
        self._flush_outbox()
        fut.set_result(result)

    def _flush_outbox(self) -> None:
        out, self._outbox = self._outbox, []
        for topic, payload in out:
            self.publish(topic, payload)
        self.stats.published += len(out)

    def _send(self, device_id: str, command: Any) -> None:
        self._outbox.append((self.topics.device(device_id, Channel.CMD), encode(command)))

    # ---- ingest ------------------------------------------------------------------------------

    def _ingest(self, session: Session, msgs: list[tuple]) -> None:
        started = time.time()
        parsed: list[tuple[str, Any]] = []
        for _, topic, payload, _ts in msgs:
            where = self.topics.parse(topic)
            if where is None:
                continue
            try:
                parsed.append((where[0], parse_device_message(payload, channel=where[1], device_id=where[0])))
            except ProtocolError as exc:
                self.stats.rejected += 1
                self.stats.reject_codes[exc.code] += 1
                log.debug("rejected message on %s: %s", topic, exc)
        self.stats.received += len(msgs)
        if self._presence is None:
            self._presence = {i: (on, sess) for i, on, sess in session.execute(select(Device.id, Device.online, Device.session))}
        if self._revoked is None:
            self._revoked = set(session.scalars(select(Device.id).where(Device.revoked_at.is_not(None))))
        parsed = self._drop_revoked(parsed)
        # Heartbeats of known, online devices (the bulk of the traffic at scale) skip the ORM:
        # one executemany UPDATE per batch. Any other message puts its device on the ORM path.
        slow_ids = {d for d, m in parsed if not (isinstance(m, HealthMessage) and self._presence.get(d) == (True, m.session))}
        fast_rows: dict[str, dict[str, Any]] = {}
        ids = sorted(slow_ids)
        devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids)))} if ids else {}
        # rollout rows that messages of this batch may touch, fetched once
        rds: dict[tuple[str, str], RolloutDevice] = {}
        rollouts: dict[str, Rollout] = {}
        wanted = {(split_command_id(m.command_id) or ("", ""))[0] for _, m in parsed if isinstance(m, (AckMessage, EventMessage))}
        wanted |= {m.update.command_id.split("-")[0] for _, m in parsed if isinstance(m, StateMessage) and m.update}
        health_ids = [d for d, m in parsed if isinstance(m, HealthMessage)]
        if wanted:
            for r in session.scalars(select(Rollout).where(Rollout.id.in_(sorted(wanted)))):
                rollouts[r.id] = r
        committed_rows = self._observed_rows(session, health_ids) if health_ids else {}
        observed: dict[str, tuple[Rollout, RolloutDevice]] = {}
        for rid_dev, (r, rd) in committed_rows.items():
            rollouts[r.id] = r
            rds[rid_dev] = rd
            observed[rid_dev[1]] = (r, rd)

        def row(rid: str, device_id: str) -> RolloutDevice | None:
            key = (rid, device_id)
            if key not in rds:
                rd = session.get(RolloutDevice, key) if rid in rollouts else None
                if rd is None:
                    return None
                rds[key] = rd
            return rds[key]

        now = time.time()
        for device_id, m in parsed:
            if device_id not in slow_ids:
                fast_rows[device_id] = {"b_id": device_id, "b_seen": now, "b_health": health_summary(m),
                                        "b_active": m.active.model_dump(mode="json") if m.active else None}
                self._health_sample(device_id, m, observed.get(device_id), now)
                continue
            dev = devices.get(device_id)
            if dev is None:
                if isinstance(m, OfflineMessage):
                    continue  # a will from a device we never met says nothing useful
                dev = devices[device_id] = new_device(device_id, now)
                session.add(dev)
            if isinstance(m, StateMessage):
                apply_state(dev, m, now)
                if m.update is not None and (ids_ := split_command_id(m.update.command_id)):
                    rd = row(ids_[0], device_id)
                    if rd is not None:
                        self._on_update(rd, rollouts[ids_[0]], ids_[1], m.update.state, m.update.code, m.update.reason, now)
            elif isinstance(m, OfflineMessage):
                apply_offline(dev, m, now)
            elif isinstance(m, HealthMessage):
                apply_health(dev, m, now)
                self._health_sample(device_id, m, observed.get(device_id), now)
            elif isinstance(m, AckMessage):
                ids_ = split_command_id(m.command_id)
                rd = row(ids_[0], device_id) if ids_ else None
                if rd is not None:
                    self._on_ack(rd, ids_[1], m, now)
            elif isinstance(m, EventMessage):
                ids_ = split_command_id(m.command_id)
                rd = row(ids_[0], device_id) if ids_ else None
                if rd is not None:
                    if m.bytes_done is not None:
                        rd.bytes_done = m.bytes_done
                    self._on_update(rd, rollouts[ids_[0]], ids_[1], m.state, m.code, m.reason, now)
        for dev in devices.values():
            self._presence[dev.id] = (dev.online, dev.session)
        if fast_rows:
            t = Device.__table__
            for with_active in (True, False):
                rows = [r for r in fast_rows.values() if (r["b_active"] is not None) == with_active]
                values = {"last_seen": bindparam("b_seen"), "health": bindparam("b_health")}
                if with_active:
                    values["active"] = bindparam("b_active")
                if rows:
                    session.execute(update(t).where(t.c.id == bindparam("b_id")).values(**values), rows)
        self.stats.batches += 1
        self.stats.last_batch = len(msgs)
        self.stats.last_batch_s = time.time() - started
        self.stats.lag_s = time.time() - min(i[3] for i in msgs)

    def _drop_revoked(self, parsed: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        assert self._revoked is not None
        kept = [(d, m) for d, m in parsed if d not in self._revoked]
        self.stats.ignored_revoked += len(parsed) - len(kept)
        for device_id in sorted({d for d, _ in parsed if d in self._revoked} - self._revoked_logged):
            self._revoked_logged.add(device_id)
            log.warning("ignoring messages from revoked device %s (edgeship fleet device revoke); "
                        "status shows how many (ignored_revoked)", device_id)
        return kept

    def _health_sample(self, device_id: str, m: HealthMessage, hit: tuple[Rollout, RolloutDevice] | None, now: float) -> None:
        """Keep the heartbeat for baselines; add it to the health gate's numbers when observed."""
        inf = m.inference
        self._recent.setdefault(device_id, deque(maxlen=RECENT_SAMPLES)).append((m.ts, inf.requests, inf.errors, inf.p95_ms))
        if hit is None:
            return
        r, rd = hit
        if rd.committed_at is not None and now >= rd.committed_at and (r.observe_until is None or now <= r.observe_until):
            rd.post_requests += inf.requests
            rd.post_errors += inf.errors
            if inf.p95_ms is not None and inf.requests:
                rd.post_p95_sum += inf.p95_ms * inf.requests
                rd.post_p95_weight += inf.requests

    def _observed_rows(self, session: Session, device_ids: list[str]) -> dict[tuple[str, str], tuple[Rollout, RolloutDevice]]:
        """Committed devices of a wave under observation: their heartbeats feed the health gate."""
        q = (select(Rollout, RolloutDevice).join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
             .where(Rollout.state.in_([R.RUNNING, R.PAUSED]), RolloutDevice.state == D.COMMITTED,
                    RolloutDevice.wave == Rollout.current_wave, RolloutDevice.device_id.in_(sorted(set(device_ids)))))
        return {(r.id, rd.device_id): (r, rd) for r, rd in session.execute(q)}

    def _on_ack(self, rd: RolloutDevice, kind: str, m: AckMessage, now: float) -> None:
        if kind == "deploy" and rd.state in (D.SENT, D.WAITING):
            if m.accepted:
                rd.state, rd.acked_at = D.ACCEPTED, now
            else:
                rd.state, rd.done_at, rd.code, rd.reason = D.FAILED, now, (m.code or "rejected")[:64], m.reason or "command rejected"
        elif kind in ("rollback", "cancel") and rd.state == D.ROLLING_BACK:
            rd.acked_at = now
            if not m.accepted:
                rd.code, rd.reason = (m.code or "rejected")[:64], f"rollback rejected: {m.reason}"
                rd.state, rd.done_at = D.FAILED, now
        elif kind == "cancel" and rd.state == D.CANCELLED:
            rd.acked_at = now

    def _on_update(self, rd: RolloutDevice, r: Rollout, kind: str, state: UpdateState, code: str, reason: str, now: float) -> None:
        before = DeviceState(rd.state)
        if kind == "deploy" and before == D.ROLLING_BACK:
            return  # late deploy news for a device we already asked to roll back
        if kind == "deploy" and before == D.CANCELLED and state == UpdateState.COMMITTED and r.state == R.ROLLED_BACK:
            self._rollback_device(r, rd, now)  # the cancel came too late; undo it
            return
        if kind in ("rollback", "cancel") and before != D.ROLLING_BACK:
            return
        after = device_state_for(before, state)
        rd.update_state = state.value
        if after == before:
            return
        if before == D.SENT and rd.acked_at is None:
            rd.acked_at = now  # progress implies the command arrived
        rd.state = after.value
        if after == D.COMMITTED:
            rd.committed_at = rd.done_at = now
        elif after in (D.FAILED, D.ROLLED_BACK):
            rd.done_at = now
            if code or reason:
                rd.code, rd.reason = code[:64], reason

    # ---- tick --------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Silence check, then each rollout in its own transaction: one that fails blocks no other."""
        now = time.time()
        if now >= self._next_silence_check:
            self._next_silence_check = now + min(5.0, self.heartbeat_timeout_s / 4)
            self._guard(self._mark_silent, now)
        ids: list[str] = []
        self._guard(self._tick_ids, ids)
        for rid in ids:
            if rid not in self._given_up:
                self._tick_rollout(rid, now)

    def _mark_silent(self, session: Session, now: float) -> None:
        t = Device.__table__
        silent = session.execute(update(t).where(t.c.online.is_(True), t.c.last_seen < now - self.heartbeat_timeout_s)
                                 .values(online=False, offline_reason="silent").returning(t.c.id)).scalars().all()
        if self._presence is not None:
            for device_id in silent:
                self._presence[device_id] = (False, self._presence.get(device_id, (False, ""))[1])

    def _tick_ids(self, session: Session, out: list[str]) -> None:
        """Rollouts to drive, then those with unacknowledged commands to re-send, into `out`."""
        driven = session.scalars(select(Rollout.id).where(Rollout.state.in_([R.PENDING, R.RUNNING]))
                                 .order_by(Rollout.created_at)).all()
        resend = session.scalars(select(RolloutDevice.rollout_id).distinct().join(Device, Device.id == RolloutDevice.device_id)
                                 .where(RolloutDevice.state.in_([D.SENT, D.ROLLING_BACK]), RolloutDevice.acked_at.is_(None),
                                        Device.online.is_(True))).all()
        out.extend([*driven, *sorted(set(resend) - set(driven))])

    def _tick_rollout(self, rid: str, now: float) -> None:
        try:
            with self.sessions.begin() as session:
                r = session.get(Rollout, rid)
                if r is None:
                    return
                if r.state == R.PENDING:
                    self._transition(r, RolloutEvent.START, now)
                    r.wave_started_at = now
                if r.state == R.RUNNING:
                    self._drive(session, r, now)
                self._resend(session, r, now)
        except Exception as exc:  # this rollout's fault, or the database's: either way not the others'
            self._outbox.clear()
            self._tick_failed(rid, exc, now)
            return
        self._faults.pop(rid, None)
        self._flush_outbox()

    def _tick_failed(self, rid: str, exc: Exception, now: float) -> None:
        """Count a rollout's failed tick; log it once; after `fault_limit` in a row, pause it with the reason."""
        if not self._database_up():
            log.error("database unavailable while driving rollout %s; retrying", rid)
            return
        tries = self._faults[rid] = self._faults.get(rid, 0) + 1
        if tries == 1:
            log.error("rollout %s: the engine cannot drive it (%s: %s); pausing it after %d failed ticks",
                      rid, type(exc).__name__, exc, self.fault_limit, exc_info=exc)
        if tries < self.fault_limit:
            return
        self._given_up.add(rid)  # until an operator acts on it, or the controller restarts
        self._faults.pop(rid, None)
        error = " ".join(str(exc).split())[:600]  # one line: the CLI shows the reason in a table cell
        why = f"the controller failed to drive this rollout {tries} times in a row ({type(exc).__name__}: {error})"
        try:
            with self.sessions.begin() as session:
                r = session.get(Rollout, rid)
                if r.state in (R.PENDING, R.RUNNING):
                    self._transition(r, RolloutEvent.FAULT, now, f"{why}; paused: abort it, or fix the cause and resume")
                else:
                    r.reason, r.updated_at = f"{why}; re-sends stopped until an operator acts on it", now
        except Exception:
            log.exception("rollout %s: cannot record its fault", rid)
        log.warning("rollout %s: %s; left aside until an operator acts on it", rid, why)

    def _transition(self, r: Rollout, event: RolloutEvent, now: float, reason: str | None = None) -> None:
        r.state = next_state(r.state, event).value
        r.updated_at = now
        if reason is not None:
            r.reason = reason
        if r.state in (R.COMPLETED, R.ABORTED, R.ROLLED_BACK):
            r.finished_at = now

    def _drive(self, session: Session, r: Rollout, now: float) -> None:
        spec = RolloutSpec.load(r.spec)
        rows = list(session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id,
                                                                RolloutDevice.wave <= r.current_wave)))
        facts = {i: (on, health) for i, on, health in session.execute(select(Device.id, Device.online, Device.health).where(
            Device.id.in_([rd.device_id for rd in rows if rd.state not in DONE or rd.state == D.SKIPPED])))}
        online = {i: on for i, (on, _) in facts.items()}
        self._last_health = {i: h for i, (_, h) in facts.items()}
        bundle = session.get(Bundle, r.bundle_sha256)
        if r.wave_started_at is None:  # paused before its first tick, then resumed
            r.wave_started_at = now
        deadline_at = r.wave_started_at + spec.device_deadline_s
        busy = sum(1 for rd in rows if rd.state in DOWNLOADING or (rd.state == D.UPDATING and rd.update_state in ("", "downloading")))
        slots = (spec.max_concurrent_downloads - busy) if spec.max_concurrent_downloads else len(rows)
        for rd in rows:
            is_online = bool(online.get(rd.device_id))
            if rd.state == D.PENDING:
                rd.state = D.WAITING.value
            if rd.state == D.SKIPPED and rd.wave < r.current_wave and is_online and slots > 0:
                rd.reason = "came back after the deadline: sent late"
                self._deploy(r, rd, bundle, spec, now)  # a skipped device that returns gets the command then
                slots -= 1
                continue
            if rd.wave != r.current_wave or rd.state in DONE:
                continue
            # a device's deadline runs from its wave's start while it waits, from its deploy once sent
            if now >= (deadline_at if rd.state == D.WAITING or rd.sent_at is None else rd.sent_at + spec.device_deadline_s):
                self._deadline(r, rd, spec, is_online, now)
                continue
            if rd.state == D.WAITING and is_online and slots > 0:
                self._deploy(r, rd, bundle, spec, now)
                slots -= 1
        wave_rows = [rd for rd in rows if rd.wave == r.current_wave]
        if any(rd.state not in DONE for rd in wave_rows):
            return
        # failures count over every wave since the operator last accepted a failed gate
        judged = [rd for rd in rows if rd.state in (D.COMMITTED, D.FAILED) and rd.wave > r.gate_override_wave]
        failed = sum(1 for rd in judged if rd.state == D.FAILED)
        last = r.current_wave == len(r.waves) - 1
        if r.gate_override_wave == r.current_wave:
            self._advance(r, last, now, {"wave": r.current_wave, "passed": True, "reason": "resumed by operator"})
            return
        early = judge_wave(spec, failed=failed, judged=len(judged), baseline=HealthNumbers(0, 0, None), post=HealthNumbers(0, 0, None))
        if r.observe_until is None and early.passed:
            r.observe_until = now + spec.health_window_s
            r.updated_at = now
            return
        if early.passed and now < (r.observe_until or 0):
            return
        committed = [rd for rd in wave_rows if rd.state == D.COMMITTED]
        verdict = judge_wave(spec, failed=failed, judged=len(judged), baseline=_sum_baseline(committed), post=_sum_post(committed))
        record = {"wave": r.current_wave, **verdict.as_dict()}
        if verdict.passed:
            self._advance(r, last, now, record)
            return
        r.gate = [*r.gate, record]
        wave_txt = f"wave {r.current_wave + 1} of {len(r.waves)}"
        if spec.auto_rollback:
            self._transition(r, RolloutEvent.AUTO_ROLLBACK, now, f"health gate failed at {wave_txt}: {verdict.reason}; rolled back")
            self._rollback_all(session, r, now)
        else:
            self._transition(r, RolloutEvent.GATE_FAILED, now, f"health gate failed at {wave_txt}: {verdict.reason}; paused")

    def _advance(self, r: Rollout, last: bool, now: float, record: dict) -> None:
        r.gate = [*r.gate, record]
        r.observe_until = None
        if last:
            self._transition(r, RolloutEvent.LAST_WAVE_PASSED, now, "all waves passed")
        else:
            self._transition(r, RolloutEvent.WAVE_PASSED, now)
            r.current_wave += 1
            r.wave_started_at = now

    def _deadline(self, r: Rollout, rd: RolloutDevice, spec: RolloutSpec, is_online: bool, now: float) -> None:
        if rd.state == D.WAITING and is_online:
            rd.state, rd.code, rd.reason = D.FAILED.value, "throttled", "deadline passed while waiting for a download slot"
        elif rd.state == D.WAITING or not is_online:
            skip = spec.offline_policy == "skip"
            rd.state = (D.SKIPPED if skip else D.FAILED).value
            rd.code, rd.reason = "offline", f"offline past the device deadline ({spec.device_deadline_s:g}s)"
        else:
            rd.state, rd.code = D.FAILED.value, "deadline"
            rd.reason = f"not committed within the device deadline ({spec.device_deadline_s:g}s); last state {rd.update_state or rd.state}"
            self._send(rd.device_id, CancelCommand(id=command_id(r.id, "cancel", rd.device_id), device_id=rd.device_id, rollout_id=r.id))
        rd.done_at = now

    def deploy_command(self, r: Rollout, rd: RolloutDevice, bundle: Bundle, spec: RolloutSpec) -> DeployCommand:
        """The one deploy this rollout ever sends this device: rebuilt identically from the database."""
        urls = list(bundle.urls) if bundle.urls else []
        if not (bundle.url_only and urls) and bundle.stored:
            urls.append(f"{self.base_url}/bundles/{bundle.manifest_sha256}.tar")
        # from the first send, so every re-send (after a restart too) carries the same deadline
        deadline = datetime.fromtimestamp((rd.sent_at or time.time()) + spec.device_deadline_s, tz=timezone.utc)
        return DeployCommand(
            id=rd.command_id, device_id=rd.device_id, rollout_id=r.id, issued_at=rd.sent_at or time.time(),
            bundle=BundleRef(name=bundle.name, version=bundle.version, manifest_sha256=bundle.manifest_sha256),
            urls=urls[:8], size=bundle.size, deadline=deadline, replaces=list(spec.replaces),
            watch=watch_policy(spec),
        )

    def _deploy(self, r: Rollout, rd: RolloutDevice, bundle: Bundle, spec: RolloutSpec, now: float) -> None:
        rd.state = D.SENT.value
        rd.sent_at = rd.sent_at or now
        rd.sends += 1
        base = self._baseline(rd.device_id, spec.health_window_s, now)
        rd.baseline_requests, rd.baseline_errors, rd.baseline_p95_ms = base.requests, base.errors, base.p95_ms
        self._send(rd.device_id, self.deploy_command(r, rd, bundle, spec))
        self._last_sent[(r.id, rd.device_id)] = time.monotonic()

    def _baseline(self, device_id: str, window_s: float, now: float) -> HealthNumbers:
        samples = list(self._recent.get(device_id, ()))
        if not samples:  # e.g. right after a restart: the last heartbeat the database kept
            inf = (self._last_health.get(device_id) or {}).get("inference") or {}
            samples = [(now, inf.get("requests", 0), inf.get("errors", 0), inf.get("p95_ms"))] if inf else []
        recent = [s for s in samples if s[0] >= now - max(window_s, 1.0)] or samples[-3:]
        req = sum(s[1] for s in recent)
        err = sum(s[2] for s in recent)
        weighted = [(s[3], s[1]) for s in recent if s[3] is not None and s[1]]
        p95 = sum(p * n for p, n in weighted) / sum(n for _, n in weighted) if weighted else None
        return HealthNumbers(req, err, p95)

    def _rollback_device(self, r: Rollout, rd: RolloutDevice, now: float) -> None:
        rd.state, rd.sent_at, rd.acked_at, rd.done_at = D.ROLLING_BACK.value, now, None, None
        self._send(rd.device_id, RollbackCommand(id=command_id(r.id, "rollback", rd.device_id), device_id=rd.device_id, rollout_id=r.id))
        self._last_sent[(r.id, rd.device_id)] = time.monotonic()

    def _rollback_all(self, session: Session, r: Rollout, now: float) -> None:
        for rd in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)):
            if rd.state == D.COMMITTED:
                self._rollback_device(r, rd, now)
            elif rd.state in (D.SENT, D.ACCEPTED, D.UPDATING):
                self._cancel_device(r, rd, now)
            elif rd.state in (D.PENDING, D.WAITING, D.SKIPPED):
                rd.state, rd.done_at, rd.reason = D.CANCELLED.value, now, "rollout rolled back before it reached this device"

    def _cancel_device(self, r: Rollout, rd: RolloutDevice, now: float) -> None:
        rd.state, rd.done_at, rd.acked_at, rd.sent_at = D.CANCELLED.value, now, None, now
        rd.reason = f"cancelled while {rd.update_state or 'sent'}"
        self._send(rd.device_id, CancelCommand(id=command_id(r.id, "cancel", rd.device_id), device_id=rd.device_id, rollout_id=r.id))

    def _resend(self, session: Session, r: Rollout, now: float) -> None:
        """Re-publish this rollout's unacknowledged commands (all of them right after a restart)."""
        q = (select(RolloutDevice).join(Device, Device.id == RolloutDevice.device_id)
             .where(RolloutDevice.rollout_id == r.id, RolloutDevice.state.in_([D.SENT, D.ROLLING_BACK]),
                    RolloutDevice.acked_at.is_(None), Device.online.is_(True)))
        mono = time.monotonic()
        bundle, spec = None, None
        for rd in session.scalars(q):
            last = self._last_sent.get((r.id, rd.device_id))
            if last is not None and mono - last < self.resend_interval_s:
                continue
            if rd.state == D.SENT:
                if r.state not in (R.RUNNING, R.PAUSED):
                    continue
                bundle = bundle or session.get(Bundle, r.bundle_sha256)
                spec = spec or RolloutSpec.load(r.spec)
                self._send(rd.device_id, self.deploy_command(r, rd, bundle, spec))
            else:
                self._send(rd.device_id, RollbackCommand(id=command_id(r.id, "rollback", rd.device_id), device_id=rd.device_id, rollout_id=r.id))
            rd.sends += 1
            self._last_sent[(r.id, rd.device_id)] = mono

    # ---- operator calls (run on the engine thread through `call`) ------------------------------

    def create_rollout(self, session: Session, *, bundle_ref: str, selector: str, spec: RolloutSpec) -> str:
        name, _, version = bundle_ref.partition("@")
        bundle = session.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version))
        if bundle is None:
            raise NotFound(f"bundle {bundle_ref!r} is not registered; push it first: edgeship fleet bundle push PATH")
        if not bundle.stored and not bundle.urls:
            raise Conflict(f"bundle {bundle_ref} was removed and has no external URL; push it again")
        sel = Selector.parse(selector)
        devices = [d for d in session.scalars(select(Device).where(Device.revoked_at.is_(None))) if sel.matches(device_view(d))]
        if not devices:
            raise InvalidRequest(f"selector {selector!r} matches no device; list them with: edgeship fleet devices")
        target = bundle.manifest.get("target", {})
        bad = [(d.id, why) for d in devices if (why := target_mismatch(target, d.facts or {}))]
        if bad:
            listed = "; ".join(f"{i}: {why}" for i, why in bad[:20])
            more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
            raise InvalidRequest(f"bundle {bundle_ref} (target {target.get('profile')}) does not fit {len(bad)} selected "
                                 f"device(s): {listed}{more}; narrow --selector")
        ids = [d.id for d in devices]
        busy = session.execute(select(RolloutDevice.device_id, RolloutDevice.rollout_id)
                               .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                               .where(Rollout.state.in_([s.value for s in ACTIVE]), RolloutDevice.device_id.in_(ids))).all()
        if busy:
            listed = ", ".join(f"{d} (in {r})" for d, r in busy[:10])
            raise Conflict(f"{len(busy)} selected device(s) are already in an active rollout: {listed}; "
                           "wait for it, abort it, or narrow --selector")
        now = time.time()
        rid = f"ro{secrets.token_hex(6)}"
        sizes = wave_sizes(spec.waves, len(devices))
        order = sorted(devices, key=lambda d: (not d.online, d.id))  # online devices first: a canary should answer
        session.add(Rollout(id=rid, schema_version=spec.schema_version, bundle_sha256=bundle.manifest_sha256,
                            bundle_ref=bundle_ref, selector=str(sel), state=R.PENDING.value, current_wave=0, waves=sizes,
                            spec=spec.model_dump(mode="json"), wave_started_at=None, observe_until=None,
                            gate_override_wave=-1, reason="", gate=[], created_at=now, updated_at=now, finished_at=None))
        session.flush()
        wave = 0
        rows = []
        for i, d in enumerate(order):
            while i >= sizes[wave]:
                wave += 1
            rows.append(dict(rollout_id=rid, device_id=d.id, wave=wave, state=D.PENDING.value, update_state="",
                             command_id=command_id(rid, "deploy", d.id), sends=0, code="", reason="",
                             baseline_requests=0, baseline_errors=0, post_requests=0, post_errors=0,
                             post_p95_sum=0.0, post_p95_weight=0))
        session.execute(RolloutDevice.__table__.insert(), rows)
        return rid

    def revoke_device(self, session: Session, device_id: str, *, enrolled: bool = False) -> Device:
        """Refuse `device_id` from now on (persisted). `enrolled`: the CA knows it, so record it even if never seen."""
        d = session.get(Device, device_id)
        if d is None:
            try:
                check_device_id(device_id)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if not enrolled:
                raise NotFound(f"device {device_id!r} not found; list them with: edgeship fleet devices "
                               "(a device that never connected: revoke it with --ca-dir)")
            d = new_device(device_id, time.time())
            session.add(d)
        revoke(d, time.time())
        session.flush()
        if self._revoked is not None:
            self._revoked.add(device_id)
        if self._presence is not None:
            self._presence[device_id] = (False, d.session)
        return d

    def operate(self, session: Session, rollout_id: str, event: RolloutEvent) -> None:
        r = session.get(Rollout, rollout_id)
        if r is None:
            raise NotFound(f"rollout {rollout_id!r} not found; list them with: edgeship fleet rollout list")
        now = time.time()
        was, paused_since = r.state, r.updated_at  # nothing else touches a paused rollout's updated_at
        self._transition(r, event, now, reason=f"{event.value} by operator")
        self._given_up.discard(r.id)  # the operator acted: the engine tries it again
        self._faults.pop(r.id, None)
        if event == RolloutEvent.RESUME and was == R.PAUSED:
            if r.wave_started_at is not None:
                r.wave_started_at += max(0.0, now - paused_since)  # device deadlines do not run while paused
            wave_rows = session.scalars(select(RolloutDevice.state).where(RolloutDevice.rollout_id == r.id,
                                                                          RolloutDevice.wave == r.current_wave)).all()
            if all(s in DONE for s in wave_rows):
                r.gate_override_wave = r.current_wave  # the operator judged this wave: go on
            r.observe_until = None
        elif event == RolloutEvent.ABORT:
            for rd in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)):
                if rd.state in (D.SENT, D.ACCEPTED, D.UPDATING):
                    self._cancel_device(r, rd, now)
                elif rd.state in (D.PENDING, D.WAITING):
                    rd.state, rd.done_at, rd.reason = D.CANCELLED.value, now, "rollout aborted"
        elif event == RolloutEvent.ROLLBACK:
            self._rollback_all(session, r, now)


def watch_policy(spec: RolloutSpec) -> WatchPolicy:
    """The rollout's health gate, as each device applies it to itself: the same margin over the device's
    own baseline, the same traffic floor under which nothing is judged (an idle device is not held
    waiting for traffic: the gate does not wait either), the same p95 ratio, and no absolute ceiling
    (a device whose old model already erred at 6 % keeps a new one that still does)."""
    return WatchPolicy(window_s=spec.health_window_s, min_judged_requests=spec.min_requests,
                       max_error_rate_increase=spec.max_error_rate_increase, max_p95_ratio=spec.max_p95_ratio)


def _sum_baseline(rows: list[RolloutDevice]) -> HealthNumbers:
    req = sum(rd.baseline_requests for rd in rows)
    err = sum(rd.baseline_errors for rd in rows)
    weighted = [(rd.baseline_p95_ms, rd.baseline_requests) for rd in rows if rd.baseline_p95_ms is not None and rd.baseline_requests]
    p95 = sum(p * n for p, n in weighted) / sum(n for _, n in weighted) if weighted else None
    return HealthNumbers(req, err, p95)


def _sum_post(rows: list[RolloutDevice]) -> HealthNumbers:
    weight = sum(rd.post_p95_weight for rd in rows)
    p95 = sum(rd.post_p95_sum for rd in rows) / weight if weight else None
    return HealthNumbers(sum(rd.post_requests for rd in rows), sum(rd.post_errors for rd in rows), p95)
