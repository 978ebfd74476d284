"""Decoder LMs for the Hexagon NPU (npu-qnn-htp): a static-shape graph with a host-side KV cache.

HTP compiles one graph for fixed shapes and takes no dynamic-shape ops (Shape, Range, Trilu), so
the graph here is what Qualcomm's own LLM deployments use:

    input_ids       int32 [1, S]          S new tokens (the step length; padded by the host)
    position_ids    int32 [1, S]          their absolute positions (rotary tables are gathered by them)
    attention_bias  float [1, 1, S, C+S]  additive mask over the C cache slots then the S new tokens,
                                          0 where a query may look and MASK_VALUE where not
    past_key_values.{i}.key/value  float [1, kv_heads, C, head_dim]   the host's cache (C slots)
 -> logits          float [1, S, vocab]
    present.{i}.key/value          float [1, kv_heads, S, head_dim]   only the S new positions

The host owns the cache (agent/runtime/static_generation.py): it writes each step's present
rows into its slots and builds the attention bias, so the graph holds no mask or cache logic.
The bundle holds the graph twice over one weights file: at S = 32 for prompt chunks and at S = 1
for decode steps, the second made from the quantized first (decode_plan / decode_graph), so both
carry the same QDQ encodings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.bundle import ModelSpec, QualityReport
from agent.runtime.qnn import qnn_session_options
from agent.runtime.static_generation import MASK_VALUE, Runner, StaticDecoder, StaticGraph
from exporter import npu, npu_recipe, quality
from exporter.graph.decoder import (
    DecoderConfig,
    DecoderWeights,
    ExternalData,
    MS_DOMAIN,
    GraphBuilder,
    LayerWeights,
    _head_norm,
    _inv_freq,
    _mlp,
    _residual,
    _rms_norm,
    apply_rotary,
    project_qkv,
)
from exporter.errors import ConversionError
from exporter.gate import Evidence, failures
from exporter.golden import GoldenCase
from exporter.profiles import QuantRecipe, Thresholds
from exporter.quality import LMReference

OPSET = 21


# native families whose static graph is not built (yet): softcapping (gemma2), LayerNorm + parallel residual
STATIC_REFUSED = ("gemma2", "phi", "gpt_neox")


def why_not_static(config) -> str | None:
    """None when the static graph takes `config`; else one line saying why not."""
    model_type = getattr(config, "model_type", None)
    if model_type in STATIC_REFUSED:
        return (f"{model_type!r} needs softcapping / LayerNorm / a parallel residual, which the static graph does not "
                f"build (static: any native family but {', '.join(STATIC_REFUSED)})")
    return None


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the static graph, in order."""
    inputs = ["input_ids", "position_ids", "attention_bias"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def build_static_decoder(cfg: DecoderConfig, weights: DecoderWeights, *, step: int, cache: int,
                         external: ExternalData | None = None) -> onnx.ModelProto:
    """The static graph of `cfg` for `step` new tokens over a `cache`-slot KV cache."""
    if step < 1 or cache < 1:
        raise ValueError(f"step {step} and cache {cache} must both be >= 1")
    if cfg.sliding_window is not None and cfg.layer_types and "sliding" in cfg.layer_types \
            and cfg.sliding_window < cache + step:
        raise ValueError(f"{cfg.architecture}: sliding window {cfg.sliding_window} is shorter than the static "
                         f"context {cache + step}; use a cache of at most {cfg.sliding_window - step} slots")
    if cfg.attn_softcap or cfg.final_softcap or cfg.norm != "rms" or cfg.parallel_residual:
        raise ValueError(f"{cfg.architecture}: softcapping, LayerNorm and parallel residuals are not in the static graph")
    b = GraphBuilder(f"{cfg.architecture}_static_s{step}_c{cache}", external=external)
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    b.inputs += [
        helper.make_tensor_value_info("input_ids", i32, [1, step]),
        helper.make_tensor_value_info("position_ids", i32, [1, step]),
        helper.make_tensor_value_info("attention_bias", f32, [1, 1, step, cache + step]),
    ]
    for i in range(cfg.num_layers):
        b.inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{n}", f32, [1, kv, cache, hd])
                     for n in ("key", "value")]
    b.outputs.append(helper.make_tensor_value_info("logits", f32, [1, step, cfg.vocab_size]))
    for i in range(cfg.num_layers):
        b.outputs += [helper.make_tensor_value_info(f"present.{i}.{n}", f32, [1, kv, step, hd]) for n in ("key", "value")]

    x = b.op("Gather", b.const(np.asarray(weights.embedding, dtype=np.float32), "embed.weight"), "input_ids")
    if cfg.embed_scale is not None:
        x = b.op("Mul", x, b.const(np.array(cfg.embed_scale, dtype=np.float32)))
    cos, sin = _rotary_tables(b, cfg, weights.rope_freq_factors, positions=cache + step, step=step)
    groups = cfg.num_heads // cfg.num_kv_heads
    # query rows are ordered (group, query) per kv head: the bias repeats once per group
    bias = "attention_bias" if groups == 1 else b.op("Concat", *["attention_bias"] * groups, axis=2)
    for i, layer in enumerate(weights.layers):
        x = _residual(b, cfg, x, layer.attn_norm, layer.post_attn_norm,
                      lambda h: _attention(b, cfg, i, h, layer, cos, sin, bias, step=step))
        x = _residual(b, cfg, x, layer.ffn_norm, layer.post_ffn_norm, lambda h: _mlp(b, cfg, i, h, layer))
    x = _rms_norm(b, x, weights.final_norm, cfg.rms_eps)
    b.op("Identity", b.linear(x, weights.lm_head, "lm_head"), outputs=["logits"])
    model = b.model()
    # 16-bit QDQ needs opset 21; onnx's version converter cannot lift the contrib RMSNorm op there
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    return _with_value_info(model)


def _with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every intermediate tensor's type and shape: the calibrator observes only typed tensors.

    onnxruntime's symbolic inference knows the contrib RMSNorm op that onnx's own inference stops at.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _rotary_tables(b: GraphBuilder, cfg: DecoderConfig, freq_factors: np.ndarray | None, *,
                   positions: int, step: int) -> tuple[str, str]:
    """cos and signed sin [1, 1, S, rope_dim] gathered by position_ids from constant tables.

    The sign of rotate-half is folded into the sin table: x*cos + concat(x2, x1)*[-sin, sin].
    """
    angles = np.outer(np.arange(positions, dtype=np.float32), _inv_freq(cfg, freq_factors))  # [P, rope_dim/2]
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(angles)
    signed_sin = np.concatenate([-sin, sin], -1).astype(np.float32)

    def gather(table: np.ndarray, stem: str) -> str:
        rows = b.op("Gather", b.const(table, stem), "position_ids")  # [1, S, rope_dim]
        return b.op("Reshape", rows, b.ints(1, 1, step, cfg.rope_dim))

    return gather(cos, "rope.cos"), gather(signed_sin, "rope.sin")


def _attention(b: GraphBuilder, cfg: DecoderConfig, i: int, h: str, layer: LayerWeights,
               cos: str, sin: str, bias: str, *, step: int) -> str:
    """One layer's attention; nine parameters: the graph's shared tensors (rotary tables, bias) by name."""
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    prefix = f"model.layers.{i}.self_attn"
    q, k, v = project_qkv(b, cfg, i, h, layer)
    q = _head_norm(b, q, layer.q_norm, nq, hd, cfg.rms_eps)
    k = _head_norm(b, k, layer.k_norm, nkv, hd, cfg.rms_eps)

    def heads(t: str, n: int) -> str:  # [1, S, n*hd] -> [1, n, S, hd]
        return b.op("Transpose", b.op("Reshape", t, b.ints(1, step, n, hd)), perm=[0, 2, 1, 3])

    q, k = heads(q, nq), heads(k, nkv)
    if cfg.has_rope(i):
        q, k = (apply_rotary(b, cfg, t, cos, sin, signed_sin=True) for t in (q, k))
    k = b.op("Identity", k, outputs=[f"present.{i}.key"])
    v = b.op("Identity", heads(v, nkv), outputs=[f"present.{i}.value"])
    keys = b.op("Concat", f"past_key_values.{i}.key", k, axis=2)  # [1, nkv, C+S, hd]
    values = b.op("Concat", f"past_key_values.{i}.value", v, axis=2)

    # GQA without copying the cache: the query heads of one kv head become extra query rows
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd)
    q = b.op("Mul", q, b.const(np.array(scale, dtype=np.float32)))
    q = b.op("Reshape", q, b.ints(1, nkv, nq // nkv * step, hd))
    scores = b.op("MatMul", q, b.op("Transpose", keys, perm=[0, 1, 3, 2]))  # [1, nkv, groups*S, C+S]
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    out = b.op("MatMul", probs, values)  # [1, nkv, groups*S, hd]
    out = b.op("Transpose", b.op("Reshape", out, b.ints(1, nq, step, hd)), perm=[0, 2, 1, 3])
    out = b.op("Reshape", out, b.ints(1, step, nq * hd))
    return b.linear(out, layer.o, f"{prefix}.o_proj")


# ---- the decode graph: the prefill graph at step 1, same weights, same QDQ encodings -------------

DECODE_STEP = 1
DATA_NAME = "model.onnx.data"  # the one weights file both graphs read
DECODE_NAME = "model_decode.onnx"


@dataclass(frozen=True)
class DecodePlan:
    """How the quantized prefill graph becomes the decode graph."""

    step: int
    constants: dict[str, onnx.TensorProto]  # the step-dependent initializers (Reshape shapes), decode values
    io: onnx.GraphProto  # the decode graph's inputs and outputs


def decode_plan(cfg: DecoderConfig, weights: DecoderWeights, *, step: int, decode_step: int, cache: int) -> DecodePlan:
    """Compare the float graphs at `step` and `decode_step` (weights sent to /dev/null): they must differ only
    in small shape constants, the rotary tables' length and the inputs'/outputs' shapes."""
    graphs = []
    for s in (step, decode_step):
        sink = ExternalData(Path(os.devnull))
        try:
            graphs.append(build_static_decoder(cfg, weights, step=s, cache=cache, external=sink))
        finally:
            sink.close()
    wide, narrow = graphs
    if [(n.op_type, list(n.input), list(n.output)) for n in wide.graph.node] != \
            [(n.op_type, list(n.input), list(n.output)) for n in narrow.graph.node]:
        raise ConversionError(f"the static graphs at step {step} and {decode_step} differ in structure")
    before = {i.name: i for i in wide.graph.initializer}
    constants: dict[str, onnx.TensorProto] = {}
    for t in narrow.graph.initializer:
        if t.name.startswith("rope."):  # the decode graph keeps the longer table: its positions are a prefix of it
            continue
        if t.data_location == TensorProto.EXTERNAL or before[t.name].data_location == TensorProto.EXTERNAL:
            if list(t.dims) != list(before[t.name].dims):
                raise ConversionError(f"weight {t.name} changes shape with the step length")
            continue
        if t.SerializeToString() != before[t.name].SerializeToString():
            constants[t.name] = t
    io = onnx.GraphProto()
    io.input.extend(narrow.graph.input)
    io.output.extend(narrow.graph.output)
    return DecodePlan(decode_step, constants, io)


def decode_graph(prefill: onnx.ModelProto, plan: DecodePlan) -> onnx.ModelProto:
    """The quantized prefill graph turned into the decode graph: the plan's constants replace the
    step-dependent shapes and its inputs/outputs the graph's; every weight, scale and zero point stays
    as it is (the same external data, the same encodings)."""
    constants = plan.constants
    model = onnx.ModelProto()
    model.CopyFrom(prefill)
    found = set()
    for t in model.graph.initializer:
        if t.name in constants:
            t.CopyFrom(constants[t.name])
            found.add(t.name)
    if missing := sorted(set(constants) - found):
        raise ConversionError(f"the quantized graph lost the step-dependent constants {missing[:3]}; "
                              "the decode graph cannot be made from it")
    types = {v.name: v.type for v in [*plan.io.input, *plan.io.output]}
    for v in [*model.graph.input, *model.graph.output]:
        v.type.CopyFrom(types[v.name])
    del model.graph.value_info[:]  # shapes of the wide graph; onnxruntime infers the narrow ones
    model.graph.name = f"{prefill.graph.name}_decode"
    return model


def write_graphs(qdq: Path, plan: DecodePlan, *, model: onnx.ModelProto | None = None) -> Path:
    """Write the prefill graph to `qdq` with its weights in DATA_NAME beside it, and the decode graph
    (DECODE_NAME) reading the same file at the same offsets; `model` is the prefill graph in memory, else `qdq`
    as the quantizer wrote it."""
    model = onnx.load(str(qdq)) if model is None else model
    qdq.with_name(DATA_NAME).unlink(missing_ok=True)  # onnx writes into an existing data file at its offsets
    onnx.save(model, str(qdq), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_NAME,
              size_threshold=1024)
    del model
    prefill = onnx.load(str(qdq), load_external_data=False)
    decode = qdq.with_name(DECODE_NAME)
    onnx.save(decode_graph(prefill, plan), str(decode))
    return decode


# ---- the export pipeline: float graph -> calibration on the host loop -> QDQ -> QNN HTP ----------

# Prompt chunks: 32 new tokens per call (decode steps run the step-1 graph above). On onnxruntime-qnn's HTP simulator a
# SmolLM2-135M-shaped model takes 22 s for a 32-token call and 12.5 s for a 1-token call (measured,
# loaded 2-core host), so prefill is 18x faster per token; on a device, decode is bound by reading
# the weights, which a 32-wide call reads once, like a 1-wide one.
DEFAULT_STEP = 32
# The gate runs every evaluation position on HTP (the simulator takes seconds per call for real
# models), so the NPU path evaluates 4 windows of 64 tokens and 4 greedy runs of 64 tokens, teacher-forced
# (npu_recipe.forced_greedy: 3 calls per run instead of 64).
EVAL_SIZE = {"count": 4, "length": 64, "prompt_len": 16, "steps": 64}
CALIBRATION_TOKENS = 64  # the calibration texts are joined and cut into windows of this many tokens
CALIBRATION_DECODE = 4  # then this many greedy single-token (padded) steps, as decode runs them
CALIBRATION_FEEDS = 64  # feeds kept (each holds the whole KV cache, so memory bounds this)


@dataclass(frozen=True)
class StaticLM:
    """A static NPU language model on disk and what the export measured on QNN HTP."""

    path: Path  # the QDQ model
    step: int
    cache: int
    decode: Path | None  # the decode graph (DECODE_STEP), beside `path`, reading the same weights file
    quantization: dict[str, Any]  # manifest quantization.details (with "qnn")
    metrics: dict[str, float]  # measured on HTP; empty when HTP refused the graph
    details: dict[str, Any]  # quality.details
    qnn: npu.QnnReport

    def evidence(self, thresholds: Thresholds, *, reference: str) -> Evidence:
        """The LM gate's input: the HTP metrics; a graph HTP did not take, or a decode graph that does not
        decode as the prefill graph does, fails it, with the reasons."""
        refused = [*self.qnn.failures(), *decode_refusal(self.quantization["qnn"].get("decode"))]
        return Evidence(self.metrics, thresholds.as_dict(), reference, self.details, refused=tuple(refused))

    def judge(self, thresholds: Thresholds, *, reference: str) -> QualityReport:
        return self.evidence(thresholds, reference=reference).judge()


def layout(cfg: DecoderConfig, *, step: int, cache: int) -> dict[str, Any]:
    """What manifest.model.config says about the static graph, so the agent can drive it."""
    return {"kv_layout": "static", "step_length": step, "cache_length": cache, "mask_value": MASK_VALUE,
            "input_dtype": "int32", "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}


def decoder(run: Any, cfg: DecoderConfig, *, step: int, cache: int, output_names: list[str] | None = None,
            on_feed: Callable[[dict[str, np.ndarray]], None] | None = None) -> StaticDecoder:
    return StaticDecoder(run, step=step, cache=cache, num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, output_names=output_names, on_feed=on_feed)


def calibration_feeds(fp32: Path, cfg: DecoderConfig, prompts: Sequence[np.ndarray], *, step: int, cache: int,
                      limit: int = CALIBRATION_FEEDS) -> list[dict[str, np.ndarray]]:
    """Feeds of the float graph run over `prompts`, spread evenly over all its calls, at most `limit`."""
    import onnxruntime as ort

    prompts = [p[: min(CALIBRATION_TOKENS, cache - CALIBRATION_DECODE)] for p in prompts if len(p)]
    calls = sum(-(-len(p) // step) + CALIBRATION_DECODE for p in prompts)
    keep = set(np.linspace(0, calls - 1, min(limit, calls)).astype(int).tolist())
    feeds: list[dict[str, np.ndarray]] = []
    seen = 0

    def record(feed: dict[str, np.ndarray]) -> None:
        nonlocal seen
        if seen in keep:
            feeds.append({k: v.copy() for k, v in feed.items()})  # the cache arrays change after the call
        seen += 1

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
    lm = decoder(sess.run, cfg, step=step, cache=cache, output_names=[o.name for o in sess.get_outputs()],
                 on_feed=record)
    for p in prompts:
        lm.greedy(p.tolist(), CALIBRATION_DECODE + 1)
    return feeds


def per_channel_weights(fp32: Path, recipe: QuantRecipe) -> dict[str, list[dict]] | None:
    """Quantization overrides for per-output-channel, symmetric MatMul weights, when the recipe is per-channel.

    onnxruntime's QNN config makes only Conv weights per-channel; HTP takes them for MatMul too.
    """
    if not recipe.per_channel:
        return None
    model = onnx.load(str(fp32), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    qtype = npu._QTYPES[recipe.weight_type]
    return {n.input[1]: [{"axis": 1, "quant_type": qtype, "symmetric": True}]
            for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def htp_session(path: Path, provider_options: dict[str, str]) -> Any:
    """An onnxruntime session on QNN HTP with CPU fallback disabled (any rejected node is an error)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so = qnn_session_options(cpu_fallback=False, provider_options=provider_options, sess_options=so)
    return ort.InferenceSession(str(path), sess_options=so)


def static_metrics(lm: StaticDecoder, ref: LMReference) -> tuple[dict[str, float], dict[str, Any]]:
    """The LM gate's metrics (exporter/quality.py) for a static decoder: logits per position and greedy decode."""
    got = []
    for seq in ref.sequences:
        lm.reset()
        got.append(lm.forward(seq[: lm.cache].tolist()))
    n = min(g.shape[0] for g in got)
    got_a = np.stack([g[:n] for g in got]).astype(np.float32)
    greedy = npu_recipe.forced_greedy(lm, ref.prompts, ref.greedy)
    return quality.compare_lm(got_a, ref.logits[:, :n], ref.sequences[:, :n], greedy, ref)


def cpu_measure(graph: FloatGraph, qdq: Path, ref: LMReference) -> Callable[[Sequence[str]], dict[str, float]]:
    """measure(float_nodes) -> the gate's metrics of the QDQ model at `qdq` with those MatMuls put back in float
    (mixed_precision.restore_float: what excluding them from the quantizer gives), on the CPU EP's host loop."""
    import onnxruntime as ort

    from exporter import mixed_precision

    models: dict[str, onnx.ModelProto] = {}
    scratch = graph.path.parent / "fallback"

    def measure(nodes: Sequence[str]) -> dict[str, float]:
        path = qdq
        if nodes:
            if not models:  # loaded once, with their weights, only when a candidate needs them
                models.update(q=onnx.load(str(qdq)), fp32=onnx.load(str(graph.path)))
            scratch.mkdir(exist_ok=True)
            path = scratch / "candidate.onnx"
            onnx.save(mixed_precision.restore_float(models["q"], models["fp32"], nodes), str(path),
                      save_as_external_data=True, location="candidate.onnx.data")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        lm = decoder(sess.run, graph.cfg, step=graph.step, cache=graph.cache,
                     output_names=[o.name for o in sess.get_outputs()])
        return static_metrics(lm, ref)[0]

    return measure


@dataclass(frozen=True)
class FloatGraph:
    """The float32 static graph on disk (weights in `path`.data) and what the quantized graphs are made with."""

    path: Path
    cfg: DecoderConfig
    plan: DecodePlan  # the step-1 decode graph's constants and shapes
    step: int
    cache: int


def float_graph(cfg: DecoderConfig, weights: DecoderWeights, work: Path, *, cache: int,
                step: int = DEFAULT_STEP) -> FloatGraph:
    """Write the float static graph at `step` to `work` and plan its decode graph. After this the source
    weights are no longer needed: the caller drops them (and the PyTorch model they view) before quantizing,
    so a 1B model's float32 copy is not held through calibration and the HTP gate."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "model.fp32.onnx"
    external = ExternalData(work / "model.fp32.onnx.data")
    try:
        model = build_static_decoder(cfg, weights, step=step, cache=cache, external=external)
    finally:
        external.close()
    onnx.save(model, str(fp32))
    del model
    plan = decode_plan(cfg, weights, step=step, decode_step=DECODE_STEP, cache=cache)
    return FloatGraph(fp32, cfg, plan, step, cache)


def export_static_lm(graph: FloatGraph, out: Path, *, recipe: QuantRecipe, provider_options: dict[str, str],
                     ref: LMReference, calibration_prompts: Sequence[np.ndarray],
                     progress: Callable[[str], None] | None = None,
                     limits: Mapping[str, float] | None = None) -> StaticLM:
    """Write the QDQ static graph to `out` and its decode graph (DECODE_NAME) beside it, both reading one
    weights file (DATA_NAME), from the float `graph`; measure them on QNN HTP, CPU fallback off.

    With `recipe.mixed_precision` and the gate's `limits`, a QDQ model that misses them keeps classes of linears
    float (npu_recipe.FloatFallback): chosen on the CPU EP, quantized again with them excluded, and widened one
    class at a time while the HTP itself still refuses it.

    The metrics come from HTP itself; when HTP refuses the graph, `qnn` says why and the metrics
    are empty (`StaticLM.judge` then fails).
    """
    note = progress or (lambda _msg: None)
    fp32, cfg, plan, step, cache = graph.path, graph.cfg, graph.plan, graph.step, graph.cache
    provider_options = {**npu.DEFAULT_PROVIDER_OPTIONS, **provider_options}
    windows = npu_recipe.calibration_windows(calibration_prompts, length=CALIBRATION_TOKENS)
    staged = None  # the prefill graph in memory, when it is not the quantizer's file
    fallback = None
    if recipe.method == "fp16":  # the float graph as it is; the HTP runs every node in fp16
        npu_recipe.check_fp16_options(["all"], provider_options, profile="the NPU profile")
        feeds = [decoder(None, cfg, step=step, cache=cache).feed(windows[0][:step].tolist(), step=step)]  # QNN probe
        staged = onnx.load(str(fp32))
        stored = npu_recipe.store_fp16(staged)
        details: dict[str, Any] = {"precision": "fp16", "float_nodes": "all", "fp16_initializers": stored}
    else:
        npu_recipe.check_fp16_options(recipe.float_regions, provider_options, profile="the NPU profile")
        feeds = calibration_feeds(fp32, cfg, windows, step=step, cache=cache)
        note(f"calibrated on {len(feeds)} static calls over {len(calibration_prompts)} texts ({len(windows)} windows)")
        overrides = per_channel_weights(fp32, recipe)
        float_model = onnx.load(str(fp32), load_external_data=False)
        regions = npu_recipe.float_regions(float_model, recipe.float_regions)

        def quantize(float_nodes: Sequence[str]) -> tuple[dict[str, Any], onnx.ModelProto | None]:
            """The QDQ graph with `float_nodes` (the fallback's MatMuls) kept float besides the regions: its details,
            and, when some are, the graph in memory with their weights stored as float16 (the HTP runs them in fp16;
            float32 would make the bundle larger than an all-fp16 one)."""
            got = npu.quantize_qdq(fp32, out, recipe=recipe, feeds=feeds, init_overrides=overrides,
                                   float_nodes=regions.nodes + list(float_nodes))
            got.update(calibration_texts=len(calibration_prompts), calibration_windows=len(windows),
                       per_channel_matmul_weights=len(overrides or {}), float_regions=regions.counts())
            if not float_nodes:
                return got, None
            model = onnx.load(str(out))
            keep = set(float_nodes)
            got["fp16_initializers"] = npu_recipe.store_fp16(
                model, names={n.input[1] for n in model.graph.node if n.name in keep})
            return got, model

        details, _ = quantize([])
        if recipe.mixed_precision and limits:
            note("measuring the w8a16 model on the CPU EP against the gate, to keep float what it cannot hold")
            fallback = npu_recipe.FloatFallback(npu_recipe.linear_classes(float_model), cpu_measure(graph, out, ref),
                                                limits, progress=note)
            if fallback.start():
                note(f"keeping {', '.join(fallback.chosen)} float (fp16 on the HTP); quantizing again")
                details, staged = quantize(fallback.float_nodes)
    while True:
        # the decode graph: the quantized graph with the step-1 shapes, so the same encodings and weights
        decode = write_graphs(out, plan, model=staged)
        del staged
        htp = _gate_on_htp(out, decode, feeds, graph, ref, provider_options=provider_options, note=note)
        if (fallback is None or htp.session is None or not failures(htp.metrics, limits or {})
                or fallback.widen(htp.metrics) is None):
            break
        del htp  # one compiled HTP graph in memory at a time
        note(f"the HTP gate still fails; keeping {', '.join(fallback.chosen)} float; quantizing again")
        details, staged = quantize(fallback.float_nodes)
    if fallback is not None:
        details["float_fallback"] = fallback.details()
    details["decode_graph"] = {"step_length": plan.step, "step_constants": len(plan.constants)}
    if htp.session is None:
        return StaticLM(out, step, cache, decode, {**details, "qnn": htp.qnn}, {}, {}, htp.probe)
    note("decoding through the step-1 graph and through the prefill graph on HTP, to compare them")
    wide = wide_decode(htp.session, cfg, ref.prompts[0], step=step, cache=cache)
    metrics, quality_details, probe, qnn = htp.metrics, htp.details, htp.probe, htp.qnn
    del htp  # one compiled HTP graph in memory at a time (a 1B model's holds gigabytes)
    qnn["decode"] = decode_agreement(wide, htp_session(decode, provider_options), cfg, step=step,
                                     decode_step=plan.step, cache=cache)
    return StaticLM(out, step, cache, decode, {**details, "qnn": qnn}, metrics, quality_details, probe)


@dataclass
class HtpGate:
    """The gate's measurement of one quantized graph on the HTP; `session` is None when the HTP refused it."""

    probe: Any
    qnn: dict[str, Any]
    metrics: dict[str, float]
    details: dict[str, Any]
    session: Any


def _gate_on_htp(out: Path, decode: Path, feeds: Sequence[dict[str, np.ndarray]], graph: FloatGraph,
                 ref: LMReference, *, provider_options: dict[str, str], note: Callable[[str], None]) -> HtpGate:
    """Probe both graphs on QNN (every node on the HTP?), then run the gate's evaluation on the prefill graph."""
    cfg, step, cache = graph.cfg, graph.step, graph.cache
    probe = npu.verify_on_qnn(out, feeds[:1], provider_options=provider_options)
    if probe.ok:
        lm = decoder(None, cfg, step=step, cache=cache)
        probe_decode = npu.verify_on_qnn(decode, [lm.feed(feeds[0]["input_ids"][0, :1].tolist(), step=graph.plan.step)],
                                         provider_options=provider_options)
        if not probe_decode.ok:
            probe = probe_decode
    qnn: dict[str, Any] = {"ok": probe.ok, "rejected_nodes": probe.rejected, "reasons": probe.reasons,
                           "error": probe.error}
    if not probe.ok:
        return HtpGate(probe, qnn, {}, {}, None)
    t0 = time.perf_counter()
    sess = htp_session(out, provider_options)
    qnn["compile_seconds"] = round(time.perf_counter() - t0, 2)
    calls = 0

    def run(names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        nonlocal calls
        calls += 1
        return sess.run(names, feed)

    lm = decoder(run, cfg, step=step, cache=cache, output_names=[o.name for o in sess.get_outputs()])
    note(f"HTP compiled the graph in {qnn['compile_seconds']} s; running the evaluation text on it")
    t0 = time.perf_counter()
    metrics, quality_details = static_metrics(lm, ref)
    seconds = time.perf_counter() - t0
    qnn.update(run_seconds=round(seconds, 2), calls=calls, seconds_per_call=round(seconds / max(calls, 1), 4))
    quality_details["measured_on"] = "QNN HTP (onnxruntime-qnn, CPU fallback disabled)"
    return HtpGate(probe, qnn, metrics, quality_details, sess)


DECODE_CHECK_TOKENS = 4  # greedy tokens decoded both ways by decode_agreement
# The same model with the same encodings, but HTP compiles each graph on its own and runs the fp16 regions
# (residual, norms) in its own order: measured 0.35 of logits up to 30.2 for SmolLM2-135M (top-1 the same),
# 1.2e-7 of 0.65 for the tiny llama, 0 on the CPU EP. The golden check's allowance for 16-bit rounding.
DECODE_TOLERANCE = 0.05


def decode_refusal(check: dict[str, Any] | None) -> list[str]:
    """The gate's line when the decode graph's logits left the prefill graph's (none when they agree or
    were not measured)."""
    if not check:
        return []
    limit = DECODE_TOLERANCE * check["logits_max_abs"] + 1e-3
    if check["top1_agree"] and check["max_abs_diff"] <= limit:
        return []
    return [f"the step-{DECODE_STEP} decode graph does not decode as the prefill graph: logits differ by up to "
            f"{check['max_abs_diff']:.3g} (limit {limit:.3g}), top-1 {'agrees' if check['top1_agree'] else 'differs'}"]


@dataclass(frozen=True)
class WideDecode:
    """The prefill graph's half of decode_agreement: greedy tokens after a prompt through the step-S graph."""

    cache: list[np.ndarray]  # the KV cache after the prompt (past_key_values.{i}.key/value in order)
    logits: list[np.ndarray]  # after the prompt, then after each of DECODE_CHECK_TOKENS greedy tokens
    seconds_per_call: float


def wide_decode(prefill: Any, cfg: DecoderConfig, prompt: np.ndarray, *, step: int, cache: int) -> WideDecode:
    """Greedy tokens after `prompt` through the prefill graph, and the cache the prompt left."""
    names = [o.name for o in prefill.get_outputs()]
    seconds = 0.0

    def run(out_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        nonlocal seconds
        t0 = time.perf_counter()
        try:
            return prefill.run(out_names, feed)
        finally:
            seconds += time.perf_counter() - t0

    wide = decoder(run, cfg, step=step, cache=cache, output_names=names)
    logits = [wide.forward(prompt.tolist())[-1]]
    kv = [wide.cached(f"past_key_values.{i}.{kv}").copy() for i in range(cfg.num_layers) for kv in ("key", "value")]
    for _ in range(DECODE_CHECK_TOKENS):
        logits.append(wide.forward([int(np.argmax(logits[-1]))])[0])
    return WideDecode(kv, logits, seconds / max(wide.calls[step], 1))


def decode_agreement(wide: WideDecode, decode: Any, cfg: DecoderConfig, *, step: int, decode_step: int,
                     cache: int) -> dict[str, Any]:
    """The same greedy tokens as `wide` decoded through the decode graph from the same prefill: the largest
    logit difference, whether the picks agree, and the seconds per call of each. The two graphs need not be
    in memory together (a 1B model's compiled fp16 graph is gigabytes).

    Both graphs compute the same model with the same encodings, so the difference is rounding."""
    seconds = 0.0

    def prefill_unused(out_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise ConversionError("the decode check ran a prefill call: single tokens must take the decode graph")

    def run(out_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        nonlocal seconds
        t0 = time.perf_counter()
        try:
            return decode.run(out_names, feed)
        finally:
            seconds += time.perf_counter() - t0

    names = [o.name for o in decode.get_outputs()]
    narrow = StaticDecoder(prefill_unused, step=step, cache=cache, num_layers=cfg.num_layers,
                           kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, output_names=names,
                           decode=StaticGraph(run, decode_step, names))
    narrow.load(wide.cache)
    got = [narrow.forward([int(np.argmax(logits))])[0] for logits in wide.logits[:-1]]
    a, b = np.stack(wide.logits[1:]), np.stack(got)
    return {"tokens": DECODE_CHECK_TOKENS, "max_abs_diff": float(np.abs(a - b).max()),
            "logits_max_abs": float(np.abs(a).max()), "top1_agree": bool((a.argmax(-1) == b.argmax(-1)).all()),
            "seconds_per_call": {str(step): round(wide.seconds_per_call, 4),
                                 str(decode_step): round(seconds / max(narrow.calls[decode_step], 1), 4)}}


CONTEXT_NAMES = {"ep_context": "model_ctx.onnx", "decode_ep_context": "model_decode_ctx.onnx"}


def write_contexts(stage: Path, provider_options: dict[str, str]) -> dict[str, str]:
    """The prefill and decode graphs compiled for HTP, each its own EP context model (binary embedded);
    returns what model.config says about them.

    One context binary for both graphs (QNN weight sharing: ep.share_ep_contexts) is written by
    onnxruntime-qnn, but its HTP simulator refuses to load it (contextCreateFromBinary:
    QNN_COMMON_ERROR_NOT_SUPPORTED), so each context carries its own copy of the weights."""
    entries = {"ep_context": stage / "model.onnx", "decode_ep_context": stage / DECODE_NAME}
    for key, graph in entries.items():
        npu.write_ep_context(graph, stage / CONTEXT_NAMES[key], provider_options=provider_options)
    return dict(CONTEXT_NAMES)


def golden_case(model_path: Path, cfg: DecoderConfig, prompt: np.ndarray, *, step: int, cache: int) -> GoldenCase:
    """One static call (the first `step` tokens of `prompt`, empty cache) and its logits on the CPU EP."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    feeds: list[dict[str, np.ndarray]] = []
    lm = decoder(sess.run, cfg, step=step, cache=cache, output_names=[o.name for o in sess.get_outputs()],
                 on_feed=lambda f: feeds.append({k: v.copy() for k, v in f.items()}))
    lm.forward(prompt[:step].tolist())
    logits = sess.run(["logits"], feeds[0])[0]
    # HTP and the CPU EP round 16-bit activations differently: allow for it in proportion to the logits
    atol = 0.05 * float(np.abs(logits).max()) + 1e-3
    return GoldenCase(feeds[0], {"logits": logits}, atol=atol, rtol=1e-2)


# ---- the pipeline ------------------------------------------------------------------------------

NAME = "npu"


def disk_bytes(job: Any) -> int:
    return job.parameters * 4 * 2


def recipe_name(recipe: QuantRecipe) -> str:
    if recipe.method == "fp16":
        return "fp16-static-lm"
    return f"qdq-a{recipe.activation_type}-w{recipe.weight_type}-static-lm"


def precision(recipe: QuantRecipe) -> str:
    return "fp16" if recipe.method == "fp16" else f"{recipe.activation_type}/{recipe.weight_type}"


def build(job: Any, stage: Path, work: Path) -> Any:
    """Decoder LM for the NPU: the static-shape graph above, QDQ, judged on QNN HTP itself."""
    import gc

    from agent.bundle import Quantization
    from exporter import calibration, lm
    from exporter.errors import SourceError
    from exporter.pipelines import Built, native_lm
    from exporter.quantize import model_size
    from exporter.source import load_causal_lm, load_tokenizer, write_tokenizer

    progress, profile, recipe = job.progress, job.profile, job.recipe
    text = quality.read_texts(job.request.eval_text)
    try:
        calib = calibration.calibration_texts(job.request.calibration_text, limit=recipe.calibration_samples)
    except calibration.CalibrationError as exc:
        raise SourceError(str(exc)) from None
    with progress.step("load", f"{job.config.model_type}, {job.parameters / 1e6:,.1f}M parameters"):
        model = load_causal_lm(job.src)
        tokenizer = load_tokenizer(job.src)
    spec_config = lm.decoder_spec(model, tokenizer, max_context=profile.shapes.max_context)
    cache = spec_config["max_context"]
    with progress.step("reference", "PyTorch float32 on the evaluation text"):
        # every position runs on the HTP simulator (seconds per call for real models): a lighter text set
        ref = quality.lm_reference(model, tokenizer, text, max_context=cache, **EVAL_SIZE)
    cfg, weights = native_lm.decoder_from_hf(model, max_context=cache)
    model.config.save_pretrained(stage)
    write_tokenizer(job.src, tokenizer, stage)
    prompts = [np.array(tokenizer(t, add_special_tokens=False)["input_ids"], np.int64) for t in calib]
    entry = stage / "model.onnx"
    how = "float, fp16 on the HTP" if recipe.method == "fp16" else "QDQ"
    with progress.step("quantize", f"static graph, step {DEFAULT_STEP}, cache {cache}, {how}, QNN HTP"):
        staged = float_graph(cfg, weights, work, cache=cache)
        del model, weights  # the float graph holds them now: a 1B model's 4.4 GB not kept through calibration
        gc.collect()
        result = export_static_lm(staged, entry, recipe=recipe, ref=ref,
                                  provider_options=dict(profile.execution_providers[0].options),
                                  calibration_prompts=prompts, progress=progress.note, limits=job.thresholds.as_dict())
    spec_config.update(layout(cfg, step=result.step, cache=cache))
    spec_config.update(decode_entry=DECODE_NAME, decode_step_length=DECODE_STEP)
    if job.request.ep_context and result.qnn.ok:
        with progress.step("compile", "QNN HTP context binaries of both graphs, so the device does not compile"):
            spec_config.update(write_contexts(stage, dict(profile.execution_providers[0].options)))
    inputs, outputs = io_names(cfg.num_layers)
    qnn = result.quantization["qnn"]
    return Built(
        entry=entry,
        model_spec=ModelSpec(entry="model.onnx", inputs=inputs, outputs=outputs,
                             architecture=job.config.model_type, config=spec_config),
        quantization=Quantization(recipe=recipe_name(recipe), precision=precision(recipe), details=result.quantization),
        evidence=result.evidence(job.thresholds, reference=job.reference),
        golden=golden_case(entry, cfg, ref.sequences[0], step=result.step, cache=cache),
        fp32_bytes=model_size(work / "model.fp32.onnx"),
        stats={"parameters": job.parameters, "htp_compile_seconds": qnn.get("compile_seconds"),
               "htp_seconds_per_call": qnn.get("seconds_per_call")},
        measured={k: qnn[k] for k in ("compile_seconds", "seconds_per_call") if k in qnn},
    )
