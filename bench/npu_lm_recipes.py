"""Per-recipe sensitivity of SmolLM2-135M's static NPU graph: which quantized parts cost the quality.

    .venv/bin/python bench/npu_lm_recipes.py [--htp] [--out bench/results/npu_lm_recipes.json]

Builds the float static graph (exporter/pipelines/npu_lm.py) of the packaged SmolLM2-135M once, then measures
each recipe against PyTorch on the NPU gate's evaluation (4 windows of 64 tokens, 4 teacher-forced
greedy runs of 64 tokens):

- recipes: the old profile (16 short calibration texts, everything uint16/int8), calibration windows,
  fp16 regions (residual stream + RMSNorms), both;
- sensitivity on top of the profile's recipe: the Q/DQ pairs of one group of tensors removed (that
  group in float), the rest as quantized. The groups say where the remaining error sits.

`--calibration` measures calibration methods on the profile's recipe instead: min-max (the profile), a global
percentile (99.999 % of each tail) and a per-tensor choice: each activation tensor's range picked among its min-max
and its tails trimmed at 1e-6 .. 1e-3, by the quantization MSE that range gives on the calibration data
(clipping error plus rounding error of the activation type, from a histogram of the tensor).

Cheap proxy: the QDQ model on the CPU EP (float math between Q/DQ pairs). `--htp` also runs the
recipes on onnxruntime-qnn's HTP simulator with CPU fallback off (slow: ~20 calls each, seconds to
a minute per call on a shared 2-core host; the simulator's seconds are not device speed). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import onnx
from onnx import numpy_helper

STEP, CACHE = 32, 256


def strip_qdq(src: Path, dst: Path, *, activations=None, weights=None) -> int:
    """`src` with the Q/DQ pairs of the activations `activations(name)` picks, and the DQ of the weights
    `weights(name)` picks (replaced by their dequantized float values), removed. Returns nodes removed."""
    m = onnx.load(str(src))
    g = m.graph
    outputs = {o.name for o in g.output}
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, rename = set(), {}
    for n in g.node:
        if n.op_type == "QuantizeLinear" and activations and n.input[0] not in inits and activations(n.input[0]):
            dqs = consumers.get(n.output[0], [])
            if all(d.op_type == "DequantizeLinear" and d.output[0] not in outputs for d in dqs):
                drop.add(id(n))
                for d in dqs:
                    drop.add(id(d))
                    rename[d.output[0]] = n.input[0]
        elif n.op_type == "DequantizeLinear" and weights and n.input[0] in inits and weights(n.input[0]) \
                and n.output[0] not in outputs:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zero = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 else np.float32(0)
            if scale.size > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), (zero.reshape(shape) if zero.size > 1 else zero)
            g.initializer.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), n.output[0] + "_f"))
            drop.add(id(n))
            rename[n.output[0]] = n.output[0] + "_f"
    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    del g.node[:]
    g.node.extend(kept)
    onnx.save(m, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return len(drop)


TAILS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)  # share of a tensor's values left outside its range, per tail
BINS = 8192


def activation_ranges(qdq: Path) -> dict[str, tuple[float, float, int]]:
    """Each activation tensor the QDQ model quantizes: its calibrated (rmin, rmax) and the levels of its type."""
    m = onnx.load(str(qdq), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] in out:
            continue
        scale = float(numpy_helper.to_array(inits[n.input[1]]))
        zp_arr = numpy_helper.to_array(inits[n.input[2]])
        info = np.iinfo(zp_arr.dtype)
        zp = float(zp_arr)
        out[n.input[0]] = ((info.min - zp) * scale, (info.max - zp) * scale, int(info.max) - int(info.min))
    return out


def histograms(fp32: Path, work: Path, ranges: dict[str, tuple[float, float, int]], feeds) -> dict[str, np.ndarray]:
    """Counts of each tensor's values over the calibration feeds, BINS bins across its min-max range."""
    import onnxruntime as ort

    m = onnx.load(str(fp32), load_external_data=False)
    inputs = {i.name for i in m.graph.input}
    have = {o.name for o in m.graph.output}
    produced = inputs | {o for n in m.graph.node for o in n.output}
    for name in list(ranges):  # the quantizer renames a graph output it quantizes to X_QuantizeLinear_Input
        plain = name.removesuffix("_QuantizeLinear_Input")
        if plain != name and plain in produced:
            ranges[plain] = ranges.pop(name)
        elif name not in produced:
            ranges.pop(name)  # a tensor of the quantizer's preprocessed graph only
    for name in ranges:
        if name not in inputs and name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    aug = work / "augmented.onnx"
    onnx.save(m, str(aug))  # the weights stay in fp32's data file, beside it
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    counts = {t: np.zeros(BINS, np.int64) for t in ranges}
    for feed in feeds:
        values = dict(zip(names, sess.run(names, feed)))
        for t, (lo, hi, _) in ranges.items():
            x = feed[t] if t in feed else values[t]
            counts[t] += np.histogram(np.asarray(x, np.float32).ravel(), bins=BINS, range=(lo, hi))[0]
    return counts


def mse_choice(counts: np.ndarray, lo: float, hi: float, levels: int) -> tuple[float, float, float, float]:
    """The range among the min-max and its tails trimmed at TAILS with the least quantization MSE:
    (rmin, rmax, its MSE, the min-max range's MSE), both per value."""
    centres = lo + (np.arange(BINS) + 0.5) * (hi - lo) / BINS
    total = counts.sum()
    cdf = np.cumsum(counts) / max(total, 1)

    def edge(p: float, low: bool) -> float:
        if p == 0:
            return lo if low else hi
        i = int(np.searchsorted(cdf, p if low else 1 - p))
        return float(centres[min(i, BINS - 1)])

    def mse(a: float, b: float) -> float:
        a, b = min(a, 0.0), max(b, 0.0)  # the quantizer keeps 0 exact, so its range holds it
        step = (b - a) / levels
        clip = np.where(centres < a, a - centres, np.where(centres > b, centres - b, 0.0))
        inside = counts[(centres >= a) & (centres <= b)].sum()
        return float(((counts * clip ** 2).sum() + inside * step * step / 12) / max(total, 1))

    best = min(((mse(edge(pl, True), edge(ph, False)), edge(pl, True), edge(ph, False)) for pl in TAILS for ph in TAILS))
    return best[1], best[2], best[0], mse(lo, hi)


def calibration_methods(fp32: Path, work: Path, recipe, feeds, keep, out: dict, cpu, htp) -> None:
    """min-max vs a global percentile vs a per-tensor MSE choice, each on the profile's recipe (module docstring)."""
    from exporter import npu
    from exporter.pipelines import npu_lm

    weights = npu_lm.per_channel_weights(fp32, recipe)

    def quantize(name: str, ranges: dict[str, tuple[float, float]] | None) -> Path:
        path = work / f"cal{len(out)}.onnx"
        overrides = {**(weights or {}), **{t: [{"rmin": np.float32(a), "rmax": np.float32(b)}] for t, (a, b) in (ranges or {}).items()}}
        # (overrides name tensors as the float graph does: the quantizer renames graph outputs after reading them)
        t0 = time.perf_counter()
        npu.quantize_qdq(fp32, path, recipe=recipe, feeds=feeds, init_overrides=overrides, float_nodes=keep)
        out[name] = {"quantize_seconds": round(time.perf_counter() - t0, 1)}
        return path

    base = quantize("min-max (the profile)", None)
    out["min-max (the profile)"]["cpu_ep"] = cpu(base)
    ranges = activation_ranges(base)
    counts = histograms(fp32, work, ranges, feeds)  # renames `ranges` to the float graph's tensors
    chosen, pct, moved = {}, {}, []
    for t, (lo, hi, levels) in ranges.items():
        a, b, err, err_minmax = mse_choice(counts[t], lo, hi, levels)
        chosen[t] = (a, b)
        if (a, b) != (lo, hi):
            moved.append({"tensor": t, "minmax": [round(lo, 4), round(hi, 4)], "chosen": [round(a, 4), round(b, 4)],
                          "mse_ratio": round(err / err_minmax, 4) if err_minmax else None})
        centres = lo + (np.arange(BINS) + 0.5) * (hi - lo) / BINS
        cdf = np.cumsum(counts[t]) / max(counts[t].sum(), 1)
        pct[t] = (min(float(centres[int(np.searchsorted(cdf, 1e-5))]), 0.0),
                  max(float(centres[min(int(np.searchsorted(cdf, 1 - 1e-5)), BINS - 1)]), 0.0))
    print(f"{len(ranges)} activation tensors; MSE moved {len(moved)} off min-max", flush=True)
    for name, picked in (("percentile 99.999 % (every tensor)", pct), ("per-tensor MSE choice", chosen)):
        path = quantize(name, picked)
        out[name]["cpu_ep"] = cpu(path)
        if htp:
            out[name]["htp"] = htp(path)
        print(name, json.dumps(out[name]), flush=True)
    out["per-tensor MSE choice"]["tensors"] = len(ranges)
    out["per-tensor MSE choice"]["moved_off_minmax"] = sorted(moved, key=lambda r: r["mse_ratio"] or 1)[:20]
    out["per-tensor MSE choice"]["moved_count"] = len(moved)
    if htp:
        out["min-max (the profile)"]["htp"] = htp(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--htp", action="store_true", help="also run each recipe on the HTP simulator")
    parser.add_argument("--calibration", action="store_true",
                        help="measure calibration methods (min-max, percentile, per-tensor MSE) instead")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import onnxruntime as ort

    from edgeship.models import smollm2_gguf_path
    from exporter import calibration, npu, npu_recipe, quality
    from exporter.graph.decoder import ExternalData
    from exporter.pipelines import native_lm as native
    from exporter.pipelines import npu_lm
    from exporter.profiles import load_profile
    from exporter.source import load_causal_lm, load_tokenizer, resolve_source

    profile = load_profile("npu-qnn-htp")
    options = {**npu.DEFAULT_PROVIDER_OPTIONS, **profile.execution_providers[0].options}
    # the w8a16 QDQ recipe (`--quant int8` on this profile; its LM default is fp16)
    recipe = profile.task("text-generation").quantization.model_copy(update={"method": "qdq-static"})
    work = Path(tempfile.mkdtemp(prefix="edgeship-npu-recipes-"))
    src = resolve_source(str(smollm2_gguf_path()))
    model, tok = load_causal_lm(src), load_tokenizer(src)
    ref = quality.lm_reference(model, tok, quality.read_texts(None), max_context=CACHE, **npu_lm.EVAL_SIZE)
    texts = calibration.calibration_texts(None)
    prompts = [np.array(tok(t, add_special_tokens=False)["input_ids"], np.int64) for t in texts]
    cfg, weights = native.decoder_from_hf(model, max_context=CACHE)
    fp32 = work / "model.fp32.onnx"
    external = ExternalData(work / "model.fp32.onnx.data")
    try:
        graph = npu_lm.build_static_decoder(cfg, weights, step=STEP, cache=CACHE, external=external)
    finally:
        external.close()
    onnx.save(graph, str(fp32))
    del model, weights, graph
    results: dict = {"model": "SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized)", "eval": npu_lm.EVAL_SIZE,
                     "recipes": {}, "sensitivity": {}}

    def measure(path: Path, run) -> dict:
        t0 = time.perf_counter()
        lm = npu_lm.decoder(run.run, cfg, step=STEP, cache=CACHE, output_names=[o.name for o in run.get_outputs()])
        m, _ = npu_lm.static_metrics(lm, ref)
        out = {k: round(m[k], 4) for k in ("ppl_delta", "top1_agreement", "greedy_match", "logits_cosine",
                                           "logits_cosine_min")}
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    def cpu(path: Path) -> dict:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return measure(path, ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))

    def htp(path: Path, fp16: bool) -> dict:
        opts = {**options, "enable_htp_fp16_precision": "1" if fp16 else "0"}
        try:
            return measure(path, npu_lm.htp_session(path, opts))
        except Exception as exc:  # a graph the HTP refuses is a result too
            return {"error": str(exc).splitlines()[0][:300]}

    feeds = {
        "short": npu_lm.calibration_feeds(fp32, cfg, prompts[:16], step=STEP, cache=CACHE),
        "windows": npu_lm.calibration_feeds(fp32, cfg, npu_recipe.calibration_windows(prompts, length=64),
                                            step=STEP, cache=CACHE),
    }
    plain = recipe.model_copy(update={"float_regions": []})
    regions = npu_recipe.float_regions(onnx.load(str(fp32), load_external_data=False), ["residual", "norm"])
    if args.calibration:
        results = {"model": results["model"], "eval": results["eval"], "recipe": "the profile's (windows, fp16 "
                   "residual + norms, uint16 activations, int8 per-channel weights)", "methods": {}}
        calibration_methods(fp32, work, plain, feeds["windows"], regions.nodes, results["methods"], cpu,
                            (lambda path: htp(path, fp16=True)) if args.htp else None)
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    variants = {
        "before: 16 short texts, all uint16": ("short", []),
        "calibration windows": ("windows", []),
        "fp16 residual + norms": ("short", regions.nodes),
        "windows + fp16 residual + norms (the profile)": ("windows", regions.nodes),
    }
    profile_model = None
    for name, (calib, keep) in variants.items():
        path = work / f"{len(results['recipes'])}.onnx"
        t0 = time.perf_counter()
        npu.quantize_qdq(fp32, path, recipe=plain, feeds=feeds[calib], init_overrides=npu_lm.per_channel_weights(fp32, plain),
                         float_nodes=keep)
        row = {"quantize_seconds": round(time.perf_counter() - t0, 1), "cpu_ep": cpu(path)}
        if args.htp:
            row["htp"] = htp(path, fp16=bool(keep))
        results["recipes"][name] = row
        print(name, json.dumps(row), flush=True)
        profile_model = path

    fm = onnx.load(str(fp32), load_external_data=False)
    readers: dict[str, list] = {}
    for n in fm.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def read_by(pred):
        return lambda t: any(pred(n) for n in readers.get(t, []))

    groups = {
        "all activations float (weights int8)": {"activations": lambda t: True},
        "all weights float (activations uint16)": {"weights": lambda t: True},
        "lm_head weight float": {"weights": lambda t: "lm_head" in t},
        "down_proj weights float": {"weights": lambda t: "down_proj" in t},
        "down_proj input float": {"activations": read_by(lambda n: "down_proj" in n.name)},
        "attention scores/softmax float": {"activations": read_by(
            lambda n: n.op_type == "Softmax" or (n.op_type == "MatMul" and "proj" not in n.name and "lm_head" not in n.name))},
        "lm_head input float": {"activations": read_by(lambda n: "lm_head" in n.name)},
    }
    for name, picks in groups.items():
        path = work / f"s{len(results['sensitivity'])}.onnx"
        removed = strip_qdq(profile_model, path, **picks)
        results["sensitivity"][name] = {"removed_nodes": removed, "cpu_ep": cpu(path)}
        print(name, json.dumps(results["sensitivity"][name]), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
