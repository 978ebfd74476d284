"""Text sets for calibration and evaluation, and the feed reader onnxruntime's calibrators drive.

Calibration text comes from a file the user gives (`.txt`: one text per line; `.jsonl`: one
object per line with a "text" field) or from the small built-in set in exporter/data/. The
evaluation sentences (real English, varied domains and lengths) are a separate built-in set so
that a recipe chosen on calibration text is judged on text it has not seen; the mixed evaluation
set adds what a device's RAG index also holds: one-word and very long texts, ten other
languages, code, logs and numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_CALIBRATION = DATA_DIR / "calibration.jsonl"
BUILTIN_EVAL = DATA_DIR / "eval_sentences.txt"
BUILTIN_MIXED_EVAL = DATA_DIR / "eval_mixed.txt"


class CalibrationError(ValueError):
    """A calibration or evaluation text file that cannot be used."""


def load_texts(path: str | Path) -> list[str]:
    """Non-empty texts from a .txt (one per line) or .jsonl ({"text": ...} per line) file."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"text file {p} not found; pass a .txt (one text per line) or .jsonl file") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"text file {p} is not UTF-8; re-save it as UTF-8") from None
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{p}:{lineno}: not valid JSON ({exc.msg}); each line must be {{\"text\": ...}}") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise CalibrationError(f"{p}:{lineno}: no non-empty \"text\" string field; each line must be {{\"text\": ...}}")
            texts.append(text.strip())
        else:
            texts.append(line.strip())
    if not texts:
        raise CalibrationError(f"text file {p} holds no text; give at least one non-empty line")
    return texts


def calibration_texts(path: str | Path | None = None, *, limit: int | None = None) -> list[str]:
    """The user's calibration texts, or the built-in set; at most `limit` of them."""
    texts = load_texts(path if path is not None else BUILTIN_CALIBRATION)
    return texts[:limit] if limit else texts


def eval_texts(path: str | Path | None = None) -> list[str]:
    """The user's evaluation texts, or the ~50 built-in English sentences."""
    return load_texts(path if path is not None else BUILTIN_EVAL)


def mixed_eval_texts() -> list[str]:
    """The 40 built-in short, long, non-English and code texts (none of them calibration text)."""
    return load_texts(BUILTIN_MIXED_EVAL)


def batches(feeds: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Row slices of a feed dict, `size` rows at a time."""
    n = len(next(iter(feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in feeds.items()}


class FeedReader(CalibrationDataReader):
    """Hands onnxruntime's calibrator one prepared feed dict at a time."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)
