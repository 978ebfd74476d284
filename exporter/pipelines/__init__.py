"""One module per source a bundle is built from; `plan` picks one, `exporter.run.run_export` drives it.

    native_lm.py    transformers decoder -> edgeship's GroupQueryAttention graph (exporter/graph/)
    optimum_lm.py   transformers decoder -> optimum-onnx's traced graph with KV cache
    hf_lm.py        what those two share: load, PyTorch reference, recipe fitted to the model, quantize
    gguf.py         llama.cpp GGUF -> the same decoder graph with the GGUF's blocks kept exactly
    npu_lm.py       transformers decoder -> static-shape QDQ graph, judged on QNN HTP
    encoder.py      BERT-family encoders -> embedding / classification graphs

Every pipeline module has the same three names:

    NAME                    the source's name in messages and stats
    disk_bytes(job)         what the build needs on disk next to --out (checked before it starts)
    build(job, stage, work) -> Built: the model and tokenizer in `stage`, scratch files in `work`,
                            plus what the gate, the golden writer and the benchmark need

A pipeline writes no golden files, judges nothing and seals nothing: run_export does that, once
for all of them. The architectures a task takes are the union of what its pipelines take
(`supported_architectures`), never a list kept by hand here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.bundle import Benchmark, ModelSpec, Quantization
from exporter.errors import ExportError, IncompatibleTarget, TaskNotSupported, UnsupportedArchitecture
from exporter.gate import Evidence
from exporter.golden import GoldenCase
from exporter.profiles import QuantRecipe, TargetProfile, Thresholds
from exporter.progress import Progress
from exporter.request import ExportRequest
from exporter.source import ResolvedSource


@dataclass(frozen=True)
class Job:
    """The request resolved against its model and target: what a pipeline builds from."""

    request: ExportRequest
    src: ResolvedSource
    config: Any  # the transformers config
    task: str
    recipe: QuantRecipe
    thresholds: Thresholds
    progress: Progress

    @property
    def profile(self) -> TargetProfile:
        return self.request.profile  # type: ignore[return-value]  (the request loads it)

    @functools.cached_property
    def parameters(self) -> int:
        """Parameter count of a causal LM from its config alone (meta tensors, no memory)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(self.config)
        return sum(p.numel() for p in model.parameters())

    @property
    def reference(self) -> str:
        """How the gate's reference was made."""
        return ("pytorch float32" + (" + merged adapter" if self.src.adapter else "")
                + (" (dequantized GGUF)" if self.src.gguf_file else ""))


@dataclass(frozen=True)
class Built:
    """What a pipeline made: the model in the stage and everything run_export needs to finish the bundle."""

    entry: Path  # the model file inside the stage
    model_spec: ModelSpec
    quantization: Quantization
    evidence: Evidence  # the gate's input
    golden: GoldenCase
    fp32_bytes: int  # the float32 ONNX model's size, for the stats
    stats: dict[str, Any] = field(default_factory=dict)  # the pipeline's own figures (parameters, ...)
    # the host speed benchmark, where the target's model runs on this host
    host_benchmark: Callable[[], Benchmark] | None = None
    # what the pipeline measured on the target itself (QNN HTP): the manifest's benchmark without a host run
    measured: dict[str, float] = field(default_factory=dict)


def plan(request: ExportRequest, src: ResolvedSource, config: Any, progress: Progress) -> tuple[ModuleType, Job]:
    """The pipeline for this request and model, and its job; every model-dependent check, before any weights."""
    from exporter.request import GGUF_ONLY_LEVELS
    from exporter.pipelines import encoder, gguf, npu_lm
    from exporter.quantize import check_target
    from exporter.source import infer_task

    profile: TargetProfile = request.profile  # type: ignore[assignment]
    natural = infer_task(config) if request.task in (None, "text-generation") else request.task
    task = request.task or natural
    settings = profile.task(task)
    gguf_exact = bool(src.gguf_file) and not request.requantize
    if request.accuracy_level in GGUF_ONLY_LEVELS and not (gguf_exact and task == "text-generation"):
        what = {"4x2": "two-pass int8 decode", "exact": "the GGUF's float math", "auto": "searched levels"}
        raise ExportError(f"--accuracy-level {request.accuracy_level} ({what[request.accuracy_level]}) is for exact GGUF "
                          "imports of text-generation models; use 0-4 here")
    recipe = request.recipe(settings.quantization, gguf_requantize=bool(src.gguf_file) and request.requantize,
                            device_class=profile.device_class)
    check_target(recipe, device_class=profile.device_class, profile=profile.name, task=task)
    if request.ep_context and profile.device_class != "npu":
        raise IncompatibleTarget(f"--ep-context writes the compiled NPU binary of the model; {task} on target "
                                 f"{profile.name} ({profile.device_class}) has none: drop --ep-context")
    job = Job(request=request, src=src, config=config, task=task, recipe=recipe,
              thresholds=request.thresholds_over(settings.thresholds_for(recipe.method)),
              progress=progress)

    if task != "text-generation":
        if request.adapter is not None:
            raise TaskNotSupported(f"--adapter is supported for text-generation only, not for {task}")
        if src.gguf_file:
            raise TaskNotSupported(f"GGUF files are exported as text-generation models, not {task}")
        return encoder, job
    if natural != "text-generation":
        raise TaskNotSupported(
            f"{src.spec} is a {config.model_type} model for {natural} "
            f"({', '.join(config.architectures or [])}); it cannot do text-generation; use --task {natural}"
        )
    if profile.device_class == "npu":  # static-shape graph with a host-side KV cache
        from exporter.pipelines.native_lm import supported
        from exporter.pipelines.npu_lm import why_not_static

        why_not = why_not_static(config) or supported(config)
        if why_not is not None:
            raise UnsupportedArchitecture(f"{profile.name} builds its own static graph: {why_not}")
        return npu_lm, job
    check_architecture(config)
    if gguf_exact:
        if request.adapter is not None:
            raise ExportError(
                f"an adapter cannot be merged into {src.gguf_file}'s quantized blocks; add --requantize "
                "to dequantize the GGUF, merge the adapter and quantize again"
            )
        if request.quant is not None or request.block_size is not None or request.algorithm is not None:
            raise ExportError(
                f"{src.gguf_file} is imported with its own GGUF quantization; add --requantize to "
                "dequantize it and apply --quant/--block-size/--int4-algorithm instead"
            )
        return gguf, job
    from exporter.pipelines import native_lm, optimum_lm

    return (native_lm if choose_graph(config, profile, request.graph, progress) == "native" else optimum_lm), job


def choose_graph(config: Any, profile: TargetProfile, graph: str, progress: Progress) -> str:
    """"native" (edgeship's GroupQueryAttention graph) or "optimum" for this model and target."""
    from exporter.pipelines.native_lm import OPTIMUM_BY_DEFAULT, supported

    if graph not in ("auto", "native", "optimum"):
        raise ExportError(f"--graph {graph!r}: choose auto, native or optimum")
    why_not = supported(config)
    if why_not is None and profile.device_class != "cpu":
        why_not = f"target {profile.name} is {profile.device_class}; the fused float32 graph is for CPU targets"
    if why_not is None and graph == "auto":
        why_not = OPTIMUM_BY_DEFAULT.get(getattr(config, "model_type", None))
    if why_not is None and graph != "optimum":
        return "native"
    if graph == "native":
        raise ExportError(f"--graph native: {why_not}; use --graph optimum")
    check_architecture(config, optimum=True)
    if graph == "auto":
        progress.note(f"optimum graph: {why_not}")
    return "optimum"


def supported_architectures(task: str = "text-generation", *, optimum: bool = False) -> tuple[str, ...]:
    """Every model_type the pipelines of `task` take, computed from them: for text-generation the native
    builder's first, then optimum's (with `optimum`: optimum's only); for encoder tasks the encoder's."""
    if task != "text-generation":
        from exporter.pipelines.encoder import SUPPORTED_ARCHITECTURES

        return tuple(SUPPORTED_ARCHITECTURES)
    from exporter.pipelines.native_lm import NATIVE_ARCHITECTURES
    from exporter.pipelines.optimum_lm import optimum_architectures

    found = optimum_architectures()
    return found if optimum else (*NATIVE_ARCHITECTURES, *(t for t in found if t not in NATIVE_ARCHITECTURES))


def check_architecture(config: Any, *, optimum: bool = False) -> str:
    """The model_type, if some LM pipeline takes it (with `optimum`: if the optimum pipeline does)."""
    from exporter.pipelines.native_lm import NATIVE_ARCHITECTURES
    from exporter.pipelines.optimum_lm import why_not_optimum

    model_type = getattr(config, "model_type", None)
    if model_type in NATIVE_ARCHITECTURES and not optimum:
        return model_type  # without importing optimum's configs (3.6 s) for the native path
    known = supported_architectures(optimum=optimum)
    if model_type not in known:
        why_not = why_not_optimum(model_type)
        where = " by the optimum graph (the native graph takes others on CPU targets)" if optimum else ""
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r} for text-generation{where}"
            + (f" ({why_not})" if why_not else "") + f"; supported: {', '.join(known)}"
        )
    return model_type
