"""all-MiniLM-L6-v2: the exported int8 embedding model beside a plain float32 ONNX export, side by side.

    python bench/embedding_speed.py [--profile cpu-x86-avx2] [--rounds 15] [--threads 2] [--json bench/results/embedding_speed.json]

Models, all from one run of the exporter (exporter.pipelines.encoder.export_encoder on the real weights that
edgeship/models.py finds):
  - fp32: the plain float32 ONNX export (recipe none), the baseline
  - int8 per-row: the profile's recipe, as `edgeship export` ships it (per-row activation scales,
    per-channel weights, the mixed-precision search's float MatMuls)
  - int8 per-tensor: onnxruntime's quantize_dynamic on the same fp32 graph with the same MatMuls kept
    float, i.e. the recipe before per-row activations (one activation scale per tensor)
  - nbits...: onnxruntime's MatMulNBitsQuantizer on the same fp32 graph (weights in blocks along K with
    a scale and zero point each; accuracy level 4, so the kernel quantizes each activation row to
    int8 per block of K: batch-invariant by construction, no extra ops in the graph). NBITS lists
    the variants: bits, block size, and whether the per-row recipe's float MatMuls stay float.
Text: the evaluation sentences plus the mixed set (short, long, non-English, code), 92 texts.
Quality: cosine against PyTorch float32 (each text alone) at batch 1, 8 and 32 (padded, shuffled so
batches mix lengths), and `batch_cos_min`: a text's vector in a batch vs the same model's alone.
Speed: one text per call (batch 1, as queries arrive) and batches of 32 (as an index is built);
each call runs on every model in turn, a round sums each model's calls over the texts, and the figure
is the median over rounds of the per-round ratio fp32 time / model time, so load from other processes
lands on every model alike.
Numbers taken on a shared machine are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 32)
# name: (bits, block_size, keep the per-row recipe's float MatMuls float)
NBITS = {
    "nbits8 b32 +float": (8, 32, True),
    "nbits8 b32": (8, 32, False),
    "nbits8 b128": (8, 128, False),
    "nbits4 b32": (4, 32, False),
}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def feeds(tokenizer, texts: list[str], names: list[str], size: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Padded batches of `size` in a shuffled order (fixed per size), and that order."""
    order = np.random.default_rng(size).permutation(len(texts)) if size > 1 else np.arange(len(texts))
    out = []
    for start in range(0, len(texts), size):
        enc = tokenizer([texts[i] for i in order[start:start + size]], padding=True, truncation=True, max_length=256,
                        return_tensors="np")
        out.append({n: enc[n].astype(np.int64) for n in names})
    return out, order


def quality(session, layouts, reference: np.ndarray) -> dict[str, float]:
    runs = {}
    for size, (batches, order) in layouts.items():
        out = np.concatenate([session.run(None, f)[0] for f in batches])
        runs[size] = np.empty_like(out)
        runs[size][order] = out
    row: dict[str, float] = {}
    for size, out in runs.items():
        c = cosines(out, reference)
        row[f"b{size}_cos_mean"], row[f"b{size}_cos_min"] = round(float(c.mean()), 5), round(float(c.min()), 5)
    row["batch_cos_min"] = round(float(min(cosines(runs[s], runs[1]).min() for s in runs if s != 1)), 6)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-x86-avx2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--spin", action="store_true", help="let idle pool threads spin (the agent's default; hurts on a shared machine)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from transformers import AutoTokenizer

    from agent.runtime.cpu import cpu_facts
    from agent.runtime.session import session_options
    from edgeship.models import minilm_path
    from exporter import calibration
    from exporter.pipelines.encoder import _graph_module, _load, _resolve, export_encoder
    from exporter.profiles import load_profile

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node

    torch.set_num_threads(args.threads)
    src = minilm_path()
    texts = calibration.eval_texts() + calibration.mixed_eval_texts()
    prof = load_profile(args.profile)
    settings = prof.task("embedding")
    tok = AutoTokenizer.from_pretrained(src)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tok.model_input_names]
    model, _, _ = _load(_resolve(src), "embedding")
    graph = _graph_module(model, names, task="embedding", pooling="mean")
    with torch.no_grad():
        reference = np.concatenate([graph(*(torch.from_numpy(v) for v in f.values())).numpy()
                                    for f in feeds(tok, texts, names, 1)[0]])
    layouts = {size: feeds(tok, texts, names, size) for size in BATCHES}

    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        fp32 = export_encoder(src, work / "fp32", task="embedding", profile=prof,
                              recipe=settings.quantization.model_copy(update={"method": "none"}),
                              thresholds=settings.thresholds)
        int8 = export_encoder(src, work / "int8", task="embedding", profile=prof, recipe=settings.quantization,
                              thresholds=settings.thresholds)
        export_s = time.perf_counter() - t0
        q = int8.quantization.details
        per_tensor = work / "per_tensor.onnx"
        quantize_dynamic(str(fp32.onnx_path), str(per_tensor), per_channel=settings.quantization.per_channel,
                         weight_type=QuantType.QInt8, reduce_range=settings.quantization.reduce_range,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=q["float_nodes"],
                         extra_options={"MatMulConstBOnly": True})
        paths = {"fp32": fp32.onnx_path, "int8 per-row": int8.onnx_path, "int8 per-tensor": per_tensor}
        for name, (bits, block, keep_float) in NBITS.items():
            config = DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, accuracy_level=4,
                                                  op_types_to_quantize=("MatMul",))
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32.onnx_path)), algo_config=config,
                                             nodes_to_exclude=q["float_nodes"] if keep_float else [])
            quantizer.process()
            paths[name] = work / f"{name.replace(' ', '_').replace('+', '')}.onnx"
            onnx.save(quantizer.model.model, str(paths[name]))
        sessions = {name: ort.InferenceSession(str(p), sess_options=session_options(args.threads, spin=args.spin),
                                               providers=["CPUExecutionProvider"]) for name, p in paths.items()}
        rows = {name: quality(s, layouts, reference) | {"mb": round(Path(paths[name]).stat().st_size / 1e6, 1)}
                for name, s in sessions.items()}
        times: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in sessions}
        for _ in range(args.rounds):
            for size in (1, 32):
                spent = dict.fromkeys(sessions, 0.0)
                for f in layouts[size][0]:  # every call in turn on each model: a burst of load hits all alike
                    for name, s in sessions.items():
                        start = time.perf_counter()
                        s.run(None, f)
                        spent[name] += time.perf_counter() - start
                for name in sessions:
                    times[name][size].append(spent[name])
        for name in sessions:
            for size in (1, 32):
                ratios = [a / b for a, b in zip(times["fp32"][size], times[name][size])]
                rows[name][f"b{size}_x_fp32_median"] = round(statistics.median(ratios), 3)
                rows[name][f"b{size}_x_fp32_min"] = round(min(ratios), 3)
                rows[name][f"b{size}_texts_per_s_median"] = round(len(texts) / statistics.median(times[name][size]), 1)
        gate = int8.quality

    result = {
        "bench": "embedding_speed",
        "model": "all-MiniLM-L6-v2",
        "profile": args.profile,
        "recipe": int8.quantization.recipe,
        "float_nodes": q["float_nodes"],
        "float_share_of_macs": q.get("float_share_of_macs"),
        "gate": {"status": gate.status.value, "metrics": gate.metrics, "failures": gate.failures},
        "texts": len(texts),
        "threads": args.threads,
        "spin": args.spin,
        "rounds": args.rounds,
        "export_seconds": round(export_s, 1),
        "host": {"machine": platform.machine(), "cpu": cpu_facts(),
                 "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                 "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "nbits": {name: {"bits": b, "block_size": k, "accuracy_level": 4, "symmetric": False,
                         "float_nodes": q["float_nodes"] if f else []} for name, (b, k, f) in NBITS.items()},
        "models": rows,
    }
    print(f"all-MiniLM-L6-v2, {len(texts)} texts, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"recipe {result['recipe']}, load {result['host']['load_average']}")
    print(f"{'model':<18} {'b1 mean':>8} {'b1 min':>7} {'b32 mean':>8} {'b32 min':>7} {'alone~batch':>11} "
          f"{'b1 x fp32':>9} {'b32 x fp32':>10} {'MB':>6}")
    for name, r in rows.items():
        print(f"{name:<18} {r['b1_cos_mean']:8.4f} {r['b1_cos_min']:7.4f} {r['b32_cos_mean']:8.4f} {r['b32_cos_min']:7.4f} "
              f"{r['batch_cos_min']:11.6f} {r['b1_x_fp32_median']:9.3f} {r['b32_x_fp32_median']:10.3f} {r['mb']:6.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
