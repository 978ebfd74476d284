"""The quality gate, one for every pipeline: measured metrics against limits -> QualityReport.

A limit's name says its metric and its direction: `min_X` bounds metric X from below, `max_X`
from above (`min_batch_cosine` bounds `batch_cosine_min`). A limit whose metric a pipeline does not
measure is skipped, so one Thresholds object serves LMs and encoders alike. Each failure is one
line naming the metric, its value (with enough digits to show it is out of bounds), the bound and
the limit to relax: `cosine_min 0.9712 < 0.98 (min_cosine_min)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.bundle import QualityReport, QualityStatus

# limits whose metric is not the name after min_/max_
_METRIC_OF = {"min_batch_cosine": "batch_cosine_min"}


@dataclass(frozen=True)
class Evidence:
    """What a pipeline measured, and against what: the gate's whole input."""

    metrics: dict[str, float]
    limits: dict[str, float]
    reference: str  # what the metrics compare with, e.g. "pytorch float32"
    details: dict[str, Any] = field(default_factory=dict)
    refused: tuple[str, ...] = ()  # lines that fail the gate whatever the metrics (the NPU refused the graph)

    def judge(self) -> QualityReport:
        return judge(self.metrics, self.limits, reference=self.reference, details=self.details, refused=self.refused)


def metric_of(limit: str) -> str:
    """The metric a limit bounds: min_top1_agreement -> top1_agreement."""
    return _METRIC_OF.get(limit) or limit.split("_", 1)[1]


def failures(metrics: Mapping[str, float], limits: Mapping[str, float]) -> list[str]:
    """One line per measured metric out of its bounds."""
    out = []
    for key, bound in limits.items():
        metric = metric_of(key)
        if metric not in metrics:
            continue
        value = float(metrics[metric])
        if key.startswith("min_") and not value >= bound:  # NaN fails too
            out.append(f"{metric} {_shown(value, bound, below=True)} < {bound} ({key})")
        elif key.startswith("max_") and not value <= bound:
            out.append(f"{metric} {_shown(value, bound, below=False)} > {bound} ({key})")
    return out


def judge(metrics: Mapping[str, float], limits: Mapping[str, float], *, reference: str, details: dict[str, Any],
          refused: Iterable[str] = ()) -> QualityReport:
    """The report: `refused` lines (e.g. the NPU would not run the graph) first, then each limit missed."""
    lines = [*refused, *failures(metrics, limits)]
    return QualityReport(
        status=QualityStatus.FAILED if lines else QualityStatus.PASSED,
        reference=reference,
        metrics={k: round(float(v), 6) for k, v in metrics.items()},
        thresholds=dict(limits),
        failures=lines,
        details=details,
    )


def _shown(value: float, bound: float, *, below: bool) -> str:
    """`value` with enough decimals to show that it is on the wrong side of `bound`."""
    for digits in range(4, 12):
        text = f"{value:.{digits}f}"
        if (float(text) < bound) if below else (float(text) > bound):
            return text
    return repr(value)
