"""Speed of the exact GGUF export vs the same model requantized to int4, side by side in one run.

exact:     export_gguf defaults: the GGUF's blocks kept, MatMulNBits accuracy level 0 (the GGUF's float math)
exact-acc4: the same blocks at accuracy level 4 (int8 activations): same speed class as requant, not exact
requant:   the same graph builder, weights dequantized and requantized to MatMulNBits int4 asymmetric
           (uint8 zero points), block 32, accuracy level 4, lm_head included, embeddings in float:
           onnxruntime's usual int4 recipe, so only the weight format differs.

Prefill: one call with a 128-token prompt. Decode: 64 new tokens through the KV cache. 2 threads.
Rounds alternate between the two models so machine load hits both alike; medians are printed.

    python -m bench.gguf_exact_vs_requant [--gguf PATH] [--rounds 3] [--threads 2]   (from the repo root)
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from exporter.gguf.arch import decoder_config, decoder_weights
from exporter.gguf.export import export_gguf
from exporter.gguf.graph import DecoderWeights, ExternalData, build_decoder
from exporter.gguf.quality import OnnxDecoder, _nll, eval_text
from exporter.gguf.reader import GgufFile
from exporter.gguf.repack import BlockWeight


def requant_int4_asym(w: np.ndarray, block: int = 32) -> BlockWeight:
    """Float [N, K] -> int4 asymmetric blocks (range includes 0, as onnxruntime's quantizer does)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    lo = np.minimum(blocks.min(-1), 0)
    hi = np.maximum(blocks.max(-1), 0)
    scale = ((hi - lo) / 15).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    return BlockWeight("int4-asym", 4, block, q.reshape(n, k), scale, zp, None)


def as_float(w) -> np.ndarray:
    return w.dequantize() if isinstance(w, BlockWeight) else w


def requantized(weights: DecoderWeights) -> DecoderWeights:
    layers = []
    for layer in weights.layers:
        changes = {f.name: requant_int4_asym(as_float(getattr(layer, f.name)))
                   for f in dataclasses.fields(layer)
                   if isinstance(getattr(layer, f.name), BlockWeight)}
        layers.append(dataclasses.replace(layer, **changes))
    return dataclasses.replace(weights, embedding=as_float(weights.embedding), layers=layers,
                               lm_head=requant_int4_asym(as_float(weights.lm_head)))


def build_requant(gguf_path: Path, out: Path) -> Path:
    g = GgufFile(gguf_path)
    cfg = decoder_config(g)
    weights = requantized(decoder_weights(g, cfg))
    out.mkdir(parents=True, exist_ok=True)
    external = ExternalData(out / "model.onnx.data")
    model = build_decoder(cfg, weights, accuracy_level=4, external=external)
    external.close()
    onnx.save_model(model, out / "model.onnx")
    return out / "model.onnx"


def measure(dec: OnnxDecoder, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one prompt and `new_tokens` greedy steps."""
    t0 = time.perf_counter()
    logits, past = dec.run(prompt[None], dec.empty_past())
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = np.array([[int(logits[0, -1].argmax())]])
        logits, past = dec.run(nxt, past)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.support.models import smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the SmolLM2-135M-Instruct Q4_1 test model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    gguf_path = args.gguf or smollm2_gguf_path()

    with tempfile.TemporaryDirectory() as tmp:
        exact = export_gguf(gguf_path, Path(tmp) / "exact")
        exact4 = export_gguf(gguf_path, Path(tmp) / "exact-acc4", accuracy_level=4)
        requant_path = build_requant(gguf_path, Path(tmp) / "requant")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(exact.onnx_path.parent)
        ids = np.array(tok(eval_text(), add_special_tokens=False)["input_ids"])
        prompt = ids[: args.prompt_tokens]
        models = {"exact": OnnxDecoder(exact.onnx_path, threads=args.threads),
                  "exact-acc4": OnnxDecoder(exact4.onnx_path, threads=args.threads),
                  "requant-int4": OnnxDecoder(requant_path, threads=args.threads)}
        quality = {}
        for name, dec in models.items():
            logits = dec.run(ids[None, :1024], dec.empty_past())[0][0]
            quality[name] = float(np.exp(_nll(logits, ids[:1024]).mean()))
            measure(dec, prompt[:16], 4)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, dec in models.items():
                results[name].append(measure(dec, prompt, args.new_tokens))

    print(f"{gguf_path.name}: prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians)")
    print(f"{'model':<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'ppl (eval.txt)':>16}")
    med = {}
    for name, runs in results.items():
        med[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"{name:<14}{med[name][0]:>15.1f}{med[name][1]:>15.1f}{quality[name]:>16.3f}")
    base = med["requant-int4"]
    for name in ("exact", "exact-acc4"):
        print(f"{name} / requant-int4: prefill {med[name][0] / base[0]:.3f}x, decode {med[name][1] / base[1]:.3f}x")


if __name__ == "__main__":
    main()
