"""Errors the exporter raises; each message names the bad value and what to do.

    ExportError(ValueError)
    ├── SourceError                  model id / directory / GGUF / adapter cannot be read
    ├── UnsupportedArchitecture      model_type not exportable (names the supported ones)
    ├── TaskNotSupported             task does not fit this model
    ├── IncompatibleTarget           target profile and precision do not go together
    ├── OutputNotEmpty               --out exists and is not empty (use --overwrite)
    ├── NotEnoughDisk                free space below the estimate, checked before writing
    ├── MissingKey                   signing key missing or unreadable
    ├── ConversionError              ONNX export or quantization failed
    └── QualityGateFailed            metrics over threshold; carries the report (and the bundle with --force)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.bundle import QualityReport


class ExportError(ValueError):
    """Base of every error the exporter raises on purpose."""


class SourceError(ExportError):
    pass


class UnsupportedArchitecture(ExportError):
    pass


class TaskNotSupported(ExportError):
    pass


class IncompatibleTarget(ExportError):
    pass


class OutputNotEmpty(ExportError):
    pass


class NotEnoughDisk(ExportError):
    pass


class MissingKey(ExportError):
    pass


class ConversionError(ExportError):
    pass


class QualityGateFailed(ExportError):
    """The exported model is worse than the thresholds allow. No bundle was written unless `forced`."""

    def __init__(self, message: str, *, report: QualityReport, bundle: Path | None = None):
        super().__init__(message)
        self.report = report
        self.bundle = bundle
