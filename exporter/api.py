"""`exporter.export(model, out=..., key=..., ...)`: the keyword form of `run_export(ExportRequest(...))`.

Kept for the callers that predate ExportRequest (edgeship demo, agent serve, bench/, tests): every
keyword is an ExportRequest field, validated there; `progress` is how the export reports its steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.progress import Progress
from exporter.request import ExportRequest, bundle_name
from exporter.run import ExportResult, run_export

__all__ = ["ExportResult", "bundle_name", "export"]


def export(model: str | Path, *, progress: Progress | None = None, **options: Any) -> ExportResult:
    """Export `model` (hub id, local directory or .gguf file) to a signed bundle in `options["out"]`.

    `options` are ExportRequest's fields (out, key, profile, task, quant, ...; see exporter/request.py).
    Raises InvalidRequest naming every bad option, QualityGateFailed (with the report) when the gate
    fails and `force` is not set; with `force` the bundle is written with quality status failed-quality.
    """
    return run_export(ExportRequest(model=model, **options), progress=progress)
