"""Golden inputs and outputs for the agent's smoke test: one prefill call of the bundle's own model.

The outputs come from the exported graph itself (not PyTorch): the device checks that its
onnxruntime reproduces what the export host computed, which catches corrupt weights and broken
runtimes. The tolerance allows for other CPUs' kernels (int8 activations round differently on
AVX2, AVX-512 and NEON).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.bundle import Golden

GOLDEN_DIR = "golden"
GOLDEN_TOKENS = 8


def write_lm_golden(bundle_dir: Path, model_path: Path, prompt: np.ndarray, *, quantized: bool) -> Golden:
    """Run one prefill of `prompt` (1-D token ids) and save inputs/outputs npz under golden/."""
    from exporter.lm import OrtDecoder

    dec = OrtDecoder(model_path)
    ids = prompt[None, :GOLDEN_TOKENS].astype(np.int64)
    feed = dec.feed(ids, dec.empty_past())
    logits, _ = dec.run(ids, dec.empty_past())
    out = bundle_dir / GOLDEN_DIR
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "inputs.npz", **feed)
    np.savez(out / "outputs.npz", logits=logits)
    scale = float(np.abs(logits).max())
    # float32 graphs reproduce to rounding; quantized ones differ by kernel, proportionally to the logits' range.
    atol = 0.05 * scale + 1e-3 if quantized else 1e-3 * max(1.0, scale)
    return Golden(inputs=f"{GOLDEN_DIR}/inputs.npz", outputs=f"{GOLDEN_DIR}/outputs.npz", atol=round(atol, 6), rtol=1e-2)
