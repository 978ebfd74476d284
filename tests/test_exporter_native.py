"""exporter/native.py: Hugging Face weights -> edgeship's GroupQueryAttention graph, checked against PyTorch
for every architecture it claims (tiny random models of the real configs), and served by the agent."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.models import tiny_model  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256)
# beyond tests/support's tiny models: what only the native builder exports, and rope/attention variants
CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama3-rope": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "phi3": dict(model_type="phi3", original_max_position_embeddings=256, pad_token_id=0),
    "phi3-partial-rotary": dict(model_type="phi3", original_max_position_embeddings=256, pad_token_id=0,
                                hidden_size=128, num_attention_heads=4, partial_rotary_factor=0.5),
    "gemma": dict(model_type="gemma", head_dim=16),
    # softcaps small enough that tanh bends the scores and logits; windows shorter than the test's 40 tokens
    "gemma2": dict(model_type="gemma2", head_dim=16, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=0.01, final_logit_softcapping=1.5),
    # Phi-2's shape: multi-head, rotary over 40 % of each head; Pythia's (a quarter) and Polyglot-Ko's (half)
    "phi": dict(model_type="phi", hidden_size=320, num_key_value_heads=4, partial_rotary_factor=0.4),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=256, num_key_value_heads=4, rotary_pct=0.25),
    "gpt_neox-sequential": dict(model_type="gpt_neox", hidden_size=128, num_key_value_heads=4, rotary_pct=0.5,
                                use_parallel_residual=False),
    "exaone4": dict(model_type="exaone4", head_dim=16),
    "exaone4-hybrid": dict(model_type="exaone4", head_dim=16, num_hidden_layers=4, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"] * 2),
}


def random_model(name: str, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**BASE, **CONFIGS[name], **overrides}
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms initialise to 1 (or 0 for gemma): perturb them so their use is tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_native_graph_equals_pytorch_in_prefill_decode_and_chunks(name, tmp_path):
    """Prefill, single-token decode and a multi-token chunk after a cached prefix all equal one full
    PyTorch forward (positions, rotary scaling, sliding windows and NoPE layers included)."""
    import onnx
    import torch

    from exporter.lm import OrtDecoder
    from exporter.pipelines.native_lm import export_native

    model = random_model(name)
    ids = np.random.default_rng(0).integers(0, 512, (1, 40))
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids)).logits[0].numpy()
    path = export_native(model, tmp_path)
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers
    dec = OrtDecoder(path)
    assert "position_ids" not in dec.input_names
    logits, past = dec.run(ids[:, :30], dec.empty_past())
    got = [logits[0]]
    for t in range(30, 35):
        logits, past = dec.run(ids[:, t:t + 1], past)
        got.append(logits[0])
    logits, past = dec.run(ids[:, 35:], past)
    got.append(logits[0])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_scanned_head_gives_the_8bit_heads_top_logits_from_4bit_reads(name, tmp_path):
    """head_top_k: each position's top k logits are the 8-bit blocks' in float32 (the tied table's own
    blocks when tied), the others come from the 4-bit scan -- so the argmax is the 8-bit head's."""
    import onnx
    import torch

    from exporter.graph.decoder import ScannedHead
    from exporter.lm import OrtDecoder
    from exporter.pipelines.native_lm import blocks_q4, blocks_q8, decoder_from_hf, export_native

    model = random_model(name, vocab_size=2048)
    with torch.no_grad():  # the graph's embedding is 8-bit blocks: give PyTorch the same table
        table = model.model.embed_tokens.weight
        table.copy_(torch.from_numpy(blocks_q8(table.numpy()).dequantize()))
    k = 8
    ids = np.random.default_rng(1).integers(0, 2048, (1, 24))
    with torch.inference_mode():
        hidden = model.model(torch.from_numpy(ids)).last_hidden_state[0].numpy()
    head = model.lm_head.weight.detach().numpy()
    _, weights = decoder_from_hf(model, embedding_bits=8, head_top_k=k)
    assert isinstance(weights.lm_head, ScannedHead) and weights.lm_head.scan.bits == 4
    assert (weights.lm_head.rows is weights.embedding) is (name == "qwen2-tied")  # tied: one stored table
    eight, four = hidden @ blocks_q8(head).dequantize().T, hidden @ blocks_q4(head).dequantize().T

    path = export_native(model, tmp_path, embedding_bits=8, head_top_k=k)
    g = onnx.load(str(path), load_external_data=False).graph
    bits = sorted({a.i for n in g.node if n.name.startswith("/lm_head/") and n.op_type == "MatMulNBits"
                   for a in n.attribute if a.name == "bits"})
    assert bits == [4]  # the only full pass over the vocabulary reads 4-bit blocks
    dec = OrtDecoder(path)
    logits = dec.run(ids, dec.empty_past())[0][0]
    order = np.argsort(-four, axis=-1)  # what the graph's TopK picks, but for level-4 rounding at the k-th place
    for pos in range(len(ids[0])):
        top = order[pos, :k - 2]
        np.testing.assert_allclose(logits[pos, top], eight[pos, top], atol=1e-4, rtol=1e-4)
        rest = order[pos, k + 2:]
        np.testing.assert_allclose(logits[pos, rest], four[pos, rest], atol=0.05 * np.abs(four).max())
    assert (logits.argmax(-1) == eight.argmax(-1)).mean() == 1.0
    with pytest.raises(ValueError, match="same"):
        ScannedHead(scan=blocks_q4(head[:, :32]), rows=blocks_q8(head))


def test_logits_to_keep_0_gives_every_position_and_1_the_last(tmp_path):
    """logits_to_keep: 0 (the quality gate's perplexity) gives [b, s, vocab]; 1 (what the agent feeds) gives the
    last position's logits, the same numbers; the agent and the exporter's decoders feed it."""
    import onnxruntime as ort

    from exporter.graph.decoder import io_names
    from exporter.lm import OrtDecoder
    from exporter.pipelines.native_lm import export_native

    path = export_native(random_model("qwen2-tied"), tmp_path, embedding_bits=8)
    dec = OrtDecoder(path)
    assert sorted(dec.input_names) == sorted(io_names(2)[0])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(2).integers(0, 512, (1, 12))
    feed = dec.feed(ids, dec.empty_past())
    assert feed["logits_to_keep"].tolist() == [0]
    full = session.run(["logits"], feed)[0]
    assert full.shape == (1, 12, 512)
    for keep in (1, 3):
        part = session.run(["logits"], {**feed, "logits_to_keep": np.array([keep], np.int64)})[0]
        assert part.shape == (1, keep, 512)
        np.testing.assert_allclose(part, full[:, -keep:], rtol=1e-5, atol=1e-5)
    assert dec.run(ids, dec.empty_past(), keep=1)[0].shape == (1, 1, 512)


def test_shared_kv_buffer_runs_in_place(tmp_path):
    """past and present bound to the same max_context buffer (how the agent runs it) give the same logits."""
    import onnxruntime as ort
    import torch

    from exporter.pipelines.native_lm import export_native

    model = random_model("llama")
    ids = np.random.default_rng(1).integers(0, 512, (1, 20))
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids)).logits[0].numpy()
    sess = ort.InferenceSession(str(export_native(model, tmp_path, max_context=64)), providers=["CPUExecutionProvider"])
    names = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 2, 64, 16), np.float32)) for _ in names]
    binding, got = sess.io_binding(), []
    for lo, hi in [(0, 12), (12, 13), (13, 20)]:
        binding.bind_cpu_input("input_ids", ids[:, lo:hi])
        binding.bind_cpu_input("attention_mask", np.ones((1, hi), np.int64))
        binding.bind_cpu_input("logits_to_keep", np.zeros(1, np.int64))
        binding.clear_binding_outputs()
        binding.bind_output("logits", "cpu")
        for name, buf in zip(names, buffers):
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        sess.run_with_iobinding(binding)
        got.append(binding.get_outputs()[0].numpy()[0])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-5, rtol=1e-4)


def test_fused_patterns_rename_qkv_and_gate_up():
    from exporter.pipelines.native_lm import fused_patterns

    assert fused_patterns(["/model/layers.3/self_attn/q_proj/", "/model/layers.3/self_attn/k_proj/",
                           "/model/layers.11/mlp/down_proj/", "/model/layers.2/mlp/up_proj/"]) == [
        "/model/layers.3/self_attn/qkv_proj/", "/model/layers.11/mlp/down_proj/", "/model/layers.2/mlp/gate_up_proj/"]
    assert fused_patterns(["/model/layers.1/mlp/fc1/", "/model/layers.1/self_attn/dense/",
                           "/gpt_neox/layers.0/attention/query_key_value/", "/gpt_neox/layers.0/mlp/dense_4h_to_h/"]) == [
        "/model/layers.1/mlp/up_proj/", "/model/layers.1/self_attn/o_proj/", "/model/layers.0/self_attn/qkv_proj/",
        "/model/layers.0/mlp/down_proj/"]


def test_graph_choice_names_why_and_refuses_impossible_requests():
    from transformers import AutoConfig, GPT2Config

    from exporter.pipelines import choose_graph
    from exporter.errors import ExportError
    from exporter.profiles import load_profile
    from exporter.progress import Progress

    llama = AutoConfig.from_pretrained(tiny_model("llama"))
    cpu, gpu = load_profile("cpu-x86-avx2"), load_profile("gpu-cuda")
    notes = Progress()
    assert choose_graph(llama, cpu, "auto", notes) == "native"
    assert choose_graph(llama, cpu, "optimum", notes) == "optimum"
    assert choose_graph(llama, gpu, "auto", notes) == "optimum"
    with pytest.raises(ExportError, match="gpu-cuda is gpu.*use --graph optimum"):
        choose_graph(llama, gpu, "native", notes)
    with pytest.raises(ExportError, match="'gpt2' has no native graph builder"):
        choose_graph(GPT2Config(), cpu, "native", notes)
    yarn = AutoConfig.for_model("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert choose_graph(yarn, cpu, "auto", notes) == "optimum"
    phi = AutoConfig.for_model("phi", hidden_size=320, num_attention_heads=4, partial_rotary_factor=0.4)
    assert choose_graph(phi, cpu, "auto", notes) == "optimum" and choose_graph(phi, cpu, "native", notes) == "native"
    with pytest.raises(ExportError, match="rope scaling 'yarn'"):
        choose_graph(yarn, cpu, "native", notes)
    with pytest.raises(ExportError, match="choose auto, native or optimum"):
        choose_graph(llama, cpu, "fast", notes)


@pytest.mark.parametrize("name", ["exaone4-hybrid", "gemma2", "phi", "gpt_neox-sequential"])
def test_native_family_exports_through_the_cli_path_and_the_agent_serves_it(name, tmp_path, keypair, trusted):
    """EXAONE 4.0 (no optimum config exists for it) and Gemma 2 (native by default: bench/native_vs_optimum.py),
    Phi-2 and GPT-NeoX (native when asked: no faster than optimum's graph) go through export() to a gated bundle
    on the native graph, and the agent's runtime generates the same greedy tokens as the exporter's reference
    decoder."""
    from agent.bundle import QualityStatus, open_bundle
    from agent.runtime import load_model
    from exporter import export
    from exporter.lm import OrtDecoder

    src = tmp_path / name
    random_model(name).save_pretrained(src)
    for f in tiny_model("llama").iterdir():  # a real trained tokenizer with a chat template
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (src / f.name).write_bytes(f.read_bytes())
    graph = "native" if name.startswith(("phi", "gpt_neox")) else "auto"
    result = export(src, out=tmp_path / "bundle", key=keypair[0], quant="int8", benchmark=False, graph=graph)
    m = result.manifest
    assert m.quality.status is QualityStatus.PASSED, m.quality.failures
    assert m.model.architecture == name.split("-")[0] and m.quantization.details["graph"] == "native"
    model = load_model(open_bundle(result.bundle, trusted))
    try:
        assert model.shared_kv
        prompt = np.random.default_rng(3).integers(3, 500, 12).tolist()
        tokens = [c.token_id for c in model.generate(prompt, max_tokens=10, ignore_eos=True) if c.token_id is not None]
        expected = OrtDecoder(result.bundle / "model.onnx").greedy(np.array(prompt), 10).tolist()
        assert tokens == expected
        # a second turn that extends the first reuses the cached prefix and still matches
        again = model.generate(prompt + tokens[:5], max_tokens=5, ignore_eos=True)
        more = [c.token_id for c in again if c.token_id is not None]
        assert again.stats.cached_tokens > 0 and more == expected[5:10]
    finally:
        model.close()


def test_agent_kv_buffers_grow_with_use_not_to_the_whole_context(tmp_path, keypair, trusted):
    """The shared KV buffer starts at 256 positions, not max_context, and grows (still exact) when a
    longer conversation needs it."""
    from agent.bundle import open_bundle
    from agent.runtime import load_model
    from exporter import export
    from exporter.lm import OrtDecoder

    src = tmp_path / "llama"
    random_model("llama", max_position_embeddings=2048).save_pretrained(src)
    for f in tiny_model("llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (src / f.name).write_bytes(f.read_bytes())
    result = export(src, out=tmp_path / "bundle", key=keypair[0], quant="none", benchmark=False)
    model = load_model(open_bundle(result.bundle, trusted))
    try:
        assert model.max_context == 2048
        rng = np.random.default_rng(5)
        short = rng.integers(3, 500, 20).tolist()
        model.generate(short, max_tokens=4, ignore_eos=True).run()
        assert model._kv_buffers[0][0].shape == (1, 2, 256, 16)
        long = rng.integers(3, 500, 600).tolist()
        tokens = [c.token_id for c in model.generate(long, max_tokens=6, ignore_eos=True) if c.token_id is not None]
        assert model._kv_buffers[0][0].shape == (1, 2, 768, 16)
        assert tokens == OrtDecoder(result.bundle / "model.onnx").greedy(np.array(long), 6).tolist()
    finally:
        model.close()


def test_native_only_architecture_on_a_gpu_target_is_refused_early():
    from transformers import AutoConfig

    from exporter.pipelines import choose_graph
    from exporter.errors import UnsupportedArchitecture
    from exporter.profiles import load_profile
    from exporter.progress import Progress

    exaone = AutoConfig.for_model("exaone4", **BASE)
    with pytest.raises(UnsupportedArchitecture, match="'exaone4' for text-generation by the optimum graph"):
        choose_graph(exaone, load_profile("gpu-cuda"), "auto", Progress())


def test_layer_norm_family_int4_on_the_native_graph_quantizes_every_linear(tmp_path, keypair):
    """phi's native graph keeps its embedding table and head float (no block tables are built for it): the
    profile's int4 recipe then gives every Linear 4-bit blocks and the head 8-bit ones, as on optimum's graph."""
    import onnx

    from exporter import export

    src = tmp_path / "phi"
    random_model("phi").save_pretrained(src)
    for f in tiny_model("llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (src / f.name).write_bytes(f.read_bytes())
    result = export(src, out=tmp_path / "b", key=keypair[0], quant="int4", benchmark=False, force=True, graph="native")
    assert result.manifest.quantization.details["graph"] == "native"
    g = onnx.load(str(result.bundle / "model.onnx"), load_external_data=False)
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in g.graph.node if n.op_type == "MatMulNBits"}
    head = [name for name in bits if name.startswith("/lm_head/")]
    assert len(head) == 1 and bits.pop(head[0]) == 8
    assert sorted(bits.values()) == [4] * 4 * 2  # per layer: qkv (fused), o_proj, up_proj, down_proj
