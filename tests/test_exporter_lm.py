"""Decoder-LM export: every architecture x int4/int8 makes a verified bundle that passes its gate,
with asserted structure (which MatMuls are quantized) and numbers against PyTorch."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agent.bundle import QualityStatus, TrustedKeys, open_bundle  # noqa: E402
from tests.support.models import DECODERS, smollm2_gguf_path, tiny_model  # noqa: E402

QUANTS = ("int4", "int8")
GRAPHS = ("native", "optimum")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, keypair):
    """Exports made once per module, keyed by (arch, quant, graph)."""
    from exporter import export

    cache: dict = {}
    root = tmp_path_factory.mktemp("lm-exports")

    def get(arch: str, quant: str, graph: str = "native"):
        if (arch, quant, graph) not in cache:
            cache[arch, quant, graph] = export(tiny_model(arch), out=root / f"{arch}-{quant}-{graph}", key=keypair[0],
                                               quant=quant, graph=graph)
        return cache[arch, quant, graph]

    return get


def linear_count(arch: str, graph: str) -> int:
    """MatMuls int4/int8 must quantize: every nn.Linear but the lm_head (optimum), or per layer the fused
    q/k/v, o, fused gate/up and down (native)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch))
    if graph == "native":
        return 4 * model.config.num_hidden_layers
    return sum(isinstance(m, torch.nn.Linear) and name != "lm_head" for name, m in model.named_modules())


def graph_of(bundle):
    import onnx

    return onnx.load(str(bundle / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", DECODERS)
def test_every_decoder_exports_a_verified_bundle_that_passes_its_gate(arch, quant, graph, exports, keypair):
    result = exports(arch, quant, graph)
    verified = open_bundle(result.bundle, TrustedKeys.from_paths([keypair[1]]))
    m = verified.manifest
    assert m.quality.status is QualityStatus.PASSED, m.quality.failures
    assert m.task.value == "text-generation" and m.model.architecture == arch
    cfg = m.model.config
    assert cfg["num_layers"] == 2 and cfg["num_kv_heads"] == 2 and cfg["head_dim"] == 16
    assert cfg["max_context"] == 256 and cfg["eos_token_ids"] and "bos_token_id" in cfg
    # the I/O contract of docs/ARCHITECTURE.md, in one merged graph; GroupQueryAttention takes positions
    # from attention_mask and shares one KV buffer between past and present
    first = ["input_ids", "attention_mask"] + (["position_ids"] if graph == "optimum" else [])
    assert m.model.inputs[:len(first)] == first
    last = ["logits_to_keep"] if graph == "native" else []  # the native graph: 1 = lm_head on the last position only
    assert m.model.inputs[len(first):] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")] + last
    assert m.quantization.details["graph"] == graph
    assert cfg.get("past_present_share_buffer", False) is (graph == "native")
    ops = [n.op_type for n in graph_of(result.bundle).graph.node]
    assert ops.count("GroupQueryAttention") == (2 if graph == "native" else 0)
    assert m.model.outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    paths = {f.path for f in m.files}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "golden/inputs.npz", "golden/outputs.npz"} <= paths
    assert [p for p in paths if p.endswith(".onnx")] == ["model.onnx"]
    assert "chat_template.jinja" in paths or "chat_template" in (result.bundle / "tokenizer_config.json").read_text()
    for metric in ("top1_agreement", "ppl_delta", "greedy_match", "logits_cosine", "logits_abs_diff"):
        assert metric in m.quality.metrics
    assert m.quality.thresholds["min_top1_agreement"] == 0.8
    assert m.benchmark.metrics["decode_tok_s"] > 0 and m.benchmark.metrics["prefill_tok_s"] > 0
    assert m.quantization.precision == quant


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("arch", DECODERS)
def test_int4_quantizes_every_linear_but_the_lm_head(arch, graph, exports):
    result = exports(arch, "int4", graph)
    g = graph_of(result.bundle)
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits" and not n.name.startswith("/lm_head/")]
    assert len(nbits) == linear_count(arch, graph)
    assert not any("lm_head" in n.name for n in nbits)
    # the profile keeps the lm_head out of 4 bits but gives it 8-bit blocks (int8_blocks), not float --
    # except where optimum's trace computes a tied head's weight (a Transpose of the embedding)
    lm_head = [n for n in g.graph.node if n.name.startswith("/lm_head/MatMul")]
    computed = graph == "optimum" and lm_head[0].input[1].endswith("_transposed")
    assert len(lm_head) == 1 and lm_head[0].op_type == ("MatMul" if computed else "MatMulNBits")
    if not computed:
        assert {a.name: a.i for a in lm_head[0].attribute}["bits"] == 8
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 4 and attrs["bits"] == 4
    q = result.manifest.quantization
    assert q.recipe == "int4-matmulnbits-b32-acc4-asym-int8head"
    head = ["/lm_head/MatMul"]
    shared = graph == "native" and lm_head[0].input[1] == next(n for n in g.graph.node
                                                              if n.op_type == "GatherBlockQuantized").input[0]
    assert shared is (graph == "native" and arch in ("qwen2", "gemma"))  # the tied ones: blocks stored once
    assert (q.details["excluded_nodes"], q.details["int8_block_nodes"]) == \
        ((head, []) if computed else ([], []) if shared else ([], head))
    assert ("lm_head" in q.details) is shared
    # the native graph also keeps the embedding table as 8-bit blocks (int8_blocks names embed_tokens)
    gathers = [n.op_type for n in g.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")]
    assert ("GatherBlockQuantized" in gathers) is (graph == "native")
    assert ("embedding" in q.details) is (graph == "native")


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("arch", DECODERS)
def test_int8_quantizes_every_linear_but_the_lm_head(arch, graph, exports):
    g = graph_of(exports(arch, "int8", graph).bundle)
    assert sum(n.op_type == "MatMulInteger" for n in g.graph.node) == linear_count(arch, graph)
    assert [n.op_type for n in g.graph.node if n.name == "/lm_head/MatMul"] == ["MatMul"]


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_float_export_matches_pytorch_in_prefill_and_decode(arch, graph, exports):
    """fp32: prefill logits equal PyTorch's, and decoding through the KV cache equals a full forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.lm import OrtDecoder

    result = exports(arch, "none", graph)
    assert result.report.metrics["logits_abs_diff"] < 1e-4
    assert result.report.metrics["greedy_match"] == 1.0 and result.report.metrics["top1_agreement"] == 1.0
    dec = OrtDecoder(result.bundle / "model.onnx")
    ids = np.random.default_rng(1).integers(3, 500, (1, 12), dtype=np.int64)
    _, past = dec.run(ids[:, :8], dec.empty_past())
    step_logits = []
    for t in range(8, 12):
        logits, past = dec.run(ids[:, t : t + 1], past)
        step_logits.append(logits[0, -1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch)).eval()
    with torch.inference_mode():
        full = model(torch.from_numpy(ids)).logits[0, 8:].numpy()
    np.testing.assert_allclose(np.stack(step_logits), full, atol=1e-4)


def test_golden_files_reproduce_with_the_bundle_model(exports):
    import onnxruntime as ort

    result = exports("qwen2", "int4")
    g = result.manifest.golden
    inputs = dict(np.load(result.bundle / g.inputs))
    expected = dict(np.load(result.bundle / g.outputs))
    sess = ort.InferenceSession(str(result.bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(expected, sess.run(list(expected), inputs)))
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=g.atol, rtol=g.rtol)
    assert inputs["past_key_values.0.key"].shape[2] == 0  # a prefill call


def test_lora_adapter_changes_the_export_exactly_as_it_changes_pytorch(tmp_path, keypair):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from exporter import export
    from exporter.lm import OrtDecoder

    base_dir = tiny_model("llama")
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(2).integers(3, 500, (1, 16), dtype=np.int64)
    with torch.inference_mode():
        merged_logits = peft_model.eval().merge_and_unload()(torch.from_numpy(ids)).logits[0].numpy()
        base_logits = base(torch.from_numpy(ids)).logits[0].numpy()

    result = export(base_dir, out=tmp_path / "bundle", key=keypair[0], quant="none", adapter=tmp_path / "adapter",
                    benchmark=False)
    dec = OrtDecoder(result.bundle / "model.onnx")
    got = dec.run(ids, dec.empty_past())[0][0]
    np.testing.assert_allclose(got, merged_logits, atol=1e-4)
    assert np.abs(got - base_logits).max() > 100 * np.abs(got - merged_logits).max()
    assert np.abs(merged_logits - base_logits).max() > 1e-2
    assert result.manifest.source["adapter"] == str((tmp_path / "adapter").resolve())
    assert "adapter" in result.report.reference


def test_impossible_threshold_fails_the_gate_and_writes_nothing(tmp_path, keypair):
    from exporter import export
    from exporter.errors import QualityGateFailed

    with pytest.raises(QualityGateFailed) as info:
        export(tiny_model("llama"), out=tmp_path / "b", key=keypair[0], quant="int4",
               thresholds={"max_logits_abs_diff": 1e-9}, benchmark=False)
    report = info.value.report
    assert report.status is QualityStatus.FAILED
    assert len(report.failures) == 1 and report.failures[0].startswith("logits_abs_diff")
    assert "> 1e-09 (max_logits_abs_diff)" in report.failures[0]
    assert "--force" in str(info.value)
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no staging or work directories left behind


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_head_top_k_profile_option_scans_in_4_bits_and_refines_from_8(arch, tmp_path, keypair):
    """lm_head_top_k (off in the shipped profiles): one 4-bit MatMulNBits over the vocabulary, each position's top k
    recomputed from 8-bit blocks -- the tied embedding's own when tied; the manifest says so; the gate runs."""
    from exporter import export
    from exporter.profiles import TARGETS_DIR

    text = (TARGETS_DIR / "cpu-x86-avx2.toml").read_text().replace("\nint8_blocks", "\nlm_head_top_k = 8\nint8_blocks", 1)
    profile = tmp_path / "cpu-x86-avx2-scan.toml"
    profile.write_text(text)
    result = export(tiny_model(arch), out=tmp_path / "b", key=keypair[0], profile=profile, quant="int4", benchmark=False)
    g = graph_of(result.bundle)
    head = [n for n in g.graph.node if n.name.startswith("/lm_head/")]
    assert sorted(n.op_type for n in head) == ["MatMulNBits", "ScatterElements"]
    assert {a.name: a.i for a in head[0].attribute if a.name == "bits"} == {"bits": 4}
    topk = [n for n in g.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1 and int(numpy_helper_value(g, topk[0].input[1])[0]) == 8
    rows = [n for n in g.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(rows) == 2 and (rows[0].input[0] == rows[1].input[0]) is (arch == "qwen2")  # tied: stored once
    q = open_bundle(result.bundle, TrustedKeys.from_paths([keypair[1]])).manifest.quantization
    assert q.recipe == "int4-matmulnbits-b32-acc4-asym-int4scan-int8top8head" and "top 8" in q.details["lm_head"]
    # optimum's graph has no ScannedHead: the option is dropped and the recipe says so
    plain = export(tiny_model(arch), out=tmp_path / "o", key=keypair[0], profile=profile, quant="int4",
                   graph="optimum", benchmark=False)
    assert plain.manifest.quantization.recipe == "int4-matmulnbits-b32-acc4-asym-int8head"


def numpy_helper_value(g, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in g.graph.initializer if i.name == name))


def test_huge_block_symmetric_recipe_with_strict_threshold_fails(tmp_path, keypair):
    from exporter import export
    from exporter.errors import QualityGateFailed

    with pytest.raises(QualityGateFailed) as info:
        export(tiny_model("qwen2"), out=tmp_path / "b", key=keypair[0], quant="int4", block_size=256,
               symmetric=True, accuracy_level=4, thresholds={"min_logits_cosine": 0.9999}, benchmark=False)
    assert any(f.startswith("logits_cosine") for f in info.value.report.failures)


def test_force_writes_a_verified_bundle_marked_failed_quality(tmp_path, keypair):
    from exporter import export

    result = export(tiny_model("llama"), out=tmp_path / "b", key=keypair[0], quant="int4",
                    thresholds={"max_logits_abs_diff": 1e-9}, force=True, benchmark=False)
    m = open_bundle(result.bundle, TrustedKeys.from_paths([keypair[1]])).manifest
    assert m.quality.status is QualityStatus.FAILED and m.quality.failures
    assert m.quality.thresholds["max_logits_abs_diff"] == 1e-9


def test_early_errors_name_the_problem_and_the_fix(tmp_path, keypair):
    from transformers import MambaConfig, MambaForCausalLM

    from exporter import export
    from exporter.run import check_disk
    from exporter.errors import (
        IncompatibleTarget,
        MissingKey,
        NotEnoughDisk,
        OutputNotEmpty,
        TaskNotSupported,
        UnsupportedArchitecture,
    )

    mamba = tmp_path / "mamba"  # a state-space model: no attention, no KV cache
    MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=64)).save_pretrained(mamba)
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba'.*supported: llama, mistral, qwen2, .*gpt_neox"):
        export(mamba, out=tmp_path / "o1", key=keypair[0])
    with pytest.raises(TaskNotSupported, match="cannot do text-generation; use --task embedding"):
        export(tiny_model("bert"), out=tmp_path / "o2", key=keypair[0], task="text-generation")
    with pytest.raises(IncompatibleTarget, match="'int4' does not run on target 'npu-qnn-htp'"):
        export(tiny_model("llama"), out=tmp_path / "o3", key=keypair[0], profile="npu-qnn-htp", quant="int4")
    with pytest.raises(IncompatibleTarget, match="'int8-dynamic' does not run on target 'gpu-cuda'"):
        export(tiny_model("llama"), out=tmp_path / "o3", key=keypair[0], profile="gpu-cuda", quant="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputNotEmpty, match="--overwrite"):
        export(tiny_model("llama"), out=tmp_path / "full", key=keypair[0])
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(MissingKey, match="edgeship keys generate"):
        export(tiny_model("llama"), out=tmp_path / "o4", key=tmp_path / "no.key")
    with pytest.raises(NotEnoughDisk, match="GB free"):
        check_disk(tmp_path / "o5", 10**18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "mamba"]


@pytest.fixture(scope="module")
def smollm2_exports(tmp_path_factory, keypair):
    from exporter import export

    root = tmp_path_factory.mktemp("smollm2")
    return {q: export(smollm2_gguf_path(), out=root / q, key=keypair[0], quant=q, requantize=True, benchmark=False)
            for q in QUANTS}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two exports of a 135M model in the fixture; minutes on 2 busy cores
@pytest.mark.parametrize("quant", QUANTS)
def test_real_smollm2_gguf_exports_with_a_quality_report_on_real_text(quant, smollm2_exports, keypair):
    result = smollm2_exports[quant]
    m = open_bundle(result.bundle, TrustedKeys.from_paths([keypair[1]])).manifest
    q = m.quality
    assert q.status is QualityStatus.PASSED, q.failures
    assert m.source["gguf_file"].endswith(".gguf") and "dequantized GGUF" in q.reference
    # real weights on real English: perplexity is that of a language model, and barely moves
    assert 1 < q.metrics["ppl_reference"] < 100
    # int4 (HQQ refits the GGUF's 4-bit grid) is nearly lossless; dynamic int8 quantizes activations per
    # tensor and loses more, even with the massive-activation Linears kept float (recorded in details)
    if quant == "int4":
        assert m.quantization.recipe == "int4-matmulnbits-hqq-b32-acc4-int8head"
        assert abs(q.metrics["ppl_delta"]) < 0.02 and q.metrics["top1_agreement"] >= 0.95
        assert q.metrics["greedy_match"] >= 0.8
        # HQQ's float zero points were rewritten as offsets: onnxruntime's fast kernel runs every layer
        import onnx

        g = graph_of(result.bundle)
        dtypes = {i.name: i.data_type for i in g.graph.initializer}
        nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(dtypes[n.input[3]] == onnx.TensorProto.UINT8 for n in nbits if len(n.input) > 3)
    else:
        assert abs(q.metrics["ppl_delta"]) < 0.10 and q.metrics["top1_agreement"] >= 0.8
        assert q.metrics["greedy_match"] >= 0.2  # measured 0.34: greedy prefixes split early on near-ties
    assert "layers.11/mlp/down_proj" in " ".join(m.quantization.details["outlier_ratios"])
    assert m.model.config["num_layers"] == 30 and m.model.config["max_context"] >= 2048
    assert "chat_template" in (result.bundle / "tokenizer_config.json").read_text() or \
        (result.bundle / "chat_template.jinja").exists()

