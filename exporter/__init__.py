"""The workstation role: Hugging Face model (or GGUF) -> optimized, quantized, validated, signed bundle.

    from exporter import export
    result = export("path/or/org-name", out="bundles/x", key="keys/edgeship.key", profile="cpu-x86-avx2")
    result.bundle, result.report

Heavy imports (torch, transformers, optimum) happen inside `export`, not when this package loads.
"""


def export(*args, **kwargs):  # noqa: D103  (documented in exporter.api.export)
    from exporter.api import export as _export

    return _export(*args, **kwargs)


export.__doc__ = "Export a model to a signed bundle; see exporter.api.export."
