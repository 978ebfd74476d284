"""Progress of the export steps, and the final summary table.

`Progress` is silent (the Python API's default); `RichProgress` shows a spinner with elapsed time
for each long step on stderr and a line when it ends. Step timings are kept either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """Records how long each step took; subclasses draw it."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        t0 = time.perf_counter()
        self._start(name, detail)
        ok = False
        try:
            yield
            ok = True
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            self._end(name, detail, ok)

    def note(self, message: str) -> None:
        pass

    def _start(self, name: str, detail: str) -> None:
        pass

    def _end(self, name: str, detail: str, ok: bool) -> None:
        pass


class RichProgress(Progress):
    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(stderr=True)
        self._status: Any = None

    def _start(self, name: str, detail: str) -> None:
        self._status = self.console.status(f"[bold]{name}[/] {detail}", spinner="dots")
        self._status.start()

    def _end(self, name: str, detail: str, ok: bool) -> None:
        if self._status is not None:
            self._status.stop()
        mark = "[green]done[/]" if ok else "[red]failed[/]"
        self.console.print(f"{mark} {name:<10} {self.timings[name]:8.1f}s  {detail}")

    def note(self, message: str) -> None:
        self.console.print(f"     {message}")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def summary_table(stats: dict[str, Any], report: Any) -> Any:
    """Sizes, quality vs thresholds, speed, memory: one rich Table."""
    from rich.table import Table

    t = Table(title="edgeship export", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("threshold", justify="right")
    t.add_column("", justify="center")
    t.add_row("size fp32 ONNX", _mb(stats.get("fp32_bytes")), "", "")
    t.add_row(f"size {stats.get('precision', '')}", _mb(stats.get("model_bytes")), "", "")
    t.add_row("bundle", _mb(stats.get("bundle_bytes")), "", "")
    for key, limit in report.thresholds.items():
        kind, metric = key.split("_", 1)
        value = report.metrics.get(metric)
        if value is None:
            continue
        ok = value >= limit if kind == "min" else value <= limit
        t.add_row(metric, f"{value:.4g}", f"{'>=' if kind == 'min' else '<='} {limit:g}",
                  "[green]ok[/]" if ok else "[red]FAIL[/]")
    for metric in ("ppl_reference", "ppl", "greedy_match", "top1_agreement", "logits_cosine"):
        if metric in report.metrics and not any(k.endswith(metric) for k in report.thresholds):
            t.add_row(metric, f"{report.metrics[metric]:.4g}", "", "")
    for metric, unit in (("prefill_tok_s", "tok/s"), ("decode_tok_s", "tok/s")):
        if metric in stats:
            t.add_row(metric.replace("_tok_s", ""), f"{stats[metric]:,.1f} {unit}", "", "")
    if stats.get("accuracy_policy"):  # a GGUF import's searched MatMulNBits levels, in one line
        t.add_row("accuracy", str(stats["accuracy_policy"]), "", "")
    t.add_row("export time", f"{stats.get('export_seconds', 0):.1f} s", "", "")
    t.add_row("peak RSS", f"{stats.get('peak_rss_mb', 0):,.0f} MB", "", "")
    status = str(getattr(report.status, "value", report.status))
    t.caption = f"quality: {status}"
    return t
