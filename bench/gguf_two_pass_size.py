"""Does the two-pass int8 decode (exporter/gguf/levels.py TWO_PASS) pay off? It depends on the model's size.

The exact GGUF graph runs its decoder linears at MatMulNBits level 0 (float32, the GGUF's math). TWO_PASS
runs one-row steps (decode) on level 4's int8 kernel as x = hi + lo (~2e-5 from float) behind an If, at
the price of ~14 small ops per linear and a second packed copy of those weights in memory. This builds one random Q4_0 decoder per shape with the product's graph
builder (exporter.graph.decoder.build_decoder: GroupQueryAttention, fused q/k/v and gate/up, a Q8_0 lm_head
with the default top-16 refinement) and times decode side by side in one run, in alternating rounds:

    level0:  the default policy (decoder linears at level 0)
    2pass:   TWO_PASS_POLICY (opt-in): 4-bit decoder linears of >= 4M weights at TWO_PASS (none of SmolLM2's,
             Qwen2.5-0.5B's gate/up and down, all of TinyLlama's)
    level4:  the decoder linears at level 4 (int8 activations, not exact)
    requant: the same weights dequantized and requantized to int4 asymmetric (uint8 zero points), block 32,
             level 4, lm_head included, embeddings in float (bench/gguf_exact_vs_requant.py's baseline)

    python bench/gguf_two_pass_size.py [--shape tinyllama smollm2] [--rounds 3] [--json OUT]

Random weights: speed only (the exact graphs' logits are not checked here; tests/test_gguf_*.py do that) (Q4_0 has no per-block mins; SmolLM2's own file is Q4_1, whose offsets cost
more ops: bench/gguf_exact_vs_requant.py). Wall-clock medians, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from exporter.graph.decoder import DecoderConfig, DecoderWeights, ExternalData, LayerWeights, build_decoder
from exporter.gguf.levels import EXACT_POLICY, TWO_PASS_POLICY, AccuracyPolicy
from exporter.gguf.quality import OnnxDecoder
from exporter.gguf.repack import BlockWeight

from bench.gguf_exact_vs_requant import requantized

SHAPES = {  # layers, hidden, heads, kv heads, intermediate, vocab
    "smollm2": (30, 576, 9, 3, 1536, 49152),
    "qwen2.5-0.5b": (24, 896, 14, 2, 4864, 151936),
    "tinyllama": (22, 2048, 32, 4, 5632, 32000),
}


def q4_0(rng: np.random.Generator, n: int, k: int) -> BlockWeight:
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scales = (rng.random((n, k // 32), dtype=np.float32) * 0.004 + 0.001).astype(np.float32)
    return BlockWeight("Q4_0", 4, 32, codes, scales, 8, None)


def q8_0(rng: np.random.Generator, n: int, k: int) -> BlockWeight:
    codes = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    scales = (rng.random((n, k // 32), dtype=np.float32) * 0.0002 + 0.0001).astype(np.float32)
    return BlockWeight("Q8_0", 8, 32, codes, scales, 128, None)


def build(shape: str, policy, out: Path, *, requant: bool = False) -> Path:
    layers, hidden, heads, kv, inter, vocab = SHAPES[shape]
    hd = hidden // heads
    cfg = DecoderConfig(architecture="llama", num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                        head_dim=hd, vocab_size=vocab, rms_eps=1e-5, rope_theta=10000.0, rope_dim=hd, max_context=512)
    rng = np.random.default_rng(0)
    ones = np.ones(hidden, np.float32)
    body = [LayerWeights(q=q4_0(rng, hidden, hidden), k=q4_0(rng, kv * hd, hidden), v=q4_0(rng, kv * hd, hidden),
                         o=q4_0(rng, hidden, hidden), gate=q4_0(rng, inter, hidden), up=q4_0(rng, inter, hidden),
                         down=q4_0(rng, hidden, inter), attn_norm=ones, ffn_norm=ones) for _ in range(layers)]
    table = q8_0(rng, vocab, hidden)
    weights = DecoderWeights(embedding=table, layers=body, final_norm=ones, lm_head=table)
    if requant:  # dequantized, then onnxruntime's usual int4 recipe: asymmetric, block 32, level 4
        weights = requantized(weights)
    out.mkdir(parents=True, exist_ok=True)
    external = ExternalData(out / "model.onnx.data")
    model = build_decoder(cfg, weights, accuracy_level=policy, external=external)
    external.close()
    onnx.save_model(model, out / "model.onnx")
    return out / "model.onnx"


def decode_tok_s(dec: OnnxDecoder, prompt: int, new: int) -> float:
    logits, past = dec.run(np.arange(1, prompt + 1)[None], dec.empty_past(), keep=1)
    t0 = time.perf_counter()
    for _ in range(new):
        logits, past = dec.run(np.array([[int(logits[0, -1].argmax())]]), past, keep=1)
    return new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    policies = {
        "level0": EXACT_POLICY,
        "2pass": TWO_PASS_POLICY,
        "level4": AccuracyPolicy({**{c: 4 for c in EXACT_POLICY.levels}}, exact_top_k=EXACT_POLICY.exact_top_k,
                                 name="level-4"),
    }
    results = {}
    for shape in args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            decs = {name: OnnxDecoder(build(shape, policy, Path(tmp) / name), threads=args.threads)
                    for name, policy in policies.items()}
            decs["requant"] = OnnxDecoder(build(shape, 4, Path(tmp) / "requant", requant=True), threads=args.threads)
            for dec in decs.values():
                decode_tok_s(dec, 8, 2)  # warm-up
            runs = {name: [] for name in decs}
            for _ in range(args.rounds):
                for name, dec in decs.items():
                    runs[name].append(decode_tok_s(dec, 64, 32))
        med = {name: statistics.median(r) for name, r in runs.items()}
        ratios = {f"2pass_vs_{other}": med["2pass"] / med[other] for other in ("level0", "level4", "requant")}
        results[shape] = {"decode_tok_s": med, "runs": runs, **ratios}
        print(f"{shape}: decode tok/s (median of {args.rounds}): " + ", ".join(f"{n} {v:.1f}" for n, v in med.items())
              + "; " + ", ".join(f"{k.replace('_vs_', '/')} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                         "cpus": os.cpu_count(), "threads": args.threads, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
