"""llama.cpp architectures -> DecoderConfig + DecoderWeights (tensor names as llama.cpp writes them).

Differences handled here, so graph.py stays one decoder:
- llama (SmolLM2, TinyLlama, Llama-3.x, Mistral as llama.cpp converts it): the converter permutes
  the rows of attn_q/attn_k for its interleaved rotary; we un-permute the quantized rows (exact:
  rows are whole blocks) and use HF's rotate-half rotary. Llama-3 rope scaling is `rope_freqs`.
- qwen2: q/k/v biases. qwen3: RMSNorm of each q/k head (attn_q_norm/attn_k_norm). phi3: fused attn_qkv and fused ffn_up (gate, then up).
- gemma: embeddings times sqrt(hidden), GELU (tanh); llama.cpp already stores norm weights as 1 + w.
"""

from __future__ import annotations

import math

import numpy as np

from exporter.errors import UnsupportedArchitecture
from exporter.graph.decoder import DecoderConfig, DecoderWeights, LayerWeights
from exporter.gguf.reader import GgufFile

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma")


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
    vocab = int(g.tensors["token_embd.weight"].shape[1])
    if g.has("rope_factors_long.weight") or g.meta(f"{arch}.rope.scaling.type") not in (None, "none", "linear") \
            or float(g.meta(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        if not (arch == "llama" and g.has("rope_freqs.weight")):
            raise UnsupportedArchitecture(
                f"{g.path.name}: rope scaling ({g.meta(f'{arch}.rope.scaling.type')!r} / long-short factors) is not "
                "supported for GGUF import yet; supported: none, and llama3-style rope_freqs"
            )
    return DecoderConfig(
        architecture=arch,
        num_layers=int(m("block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_eps=float(m("attention.layer_norm_rms_epsilon")),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_dim=int(m("rope.dimension_count", head_dim)),
        max_context=int(m("context_length")),
        activation="gelu_tanh" if arch == "gemma" else "silu",
        embed_scale=math.sqrt(hidden) if arch == "gemma" else None,
    )


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: HF row (h, a, j) is GGUF row (h, j, a)."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(n_rows)


def decoder_weights(g: GgufFile, cfg: DecoderConfig) -> DecoderWeights:
    arch = cfg.architecture
    q_rows = k_rows = None
    if arch == "llama":
        q_rows = _unpermute_rows(cfg.num_heads * cfg.head_dim, cfg.num_heads)
        k_rows = _unpermute_rows(cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads)

    def opt_vector(name: str) -> np.ndarray | None:
        return g.vector(name) if g.has(name) else None

    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        common = dict(attn_norm=g.vector(p + "attn_norm.weight"), ffn_norm=g.vector(p + "ffn_norm.weight"),
                      o=g.weight(p + "attn_output.weight"), down=g.weight(p + "ffn_down.weight"))
        if g.has(p + "attn_qkv.weight"):
            attn = dict(qkv=g.weight(p + "attn_qkv.weight"))
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
        else:
            mlp = dict(gate_up=g.weight(p + "ffn_up.weight"))
        head_norms = dict(q_norm=opt_vector(p + "attn_q_norm.weight"), k_norm=opt_vector(p + "attn_k_norm.weight"))
        layers.append(LayerWeights(**common, **attn, **mlp, **head_norms))

    embedding = g.weight("token_embd.weight")
    lm_head = g.weight("output.weight") if g.has("output.weight") else embedding
    return DecoderWeights(
        embedding=embedding, layers=layers, final_norm=g.vector("output_norm.weight"), lm_head=lm_head,
        rope_freq_factors=opt_vector("rope_freqs.weight"),
    )
