"""Speed of the exact GGUF export vs the same model requantized to int4, side by side in one run.

exact:        export_gguf defaults: the GGUF's blocks kept; the measured accuracy policy (decoder linears at
              MatMulNBits level 0, the GGUF's float math; lm_head at level 4 with each position's top-16
              logits recomputed exactly; exporter/gguf/levels.py)
exact-2pass:  TWO_PASS_POLICY (opt-in): 4-bit linears of >= 4M weights decode on level 4's int8 kernel in two
              passes (x = hi + lo, ~5e-6 from float; none of SmolLM2's are that big)
exact-2pass-all: TWO_PASS_POLICY with two_pass_min_weights=0: every 4-bit linear decodes in two passes (pays where
              level 0's one-row kernel is slow, as on AVX2 without VNNI; a second packed copy of the body)
exact-acc0:   the same blocks, every MatMulNBits at level 0 (the lm_head's Q8_0 as two exact 4-bit halves)
exact-o4:     the default policy with o_proj at level 4 too (passes SmolLM2's gate, spends half the
              greedy answer's near-tie margin): the next-fastest candidate, not the default
exact-acc4:   the same blocks, every MatMulNBits at level 4 (int8 activations): fast, not the GGUF's math
exact-gateup-o4, exact-mlp-o4, exact-body4-top16: per-class candidates for a default "at least llama.cpp's
              class" (#20): gate/up and o_proj at level 4; all MLP and o_proj; the whole body; each with the
              default's refined lm_head
searched:     the policy recorded in the manifest of a bundle `edgeship export file.gguf` made by default
              (--policy-from BUNDLE): the body at level 4 but for the linears the search kept at level 0
requant-int4: the same weights dequantized and requantized to MatMulNBits int4 asymmetric (uint8 zero
              points), block 32, level 4, lm_head included, embeddings in float: onnxruntime's usual int4
              recipe and the fastest int4 bundle of this model.

Like with like: all the graphs come from exporter.graph.decoder.build_decoder with GroupQueryAttention
(the graph exporter/native.py builds for Hugging Face models before exporter.quantize), q/k/v and
gate/up fused into one MatMulNBits each; only the weight format and the accuracy levels differ.
(The product's own `--requantize` of a GGUF picks HQQ, whose float zero points take onnxruntime's slow
MatMulNBits path; that is slower still and not what this compares against.)

Prefill: one call with a 128-token prompt. Decode: 64 new tokens through the KV cache. 2 threads that
spin when idle, as the agent runs them by default (--no-spin: they sleep, as with runtime.spin_wait =
false). Rounds alternate between the models so machine load hits all alike; medians of wall-clock tok/s, and of CPU ms per token in a 1-thread session of each model (its
ops run on the calling thread, so thread_time counts the model's work alone: steadier under load). With
--quality, each exact model is also judged as the exporter judges it (exporter.gguf.quality: ppl, top-1,
greedy 64-token chat answer vs transformers' fp32 dequantization).

    python -m bench.gguf_exact_vs_requant [--gguf PATH] [--rounds 3] [--threads 2] [--no-spin] [--only VARIANT ...]
                                          [--quality] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from exporter.gguf.arch import decoder_config, decoder_weights
from exporter.gguf.export import export_gguf
from exporter.graph.decoder import DecoderWeights, ExternalData, build_decoder
from exporter.gguf.levels import EXACT_POLICY, TWO_PASS_POLICY, AccuracyPolicy
from exporter.gguf.quality import OnnxDecoder, eval_text, gguf_quality, gguf_reference, nll
from exporter.gguf.reader import GgufFile
from exporter.gguf.repack import BlockWeight

BASELINE = "requant-int4"
TWO_PASS_ALL = dataclasses.replace(TWO_PASS_POLICY, two_pass_min_weights=0, name="two-pass-decode-all")
O_PROJ_AT_4 = AccuracyPolicy({**EXACT_POLICY.levels, "attn_out": 4}, exact_top_k=EXACT_POLICY.exact_top_k, name="o_proj-at-4")
# candidates for issue #20's "at least llama.cpp's class" default (ppl <= +0.5 %, top-1 >= 97 %): per-class levels,
# the largest weights (gate/up) first, the lm_head refined as in the default
MLP_IN_O_AT_4 = AccuracyPolicy({**EXACT_POLICY.levels, "attn_out": 4, "mlp_in": 4},
                               exact_top_k=EXACT_POLICY.exact_top_k, name="gate-up-o-at-4")
MLP_AT_4 = AccuracyPolicy({**EXACT_POLICY.levels, "attn_out": 4, "mlp_in": 4, "mlp_out": 4},
                          exact_top_k=EXACT_POLICY.exact_top_k, name="mlp-o-at-4")
BODY_AT_4 = AccuracyPolicy({c: 4 for c in EXACT_POLICY.levels}, exact_top_k=EXACT_POLICY.exact_top_k,
                           name="body-at-4-top16")


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
    model = build_decoder(cfg, weights, accuracy_level=4, external=external, attention="gqa")
    external.close()
    onnx.save_model(model, out / "model.onnx")
    return out / "model.onnx"


def measure(dec: OnnxDecoder, prompt: np.ndarray, new_tokens: int, *, clock=time.perf_counter) -> tuple[float, float]:
    """(prefill, decode) seconds per token on `clock` for one prompt and `new_tokens` greedy steps."""
    t0 = clock()
    logits, past = dec.run(prompt[None], dec.empty_past(), keep=1)  # as the agent asks: last position only
    t1 = clock()
    for _ in range(new_tokens):
        nxt = np.array([[int(logits[0, -1].argmax())]])
        logits, past = dec.run(nxt, past, keep=1)
    t2 = clock()
    return (t1 - t0) / len(prompt), (t2 - t1) / new_tokens


def measure_both(wall: OnnxDecoder, single: OnnxDecoder, prompt: np.ndarray, new_tokens: int) -> dict[str, float]:
    """tok/s on the wall clock (the benchmark's threads) and CPU ms per token of a 1-thread session, whose ops
    run on this thread: its thread_time counts only the model's work, whatever else loads the machine."""
    pre, dec = measure(wall, prompt, new_tokens)
    pre_cpu, dec_cpu = measure(single, prompt, new_tokens, clock=time.thread_time)
    return {"prefill_tok_s": 1 / pre, "decode_tok_s": 1 / dec,
            "prefill_cpu_ms_per_tok": pre_cpu * 1e3, "decode_cpu_ms_per_tok": dec_cpu * 1e3}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeship.models import smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spin", action=argparse.BooleanOptionalAction, default=True,
                    help="idle intra-op threads spin (the agent's default, runtime.spin_wait) or sleep (--no-spin)")
    ap.add_argument("--only", nargs="*", default=None, metavar="VARIANT",
                    help="exact variants besides `exact` to build and time (default: all)")
    ap.add_argument("--policy-from", type=Path, default=None, metavar="BUNDLE",
                    help="also time `searched`: the accuracy policy in this bundle's manifest (edgeship export's default)")
    ap.add_argument("--quality", action="store_true", help="also judge each exact model against transformers' fp32")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    gguf_path = args.gguf or smollm2_gguf_path()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        exact = export_gguf(gguf_path, Path(tmp) / "exact")
        policies = {"exact-2pass": TWO_PASS_POLICY, "exact-2pass-all": TWO_PASS_ALL, "exact-acc0": 0,
                    "exact-o4": O_PROJ_AT_4, "exact-acc4": 4, "exact-gateup-o4": MLP_IN_O_AT_4,
                    "exact-mlp-o4": MLP_AT_4, "exact-body4-top16": BODY_AT_4}
        paths = {"exact": exact.onnx_path}
        if args.policy_from:
            manifest = json.loads((args.policy_from / "manifest.json").read_text())
            policies["searched"] = AccuracyPolicy.from_details(manifest["quantization"]["details"]["accuracy_levels"])
        for name, policy in policies.items():
            if not args.only or name in args.only or name == "searched":
                paths[name] = export_gguf(gguf_path, Path(tmp) / name, accuracy_level=policy).onnx_path
        paths[BASELINE] = build_requant(gguf_path, Path(tmp) / "requant")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(exact.onnx_path.parent)
        ids = np.array(tok(eval_text(), add_special_tokens=False)["input_ids"])
        prompt = ids[: args.prompt_tokens]
        models = {name: OnnxDecoder(path, threads=args.threads, spinning=args.spin) for name, path in paths.items()}
        single = {name: OnnxDecoder(path, threads=1) for name, path in paths.items()}
        ppl = {}
        for name, dec in models.items():
            logits = dec.run(ids[None, :1024], dec.empty_past())[0][0]
            ppl[name] = float(np.exp(nll(logits, ids[:1024]).mean()))
            measure_both(dec, single[name], prompt[:16], 4)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, dec in models.items():
                runs[name].append(measure_both(dec, single[name], prompt, args.new_tokens))
        load_after = os.getloadavg()
        quality = {}
        if args.quality:
            eos = exact.model_spec.config["eos_token_ids"]
            ref = gguf_reference(gguf_path, exact.onnx_path.parent, eos_token_ids=eos)
            for name in [n for n in paths if n != BASELINE]:
                report = gguf_quality(gguf_path, paths[name], exact.onnx_path.parent, eos_token_ids=eos,
                                      threads=args.threads, reference=ref)
                quality[name] = {"status": report.status.value, **report.metrics,
                                 "greedy_onnx": report.details["greedy_onnx"]}

    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base = med[BASELINE]
    ratios = {name: {"prefill": m["prefill_tok_s"] / base["prefill_tok_s"], "decode": m["decode_tok_s"] / base["decode_tok_s"],
                     "prefill_cpu": base["prefill_cpu_ms_per_tok"] / m["prefill_cpu_ms_per_tok"],
                     "decode_cpu": base["decode_cpu_ms_per_tok"] / m["decode_cpu_ms_per_tok"]}
              for name, m in med.items() if name != BASELINE}
    print(f"{gguf_path.name}: prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'model':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'1-thread cpu ms/tok: prefill':>30}{'decode':>9}{'ppl':>9}")
    for name, m in med.items():
        print(f"{name:<16}{m['prefill_tok_s']:>15.1f}{m['decode_tok_s']:>14.1f}{m['prefill_cpu_ms_per_tok']:>30.2f}"
              f"{m['decode_cpu_ms_per_tok']:>9.2f}{ppl[name]:>9.3f}")
    for name, r in ratios.items():
        print(f"{name} / {BASELINE}: prefill {r['prefill']:.3f}x, decode {r['decode']:.3f}x "
              f"(1-thread CPU: prefill {r['prefill_cpu']:.3f}x, decode {r['decode_cpu']:.3f}x)")
    for name, q in quality.items():
        print(f"{name}: {q['status']}, ppl {q['ppl_delta']:+.4%}, top-1 {q['top1_agreement']:.4f}, "
              f"greedy match {q['greedy_match']:.3f}: {q['greedy_onnx']!r}")
    if args.json:
        import onnxruntime

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gguf": gguf_path.name,
            "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "spin": args.spin, "rounds": args.rounds,
            "prompt_tokens": int(len(prompt)), "new_tokens": args.new_tokens,
            "load_average_before": load_before, "load_average_after": load_after,
            "medians": med, "ratios_vs_requant": ratios, "ppl_eval_txt": ppl, "quality": quality, "runs": runs,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
