"""The native LM pipeline: a transformers decoder -> edgeship's own ONNX graph (exporter/graph/decoder.py),
with fused attention.

optimum traces PyTorch and leaves attention spelled out in ~30 small ops per layer, with the KV cache
concatenated (copied) every step. This path reads the weights of a loaded transformers model and
builds the decoder graph directly: onnxruntime's GroupQueryAttention (rotary inside, past and present
in one preallocated buffer), SimplifiedLayerNormalization, and q/k/v and gate/up fused into one
MatMul each. The float graph then goes through the same quantization, quality gate and benchmark as
every other LM bundle, and keeps the bundle I/O (input_ids, attention_mask, past_key_values.* ->
logits, present.*), minus position_ids, which GroupQueryAttention derives from attention_mask.

    supported(config)        None, or why this model needs the optimum path
    decoder_from_hf(model)   DecoderConfig + DecoderWeights (float32 numpy views of the weights)
    export_native(model, d)  d/model.onnx + d/model.onnx.data, float32
    build(job, stage, work)  the pipeline: exporter/pipelines/hf_lm.py with this graph
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from exporter.errors import ConversionError, UnsupportedArchitecture
from exporter.pipelines import Built, Job, hf_lm
from exporter.graph.decoder import (DecoderConfig, DecoderWeights, ExternalData, LayerWeights, ScannedHead, Weight,
                                 build_decoder)
from exporter.gguf.repack import BlockWeight

NAME = "native"

# model_type -> what differs from llama, handled below
NATIVE_ARCHITECTURES = {
    "llama": "Llama 2/3.x (llama3 rope scaling), TinyLlama, SmolLM",
    "mistral": "Mistral (no sliding window in the config, or one longer than the context)",
    "qwen2": "Qwen2 / Qwen2.5: q/k/v biases",
    "qwen3": "Qwen3: RMSNorm of each q/k head",
    "phi3": "Phi-3 / Phi-3.5 mini without long-rope scaling: fused qkv and gate_up",
    "gemma": "Gemma: embeddings times sqrt(hidden), norms 1 + w, GELU (tanh)",
    "gemma2": "Gemma 2: gemma plus post-norms of each block, attention and final logit softcapping, alternating "
              "sliding-window layers, queries scaled by query_pre_attn_scalar",
    "phi": "Phi-1.5 / Phi-2: LayerNorm with bias, parallel attention + MLP on one norm, partial rotary, "
           "biases everywhere (lm_head too), GELU (tanh)",
    "gpt_neox": "GPT-NeoX, Pythia, Polyglot-Ko: LayerNorm with bias, fused qkv (interleaved per head), partial "
                "rotary, parallel or sequential residual, exact GELU",
    "exaone4": "EXAONE 4.0: post-norms, RMSNorm of each q/k head, hybrid sliding/global (NoPE) attention",
}
# native on request only (--graph native): side by side, its graph decoded no faster than optimum's
# (bench/native_vs_optimum.py, docs/EXPORT.md), so auto keeps the traced graph
OPTIMUM_BY_DEFAULT = {
    "phi": "the native phi graph measured no faster than optimum's (bench/native_vs_optimum.py); --graph native takes it",
    "gpt_neox": "the native gpt_neox graph measured no faster than optimum's (bench/native_vs_optimum.py); "
                "--graph native takes it",
}
# rope types whose inv_freq is fixed at load time (the graph bakes the cos/sin tables)
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def supported(config: Any) -> str | None:
    """None when the native builder handles `config`; else one line saying why not (optimum is used)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in NATIVE_ARCHITECTURES:
        return f"{model_type!r} has no native graph builder (native: {', '.join(NATIVE_ARCHITECTURES)})"
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope scaling {rope_type!r} changes with the sequence length (native: {', '.join(STATIC_ROPE_TYPES)})"
    if _activation(config) not in _ACTIVATIONS:
        return f"activation {_activation(config)!r} is not one of {', '.join(_ACTIVATIONS)}"
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    if head_dim % 16:
        return f"head_dim {head_dim} (GroupQueryAttention needs a multiple of 16)"
    if rope_dim < head_dim and (rope_dim // 2) % 8:
        return f"partial rotary over {rope_dim} of {head_dim} features (GroupQueryAttention needs a multiple of 16)"
    if model_type == "phi" and getattr(config, "qk_layernorm", False):
        return "Phi with qk_layernorm (a LayerNorm of each q/k head)"
    if model_type == "mistral" and getattr(config, "sliding_window", None) and \
            config.sliding_window < config.max_position_embeddings:
        return "Mistral with a sliding window shorter than its context"
    return None


_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}
LAYER_NORM = ("phi", "gpt_neox")


def _activation(config: Any) -> str | None:
    if config.model_type in ("gemma", "gemma2"):  # gemma's modeling code reads hidden_activation, not hidden_act
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return getattr(config, "hidden_act", None)


def decoder_from_hf(model: Any, *, max_context: int | None = None, embedding_bits: int | None = None,
                    head_top_k: int | None = None) -> tuple[DecoderConfig, DecoderWeights]:
    """The graph config and float32 weights of a loaded transformers causal LM (weights are not copied).

    embedding_bits=8 stores the token embedding table as symmetric 8-bit blocks of 32 (GatherBlockQuantized,
    llama.cpp's Q8_0 grid): a quarter of the float table's bytes on disk and in RAM; the gather reads one row
    per token, so it costs no speed. An untied lm_head stays a float weight for the quantizer; a tied one
    becomes an 8-bit MatMulNBits over the same stored blocks (level 4), so the table is stored once.

    head_top_k=k makes the lm_head a ScannedHead instead: every logit from 4-bit blocks (decode reads the
    head's bytes for every token: 4-bit reads ~45 % fewer than 8-bit), then each position's top k
    recomputed in float32 from 8-bit blocks -- the tied embedding's own, or the untied head's.
    """
    config = model.config
    reason = supported(config)
    if reason is not None:
        raise UnsupportedArchitecture(f"native export: {reason}")
    arch = config.model_type
    state = {name: t.detach() for name, t in model.state_dict(keep_vars=False).items()}

    def w(name: str) -> np.ndarray:
        if name not in state:
            raise ConversionError(f"{arch}: weight {name!r} is missing from the checkpoint")
        return state[name].float().numpy()

    def opt(name: str) -> np.ndarray | None:
        return w(name) if name in state else None

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    limit = getattr(config, "max_position_embeddings", None) or 2048
    layer_types = tuple(getattr(config, "layer_types", None) or ()) or None
    sliding = getattr(config, "sliding_window", None) if arch in ("exaone4", "gemma2") else None
    gemma = arch in ("gemma", "gemma2")
    cfg = DecoderConfig(
        architecture=arch,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=heads if arch == "gpt_neox" else getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        rms_eps=float(config.layer_norm_eps if arch in LAYER_NORM else config.rms_norm_eps),
        rope_theta=float(getattr(config, "rope_theta", 10000.0)),
        rope_dim=rope_dim,
        max_context=min(limit, max_context) if max_context else limit,
        activation=_ACTIVATIONS[_activation(config)],
        embed_scale=math.sqrt(config.hidden_size) if gemma else None,
        attn_scale=config.query_pre_attn_scalar ** -0.5 if arch == "gemma2" else None,
        norm_placement="post" if arch == "exaone4" else "pre",
        sliding_window=sliding,
        layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in layer_types) if layer_types else None,
        rope_on_full_layers=arch != "exaone4" or sliding is None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if arch == "gemma2" else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if arch == "gemma2" else None,
        norm="layer" if arch in LAYER_NORM else "rms",
        parallel_residual=arch == "phi" or (arch == "gpt_neox" and bool(config.use_parallel_residual)),
    )
    if arch in LAYER_NORM:
        return cfg, _layer_norm_weights(cfg, w, opt, state, embedding_bits=embedding_bits, head_top_k=head_top_k,
                                        rope_freq_factors=_freq_factors(model, cfg))

    norm = (lambda v: v + 1.0) if gemma else (lambda v: v)  # gemma's RMSNorm scales by 1 + w
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        if arch == "phi3":
            attn: dict = dict(qkv=w(p + "self_attn.qkv_proj.weight"))
            mlp: dict = dict(gate_up=w(p + "mlp.gate_up_proj.weight"))
        else:
            attn = dict(q=w(p + "self_attn.q_proj.weight"), k=w(p + "self_attn.k_proj.weight"),
                        v=w(p + "self_attn.v_proj.weight"), q_bias=opt(p + "self_attn.q_proj.bias"),
                        k_bias=opt(p + "self_attn.k_proj.bias"), v_bias=opt(p + "self_attn.v_proj.bias"),
                        q_norm=opt(p + "self_attn.q_norm.weight"), k_norm=opt(p + "self_attn.k_norm.weight"))
            mlp = dict(gate=w(p + "mlp.gate_proj.weight"), up=w(p + "mlp.up_proj.weight"))
        if arch == "exaone4":
            norms = dict(post_attn_norm=w(p + "post_attention_layernorm.weight"),
                         post_ffn_norm=w(p + "post_feedforward_layernorm.weight"))
        elif arch == "gemma2":  # pre- and post-norms around both blocks; the names differ from gemma's
            norms = dict(attn_norm=norm(w(p + "input_layernorm.weight")),
                         post_attn_norm=norm(w(p + "post_attention_layernorm.weight")),
                         ffn_norm=norm(w(p + "pre_feedforward_layernorm.weight")),
                         post_ffn_norm=norm(w(p + "post_feedforward_layernorm.weight")))
        else:
            norms = dict(attn_norm=norm(w(p + "input_layernorm.weight")),
                         ffn_norm=norm(w(p + "post_attention_layernorm.weight")))
        layers.append(LayerWeights(o=w(p + "self_attn.o_proj.weight"), down=w(p + "mlp.down_proj.weight"),
                                   **attn, **mlp, **norms))
    embedding = w("model.embed_tokens.weight")
    tied = "lm_head.weight" not in state or \
        state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    lm_head = None if tied else w("lm_head.weight")
    if embedding_bits not in (None, 8):
        raise ValueError(f"embedding_bits {embedding_bits!r}: use None (float) or 8")
    table = embedding if embedding_bits is None else blocks_q8(embedding)
    # tied: the lm_head reads the very same blocks (MatMulNBits B and GatherBlockQuantized data share a layout)
    head: Weight = table if lm_head is None else lm_head
    if head_top_k is not None:
        source = embedding if lm_head is None else lm_head
        rows = table if lm_head is None and isinstance(table, BlockWeight) else blocks_q8(source)
        head = ScannedHead(scan=blocks_q4(source), rows=rows, top_k=head_top_k)
    weights = DecoderWeights(embedding=table, layers=layers, final_norm=norm(w("model.norm.weight")),
                             lm_head=head, rope_freq_factors=_freq_factors(model, cfg))
    return cfg, weights


def _layer_norm_weights(cfg: DecoderConfig, w: Callable[[str], np.ndarray], opt: Callable[[str], np.ndarray | None],
                        state: dict, *, embedding_bits: int | None, head_top_k: int | None,
                        rope_freq_factors: np.ndarray | None) -> DecoderWeights:
    """phi and gpt_neox: LayerNorms with bias, ungated MLPs with biases (float embedding and head only)."""
    if embedding_bits is not None or head_top_k is not None:
        raise ValueError(f"{cfg.architecture}: 8-bit embedding / top-k head blocks are not built for it")
    layers = []
    for i in range(cfg.num_layers):
        if cfg.architecture == "phi":
            p = f"model.layers.{i}."
            attn: dict = dict(q=w(p + "self_attn.q_proj.weight"), k=w(p + "self_attn.k_proj.weight"),
                              v=w(p + "self_attn.v_proj.weight"), q_bias=opt(p + "self_attn.q_proj.bias"),
                              k_bias=opt(p + "self_attn.k_proj.bias"), v_bias=opt(p + "self_attn.v_proj.bias"))
            o, mlp_in, mlp_out = p + "self_attn.dense", p + "mlp.fc1", p + "mlp.fc2"
            norms: dict = dict(attn_norm=w(p + "input_layernorm.weight"), attn_norm_bias=opt(p + "input_layernorm.bias"))
        else:
            p = f"gpt_neox.layers.{i}."
            rows = _neox_qkv_rows(cfg.num_heads, cfg.head_dim)  # [head, q|k|v, dim] -> [q|k|v, head, dim]
            bias = opt(p + "attention.query_key_value.bias")
            attn = dict(qkv=w(p + "attention.query_key_value.weight")[rows], qkv_bias=None if bias is None else bias[rows])
            o, mlp_in, mlp_out = p + "attention.dense", p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h"
            norms = dict(attn_norm=w(p + "input_layernorm.weight"), attn_norm_bias=opt(p + "input_layernorm.bias"),
                         ffn_norm=w(p + "post_attention_layernorm.weight"),
                         ffn_norm_bias=opt(p + "post_attention_layernorm.bias"))
        layers.append(LayerWeights(o=w(o + ".weight"), o_bias=opt(o + ".bias"), up=w(mlp_in + ".weight"),
                                   up_bias=opt(mlp_in + ".bias"), down=w(mlp_out + ".weight"),
                                   down_bias=opt(mlp_out + ".bias"), **attn, **norms))
    if cfg.architecture == "phi":
        embed, final, head = "model.embed_tokens", "model.final_layernorm", "lm_head"
    else:
        embed, final, head = "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out"
    embedding = w(embed + ".weight")
    tied = head + ".weight" not in state or state[head + ".weight"].data_ptr() == state[embed + ".weight"].data_ptr()
    return DecoderWeights(embedding=embedding, layers=layers, final_norm=w(final + ".weight"),
                          final_norm_bias=opt(final + ".bias"), lm_head=embedding if tied else w(head + ".weight"),
                          lm_head_bias=opt(head + ".bias"), rope_freq_factors=rope_freq_factors)


def _neox_qkv_rows(heads: int, head_dim: int) -> np.ndarray:
    return np.arange(3 * heads * head_dim).reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(-1)


def blocks_q8(table: np.ndarray, block: int = 32) -> BlockWeight:
    """Symmetric 8-bit blocks along the rows: w = d * (code - 128), d = max|w| / 127 per block."""
    rows, k = table.shape
    if k % block:
        raise ConversionError(f"embedding width {k} is not a multiple of {block}; export with embedding_bits=None")
    x = table.reshape(rows, k // block, block).astype(np.float32)
    d = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(d > 0, d, 1.0)
    codes = (np.clip(np.rint(x / safe[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, k)
    return BlockWeight(ggml_type="Q8_0", bits=8, block_size=block, codes=codes, scales=d.astype(np.float32),
                       zero_point=128, offsets=None)


def blocks_q4(weight: np.ndarray, block: int = 32) -> BlockWeight:
    """Asymmetric 4-bit blocks along the rows, round to nearest: w = d * (code - z), d = (max - min) / 15,
    z = round(-min / d) per block (a uint8 zero point: MatMulNBits' fast path)."""
    rows, k = weight.shape
    if k % block:
        raise ConversionError(f"lm_head width {k} is not a multiple of {block}; export without head_top_k")
    x = weight.reshape(rows, k // block, block).astype(np.float32)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / 15.0
    safe = np.where(d > 0, d, 1.0)
    z = np.clip(np.rint(-lo / safe), 0, 15)
    codes = np.clip(np.rint(x / safe[..., None]) + z[..., None], 0, 15).astype(np.uint8).reshape(rows, k)
    return BlockWeight(ggml_type="int4-asym", bits=4, block_size=block, codes=codes, scales=safe.astype(np.float32),
                       zero_point=z.astype(np.uint8), offsets=None)


def _freq_factors(model: Any, cfg: DecoderConfig) -> np.ndarray | None:
    """Per-frequency divisors that turn the default inv_freq into the model's (linear / llama3 scaling)."""
    rotary = getattr(getattr(model, "model", None) or getattr(model, "gpt_neox", model), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedArchitecture(f"{cfg.architecture}: rope attention scaling {rotary.attention_scaling} is not supported")
    actual = rotary.inv_freq.detach().double().numpy()
    default = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.rope_dim, 2, dtype=np.float64) / cfg.rope_dim))
    if actual.shape != default.shape:
        raise ConversionError(f"{cfg.architecture}: rotary has {actual.shape[0]} frequencies, expected {default.shape[0]}")
    factors = default / actual
    return None if np.allclose(factors, 1.0, rtol=1e-6) else factors.astype(np.float32)


_NATIVE_NAMES = (("/gpt_neox/layers.", "/model/layers."), ("/attention/query_key_value/", "/self_attn/qkv_proj/"),
                 ("/attention/dense/", "/self_attn/o_proj/"), ("/self_attn/dense/", "/self_attn/o_proj/"),
                 ("/mlp/fc1/", "/mlp/up_proj/"), ("/mlp/dense_h_to_4h/", "/mlp/up_proj/"),
                 ("/mlp/fc2/", "/mlp/down_proj/"), ("/mlp/dense_4h_to_h/", "/mlp/down_proj/"))


def fused_patterns(patterns: list[str]) -> list[str]:
    """optimum node patterns renamed to the fused MatMuls of the native graph (q/k/v -> qkv, gate/up -> gate_up),
    and phi's and gpt_neox's module names to the native graph's llama-style ones."""
    out: list[str] = []
    for p in patterns:
        for parts, fused in ((("/q_proj/", "/k_proj/", "/v_proj/"), "/qkv_proj/"), (("/gate_proj/", "/up_proj/"), "/gate_up_proj/")):
            for part in parts:
                p = p.replace(part, fused)
        for module, native in _NATIVE_NAMES:  # phi's and gpt_neox's modules, after: their up_proj is not fused
            p = p.replace(module, native)
        if p not in out:
            out.append(p)
    return out


def export_native(model: Any, work_dir: Path, *, max_context: int | None = None, embedding_bits: int | None = None,
                  head_top_k: int | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """work_dir/model.onnx (+ model.onnx.data): the float32 GroupQueryAttention graph of `model` (with
    head_top_k, its lm_head already in 4-bit + 8-bit blocks: see decoder_from_hf)."""
    cfg, weights = decoder_from_hf(model, max_context=max_context, embedding_bits=embedding_bits,
                                   head_top_k=head_top_k)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "model.onnx"
    external = ExternalData(work_dir / "model.onnx.data")
    try:
        graph = build_decoder(cfg, weights, accuracy_level=4, external=external, attention="gqa", progress=progress)
    except ValueError as exc:
        raise ConversionError(f"building the {cfg.architecture} graph failed: {exc}") from exc
    finally:
        external.close()
    del weights
    gc.collect()
    onnx.save_model(graph, str(path))
    return path


node_patterns = fused_patterns


def export_graph(model: Any, work: Path, *, recipe: Any, spec_config: dict[str, Any], job: Job) -> hf_lm.Graph:
    """The fused float32 graph; with an int4 recipe the embedding (and a top-k lm_head) in blocks already."""
    # the profile's int8_blocks may name the embedding table too (int4 recipes: weights-only low bits)
    blocks = model.config.model_type not in LAYER_NORM  # phi, gpt_neox: float table and head, for the quantizer
    embed8 = blocks and recipe.method == "int4" and any(p in "model.embed_tokens" for p in recipe.int8_blocks)
    head_k = recipe.lm_head_top_k if recipe.int8_head and blocks else None
    with job.progress.step("export", "edgeship graph, fused GroupQueryAttention, KV cache"):
        path = export_native(model, work, max_context=spec_config["max_context"],
                             embedding_bits=8 if embed8 else None, head_top_k=head_k)
    details: dict[str, Any] = {}
    if embed8:
        details["embedding"] = "8-bit symmetric blocks of 32 (GatherBlockQuantized)"
    tied = getattr(model.config, "tie_word_embeddings", False)
    if head_k:
        rows = "the tied embedding's 8-bit blocks" if tied and embed8 else "the head's own 8-bit blocks"
        details["lm_head"] = (f"every logit from 4-bit asymmetric blocks (level 4), then each position's "
                              f"top {head_k} recomputed in float32 from {rows}")
    elif embed8 and tied:
        details["lm_head"] = "8-bit MatMulNBits over the tied embedding's blocks (stored once)"
    # one max_context KV buffer per layer that GroupQueryAttention reads and writes in place
    return hf_lm.Graph(path, spec={"past_present_share_buffer": True, "attention": "GroupQueryAttention"},
                       head_top_k=head_k, details=details)


def disk_bytes(job: Job) -> int:
    return hf_lm.disk_bytes(job)


def build(job: Job, stage: Path, work: Path) -> Built:
    return hf_lm.build(job, stage, work, graph=sys.modules[__name__])
