"""One weight MatMul of all-MiniLM-L6-v2's shapes, per onnxruntime CPU kernel, side by side.

    python bench/matmul_kernels_minilm.py [--threads 2] [--rounds 30] [--json OUT]

Why MatMulNBits does not speed up the embedding model where per-row int8 does: the kernels alone,
weights hot in cache, on the three shapes of a MiniLM layer (K x N: q/k/v/o 384x384, up 384x1536,
down 1536x384) at M = 18 rows (one text of the mean length of bench/embedding_speed.py's texts)
and M = 576 (a padded batch of 32 such texts):
  - fp32: MatMul (MLAS SGEMM), the baseline
  - u8 x s8: MatMulIntegerToFloat on uint8 codes given as input (the per-row recipe's kernel;
    its activation quantization, separate ops in that graph, is not timed here)
  - nbits8 b32 / nbits8 b128 / nbits4 b32: MatMulNBits, accuracy level 4 (its per-block int8
    activation quantization is inside the kernel, so it is timed)
A round calls every kernel in turn (`calls` times each); the figure is the median over rounds of the
per-round ratio fp32 time / kernel time. Numbers, never pass/fail; noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

SHAPES = {"q/k/v/o 384->384": (384, 384), "up 384->1536": (384, 1536), "down 1536->384": (1536, 384)}
ROWS = (18, 576)
NBITS = {"nbits8 b32": (8, 32), "nbits8 b128": (8, 128), "nbits4 b32": (4, 32)}


def _model(nodes, inputs, n: int, inits):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _session(model, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernels(k: int, n: int, threads: int) -> dict[str, tuple[ort.InferenceSession, str]]:
    """name -> (session, input name): the same random weight [k, n] in every form."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    fp32 = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x_in], n, [numpy_helper.from_array(w, "w")])
    out = {"fp32": (_session(fp32, threads), "x")}
    scale = np.abs(w).max(0) / 63  # 7-bit per-channel, as the per-row recipe on cpu-x86-avx2
    u8s8 = _model([helper.make_node("MatMulIntegerToFloat", ["a", "wq", "sa", "sw", "za"], ["y"], domain="com.microsoft")],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])], n,
                  [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "wq"),
                   numpy_helper.from_array(np.array(1 / 127, np.float32), "sa"),
                   numpy_helper.from_array(scale.astype(np.float32), "sw"),
                   numpy_helper.from_array(np.array(128, np.uint8), "za")])
    out["u8 x s8"] = (_session(u8s8, threads), "a")
    for name, (bits, block) in NBITS.items():
        config = DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, accuracy_level=4, op_types_to_quantize=("MatMul",))
        copy = onnx.ModelProto()
        copy.CopyFrom(fp32)  # the quantizer edits the model it is given
        quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
        quantizer.process()
        out[name] = (_session(quantizer.model.model, threads), "x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node

    rows = []
    for shape, (k, n) in SHAPES.items():
        sessions = kernels(k, n, args.threads)
        for m in ROWS:
            rng = np.random.default_rng(m)
            feeds = {"x": rng.standard_normal((m, k)).astype(np.float32), "a": rng.integers(0, 256, (m, k), dtype=np.uint8)}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, (sess, inp) in sessions.items():
                    for _ in range(3):
                        sess.run(None, {inp: feeds[inp]})  # warm this kernel's weights back into cache
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        sess.run(None, {inp: feeds[inp]})
                    times[name].append((time.perf_counter() - start) / args.calls)
            row = {"shape": shape, "K": k, "N": n, "M": m, "fp32_us": round(statistics.median(times["fp32"]) * 1e6, 1)}
            row |= {f"{name} x fp32": round(statistics.median(a / b for a, b in zip(times["fp32"], times[name])), 3)
                    for name in sessions if name != "fp32"}
            rows.append(row)
            print(f"{shape:<18} M={m:<4} fp32 {row['fp32_us']:8.1f} us  " +
                  "  ".join(f"{name} {row[f'{name} x fp32']:.2f}x" for name in sessions if name != "fp32"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "matmul_kernels_minilm", "threads": args.threads, "rounds": args.rounds,
                                         "calls": args.calls, "onnxruntime": ort.__version__,
                                         "load_average": [round(x, 2) for x in os.getloadavg()], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
