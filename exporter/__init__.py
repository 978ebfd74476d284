"""The workstation role: Hugging Face model (or GGUF) -> optimized, quantized, validated, signed bundle.

    from exporter import ExportRequest, run_export
    result = run_export(ExportRequest(model="path/or/org-name", out="bundles/x", key="keys/edgeship.key",
                                      profile="cpu-x86-avx2"))
    result.bundle, result.report

    from exporter import export          # the same, as keywords: export("org/name", out=..., key=...)

Layout: request.py (ExportRequest) -> run.py (run_export: staging, gate, golden, benchmark, seal,
publish) -> pipelines/ (one module per source) -> graph/ (the decoder graph builder), gate.py,
golden.py, quantize.py. Heavy imports (torch, transformers, optimum) happen inside the pipelines,
not when this package loads.
"""

from typing import Any


def export(*args: Any, **kwargs: Any) -> Any:  # noqa: D103  (documented in exporter.api.export)
    from exporter.api import export as _export

    return _export(*args, **kwargs)


export.__doc__ = "Export a model to a signed bundle; see exporter.api.export."


def __getattr__(name: str) -> Any:
    if name == "ExportRequest":
        from exporter.request import ExportRequest

        return ExportRequest
    if name == "run_export":
        from exporter.run import run_export

        return run_export
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
