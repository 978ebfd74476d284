"""run_export: the one tail every pipeline shares (gate, --force, golden files, seal, publish), and nothing
lost on failure: no half bundle, no staging or scratch directory, an older bundle in --out untouched.

A small honest pipeline (same three names as exporter/pipelines/*) stands in where the test is about the
tail, not the model; the last test runs the real encoder pipeline through the same tail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import ModelSpec, QualityStatus, Quantization, open_bundle
from exporter import pipelines
from exporter.errors import ConversionError, QualityGateFailed
from exporter.gate import Evidence
from exporter.golden import GoldenCase
from exporter.request import ExportRequest
from exporter.run import run_export
from tests.support.models import tiny_model

LIMITS = {"min_top1_agreement": 0.9}


class StubPipeline:
    """Writes a model file into the stage and scratch into `work`, then fails with `error` or returns a Built
    whose top-1 agreement is `top1`."""

    NAME = "stub"

    def __init__(self, *, top1: float = 1.0, error: BaseException | None = None):
        self.top1, self.error = top1, error

    def disk_bytes(self, job: pipelines.Job) -> int:
        return 1024

    def build(self, job: pipelines.Job, stage: Path, work: Path) -> pipelines.Built:
        work.mkdir(parents=True, exist_ok=True)
        (work / "model.fp32.onnx").write_bytes(b"\0" * 64)
        (stage / "model.onnx").write_bytes(b"\1" * 32)
        if self.error is not None:
            raise self.error
        return pipelines.Built(
            entry=stage / "model.onnx",
            model_spec=ModelSpec(entry="model.onnx", inputs=["input_ids"], outputs=["logits"], architecture="llama",
                                 config={}),
            quantization=Quantization(recipe="fp32", precision="fp32"),
            evidence=Evidence({"top1_agreement": self.top1}, LIMITS, "stub reference", {"texts": 1}),
            golden=GoldenCase({"input_ids": np.arange(4)}, {"logits": np.ones((1, 4))}, atol=1e-3, rtol=1e-3),
            fp32_bytes=64,
        )


@pytest.fixture
def stub(monkeypatch):
    """Route run_export to a StubPipeline (the job is the real plan's, for a tiny llama)."""
    real = pipelines.plan
    chosen = StubPipeline()

    def plan(*args):
        return chosen, real(*args)[1]

    monkeypatch.setattr(pipelines, "plan", plan)
    return chosen


def _request(tmp_path: Path, keypair, **options) -> ExportRequest:
    return ExportRequest(model=tiny_model("llama"), out=tmp_path / "b", key=keypair[0], benchmark=False, **options)


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_the_bundle_is_on_disk_before_it_is_published(tmp_path, keypair, stub, monkeypatch):
    """fsync spy: every file of the sealed stage is synced before the rename makes it the bundle, and the
    directory holding the rename after it (a power cut never leaves a published bundle of empty files)."""
    import os

    from agent.bundle import durable

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                           real_fsync(fd))[1])
    monkeypatch.setattr("exporter.run.os.replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    result = run_export(_request(tmp_path, keypair))
    renamed = events.index(("replace", str(result.bundle)))
    synced = {Path(path).name for kind, path in events[:renamed] if kind == "fsync"}
    assert {p.name for p in result.bundle.rglob("*") if p.is_file()} <= synced
    assert ("fsync", str(tmp_path)) in events[renamed:]


def test_a_failing_gate_keeps_the_older_bundle_and_leaves_no_trace(tmp_path, keypair, trusted, stub):
    first = run_export(_request(tmp_path, keypair, version="1.0.0"))
    assert first.report.status is QualityStatus.PASSED
    before = {p.name: p.read_bytes() for p in first.bundle.rglob("*") if p.is_file()}
    stub.top1 = 0.5
    with pytest.raises(QualityGateFailed) as info:
        run_export(_request(tmp_path, keypair, version="2.0.0", overwrite=True))
    assert info.value.report.failures == ["top1_agreement 0.5000 < 0.9 (min_top1_agreement)"]
    assert "--force" in str(info.value)
    assert {p.name: p.read_bytes() for p in first.bundle.rglob("*") if p.is_file()} == before
    assert open_bundle(first.bundle, trusted).manifest.version == "1.0.0"
    assert _leftovers(tmp_path) == []


def test_force_seals_the_refused_bundle_marked_failed_quality(tmp_path, keypair, trusted, stub):
    stub.top1 = 0.5
    result = run_export(_request(tmp_path, keypair, force=True))
    m = open_bundle(result.bundle, trusted).manifest  # signature and every file's hash verified
    assert m.quality.status is QualityStatus.FAILED and m.quality.thresholds == LIMITS
    assert m.quality.failures == ["top1_agreement 0.5000 < 0.9 (min_top1_agreement)"]
    golden = dict(np.load(result.bundle / m.golden.inputs))
    assert golden["input_ids"].tolist() == [0, 1, 2, 3] and m.golden.atol == 1e-3
    assert result.stats["fp32_bytes"] == 64 and result.stats["model_bytes"] == 32
    assert "export_seconds" in m.benchmark.metrics and _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ConversionError("the graph could not be built"), KeyboardInterrupt()])
def test_any_failure_inside_a_pipeline_removes_its_stage_and_scratch(tmp_path, keypair, stub, error):
    stub.error = error
    with pytest.raises(type(error)):
        run_export(_request(tmp_path, keypair))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_encoder_pipeline_shares_the_tail_and_force_keeps_its_refused_bundle(tmp_path, keypair, trusted):
    """The real encoder pipeline, judged by the same gate as the LMs: an impossible bound fails it, and with
    force the bundle is written, marked failed-quality, with its golden and tokenizer files."""
    result = run_export(ExportRequest(model=tiny_model("bert"), out=tmp_path / "forced", key=keypair[0],
                                      task="embedding", benchmark=False, force=True,
                                      thresholds={"min_cosine_mean": 0.9999999}))
    m = open_bundle(result.bundle, trusted).manifest
    assert m.quality.status is QualityStatus.FAILED
    assert m.quality.failures[0].startswith("cosine_mean 0.99") and "(min_cosine_mean)" in m.quality.failures[0]
    assert (result.bundle / m.golden.outputs).exists() and (result.bundle / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forced"]
