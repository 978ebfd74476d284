"""Golden inputs and outputs for the agent's smoke test: one call of the bundle's own model.

The outputs come from the exported graph itself (not PyTorch): the device checks that its
onnxruntime reproduces what the export host computed, which catches corrupt weights and broken
runtimes. The tolerance allows for other CPUs' kernels (int8 activations round differently on
AVX2, AVX-512 and NEON). Each pipeline says what its call is (a GoldenCase); `write_golden` is the
one writer of the files, for LMs and encoders alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import Golden

GOLDEN_DIR = "golden"
GOLDEN_TOKENS = 8


@dataclass(frozen=True)
class GoldenCase:
    """One call of the model: its feed, its outputs by name, and the tolerance a device must meet."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float
    rtol: float


def write_golden(bundle_dir: Path, case: GoldenCase) -> Golden:
    """Save `case` as golden/inputs.npz and golden/outputs.npz under `bundle_dir`."""
    out = bundle_dir / GOLDEN_DIR
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "inputs.npz", **case.inputs)
    np.savez(out / "outputs.npz", **case.outputs)
    return Golden(inputs=f"{GOLDEN_DIR}/inputs.npz", outputs=f"{GOLDEN_DIR}/outputs.npz", atol=round(case.atol, 6),
                  rtol=case.rtol)


def golden_files(bundle_dir: Path) -> list[Path]:
    return [bundle_dir / GOLDEN_DIR / "inputs.npz", bundle_dir / GOLDEN_DIR / "outputs.npz"]


def lm_case(model_path: Path, prompt: np.ndarray, *, quantized: bool) -> GoldenCase:
    """One prefill of the first GOLDEN_TOKENS of `prompt` (1-D token ids) through a KV-cache LM graph."""
    from exporter.lm import OrtDecoder

    dec = OrtDecoder(model_path)
    ids = prompt[None, :GOLDEN_TOKENS].astype(np.int64)
    feed = dec.feed(ids, dec.empty_past())
    logits, _ = dec.run(ids, dec.empty_past())
    scale = float(np.abs(logits).max())
    # float32 graphs reproduce to rounding; quantized ones differ by kernel, proportionally to the logits' range.
    atol = 0.05 * scale + 1e-3 if quantized else 1e-3 * max(1.0, scale)
    return GoldenCase(feed, {"logits": logits}, atol=atol, rtol=1e-2)
