"""Pure arithmetic of a rollout: option parsing, wave sizes, bundle/device matching, the health gate."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.bundle.manifest import NAME_RE
from fleet.errors import InvalidRequest

SPEC_SCHEMA_VERSION = 1
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class DurationRange:
    """The durations a rollout option accepts, in seconds, both ends inclusive."""

    option: str
    low: float
    high: float

    def __str__(self) -> str:
        return f"{_human(self.low)} to {_human(self.high)}"

    def check(self, seconds: float, *, text: str) -> float:
        if not self.low <= seconds <= self.high:
            raise InvalidRequest(f"{self.option} {text!r} is out of range; allowed {self}")
        return seconds


def _human(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"  # 0s, 1.5s


# Bounded so that every deadline the engine computes stays a real date, and so that a typo
# (99999999h) is refused at creation instead of parking devices for centuries.
HEALTH_WINDOW = DurationRange("--health-window", 0.0, 24 * 3600.0)  # 0 judges at once
DEVICE_DEADLINE = DurationRange("--device-deadline", 1.0, 30 * 24 * 3600.0)  # a month offline is a lost device


def parse_duration(text: str, *, what: str, allowed: DurationRange | None = None) -> float:
    """'10m' -> 600.0; '1.5s', '250ms', '2h'; a bare number is seconds; checked against `allowed`."""
    m = _DURATION_RE.match(str(text).strip())
    if not m:
        raise InvalidRequest(f"{what} {text!r} is not a duration; use e.g. 30s, 10m, 1h")
    seconds = float(m[1]) * _UNITS[m[2]]
    return allowed.check(seconds, text=str(text)) if allowed is not None else seconds


def parse_rate(text: str, *, what: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise InvalidRequest(f"{what} {text!r} is not a rate; use e.g. 5% or 0.05") from None
    if not 0 <= value <= 1:
        raise InvalidRequest(f"{what} {text!r} must be between 0% and 100%")
    return value


def parse_waves(text: str) -> list[str]:
    """'1,10%,50%,100%' -> ['1', '10%', '50%', '100%'] (validated; the last must be 100%)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise InvalidRequest("--waves is empty; use e.g. 1,10%,50%,100%")
    for p in parts:
        ok = re.fullmatch(r"\d+", p) and int(p) > 0 or re.fullmatch(r"\d+(\.\d+)?%", p) and 0 < float(p[:-1]) <= 100
        if not ok:
            raise InvalidRequest(f"wave {p!r} in --waves {text!r} must be a device count (5) or a percentage (10%)")
    if parts[-1] != "100%":
        parts.append("100%")  # a rollout always ends with every selected device
    return parts


def wave_sizes(waves: list[str], total: int) -> list[int]:
    """Cumulative device counts per wave, strictly increasing, ending at `total`."""
    out: list[int] = []
    for w in waves:
        n = math.ceil(total * float(w[:-1]) / 100) if w.endswith("%") else int(w)
        n = min(max(n, 1), total)
        if not out or n > out[-1]:
            out.append(n)
    return out or [total]


class RolloutSpec(BaseModel):
    """Everything a rollout was created with; persisted as JSON with a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = SPEC_SCHEMA_VERSION
    waves: list[str]
    max_failure_rate: float = Field(ge=0, le=1)
    health_window_s: float = Field(ge=HEALTH_WINDOW.low, le=HEALTH_WINDOW.high)
    device_deadline_s: float = Field(ge=DEVICE_DEADLINE.low, le=DEVICE_DEADLINE.high)
    auto_rollback: bool = False
    max_concurrent_downloads: int | None = Field(default=None, ge=1, le=1_000_000)
    offline_policy: Literal["fail", "skip"] = "fail"
    max_error_rate_increase: float = Field(default=0.05, ge=0, le=1)  # absolute, over the baseline
    max_p95_ratio: float = Field(default=1.5, gt=0, le=1000)  # post p95 / baseline p95
    min_requests: int = Field(default=1, ge=0, le=1_000_000)  # below this, a wave's traffic cannot be judged
    # bundle names the deployed bundle may replace on a device (a device refuses any other name change)
    replaces: list[Annotated[str, Field(pattern=NAME_RE.pattern)]] = Field(default=[], max_length=16)

    @classmethod
    def load(cls, data: dict[str, Any]) -> RolloutSpec:
        v = data.get("schema_version")
        if v != SPEC_SCHEMA_VERSION:
            raise InvalidRequest(f"rollout spec schema_version {v!r} is unknown to this controller (knows 1); upgrade edgeship")
        return cls.model_validate(data)


def target_mismatch(target: dict[str, Any], facts: dict[str, Any]) -> str | None:
    """Why a bundle's target cannot run on a device with `facts`, or None when it can."""
    arch = facts.get("arch") or ""
    archs = target.get("arch") or []
    if archs and arch not in archs:
        return f"arch {arch or 'unknown'} not in {archs}"
    missing = sorted(set(target.get("cpu_features") or []) - set(facts.get("cpu_features") or []))
    if missing:
        return f"lacks cpu features {missing}"
    return None


@dataclass(frozen=True)
class HealthNumbers:
    requests: int
    errors: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    failure_rate: float
    baseline: HealthNumbers
    post: HealthNumbers

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "reason": self.reason, "failure_rate": round(self.failure_rate, 4),
            "baseline": {"requests": self.baseline.requests, "errors": self.baseline.errors, "p95_ms": self.baseline.p95_ms},
            "post": {"requests": self.post.requests, "errors": self.post.errors, "p95_ms": self.post.p95_ms},
        }


def judge_wave(spec: RolloutSpec, *, failed: int, judged: int, baseline: HealthNumbers, post: HealthNumbers) -> GateVerdict:
    """The health gate: failures over the rate, error rate over baseline + margin, p95 over ratio."""
    rate = failed / judged if judged else 0.0
    if rate > spec.max_failure_rate:
        return GateVerdict(False, f"{failed} of {judged} devices failed ({rate:.0%} > max {spec.max_failure_rate:.0%})",
                           rate, baseline, post)
    if post.requests < max(spec.min_requests, 1):
        return GateVerdict(True, f"passed (only {post.requests} requests after the update: health not judged)",
                           rate, baseline, post)
    base_rate = baseline.error_rate or 0.0
    if post.error_rate is not None and post.error_rate > base_rate + spec.max_error_rate_increase:
        return GateVerdict(False, f"error rate {post.error_rate:.1%} vs baseline {base_rate:.1%} "
                           f"(over +{spec.max_error_rate_increase:.1%})", rate, baseline, post)
    if post.p95_ms is not None and baseline.p95_ms:
        ratio = post.p95_ms / baseline.p95_ms
        if ratio > spec.max_p95_ratio:
            return GateVerdict(False, f"p95 latency {post.p95_ms:.0f} ms vs baseline {baseline.p95_ms:.0f} ms "
                               f"(x{ratio:.2f} > x{spec.max_p95_ratio})", rate, baseline, post)
    return GateVerdict(True, "passed", rate, baseline, post)
