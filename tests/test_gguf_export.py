"""export_gguf: tiny GGUF files written from tiny random HF models (as llama.cpp's converter lays them
out), and the real SmolLM2-135M-Instruct Q4_1 GGUF (slow), against transformers' dequantized model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from agent.bundle import QualityStatus  # noqa: E402
from exporter.errors import SourceError, UnsupportedArchitecture  # noqa: E402
from exporter.gguf.export import RECIPE, export_gguf  # noqa: E402
from exporter.gguf.quality import OnnxDecoder  # noqa: E402
from exporter.gguf.levels import TWO_PASS_POLICY  # noqa: E402
from tests.support.models import TINY_CONFIGS, cache_dir, cache_lock, smollm2_gguf_path, tiny_model  # noqa: E402

TWO_PASS_EVERYWHERE = dataclasses.replace(TWO_PASS_POLICY, two_pass_min_weights=0)  # the tiny models' linears too

# Tests that compare every logit with the float reference export at level 0 everywhere: the GGUF's own
# float math (the default policy computes the lm_head at level 4 and only its top logits exactly).
EXACT = 0
# Linear layers in a mix of exact types; GGUF blocks need K % 32 == 0 (tiny hidden = 64, ff = 128).
LINEAR_TYPES = {"attn_q": QT.Q4_1, "attn_k": QT.Q4_0, "attn_v": QT.Q8_0, "attn_output": QT.Q5_1,
                "attn_qkv": QT.Q4_1, "ffn_gate": QT.Q4_1, "ffn_up": QT.Q5_0, "ffn_down": QT.Q4_0}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's row order for attn_q/attn_k (interleaved rotary)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Tiny random models only these tests need, with a tokenizer of tests/support's: qwen3; phi and gpt_neox with heads
# GroupQueryAttention takes (head_dim a multiple of 16, rotary over a multiple of 16 features), LayerNorms perturbed
_GGUF_MODELS = {
    "qwen3": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
                            tie_word_embeddings=True)),
    "phi": ("phi", dict(hidden_size=320, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, partial_rotary_factor=0.4, vocab_size=512, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  rotary_pct=0.5, vocab_size=512, max_position_embeddings=256, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)),
}
GGUF_ARCH = {"phi": "phi2", "gpt_neox": "gptneox"}  # llama.cpp's names where they differ from model_type


def _tiny_gguf_source(arch: str) -> Path:
    if arch not in _GGUF_MODELS:
        return tiny_model(arch)
    out = cache_dir() / f"tiny-{arch}-gguf-test"
    with cache_lock(out):
        if not (out / "config.json").exists():
            _build_tiny_gguf_source(out, arch)
    return out


def _build_tiny_gguf_source(out: Path, arch: str) -> None:
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_of, cfg = _GGUF_MODELS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **cfg))
    if arch != "qwen3":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in tiny_model(tokenizer_of).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)


def _llama3_rope_factors(scaling: dict, dim: int, base: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs.weight for llama3 scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# llama.cpp has no key for gemma2's query_pre_attn_scalar (it is head_dim but for the 27B); softcaps small
# enough that tanh bends the tiny model's scores and logits; eager: HF's sdpa ignores the softcap
GGUF_OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=16, attn_logit_softcapping=0.01, final_logit_softcapping=1.5,
                                 attn_implementation="eager")}


def write_tiny_gguf(arch: str, out: Path, *, embed_type: QT = QT.Q8_0, head_type: QT = QT.Q8_0,
                    linear_types: dict[str, QT] | None = None, rope_scaling: dict | None = None,
                    leave_out: tuple[str, ...] = ()) -> tuple[Path, object]:
    """A GGUF of tiny_model(arch), written the way llama.cpp's converter writes that architecture (but for the
    tensors named in `leave_out`), and the HF model holding exactly the GGUF's (dequantized) weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny_gguf_source(arch)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **GGUF_OVERRIDES.get(arch, {}))
    if rope_scaling is not None:  # same weights, llama3-scaled rotary (Llama-3.x)
        from transformers import AutoConfig

        scaled = AutoConfig.from_pretrained(src, rope_scaling=rope_scaling)
        state = model.state_dict()
        model = AutoModelForCausalLM.from_config(scaled, dtype=torch.float32)
        model.load_state_dict(state)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    path = out / f"tiny-{arch}.gguf"
    w = gguf.GGUFWriter(path, GGUF_ARCH.get(arch, arch))
    w.add_name(f"tiny {arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "gpt_neox":
        w.add_parallel_residual(cfg.use_parallel_residual)
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
    if arch in GGUF_ARCH:
        w.add_layer_norm_eps(cfg.layer_norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", 10000.0))
    w.add_rope_dimension_count(int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0)))
    if getattr(cfg, "head_dim", None):  # llama.cpp's converter writes it whenever the config has one
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    # tokenizer: byte-level BPE, as llama.cpp writes a "gpt2" tokenizer
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"]: t["content"] for t in tj["added_tokens"]}
    tokens = [specials.get(i, t) for i, (t, _) in enumerate(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    exact: dict[str, np.ndarray] = {}

    def quantized(name: str, hf_name: str, qtype: QT, permute_heads: int | None = None,
                  rows: np.ndarray | None = None) -> None:
        blocks = quantize(sd[hf_name], qtype)  # rows are whole blocks, so permuting rows commutes with this
        exact[hf_name] = dequantize(blocks, qtype)
        if permute_heads is not None:
            blocks = _llama_permute(blocks, permute_heads)
        if name not in leave_out:
            w.add_tensor(name, blocks if rows is None else blocks[rows], raw_dtype=qtype)

    def linear(name: str, kind: str, hf_name: str, permute_heads: int | None = None,
               rows: np.ndarray | None = None) -> None:
        quantized(name, hf_name, (linear_types or LINEAR_TYPES)[kind], permute_heads, rows)

    def f32(name: str, value: np.ndarray) -> None:
        if name not in leave_out:
            w.add_tensor(name, value.astype(np.float32))

    if rope_scaling is not None:
        f32("rope_freqs.weight", _llama3_rope_factors(rope_scaling, head_dim, getattr(cfg, "rope_theta", 10000.0)))
    if arch in GGUF_ARCH:
        _layer_norm_tensors(arch, cfg, sd, quantized, linear, f32, embed_type, head_type)
    else:
        _rms_norm_tensors(arch, cfg, sd, quantized, linear, f32, embed_type, head_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    state = model.state_dict()
    with torch.no_grad():
        for name, value in exact.items():
            state[name].copy_(torch.from_numpy(value))
    return path, model.eval()


def _layer_norm_tensors(arch, cfg, sd, quantized, linear, f32, embed_type, head_type) -> None:
    """phi2 and gptneox as llama.cpp's converter writes them: biases kept, gptneox's qkv rows as q|k|v."""
    def norm(name: str, hf: str) -> None:
        f32(name + ".weight", sd[hf + ".weight"])
        f32(name + ".bias", sd[hf + ".bias"])

    def biased(name: str, kind: str, hf: str, rows: np.ndarray | None = None) -> None:
        linear(name + ".weight", kind, hf + ".weight", rows=rows)
        f32(name + ".bias", sd[hf + ".bias"] if rows is None else sd[hf + ".bias"][rows])

    neox = arch == "gpt_neox"
    embed, final, head = (("gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out") if neox
                          else ("model.embed_tokens", "model.final_layernorm", "lm_head"))
    quantized("token_embd.weight", embed + ".weight", embed_type)
    norm("output_norm", final)
    quantized("output.weight", head + ".weight", head_type)
    if head + ".bias" in sd:
        f32("output.bias", sd[head + ".bias"])
    for i in range(cfg.num_hidden_layers):
        g = f"blk.{i}."
        if neox:
            p = f"gpt_neox.layers.{i}."
            norm(g + "attn_norm", p + "input_layernorm")
            norm(g + "ffn_norm", p + "post_attention_layernorm")
            heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            order = np.arange(3 * heads * hd).reshape(heads, 3, hd).transpose(1, 0, 2).reshape(-1)
            biased(g + "attn_qkv", "attn_qkv", p + "attention.query_key_value", rows=order)  # [head, q|k|v] -> q|k|v
            biased(g + "attn_output", "attn_output", p + "attention.dense")
            biased(g + "ffn_up", "ffn_up", p + "mlp.dense_h_to_4h")
            biased(g + "ffn_down", "ffn_down", p + "mlp.dense_4h_to_h")
        else:
            p = f"model.layers.{i}."
            norm(g + "attn_norm", p + "input_layernorm")
            for proj in ("q", "k", "v"):
                biased(g + f"attn_{proj}", f"attn_{proj}", p + f"self_attn.{proj}_proj")
            biased(g + "attn_output", "attn_output", p + "self_attn.dense")
            biased(g + "ffn_up", "ffn_up", p + "mlp.fc1")
            biased(g + "ffn_down", "ffn_down", p + "mlp.fc2")


def _rms_norm_tensors(arch, cfg, sd, quantized, linear, f32, embed_type, head_type) -> None:
    norm_shift = 1.0 if arch.startswith("gemma") else 0.0  # llama.cpp stores gemma's norms as 1 + w
    quantized("token_embd.weight", "model.embed_tokens.weight", embed_type)
    f32("output_norm.weight", sd["model.norm.weight"] + norm_shift)
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        quantized("output.weight", "lm_head.weight", head_type)
    for i in range(cfg.num_hidden_layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        f32(g + "attn_norm.weight", sd[p + "input_layernorm.weight"] + norm_shift)
        if arch == "gemma2":  # pre- and post-norms around both blocks
            f32(g + "post_attention_norm.weight", sd[p + "post_attention_layernorm.weight"] + norm_shift)
            f32(g + "ffn_norm.weight", sd[p + "pre_feedforward_layernorm.weight"] + norm_shift)
            f32(g + "post_ffw_norm.weight", sd[p + "post_feedforward_layernorm.weight"] + norm_shift)
        else:
            f32(g + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"] + norm_shift)
        linear(g + "attn_output.weight", "attn_output", p + "self_attn.o_proj.weight")
        linear(g + "ffn_down.weight", "ffn_down", p + "mlp.down_proj.weight")
        if arch == "phi3":
            linear(g + "attn_qkv.weight", "attn_qkv", p + "self_attn.qkv_proj.weight")
            linear(g + "ffn_up.weight", "ffn_gate", p + "mlp.gate_up_proj.weight")
            continue
        permute = arch == "llama"
        linear(g + "attn_q.weight", "attn_q", p + "self_attn.q_proj.weight", cfg.num_attention_heads if permute else None)
        linear(g + "attn_k.weight", "attn_k", p + "self_attn.k_proj.weight", cfg.num_key_value_heads if permute else None)
        linear(g + "attn_v.weight", "attn_v", p + "self_attn.v_proj.weight")
        for proj in ("q", "k", "v"):
            if p + f"self_attn.{proj}_proj.bias" in sd:
                f32(g + f"attn_{proj}.bias", sd[p + f"self_attn.{proj}_proj.bias"])
        for proj in ("q", "k"):
            if p + f"self_attn.{proj}_norm.weight" in sd:
                f32(g + f"attn_{proj}_norm.weight", sd[p + f"self_attn.{proj}_norm.weight"])
        linear(g + "ffn_gate.weight", "ffn_gate", p + "mlp.gate_proj.weight")
        linear(g + "ffn_up.weight", "ffn_up", p + "mlp.up_proj.weight")


def reference_logits(gguf_path: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-llama")
    path, _ = write_tiny_gguf("llama", d)
    return path, export_gguf(path, d / "out", accuracy_level=EXACT)


def _onnx_logits(result, ids: np.ndarray) -> np.ndarray:
    dec = OnnxDecoder(result.onnx_path, threads=1)
    return dec.run(ids, dec.empty_past())[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers_gguf_loader(arch, tmp_path, tiny_llama):
    """Against transformers' own reading of the same GGUF (it un-permutes llama's q/k itself)."""
    path, result = tiny_llama if arch == "llama" else (None, None)
    if result is None:
        path, _ = write_tiny_gguf(arch, tmp_path)
        result = export_gguf(path, tmp_path / "out", accuracy_level=EXACT)
    ids = np.random.default_rng(0).integers(3, 512, size=(1, 12))
    np.testing.assert_allclose(_onnx_logits(result, ids), reference_logits(path, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, embed_type", [("phi3", QT.Q8_0), ("gemma", QT.Q4_1), ("qwen3", QT.Q8_0),
                                              ("gemma2", QT.Q8_0), ("phi", QT.Q8_0), ("gpt_neox", QT.Q4_0)])
def test_tiny_gguf_matches_hf_model_with_gguf_weights(arch, embed_type, tmp_path):
    """phi3 (fused qkv / gate_up), gemma (scaled embeddings, GELU, 1 + w norms; a Q4_1 table, which
    GatherBlockQuantized cannot read, gathered as codes + scales + mins), qwen3 (q/k head norms) and gemma2
    (post-norms, softcaps, a sliding window shorter than the 40 tokens), phi2 and gptneox (LayerNorms and
    biases, ungated MLP, partial rotary, parallel residual) against the HF model carrying exactly the GGUF's weights (transformers 4.57 cannot load gemma GGUFs, nor qwen3 ones whose head_dim is not 128)."""
    path, model = write_tiny_gguf(arch, tmp_path, embed_type=embed_type)
    result = export_gguf(path, tmp_path / "out", accuracy_level=EXACT)
    ids = np.random.default_rng(0).integers(3, 512, size=(1, 40 if arch == "gemma2" else 12))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_onnx_logits(result, ids), ref, atol=1e-4, rtol=1e-4)
    assert result.model_spec.architecture == GGUF_ARCH.get(arch, arch)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama-3.x: llama.cpp stores the llama3 rope scaling as rope_freqs.weight; positions past the
    original context must rotate as HF's llama3 rotary does."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    path, model = write_tiny_gguf("llama", tmp_path, rope_scaling=scaling)
    result = export_gguf(path, tmp_path / "out", accuracy_level=EXACT)
    ids = np.random.default_rng(7).integers(3, 512, size=(1, 80))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_onnx_logits(result, ids), ref, atol=1e-4, rtol=1e-4)


def test_same_type_projections_are_fused(tmp_path):
    """q/k/v (and gate/up) of one type become one MatMulNBits each; qwen2's biases stack with them."""
    path, model = write_tiny_gguf("qwen2", tmp_path, embed_type=QT.Q4_0,
                                  linear_types={kind: QT.Q4_1 for kind in LINEAR_TYPES})
    result = export_gguf(path, tmp_path / "out", accuracy_level=EXACT)
    ops = [n.op_type for n in onnx.load(result.onnx_path, load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 4 * TINY_CONFIGS["qwen2"]["num_hidden_layers"] + 1
    assert ops.count("GatherBlockQuantized") == 1  # Q4_0 table: 4-bit, default zero point
    ids = np.random.default_rng(5).integers(3, 512, size=(1, 9))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_onnx_logits(result, ids), ref, atol=1e-4, rtol=1e-4)


def test_structure_io_and_spec(tiny_llama):
    path, result = tiny_llama
    model = onnx.load(result.onnx_path, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    cfg = TINY_CONFIGS["llama"]
    layers = cfg["num_hidden_layers"]
    # q k gate down: one 4-bit MatMulNBits each; v o up and lm_head are 8-bit: two 4-bit halves at level 0
    assert ops.count("MatMulNBits") == 10 * layers + 2
    assert ops.count("GatherBlockQuantized") == 1  # Q8_0 embedding stays quantized
    # blocksum(x) once per input that feeds a weight with offsets (q/k/v, o, gate/up; lm_head)
    assert ops.count("ReduceSum") == 3 * layers + 1 + 1  # + the sequence length GroupQueryAttention reads
    assert not any(i.data_type == onnx.TensorProto.FLOAT and "zero_points" in i.name for i in model.graph.initializer)
    assert "MatMul" in ops  # the small blocksum @ offsets^T matmuls
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    assert names_in[:2] == ["input_ids", "attention_mask"]  # GroupQueryAttention takes positions from the mask
    assert names_in[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert names_in[-1] == "logits_to_keep"  # 1: the lm_head for the last position only (the agent)
    assert ops.count("GroupQueryAttention") == layers
    assert result.model_spec.config["past_present_share_buffer"] is True
    assert names_out[:3] == ["logits", "present.0.key", "present.0.value"]
    assert names_in == result.model_spec.inputs and names_out == result.model_spec.outputs
    spec = result.model_spec.config
    assert spec["num_layers"] == layers and spec["num_kv_heads"] == cfg["num_key_value_heads"]
    assert spec["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert spec["max_context"] == cfg["max_position_embeddings"] and spec["eos_token_ids"] == [2]
    assert result.model_spec.architecture == "llama"
    q = result.quantization
    assert q.recipe == RECIPE
    assert set(q.details["exact_types"]) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    assert q.details["float_types"] == ["F32"]
    assert any(line.startswith("Q4_1: 4 tensors, exact") for line in result.summary())
    names = {f.name for f in result.files}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "tokenizer.model" not in names  # transformers would copy the whole GGUF under that name
    assert all(f.parent == result.onnx_path.parent and f.exists() for f in result.files)


def test_default_policy_levels_recorded_and_top_logits_exact(tiny_llama, tmp_path):
    """The default accuracy policy: every decoder linear at level 0, the lm_head at level 4 with each position's
    top logits recomputed in float; the manifest says which class got which level and why."""
    path, exact = tiny_llama
    result = export_gguf(path, tmp_path / "out")
    model = onnx.load(result.onnx_path, load_external_data=False)
    levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert levels.pop("/lm_head/MatMulNBits") == 4  # one 8-bit node, not two exact 4-bit halves
    assert levels and set(levels.values()) == {0}
    assert {"TopK", "ScatterElements"} <= {n.op_type for n in model.graph.node}
    details = result.quantization.details
    assert details["accuracy_level"] == "per-weight"
    policy = details["accuracy_levels"]
    assert policy["levels"] == {"attn_qkv": 0, "attn_out": 0, "mlp_in": 0, "mlp_out": 0, "lm_head": 4}
    assert policy["lm_head_exact_top_k"] == 16 and all(policy["reasons"].values())
    assert exact.quantization.details["accuracy_level"] == 0  # the override: one level for all

    ids = np.random.default_rng(6).integers(3, 512, size=(1, 12))
    want, got = _onnx_logits(exact, ids), _onnx_logits(result, ids)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    top = np.argsort(want, axis=-1)[..., -8:]
    np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(want, top, -1), atol=1e-4, rtol=1e-4)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_two_pass_decodes_on_int8_and_prefills_at_level_0(tiny_llama, tmp_path):
    """TWO_PASS_POLICY (opt-in; for linears of >= 4M weights by default, here all): each 4-bit decoder linear is an If whose
    one-row branch runs level 4 on hi + lo and whose prompt branch is the level-0 node, both on one set of
    initializers; prompts give the default policy's logits bit for bit, decode steps stay within float noise."""
    path, _ = tiny_llama
    default = export_gguf(path, tmp_path / "default")
    two = export_gguf(path, tmp_path / "two", accuracy_level=TWO_PASS_EVERYWHERE)
    assert (two.onnx_path.parent / "model.onnx.data").stat().st_size == (default.onnx_path.parent / "model.onnx.data").stat().st_size
    model = onnx.load(two.onnx_path, load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert ifs and all(n.name.endswith("/TwoPassIf") for n in ifs)
    for node in ifs:
        branches = {a.name: [(m.op_type, next((x.i for x in m.attribute if x.name == "accuracy_level"), None))
                             for m in a.g.node] for a in node.attribute}
        assert ("MatMulNBits", 4) in branches["then_branch"] and branches["else_branch"] == [("MatMulNBits", 0)]
    assert two.quantization.details["accuracy_levels"]["policy"] == "two-pass-decode"
    assert two.quantization.details["accuracy_levels"]["two_pass_min_weights"] == 0  # the manifest says which took it

    ids = np.random.default_rng(9).integers(3, 512, size=(1, 12))
    np.testing.assert_array_equal(_onnx_logits(two, ids), _onnx_logits(default, ids))
    steps = {}
    for name, result in (("default", default), ("two", two)):
        dec = OnnxDecoder(result.onnx_path, threads=1)
        logits, past = dec.run(ids[:, :4], dec.empty_past())
        steps[name] = []
        for t in range(4, 12):  # one-row steps through the KV cache
            logits, past = dec.run(ids[:, t:t + 1], past)
            steps[name].append(logits[0, -1])
    got, want = np.array(steps["two"]), np.array(steps["default"])
    assert not np.array_equal(got, want)  # the int8 branch ran
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()


def test_agent_serves_a_two_pass_bundle_token_for_token(tiny_llama, tmp_path, keypair):
    """The agent's runtime (IO binding, one shared KV buffer, logits_to_keep = 1) on a graph of If nodes
    generates what the plain decoder does with the same graph."""
    from agent.bundle import TrustedKeys, open_bundle
    from agent.runtime import load_model
    from agent.runtime.generation import TextGenerationModel
    from tests.support.lm_bundle import seal_lm_bundle

    path, _ = tiny_llama
    two = export_gguf(path, tmp_path / "two", accuracy_level=TWO_PASS_EVERYWHERE)
    assert any(n.op_type == "If" for n in onnx.load(two.onnx_path, load_external_data=False).graph.node)
    seal_lm_bundle(two.onnx_path.parent, tmp_path / "bundle", keypair[0], config=two.model_spec.config)
    model = load_model(open_bundle(tmp_path / "bundle", TrustedKeys.from_paths([keypair[1]])), threads=1)
    assert isinstance(model, TextGenerationModel)
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 512, size=9)]
    gen = model.generate(prompt, max_tokens=12, ignore_eos=True)
    got = [chunk.token_id for chunk in gen if chunk.token_id is not None]
    want = OnnxDecoder(two.onnx_path, threads=1).greedy(prompt, 12, set())
    assert got == want and len(got) == 12
    model.close()


def test_kv_cache_decode_equals_prefill(tiny_llama):
    _, result = tiny_llama
    dec = OnnxDecoder(result.onnx_path, threads=1)
    ids = np.random.default_rng(1).integers(3, 512, size=(1, 10))
    full, _ = dec.run(ids, dec.empty_past())
    logits, past = dec.run(ids[:, :6], dec.empty_past())
    steps = [logits]
    for t in range(6, 10):
        logits, past = dec.run(ids[:, t:t + 1], past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)
    assert past[0].shape == (1, 2, 10, 16)


def test_plain_attention_graph_equals_gqa(tiny_llama, tmp_path):
    """attention="plain" (standard ONNX ops, position_ids input) computes what GroupQueryAttention does."""
    path, gqa = tiny_llama
    plain = export_gguf(path, tmp_path / "plain", attention="plain", accuracy_level=EXACT)
    assert "position_ids" in plain.model_spec.inputs and "past_present_share_buffer" not in plain.model_spec.config
    ids = np.random.default_rng(4).integers(3, 512, size=(1, 9))
    outs = []
    for result in (gqa, plain):
        dec = OnnxDecoder(result.onnx_path, threads=1)
        logits, past = dec.run(ids[:, :7], dec.empty_past())
        step, _ = dec.run(ids[:, 7:9], past)  # a two-token chunk after a cached prefix
        outs.append(np.concatenate([logits, step], axis=1))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_left_padding_is_masked(tiny_llama, tmp_path):
    """A left-padded row of a batch gives the same logits as the row alone (plain attention: GroupQueryAttention
    takes right-padded batches only; the agent runs one sequence at a time)."""
    path, _ = tiny_llama
    result = export_gguf(path, tmp_path / "plain", attention="plain", accuracy_level=EXACT)
    dec = OnnxDecoder(result.onnx_path, threads=1)
    ids = np.random.default_rng(2).integers(3, 512, size=(1, 5))
    alone, _ = dec.run(ids, dec.empty_past())
    batch = np.concatenate([np.concatenate([[[0, 0, 0]], ids], 1),
                            np.random.default_rng(3).integers(3, 512, size=(1, 8))])
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    pos = np.array([[0, 0, 0, 0, 1, 2, 3, 4], list(range(8))])
    feed = {"input_ids": batch, "attention_mask": mask, "position_ids": pos, "logits_to_keep": np.zeros(1, np.int64)}
    for i in range(dec.num_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, 16), np.float32)
    logits = dec.session.run(["logits"], feed)[0]
    np.testing.assert_allclose(logits[0, 3:], alone[0], atol=1e-4, rtol=1e-4)


def _one_tensor_gguf(path: Path, arch: str) -> None:
    """A GGUF of architecture `arch` holding one block count and one embedding table: nothing more."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_named(tmp_path):
    _one_tensor_gguf(tmp_path / "m.gguf", "mamba")
    with pytest.raises(UnsupportedArchitecture, match="'mamba'.*supported: llama, qwen2"):
        export_gguf(tmp_path / "m.gguf", tmp_path / "out")


def test_bad_files_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        export_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SourceError, match="not a readable GGUF"):
        export_gguf(tmp_path / "junk.gguf", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("two_pass_everywhere", [False, True], ids=["default", "two-pass-everywhere"])
def test_smollm2_q4_1_keeps_its_quality(tmp_path, two_pass_everywhere):
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: ppl within ±0.5%, top-1 >= 98%, same greedy chat answer; and with
    the opt-in two-pass int8 decode forced on every linear (its own are under the size limit), the greedy answer
    (one-row decode steps on the int8 kernel) must still be the reference's."""
    from exporter.gguf.quality import gguf_quality

    policy = TWO_PASS_EVERYWHERE if two_pass_everywhere else None
    path = smollm2_gguf_path()
    result = export_gguf(path, tmp_path / "out", accuracy_level=policy)
    assert result.quantization.details["exact_types"] == ["Q4_1", "Q8_0"]
    report = gguf_quality(path, result.onnx_path, tmp_path / "out",
                          eos_token_ids=result.model_spec.config["eos_token_ids"], threads=2)
    m = report.metrics
    assert abs(m["ppl_delta"]) <= 0.005, report.failures
    assert m["top1_agreement"] >= 0.98, report.failures
    assert m["greedy_match"] == 1.0, report.details
    assert report.status == QualityStatus.PASSED
    assert "Paris" in report.details["greedy_onnx"]


def test_export_api_keeps_gguf_blocks_and_seals_a_gated_bundle(tmp_path, keypair):
    """`exporter.export(file.gguf)` takes the exact path by default: same gate, a verified LM bundle."""
    from agent.bundle import QualityStatus, TrustedKeys, open_bundle
    from exporter import export

    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("llama", tmp_path / "src")
    res = export(path, out=tmp_path / "bundle", key=keypair[0], benchmark=False)
    vb = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]]))
    m = vb.manifest
    assert m.quantization.recipe == "gguf-exact"
    assert m.quality.status is QualityStatus.PASSED and "dequantized GGUF" in m.quality.reference
    assert m.quality.metrics["top1_agreement"] >= 0.98
    assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= set(m.model.inputs)
    assert m.golden is not None and (res.bundle / m.golden.inputs).exists()


def test_export_api_takes_the_two_pass_level_for_a_gguf(tmp_path, keypair):
    """accuracy_level="4x2" (the CLI's --accuracy-level 4x2) exports with TWO_PASS_POLICY: decoder linears at the
    two-pass level (this tiny model's are under the size limit: plain level 0), the lm_head still refined."""
    from agent.bundle import TrustedKeys, open_bundle
    from exporter import export

    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("llama", tmp_path / "src")
    res = export(path, out=tmp_path / "bundle", key=keypair[0], benchmark=False, accuracy_level="4x2")
    details = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest.quantization.details
    assert details["accuracy_levels"]["policy"] == "two-pass-decode"
    assert details["accuracy_levels"]["levels"]["mlp_in"] == "4x2" and details["accuracy_levels"]["lm_head_exact_top_k"] == 16
    assert details["accuracy_levels"]["two_pass_min_weights"] == TWO_PASS_POLICY.two_pass_min_weights == 1 << 22


# transformers 4.57 has no GGUF loader for phi2, gptneox and gemma, reads gemma2's with query_pre_attn_scalar 256
# (llama.cpp does not store it) and qwen3's with head_dim 128 (the tiny one has 16): their float reference is
# exporter/gguf/reference.py's model of the file
OWN_REFERENCE = ["phi", "gpt_neox", "gemma2", "gemma", "qwen3"]
FLOAT_LINEARS = dict.fromkeys(LINEAR_TYPES, QT.F32)


@pytest.mark.parametrize("arch", OWN_REFERENCE)
def test_reference_of_a_float_gguf_is_the_original_checkpoint(arch, tmp_path):
    """reference.py's model of a GGUF written from float32 tensors computes the original checkpoint's logits: the
    config from the metadata, llama.cpp's names mapped back, gptneox's qkv rows per head again, gemma2's 1 + w undone."""
    from transformers import AutoModelForCausalLM

    from exporter.gguf.reference import load_config, load_model

    path, _ = write_tiny_gguf(arch, tmp_path, embed_type=QT.F32, head_type=QT.F32, linear_types=FLOAT_LINEARS)
    original = AutoModelForCausalLM.from_pretrained(_tiny_gguf_source(arch), dtype=torch.float32,
                                                    **GGUF_OVERRIDES.get(arch, {})).eval()
    ref = load_model(path)
    assert type(ref) is type(original) and load_config(path).model_type == arch
    ids = torch.from_numpy(np.random.default_rng(3).integers(3, 512, size=(1, 40)))
    with torch.no_grad():
        want, got = original(ids).logits.numpy(), ref(ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_own_reference_equals_transformers_gguf_loader(arch, tmp_path):
    """Where transformers reads the file, reference.py's own build of it (llama: q/k rows un-permuted) is the same model."""
    from exporter.gguf.reference import load_model, own_model

    path, _ = write_tiny_gguf(arch, tmp_path)
    ours, theirs = own_model(path), load_model(path)
    assert type(ours) is type(theirs)
    ids = torch.from_numpy(np.random.default_rng(4).integers(3, 512, size=(1, 24)))
    with torch.no_grad():
        np.testing.assert_array_equal(ours(ids).logits.numpy(), theirs(ids).logits.numpy())


@pytest.mark.parametrize("arch", OWN_REFERENCE)
def test_export_api_of_a_gguf_transformers_cannot_read(arch, tmp_path, keypair):
    """`exporter.export(file.gguf)` of phi2 / gptneox / gemma2 / gemma / qwen3 (quantized blocks): the gate's reference is reference.py's
    model, which holds exactly the GGUF's dequantized weights; at level 0 the ONNX logits are that model's within float
    noise, and the gate passes."""
    from agent.bundle import TrustedKeys, open_bundle
    from exporter import export
    from exporter.gguf.reference import load_model

    (tmp_path / "src").mkdir()
    path, model = write_tiny_gguf(arch, tmp_path / "src")
    ids = torch.from_numpy(np.random.default_rng(8).integers(3, 512, size=(1, 40)))
    with torch.no_grad():
        np.testing.assert_allclose(load_model(path)(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5, rtol=0)
    res = export(path, out=tmp_path / "bundle", key=keypair[0], benchmark=False, accuracy_level=EXACT)
    m = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest
    assert m.quantization.recipe == "gguf-exact" and m.model.architecture == GGUF_ARCH.get(arch, arch)
    assert m.quality.status is QualityStatus.PASSED and "dequantized GGUF" in m.quality.reference
    assert m.quality.metrics["logits_abs_diff"] <= 1e-4, m.quality.metrics
    assert m.quality.metrics["top1_agreement"] == 1.0


def test_requantize_of_a_gguf_transformers_cannot_read(tmp_path, keypair):
    """--requantize of a gptneox GGUF: reference.py's float model (and the metadata tokenizer) feed the optimum path,
    whose int8 bundle passes the gate against that model."""
    from agent.bundle import TrustedKeys, open_bundle
    from exporter import export

    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("gpt_neox", tmp_path / "src")
    res = export(path, out=tmp_path / "bundle", key=keypair[0], benchmark=False, requantize=True, quant="int8")
    m = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest
    assert m.quantization.recipe != "gguf-exact" and m.quantization.precision == "int8"
    assert m.quality.status is QualityStatus.PASSED and "dequantized GGUF" in m.quality.reference


def test_gguf_with_a_missing_tensor_is_one_line(tmp_path, keypair):
    """A GGUF lacking a tensor its architecture needs: one line naming it, from the library and from the CLI."""
    from exporter import export
    from tests.test_exporter_cli import run

    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("gpt_neox", tmp_path / "src", leave_out=("blk.1.ffn_up.bias",))
    with pytest.raises(SourceError, match=r"tensor 'blk.1.ffn_up.bias' is missing") as info:
        export(path, out=tmp_path / "bundle", key=keypair[0], benchmark=False)
    assert "\n" not in str(info.value)
    with pytest.raises(SourceError, match=r"tensor 'blk.1.ffn_up.bias' is missing"):
        export_gguf(path, tmp_path / "out")
    p = run(str(path), "--out", str(tmp_path / "b"), "--key", str(keypair[0]))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [f"error: {info.value}"]
    assert not (tmp_path / "b").exists()


def test_export_api_of_an_unknown_gguf_architecture_is_one_line(tmp_path, keypair):
    from exporter import export

    _one_tensor_gguf(tmp_path / "m.gguf", "rwkv6")  # neither arch.py nor transformers reads it
    with pytest.raises(UnsupportedArchitecture, match="'rwkv6'.*supported: llama, qwen2") as info:
        export(tmp_path / "m.gguf", out=tmp_path / "bundle", key=keypair[0], benchmark=False)
    assert "\n" not in str(info.value)
