"""The float reference of a GGUF file: the transformers model holding its weights dequantized to float32.

transformers (4.57) reads llama, qwen2, phi3 and qwen3 GGUFs itself (`gguf_file=`); those keep its loader.
For the rest its loader is missing (phi2, gptneox, gemma) or misreads the file (gemma2: query_pre_attn_scalar
left at 256, which llama.cpp does not store; qwen3: head_dim left at 128, the key_length ignored). There
this module builds the transformers config from the metadata arch.py reads, maps llama.cpp's tensor names
back to the transformers module's, undoes the converter's reorderings (llama's q/k rows, gptneox's qkv,
gemma's 1 + w norms) and loads the state dict strictly: every parameter filled, no tensor left over.

    load_config(path)   the transformers config (transformers' own where it reads the file)
    load_model(path)    the float32 transformers model of the file, in eval mode
    own_model(path)     the same built by this module, whichever loader load_model takes (tests compare them)

Architectures arch.py does not build but transformers reads (falcon, bloom, ...) keep transformers' loader:
`--requantize` exports those; the exact path refuses them in export_gguf with the supported list.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import SourceError, UnsupportedArchitecture
from exporter.gguf.arch import MODEL_TYPES, SUPPORTED_ARCHITECTURES, decoder_config, unpermute_rows
from exporter.gguf.reader import GgufFile
from exporter.graph.decoder import DecoderConfig

TRANSFORMERS_READS = ("llama", "qwen2", "qwen3", "phi3")
TRANSFORMERS_QWEN3_HEAD_DIM = 128  # Qwen3Config's default, which transformers' GGUF loader keeps

Fix = Callable[[np.ndarray], np.ndarray]
TensorMap = dict[str, tuple[str, Fix | None]]  # transformers name -> (GGUF name, what turns one into the other)


def transformers_reads(cfg: DecoderConfig) -> bool:
    """Whether transformers' own GGUF loader builds this file's model right."""
    if cfg.architecture == "qwen3":
        return cfg.head_dim == TRANSFORMERS_QWEN3_HEAD_DIM
    return cfg.architecture in TRANSFORMERS_READS


def load_config(path: Path) -> Any:
    """The transformers config of the GGUF at `path`, after checking it holds every tensor its model needs."""
    g = GgufFile(path)
    cfg = _ours(g)
    if cfg is None:
        from transformers import AutoConfig

        return _by_transformers(g, "config", lambda: AutoConfig.from_pretrained(
            g.path.parent, gguf_file=g.path.name, local_files_only=True))
    return hf_config(g, cfg)


def load_model(path: Path) -> Any:
    """The float32 transformers model of the GGUF at `path` (eval mode)."""
    g = GgufFile(path)
    cfg = _ours(g)
    if cfg is None:
        import torch
        from transformers import AutoModelForCausalLM

        return _by_transformers(g, "model", lambda: AutoModelForCausalLM.from_pretrained(
            g.path.parent, gguf_file=g.path.name, dtype=torch.float32, local_files_only=True)).eval()
    return _own_model(g, cfg, tensor_map(g, cfg))


def own_model(path: Path) -> Any:
    """The float32 transformers model of the GGUF at `path` as this module builds it (eval mode)."""
    g = GgufFile(path)
    cfg = decoder_config(g)
    return _own_model(g, cfg, tensor_map(g, cfg))


def _ours(g: GgufFile) -> DecoderConfig | None:
    """arch.py's config of the file where this module builds its model; None where transformers' loader does."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if g.architecture not in SUPPORTED_ARCHITECTURES and g.architecture in GGUF_SUPPORTED_ARCHITECTURES \
            and g.architecture not in ("general", "tokenizer"):  # sections of transformers' table, not models
        return None
    cfg = decoder_config(g)  # an unknown architecture: one line naming the supported ones
    tensor_map(g, cfg)
    return None if transformers_reads(cfg) else cfg


def _by_transformers(g: GgufFile, what: str, load: Callable[[], Any]) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return load()
    except Exception as exc:  # its GGUF code raises ValueError, KeyError, RuntimeError, ... on files it cannot take
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"transformers cannot read the {what} of {g.path.name} ({first}); "
                          "export the original Hugging Face model instead") from None


def hf_config(g: GgufFile, cfg: DecoderConfig) -> Any:
    """The transformers config of the model the GGUF was converted from, from the metadata arch.py reads."""
    from transformers import AutoConfig

    arch = cfg.architecture
    if g.has("rope_freqs.weight"):  # llama3 scaling's factors, not its parameters: transformers' loader takes these
        raise UnsupportedArchitecture(f"{g.path.name}: rope_freqs (llama3 rope scaling) cannot be turned back into "
                                      "a transformers config here; only llama files carry it, and transformers reads those")
    tokens = {key: int(g.meta(f"tokenizer.ggml.{name}_token_id"))
              for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
              if g.meta(f"tokenizer.ggml.{name}_token_id") is not None}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=int(g.tensor("blk.0.ffn_down.weight").shape[0]),
                  max_position_embeddings=cfg.max_context, tie_word_embeddings=not g.has("output.weight"), **tokens)
    if arch == "phi2":
        kw = dict(num_key_value_heads=cfg.num_kv_heads, layer_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
                  partial_rotary_factor=cfg.rope_dim / cfg.head_dim, hidden_act="gelu_new")
    elif arch == "gptneox":
        if cfg.num_kv_heads != cfg.num_heads:
            raise SourceError(f"{g.path.name}: gptneox with {cfg.num_kv_heads} KV heads for {cfg.num_heads} query "
                              "heads; GPT-NeoX has one per query head (re-convert the model)")
        kw = dict(layer_norm_eps=cfg.rms_eps, rotary_emb_base=cfg.rope_theta, rotary_pct=cfg.rope_dim / cfg.head_dim,
                  use_parallel_residual=cfg.parallel_residual, hidden_act="gelu")
    else:
        kw = dict(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
                  rope_theta=cfg.rope_theta)
        if arch in ("gemma", "gemma2"):
            kw["hidden_activation"] = "gelu_pytorch_tanh"
        if arch == "gemma2":
            kw.update(query_pre_attn_scalar=cfg.attn_scale ** -2, sliding_window=cfg.sliding_window,
                      layer_types=[f"{t}_attention" for t in cfg.layer_types],
                      attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
        if arch == "phi3":
            kw["original_max_position_embeddings"] = cfg.max_context
    config = AutoConfig.for_model(MODEL_TYPES.get(arch, arch), **common, **kw)
    if arch == "gemma2":  # softcapping: transformers' sdpa and flash paths leave it out
        config._attn_implementation = "eager"
    return config


def tensor_map(g: GgufFile, cfg: DecoderConfig) -> TensorMap:
    """Every transformers parameter of the model and the GGUF tensor it comes from; a SourceError naming the
    first tensor the file lacks."""
    arch = cfg.architecture
    names = _LAYER_NORM_MAPS[arch](g, cfg) if arch in _LAYER_NORM_MAPS else _rms_norm_map(g, cfg)
    for gguf_name, _ in names.values():
        g.tensor(gguf_name)
    return names


def _own_model(g: GgufFile, cfg: DecoderConfig, names: TensorMap) -> Any:
    """The model built from hf_config, every entry of its state dict filled from the GGUF (strict: none left
    empty, no tensor map entry left over), one tensor dequantized at a time (peak: the model plus one tensor)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = hf_config(g, cfg)
    with no_init_weights():  # every parameter is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=config._attn_implementation)
    state = model.state_dict()  # the live parameters' storage (tied ones under each name)
    missing, extra = sorted(state.keys() - names.keys()), sorted(names.keys() - state.keys())
    if missing or extra:
        raise SourceError(f"{g.path.name}: its tensors do not fill {type(model).__name__} (missing: "
                          f"{', '.join(missing) or 'none'}; left over: {', '.join(extra) or 'none'}); "
                          "the file is not a model as llama.cpp converts it")
    with torch.no_grad():
        for hf_name, (gguf_name, fix) in names.items():
            value = g.dense(gguf_name)
            value = np.ascontiguousarray(value if fix is None else fix(value), dtype=np.float32)
            if tuple(state[hf_name].shape) != value.shape:
                raise SourceError(f"{g.path.name}: tensor {gguf_name!r} is {list(value.shape)}, but its metadata makes "
                                  f"{hf_name} {list(state[hf_name].shape)}; the metadata and tensors disagree")
            state[hf_name].copy_(torch.from_numpy(value))
    return model.eval()


def _gemma_norm(v: np.ndarray) -> np.ndarray:
    return v - 1.0  # llama.cpp stores gemma's norms as 1 + w; transformers' RMSNorm adds the 1 itself


def _rows(order: np.ndarray) -> Fix:
    return lambda a: a[order]


def _rms_norm_map(g: GgufFile, cfg: DecoderConfig) -> TensorMap:
    """llama, qwen2, qwen3, phi3, gemma, gemma2: transformers' `model.layers.{i}` layout."""
    arch = cfg.architecture
    norm = _gemma_norm if arch in ("gemma", "gemma2") else None
    out: TensorMap = {"model.embed_tokens.weight": ("token_embd.weight", None),
                      "model.norm.weight": ("output_norm.weight", norm),
                      "lm_head.weight": ("output.weight" if g.has("output.weight") else "token_embd.weight", None)}
    q_fix = k_fix = None
    if arch == "llama":  # the converter's interleaved-rotary row order
        q_fix = _rows(unpermute_rows(cfg.num_heads * cfg.head_dim, cfg.num_heads))
        k_fix = _rows(unpermute_rows(cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads))
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[p + "input_layernorm.weight"] = (b + "attn_norm.weight", norm)
        if arch == "gemma2":
            out[p + "post_attention_layernorm.weight"] = (b + "post_attention_norm.weight", norm)
            out[p + "pre_feedforward_layernorm.weight"] = (b + "ffn_norm.weight", norm)
            out[p + "post_feedforward_layernorm.weight"] = (b + "post_ffw_norm.weight", norm)
        else:
            out[p + "post_attention_layernorm.weight"] = (b + "ffn_norm.weight", norm)
        out[p + "self_attn.o_proj.weight"] = (b + "attn_output.weight", None)
        out[p + "mlp.down_proj.weight"] = (b + "ffn_down.weight", None)
        if arch == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = (b + "attn_qkv.weight", None)
            out[p + "mlp.gate_up_proj.weight"] = (b + "ffn_up.weight", None)
            continue
        for proj, fix in (("q", q_fix), ("k", k_fix), ("v", None)):
            out[p + f"self_attn.{proj}_proj.weight"] = (b + f"attn_{proj}.weight", fix)
            if g.has(b + f"attn_{proj}.bias"):
                out[p + f"self_attn.{proj}_proj.bias"] = (b + f"attn_{proj}.bias", fix)
        if arch == "qwen3":
            out[p + "self_attn.q_norm.weight"] = (b + "attn_q_norm.weight", None)
            out[p + "self_attn.k_norm.weight"] = (b + "attn_k_norm.weight", None)
        out[p + "mlp.gate_proj.weight"] = (b + "ffn_gate.weight", None)
        out[p + "mlp.up_proj.weight"] = (b + "ffn_up.weight", None)
    return out


def _weight_and_bias(out: TensorMap, hf: str, gguf_name: str, fix: Fix | None = None) -> None:
    out[hf + ".weight"] = (gguf_name + ".weight", fix)
    out[hf + ".bias"] = (gguf_name + ".bias", fix)


def _phi2_map(g: GgufFile, cfg: DecoderConfig) -> TensorMap:
    """PhiForCausalLM; files converted from the old `mixer.Wqkv` checkpoints hold one attn_qkv (q|k|v rows)."""
    out: TensorMap = {"model.embed_tokens.weight": ("token_embd.weight", None)}
    _weight_and_bias(out, "model.final_layernorm", "output_norm")
    _weight_and_bias(out, "lm_head", "output")
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = {"q": slice(0, q_rows), "k": slice(q_rows, q_rows + kv_rows), "v": slice(q_rows + kv_rows, None)}
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        _weight_and_bias(out, p + "input_layernorm", b + "attn_norm")
        for proj, rows in parts.items():
            if g.has(b + "attn_qkv.weight"):
                _weight_and_bias(out, p + f"self_attn.{proj}_proj", b + "attn_qkv", lambda a, rows=rows: a[rows])
            else:
                _weight_and_bias(out, p + f"self_attn.{proj}_proj", b + f"attn_{proj}")
        _weight_and_bias(out, p + "self_attn.dense", b + "attn_output")
        _weight_and_bias(out, p + "mlp.fc1", b + "ffn_up")
        _weight_and_bias(out, p + "mlp.fc2", b + "ffn_down")
    return out


def _gptneox_map(g: GgufFile, cfg: DecoderConfig) -> TensorMap:
    """GPTNeoXForCausalLM; the converter turned query_key_value's per-head [q, k, v] rows into q|k|v: undone here."""
    heads, head_dim = cfg.num_heads, cfg.head_dim

    def per_head(a: np.ndarray) -> np.ndarray:  # rows (q|k|v, head, d) -> (head, q|k|v, d)
        return a.reshape(3, heads, head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

    out: TensorMap = {"gpt_neox.embed_in.weight": ("token_embd.weight", None),
                      "embed_out.weight": ("output.weight" if g.has("output.weight") else "token_embd.weight", None)}
    _weight_and_bias(out, "gpt_neox.final_layer_norm", "output_norm")
    for i in range(cfg.num_layers):
        p, b = f"gpt_neox.layers.{i}.", f"blk.{i}."
        _weight_and_bias(out, p + "input_layernorm", b + "attn_norm")
        _weight_and_bias(out, p + "post_attention_layernorm", b + "ffn_norm")
        _weight_and_bias(out, p + "attention.query_key_value", b + "attn_qkv", per_head)
        _weight_and_bias(out, p + "attention.dense", b + "attn_output")
        _weight_and_bias(out, p + "mlp.dense_h_to_4h", b + "ffn_up")
        _weight_and_bias(out, p + "mlp.dense_4h_to_h", b + "ffn_down")
    return out


_LAYER_NORM_MAPS = {"phi2": _phi2_map, "gptneox": _gptneox_map}
