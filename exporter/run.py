"""`run_export(request)`: model in, signed bundle out, with the quality report; one tail for every pipeline.

Order matters: the request's options are checked when it is built; here the key, the output
directory, the model's task and architecture, the recipe against the target and the disk space
are checked before any weights are read. Then the chosen pipeline (exporter/pipelines/) builds
the model into a staging directory next to `out`; this module alone judges it (exporter.gate),
writes the golden files (exporter.golden), benchmarks it on this host, seals the stage and moves
it into `out`. Whatever fails, at any step, the stage and the scratch directory are removed: a
failure never leaves a half bundle, nor destroys the previous one. A failed gate writes nothing
unless the request says `force`; then the bundle is sealed with quality status failed-quality.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle import Benchmark, Manifest, QualityReport, QualityStatus, Target, Task, load_private_key, seal_bundle
from agent.bundle.signing import KeyError_
from exporter.errors import MissingKey, NotEnoughDisk, OutputNotEmpty, QualityGateFailed
from exporter.golden import write_golden
from exporter.progress import Progress
from exporter.quantize import free_bytes, model_size
from exporter.request import ExportRequest, bundle_name

DISK_MARGIN = 256 * 1024**2


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    report: QualityReport
    stats: dict[str, Any] = field(default_factory=dict)


def run_export(request: ExportRequest, *, progress: Progress | None = None) -> ExportResult:
    """Export `request.model` to a signed bundle in `request.out`.

    Raises QualityGateFailed (with the report) when the gate fails and `request.force` is not set;
    with `force` the bundle is written with quality status failed-quality.
    """
    from exporter.pipelines import plan
    from exporter.source import load_config, resolve_source

    t_start = time.perf_counter()
    progress = progress or Progress()
    private_key = load_key(Path(request.key))
    out = Path(request.out)
    check_output(out, overwrite=request.overwrite)
    with progress.step("resolve", str(request.model)):
        src = resolve_source(request.model, revision=request.revision, trust_remote_code=request.trust_remote_code,
                             adapter=request.adapter)
        config = load_config(src)
    pipeline, job = plan(request, src, config, progress)
    check_disk(out, pipeline.disk_bytes(job))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(out)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    try:
        built = pipeline.build(job, stage, work)
        shutil.rmtree(work, ignore_errors=True)
        report = built.evidence.judge()
        progress.note(f"quality {report.status.value}" + (f": {'; '.join(report.failures)}" if report.failures else ""))
        if report.status is QualityStatus.FAILED and not request.force:
            raise QualityGateFailed(gate_message(report), report=report)
        golden = write_golden(stage, built.golden)
        bench = Benchmark(metrics=built.measured)
        if request.benchmark and built.host_benchmark is not None:
            with progress.step("benchmark", f"{job.profile.intra_op_threads or 'all'} threads"):
                bench = built.host_benchmark()
        stats = {
            "fp32_bytes": built.fp32_bytes,
            "model_bytes": model_size(built.entry),
            "precision": built.quantization.precision,
            **built.stats,
            "export_seconds": round(time.perf_counter() - t_start, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "steps_seconds": dict(progress.timings),
        }
        if not built.measured:  # the host's figures; a pipeline's own (the NPU's) are in its stats already
            stats.update(bench.metrics)
            bench = Benchmark(host=bench.host, metrics={**bench.metrics, "export_seconds": stats["export_seconds"],
                                                        "export_peak_rss_mb": stats["peak_rss_mb"]})
        manifest = _seal(stage, private_key, job.profile, name=request.name or bundle_name(src.spec),
                         version=request.version, task=Task(job.task), model=built.model_spec,
                         quantization=built.quantization, quality=report, benchmark=bench, golden=golden,
                         source=src.describe())
        stats["bundle_bytes"] = manifest.total_size
        _publish(stage, out)
    except BaseException:  # nothing lost: no half bundle, the old one untouched
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(out, manifest, report, stats)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_key(path: Path) -> Any:
    try:
        return load_private_key(Path(path))
    except KeyError_ as exc:
        raise MissingKey(str(exc)) from None


def check_output(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputNotEmpty(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputNotEmpty(f"output directory {out} is not empty; pass --overwrite to replace it or choose another --out")


def check_disk(out: Path, need: int) -> None:
    free = free_bytes(out.parent)
    if free < need + DISK_MARGIN:
        raise NotEnoughDisk(
            f"not enough disk space next to {out}: {free / 1e9:.1f} GB free, the export needs about "
            f"{(need + DISK_MARGIN) / 1e9:.1f} GB (float32 ONNX + quantized copy); free space or choose another --out"
        )


def gate_message(report: QualityReport) -> str:
    return (
        f"quality gate failed: {'; '.join(report.failures)}. No bundle was written; "
        "choose a gentler recipe (e.g. --quant int8 or a smaller --block-size), relax the threshold "
        "(--threshold NAME=VALUE), or pass --force to write it marked failed-quality"
    )


def _staging(out: Path) -> Path:
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _publish(stage: Path, out: Path) -> None:
    """Move the sealed bundle into `out`; an old `out` is removed only after the move succeeded. Every file
    is on disk before the rename and the rename is on disk before the old bundle goes (agent/bundle/durable.py):
    a power cut leaves the old bundle or the whole new one, never a published bundle of empty files."""
    from agent.bundle.durable import fsync_dir, fsync_tree

    fsync_tree(stage)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _seal(stage: Path, private_key: Any, profile: Any, **fields: Any) -> Manifest:
    import onnxruntime

    from agent.bundle import Runtime

    return seal_bundle(
        stage,
        private_key=private_key,
        target=Target(profile=profile.name, arch=profile.arch, cpu_features=profile.cpu_features,
                      device_class=profile.device_class),
        runtime=Runtime(onnxruntime=profile.onnxruntime, execution_providers=profile.execution_providers,
                        intra_op_threads=profile.intra_op_threads or None),
        created_by=f"edgeship-export (onnxruntime {onnxruntime.__version__})",
        **fields,
    )
