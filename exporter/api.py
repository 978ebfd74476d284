"""`exporter.export(...)`: model in, signed bundle out, with the quality report.

Order matters: everything that can be checked cheaply (profile, key, output directory, task,
architecture, target/precision, disk space) is checked before any weights are read. The bundle
is built in a staging directory next to `out` and moved into place only when it is complete and
sealed, so a failure never leaves a half bundle (nor destroys the previous one).
"""

from __future__ import annotations

import gc
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle import (
    Benchmark,
    Manifest,
    ModelSpec,
    QualityReport,
    QualityStatus,
    Runtime,
    Target,
    Task,
    load_private_key,
    seal_bundle,
)
from agent.bundle.signing import KeyError_
from exporter.errors import (
    ExportError,
    IncompatibleTarget,
    MissingKey,
    NotEnoughDisk,
    OutputNotEmpty,
    QualityGateFailed,
    SourceError,
    TaskNotSupported,
)
from exporter.gguf.levels import TWO_PASS, TWO_PASS_POLICY
from exporter.profiles import QuantRecipe, TargetProfile, Thresholds, load_profile
from exporter.progress import Progress
from exporter.quantize import QUANT_CHOICES, check_target, free_bytes, model_size, quantize, recipe_name
from exporter.source import ResolvedSource, infer_task, load_config, resolve_source

TASKS = ("text-generation", "embedding", "text-classification")
DISK_MARGIN = 256 * 1024**2


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    report: QualityReport
    stats: dict[str, Any] = field(default_factory=dict)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bundle_name(spec: str) -> str:
    stem = Path(spec.rstrip("/")).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return (name or "model")[:64]


def build_recipe(
    base: QuantRecipe,
    *,
    quant: str | None,
    block_size: int | None,
    accuracy_level: int | None,
    symmetric: bool | None,
    exclude: list[str] | None,
    algorithm: str | None = None,
) -> QuantRecipe:
    """The profile's recipe with the user's flags on top."""
    update: dict[str, Any] = {}
    if quant is not None:
        if quant not in QUANT_CHOICES:
            raise ExportError(f"unknown --quant {quant!r}; choose one of: {', '.join(QUANT_CHOICES)}")
        update["method"] = QUANT_CHOICES[quant]
        if update["method"] != base.method and exclude is None and update["method"] in ("int4", "int8-dynamic"):
            update["exclude"] = base.exclude or ["lm_head"]
    if block_size is not None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ExportError(f"--block-size {block_size} must be a power of two >= 16 (e.g. 32, 64, 128)")
        update["block_size"] = block_size
    if accuracy_level is not None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"--accuracy-level {accuracy_level} must be 0-4 (0 exact, 4 int8 activations)")
        update["accuracy_level"] = accuracy_level
    if symmetric is not None:
        update["symmetric"] = symmetric
    if exclude is not None:
        update["exclude"] = list(exclude)
    if algorithm is not None:
        if algorithm not in ("rtn", "hqq"):
            raise ExportError(f"unknown int4 algorithm {algorithm!r}; choose rtn or hqq")
        update["algorithm"] = algorithm
    return base.model_copy(update=update)


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


def estimate_parameters(config: Any) -> int:
    """Parameter count from the config alone (meta tensors, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_disk(out: Path, need: int) -> None:
    free = free_bytes(out.parent)
    if free < need + DISK_MARGIN:
        raise NotEnoughDisk(
            f"not enough disk space next to {out}: {free / 1e9:.1f} GB free, the export needs about "
            f"{(need + DISK_MARGIN) / 1e9:.1f} GB (float32 ONNX + quantized copy); free space or choose another --out"
        )


def export(
    model: str | Path,
    *,
    out: str | Path,
    key: str | Path,
    profile: str | Path | TargetProfile = "cpu-x86-avx2",
    task: str | None = None,
    quant: str | None = None,
    block_size: int | None = None,
    accuracy_level: int | str | None = None,
    symmetric: bool | None = None,
    exclude: list[str] | None = None,
    algorithm: str | None = None,
    thresholds: dict[str, float] | None = None,
    force: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    version: str = "1.0.0",
    revision: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
    eval_text: str | Path | None = None,
    calibration_text: str | Path | None = None,
    requantize: bool = False,
    graph: str = "auto",
    ep_context: bool = False,
    benchmark: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Export `model` (hub id, local directory or .gguf file) to a signed bundle in `out`.

    Raises QualityGateFailed (with the report) when the gate fails and `force` is not set;
    with `force` the bundle is written with quality status failed-quality.
    """
    from exporter.quality import merge_thresholds

    t_start = time.perf_counter()
    progress = progress or Progress()
    prof = profile if isinstance(profile, TargetProfile) else load_profile(profile)
    private_key = load_key(Path(key))
    out = Path(out).expanduser().resolve()
    check_output(out, overwrite=overwrite)
    if task is not None and task not in TASKS:
        raise TaskNotSupported(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")

    with progress.step("resolve", str(model)):
        src = resolve_source(model, revision=revision, trust_remote_code=trust_remote_code, adapter=adapter)
        config = load_config(src)
    natural = infer_task(config) if task is None or task == "text-generation" else task
    task = task or natural
    settings = prof.task(task)
    # GGUF weights sit on an affine grid with float offsets, which HQQ refits almost exactly
    int4_algorithm = "hqq" if algorithm is None and src.gguf_file and requantize else algorithm
    if accuracy_level == TWO_PASS and not (src.gguf_file and not requantize and task == "text-generation"):
        raise ExportError(f"--accuracy-level {TWO_PASS} (two-pass int8 decode) is for exact GGUF imports of text-generation "
                          "models; use 0-4 here")
    recipe = build_recipe(settings.quantization, quant=quant, block_size=block_size,
                          accuracy_level=None if accuracy_level == TWO_PASS else accuracy_level, symmetric=symmetric,
                          exclude=exclude, algorithm=int4_algorithm)
    check_target(recipe, device_class=prof.device_class, profile=prof.name, task=task)
    if ep_context and (prof.device_class != "npu" or task == "text-generation"):
        raise IncompatibleTarget(f"--ep-context writes the compiled NPU binary of an encoder; {task} on target "
                                 f"{prof.name} ({prof.device_class}) has none: drop --ep-context")
    limits = merge_thresholds(settings.thresholds, thresholds)
    common = dict(out=out, private_key=private_key, profile=prof, recipe=recipe, thresholds=limits, force=force,
                  name=name or bundle_name(src.spec), version=version, progress=progress,
                  t_start=t_start)

    if task == "text-generation":
        if natural != "text-generation":
            raise TaskNotSupported(
                f"{src.spec} is a {config.model_type} model for {natural} "
                f"({', '.join(config.architectures or [])}); it cannot do text-generation; use --task {natural}"
            )
        if prof.device_class == "npu":  # static-shape graph with a host-side KV cache (exporter/npu_lm.py)
            return _export_lm_npu(src, config, eval_text=eval_text, calibration_text=calibration_text, **common)
        from exporter.lm import check_architecture

        check_architecture(config)
        if src.gguf_file and not requantize:
            if adapter is not None:
                raise ExportError(
                    f"an adapter cannot be merged into {src.gguf_file}'s quantized blocks; add --requantize "
                    "to dequantize the GGUF, merge the adapter and quantize again"
                )
            if quant is not None or block_size is not None or algorithm is not None:
                raise ExportError(
                    f"{src.gguf_file} is imported with its own GGUF quantization; add --requantize to "
                    "dequantize it and apply --quant/--block-size/--int4-algorithm instead"
                )
            return _export_gguf_exact(src, config, eval_text=eval_text, benchmark=benchmark,
                                      accuracy_level=accuracy_level, **common)
        return _export_lm(src, config, eval_text=eval_text, benchmark=benchmark,
                          graph=choose_graph(config, prof, graph, progress), **common)
    if adapter is not None:
        raise TaskNotSupported(f"--adapter is supported for text-generation only, not for {task}")
    if src.gguf_file:
        raise TaskNotSupported(f"GGUF files are exported as text-generation models, not {task}")
    return _export_encoder(src, config, task=task, eval_text=eval_text, calibration_text=calibration_text,
                           ep_context=ep_context, benchmark=benchmark, **common)


def choose_graph(config: Any, profile: TargetProfile, graph: str, progress: Progress) -> str:
    """"native" (edgeship's GroupQueryAttention graph) or "optimum" for this model and target."""
    from exporter.lm import check_architecture
    from exporter.pipelines.native_lm import supported

    if graph not in ("auto", "native", "optimum"):
        raise ExportError(f"--graph {graph!r}: choose auto, native or optimum")
    why_not = supported(config)
    if why_not is None and profile.device_class != "cpu":
        why_not = f"target {profile.name} is {profile.device_class}; the fused float32 graph is for CPU targets"
    if why_not is None and graph != "optimum":
        return "native"
    if graph == "native":
        raise ExportError(f"--graph native: {why_not}; use --graph optimum")
    check_architecture(config, optimum=True)
    if graph == "auto":
        progress.note(f"optimum graph: {why_not}")
    return "optimum"


def _staging(out: Path) -> Path:
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _publish(stage: Path, out: Path) -> None:
    """Move the sealed bundle into `out`; an old `out` is removed only after the move succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_lm(
    src: ResolvedSource,
    config: Any,
    *,
    out: Path,
    private_key: Any,
    profile: TargetProfile,
    recipe: QuantRecipe,
    thresholds: Thresholds,
    force: bool,
    name: str,
    version: str,
    progress: Progress,
    t_start: float,
    eval_text: str | Path | None,
    benchmark: bool,
    graph: str = "optimum",
) -> ExportResult:
    from exporter import lm, quality
    from exporter.pipelines import native_lm as native
    from exporter.source import load_causal_lm, load_tokenizer, write_tokenizer

    text = quality.read_texts(Path(eval_text) if eval_text else None)
    params = estimate_parameters(config)
    check_disk(out, params * 4 * 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(out)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    try:
        with progress.step("load", f"{config.model_type}, {params / 1e6:,.1f}M parameters"):
            model = load_causal_lm(src)
            tokenizer = load_tokenizer(src)
        max_context = profile.shapes.max_context
        with progress.step("reference", "PyTorch float32 on the evaluation text"):
            ref = quality.lm_reference(model, tokenizer, text, max_context=max_context)
        recipe = recipe.model_copy(update={"exclude": lm.head_patterns(model, recipe.exclude),
                                           "int8_blocks": lm.head_patterns(model, recipe.int8_blocks)})
        outliers = quality.outlier_patterns(ref.activation_ratio, recipe.outlier_ratio)
        if graph == "native":  # q/k/v and gate/up are one MatMul each there
            outliers = native.fused_patterns(outliers)
        if outliers and recipe.method in ("int8-dynamic", "int4"):
            recipe = recipe.model_copy(update={"exclude": [*recipe.exclude, *outliers]})
            progress.note(f"{len(outliers)} Linear(s) with massive input activations stay float: {', '.join(outliers)}")
        spec_config = lm.decoder_spec(model, tokenizer, max_context=max_context)
        if graph == "native":
            # the profile's int8_blocks may name the embedding table too (int4 recipes: weights-only low bits)
            embed8 = recipe.method == "int4" and any(p in "model.embed_tokens" for p in recipe.int8_blocks)
            head_k = recipe.lm_head_top_k if recipe.int8_head else None
            with progress.step("export", "edgeship graph, fused GroupQueryAttention, KV cache"):
                fp32 = native.export_native(model, work, max_context=spec_config["max_context"],
                                            embedding_bits=8 if embed8 else None, head_top_k=head_k)
            # one max_context KV buffer per layer that GroupQueryAttention reads and writes in place
            spec_config.update(past_present_share_buffer=True, attention="GroupQueryAttention")
        else:
            head_k = None
            with progress.step("export", f"ONNX opset {profile.opset}, KV cache"):
                fp32 = lm.export_decoder(model, work, opset=profile.opset)
            spec_config.update(lm.cache_layout(fp32))  # the graph's, not the config's name for it
        recipe = recipe.model_copy(update={"lm_head_top_k": head_k})  # the recipe says what was applied
        model_config = model.config
        model_config.save_pretrained(stage)
        write_tokenizer(src, tokenizer, stage)
        del model
        gc.collect()
        fp32_bytes = _dir_onnx_bytes(work)
        entry = stage / "model.onnx"
        with progress.step("quantize", recipe_name(recipe)):
            quant = quantize(fp32, entry, recipe)
        quant = quant.model_copy(update={"details": {**quant.details, "graph": graph}})
        if graph == "native" and embed8:
            quant.details["embedding"] = "8-bit symmetric blocks of 32 (GatherBlockQuantized)"
        tied = getattr(model_config, "tie_word_embeddings", False)
        if head_k:
            rows = "the tied embedding's 8-bit blocks" if tied and embed8 else "the head's own 8-bit blocks"
            quant.details["lm_head"] = (f"every logit from 4-bit asymmetric blocks (level 4), then each position's "
                                        f"top {head_k} recomputed in float32 from {rows}")
        elif graph == "native" and embed8 and tied:
            quant.details["lm_head"] = "8-bit MatMulNBits over the tied embedding's blocks (stored once)"
        if outliers and recipe.method in ("int8-dynamic", "int4"):
            ratios = {quality.outlier_patterns({n: r}, 0)[0]: round(r, 1) for n, r in ref.activation_ratio.items()}
            if graph == "native":
                ratios = {native.fused_patterns([p])[0]: r for p, r in ratios.items()}
            quant = quant.model_copy(update={"details": {
                **quant.details, "outlier_ratio_limit": recipe.outlier_ratio,
                "outlier_ratios": {p: ratios[p] for p in outliers}}})
        shutil.rmtree(work, ignore_errors=True)
        reference = "pytorch float32" + (" + merged adapter" if src.adapter else "") + \
            (" (dequantized GGUF)" if src.gguf_file else "")

        def spec_of(entry: Path, spec_config: dict) -> ModelSpec:
            dec = lm.OrtDecoder(entry)
            return ModelSpec(entry="model.onnx", inputs=dec.input_names, outputs=dec.output_names,
                             architecture=config.model_type, config=spec_config)

        manifest, report, stats = _judge_and_seal_lm(
            stage, entry, ref, reference=reference, spec_config=spec_config, spec_of=spec_of, quant=quant,
            quantized=recipe.method != "none", fp32_bytes=fp32_bytes, params=params, thresholds=thresholds,
            force=force, benchmark=benchmark, profile=profile, progress=progress, t_start=t_start,
            private_key=private_key, name=name, version=version, src=src)
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(out, manifest, report, stats)


def _judge_and_seal_lm(
    stage: Path,
    entry: Path,
    ref: Any,
    *,
    reference: str,
    spec_config: dict,
    spec_of: Any,
    quant: Any,
    quantized: bool,
    fp32_bytes: int,
    params: int,
    thresholds: Thresholds,
    force: bool,
    benchmark: bool,
    profile: TargetProfile,
    progress: Progress,
    t_start: float,
    private_key: Any,
    name: str,
    version: str,
    src: ResolvedSource,
) -> tuple[Any, Any, dict]:
    """The LM paths' common end: gate against the reference, golden files, benchmark, seal the stage."""
    from exporter import quality
    from exporter.golden import write_lm_golden

    with progress.step("validate", "against PyTorch"):
        metrics, details = quality.lm_metrics(entry, ref)
        report = quality.gate(metrics, thresholds, reference=reference, details=details)
    progress.note(f"quality {report.status.value}" + (f": {'; '.join(report.failures)}" if report.failures else ""))
    if report.status is QualityStatus.FAILED and not force:
        raise QualityGateFailed(_gate_message(report), report=report)
    golden = write_lm_golden(stage, entry, ref.sequences[0], quantized=quantized)
    bench = Benchmark()
    if benchmark:
        with progress.step("benchmark", f"{profile.intra_op_threads or 'all'} threads"):
            bench = _lm_benchmark(entry, profile, spec_config)
    stats = {
        "fp32_bytes": fp32_bytes,
        "model_bytes": model_size(entry),
        "precision": quant.precision,
        "parameters": params,
        "export_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "steps_seconds": dict(progress.timings),
        **bench.metrics,
    }
    bench = Benchmark(host=bench.host, metrics={**bench.metrics, "export_seconds": stats["export_seconds"],
                                                "export_peak_rss_mb": stats["peak_rss_mb"]})
    manifest = _seal(stage, private_key, profile=profile, name=name, version=version, task=Task.TEXT_GENERATION,
                     model=spec_of(entry, spec_config), quantization=quant, quality=report, benchmark=bench,
                     golden=golden, source=src.describe())
    stats["bundle_bytes"] = manifest.total_size
    return manifest, report, stats


def _export_lm_npu(
    src: ResolvedSource,
    config: Any,
    *,
    out: Path,
    private_key: Any,
    profile: TargetProfile,
    recipe: QuantRecipe,
    thresholds: Thresholds,
    force: bool,
    name: str,
    version: str,
    progress: Progress,
    t_start: float,
    eval_text: str | Path | None,
    calibration_text: str | Path | None,
) -> ExportResult:
    """Decoder LM for the NPU: edgeship's static-shape graph (exporter/npu_lm.py), QDQ, judged on QNN HTP itself."""
    import numpy as np

    from agent.bundle import Quantization
    from exporter import calibration, lm, quality
    from exporter.pipelines import native_lm as native, npu_lm
    from exporter.errors import UnsupportedArchitecture
    from exporter.source import load_causal_lm, load_tokenizer, write_tokenizer

    why_not = native.supported(config)
    if why_not is not None:
        raise UnsupportedArchitecture(f"{profile.name} builds its own static graph: {why_not}")
    text = quality.read_texts(Path(eval_text) if eval_text else None)
    try:
        calib = calibration.calibration_texts(calibration_text, limit=recipe.calibration_samples)
    except calibration.CalibrationError as exc:
        raise SourceError(str(exc)) from None
    params = estimate_parameters(config)
    check_disk(out, params * 4 * 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(out)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    try:
        with progress.step("load", f"{config.model_type}, {params / 1e6:,.1f}M parameters"):
            model = load_causal_lm(src)
            tokenizer = load_tokenizer(src)
        spec_config = lm.decoder_spec(model, tokenizer, max_context=profile.shapes.max_context)
        cache = spec_config["max_context"]
        with progress.step("reference", "PyTorch float32 on the evaluation text"):
            # every position runs on the HTP simulator (seconds per call for real models): a lighter text set
            ref = quality.lm_reference(model, tokenizer, text, max_context=cache, **npu_lm.EVAL_SIZE)
        cfg, weights = native.decoder_from_hf(model, max_context=cache)
        model.config.save_pretrained(stage)
        write_tokenizer(src, tokenizer, stage)
        prompts = [np.array(tokenizer(t, add_special_tokens=False)["input_ids"], np.int64) for t in calib]
        entry = stage / "model.onnx"
        with progress.step("quantize", f"static graph, step {npu_lm.DEFAULT_STEP}, cache {cache}, QDQ, QNN HTP"):
            result = npu_lm.export_static_lm(cfg, weights, entry, work, recipe=recipe, cache=cache, ref=ref,
                                             provider_options=dict(profile.execution_providers[0].options),
                                             calibration_prompts=prompts, progress=progress.note)
        del model, weights
        gc.collect()
        fp32_bytes = model_size(work / "model.fp32.onnx")
        shutil.rmtree(work, ignore_errors=True)
        report = result.judge(thresholds, reference="pytorch float32" + (" + merged adapter" if src.adapter else ""))
        progress.note(f"quality {report.status.value}" + (f": {'; '.join(report.failures)}" if report.failures else ""))
        if report.status is QualityStatus.FAILED and not force:
            raise QualityGateFailed(_gate_message(report), report=report)
        golden = npu_lm.write_golden(stage, entry, cfg, ref.sequences[0], step=result.step, cache=cache)
        spec_config.update(npu_lm.layout(cfg, step=result.step, cache=cache))
        inputs, outputs = npu_lm.io_names(cfg.num_layers)
        quant = Quantization(recipe=f"qdq-a{recipe.activation_type}-w{recipe.weight_type}-static-lm",
                             precision=f"{recipe.activation_type}/{recipe.weight_type}", details=result.quantization)
        qnn = result.quantization["qnn"]
        bench = Benchmark(metrics={k: qnn[k] for k in ("compile_seconds", "seconds_per_call") if k in qnn})
        stats = {"fp32_bytes": fp32_bytes, "model_bytes": model_size(entry), "precision": quant.precision,
                 "parameters": params, "export_seconds": round(time.perf_counter() - t_start, 2),
                 "peak_rss_mb": round(peak_rss_mb(), 1), "steps_seconds": dict(progress.timings),
                 "htp_compile_seconds": qnn.get("compile_seconds"), "htp_seconds_per_call": qnn.get("seconds_per_call")}
        manifest = _seal(stage, private_key, profile=profile, name=name, version=version, task=Task.TEXT_GENERATION,
                         model=ModelSpec(entry="model.onnx", inputs=inputs, outputs=outputs,
                                         architecture=config.model_type, config=spec_config),
                         quantization=quant, quality=report, benchmark=bench, golden=golden, source=src.describe())
        stats["bundle_bytes"] = manifest.total_size
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(out, manifest, report, stats)


def _export_gguf_exact(
    src: ResolvedSource,
    config: Any,
    *,
    out: Path,
    private_key: Any,
    profile: TargetProfile,
    recipe: QuantRecipe,
    thresholds: Thresholds,
    force: bool,
    name: str,
    version: str,
    progress: Progress,
    t_start: float,
    eval_text: str | Path | None,
    benchmark: bool,
    accuracy_level: int | str | None,
) -> ExportResult:
    """GGUF kept exactly (exporter.gguf), judged by the same gate against transformers' dequantized model."""
    from exporter import quality
    from exporter.gguf.export import export_gguf
    from exporter.source import load_causal_lm, load_tokenizer

    text = quality.read_texts(Path(eval_text) if eval_text else None)
    gguf_path = src.path / str(src.gguf_file)
    params = estimate_parameters(config)
    check_disk(out, gguf_path.stat().st_size * 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(out)
    try:
        with progress.step("load", f"{config.model_type}, {params / 1e6:,.1f}M parameters, dequantized reference"):
            model = load_causal_lm(src)
            tokenizer = load_tokenizer(src)
        with progress.step("reference", "PyTorch float32 on the evaluation text"):
            ref = quality.lm_reference(model, tokenizer, text, max_context=profile.shapes.max_context)
        del model
        gc.collect()
        level = "the measured per-weight policy" if accuracy_level is None else accuracy_level
        policy = TWO_PASS_POLICY if accuracy_level == TWO_PASS else accuracy_level  # 4x2: the lm_head stays refined
        with progress.step("export", f"GGUF blocks kept exactly, accuracy level: {level}"):
            result = export_gguf(gguf_path, stage, accuracy_level=policy, progress=progress.note)
        spec_config = {**result.model_spec.config}
        if profile.shapes.max_context:
            spec_config["max_context"] = min(spec_config["max_context"], profile.shapes.max_context)
        manifest, report, stats = _judge_and_seal_lm(
            stage, result.onnx_path, ref, reference="pytorch float32 (dequantized GGUF)", spec_config=spec_config,
            spec_of=lambda entry, cfg: result.model_spec.model_copy(update={"config": cfg}),
            quant=result.quantization, quantized=True, fp32_bytes=params * 4, params=params,
            thresholds=thresholds, force=force, benchmark=benchmark, profile=profile, progress=progress,
            t_start=t_start, private_key=private_key, name=name, version=version, src=src)
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(out, manifest, report, stats)


def _export_encoder(
    src: ResolvedSource,
    config: Any,
    *,
    task: str,
    out: Path,
    private_key: Any,
    profile: TargetProfile,
    recipe: QuantRecipe,
    thresholds: Thresholds,
    force: bool,
    name: str,
    version: str,
    progress: Progress,
    t_start: float,
    eval_text: str | Path | None,
    calibration_text: str | Path | None,
    benchmark: bool,
    ep_context: bool = False,
) -> ExportResult:
    """Embeddings and classification: exporter.pipelines.encoder builds and judges the files; this seals them."""
    import numpy as np

    from exporter import calibration
    from exporter.benchmark import benchmark_latency
    from exporter.pipelines.encoder import export_encoder

    try:
        evals = calibration.eval_texts(eval_text) if eval_text else None
        calib = calibration.calibration_texts(calibration_text) if calibration_text else None
    except calibration.CalibrationError as exc:
        raise SourceError(str(exc)) from None
    check_disk(out, 4 * sum(p.stat().st_size for p in src.path.glob("*.safetensors")))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _staging(out)
    try:
        result = export_encoder(src.path, stage, task=task, profile=profile, recipe=recipe, thresholds=thresholds,
                                eval_texts=evals, calibration_texts=calib, ep_context=ep_context, progress=progress)
        report = result.quality
        progress.note(f"quality {report.status.value}" + (f": {'; '.join(report.failures)}" if report.failures else ""))
        if report.status is QualityStatus.FAILED and not force:
            raise QualityGateFailed(_gate_message(report), report=report)
        bench = Benchmark()
        if benchmark and profile.device_class == "cpu":
            with progress.step("benchmark", f"{profile.intra_op_threads or 'all'} threads"):
                feed = dict(np.load(stage / result.golden.inputs))
                bench = benchmark_latency(result.onnx_path, feed, threads=profile.intra_op_threads)
        stats = {
            "fp32_bytes": result.size_fp32_bytes,
            "model_bytes": result.size_bytes,
            "precision": result.quantization.precision,
            "export_seconds": round(time.perf_counter() - t_start, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "steps_seconds": dict(progress.timings),
            **bench.metrics,
        }
        bench = Benchmark(host=bench.host, metrics={**bench.metrics, "export_seconds": stats["export_seconds"],
                                                    "export_peak_rss_mb": stats["peak_rss_mb"]})
        manifest = _seal(stage, private_key, profile=profile, name=name, version=version, task=Task(task),
                         model=result.model_spec, quantization=result.quantization, quality=report, benchmark=bench,
                         golden=result.golden, source=src.describe())
        stats["bundle_bytes"] = manifest.total_size
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(out, manifest, report, stats)


def _seal(stage: Path, private_key: Any, *, profile: TargetProfile, **fields: Any) -> Manifest:
    import onnxruntime

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


def _dir_onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))


def _lm_benchmark(entry: Path, profile: TargetProfile, spec: dict[str, Any]) -> Benchmark:
    from exporter.benchmark import benchmark_lm

    return benchmark_lm(entry, threads=profile.intra_op_threads, vocab_size=spec["vocab_size"],
                        max_context=spec["max_context"])


def _gate_message(report: QualityReport) -> str:
    return (
        f"quality gate failed: {'; '.join(report.failures)}. No bundle was written; "
        "choose a gentler recipe (e.g. --quant int8 or a smaller --block-size), relax the threshold "
        "(--threshold NAME=VALUE), or pass --force to write it marked failed-quality"
    )
