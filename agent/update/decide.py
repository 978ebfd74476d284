"""Pure decisions of the update machinery: which commands to accept, which manifests this device
can run, and whether a watched model regressed. No I/O: every input is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from agent.bundle import Manifest, QualityStatus, semver_key
from agent.bundle.manifest import agent_version_satisfies
from agent.protocol import BundleRef, DeployCommand, RollbackCommand, UpdateState, WatchPolicy
from agent.update.state import is_rest


@dataclass(frozen=True)
class Verdict:
    ok: bool
    code: str = ""
    reason: str = ""


OK = Verdict(True)


def _no(code: str, reason: str) -> Verdict:
    return Verdict(False, code, reason)


@dataclass(frozen=True)
class Installed:
    """What the device runs now: the facts a deploy decision depends on."""

    state: UpdateState
    active_sha: str | None = None
    active_version: str | None = None
    active_name: str | None = None
    previous_sha: str | None = None
    free_bytes: int = 0


def expired(deadline: datetime | None, at: datetime) -> bool:
    """Has `deadline` (naive = UTC; None = none) passed at `at`?"""
    if deadline is None:
        return False
    return (deadline if deadline.tzinfo else deadline.replace(tzinfo=timezone.utc)) <= at


def _deadline_passed(deadline: datetime, what: str) -> Verdict:
    return _no("deadline_passed", f"the {what} deadline {deadline.isoformat()} has passed; it is never applied "
                                  "(a replayed or late command); send a new one")


def check_name(name: str, *, active_name: str | None, replaces: list[str] | tuple[str, ...],
               allowed: tuple[str, ...]) -> Verdict:
    """May this device run a bundle called `name`? The device's own list first, then the deploy's `replaces`."""
    if allowed and name not in allowed:
        return _no("bundle_not_allowed", f"this device runs only bundles named {', '.join(allowed)} "
                                         f"(agent setting bundle_names), not {name!r}; add it there to allow it")
    if active_name is not None and name != active_name and active_name not in replaces:
        return _no("name_change_refused", f"this device runs {active_name!r}; a deploy of {name!r} must say it "
                                          f"replaces it (`edgeship fleet rollout create --replaces {active_name}`, "
                                          f"or on the device `edgeship agent install --replaces {active_name}`)")
    return OK


def bytes_needed(archive_size: int, *, margin: int) -> int:
    """Archive on disk + its unpacked copy + a margin for the system."""
    return 2 * archive_size + margin


def check_deploy(cmd: DeployCommand, now: Installed, *, at: datetime, margin: int,
                 allowed_names: tuple[str, ...] = (), allow_downgrade: bool = False) -> Verdict:
    """Accept or refuse a deploy from the command alone (nothing downloaded yet).

    The name checked here is the command's; check_manifest later holds the signed manifest to it.
    `allow_downgrade` is set only by an operator on the device (`edgeship agent install --allow-downgrade`).
    """
    ref = cmd.bundle
    if expired(cmd.deadline, at):  # first: an expired deploy is refused whatever else holds
        return _deadline_passed(cmd.deadline, "deploy")
    if not is_rest(now.state):
        return _no("busy", f"an update is in progress ({now.state.value}); cancel it or wait for it to finish")
    try:
        new_key = semver_key(ref.version)
    except ValueError:
        return _no("invalid_version", f"bundle version {ref.version!r} is not a semantic version (e.g. 1.2.0)")
    if ref.manifest_sha256 == now.active_sha:  # accepted: the controller's goal already holds
        return Verdict(True, "already_active", f"{ref.ref} is already the active bundle; nothing to do")
    named = check_name(ref.name, active_name=now.active_name, replaces=cmd.replaces, allowed=allowed_names)
    if not named.ok:
        return named
    if now.active_version is not None and now.active_name == ref.name:
        old_key = semver_key(now.active_version)
        if new_key < old_key and not allow_downgrade:
            return _no("downgrade_refused",
                       f"{ref.ref} is older than the committed {now.active_name}@{now.active_version}; "
                       "send a rollback command to return to the previous bundle")
        if new_key == old_key:
            return _no("version_conflict",
                       f"{ref.ref} has the committed version but a different manifest; bump the version")
    if cmd.size is not None and now.free_bytes < bytes_needed(cmd.size, margin=margin):
        return _no("insufficient_disk", f"{cmd.size} byte bundle needs {bytes_needed(cmd.size, margin=margin)} "
                                        f"bytes free, the device has {now.free_bytes}")
    return OK


@dataclass(frozen=True)
class LastUpdate:
    """The device's last (or current) update, as far as a rollback decision needs it."""

    kind: str  # "deploy" or "rollback"
    rollout_id: str | None
    state: UpdateState
    changed_active: bool  # it installed a bundle (False for a deploy of the bundle already active)


ROLL_BACK_NOW = Verdict(True, "rollback_now")  # during watching: stop watching, roll back
ALREADY_ROLLED_BACK = "already_rolled_back"


def check_rollback(cmd: RollbackCommand, now: Installed, last: LastUpdate | None, *, at: datetime) -> Verdict:
    """Accept or refuse a rollback. A rollback naming a rollout acts only on that rollout's own install,
    so replaying it later can never push the device one bundle further back."""
    if cmd.deadline is None and cmd.rollout_id is None:
        return _no("deadline_missing", "a rollback naming no rollout_id must carry a deadline, so an old one "
                                       "cannot be replayed; give rollout_id or deadline")
    if expired(cmd.deadline, at):
        return _deadline_passed(cmd.deadline, "rollback")
    if cmd.rollout_id is not None and (last is None or last.rollout_id != cmd.rollout_id):
        source = f"rollout {last.rollout_id}" if last is not None and last.rollout_id else "no rollout"
        return _no("rollout_not_active", f"the bundle here did not come from rollout {cmd.rollout_id} "
                                         f"(last update: {source}); nothing rolled back")
    if now.state == UpdateState.WATCHING:
        return ROLL_BACK_NOW
    if not is_rest(now.state):
        return _no("busy", f"an update is {now.state.value}; cancel it instead of rolling back")
    if cmd.rollout_id is not None and last.state in (UpdateState.FAILED, UpdateState.ROLLED_BACK):
        return Verdict(True, ALREADY_ROLLED_BACK, f"rollout {cmd.rollout_id} is not active here (its update ended "
                                                  f"{last.state.value}); nothing to roll back")
    if cmd.rollout_id is not None and not last.changed_active:
        return Verdict(True, ALREADY_ROLLED_BACK, f"rollout {cmd.rollout_id} changed nothing here (its bundle was "
                                                  "already active); nothing to roll back")
    if now.previous_sha is None:
        return _no("no_previous", "there is no previous bundle to roll back to")
    return OK


@dataclass(frozen=True)
class DeviceTarget:
    arch: str
    agent_version: str
    execution_providers: tuple[str, ...]
    profiles: tuple[str, ...] = ()  # accepted target profiles; empty = any
    cpu_features: frozenset[str] | None = None  # None = not checked


def check_manifest(m: Manifest, want: BundleRef, device: DeviceTarget, *, free_bytes: int,
                   margin: int) -> Verdict:
    """Can this device run the (signed, sha-checked) manifest the command names? Before any payload byte."""
    if (m.name, m.version) != (want.name, want.version):
        return _no("bundle_mismatch", f"the manifest is {m.ref}, the command asked for {want.ref}")
    if device.profiles and m.target.profile not in device.profiles:
        return _no("target_mismatch", f"bundle targets profile {m.target.profile!r}; this device takes "
                                      f"{', '.join(device.profiles)}")
    if device.arch not in m.target.arch:
        return _no("arch_mismatch", f"bundle runs on {', '.join(m.target.arch)}; this device is {device.arch}")
    if device.cpu_features is not None:
        missing = sorted(set(m.target.cpu_features) - device.cpu_features)
        if missing:
            return _no("cpu_features_missing", f"bundle needs CPU features {', '.join(missing)} this device lacks")
    wanted = [ep.name for ep in m.runtime.execution_providers]
    if wanted and not set(wanted) & set(device.execution_providers):
        return _no("ep_unavailable", f"bundle runs on {', '.join(wanted)}; this device has "
                                     f"{', '.join(device.execution_providers)}")
    if not agent_version_satisfies(device.agent_version, m.min_agent_version):
        return _no("agent_too_old", f"bundle needs agent >= {m.min_agent_version}, this is "
                                    f"{device.agent_version}; upgrade the agent first")
    if m.quality.status == QualityStatus.FAILED:
        return _no("quality_failed", f"bundle {m.ref} failed its quality gate at export; it is never deployed")
    need = bytes_needed(m.total_size, margin=margin)
    if free_bytes < need:
        return _no("insufficient_disk", f"bundle of {m.total_size} bytes needs {need} bytes free, the device has {free_bytes}")
    return OK


@dataclass(frozen=True)
class WatchSample:
    requests: int
    errors: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class WatchVerdict:
    done: bool
    breach: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def error_rate_limit(policy: WatchPolicy, baseline_rate: float) -> float:
    """The highest error rate the new model may show: the old model's rate plus the margin, under any ceiling."""
    limits = [policy.max_error_rate] if policy.max_error_rate is not None else []
    if policy.max_error_rate_increase is not None:
        limits.append(baseline_rate + policy.max_error_rate_increase)
    return min(limits)


def judge_watch(policy: WatchPolicy, *, baseline: WatchSample, current: WatchSample, elapsed_s: float,
                max_watch_s: float, min_sample: int) -> WatchVerdict:
    """Compare the new model (since the switch) with the old one's baseline.

    Nothing is judged on fewer than max(min_sample, policy.min_judged_requests) requests; the old
    model's error rate counts as its baseline only when it served that many too (else 0: the strict side)."""
    floor = max(1, min_sample, policy.min_judged_requests)
    base_rate = baseline.error_rate if baseline.requests >= floor else 0.0
    limit = error_rate_limit(policy, base_rate)
    metrics = {"requests": float(current.requests), "errors": float(current.errors),
               "error_rate": round(current.error_rate, 4), "elapsed_s": round(elapsed_s, 2),
               "baseline_requests": float(baseline.requests), "baseline_error_rate": round(baseline.error_rate, 4),
               "error_rate_limit": round(limit, 4), "max_p95_ratio": policy.max_p95_ratio}
    for name in ("max_error_rate", "max_error_rate_increase"):
        if getattr(policy, name) is not None:
            metrics[name] = getattr(policy, name)
    if current.p95_ms is not None:
        metrics["p95_ms"] = round(current.p95_ms, 3)
    if baseline.p95_ms is not None:
        metrics["baseline_p95_ms"] = round(baseline.p95_ms, 3)
    enough = current.requests >= floor
    if enough and current.error_rate > limit:
        why = [f"ceiling {policy.max_error_rate:.1%}"] if policy.max_error_rate is not None else []
        if policy.max_error_rate_increase is not None:
            why.insert(0, f"old model {base_rate:.1%} + {policy.max_error_rate_increase:.1%} margin")
        return WatchVerdict(True, True, f"error rate {current.error_rate:.1%} over {current.requests} requests "
                                        f"exceeds {limit:.1%} ({', '.join(why)})", metrics)
    if enough and current.p95_ms is not None and baseline.p95_ms and baseline.requests >= floor:
        ratio = current.p95_ms / baseline.p95_ms
        metrics["p95_ratio"] = round(ratio, 3)
        if ratio > policy.max_p95_ratio:
            return WatchVerdict(True, True, f"p95 latency {current.p95_ms:.1f} ms is {ratio:.2f}x the old model's "
                                            f"{baseline.p95_ms:.1f} ms (limit {policy.max_p95_ratio}x)", metrics)
    if elapsed_s >= policy.window_s and current.requests >= policy.min_requests:
        return WatchVerdict(True, False, f"watched {elapsed_s:.0f}s, {current.requests} requests, no regression", metrics)
    if elapsed_s >= max(max_watch_s, policy.window_s):
        return WatchVerdict(True, False, f"watch ended after {elapsed_s:.0f}s with only {current.requests} of "
                                         f"{policy.min_requests} requests; no regression seen", metrics)
    return WatchVerdict(False, False, "", metrics)
