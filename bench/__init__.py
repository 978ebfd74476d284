"""Benchmarks: numbers, never pass/fail. Shared helpers only; each script is its own entry point."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, path: Path | None) -> None:
    """Print a bench's result as JSON, and write it to `path` too when given (e.g. bench/results/...json)."""
    text = json.dumps(result, indent=2)
    if path:
        path.write_text(text + "\n")
    print(text)
