"""The ONNX decoder graph, built with onnx.helper from GGUF weights.

Quantized weights stay in their GGUF blocks: `MatMulNBits` (+ `blocksum(x) @ offsets^T` for the
types with a per-block min), and a Q8_0 embedding table is read with `GatherBlockQuantized`.
Attention is onnxruntime's fused `GroupQueryAttention` (or, with attention="plain", standard ONNX
ops), norms are `SimplifiedLayerNormalization` (RMSNorm), so the I/O is the exporter's LM bundle
layout (docs/ARCHITECTURE.md): input_ids, attention_mask (+ position_ids for "plain"),
past_key_values.{i}.key/value [b, kv_heads, past, head_dim] -> logits, present.{i}.key/value.
exporter/native.py builds the same graph from a Hugging Face model's float weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.gguf.levels import TWO_PASS, AccuracyPolicy
from exporter.gguf.repack import BlockWeight, concat_rows

OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ScannedHead:
    """An lm_head read twice: every logit from `scan` (4-bit blocks, the fewest bytes per token), then each
    position's `top_k` largest recomputed in float32 from `rows` (8-bit blocks, only k rows read) and
    scattered back. Argmax, top-k/top-p candidates and most of the softmax mass get the 8-bit head's
    values; only logits far below the top carry the 4-bit error. A tied head's rows are the embedding table."""

    scan: BlockWeight
    rows: BlockWeight
    top_k: int = 16

    def __post_init__(self) -> None:
        if self.scan.shape != self.rows.shape:
            raise ValueError(f"scan {self.scan.shape} and rows {self.rows.shape} must be the same [vocab, hidden]")
        if self.top_k < 1:
            raise ValueError(f"top_k {self.top_k} must be at least 1")

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape


Weight = BlockWeight | ScannedHead | np.ndarray


class ExternalData:
    """Initializers appended to one external data file as they are made (no 2 GB protobuf limit)."""

    ALIGN = 64

    def __init__(self, path: Path):
        self.path = path
        self.location = path.name
        self._file = open(path, "wb")
        self._offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self._offset % self.ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        data = array.tobytes()
        self._file.write(data)
        t = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self._offset)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(data)
        return t

    def close(self) -> None:
        self._file.close()


@dataclass
class GraphBuilder:
    """Nodes and initializers of one graph, with unique names."""

    name: str
    accuracy_level: int | str | AccuracyPolicy = 4  # one level for every MatMulNBits, or a level per weight class
    external: ExternalData | None = None
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    _count: int = 0
    _blocksums: dict = field(default_factory=dict)
    _row_tables: dict = field(default_factory=dict)  # id(BlockWeight) -> scales (+ codes, offsets) of its rows
    _packed: dict = field(default_factory=dict)  # id(BlockWeight) -> (the weight, its packed-blocks initializer)
    _scales: dict = field(default_factory=dict)  # id(BlockWeight) -> (the weight, its scales [+ zero points] initializers)
    _one_row: str | None = None  # the two-pass If's condition, made once

    def _unique(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, array: np.ndarray, stem: str = "const") -> str:
        name = self._unique(stem)
        if self.external is not None and array.nbytes >= 1024:
            self.initializers.append(self.external.tensor(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), "ints")

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", name: str | None = None,
           **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self._unique(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name or self._unique(op_type),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def packed(self, weight: BlockWeight, stem: str) -> str:
        """The initializer of weight.packed(), made once: MatMulNBits' B and GatherBlockQuantized's data
        have the same layout, so a tied embedding / lm_head stores its blocks once."""
        if id(weight) not in self._packed:
            self._packed[id(weight)] = (weight, self.const(weight.packed(), stem))  # the weight pins its id
        return self._packed[id(weight)][1]

    @property
    def policy(self) -> AccuracyPolicy:
        level = self.accuracy_level
        return level if isinstance(level, AccuracyPolicy) else AccuracyPolicy.uniform(level)

    def linear(self, x: str, weight: Weight, stem: str, *, bias: np.ndarray | None = None, rank: int = 3) -> str:
        """x @ weight^T (+ bias) for x of `rank`; weight is [N, K]: GGUF blocks (MatMulNBits) or float.

        `stem` is the torch module path ("model.layers.3.mlp.down_proj"); the node is named as optimum's
        exporter names it ("/model/layers.3/mlp/down_proj/MatMul"), so --exclude patterns work on both.
        MatMulNBits' accuracy level comes from the policy (exporter/gguf/levels.py) by weight class.
        """
        if isinstance(weight, ScannedHead):
            y = self._refined_logits(x, weight.rows, stem, rank=rank, scan=weight.scan, k=weight.top_k)
        elif isinstance(weight, BlockWeight) and self.policy.refines(stem):
            y = self._refined_logits(x, weight, stem, rank=rank)
        elif isinstance(weight, BlockWeight):
            y = self._block_linear(x, weight, stem, rank=rank, level=self.policy.level(stem))
        else:
            y = self.op("MatMul", x, self.const(np.asarray(weight, dtype=np.float32).T.copy(), f"{stem}.weight"),
                        name=node_name(stem, "MatMul"))
        if bias is not None:
            y = self.op("Add", y, self.const(bias.astype(np.float32), f"{stem}.bias"))
        return y

    def _block_linear(self, x: str, weight: BlockWeight, stem: str, *, rank: int, level: int | str) -> str:
        if level == TWO_PASS and not self.policy.two_pass(weight.bits, weight.shape[0] * weight.shape[1]):
            level = 0
        if weight.bits == 8 and level == 0:
            hi, lo = weight.split_nibbles()  # exact, and runs on the fast 4-bit float kernel
            return self.op("Add", self._block_linear(x, hi, f"{stem}.hi", rank=rank, level=0),
                           self._block_linear(x, lo, f"{stem}.lo", rank=rank, level=0))
        if weight.offsets is not None:  # a blocksum is needed anyway: drop the explicit zero point too
            weight = weight.with_default_zero_point()
        if level == TWO_PASS:
            y = self._two_pass_linear(x, weight, stem, rank=rank)
        else:
            y = self._matmul_nbits(x, weight, stem, level=level)
        if weight.offsets is None:
            return y
        # w = scale*q + offset per block, so x @ w^T = MatMulNBits(x) + blocksum(x) @ offsets^T
        sums = self._blocksums.get((x, weight.block_size))
        if sums is None:  # q/k/v (and gate/up) read the same x: sum its blocks once
            blocks = self.op("Reshape", x, self.ints(*[0] * (rank - 1), weight.n_blocks, weight.block_size))
            sums = self._blocksums[(x, weight.block_size)] = self.op("ReduceSum", blocks, self.ints(-1), keepdims=0)
        return self.op("Add", y, self.op("MatMul", sums, self.const(weight.offsets.T.copy(), f"{stem}.offsets")))

    def _two_pass_linear(self, x: str, weight: BlockWeight, stem: str, *, rank: int) -> str:
        """x @ w^T for one row of x (decode) on level 4's int8 kernel, to ~5e-6: x = hi + lo, hi on the int8 grid
        the kernel picks for each block (scale = block max / 127, so it quantizes hi without error), lo = x - hi
        (quantized with its own, >= 254x finer scale), both rows of one MatMulNBits call, then summed. More rows
        (prefill) run at level 0: twice the rows at level 4 cost more than level 0 does. An If picks; both
        branches read the same initializers (4-bit blocks only; a Q4_1/K-quant's offsets are added by the caller)."""
        outer, self.nodes = self.nodes, []
        if self._one_row is None:  # every decoder linear before the lm_head sees the same rows: one condition
            rows = self.op("ReduceProd", self.op("Slice", self.op("Shape", x), self.ints(0), self.ints(-1)), keepdims=0)
            self._one_row = self.op("Equal", rows, self.const(np.array(1, np.int64)))
        cond_nodes, self.nodes = self.nodes, []
        blocks = self.op("Reshape", x, self.ints(1, weight.n_blocks, weight.block_size))  # one row: x is [1, .., 1, K]
        peak = self.op("ReduceMax", self.op("Abs", blocks), axes=[-1], keepdims=1)  # [1, blocks, 1]
        inverse = self.op("Div", self.const(np.array(127, np.float32)),  # as the kernel: 127 / block max
                          self.op("Max", peak, self.const(np.array(1e-30, np.float32))))  # all-zero blocks: hi = 0
        hi = self.op("Div", self.op("Round", self.op("Mul", blocks, inverse)), inverse)  # (Mod is slower, ~std::fmod)
        both = self.op("Concat", hi, self.op("Sub", blocks, hi), axis=0)  # [2, blocks, block]: hi, lo
        rows = self._matmul_nbits(self.op("Reshape", both, self.ints(2, 1, weight.shape[1])), weight, stem, level=4)
        two = self.op("ReduceSum", rows, self.ints(0), keepdims=1)  # [1, 1, N]
        if rank != 3:
            two = self.op("Reshape", two, self.ints(*[1] * (rank - 1), weight.shape[0]))
        then_nodes, self.nodes = self.nodes, []
        one = self._matmul_nbits(x, weight, stem, level=0)
        else_nodes, self.nodes = self.nodes, outer + cond_nodes

        def branch(nodes: list, out: str, name: str) -> onnx.GraphProto:
            return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

        return self.op("If", self._one_row, name=node_name(stem, "TwoPassIf"),
                       then_branch=branch(then_nodes, two, self._unique("two_pass")),
                       else_branch=branch(else_nodes, one, self._unique("level0")))

    def _matmul_nbits(self, x: str, weight: BlockWeight, stem: str, *, level: int) -> str:
        """One MatMulNBits node; a weight's initializers are made once, however many nodes read it."""
        n, k = weight.shape
        if id(weight) not in self._scales:  # the weight pins its id
            zp = weight.zero_points()
            self._scales[id(weight)] = (weight, [self.const(weight.scales, f"{stem}.scales")]
                                        + ([self.const(zp, f"{stem}.zero_points")] if zp is not None else []))
        ins = [x, self.packed(weight, f"{stem}.qweight"), *self._scales[id(weight)][1]]
        return self.op("MatMulNBits", *ins, domain=MS_DOMAIN, name=node_name(stem, "MatMulNBits"),
                       K=k, N=n, bits=weight.bits, block_size=weight.block_size, accuracy_level=level)

    def _refined_logits(self, x: str, weight: BlockWeight, stem: str, *, rank: int, scan: BlockWeight | None = None,
                        k: int | None = None) -> str:
        """All logits at the policy's (fast) level -- from `scan` if given, else from `weight` itself -- then each
        position's top k recomputed in float32 from `weight`'s blocks and scattered back: the largest logits,
        the argmax and the softmax mass are `weight`'s own."""
        k = min(k or self.policy.exact_top_k or 1, weight.shape[0])
        approx = self._block_linear(x, scan or weight, stem, rank=rank, level=self.policy.level(stem))
        _, top = self.op("TopK", approx, self.ints(k), axis=-1, outputs=2)  # [..., k]
        rows = gather_rows(self, weight, top, index_rank=rank)  # [..., k, K] float32
        exact = self.op("ReduceSum", self.op("Mul", rows, self.op("Unsqueeze", x, self.ints(-2))), self.ints(-1), keepdims=0)
        return self.op("ScatterElements", approx, top, exact, axis=-1, name=node_name(stem, "ExactTopK"))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgeship-gguf",
        )


def node_name(module: str, op_type: str) -> str:
    """optimum's node name for a torch module's op: model.layers.3.mlp.up_proj -> /model/layers.3/mlp/up_proj/MatMul."""
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + f"/{op_type}"


def linear_model(weight: BlockWeight, *, accuracy_level: int | str | AccuracyPolicy = 0, stem: str = "w",
                 rank: int = 2) -> onnx.ModelProto:
    """One linear layer y = x @ w^T over x float32 [..., K] of `rank` (for tests and benchmarks); `stem` picks
    its weight class."""
    b = GraphBuilder("gguf_linear", accuracy_level=accuracy_level)
    n, k = weight.shape
    lead = [f"d{i}" for i in range(rank - 1)]
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, lead + [k]))
    y = b.linear("x", weight, stem, rank=rank)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [n]))
    return b.model()


@dataclass(frozen=True)
class DecoderConfig:
    """What the graph needs to know about a decoder-only transformer."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_dim: int
    max_context: int
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"  # gelu: exact (erf); the MLP is gated unless no gate
    norm: Literal["rms", "layer"] = "rms"  # layer: LayerNormalization with bias (phi, gpt_neox)
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) (phi: n2 is n1; gpt_neox)
    embed_scale: float | None = None  # gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    norm_placement: Literal["pre", "post"] = "pre"  # exaone4 normalizes each block's output, not its input
    sliding_window: int | None = None  # window of the layers whose layer_types entry is "sliding"
    layer_types: tuple[str, ...] | None = None  # per layer "full" | "sliding"; None: all full
    rope_on_full_layers: bool = True  # False: full-attention layers use no rotary (exaone4 hybrid "NoPE")
    attn_softcap: float | None = None  # gemma2: scores = cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # gemma2: logits = cap * tanh(logits / cap)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types is not None and self.layer_types[layer] == "sliding"

    def has_rope(self, layer: int) -> bool:
        return self.rope_on_full_layers or self.is_sliding(layer)


@dataclass(frozen=True)
class LayerWeights:
    o: Weight
    down: Weight
    o_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None  # ungated MLPs (phi, gpt_neox): down(act(up(x)))
    attn_norm_bias: np.ndarray | None = None  # LayerNorm biases (cfg.norm == "layer")
    ffn_norm_bias: np.ndarray | None = None
    attn_norm: np.ndarray | None = None  # pre-norms (most models) ...
    ffn_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # ... or post-norms of each block's output (exaone4)
    post_ffn_norm: np.ndarray | None = None
    q: Weight | None = None  # separate q/k/v, or one fused qkv
    k: Weight | None = None
    v: Weight | None = None
    qkv: Weight | None = None
    qkv_bias: np.ndarray | None = None
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # qwen3: RMSNorm over each head of q and k, before rotary
    k_norm: np.ndarray | None = None
    gate: Weight | None = None  # separate gate/up, or one fused gate_up (gate first)
    up: Weight | None = None
    gate_up: Weight | None = None


@dataclass(frozen=True)
class DecoderWeights:
    embedding: Weight  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: Weight  # [vocab, hidden]; the embedding itself when tied
    rope_freq_factors: np.ndarray | None = None  # llama3-style scaling, as llama.cpp stores it
    final_norm_bias: np.ndarray | None = None
    lm_head_bias: np.ndarray | None = None


def io_names(num_layers: int, attention: Attention = "gqa") -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if attention == "plain" else [])
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs + [LOGITS_TO_KEEP], outputs


Attention = Literal["gqa", "plain"]


def build_decoder(cfg: DecoderConfig, weights: DecoderWeights, *, accuracy_level: int | AccuracyPolicy,
                  external: ExternalData | None = None, attention: Attention = "gqa",
                  progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """The decoder-with-past graph of `cfg` over `weights`.

    attention "gqa" (the default) is onnxruntime's fused GroupQueryAttention with rotary inside: one
    kernel per layer, positions taken from attention_mask (no position_ids input), and past/present
    may share one preallocated buffer (manifest `past_present_share_buffer`). "plain" spells
    attention out in standard ONNX ops (any execution provider, position_ids input).
    """
    if attention not in ("gqa", "plain"):
        raise ValueError(f"attention {attention!r}: use 'gqa' or 'plain'")
    if attention == "plain" and (cfg.sliding_window is not None or not cfg.rope_on_full_layers or cfg.attn_softcap):
        raise ValueError(f"{cfg.architecture}: sliding-window / NoPE / softcapped layers need attention='gqa'")
    b = GraphBuilder(f"{cfg.architecture}_decoder", accuracy_level=accuracy_level, external=external)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    b.inputs += [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
    ]
    if attention == "plain":
        b.inputs.append(helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]))
    kv_shape = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    present_shape = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    for i in range(cfg.num_layers):
        b.inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, kv_shape) for kv in ("key", "value")]
    b.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch_size", "logits_length", cfg.vocab_size]))
    for i in range(cfg.num_layers):
        b.outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", f32, present_shape) for kv in ("key", "value")]

    x = _embed(b, cfg, weights.embedding)
    if attention == "gqa":
        attend = _gqa_attention(b, cfg, weights.rope_freq_factors)
    else:
        cos, sin = _rotary(b, cfg, weights.rope_freq_factors)
        mask = _attention_mask(b, cfg)

        def attend(i: int, h: str, layer: LayerWeights) -> str:
            return _attention(b, cfg, i, h, layer, cos, sin, mask)

    for i, layer in enumerate(weights.layers):
        if progress:
            progress(f"layer {i + 1}/{cfg.num_layers}")
        if cfg.parallel_residual:  # both blocks read x; phi has one norm for both
            a = attend(i, _norm(b, cfg, x, layer.attn_norm, layer.attn_norm_bias), layer)
            f = _mlp(b, cfg, i, _norm(b, cfg, x, layer.ffn_norm, layer.ffn_norm_bias) if layer.ffn_norm is not None
                     else _norm(b, cfg, x, layer.attn_norm, layer.attn_norm_bias), layer)
            x = b.op("Add", x, b.op("Add", a, f))
            continue
        x = _residual(b, cfg, x, layer.attn_norm, layer.post_attn_norm, lambda h: attend(i, h, layer),
                      pre_bias=layer.attn_norm_bias)
        x = _residual(b, cfg, x, layer.ffn_norm, layer.post_ffn_norm, lambda h: _mlp(b, cfg, i, h, layer),
                      pre_bias=layer.ffn_norm_bias)
    x = _norm(b, cfg, x, weights.final_norm, weights.final_norm_bias)
    x = _keep_last(b, x)
    logits = b.linear(x, weights.lm_head, "lm_head", bias=weights.lm_head_bias)
    if cfg.final_softcap:
        cap = b.const(np.array(cfg.final_softcap, dtype=np.float32))
        logits = b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)
    b.op("Identity", logits, outputs=["logits"])
    return b.model()


LOGITS_TO_KEEP = "logits_to_keep"


def _keep_last(b: GraphBuilder, x: str) -> str:
    """The last `logits_to_keep` positions of x [b, s, hidden]; 0 keeps all.

    The quality gate's perplexity feeds 0 (every position's logits); a generating caller feeds 1, and prefill
    skips the lm_head for all but the last prompt token (Qwen2.5-0.5B: the head is ~27 % of the prefill's
    multiply-adds, and the logits of a 128-token prompt are 78 MB). A required input, not an initializer
    with a default: onnxruntime's IO binding cannot bind an overridable initializer."""
    b.inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    start = b.op("Neg", LOGITS_TO_KEEP)  # -n: the last n; -0 = 0: all
    return b.op("Slice", x, start, b.ints(np.iinfo(np.int64).max), b.ints(1))


def _residual(b: GraphBuilder, cfg: DecoderConfig, x: str, pre: np.ndarray | None, post: np.ndarray | None,
              block: Callable[[str], str], *, pre_bias: np.ndarray | None = None) -> str:
    """x + block(norm(x)) for pre-norm layers, x + norm(block(x)) for post-norm ones (exaone4), both (gemma2)."""
    h = _norm(b, cfg, x, pre, pre_bias) if pre is not None else x
    y = block(h)
    if post is not None:
        y = _rms_norm(b, y, post, cfg.rms_eps)
    return b.op("Add", x, y)


def _inv_freq(cfg: DecoderConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.rope_dim, 2, dtype=np.int64).astype(np.float32) / cfg.rope_dim))
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float32)
    return inv_freq.astype(np.float32)


def _gqa_attention(b: GraphBuilder, cfg: DecoderConfig, freq_factors: np.ndarray | None) -> Callable[[int, str, LayerWeights], str]:
    """Shared inputs of every GroupQueryAttention node, and a function that builds one layer's attention.

    GroupQueryAttention reads the batch's lengths from attention_mask (seqlens_k = tokens - 1, right
    padding) and takes each new token's position from them, so rotary needs only the cos/sin tables.
    """
    seqlens_k = b.op("Cast", b.op("Sub", b.op("ReduceSum", "attention_mask", b.ints(1), keepdims=0),
                                  b.const(np.array(1, dtype=np.int64))), to=TensorProto.INT32)
    total = b.op("Cast", b.op("Gather", b.op("Shape", "attention_mask"), b.const(np.array(1, dtype=np.int64)), axis=0),
                 to=TensorProto.INT32)
    freqs = np.outer(np.arange(cfg.max_context, dtype=np.float32), _inv_freq(cfg, freq_factors))  # [positions, rope/2]
    cos_cache, sin_cache = b.const(np.cos(freqs), "rope.cos_cache"), b.const(np.sin(freqs), "rope.sin_cache")
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd)

    def attend(i: int, h: str, layer: LayerWeights) -> str:
        prefix = f"model.layers.{i}.self_attn"
        fused, bias = _fuse([layer.q, layer.k, layer.v], [layer.q_bias, layer.k_bias, layer.v_bias])
        if layer.qkv is not None or fused is not None:
            qkv = b.linear(h, layer.qkv if layer.qkv is not None else fused, f"{prefix}.qkv_proj",
                           bias=layer.qkv_bias if layer.qkv is not None else bias)
            q, k, v = qkv, "", ""  # packed: GroupQueryAttention splits it itself
        else:
            q = b.linear(h, layer.q, f"{prefix}.q_proj", bias=layer.q_bias)
            k = b.linear(h, layer.k, f"{prefix}.k_proj", bias=layer.k_bias)
            v = b.linear(h, layer.v, f"{prefix}.v_proj", bias=layer.v_bias)
        if layer.q_norm is not None or layer.k_norm is not None:
            if not k:
                q, k, v = b.op("Split", qkv, b.ints(nq * hd, nkv * hd, nkv * hd), axis=-1, outputs=3)
            q = _head_norm(b, q, layer.q_norm, nq, hd, cfg.rms_eps)
            k = _head_norm(b, k, layer.k_norm, nkv, hd, cfg.rms_eps)
        rope = cfg.has_rope(i)
        ins = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total]
        if rope:
            ins += [cos_cache, sin_cache]
        out, _, _ = b.op("GroupQueryAttention", *ins, domain=MS_DOMAIN, name=node_name(prefix, "GroupQueryAttention"),
                   outputs=[b._unique("gqa"), f"present.{i}.key", f"present.{i}.value"],
                   num_heads=nq, kv_num_heads=nkv, scale=float(scale), do_rotary=int(rope), rotary_interleaved=0,
                   local_window_size=cfg.sliding_window if cfg.is_sliding(i) else -1,
                   **({"softcap": float(cfg.attn_softcap)} if cfg.attn_softcap else {}))
        return b.linear(out, layer.o, f"{prefix}.o_proj", bias=layer.o_bias)

    return attend


def _head_norm(b: GraphBuilder, x: str, weight: np.ndarray | None, heads: int, head_dim: int, eps: float) -> str:
    """RMSNorm over each head of x [b, s, heads*head_dim] (qwen3, exaone4), back in the same layout."""
    if weight is None:
        return x
    y = _rms_norm(b, b.op("Reshape", x, b.ints(0, 0, heads, head_dim)), weight, eps)
    return b.op("Reshape", y, b.ints(0, 0, heads * head_dim))


def _embed(b: GraphBuilder, cfg: DecoderConfig, table: Weight) -> str:
    if isinstance(table, BlockWeight):
        x = gather_rows(b, table, "input_ids", index_rank=2)
    else:
        x = b.op("Gather", b.const(np.asarray(table, dtype=np.float32), "embed.weight"), "input_ids")
    if cfg.embed_scale is not None:
        x = b.op("Mul", x, b.const(np.array(cfg.embed_scale, dtype=np.float32)))
    return x


def gather_rows(b: GraphBuilder, table: BlockWeight, ids: str, *, index_rank: int) -> str:
    """Rows `ids` (int64, `index_rank` dims) of a block table as float32 [*ids.shape, K], dequantized exactly.

    A table without per-block mins is read by GatherBlockQuantized, from the very initializer MatMulNBits
    reads (one layout): with the default zero point, or an 8-bit one's own (Q5_0's 16, Q6_K's 32) as a
    zero_points input. The initializers are made once per table (kept with the table, which pins its id), so
    a tied embedding and lm_head share them, and the lm_head's exact top-k rows are its own blocks (a Q6_K
    head gathered as codes + scales + offsets instead held a second, 1.2x copy of it: 151 MB on TinyLlama)."""
    hidden, key = table.shape[1], id(table)
    keep = b.ints(*[0] * index_rank, hidden)
    zero_points = table.zero_points() if table.offsets is None else None
    if table.offsets is None and (zero_points is None or table.bits == 8):
        if key not in b._row_tables:
            b._row_tables[key] = (table, b.const(table.scales[..., None], "embed.scales"),
                                  *([] if zero_points is None else [b.const(zero_points[..., None], "embed.zero_points")]))
        data = b.packed(table, "embed.qweight")  # [vocab, blocks, block bytes]
        x = b.op("GatherBlockQuantized", data, ids, *b._row_tables[key][1:], domain=MS_DOMAIN,
                 bits=table.bits, block_size=table.block_size, gather_axis=0, quantize_axis=2)
        return b.op("Reshape", x, keep)
    # GatherBlockQuantized has no per-block min: gather codes, scales and offsets, dequantize the rows
    original, table = table, table.with_default_zero_point()
    if key not in b._row_tables:
        b._row_tables[key] = (original, b.const(table.codes, "embed.codes"), b.const(table.scales, "embed.scales"),
                              b.const(table.offsets, "embed.offsets"))
    _, codes, scales, offsets = b._row_tables[key]

    def rows(name: str) -> str:
        return b.op("Unsqueeze", b.op("Gather", name, ids), b.ints(-1))

    q = b.op("Cast", b.op("Gather", codes, ids), to=TensorProto.FLOAT)
    q = b.op("Reshape", q, b.ints(*[0] * index_rank, table.n_blocks, table.block_size))
    centred = b.op("Sub", q, b.const(np.array(table.zero_point, dtype=np.float32)))
    x = b.op("Add", b.op("Mul", centred, rows(scales)), rows(offsets))
    return b.op("Reshape", x, keep)


def _norm(b: GraphBuilder, cfg: DecoderConfig, x: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
    if cfg.norm == "rms":
        return _rms_norm(b, x, weight, cfg.rms_eps)
    ins = [x, b.const(weight.astype(np.float32), "norm.weight")]
    if bias is not None:
        ins.append(b.const(bias.astype(np.float32), "norm.bias"))
    return b.op("LayerNormalization", *ins, axis=-1, epsilon=float(cfg.rms_eps), stash_type=1)


def _rms_norm(b: GraphBuilder, x: str, weight: np.ndarray, eps: float) -> str:
    return b.op("SimplifiedLayerNormalization", x, b.const(weight.astype(np.float32), "norm.weight"),
                axis=-1, epsilon=float(eps), stash_type=1)


def _rotary(b: GraphBuilder, cfg: DecoderConfig, freq_factors: np.ndarray | None) -> tuple[str, str]:
    """cos, sin [b, 1, s, rope_dim] from position_ids, as HF's rotate-half rotary computes them."""
    pos = b.op("Unsqueeze", b.op("Cast", "position_ids", to=TensorProto.FLOAT), b.ints(-1))
    freqs = b.op("Mul", pos, b.const(_inv_freq(cfg, freq_factors), "rope.inv_freq"))
    emb = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.ints(1))
    return b.op("Cos", emb), b.op("Sin", emb)


def apply_rotary(b: GraphBuilder, cfg: DecoderConfig, x: str, cos: str, sin: str, *, signed_sin: bool = False) -> str:
    """HF's rotate-half rotary on x [.., head_dim]. `signed_sin`: the sin table already carries the sign of
    the rotated first half (exporter/npu_lm.py's tables), so no Neg op is needed."""
    if cfg.rope_dim != cfg.head_dim:  # partial rotary: only the first rope_dim features turn
        rot, rest = b.op("Split", x, b.ints(cfg.rope_dim, cfg.head_dim - cfg.rope_dim), axis=-1, outputs=2)
        return b.op("Concat", _rotate_half(b, rot, cos, sin, cfg.rope_dim, signed_sin), rest, axis=-1)
    return _rotate_half(b, x, cos, sin, cfg.rope_dim, signed_sin)


def _rotate_half(b: GraphBuilder, x: str, cos: str, sin: str, dim: int, signed_sin: bool) -> str:
    x1, x2 = b.op("Split", x, b.ints(dim // 2, dim // 2), axis=-1, outputs=2)
    rotated = b.op("Concat", x2 if signed_sin else b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _attention_mask(b: GraphBuilder, cfg: DecoderConfig) -> str:
    """bool [b, 1, groups*s, t]: causal over absolute positions and not padding, rows ordered (group, query)."""
    total = b.op("Gather", b.op("Shape", "attention_mask"), b.ints(1), axis=0)
    seq = b.op("Gather", b.op("Shape", "input_ids"), b.ints(1), axis=0)
    zero, one = b.const(np.array(0, dtype=np.int64)), b.const(np.array(1, dtype=np.int64))
    keys = b.op("Range", zero, b.op("Squeeze", total), one)  # [t]
    queries = b.op("Range", b.op("Squeeze", b.op("Sub", total, seq)), b.op("Squeeze", total), one)  # [s]
    causal = b.op("LessOrEqual", b.op("Unsqueeze", keys, b.ints(0)), b.op("Unsqueeze", queries, b.ints(1)))  # [s, t]
    not_pad = b.op("Unsqueeze", b.op("Cast", "attention_mask", to=TensorProto.BOOL), b.ints(1, 2))  # [b, 1, 1, t]
    mask = b.op("And", not_pad, causal)  # [b, 1, s, t]
    groups = cfg.num_heads // cfg.num_kv_heads
    return mask if groups == 1 else b.op("Tile", mask, b.ints(1, 1, groups, 1))


def project_qkv(b: GraphBuilder, cfg: DecoderConfig, i: int, h: str, layer: LayerWeights) -> tuple[str, str, str]:
    """Layer i's q, k, v [.., heads*head_dim] from h: one fused MatMul where the weights stack, then Split."""
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    prefix = f"model.layers.{i}.self_attn"
    fused, bias = _fuse([layer.q, layer.k, layer.v], [layer.q_bias, layer.k_bias, layer.v_bias])
    if layer.qkv is not None or fused is not None:
        qkv = b.linear(h, layer.qkv if layer.qkv is not None else fused, f"{prefix}.qkv_proj",
                           bias=layer.qkv_bias if layer.qkv is not None else bias)
        return tuple(b.op("Split", qkv, b.ints(nq * hd, nkv * hd, nkv * hd), axis=-1, outputs=3))  # type: ignore[return-value]
    return (b.linear(h, layer.q, f"{prefix}.q_proj", bias=layer.q_bias),
            b.linear(h, layer.k, f"{prefix}.k_proj", bias=layer.k_bias),
            b.linear(h, layer.v, f"{prefix}.v_proj", bias=layer.v_bias))


def _attention(b: GraphBuilder, cfg: DecoderConfig, i: int, h: str, layer: LayerWeights,
               cos: str, sin: str, mask: str) -> str:
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    prefix = f"model.layers.{i}.self_attn"
    q, k, v = project_qkv(b, cfg, i, h, layer)

    def heads(t: str, n: int) -> str:  # [b, s, n*hd] -> [b, n, s, hd]
        return b.op("Transpose", b.op("Reshape", t, b.ints(0, 0, n, hd)), perm=[0, 2, 1, 3])

    q, k = heads(q, nq), heads(k, nkv)
    if layer.q_norm is not None:
        q = _rms_norm(b, q, layer.q_norm, cfg.rms_eps)
    if layer.k_norm is not None:
        k = _rms_norm(b, k, layer.k_norm, cfg.rms_eps)
    q = apply_rotary(b, cfg, q, cos, sin)
    k = apply_rotary(b, cfg, k, cos, sin)
    k = b.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])
    v = b.op("Concat", f"past_key_values.{i}.value", heads(v, nkv), axis=2, outputs=[f"present.{i}.value"])

    # GQA without copying the cache: query heads of one kv head become extra query rows
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd)
    q = b.op("Mul", q, b.const(np.array(scale, dtype=np.float32)))
    q = b.op("Reshape", q, b.ints(0, nkv, -1, hd))  # [b, nkv, groups*s, hd]
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))  # [b, nkv, groups*s, t]
    scores = b.op("Where", mask, scores, b.const(np.array(np.finfo(np.float32).min, dtype=np.float32)))
    out = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)  # [b, nkv, groups*s, hd]
    out = b.op("Transpose", b.op("Reshape", out, b.ints(0, nq, -1, hd)), perm=[0, 2, 1, 3])
    out = b.op("Reshape", out, b.ints(0, 0, nq * hd))
    return b.linear(out, layer.o, f"{prefix}.o_proj", bias=layer.o_bias)


def _mlp(b: GraphBuilder, cfg: DecoderConfig, i: int, h: str, layer: LayerWeights) -> str:
    prefix = f"model.layers.{i}.mlp"
    fused, _ = _fuse([layer.gate, layer.up], [None, None])
    if layer.gate_up is not None or fused is not None:
        gate_up = b.linear(h, layer.gate_up if layer.gate_up is not None else fused, f"{prefix}.gate_up_proj")
        half = (layer.gate_up if layer.gate_up is not None else fused).shape[0] // 2
        gate, up = b.op("Split", gate_up, b.ints(half, half), axis=-1, outputs=2)
    elif layer.gate is None:  # ungated: down(act(up(h)))
        up = b.linear(h, layer.up, f"{prefix}.up_proj", bias=layer.up_bias)
        return b.linear(_activation(b, cfg, up), layer.down, f"{prefix}.down_proj", bias=layer.down_bias)
    else:
        gate, up = b.linear(h, layer.gate, f"{prefix}.gate_proj"), b.linear(h, layer.up, f"{prefix}.up_proj")
    return b.linear(b.op("Mul", _activation(b, cfg, gate), up), layer.down, f"{prefix}.down_proj", bias=layer.down_bias)


def _activation(b: GraphBuilder, cfg: DecoderConfig, gate: str) -> str:
    if cfg.activation == "gelu":  # exact: x/2 * (1 + erf(x / sqrt 2))
        erf = b.op("Erf", b.op("Mul", gate, b.const(np.array(1 / math.sqrt(2), dtype=np.float32))))
        return b.op("Mul", b.op("Mul", gate, b.op("Add", erf, b.const(np.array(1.0, dtype=np.float32)))),
                    b.const(np.array(0.5, dtype=np.float32)))
    if cfg.activation == "silu":
        return b.op("Mul", gate, b.op("Sigmoid", gate))
    else:  # gelu, tanh approximation
        cube = b.op("Mul", b.op("Mul", gate, gate), gate)
        inner = b.op("Add", gate, b.op("Mul", cube, b.const(np.array(0.044715, dtype=np.float32))))
        t = b.op("Tanh", b.op("Mul", inner, b.const(np.array(math.sqrt(2 / math.pi), dtype=np.float32))))
        return b.op("Mul", b.op("Mul", gate, b.op("Add", t, b.const(np.array(1.0, dtype=np.float32)))),
                    b.const(np.array(0.5, dtype=np.float32)))


def _fuse(weights: list[Weight | None], biases: list[np.ndarray | None]) -> tuple[Weight | None, np.ndarray | None]:
    """Weights over the same input stacked by rows (exact), with their biases; (None, None) if they don't stack."""
    if any(w is None for w in weights):
        return None, None
    if all(isinstance(w, BlockWeight) for w in weights):
        fused: Weight | None = concat_rows(weights)  # type: ignore[arg-type]
    elif all(isinstance(w, np.ndarray) for w in weights):
        fused = np.concatenate(weights)  # type: ignore[arg-type]
    else:
        fused = None
    if fused is None:
        return None, None
    if all(bias is None for bias in biases):
        return fused, None
    return fused, np.concatenate([bias if bias is not None else np.zeros(w.shape[0], np.float32)
                                  for w, bias in zip(weights, biases)])
