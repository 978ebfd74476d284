"""The npu-qnn-htp path on the real QNN HTP backend (onnxruntime-qnn's x86_64 simulator), CPU fallback off."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.bundle import QualityStatus
from agent.runtime.qnn import QnnUnavailable, plugin_options, qnn_devices, qnn_session_options, register_qnn_ep
from exporter import calibration, npu
from exporter.pipelines.encoder import EncoderResult, export_encoder
from exporter.profiles import load_profile
from tests.support.models import minilm_path, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROFILE = "npu-qnn-htp"


def _export(model: Path, out: Path, task: str, *, texts: int, **kw) -> EncoderResult:
    prof = load_profile(PROFILE)
    s = prof.task(task)
    return export_encoder(model, out, task=task, profile=prof, recipe=s.quantization, thresholds=s.thresholds,
                          eval_texts=calibration.eval_texts()[:texts], **kw)


@pytest.fixture(scope="module")
def tiny_npu(tmp_path_factory) -> tuple[EncoderResult, Path]:
    out = tmp_path_factory.mktemp("npu") / "bundle"
    return _export(tiny_model("bert"), out, "embedding", texts=12, ep_context=True), out


def _strict_session(path: Path) -> ort.InferenceSession:
    opts = {**npu.DEFAULT_PROVIDER_OPTIONS, **load_profile(PROFILE).execution_providers[0].options}
    return ort.InferenceSession(str(path), sess_options=qnn_session_options(cpu_fallback=False, provider_options=opts))


def test_qnn_plugin_registration():
    register_qnn_ep()
    register_qnn_ep()  # idempotent
    assert qnn_devices()[0].ep_name == "QNNExecutionProvider"
    opts = plugin_options({"backend_type": "htp", "htp_performance_mode": "burst"})
    assert opts["backend_path"].endswith("libQnnHtp.so") and "backend_type" not in opts
    with pytest.raises(QnnUnavailable, match="backend_type 'gpu' is not supported here; use 'htp'"):
        plugin_options({"backend_type": "gpu"})


def test_tiny_embedding_runs_on_htp_with_cpu_fallback_off(tiny_npu):
    r, out = tiny_npu
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quality.details["measured_on"].startswith("QNN HTP")
    qnn = r.quantization.details["qnn"]
    assert qnn["ok"] and qnn["rejected_nodes"] == [] and qnn["error"] is None
    assert r.quality.metrics["cosine_mean"] >= 0.98 and r.quality.metrics["cosine_min"] >= 0.95
    # static QDQ: uint16 activations, uint8 weights, fixed [1, 128] inputs
    model = onnx.load(str(r.onnx_path))
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == [[1, 128]] * 3
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 20 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    inits = {i.name: i for i in model.graph.initializer}
    zp_types = Counter(inits[n.input[2]].data_type for n in model.graph.node
                       if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits
                       and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.UINT8)
    assert zp_types[onnx.TensorProto.UINT8] > 0  # weights stored as uint8
    act_zp = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert act_zp == {onnx.TensorProto.UINT16}
    assert r.quantization.details["activation_type"] == "uint16" and r.quantization.details["weight_type"] == "uint8"
    assert r.model_spec.config["static_shapes"] is True and r.model_spec.config["max_length"] == 128
    # the golden outputs hold on the CPU EP (the agent's fallback) and on HTP itself
    feeds = dict(np.load(out / r.golden.inputs))
    want = np.load(out / r.golden.outputs)["sentence_embedding"]
    cpu = ort.InferenceSession(str(r.onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(cpu, want, atol=r.golden.atol / 2, rtol=r.golden.rtol)
    htp = _strict_session(r.onnx_path).run(None, feeds)[0]
    np.testing.assert_allclose(htp, want, atol=r.golden.atol, rtol=r.golden.rtol)


def test_ep_context_binary_skips_compilation(tiny_npu):
    r, out = tiny_npu
    ctx = out / r.model_spec.config["ep_context"]
    assert ctx in r.files and ctx.stat().st_size > 0
    nodes = onnx.load(str(ctx)).graph.node
    assert [n.op_type for n in nodes] == ["EPContext"]
    feeds = dict(np.load(out / r.golden.inputs))
    from_ctx = _strict_session(ctx).run(None, feeds)[0]
    direct = _strict_session(r.onnx_path).run(None, feeds)[0]
    np.testing.assert_allclose(from_ctx, direct, atol=1e-6)


def test_rejected_nodes_are_named_with_the_reason(tiny_npu):
    """With graph-output dequantization offloaded (onnxruntime's default) HTP refuses the last DQ."""
    r, out = tiny_npu
    feeds = [dict(np.load(out / r.golden.inputs))]
    report = npu.verify_on_qnn(r.onnx_path, feeds, provider_options={"offload_graph_io_quantization": "1"})
    assert not report.ok and report.outputs == []
    assert report.rejected == [{"name": "sentence_embedding_DequantizeLinear", "op_type": "DequantizeLinear"}]
    assert report.reasons == ["DequantizeLinear sentence_embedding_DequantizeLinear: "
                              "QNN EP is configured to not take DQ nodes that generate a graph output."]
    assert report.summary() == "QNN HTP rejected 1 node(s): DequantizeLinear x1"


def test_tiny_classifier_on_htp(tmp_path):
    r = _export(tiny_model("bert", num_labels=3), tmp_path / "cls", "text-classification", texts=8)
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quantization.details["qnn"]["ok"]
    assert r.quality.metrics["label_agreement"] >= 0.9
    assert r.model_spec.config["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]


@pytest.mark.slow
def test_minilm_on_htp_matches_pytorch(tmp_path):
    """Real all-MiniLM-L6-v2 on the HTP simulator (seconds per call, so a few sentences)."""
    r = _export(minilm_path(), tmp_path / "minilm", "embedding", texts=4)
    assert r.quality.status is QualityStatus.PASSED, r.quality.failures
    assert r.quantization.details["qnn"]["rejected_nodes"] == []
    assert r.quality.metrics["cosine_mean"] >= 0.98 and r.quality.metrics["cosine_min"] >= 0.95
    assert r.model_spec.config["dim"] == 384
