"""Language models for npu-qnn-htp: the static-shape graph, its host-side KV cache, and the export
judged on the real QNN HTP backend (onnxruntime-qnn's x86_64 simulator) with CPU fallback off."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.bundle import QualityStatus
from agent.runtime.errors import InputError
from agent.runtime.static_generation import MASK_VALUE, StaticDecoder, StaticGraph
from exporter import export, quality
from exporter.pipelines import npu_lm
from exporter.errors import IncompatibleTarget
from exporter.profiles import load_profile
from agent.bundle import load_private_key
from tests.support.models import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROFILE = "npu-qnn-htp"
DYNAMIC_OPS = {"Shape", "Range", "Trilu", "Where", "Expand", "ConstantOfShape", "NonZero", "Tile"}


def _hf(arch: str):
    import torch  # noqa: F401  (transformers needs it loaded)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model(arch)).eval()


def _cpu_decoder(model: onnx.ModelProto, cfg, *, step: int, cache: int) -> StaticDecoder:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return npu_lm.decoder(sess.run, cfg, step=step, cache=cache, output_names=[o.name for o in sess.get_outputs()])


@pytest.mark.parametrize("arch,step", [("llama", 1), ("llama", 4), ("qwen2", 4), ("phi3", 4), ("gemma", 4)])
def test_float_static_graph_matches_pytorch(arch, step):
    import torch

    from exporter.pipelines import native_lm as native

    model = _hf(arch)
    cfg, weights = native.decoder_from_hf(model)
    cache = 64
    graph = npu_lm.build_static_decoder(cfg, weights, step=step, cache=cache)
    ops = Counter(n.op_type for n in graph.graph.node)
    assert not DYNAMIC_OPS & set(ops), ops
    for vi in [*graph.graph.input, *graph.graph.output]:  # every dimension fixed
        assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), vi.name
    names = [i.name for i in graph.graph.input], [o.name for o in graph.graph.output]
    assert names == npu_lm.io_names(cfg.num_layers)

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 23)  # 23: the last chunk is padded
    lm = _cpu_decoder(graph, cfg, step=step, cache=cache)
    got = lm.forward(ids.tolist())
    with torch.inference_mode():
        want = model(torch.from_numpy(ids[None])).logits[0].numpy()
        greedy = model.generate(torch.from_numpy(ids[None, :10]), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False, pad_token_id=0, eos_token_id=None)[0, 10:].numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)
    np.testing.assert_array_equal(lm.greedy(ids[:10].tolist(), 8), greedy)


def test_static_decoder_feeds_mask_cache_and_padding():
    calls = []

    def run(_names, feed):
        calls.append({k: v.copy() for k, v in feed.items()})
        return [np.zeros((1, 4, 5), np.float32)] + [np.full((1, 1, 4, 2), len(calls), np.float32)] * 2

    lm = StaticDecoder(run, step=4, cache=8, num_layers=1, kv_heads=1, head_dim=2)
    assert lm.forward([5, 6, 7, 8, 9]).shape == (5, 5)
    first, second = calls
    assert first["input_ids"].dtype == np.int32 and first["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert second["input_ids"].tolist() == [[9, 0, 0, 0]] and second["position_ids"].tolist() == [[4, 5, 6, 7]]
    bias = second["attention_bias"][0, 0]
    assert bias.shape == (4, 12)
    assert (bias[:, :4] == 0).all() and (bias[:, 4:8] == MASK_VALUE).all()  # 4 cache slots filled
    assert bias[0, 8:].tolist() == [0, MASK_VALUE, MASK_VALUE, MASK_VALUE]  # the real token sees itself only
    assert (np.diag(bias[1:, 9:]) == 0).all()  # padding rows see themselves: a finite softmax
    causal = first["attention_bias"][0, 0, :, 8:]
    assert ((causal == 0) == np.tril(np.ones((4, 4), bool))).all()
    # the first call's 4 new rows, then 1 row of the second call, are in the cache; padding is not
    assert second["past_key_values.0.key"][0, 0, :, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert lm.length == 5
    with pytest.raises(InputError, match="exceeds the model's 8-token cache"):
        lm.forward([1, 2, 3, 4])


def test_static_decoder_sends_short_chunks_to_the_decode_graph():
    """Chunks of at most the decode step run the decode graph with its own shapes; both fill one cache."""
    calls = []

    def graph(step):
        def run(_names, feed):
            calls.append((step, {k: v.copy() for k, v in feed.items()}))
            return [np.zeros((1, step, 5), np.float32)] + [np.full((1, 1, step, 2), step, np.float32)] * 2
        return run

    lm = StaticDecoder(graph(4), step=4, cache=8, num_layers=1, kv_heads=1, head_dim=2,
                       decode=StaticGraph(graph(1), 1))
    lm.forward([5, 6, 7, 8, 9])  # a full chunk, then one token left: the decode graph
    lm.forward([3])
    assert [c[0] for c in calls] == [4, 1, 1] and lm.calls == {4: 1, 1: 2} and lm.length == 6
    one = calls[2][1]
    assert one["input_ids"].tolist() == [[3]] and one["position_ids"].tolist() == [[5]]
    assert one["attention_bias"].shape == (1, 1, 1, 9)
    assert one["attention_bias"][0, 0, 0].tolist() == [0] * 5 + [MASK_VALUE] * 3 + [0]
    assert one["past_key_values.0.key"][0, 0, :, 0].tolist() == [4, 4, 4, 4, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="must be shorter than the step 4"):
        StaticDecoder(graph(4), step=4, cache=8, num_layers=1, kv_heads=1, head_dim=2, decode=StaticGraph(graph(4), 4))


def test_forced_greedy_finds_the_free_running_split():
    """Teacher-forced picks agree with free-running greedy up to the first split, so prefix_match is the same."""
    from exporter import npu_recipe
    from exporter.pipelines import native_lm as native

    cfg, weights = native.decoder_from_hf(_hf("llama"))
    lm = _cpu_decoder(npu_lm.build_static_decoder(cfg, weights, step=4, cache=64), cfg, step=4, cache=64)
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6))
    free = np.stack([lm.greedy(p.tolist(), 10) for p in prompts])
    assert [p.tolist() for p in npu_recipe.forced_greedy(lm, prompts, free)] == free.tolist()
    other = free.copy()
    other[:, 3] = (other[:, 3] + 1) % cfg.vocab_size  # a reference that splits from the model at token 3
    picks = npu_recipe.forced_greedy(lm, prompts, other)
    assert [quality.prefix_match(p, r) for p, r in zip(picks, other)] == [0.3, 0.3]


def test_recipe_windows_and_fp16_options():
    from exporter import npu_recipe
    from exporter.errors import ConversionError

    texts = [np.arange(10), np.arange(10, 15), np.arange(15, 40)]
    windows = npu_recipe.calibration_windows(texts, length=16)
    assert [w.tolist() for w in windows] == [list(range(16)), list(range(16, 32)), list(range(32, 40))]
    assert [w.tolist() for w in npu_recipe.calibration_windows([np.arange(3)], length=16)] == [[0, 1, 2]]
    options = dict(load_profile(PROFILE).execution_providers[0].options)
    npu_recipe.check_fp16_options(["residual"], options, profile=PROFILE)
    with pytest.raises(ConversionError, match="enable_htp_fp16_precision, soc_model"):
        npu_recipe.check_fp16_options(["residual", "norm"], {"enable_htp_fp16_precision": "0"}, profile=PROFILE)
    npu_recipe.check_fp16_options([], {}, profile=PROFILE)


def test_text_generation_qdq_needs_an_npu_profile():
    from exporter.quantize import check_target

    recipe = load_profile(PROFILE).task("text-generation").quantization.model_copy(update={"method": "qdq-static"})
    check_target(recipe, device_class="npu", profile=PROFILE, task="text-generation")
    with pytest.raises(IncompatibleTarget, match="needs an NPU profile"):
        check_target(recipe, device_class="cpu", profile="cpu-x86-avx2", task="text-generation")


@pytest.mark.parametrize("arch", ["gemma2", "phi", "gpt_neox"])
def test_native_families_the_static_graph_lacks_are_refused_in_one_line(arch, tmp_path, keypair):
    """Softcapping, LayerNorm and parallel residuals are native-only: an NPU export says so before loading."""
    from exporter.errors import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=f"builds its own static graph: '{arch}' needs softcapping"):
        export(tiny_model(arch), out=tmp_path / "b", key=keypair[0], profile=PROFILE)


@pytest.fixture(scope="module")
def npu_bundle(tmp_path_factory, keypair):
    out = tmp_path_factory.mktemp("npu-lm") / "bundle"
    # --quant int8: the w8a16 QDQ recipe (the profile's default for LMs is fp16, tested below)
    return export(tiny_model("llama"), out=out, key=keypair[0], profile=PROFILE, quant="int8", ep_context=True), out


def _strict(path: Path) -> ort.InferenceSession:
    return npu_lm.htp_session(path, dict(load_profile(PROFILE).execution_providers[0].options))


def _static(sess: ort.InferenceSession, cfg: dict) -> StaticDecoder:
    """The host loop over a session, configured from manifest.model.config alone (as the agent does)."""
    return StaticDecoder(sess.run, step=cfg["step_length"], cache=cfg["cache_length"], num_layers=cfg["num_layers"],
                         kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"],
                         output_names=[o.name for o in sess.get_outputs()], mask_value=cfg["mask_value"])


def test_tiny_llama_export_runs_on_htp_with_cpu_fallback_off(npu_bundle):
    r, out = npu_bundle
    assert r.report.status is QualityStatus.PASSED, r.report.failures
    assert r.report.details["measured_on"].startswith("QNN HTP")
    qnn = r.manifest.quantization.details["qnn"]
    assert qnn["ok"] and qnn["rejected_nodes"] == [] and qnn["error"] is None
    # every evaluation window (4 x 2 calls) and teacher-forced greedy run (4 x 3 calls) ran on HTP
    assert qnn["calls"] == 4 * 2 + 4 * 3
    assert r.report.details["greedy_steps"] == 64
    m = r.report.metrics
    # the profile's gate, and closer than it: 16-bit activations keep the tiny model near float
    assert m["top1_agreement"] >= 0.9 and m["logits_cosine"] >= 0.999 and abs(m["ppl_delta"]) < 0.01
    assert all(p > 0 for p in r.report.details["greedy_prefix_matches"])  # every greedy run starts right
    assert m["greedy_match"] >= 0.5

    cfg = r.manifest.model.config
    assert cfg["kv_layout"] == "static" and cfg["step_length"] == npu_lm.DEFAULT_STEP
    assert cfg["cache_length"] == cfg["max_context"] == load_profile(PROFILE).shapes.max_context
    assert r.manifest.model.inputs[:3] == ["input_ids", "position_ids", "attention_bias"]

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert not DYNAMIC_OPS & set(ops) and "MatMulInteger" not in ops
    inits = {i.name: i for i in model.graph.initializer}
    act_zp = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert act_zp == {onnx.TensorProto.UINT16}
    tables = {re.sub(r"_\d+_quantized$", "", i.name): i for i in inits.values() if len(i.dims) == 2}
    # MatMul weights int8, one scale per output channel (the profile's recipe); the tables read by
    # Gather keep the 16-bit activation type of their output
    matmul = {n: t for n, t in tables.items() if n.endswith("_proj.weight") or n == "lm_head.weight"}
    assert len(matmul) == 2 * 4 + 1 and {t.data_type for t in matmul.values()} == {onnx.TensorProto.INT8}
    scales = {n.input[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert all(list(scales[t.name].dims) == [t.dims[1]] for t in matmul.values())
    details = r.manifest.quantization.details
    assert details["per_channel_matmul_weights"] == 9
    # the recipe's fp16 regions: the residual Adds and the RMSNorms stay float (HTP runs them in fp16)
    assert details["float_regions"] == {"residual": 4, "norm": 5} and details["calibration_windows"] >= 4
    # the float fallback measured the model once on the CPU EP, found it passing, and kept nothing float
    fallback = details["float_fallback"]
    assert fallback["float_classes"] == [] and fallback["passed_on_cpu"] and len(fallback["cpu_trials"]) == 1
    assert fallback["refused_on_target"] == []
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    float_input = Counter(n.op_type for n in model.graph.node if producer.get(n.input[0]) not in (None, "DequantizeLinear"))
    assert float_input["SimplifiedLayerNormalization"] == 4 and float_input["Add"] >= 3  # the first reads the embedding
    assert tables["embed.weight"].data_type == tables["rope.cos"].data_type == onnx.TensorProto.UINT16

    # the decode graph: the same weights file at the same offsets, the same scales and zero points;
    # only the step-dependent shapes differ
    assert cfg["decode_entry"] == npu_lm.DECODE_NAME and cfg["decode_step_length"] == npu_lm.DECODE_STEP == 1
    decode = onnx.load(str(out / npu_lm.DECODE_NAME), load_external_data=False)
    assert [d.dim_value for d in decode.graph.input[0].type.tensor_type.shape.dim] == [1, 1]
    prefill_inits = {i.name: i for i in model.graph.initializer}
    decode_inits = {i.name: i for i in decode.graph.initializer}
    assert set(decode_inits) == set(prefill_inits)
    changed = {n for n, t in decode_inits.items() if t.SerializeToString() != prefill_inits[n].SerializeToString()}
    assert changed and all(n.startswith("ints_") for n in changed)
    assert details["decode_graph"]["step_constants"] == len(changed)
    shared = [t for t in decode_inits.values() if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(shared) > 9 and {e.value for t in shared for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    # measured on HTP by the export: decoding through the step-1 graph is the prefill path's decode
    check = qnn["decode"]
    assert check["top1_agree"] and check["max_abs_diff"] <= 1e-3 * check["logits_max_abs"] + 1e-5
    assert set(check["seconds_per_call"]) == {"32", "1"}
    # and on the CPU EP (the agent's fallback), over a longer prompt: the same numbers to float rounding
    cpu = [ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"]) for f in ("model.onnx", npu_lm.DECODE_NAME)]
    native_cfg = SimpleNamespace(num_layers=cfg["num_layers"], num_kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"])
    wide = npu_lm.wide_decode(cpu[0], native_cfg, np.arange(40, 80), step=32, cache=cfg["cache_length"])
    on_cpu = npu_lm.decode_agreement(wide, cpu[1], native_cfg, step=32, decode_step=1, cache=cfg["cache_length"])
    assert on_cpu["top1_agree"] and on_cpu["max_abs_diff"] <= 1e-3 * on_cpu["logits_max_abs"] + 1e-5
    assert cfg["ep_context"] == "model_ctx.onnx" and cfg["decode_ep_context"] == "model_decode_ctx.onnx"

    # the golden call reproduces on the CPU EP (the agent's fallback) and on HTP itself
    golden = r.manifest.golden
    feeds = dict(np.load(out / golden.inputs))
    want = np.load(out / golden.outputs)["logits"]
    cpu = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    htp = _strict(out / "model.onnx").run(["logits"], feeds)[0]
    for got in (cpu, htp):
        np.testing.assert_allclose(got, want, atol=golden.atol, rtol=golden.rtol)


def test_htp_greedy_decode_through_the_host_cache(npu_bundle):
    """The bundle decodes on HTP as the agent would drive it: prefill chunk, then padded single-token steps."""
    import torch

    r, out = npu_bundle
    cfg = r.manifest.model.config
    lm = _static(_strict(out / "model.onnx"), cfg)
    prompt = np.arange(40, 80)  # longer than one step: two calls of prefill
    got = lm.greedy(prompt.tolist(), 6)
    with torch.inference_mode():
        want = _hf("llama").generate(torch.from_numpy(prompt[None]), max_new_tokens=6, min_new_tokens=6,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)[0, 40:].numpy()
    # measured: the first 5 of 6 agree (a random tiny model has near ties; the gate's own greedy runs: 78 %)
    assert quality.prefix_match(got, want) >= 0.5 and lm.length == 40 + 5


@pytest.mark.parametrize("provider", ["QNNExecutionProvider", "CPUExecutionProvider"])
def test_agent_serves_the_static_bundle(npu_bundle, trusted, provider):
    """The agent's loader picks the static driver; on HTP and on its CPU fallback it decodes like the export host."""
    from agent.bundle import open_bundle
    from agent.runtime import load_model
    from agent.runtime.static_generation import StaticTextGenerationModel

    r, out = npu_bundle
    model = load_model(open_bundle(out, trusted), providers=[provider])
    assert isinstance(model, StaticTextGenerationModel) and model.execution_provider == provider
    # on HTP both graphs run their compiled contexts; the CPU EP runs the graphs themselves
    compiled = provider.startswith("QNN")
    assert Path(model.model_file).name == ("model_ctx.onnx" if compiled else "model.onnx")
    assert model.decode_session is not None and model.decoder.decode.step == 1
    assert model.run_golden().ok
    prompt = list(range(40, 80))
    gen = model.generate(prompt, max_tokens=6, ignore_eos=True)
    tokens = [c.token_id for c in gen if c.token_id is not None]
    assert gen.stats.completion_tokens == 6 and gen.stats.finish_reason == "length"
    # the prompt took two prefill calls (32 + 8 tokens); every decoded token after the first, one step-1 call
    assert model.decoder.calls == {32: 2, 1: 5}
    sess = _strict(out / "model.onnx") if provider.startswith("QNN") else \
        ort.InferenceSession(str(out / "model.onnx"), providers=[provider])
    assert tokens == _static(sess, r.manifest.model.config).greedy(prompt, 6).tolist()
    # the prefix cache hands a stored prefix back to the host cache: same answer, fewer tokens run
    again = model.generate(prompt, max_tokens=6, ignore_eos=True)
    assert [c.token_id for c in again if c.token_id is not None] == tokens
    assert again.stats.cached_tokens > 0
    # n choices share one prefill: the host cache rewinds to the prompt for each
    both = model.generate(prompt, max_tokens=6, ignore_eos=True, n=2, use_prefix_cache=False)
    chunks = list(both)
    assert [[c.token_id for c in chunks if c.index == i and c.token_id is not None] for i in (0, 1)] == [tokens] * 2
    assert both.stats.prefilled_tokens == len(prompt) and both.stats.completion_tokens == 12
    with pytest.raises(InputError, match="context"):
        model.generate(list(range(300)), max_tokens=1)
    model.close()



def _variant(src: Path, dst: Path, keypair, *, drop: tuple[str, ...] = (), **config) -> Path:
    """A copy of the bundle without `drop` files, model.config updated by `config` (None removes a key), resealed."""
    import shutil

    from agent.bundle import Manifest, seal_bundle

    shutil.copytree(src, dst)
    manifest = Manifest.model_validate_json((dst / "manifest.json").read_text())
    for name in drop:
        (dst / name).unlink()
    (dst / "manifest.json").unlink()
    (dst / "manifest.sig").unlink(missing_ok=True)
    model_config = {k: v for k, v in {**manifest.model.config, **config}.items() if v is not None}
    fields = manifest.model_dump(exclude={"files"})
    fields["model"] = manifest.model.model_copy(update={"config": model_config})
    seal_bundle(dst, private_key=load_private_key(keypair[0]), **fields)
    return dst


def test_a_bundle_without_the_decode_graph_is_served_as_before(npu_bundle, trusted, keypair, tmp_path):
    """Bundles exported before the decode graph (one graph, no decode_entry) load and decode through the
    prefill graph; the step-1 path gives the same greedy tokens."""
    from agent.bundle import open_bundle
    from agent.runtime import load_model

    r, out = npu_bundle
    old = _variant(out, tmp_path / "old", keypair, drop=(npu_lm.DECODE_NAME, "model_ctx.onnx", "model_decode_ctx.onnx"),
                   decode_entry=None, decode_step_length=None, ep_context=None, decode_ep_context=None)
    prompt = list(range(40, 80))
    tokens = {}
    for name, path in (("old", old), ("new", out)):
        model = load_model(open_bundle(path, trusted), providers=["QNNExecutionProvider"])
        try:
            assert (model.decode_session is None) == (name == "old")
            gen = model.generate(prompt, max_tokens=6, ignore_eos=True)
            tokens[name] = [c.token_id for c in gen if c.token_id is not None]
            assert model.decoder.calls[32] == (2 + 5 if name == "old" else 2)
        finally:
            model.close()
    assert tokens["old"] == tokens["new"] and len(tokens["old"]) == 6


@pytest.mark.parametrize("case", ["missing", "wrong-shape"])
def test_a_bad_decode_graph_is_refused_in_one_line(npu_bundle, trusted, keypair, tmp_path, case):
    from agent.bundle import open_bundle
    from agent.runtime import load_model
    from agent.runtime.errors import LoadError

    r, out = npu_bundle
    if case == "missing":  # model.config names a graph the bundle does not hold
        bad = _variant(out, tmp_path / case, keypair, drop=(npu_lm.DECODE_NAME,))
        want = "names the graph 'model_decode.onnx', which the bundle does not hold"
    else:  # the prefill graph named as the decode graph: its step is 32, not 1
        bad = _variant(out, tmp_path / case, keypair, decode_entry="model.onnx", decode_ep_context=None)
        want = r"decode graph 'model.onnx' does not fit decode_step_length 1 .* input_ids \[1, 32\] \(want \[1, 1\]\)"
    with pytest.raises(LoadError, match=want) as err:
        load_model(open_bundle(bad, trusted), providers=["CPUExecutionProvider"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("check,refused", [
    (None, False),
    ({"max_abs_diff": 1e-7, "logits_max_abs": 0.6, "top1_agree": True}, False),
    ({"max_abs_diff": 0.35, "logits_max_abs": 30.2, "top1_agree": True}, False),  # SmolLM2 on HTP
    ({"max_abs_diff": 0.5, "logits_max_abs": 0.6, "top1_agree": True}, True),
    ({"max_abs_diff": 1e-7, "logits_max_abs": 0.6, "top1_agree": False}, True),
])
def test_a_decode_graph_that_leaves_the_prefill_path_fails_the_gate(check, refused):
    lines = npu_lm.decode_refusal(check)
    assert bool(lines) is refused and all("does not decode as the prefill graph" in line for line in lines)


def test_the_decode_graph_needs_the_step_constants_the_quantizer_kept():
    from exporter.errors import ConversionError
    from exporter.pipelines import native_lm as native

    cfg, weights = native.decoder_from_hf(_hf("llama"))
    plan = npu_lm.decode_plan(cfg, weights, step=4, decode_step=1, cache=16)
    wide = npu_lm.build_static_decoder(cfg, weights, step=4, cache=16)
    narrow = npu_lm.decode_graph(wide, plan)  # float here: the same rewrite as on the QDQ graph
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 9).tolist()
    want = _cpu_decoder(wide, cfg, step=4, cache=16).forward(ids)
    wide_sess, sess = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (wide, narrow))
    lm = StaticDecoder(wide_sess.run, step=4, cache=16, num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                       head_dim=cfg.head_dim, output_names=[o.name for o in wide_sess.get_outputs()],
                       decode=StaticGraph(sess.run, 1, [o.name for o in sess.get_outputs()]))
    got = np.concatenate([lm.forward(ids[:8]), lm.forward(ids[8:])])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert lm.calls == {4: 2, 1: 1}
    kept = [t for t in wide.graph.initializer if t.name != next(iter(plan.constants))]
    del wide.graph.initializer[:]
    wide.graph.initializer.extend(kept)
    with pytest.raises(ConversionError, match="lost the step-dependent constants"):
        npu_lm.decode_graph(wide, plan)


def test_fp16_is_for_npu_language_models_only():
    from exporter.quantize import check_target

    fp16 = load_profile(PROFILE).task("text-generation").quantization.model_copy(update={"method": "fp16"})
    check_target(fp16, device_class="npu", profile=PROFILE, task="text-generation")
    with pytest.raises(IncompatibleTarget, match="built for language models.*drop --quant fp16"):
        check_target(fp16, device_class="npu", profile=PROFILE, task="feature-extraction")


def test_fp16_recipe_runs_the_float_graph_on_htp_at_float_quality(tmp_path, keypair, trusted, monkeypatch):
    """The profile's default for LMs (fp16): no Q/DQ at all, every node on the HTP in fp16, the decode graph beside it, gated as usual,
    weights stored as float16; the agent serves it on HTP and on its CPU fallback. The PyTorch model is gone
    before the HTP runs (a 1B model's float32 copy is not held through the gate)."""
    import gc
    import weakref

    from agent.bundle import open_bundle
    from agent.runtime import load_model
    from exporter import source

    loaded, seen = [], []
    real_load, real_session = source.load_causal_lm, npu_lm.htp_session

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    def session(*args, **kwargs):
        gc.collect()
        seen.append([ref() is None for ref in loaded])
        return real_session(*args, **kwargs)

    monkeypatch.setattr(source, "load_causal_lm", load)
    monkeypatch.setattr(npu_lm, "htp_session", session)
    out = tmp_path / "bundle"
    r = export(tiny_model("llama"), out=out, key=keypair[0], profile=PROFILE)  # no --quant: the profile's fp16
    assert seen and all(s == [True] for s in seen), seen
    monkeypatch.undo()
    assert r.report.status is QualityStatus.PASSED, r.report.failures
    # gated by the profile's fp16 bar (greedy included), not the QDQ recipe's looser one
    lm = load_profile(PROFILE).task("text-generation")
    assert r.report.thresholds == lm.thresholds_for("fp16").as_dict() != lm.thresholds_for("qdq-static").as_dict()
    q = r.manifest.quantization
    assert (q.recipe, q.precision, q.details["precision"]) == ("fp16-static-lm", "fp16", "fp16")
    qnn = q.details["qnn"]
    assert qnn["ok"] and qnn["rejected_nodes"] == [] and qnn["calls"] == 4 * 2 + 4 * 3
    m = r.report.metrics
    assert m["top1_agreement"] >= 0.99 and m["logits_cosine_min"] >= 0.9999 and abs(m["ppl_delta"]) < 1e-3
    assert r.report.details["greedy_prefix_matches"] == [1.0] * 4
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops) and not DYNAMIC_OPS & set(ops)
    # weights and tables stored as float16 behind a Cast each, the norms' vectors as float32
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == ops["Cast"] == q.details["fp16_initializers"] >= 9 + 1
    assert all(int(np.prod(i.dims)) >= 1024 for i in halves)
    assert all(int(np.prod(i.dims)) < 1024 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    check = qnn["decode"]
    assert check["top1_agree"] and check["max_abs_diff"] <= npu_lm.DECODE_TOLERANCE * check["logits_max_abs"]
    decode = onnx.load(str(out / npu_lm.DECODE_NAME), load_external_data=False)
    shared = [t for t in decode.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in shared for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    golden = r.manifest.golden
    feeds = dict(np.load(out / golden.inputs))
    want = np.load(out / golden.outputs)["logits"]
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=golden.atol, rtol=golden.rtol)
    prompt = list(range(40, 80))
    want = _static(ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]),
                   r.manifest.model.config).greedy(prompt, 6).tolist()
    for provider in ("QNNExecutionProvider", "CPUExecutionProvider"):
        served = load_model(open_bundle(out, trusted), providers=[provider])
        try:
            assert served.execution_provider == provider and served.run_golden().ok
            gen = served.generate(prompt, max_tokens=6, ignore_eos=True)
            assert [c.token_id for c in gen if c.token_id is not None] == want, provider
        finally:
            served.close()


def test_store_fp16_keeps_what_fp16_cannot_hold():
    from onnx import helper, numpy_helper

    from exporter import npu_recipe

    big, wide, small = np.full((4, 512), 0.5, np.float32), np.full((4, 512), 7e4, np.float32), np.ones(8, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((big, "big"), (wide, "wide"), (small, "small"))]
    node = helper.make_node("Sum", ["big", "wide"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 512])], inits)
    model = helper.make_model(graph)
    assert npu_recipe.store_fp16(model) == 1
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types == {"big_fp16": onnx.TensorProto.FLOAT16, "wide": onnx.TensorProto.FLOAT, "small": onnx.TensorProto.FLOAT}
    assert [n.op_type for n in model.graph.node] == ["Cast", "Sum"]
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(y, big + wide)


def test_float_fallback_keeps_the_most_helpful_classes_float_until_the_gate_passes():
    """npu_recipe.FloatFallback on made-up measurements: ranking, the CPU choice, widening on the target's word."""
    from exporter import npu_recipe

    classes = {"qkv_proj": ["q0", "q1"], "o_proj": ["o0", "o1"], "down_proj": ["d0", "d1"]}
    top1 = {(): 0.90, ("qkv_proj",): 0.93, ("o_proj",): 0.91, ("down_proj",): 0.95,
            ("down_proj", "qkv_proj"): 0.97, ("down_proj", "o_proj", "qkv_proj"): 0.99}
    seen = []

    def measure(nodes):
        seen.append(sorted(nodes))
        kept = tuple(sorted({c for c, ns in classes.items() if set(ns) <= set(nodes)}))
        return {"top1_agreement": top1[kept], "ppl_delta": 0.001}

    fb = npu_recipe.FloatFallback(classes, measure, {"min_top1_agreement": 0.96, "max_ppl_delta": 0.01})
    assert fb.start() == ["down_proj", "qkv_proj"] and fb.passed
    assert fb.ranking == ["down_proj", "qkv_proj", "o_proj"]
    assert fb.float_nodes == ["d0", "d1", "q0", "q1"]
    assert len(seen) == 1 + 3 + 1  # the model, each class alone, the first pair (the single was measured already)
    # the target refuses what the CPU passed: one class more, until none is left
    assert fb.widen({"top1_agreement": 0.95}) == ["down_proj", "qkv_proj", "o_proj"]
    assert fb.widen({"top1_agreement": 0.955}) is None
    d = fb.details()
    assert d["float_matmuls"] == 6 and [t["float_classes"] for t in d["refused_on_target"]] == \
        [["down_proj", "qkv_proj"], ["down_proj", "qkv_proj", "o_proj"]]

    # a model that passes is measured once and keeps nothing float; widening ranks the classes then
    fb = npu_recipe.FloatFallback(classes, measure, {"min_top1_agreement": 0.5})
    assert fb.start() == [] and fb.passed and fb.ranking is None and len(fb.trials) == 1
    assert fb.widen({"top1_agreement": 0.4}) == ["down_proj"]  # all pass on the CPU: ranked by margin
    # none passes even all float: every class ends float and the gate will refuse it
    fb = npu_recipe.FloatFallback(classes, measure, {"min_top1_agreement": 0.999})
    assert fb.start() == ["down_proj", "qkv_proj", "o_proj"] and not fb.passed


def test_linear_classes_of_the_static_graph():
    from exporter import npu_recipe
    from exporter.pipelines import native_lm

    cfg, weights = native_lm.decoder_from_hf(_hf("llama"), max_context=64)
    model = npu_lm.build_static_decoder(cfg, weights, step=4, cache=64)
    classes = npu_recipe.linear_classes(model)
    assert sorted(classes) == ["down_proj", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"]
    assert all(len(v) == cfg.num_layers for k, v in classes.items() if k != "lm_head") and len(classes["lm_head"]) == 1
    assert classes["down_proj"][0] == "/model/layers.0/mlp/down_proj/MatMul"


def test_int8_that_misses_the_gate_keeps_linears_float_until_the_htp_passes_it(tmp_path, keypair):
    """--quant int8 with a bar the all-int8 tiny model misses on the HTP (greedy >= 0.75; it reaches 0.44): the
    fallback keeps classes of linears float (float32 weights, fp16 on the HTP), chosen on the CPU EP and widened
    while the HTP still refuses, and the bundle passes with every node on the HTP."""
    out = tmp_path / "bundle"
    r = export(tiny_model("llama"), out=out, key=keypair[0], profile=PROFILE, quant="int8",
               thresholds={"min_greedy_match": 0.75})
    assert r.report.status is QualityStatus.PASSED, r.report.failures
    assert r.report.metrics["greedy_match"] >= 0.75
    q = r.manifest.quantization.details
    assert q["qnn"]["ok"] and q["qnn"]["rejected_nodes"] == []
    fallback = q["float_fallback"]
    base = fallback["cpu_trials"][0]
    assert base["float_classes"] == [] and base["metrics"]["greedy_match"] < 0.75
    chosen = fallback["float_classes"]
    assert chosen and set(chosen) <= {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    assert sorted(fallback["ranking"]) == ["down_proj", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"]
    assert chosen == fallback["ranking"][: len(chosen)]  # most helpful first
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        cls = next((c for c in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head") if c in node.name), None)
        if node.op_type != "MatMul" or cls is None:
            continue
        # the chosen classes read float weights (stored as float16 behind a Cast: the HTP runs them in fp16),
        # the others int8 through a DequantizeLinear
        source = producer[node.input[1]]
        want = ("Cast", onnx.TensorProto.FLOAT16) if cls in chosen else ("DequantizeLinear", onnx.TensorProto.INT8)
        assert (source.op_type, inits[source.input[0]]) == want, (node.name, chosen)
    assert q["fp16_initializers"] == sum(1 for n in model.graph.node if n.op_type == "Cast" and n.name.endswith("_to_fp32"))
