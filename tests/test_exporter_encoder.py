"""Encoder export (embeddings, classification) on the CPU profiles: structure, quality gate, golden files.

Tiny random BERTs cover every CPU profile x task; the real all-MiniLM-L6-v2 weights (exported
once per module) check that automatic mixed precision meets the 0.995 / 0.98 cosine gate at batch 1,
8 and 32, and that a sentence's vector is the same alone and in a padded batch (>= 0.999).
"""

from __future__ import annotations

import json

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
import pytest

from agent.bundle import QualityStatus
from exporter import calibration, mixed_precision
from exporter.pipelines.encoder import (EncoderResult, _batched, _run, encoder_metrics, export_encoder, gate_failures,
                              layout_metrics)
from exporter.errors import IncompatibleTarget, TaskNotSupported
from exporter.profiles import Thresholds, load_profile
from exporter.row_quant import quantize_rows
from tests.support.models import minilm_path, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU_PROFILES = ("cpu-x86-avx2", "cpu-x86-avx512-vnni", "cpu-arm64")
EVAL = calibration.eval_texts()[:24]


def _export(model: Path, out: Path, profile: str, task: str, **overrides) -> EncoderResult:
    prof = load_profile(profile)
    settings = prof.task(task)
    recipe = settings.quantization.model_copy(update=overrides.pop("recipe", {}))
    thresholds = overrides.pop("thresholds", settings.thresholds)
    return export_encoder(model, out, task=task, profile=prof, recipe=recipe, thresholds=thresholds,
                          eval_texts=overrides.pop("eval_texts", EVAL), **overrides)


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _check_golden(result: EncoderResult, out: Path) -> None:
    inputs = dict(np.load(out / result.golden.inputs))
    outputs = dict(np.load(out / result.golden.outputs))
    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert sorted(inputs) == sorted(i.name for i in sess.get_inputs())
    assert sorted(outputs) == [o.name for o in sess.get_outputs()]
    got = sess.run(None, inputs)[0]
    name = sess.get_outputs()[0].name
    np.testing.assert_allclose(got, outputs[name], atol=result.golden.atol / 2, rtol=result.golden.rtol)


@pytest.fixture(scope="module")
def tiny_bert() -> Path:
    return tiny_model("bert")


@pytest.fixture(scope="module")
def tiny_classifier() -> Path:
    return tiny_model("bert", num_labels=3)


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_tiny_embedding_on_cpu_profiles(tiny_bert, tmp_path, profile):
    out = tmp_path / "bundle"
    r = _export(tiny_bert, out, profile, "embedding")
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quality.metrics["cosine_mean"] >= 0.995 and r.quality.metrics["cosine_min"] >= 0.98
    assert r.quality.thresholds == {"min_cosine_mean": 0.995, "min_cosine_min": 0.98, "min_batch_cosine": 0.999}
    assert r.quality.metrics["batch_cosine_min"] >= 0.999
    assert set(r.quality.details["batch_sizes"]) == {"1", "8", "32"}
    # every weight MatMul is int8 unless the search kept it float; attention-score MatMuls stay float
    d = r.quantization.details
    ops = _ops(r.onnx_path)
    assert d["matmuls"] == 12  # 2 layers x (q, k, v, attention out, ffn in, ffn out)
    assert ops["MatMulIntegerToFloat"] == 12 - len(d["float_nodes"]) == d["quantized_matmuls"]
    assert ops["MatMul"] == 5 + len(d["float_nodes"])  # 2 layers x (QK^T, PV), mean pooling, kept-float
    # per-row activation scales: one QuantizeLinear per quantized activation (q, k and v share one), no
    # per-tensor DynamicQuantizeLinear
    assert 0 < ops["QuantizeLinear"] == d["quantized_activations"] < ops["MatMulIntegerToFloat"]
    assert ops["DynamicQuantizeLinear"] == 0 and ops["LayerNormalization"] > 0
    assert r.quantization.recipe.startswith("int8-dynamic-per-channel") and "-rowwise" in r.quantization.recipe
    # pooling and normalization are in the graph: the device gets unit vectors [batch, dim]
    sess = ort.InferenceSession(str(r.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sess.get_outputs()[0].name == "sentence_embedding"
    assert isinstance(sess.get_inputs()[0].shape[0], str) and isinstance(sess.get_inputs()[0].shape[1], str)
    emb = sess.run(None, dict(np.load(out / r.golden.inputs)))[0]
    assert emb.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert r.model_spec.config["pooling"] == "mean" and r.model_spec.config["normalize"] is True
    assert r.model_spec.config["dim"] == 64 and r.model_spec.outputs == ["sentence_embedding"]
    names = {p.relative_to(out).as_posix() for p in r.files}
    assert {"model.onnx", "golden/inputs.npz", "golden/outputs.npz", "tokenizer.json", "vocab.txt"} <= names
    assert names == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert r.size_bytes < r.size_fp32_bytes
    # the tokenizer file carries no padding/truncation of the exporter's own last call
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    _check_golden(r, out)


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_tiny_classifier_on_cpu_profiles(tiny_classifier, tmp_path, profile):
    out = tmp_path / "bundle"
    r = _export(tiny_classifier, out, profile, "text-classification")
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quality.metrics["label_agreement"] >= 0.95
    assert r.model_spec.config["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert r.model_spec.outputs == ["logits"]
    d = r.quantization.details
    assert d["matmuls"] == 14  # 2 layers x 6, the pooler and the classifier head
    assert _ops(r.onnx_path)["MatMulIntegerToFloat"] == 14 - len(d["float_nodes"])
    assert "min_batch_cosine" not in r.quality.thresholds  # the batch check is the embeddings' gate
    sess = ort.InferenceSession(str(r.onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, dict(np.load(out / r.golden.inputs)))[0]
    assert logits.shape == (4, 3)
    _check_golden(r, out)


def test_fp16_and_fp32_recipes(tiny_bert, tmp_path):
    r16 = _export(tiny_bert, tmp_path / "fp16", "cpu-x86-avx2", "embedding", recipe={"method": "fp16"})
    assert r16.quality.status is QualityStatus.PASSED
    m = onnx.load(str(r16.onnx_path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    r32 = _export(tiny_bert, tmp_path / "fp32", "cpu-x86-avx2", "embedding", recipe={"method": "none"})
    assert r32.quality.metrics["max_abs_diff"] < 1e-4
    assert _ops(r32.onnx_path)["MatMulIntegerToFloat"] == 0
    assert r16.quality.metrics["batch_cosine_min"] >= 0.999 and r32.quality.metrics["batch_cosine_min"] > 0.99999


def test_impossible_gate_fails_with_a_clear_report(tiny_bert, tmp_path):
    """A deliberately bad recipe: per-tensor int8, no mixed precision, thresholds no int8 model meets."""
    r = _export(tiny_bert, tmp_path / "bad", "cpu-x86-avx2", "embedding",
                recipe={"per_channel": False, "mixed_precision": False},
                thresholds=Thresholds(min_cosine_mean=0.9999999, min_cosine_min=0.9999999))
    assert r.quality.status is QualityStatus.FAILED
    assert len(r.quality.failures) == 2
    assert r.quality.failures[0].startswith("cosine_mean 0.99") and "< 0.9999999 (min_cosine_mean)" in r.quality.failures[0]
    assert "(min_cosine_min)" in r.quality.failures[1]
    assert r.quantization.recipe == "int8-dynamic-per-tensor-7bit-rowwise"
    assert r.quantization.details["float_nodes"] == []
    assert r.onnx_path.exists()  # the caller decides (--force) whether a failed model ships


def test_bad_requests_fail_early(tiny_bert, tmp_path):
    with pytest.raises(TaskNotSupported, match="no sequence-classification head"):
        _export(tiny_bert, tmp_path / "a", "cpu-x86-avx2", "text-classification")
    with pytest.raises(IncompatibleTarget, match="'int4' is not available for encoders"):
        _export(tiny_bert, tmp_path / "b", "cpu-x86-avx2", "embedding", recipe={"method": "int4"})
    with pytest.raises(IncompatibleTarget, match="needs a static-shape profile"):
        _export(tiny_bert, tmp_path / "c", "cpu-x86-avx2", "embedding", recipe={"method": "qdq-static"})
    npu = load_profile("npu-qnn-htp")
    long = npu.model_copy(update={"shapes": npu.shapes.model_copy(update={"sequence_length": 1024})})
    with pytest.raises(IncompatibleTarget, match="sequence_length 1024 but the model takes at most 128"):
        export_encoder(tiny_bert, tmp_path / "d", task="embedding", profile=long,
                       recipe=npu.task("embedding").quantization, thresholds=Thresholds())
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_restore_float_is_what_the_quantizer_would_write(tiny_bert, tmp_path):
    """The search's in-memory edit equals onnxruntime's nodes_to_exclude, output for output."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    r = _export(tiny_bert, tmp_path / "fp32", "cpu-x86-avx2", "embedding", recipe={"method": "none"})
    fp32 = onnx.load(str(r.onnx_path))
    names = mixed_precision.weight_matmuls(fp32)
    assert len(names) == 12
    kw = dict(per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
              extra_options={"MatMulConstBOnly": True})
    quantize_dynamic(str(r.onnx_path), str(tmp_path / "all.onnx"), **kw)
    quantize_dynamic(str(r.onnx_path), str(tmp_path / "two.onnx"), nodes_to_exclude=names[3:5], **kw)
    edited = mixed_precision.restore_float(onnx.load(str(tmp_path / "all.onnx")), fp32, names[3:5])
    assert Counter(n.op_type for n in edited.graph.node)["MatMulInteger"] == 10
    feeds = [dict(np.load(tmp_path / "fp32" / r.golden.inputs))]
    want = mixed_precision.run_model(str(tmp_path / "two.onnx"), feeds)[0]
    got = mixed_precision.run_model(edited, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # same graph up to node order
    with pytest.raises(ValueError, match="no producer"):
        mixed_precision.restore_float(onnx.load(str(tmp_path / "all.onnx")), _renamed_output(fp32, names[0]), names[:1])


def _renamed_output(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    node.output[0] = "elsewhere"
    return m


def test_metrics_and_text_files(tmp_path):
    ref = np.eye(3, dtype=np.float32)
    out = ref.copy()
    out[2] = [0, 1, 1]
    m = encoder_metrics("embedding", out, ref)
    assert m["cosine_min"] == pytest.approx(np.sqrt(0.5)) and m["cosine_mean"] == pytest.approx((2 + np.sqrt(0.5)) / 3)
    assert encoder_metrics("text-classification", out, ref)["label_agreement"] == pytest.approx(2 / 3)
    assert len(calibration.eval_texts()) >= 50 and len(calibration.calibration_texts()) >= 32
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": " two "}\n')
    assert calibration.load_texts(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(calibration.CalibrationError, match=r"bad.jsonl:2: no non-empty \"text\""):
        calibration.load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(calibration.CalibrationError, match="holds no text"):
        calibration.load_texts(tmp_path / "empty.txt")
    with pytest.raises(calibration.CalibrationError, match="not found"):
        calibration.load_texts(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory) -> tuple[EncoderResult, Path]:
    out = tmp_path_factory.mktemp("minilm") / "bundle"
    return _export(minilm_path(), out, "cpu-x86-avx2", "embedding", eval_texts=None), out


@pytest.mark.slow
def test_minilm_mixed_precision_meets_the_gate(minilm_int8):
    r, out = minilm_int8
    q = r.quantization.details
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quality.metrics["cosine_mean"] >= 0.995 and r.quality.metrics["cosine_min"] >= 0.98
    # the built-in English sentences and the mixed set (short, long, non-English, code), at batch 1, 8, 32
    assert r.quality.details["eval_texts"] == len(calibration.eval_texts()) + len(calibration.mixed_eval_texts())
    for size in ("1", "8", "32"):
        assert r.quality.details["batch_sizes"][size]["cosine_mean"] >= 0.995
        assert r.quality.details["batch_sizes"][size]["cosine_min"] >= 0.98
    assert r.quality.metrics["batch_cosine_min"] >= 0.999
    # found automatically: some MatMuls stay float, most are int8 (so it stays faster than fp32)
    assert q["matmuls"] == 36
    assert len(q["float_nodes"]) >= 1 and q["float_share_of_macs"] <= 0.34
    assert q["search_score"] > q["search_score_all_int8"]
    model = onnx.load(str(r.onnx_path))
    float_weight_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"
                            and n.input[1] in {i.name for i in model.graph.initializer}]
    assert sorted(float_weight_matmuls) == sorted(q["float_nodes"])
    assert _ops(r.onnx_path)["MatMulIntegerToFloat"] == 36 - len(q["float_nodes"])
    assert r.quantization.recipe == f"int8-dynamic-per-channel-7bit-rowwise-mixed-{len(q['float_nodes'])}float"  # AVX2: no VNNI
    assert q["reduce_range"] is True
    assert r.model_spec.config["dim"] == 384 and r.model_spec.config["pooling"] == "mean"
    assert r.size_bytes < 0.8 * r.size_fp32_bytes
    _check_golden(r, out)


def _fp32(tiny_bert: Path, tmp_path: Path) -> tuple[EncoderResult, onnx.ModelProto]:
    r = _export(tiny_bert, tmp_path / "fp32", "cpu-x86-avx2", "embedding", recipe={"method": "none"})
    return r, onnx.load(str(r.onnx_path))


def _alone_and_batched(model: onnx.ModelProto | Path, tokenizer_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A short sentence's vector alone, and in a padded batch beside a long, loud one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    short = "the pump stopped"
    loud = " ".join(["ALARM 9999 overflow !!"] * 8)
    encoded = [tok(texts, padding=True, truncation=True, max_length=64, return_tensors="np") for texts in ([short], [loud, short])]
    feeds = [{k: v.astype(np.int64) for k, v in enc.items()} for enc in encoded]
    alone, batched = mixed_precision.run_model(model if isinstance(model, onnx.ModelProto) else str(model), feeds)
    return alone[0], batched[1]


def test_per_row_activations_make_a_sentence_batch_invariant(tiny_bert, tmp_path):
    """A sentence alone and beside a long text: the same vector with per-row scales; not with per-tensor ones."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    r, fp32 = _fp32(tiny_bert, tmp_path)
    rows = quantize_rows(fp32, reduce_range=True)
    alone, batched = _alone_and_batched(rows, tmp_path / "fp32")
    moved = float(np.abs(batched - alone).max())
    assert moved < 1e-6  # float summation order over the padded length, nothing more
    quantize_dynamic(str(r.onnx_path), str(tmp_path / "per_tensor.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=True, op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    alone, batched = _alone_and_batched(tmp_path / "per_tensor.onnx", tmp_path / "fp32")
    assert np.abs(batched - alone).max() > 10 * max(moved, 1e-6)  # the test sees what per-row scales fix
    # structure: every weight MatMul on int8, 7-bit weights, q/k/v share their input's quantization
    ops = Counter(n.op_type for n in rows.graph.node)
    assert ops["MatMulIntegerToFloat"] == 12 and ops["QuantizeLinear"] == 2 * 4
    weights = [numpy_helper.to_array(i) for i in rows.graph.initializer if i.name.endswith(".rowq_int8")]
    assert len(weights) == 12 and all(w.dtype == np.int8 and np.abs(w).max() == 63 for w in weights)


def test_per_row_quantization_of_a_small_matmul():
    """Rows quantized alone, close to float; an all-zero row (a dead activation) gives zeros."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(w, "w")])
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 16)).astype(np.float32) * np.array([[1.0], [1000.0], [0.0]], np.float32)
    for per_channel in (True, False):  # 7-bit weights: this host may lack VNNI (int16 pairs saturate)
        y = mixed_precision.run_model(quantize_rows(fp32, per_channel=per_channel, reduce_range=True), [{"x": x}])[0]
        assert np.isfinite(y).all() and not y[2].any()
        for row in (0, 1):  # each row to ~1 % of its own size, whatever its neighbour's scale
            assert np.abs(y[row] - x[row] @ w).max() < 0.03 * np.abs(x[row] @ w).max()


def test_restore_float_on_the_per_row_graph(tiny_bert, tmp_path):
    """The search's in-memory edit of the per-row graph equals quantize_rows with those MatMuls excluded."""
    r, fp32 = _fp32(tiny_bert, tmp_path)
    names = mixed_precision.weight_matmuls(fp32)
    keep = [names[0], names[6]]  # a query (its input's quantization stays for k and v) and a layer-2 one
    edited = mixed_precision.restore_float(quantize_rows(fp32, reduce_range=True), fp32, keep)
    written = quantize_rows(fp32, exclude=keep, reduce_range=True)
    assert Counter(n.op_type for n in edited.graph.node) == Counter(n.op_type for n in written.graph.node)
    assert Counter(n.op_type for n in written.graph.node)["MatMulIntegerToFloat"] == 10
    feeds = [dict(np.load(tmp_path / "fp32" / r.golden.inputs))]
    np.testing.assert_allclose(mixed_precision.run_model(edited, feeds)[0], mixed_precision.run_model(written, feeds)[0],
                               rtol=1e-6, atol=1e-7)


def test_batch_gate_metrics_and_failure_line():
    ref = np.eye(4, dtype=np.float32)
    moved = ref.copy()
    moved[3] = [0, 0, 0.1, 1]  # one text's vector in a batch is not its vector alone
    m = layout_metrics("embedding", {1: ref, 8: moved}, ref)
    assert m["batch_cosine_min"] == pytest.approx(1 / np.sqrt(1.01))
    assert m["cosine_min"] == m["batch_cosine_min"] and m["cosine_mean"] < 1.0  # the worst layout counts
    failures = gate_failures(m, {"min_batch_cosine": 0.999})
    assert failures == [f"batch_cosine_min {m['batch_cosine_min']:.4f} < 0.999 (min_batch_cosine)"]
    assert "batch_cosine_min" not in layout_metrics("embedding", {1: ref}, ref)  # one layout: nothing to compare


@pytest.mark.slow
def test_gate_refuses_a_batch_variant_minilm(minilm_int8, tmp_path):
    """Per-tensor activation scales on the real MiniLM: the gate's batch check refuses them; the bundle passes it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    r, out = minilm_int8
    fp32 = _export(minilm_path(), tmp_path / "fp32", "cpu-x86-avx2", "embedding", recipe={"method": "none"},
                   eval_texts=calibration.mixed_eval_texts())
    quantize_dynamic(str(fp32.onnx_path), str(tmp_path / "per_tensor.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8, reduce_range=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=r.quantization.details["float_nodes"], extra_options={"MatMulConstBOnly": True})
    tok = AutoTokenizer.from_pretrained(out)
    texts = calibration.mixed_eval_texts()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    layouts = {size: _batched(tok, texts, names, size=size, seq_len=256) for size in (1, 8, 32)}
    reference = _run(fp32.onnx_path, layouts[1])
    variant = layout_metrics("embedding", {s: _run(tmp_path / "per_tensor.onnx", p) for s, p in layouts.items()},
                             reference)
    failures = gate_failures(variant, r.quality.thresholds)
    assert any(f.endswith("(min_batch_cosine)") for f in failures), variant
    shipped = layout_metrics("embedding", {s: _run(r.onnx_path, p) for s, p in layouts.items()}, reference)
    assert gate_failures(shipped, r.quality.thresholds) == [] and shipped["batch_cosine_min"] >= 0.999
