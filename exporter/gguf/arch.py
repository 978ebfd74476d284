"""llama.cpp architectures -> DecoderConfig + DecoderWeights (tensor names as llama.cpp writes them).

Differences handled here, so graph.py stays one decoder:
- llama (SmolLM2, TinyLlama, Llama-3.x, Mistral as llama.cpp converts it): the converter permutes
  the rows of attn_q/attn_k for its interleaved rotary; we un-permute the quantized rows (exact:
  rows are whole blocks) and use HF's rotate-half rotary. Llama-3 rope scaling is `rope_freqs`.
- qwen2: q/k/v biases. qwen3: RMSNorm of each q/k head (attn_q_norm/attn_k_norm). phi3: fused attn_qkv and fused ffn_up (gate, then up).
- gemma: embeddings times sqrt(hidden), GELU (tanh); llama.cpp already stores norm weights as 1 + w.
- gemma2: gemma plus post_attention_norm / post_ffw_norm, attention and final logit softcapping, sliding
  window on even layers; the query scale is llama.cpp's (no key: 1/sqrt(hidden / heads) for the 46-layer
  27B, 1/sqrt(head_dim) otherwise, as HF's query_pre_attn_scalar is for each released size).
- phi2 (Phi-2), gptneox (Pythia, Polyglot-Ko): LayerNorms with bias, biases on every linear (phi2's output too),
  an ungated MLP (ffn_up, ffn_down), partial rotary (rope.dimension_count), parallel residual (phi2 on one
  norm; gptneox per use_parallel_residual). The converter already reorders gptneox's per-head qkv to q|k|v.
  GELU is transformers' for each (phi2: tanh approximation; gptneox: exact erf, where llama.cpp uses tanh).
"""

from __future__ import annotations

import math

import numpy as np

from exporter.errors import UnsupportedArchitecture
from exporter.graph.decoder import DecoderConfig, DecoderWeights, LayerWeights
from exporter.gguf.reader import GgufFile

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "phi2", "gptneox")
LAYER_NORM = ("phi2", "gptneox")
MODEL_TYPES = {"phi2": "phi", "gptneox": "gpt_neox"}  # llama.cpp's name -> transformers' model_type, where they differ
GEMMA2_27B_LAYERS = 46


def decoder_config(g: GgufFile) -> DecoderConfig:
    arch = g.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported GGUF architecture {arch!r} in {g.path.name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(or export the original Hugging Face model instead)"
        )

    def m(key: str, default=None):
        value = g.meta(f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedArchitecture(f"{g.path.name}: GGUF metadata {arch}.{key} is missing; cannot build the graph")
        return value

    hidden = int(m("embedding_length"))
    heads = int(m("attention.head_count"))
    kv_heads = int(m("attention.head_count_kv", heads))
    head_dim = int(m("attention.key_length", hidden // heads))
    vocab = int(g.tensor("token_embd.weight").shape[1])
    if g.has("rope_factors_long.weight") or g.meta(f"{arch}.rope.scaling.type") not in (None, "none", "linear") \
            or float(g.meta(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        if not (arch == "llama" and g.has("rope_freqs.weight")):
            raise UnsupportedArchitecture(
                f"{g.path.name}: rope scaling ({g.meta(f'{arch}.rope.scaling.type')!r} / long-short factors) is not "
                "supported for GGUF import yet; supported: none, and llama3-style rope_freqs"
            )
    gemma = arch in ("gemma", "gemma2")
    layers = int(m("block_count"))
    gemma2: dict = {}
    if arch == "gemma2":
        query_scalar = hidden / heads if layers == GEMMA2_27B_LAYERS else head_dim
        gemma2 = dict(attn_scale=query_scalar ** -0.5, sliding_window=int(m("attention.sliding_window")),
                      layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(layers)),
                      attn_softcap=float(m("attn_logit_softcapping", 50.0)) or None,
                      final_softcap=float(m("final_logit_softcapping", 30.0)) or None)
    return DecoderConfig(
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_eps=float(m("attention.layer_norm_epsilon" if arch in LAYER_NORM else "attention.layer_norm_rms_epsilon")),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_dim=int(m("rope.dimension_count", head_dim)),
        max_context=int(m("context_length")),
        activation="gelu_tanh" if gemma or arch == "phi2" else "gelu" if arch == "gptneox" else "silu",
        embed_scale=math.sqrt(hidden) if gemma else None,
        norm="layer" if arch in LAYER_NORM else "rms",
        parallel_residual=arch == "phi2" or (arch == "gptneox" and bool(g.meta("gptneox.use_parallel_residual", True))),
        **gemma2,
    )


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: HF row (h, a, j) is GGUF row (h, j, a)."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(n_rows)


def decoder_weights(g: GgufFile, cfg: DecoderConfig) -> DecoderWeights:
    arch = cfg.architecture
    q_rows = k_rows = None
    if arch == "llama":
        q_rows = unpermute_rows(cfg.num_heads * cfg.head_dim, cfg.num_heads)
        k_rows = unpermute_rows(cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads)

    def opt_vector(name: str) -> np.ndarray | None:
        return g.vector(name) if g.has(name) else None

    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        common = dict(attn_norm=g.vector(p + "attn_norm.weight"), ffn_norm=opt_vector(p + "ffn_norm.weight"),
                      attn_norm_bias=opt_vector(p + "attn_norm.bias"), ffn_norm_bias=opt_vector(p + "ffn_norm.bias"),
                      o=g.weight(p + "attn_output.weight"), o_bias=opt_vector(p + "attn_output.bias"),
                      down=g.weight(p + "ffn_down.weight"), down_bias=opt_vector(p + "ffn_down.bias"))
        if g.has(p + "attn_qkv.weight"):
            attn = dict(qkv=g.weight(p + "attn_qkv.weight"), qkv_bias=opt_vector(p + "attn_qkv.bias"))
        else:
            q_bias, k_bias = opt_vector(p + "attn_q.bias"), opt_vector(p + "attn_k.bias")
            attn = dict(
                q=g.weight(p + "attn_q.weight", rows=q_rows), k=g.weight(p + "attn_k.weight", rows=k_rows),
                v=g.weight(p + "attn_v.weight"),
                q_bias=None if q_bias is None or q_rows is None else q_bias[q_rows],
                k_bias=None if k_bias is None or k_rows is None else k_bias[k_rows],
                v_bias=opt_vector(p + "attn_v.bias"),
            )
            if q_rows is None:
                attn.update(q_bias=q_bias, k_bias=k_bias)
        if g.has(p + "ffn_gate.weight"):
            mlp = dict(gate=g.weight(p + "ffn_gate.weight"), up=g.weight(p + "ffn_up.weight"))
        elif arch in LAYER_NORM:  # ungated
            mlp = dict(up=g.weight(p + "ffn_up.weight"), up_bias=opt_vector(p + "ffn_up.bias"))
        else:
            mlp = dict(gate_up=g.weight(p + "ffn_up.weight"))
        head_norms = dict(q_norm=opt_vector(p + "attn_q_norm.weight"), k_norm=opt_vector(p + "attn_k_norm.weight"))
        post_norms = dict(post_attn_norm=opt_vector(p + "post_attention_norm.weight"),
                          post_ffn_norm=opt_vector(p + "post_ffw_norm.weight"))  # gemma2
        layers.append(LayerWeights(**common, **attn, **mlp, **head_norms, **post_norms))

    embedding = g.weight("token_embd.weight")
    lm_head = g.weight("output.weight") if g.has("output.weight") else embedding
    return DecoderWeights(
        embedding=embedding, layers=layers, final_norm=g.vector("output_norm.weight"), lm_head=lm_head,
        final_norm_bias=opt_vector("output_norm.bias"), lm_head_bias=opt_vector("output.bias"),
        rope_freq_factors=opt_vector("rope_freqs.weight"),
    )
