"""The agent serves an npu-qnn-htp bundle: real all-MiniLM-L6-v2 exported by exporter.export, run on the
QNN HTP backend (onnxruntime-qnn's x86_64 simulator, CPU fallback off) through /v1/embeddings, with
static [1, 128] inputs, compared with a CPU float32 bundle of the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.api import ApiServer
from agent.bundle import open_bundle
from agent.runtime import InputError, ModelHost, load_model
from exporter import export
from exporter.profiles import load_profile
from tests.support.models import minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow  # exports the real MiniLM twice (about 50 s on 2 cores)
PROFILE = "npu-qnn-htp"
MODEL = "minilm-npu"
EVAL = ["The cat sat on the mat.",
        "Edge devices run small language models close to the data they describe.",
        "A firmware update failed on the third gateway and was rolled back within a minute."]
# three lengths, none of them the evaluation text; a call takes seconds in the simulator, so few
TEXTS = ["Fleet rollout paused.",
         "The sensor on line three reports a temperature of 81 degrees, well above the limit set for the night shift.",
         "How do I reset the gateway to factory settings without losing its enrolment certificate?"]
LONG = "the pump on line three vibrates " * 30  # about 200 tokens, over the bundle's 128


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keypair) -> dict[str, Path]:
    """MiniLM exported for the NPU (static QDQ, verified on HTP) and as a CPU float32 reference."""
    d = tmp_path_factory.mktemp("npu-agent")
    (d / "eval.txt").write_text("\n".join(EVAL) + "\n")
    common = dict(key=keypair[0], task="embedding", eval_text=d / "eval.txt", benchmark=False)
    npu = export(minilm_path(), out=d / "npu", profile=PROFILE, name=MODEL, **common)
    ref = export(minilm_path(), out=d / "fp32", profile="cpu-x86-avx2", quant="none", name="minilm-fp32",
                 **common)
    return {"npu": npu.bundle, "fp32": ref.bundle}


@pytest.fixture(scope="module")
def npu_model(bundles, trusted):
    model = load_model(open_bundle(bundles["npu"], trusted))
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(bundles, trusted):
    model = load_model(open_bundle(bundles["fp32"], trusted))
    yield model
    model.close()


@pytest.fixture(scope="module")
def client(npu_model):
    server = ApiServer(ModelHost(npu_model), port=0, queue_size=4, request_timeout_s=120)
    server.start()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop(1)


def test_npu_bundle_runs_on_qnn_htp_with_cpu_fallback_off(npu_model):
    assert npu_model.execution_provider == "QNNExecutionProvider" and npu_model.provider_notes == ()
    options = npu_model.session.get_provider_options()["QNNExecutionProvider"]
    assert options["backend_path"].endswith("libQnnHtp.so")
    assert options["offload_graph_io_quantization"] == "0"
    assert npu_model.session.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    config = npu_model.manifest.model.config
    assert config["static_shapes"] is True and config["max_length"] == 128
    assert (npu_model.fixed_batch, npu_model.fixed_length, npu_model.max_length) == (1, 128, 128)


def test_ep_named_by_the_agent_config_keeps_the_bundles_options(bundles, trusted):
    model = load_model(open_bundle(bundles["npu"], trusted), providers=["QNNExecutionProvider"])
    try:
        assert model.execution_provider == "QNNExecutionProvider"
        assert model.session.get_provider_options()["QNNExecutionProvider"]["htp_performance_mode"] == "burst"
    finally:
        model.close()


def test_static_padding_is_what_the_exporter_fed(npu_model, bundles):
    """One text per call, padded to 128 with mask 0; identical to the exporter's golden inputs."""
    ids = npu_model.token_ids([EVAL[0], *TEXTS])
    feeds = list(npu_model.batches(ids))
    assert len(feeds) == 4 and all(real == 1 for _, real in feeds)
    for (feed, _), seq in zip(feeds, ids):
        assert {k: v.shape for k, v in feed.items()} == {k: (1, 128) for k in ("input_ids", "attention_mask",
                                                                              "token_type_ids")}
        assert feed["input_ids"][0, : len(seq)].tolist() == seq
        assert feed["attention_mask"][0].tolist() == [1] * len(seq) + [0] * (128 - len(seq))
        assert not feed["input_ids"][0, len(seq):].any() and not feed["token_type_ids"].any()
    golden = dict(np.load(bundles["npu"] / "golden" / "inputs.npz"))
    for name, value in feeds[0][0].items():
        np.testing.assert_array_equal(value, golden[name])


def test_embeddings_api_on_the_npu_match_the_cpu_float32_reference(client, reference):
    assert client.get("/readyz").json()["execution_provider"] == "QNNExecutionProvider"
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    want = reference.embed(TEXTS)
    assert reference.execution_provider == "CPUExecutionProvider" and not reference.static
    assert got.shape == want.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    limits = load_profile(PROFILE).task("embedding").thresholds
    assert cosine.mean() >= limits.min_cosine_mean and cosine.min() >= limits.min_cosine_min, cosine
    assert r.json()["usage"]["prompt_tokens"] == reference.tokens(TEXTS)


def test_over_long_input_is_refused_naming_the_limit(client, npu_model):
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": [TEXTS[0], LONG]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert error["message"].startswith("input[1] is ") and "at most 128 tokens per input" in error["message"]
    with pytest.raises(InputError, match="at most 128 tokens"):
        npu_model.embed([LONG])
    cut = npu_model.token_ids([LONG], truncate=True)[0]  # opt-in truncation keeps [CLS] ... [SEP]
    assert len(cut) == 128 and cut[0] == npu_model.codec.token_id("[CLS]") and cut[-1] == npu_model.codec.token_id("[SEP]")


def test_without_the_qnn_plugin_the_agent_falls_back_to_cpu_and_says_so(bundles, keypair, npu_model):
    """A fresh process where onnxruntime_qnn cannot be imported: CPU EP, the reason kept and logged."""
    child = (
        "import json, logging, sys\n"
        "sys.modules['onnxruntime_qnn'] = None  # as if onnxruntime-qnn were not installed\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stderr)\n"
        "from agent.bundle import TrustedKeys, open_bundle\n"
        "from agent.runtime import load_model\n"
        "m = load_model(open_bundle(sys.argv[1], TrustedKeys.from_paths([sys.argv[2]])))\n"
        "print(json.dumps({'ep': m.execution_provider, 'notes': m.provider_notes,\n"
        "                  'vector': m.embed([sys.argv[3]])[0].tolist()}))\n"
    )
    run = subprocess.run([sys.executable, "-c", child, str(bundles["npu"]), str(keypair[1]), TEXTS[0]],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["ep"] == "CPUExecutionProvider"
    assert out["notes"] == ["QNNExecutionProvider: registering the QNN plugin failed: the QNN execution "
                            "provider needs the onnxruntime-qnn package: pip install onnxruntime-qnn"]
    assert "runs on CPUExecutionProvider; skipped: QNNExecutionProvider: registering the QNN plugin failed" in run.stderr
    # the same static QDQ graph on the CPU EP: the same padding, so nearly the NPU's numbers
    htp = npu_model.embed(TEXTS[:1])[0]
    assert float(np.dot(htp, out["vector"])) > 0.99


def test_compiled_ep_context_is_what_the_agent_loads_on_the_npu(tmp_path, keypair, trusted):
    """--ep-context puts the HTP-compiled graph in the bundle; the agent runs it on QNN (no compile at start)
    with the same embeddings as the entry graph, and only NPU encoder exports accept the flag."""
    import numpy as np

    from exporter.errors import IncompatibleTarget
    from tests.support.models import tiny_model

    common = dict(key=keypair[0], task="embedding", benchmark=False, profile=PROFILE)
    compiled = export(tiny_model("bert"), out=tmp_path / "ctx", ep_context=True, **common)
    assert compiled.manifest.model.config["ep_context"] == "model_ctx.onnx"
    plain = export(tiny_model("bert"), out=tmp_path / "plain", **common)
    texts = ["the capital of france is paris", "edge"]
    got = {}
    for name, result in (("ctx", compiled), ("plain", plain)):
        model = load_model(open_bundle(result.bundle, trusted))
        try:
            assert model.execution_provider == "QNNExecutionProvider"
            assert Path(model.model_file).name == ("model_ctx.onnx" if name == "ctx" else "model.onnx")
            got[name] = model.embed(texts)
        finally:
            model.close()
    np.testing.assert_allclose(got["ctx"], got["plain"], atol=1e-5)
    with pytest.raises(IncompatibleTarget, match="drop --ep-context"):
        export(tiny_model("bert"), out=tmp_path / "cpu", key=keypair[0], task="embedding", profile="cpu-x86-avx2",
               ep_context=True, benchmark=False)
