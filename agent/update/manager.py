"""UpdateManager: the I/O shell around the pure state machine (state.py) and decisions (decide.py).

Commands are answered at once (`handle` -> AckMessage); the update runs on the manager's own
worker thread. Each transition is persisted (persist.py) before its entry action runs, then
published as an EventMessage; `recover()` on start finishes or undoes what a crash interrupted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import platform
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from agent.bundle import BundleError, Manifest, TrustedKeys, VerifiedBundle, unpack
from agent.bundle.archive import archive_ceiling
from agent.runtime.batch_policy import BatchPolicy
from agent.protocol import (
    AckMessage,
    BundleRef,
    CancelCommand,
    DeployCommand,
    MAX_PAYLOAD_BYTES,
    EventMessage,
    ProtocolError,
    ReportCommand,
    RollbackCommand,
    UpdateState,
    UpdateStatus,
    WatchPolicy,
    parse_command,
)
from agent.update import decide
from agent.update.crashpoint import crash_point
from agent.update.download import DownloadOptions, download, fetch_head_any
from agent.update.errors import Cancelled, DiskFull, StateFileError, StoreError, UpdateError
from agent.update.persist import AckRecord, PersistedState, StateFile, UpdateRecord
from agent.update.smoke import run_smoke_test
from agent.update.state import BEFORE_SWITCH, Event, is_rest, next_state, recovery_event
from agent.update.store import BundleStore

log = logging.getLogger("edgeship.update")
S = UpdateState


def _default_load(bundle: VerifiedBundle, **kw: Any):
    from agent.runtime import load_model

    return load_model(bundle, **kw)


@dataclass
class UpdateConfig:
    """How this device applies updates. Built by the service from AgentSettings."""

    state_dir: Path
    device_id: str
    agent_version: str
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    arch: str = field(default_factory=platform.machine)
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    target_profiles: tuple[str, ...] = ()  # accepted manifest target profiles; empty = any
    bundle_names: tuple[str, ...] = ()  # bundle names this device may run; empty = any (a name change needs `replaces`)
    cpu_features: frozenset[str] | None = None  # None = do not check
    providers: list[str] | None = None  # passed to load_model for serving AND the smoke test
    threads: int | None = None
    spin: bool = True  # inference threads spin-wait (agent setting runtime.spin_wait)
    huge_pages: bool = True  # weights on 2 MiB pages after loading (agent setting runtime.huge_pages)
    batching: BatchPolicy | None = None  # concurrent generations batched (api.max_batch, runtime.kv_cache_mb)
    download: DownloadOptions = DownloadOptions()
    disk_margin_bytes: int = 16 * 1024 * 1024
    smoke_timeout_s: float = 120.0
    smoke_latency_budget_ms: float | None = None  # device-wide budget on top of the manifest's
    default_watch: WatchPolicy | None = None  # used when a deploy's watch policy is the default
    max_watch_s: float = 900.0  # a watch ends here even if min_requests was never reached
    baseline_window_s: float = 600.0  # how far back the old model's baseline looks
    min_watch_sample: int = 5  # requests before error rate / p95 may be judged
    watch_poll_s: float = 0.25
    drain_timeout_s: float = 30.0
    max_attempts: int = 3  # restarts in one state before it counts as a loop
    progress_step: float = 0.1  # publish download progress every 10%


@dataclass(frozen=True)
class _Outcome:
    event: Event
    code: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _deadline_outcome(rec: UpdateRecord) -> _Outcome:
    return _Outcome(Event.FAIL, "deadline_passed",
                    f"the deploy deadline {rec.deadline.isoformat()} passed while {rec.state.value}")


def _ref(vb: VerifiedBundle | None) -> BundleRef | None:
    if vb is None:
        return None
    return BundleRef(name=vb.manifest.name, version=vb.manifest.version, manifest_sha256=vb.manifest_sha256)


def _command_id(payload: bytes | str) -> str:
    """Best effort: the id of a command we could not parse, so the ack can name it."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "unknown"  # not worth parsing
    try:
        cid = json.loads(payload).get("id")
        if isinstance(cid, str) and 0 < len(cid) <= 64:
            return cid
    except Exception:  # noqa: BLE001 - unparseable is exactly the case being handled
        pass
    return "unknown"


class UpdateManager:
    """Deploy / rollback / cancel / report, crash-safe. See docs/UPDATES.md."""

    def __init__(self, *, config: UpdateConfig, store: BundleStore, host: Any, publish: Callable[[BaseModel], None],
                 trusted: TrustedKeys, load: Callable[..., Any] = _default_load,
                 on_state_change: Callable[[], None] | None = None, next_seq: Callable[[], int] | None = None):
        self.config, self.store, self.host, self.trusted = config, store, host, trusted
        self._publish, self._load, self._on_state_change = publish, load, on_state_change
        self._seq = next_seq or itertools.count().__next__
        self._file = StateFile(Path(config.state_dir) / "update.json")
        self._state: PersistedState = self._load_state()
        self._announce = False  # the first state of a just-accepted update is published by the worker
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._rollback = threading.Event()
        self._work: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._running = threading.Event()
        self._closed = False
        self._hash_checked: set[str] = set()  # bundles whose every file this process has hashed

    # ---- public ----------------------------------------------------------------------------------

    @property
    def status(self) -> UpdateStatus | None:
        rec = self._state.update
        if rec is None:
            return None
        return UpdateStatus(command_id=rec.command_id, rollout_id=rec.rollout_id, state=rec.state,
                            bundle=rec.bundle, code=rec.code, reason=rec.reason[:2000])

    @property
    def state(self) -> UpdateState:
        return self._state.update.state if self._state.update else S.IDLE

    @property
    def pending_urls(self) -> list[str]:
        """Where the update in progress reads its archive from (empty when none is in progress)."""
        rec = self._state.update
        return list(rec.urls) if rec is not None and not is_rest(rec.state) else []

    def snapshot(self) -> dict[str, Any]:
        """Fields for the service's StateMessage: active, previous, update."""
        active, previous = self.store.pointer()
        return {"active": self._ref_of(active), "previous": self._ref_of(previous), "update": self.status}

    def recover(self) -> None:
        """On start: finish or undo whatever a crash interrupted, make sure the active bundle serves, report."""
        with self._lock:
            rec = self._state.update
            if rec is not None and not is_rest(rec.state):
                attempts = rec.attempts.get(rec.state.value, 0)
                plan = recovery_event(rec.state, attempts, max_attempts=self.config.max_attempts,
                                      deadline_passed=self._deadline_passed(rec))
                log.warning("recovering update %s found in state %s (attempt %d): %s", rec.command_id,
                            rec.state.value, attempts, plan)
                if plan.resume:
                    self._enter(rec.state, reason=f"resumed after restart (attempt {attempts + 1})")
                    self._start_worker()
                else:
                    self._fire(_Outcome(plan.event, plan.code, plan.reason))
            elif rec is not None:
                self._rest_action(rec)
                if self._state.update is rec:  # else a fallback (_fall_back) replaced and reported it
                    self._event(rec)  # re-report the last update's outcome
            self._ensure_serving()
        self._changed()

    def handle(self, command: Any, *, allow_downgrade: bool = False) -> AckMessage:
        """Answer a parsed command at once; an accepted update then runs on the worker thread.

        `allow_downgrade` comes only from an operator on the device (a local install), never from the wire.
        """
        with self._lock:
            seen = self._state.acks.get(command.id)
            if seen is not None:
                return self._ack(command.id, seen, duplicate=True)
            if isinstance(command, DeployCommand):
                verdict = self._accept_deploy(command, allow_downgrade=allow_downgrade)
            elif isinstance(command, RollbackCommand):
                verdict = self._accept_rollback(command)
            elif isinstance(command, CancelCommand):
                verdict = self._accept_cancel(command)
            elif isinstance(command, ReportCommand):
                verdict = decide.OK
            else:
                verdict = decide.Verdict(False, "unknown_command", f"unknown command {type(command).__name__}")
            record = AckRecord(accepted=verdict.ok, code=verdict.code, reason=verdict.reason)
            self._state.acks[command.id] = record
            try:
                self._save()  # the id (and any new update record) is durable before anyone hears "accepted"
            except OSError as exc:  # e.g. disk full: forget the command, as the file on disk does
                self._state, self._announce = self._file.load(), False
                return self._ack(command.id, AckRecord(accepted=False, code="state_not_saved", reason=(
                    f"cannot persist the command ({exc.strerror or exc}); free disk space and resend it")))
        if verdict.ok and self._state.update is not None and self._state.update.command_id == command.id:
            self._start_worker()
        if isinstance(command, ReportCommand):
            if self._state.update is not None:
                self._event(self._state.update)
            self._changed()
        return self._ack(command.id, record)

    def handle_payload(self, payload: bytes | str) -> AckMessage:
        """Parse raw MQTT bytes and handle them; a bad payload is rejected with its ProtocolError code."""
        try:
            command = parse_command(payload)
        except ProtocolError as exc:
            return self._ack(_command_id(payload), AckRecord(accepted=False, code=exc.code, reason=str(exc)))
        if command.device_id != self.config.device_id:
            return self._ack(command.id, AckRecord(accepted=False, code="wrong_device",
                                                   reason=f"command is for {command.device_id!r}, this is {self.config.device_id!r}"))
        return self.handle(command)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no update is in progress (for tests and clean shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_rest(self.state) and self._work.empty() and not self._running.is_set():
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._closed = True  # an update in progress stays persisted; recover() resumes or undoes it
        self._work.put(None)

    # ---- acceptance (pure decisions + state) -----------------------------------------------------

    def _installed(self) -> decide.Installed:
        active, previous = self.store.pointer()
        vb = self._safe_bundle(active)
        return decide.Installed(state=self.state, active_sha=active, previous_sha=previous,
                                active_version=vb.manifest.version if vb else None,
                                active_name=vb.manifest.name if vb else None, free_bytes=self.store.free_bytes())

    def _accept_deploy(self, cmd: DeployCommand, *, allow_downgrade: bool = False) -> decide.Verdict:
        verdict = decide.check_deploy(cmd, self._installed(), at=datetime.now(timezone.utc),
                                      margin=self.config.disk_margin_bytes, allowed_names=self.config.bundle_names,
                                      allow_downgrade=allow_downgrade)
        if verdict.ok and verdict.code == "already_active":
            active, previous = self.store.pointer()
            self._begin(UpdateRecord(command_id=cmd.id, kind="deploy", rollout_id=cmd.rollout_id, state=self.state,
                                     bundle=cmd.bundle, restore_sha=active, restore_previous_sha=previous,
                                     reason=verdict.reason), Event.ALREADY_ACTIVE)
            return decide.OK
        if verdict.ok:
            active, previous = self.store.pointer()
            watch = cmd.watch if (self.config.default_watch is None or "watch" in cmd.model_fields_set) \
                else self.config.default_watch
            self._cancel.clear()
            self._rollback.clear()
            self._begin(UpdateRecord(command_id=cmd.id, kind="deploy", rollout_id=cmd.rollout_id, state=self.state,
                                     bundle=cmd.bundle, urls=cmd.urls, size=cmd.size, deadline=cmd.deadline,
                                     watch=watch, restore_sha=active, restore_previous_sha=previous), Event.DEPLOY)
        return verdict

    def _last_update(self) -> decide.LastUpdate | None:
        rec = self._state.update
        if rec is None:
            return None
        changed = rec.kind == "rollback" or rec.bundle is None or rec.bundle.manifest_sha256 != rec.restore_sha
        return decide.LastUpdate(kind=rec.kind, rollout_id=rec.rollout_id, state=rec.state, changed_active=changed)

    def _accept_rollback(self, cmd: RollbackCommand) -> decide.Verdict:
        state = self.state
        active, previous = self.store.pointer()
        target = self._safe_bundle(previous)
        installed = decide.Installed(state=state, active_sha=active, previous_sha=previous if target else None)
        verdict = decide.check_rollback(cmd, installed, self._last_update(), at=datetime.now(timezone.utc))
        if verdict is decide.ROLL_BACK_NOW:
            self._rollback.set()
            return decide.OK
        if verdict.ok and verdict.code == decide.ALREADY_ROLLED_BACK:
            self._begin(UpdateRecord(command_id=cmd.id, kind="rollback", rollout_id=cmd.rollout_id, state=state,
                                     bundle=self._ref_of(active), restore_sha=active, restore_previous_sha=previous,
                                     reason=verdict.reason), Event.ALREADY_ROLLED_BACK)
            return decide.OK
        if not verdict.ok:
            return verdict
        self._rollback.clear()
        self._begin(UpdateRecord(command_id=cmd.id, kind="rollback", rollout_id=cmd.rollout_id, state=state,
                                 bundle=_ref(target), restore_sha=previous, restore_previous_sha=None), Event.ROLLBACK)
        return decide.OK

    def _accept_cancel(self, cmd: CancelCommand) -> decide.Verdict:
        state = self.state
        if state in BEFORE_SWITCH:
            self._cancel.set()
            return decide.OK
        if is_rest(state):
            return decide.Verdict(False, "nothing_to_cancel", "no update is in progress")
        return decide.Verdict(False, "too_late_to_cancel",
                              f"the update is {state.value} (already switched); send a rollback command instead")

    # ---- transitions -----------------------------------------------------------------------------

    def _begin(self, record: UpdateRecord, event: Event) -> None:
        record.state = next_state(record.state, event)
        record.attempts = {record.state.value: 1}
        record.updated_at = time.time()
        self._state.update = record  # saved together with the ack by handle()
        self._announce = True  # the worker publishes the first state once the ack is out

    def _enter(self, state: UpdateState, *, code: str = "", reason: str = "",
               metrics: dict[str, float] | None = None) -> None:
        """Persist `state` (before its action runs), publish it, then offer the crash point."""
        rec = self._state.update
        rec.state = state
        rec.attempts[state.value] = rec.attempts.get(state.value, 0) + 1
        rec.code, rec.reason = code, reason
        rec.metrics = dict(metrics or {})
        rec.updated_at = time.time()
        try:
            self._save()
        except OSError as exc:  # e.g. ENOSPC: the file on disk still holds the last state; so must memory
            self._state = self._file.load()
            raise UpdateError(f"cannot persist state {state.value}: {exc.strerror or exc}; "
                              "not taking the step", code="state_not_saved") from None
        self._event(rec)
        crash_point(f"state:{state.value}")
        if not is_rest(state):
            self._changed()  # rest states report once their effect is done (see _fire)

    def _fire(self, outcome: _Outcome) -> None:
        rec = self._state.update
        new = next_state(rec.state, outcome.event)
        self._enter(new, code=outcome.code, reason=outcome.reason, metrics=outcome.metrics)
        if is_rest(new):
            self._rest_action(rec)
            self._changed()

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._worker_loop, name="edgeship-update", daemon=True)
            self._worker.start()
        self._running.set()
        self._work.put("run")

    def _worker_loop(self) -> None:
        while not self._closed:
            item = self._work.get()
            if item is None:
                return
            self._running.set()
            try:
                self._run()
            except Exception:  # the worker must survive anything, leaving a consistent state
                log.exception("update worker failed")
            finally:
                if self._work.empty():
                    self._running.clear()

    def _run(self) -> None:
        if self._announce:  # after handle() returned the ack
            self._announce = False
            rec = self._state.update
            self._event(rec)
            crash_point(f"state:{rec.state.value}")
            if is_rest(rec.state):  # a no-op command: its rest effect, then the new retained state
                with self._lock:
                    self._rest_action(rec)
                self._changed()
        while not self._closed:
            with self._lock:
                rec = self._state.update
                if rec is None or is_rest(rec.state):
                    return
                state = rec.state
            if state in BEFORE_SWITCH and self._cancel.is_set():
                outcome = _Outcome(Event.CANCEL, "cancelled", "cancelled by a cancel command; old model kept")
            elif state in BEFORE_SWITCH and self._deadline_passed(rec):
                outcome = _deadline_outcome(rec)
            else:
                outcome = self._action(rec)
                if outcome is None:
                    return
            with self._lock:
                try:
                    self._fire(outcome)
                except UpdateError as exc:
                    log.error("%s", exc)
                    self.store.gc(keep=())  # free what this update wrote, then try to end it
                    if not is_rest(self.state):
                        try:
                            self._fire(_Outcome(Event.FAIL, exc.code, str(exc)))
                        except UpdateError:
                            log.error("cannot end the update either; recover() will on the next start")
                            return

    def _action(self, rec: UpdateRecord) -> _Outcome | None:
        """Run the entry action of `rec.state`; every failure becomes a FAIL outcome with a code."""
        try:
            return {
                S.DOWNLOADING: self._do_download,
                S.VERIFYING: self._do_verify,
                S.STAGING: self._do_stage,
                S.SMOKE_TESTING: self._do_smoke,
                S.SWITCHING: self._do_switch,
                S.WATCHING: self._do_watch,
            }[rec.state](rec)
        except Cancelled as exc:
            if self._closed and not self._cancel.is_set():
                return None  # stopping, not cancelled: the download resumes after the restart
            if not self._cancel.is_set() and self._deadline_passed(rec):
                return _deadline_outcome(rec)  # the deadline stopped the download mid-way
            return _Outcome(Event.CANCEL, exc.code, str(exc))
        except (UpdateError, BundleError) as exc:
            return _Outcome(Event.FAIL, exc.code, str(exc))
        except Exception as exc:  # onnxruntime and OS errors: report, never crash the agent
            log.exception("update step %s failed", rec.state.value)
            return _Outcome(Event.FAIL, "internal_error", f"{type(exc).__name__}: {exc}"[:1500])

    # ---- entry actions ---------------------------------------------------------------------------

    def _do_download(self, rec: UpdateRecord) -> _Outcome:
        sha = rec.bundle.manifest_sha256
        if self.store.has(sha):  # already in the store (e.g. the previous bundle): nothing to fetch
            return _Outcome(Event.DOWNLOADED)
        ceiling = self._check_head(rec)
        part = self.store.download_path(sha)
        last = [-1.0]

        def progress(done: int, total: int | None) -> None:
            frac = done / total if total else 0.0
            if total and (frac - last[0] >= self.config.progress_step or done == total):
                last[0] = frac
                self._emit(EventMessage(**self._base(rec), state=S.DOWNLOADING, bytes_done=done, bytes_total=total))

        try:
            download(rec.urls, part, expected_size=rec.size, max_size=ceiling, opts=self.config.download,
                     progress=progress,
                     cancelled=lambda: self._cancel.is_set() or self._closed or self._deadline_passed(rec))
        except DiskFull:
            part.unlink(missing_ok=True)  # give the space back before persisting the failure
            raise
        return _Outcome(Event.DOWNLOADED, metrics={"bytes": float(part.stat().st_size)})

    def _check_head(self, rec: UpdateRecord) -> int:
        """Trust and compatibility from the archive's manifest, before the payload is fetched.

        Returns the most bytes an archive of this manifest can take (the download's ceiling)."""
        raw, sig = fetch_head_any(rec.urls, self.config.download)
        got = hashlib.sha256(raw).hexdigest()
        if got != rec.bundle.manifest_sha256:
            raise UpdateError(f"the served manifest has sha256 {got}, the command said {rec.bundle.manifest_sha256}",
                              code="manifest_sha_mismatch")
        if not sig:
            raise UpdateError("the bundle archive has no manifest.sig; only signed bundles are installed",
                              code="signature_missing")
        self.trusted.verify(raw, sig)  # UntrustedKey / SignatureError carry their codes
        manifest = Manifest.from_bytes(raw)
        device = decide.DeviceTarget(arch=self.config.arch, agent_version=self.config.agent_version,
                                     execution_providers=tuple(self.config.execution_providers),
                                     profiles=tuple(self.config.target_profiles), cpu_features=self.config.cpu_features)
        verdict = decide.check_manifest(manifest, rec.bundle, device, free_bytes=self.store.free_bytes(),
                                        margin=self.config.disk_margin_bytes)
        if not verdict.ok:
            raise UpdateError(verdict.reason, code=verdict.code)
        return archive_ceiling(manifest, head_bytes=len(raw) + len(sig) + 2 * 512)

    def _do_verify(self, rec: UpdateRecord) -> _Outcome:
        sha = rec.bundle.manifest_sha256
        if self.store.has(sha):
            self.store.bundle(sha, check_hashes=True)
            return _Outcome(Event.VERIFIED)
        part, unpacked = self.store.download_path(sha), self.store.staging_path(sha)
        if not part.exists():
            raise UpdateError(f"the downloaded archive {part.name} is gone (the disk lost it); deploy again",
                              code="download_lost")
        shutil.rmtree(unpacked, ignore_errors=True)  # a half-verified copy from before a crash
        vb = unpack(part, unpacked, self.trusted)  # defensive unpack + signature + every file's sha256
        if vb.manifest_sha256 != sha:
            shutil.rmtree(unpacked, ignore_errors=True)
            raise UpdateError(f"archive's manifest sha256 is {vb.manifest_sha256}, the command said {sha}",
                              code="manifest_sha_mismatch")
        return _Outcome(Event.VERIFIED)

    def _do_stage(self, rec: UpdateRecord) -> _Outcome:
        sha = rec.bundle.manifest_sha256
        self.store.stage(sha)
        self.store.download_path(sha).unlink(missing_ok=True)
        self.store.gc(keep=(sha,))  # keeps active + previous + the new one
        return _Outcome(Event.STAGED)

    def _do_smoke(self, rec: UpdateRecord) -> _Outcome:
        sha = rec.bundle.manifest_sha256
        result = run_smoke_test(self.store.path(sha), sha, providers=self.config.providers, threads=self.config.threads,
                                latency_budget_ms=self.config.smoke_latency_budget_ms, timeout_s=self.config.smoke_timeout_s)
        if not result.ok:
            return _Outcome(Event.FAIL, result.code or "smoke_failed", result.reason, result.metrics())
        return _Outcome(Event.SMOKE_PASSED, reason=f"golden outputs match on {result.execution_provider}",
                        metrics=result.metrics())

    def _do_switch(self, rec: UpdateRecord) -> _Outcome:
        sha = rec.bundle.manifest_sha256
        vb = self._verified_bundle(sha)  # the files may have changed since verifying (e.g. across a restart)
        if rec.kind == "deploy":
            req, err, p95 = self.host.stats.window(time.time() - self.config.baseline_window_s)
            rec.baseline = {"requests": float(req), "errors": float(err), **({"p95_ms": p95} if p95 is not None else {})}
        new = self._load(vb, threads=self.config.threads, providers=self.config.providers, spin=self.config.spin,
                         huge_pages=self.config.huge_pages, batching=self.config.batching)  # loaded BEFORE the swap
        crash_point("switch:before_rename")
        self.store.switch(sha, rec.restore_sha if rec.kind == "deploy" else None)
        crash_point("switch:after_rename")
        rec.switched_at = time.time()
        old = self.host.swap(new)
        drained = self.host.drain(old, self.config.drain_timeout_s)
        metrics = {"drained": 1.0 if drained else 0.0}
        if rec.kind == "rollback":
            self.store.gc()
            return _Outcome(Event.REVERTED, "rolled_back", "explicit rollback to the previous bundle", metrics)
        return _Outcome(Event.SWITCHED, reason=f"serving {vb.manifest.ref} on {getattr(new, 'execution_provider', '?')}",
                        metrics=metrics)

    def _do_watch(self, rec: UpdateRecord) -> _Outcome | None:
        base = decide.WatchSample(int(rec.baseline.get("requests", 0)), int(rec.baseline.get("errors", 0)),
                                  rec.baseline.get("p95_ms"))
        since = rec.switched_at or time.time()
        if rec.restore_sha is None:  # first install: nothing to roll back to
            return _Outcome(Event.WATCH_PASSED, reason="first bundle on this device; nothing to compare or roll back to")
        while True:
            if self._rollback.is_set():
                return _Outcome(Event.ROLLBACK, "rolled_back", "rolled back by a rollback command")
            if self._closed:  # stopping: leave `watching` persisted; recover() rolls back on the next start
                return None
            req, err, p95 = self.host.stats.window(since)
            verdict = decide.judge_watch(rec.watch, baseline=base, current=decide.WatchSample(req, err, p95),
                                         elapsed_s=time.time() - since, max_watch_s=self.config.max_watch_s,
                                         min_sample=self.config.min_watch_sample)
            if verdict.done:
                if verdict.breach:
                    return _Outcome(Event.BREACH, "watch_regression", verdict.reason, verdict.metrics)
                return _Outcome(Event.WATCH_PASSED, "", verdict.reason, verdict.metrics)
            time.sleep(self.config.watch_poll_s)

    # ---- rest states: idempotent, re-run by recover() --------------------------------------------

    def _rest_action(self, rec: UpdateRecord) -> None:
        try:
            self._rest_action_unsafe(rec)
        except Exception:  # keep serving whatever the host has; recover() retries on the next start
            log.exception("finishing %s for update %s failed", rec.state.value, rec.command_id)

    def _rest_action_unsafe(self, rec: UpdateRecord) -> None:
        if rec.state == S.ROLLED_BACK:
            if self.store.pointer() != (rec.restore_sha, rec.restore_previous_sha) and rec.restore_sha \
                    and self.store.has(rec.restore_sha):
                self.store.switch(rec.restore_sha, rec.restore_previous_sha
                                  if rec.restore_previous_sha and self.store.has(rec.restore_previous_sha) else None)
            self._ensure_serving()
            self.store.gc()
        elif rec.state == S.FAILED:
            self._ensure_serving()
            self.store.gc()  # the new bundle, its download and its staging copy
        elif rec.state == S.COMMITTED:
            self.store.gc()

    def _ensure_serving(self) -> None:
        """Make the host serve the pointer's active bundle (after a rollback or a restart); if that
        bundle fails to verify or load, serve the previous one instead (see _fall_back)."""
        active, previous = self.store.pointer()
        current = self.host.current
        if active is None or (current is not None and Path(current.path).name == active):
            return
        try:
            model = self._load_verified(active)
        except Exception as exc:  # a damaged file, a bad signature, onnxruntime refusing the model
            model = self._fall_back(active, previous, exc)
        old = self.host.swap(model)
        self.host.drain(old, self.config.drain_timeout_s)

    def _verified_bundle(self, sha: str) -> VerifiedBundle:
        """Stored bundle `sha`, every file's sha256 checked the first time this process serves it
        (a rollback to a bundle already checked does not read it all again)."""
        vb = self.store.bundle(sha, check_hashes=sha not in self._hash_checked)
        self._hash_checked.add(sha)
        return vb

    def _load_verified(self, sha: str) -> Any:
        """Load stored bundle `sha` for serving, its files checked first (_verified_bundle)."""
        return self._load(self._verified_bundle(sha), threads=self.config.threads, providers=self.config.providers,
                          spin=self.config.spin, huge_pages=self.config.huge_pages,
                          batching=self.config.batching)

    def _fall_back(self, broken: str, previous: str | None, exc: Exception) -> Any:
        """The active bundle cannot serve: load the previous one, make it active (with no previous,
        so the broken one is never tried again), report `rolled_back` / `active_bundle_damaged`.
        Returns the loaded model; raises StoreError when there is nothing intact to fall back to."""
        step = "verify" if isinstance(exc, StoreError) else "load"
        what = f"active bundle {broken[:12]} failed to {step} ({getattr(exc, 'code', type(exc).__name__)}: {exc})"
        if previous is None or previous == broken:
            raise StoreError(f"{what}; there is no previous bundle to fall back to: deploy one",
                             code="active_bundle_damaged") from exc
        try:
            model = self._load_verified(previous)
        except Exception as exc2:
            raise StoreError(f"{what}; the previous bundle {previous[:12]} cannot serve either ({exc2}): "
                             "deploy a bundle", code="active_bundle_damaged") from exc
        reason = f"{what}; serving the previous bundle {previous[:12]} instead"
        log.error("%s", reason)
        rec = self._state.update
        resumed = rec is not None and not is_rest(rec.state)
        if resumed:  # an update resumed before its switch keeps its record; a failure returns to `previous`
            rec.restore_sha, rec.restore_previous_sha = previous, None
        else:
            rec = UpdateRecord(command_id=f"fallback-{self.config.session}", kind="rollback",
                               state=next_state(self.state, Event.ACTIVE_DAMAGED),
                               bundle=_ref(self.store.bundle(previous)), restore_sha=previous,
                               code="active_bundle_damaged", reason=reason, updated_at=time.time())
            self._state.update = rec
        self._save()  # before the pointer moves: a crash in between re-applies rolled_back's pointer
        self.store.switch(previous, None)
        self.store.gc(keep=(rec.bundle.manifest_sha256,) if resumed and rec.bundle else ())
        if not resumed:
            self._event(rec)
        return model

    # ---- messages --------------------------------------------------------------------------------

    def _base(self, rec: UpdateRecord) -> dict[str, Any]:
        return {"device_id": self.config.device_id, "session": self.config.session, "seq": self._seq(),
                "command_id": rec.command_id, "rollout_id": rec.rollout_id, "bundle": rec.bundle}

    def _event(self, rec: UpdateRecord | None) -> None:
        if rec is None:
            return
        self._emit(EventMessage(**self._base(rec), state=rec.state, code=rec.code, reason=rec.reason[:2000],
                                metrics={k: float(v) for k, v in rec.metrics.items()}))

    def _ack(self, command_id: str, record: AckRecord, *, duplicate: bool = False) -> AckMessage:
        return AckMessage(device_id=self.config.device_id, session=self.config.session, seq=self._seq(),
                          command_id=command_id, accepted=record.accepted, code=record.code,
                          reason=record.reason[:2000], duplicate=duplicate)

    def _emit(self, msg: BaseModel) -> None:
        try:
            self._publish(msg)
        except Exception:  # the link buffers and retries; a publish failure never stops an update
            log.exception("publishing %s failed", type(msg).__name__)

    def _changed(self) -> None:
        if self._on_state_change is not None:
            try:
                self._on_state_change()
            except Exception:
                log.exception("on_state_change failed")

    # ---- helpers ---------------------------------------------------------------------------------

    def _load_state(self) -> PersistedState:
        """The persisted state; an unreadable or unknown-version file is moved aside, never guessed at."""
        try:
            return self._file.load()
        except StateFileError as exc:
            aside = self._file.path.with_name(f"{self._file.path.name}.rejected-{int(time.time())}")
            self._file.path.rename(aside)
            log.error("%s; kept as %s, starting with no update in progress (the bundle pointer is unchanged)",
                      exc, aside)
            return PersistedState()

    def _save(self) -> None:
        self._file.save(self._state)

    def _safe_bundle(self, sha: str | None) -> VerifiedBundle | None:
        if not sha or not self.store.has(sha):
            return None
        try:
            return self.store.bundle(sha)
        except StoreError:
            return None

    def _ref_of(self, sha: str | None) -> BundleRef | None:
        return _ref(self._safe_bundle(sha))

    @staticmethod
    def _deadline_passed(rec: UpdateRecord) -> bool:
        return decide.expired(rec.deadline, datetime.now(timezone.utc))
