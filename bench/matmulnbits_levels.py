"""Why the exact GGUF bundle decodes slower than an int4 requantization: onnxruntime's MatMulNBits kernels.

An exact GGUF bundle must do the GGUF's float math, so its decoder linears run MatMulNBits at
accuracy level 0 (float32 activations; levels 1-3 take the same kernel on x86). Requantized int4
bundles run level 4 (activations quantized to int8 per block of 32, relative error ~5e-3, which flips
SmolLM2's greedy answer: exporter/gguf/levels.py). This times one 4-bit MatMulNBits per shape, side by
side in one run, at both levels, 1 and 2 intra-op threads, batch 1 (decode) and 128 (prefill).

It also times one idea that did not pay off: keep level 4's int8 kernel but make it exact enough by
splitting x into hi = round(x / s) * s (s = block max / 127: exactly representable in int8 blocks)
and lo = x - hi, and running both as one M=2 call (y = y_hi + y_lo; relative error ~1.5e-5).
Printed as "split M=2": its time excludes the ops that would compute hi and lo in the graph.

    python bench/matmulnbits_levels.py [--rows 1,4,128] [--only TinyLlama] [--json OUT]

Medians of many calls; numbers, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {  # (K, N): x [M, K] @ w^T, w [N, K]
    "SmolLM2 gate_up 576->3072": (576, 3072),
    "SmolLM2 down 1536->576": (1536, 576),
    "SmolLM2 o 576->576": (576, 576),
    "TinyLlama up 2048->5632": (2048, 5632),
    "TinyLlama down 5632->2048": (5632, 2048),
}
BLOCK = 32


def session(k: int, n: int, level: int, threads: int, seed: int = 0) -> ort.InferenceSession:
    rng = np.random.default_rng(seed)
    nb = k // BLOCK
    codes = rng.integers(0, 256, size=(n, nb, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random((n, nb), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=BLOCK, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales.reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def micros(sess: ort.InferenceSession, x: np.ndarray, calls: int) -> float:
    for _ in range(max(5, calls // 10)):
        sess.run(None, {"x": x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def hi_lo(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    s = np.abs(blocks).max(-1, keepdims=True) / 127
    s[s == 0] = 1
    hi = (np.round(blocks / s) * s).astype(np.float32)
    return hi.reshape(x.shape), (blocks - hi).reshape(x.shape).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rows", default="1,128", help="M values, comma-separated (1: decode; 4: four clients' decode)")
    ap.add_argument("--only", default="", help="shapes whose label contains this")
    args = ap.parse_args()
    rows = {}
    print(f"{'shape':28} {'M':>4} {'thr':>3} {'level 0 us':>10} {'level 4 us':>10} {'0 / 4':>6} "
          f"{'split M=2 us':>12} {'err 4':>8} {'err split':>9}")
    for label, (k, n) in SHAPES.items():
        if args.only not in label:
            continue
        rng = np.random.default_rng(1)
        for m in (int(r) for r in args.rows.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for threads in (1, 2):
                s0, s4 = session(k, n, 0, threads), session(k, n, 4, threads)
                calls = 200 if m <= 4 else 20
                t0, t4 = micros(s0, x, calls), micros(s4, x, calls)
                row = {"M": m, "threads": threads, "level0_us": t0, "level4_us": t4}
                split = err4 = err_split = None
                if m == 1:
                    ref = s0.run(None, {"x": x})[0]
                    hi, lo = hi_lo(x)
                    both = s4.run(None, {"x": np.concatenate([hi, lo])})[0]
                    err4 = float(np.abs(s4.run(None, {"x": x})[0] - ref).max() / np.abs(ref).max())
                    err_split = float(np.abs(both[0] + both[1] - ref).max() / np.abs(ref).max())
                    split = micros(s4, np.concatenate([hi, lo]), calls)
                    row |= {"split_m2_us": split, "rel_err_level4": err4, "rel_err_split": err_split}
                rows[f"{label} M={m} threads={threads}"] = row
                print(f"{label:28} {m:>4} {threads:>3} {t0:>10.0f} {t4:>10.0f} {t0 / t4:>6.2f} "
                      f"{'' if split is None else f'{split:.0f}':>12} {'' if err4 is None else f'{err4:.1e}':>8} "
                      f"{'' if err_split is None else f'{err_split:.1e}':>9}")
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
