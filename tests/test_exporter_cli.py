"""`edgeship export` as a user runs it: a real subprocess, exit codes, readable output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agent.bundle import QualityStatus, TrustedKeys, open_bundle
from tests.support.models import tiny_model


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "edgeship.cli", "export", *args], capture_output=True, text=True,
                          timeout=600, env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_help_lists_the_options():
    p = run("--help")
    assert p.returncode == 0
    for opt in ("--profile", "--quant", "--block-size", "--accuracy-level", "--adapter", "--eval-text", "--force",
                "--overwrite", "--threshold", "--revision", "--trust-remote-code", "--int4-algorithm", "--requantize"):
        assert opt in p.stdout


def test_local_directory_exports_with_no_network(tmp_path, keypair):
    """Not offline mode: the hub address points at a closed loopback port, so any call would fail."""
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(["Small models run on gateways at the edge of the network."] * 40))
    p = run(str(tiny_model("qwen2")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), "--quant", "int8",
            "--eval-text", str(text), "--name", "qwen-tiny", "--version", "2.1.0",
            env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode == 0, p.stderr
    m = open_bundle(tmp_path / "b", TrustedKeys.from_paths([keypair[1]])).manifest
    assert m.ref == "qwen-tiny@2.1.0" and m.quantization.precision == "int8"
    assert m.quality.status is QualityStatus.PASSED
    # progress per step on stderr, summary table on stdout
    for step in ("resolve", "load", "export", "quantize", "validate", "benchmark"):
        assert f"done {step}" in p.stderr
    for row in ("size fp32 ONNX", "top1_agreement", "decode", "peak RSS"):
        assert row in p.stdout


def test_two_pass_level_is_refused_outside_gguf_imports(tmp_path, keypair):
    """--accuracy-level 4x2 exists for exact GGUF imports only: anything else gets one line saying so, and no bundle;
    a level outside the choices is click's usage error."""
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), "--accuracy-level", "4x2")
    assert p.returncode != 0 and "--accuracy-level 4x2 (two-pass int8 decode) is for exact GGUF imports" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "b").exists()
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), "--accuracy-level", "5")
    assert p.returncode == 2 and "'5' is not one of" in p.stderr


def test_gate_failure_exits_1_with_a_readable_report_and_no_bundle(tmp_path, keypair):
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]),
            "--threshold", "min_logits_cosine=0.999999", "--threshold", "max_logits_abs_diff=1e-9", "--no-benchmark")
    assert p.returncode == 1
    assert "quality gate failed: " in p.stderr
    assert "logits_abs_diff" in p.stderr and "FAIL" in p.stderr
    assert not (tmp_path / "b").exists()


def test_force_exits_0_and_marks_the_bundle_failed_quality(tmp_path, keypair):
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), "--json",
            "--threshold", "max_logits_abs_diff=1e-9", "--force", "--no-benchmark")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["manifest"]["quality"]["status"] == "failed-quality"
    assert out["stats"]["peak_rss_mb"] > 0
    assert open_bundle(tmp_path / "b", TrustedKeys.from_paths([keypair[1]])).manifest.quality.status is \
        QualityStatus.FAILED


def test_json_stdout_is_only_the_document_when_a_native_library_writes_to_it(tmp_path):
    """QNN's HTP backend prints a line on file descriptor 1 while it loads: --json still prints one JSON line."""
    code = (
        "import os, sys\n"
        "import exporter.run\n"
        "from exporter.errors import ExportError\n"
        "def noisy(request, progress=None):\n"
        "    os.write(1, b' # LIBNATIVE: a native library on fd 1\\n')\n"
        "    print('a print from Python')\n"
        "    raise ExportError('the export failed')\n"
        "exporter.run.run_export = noisy\n"
        "from exporter.cli import cli\n"
        "cli(sys.argv[1:])\n"
    )
    p = subprocess.run([sys.executable, "-c", code, "org/name", "--out", str(tmp_path / "b"), "--key",
                        str(tmp_path / "k.key"), "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stdout.splitlines() == [json.dumps({"ok": False, "error": "the export failed"})]
    assert "LIBNATIVE" in p.stderr and "a print from Python" in p.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "cpu-riscv"], "unknown target profile 'cpu-riscv'"),
        (["--key", "/nonexistent/x.key"], "create one with: edgeship keys generate"),
        (["--profile", "npu-qnn-htp", "--quant", "int4"], "does not run on target 'npu-qnn-htp'"),
        (["--threshold", "min_vibes=0.5"], "unknown threshold 'min_vibes'"),
        (["--block-size", "48"], "--block-size 48 must be a power of two"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, keypair):
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), *args)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert not (tmp_path / "b").exists()


def test_non_empty_out_needs_overwrite(tmp_path, keypair):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("x")
    p = run(str(tiny_model("llama")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]))
    assert p.returncode == 2 and "pass --overwrite" in p.stderr
    assert (tmp_path / "b" / "old").exists()


def test_encoder_checkpoints_go_through_the_same_command(tmp_path, keypair):
    """The task comes from the checkpoint (BertModel -> embedding); exporter.pipelines.encoder builds, the core seals."""
    p = run(str(tiny_model("bert")), "--out", str(tmp_path / "b"), "--key", str(keypair[0]), "--json")
    assert p.returncode == 0, p.stderr
    m = open_bundle(tmp_path / "b", TrustedKeys.from_paths([keypair[1]])).manifest
    assert m.task.value == "embedding" and m.model.outputs == ["sentence_embedding"]
    assert m.quality.status is QualityStatus.PASSED and m.benchmark.metrics["latency_ms"] > 0
    # the device's embedding runtime gives a text the same vector alone and batched beside a longer one
    from agent.runtime import load_model

    assert "-rowwise" in m.quantization.recipe and m.quality.metrics["batch_cosine_min"] >= 0.999
    model = load_model(open_bundle(tmp_path / "b", TrustedKeys.from_paths([keypair[1]])), threads=1)
    alone = model.embed(["the pump stopped"])[0]
    batched = model.embed(["ALARM 9999 overflow on line 7, pressure 14.2 bar and rising fast", "the pump stopped"])[1]
    np.testing.assert_allclose(batched, alone, atol=1e-6)
