"""The GGUF pipeline: a llama.cpp file imported with its quantized blocks kept exactly (exporter/gguf/).

The graph is exporter/graph/decoder.py's, built from the GGUF's own blocks; the gate compares it
with transformers' dequantized float32 model, like every other LM. By default the MatMulNBits
accuracy levels are searched on that comparison (exporter/gguf/search.py): the exact graph is built
first, the fastest level-0/4 mix within llama.cpp's quality class is found, and that policy is built. With --requantize a GGUF takes
the native or optimum pipeline instead (transformers dequantizes it, the profile's recipe applies).
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from exporter.pipelines import Built, Job, hf_lm

NAME = "gguf"


def _gguf_path(job: Job) -> Path:
    return job.src.path / str(job.src.gguf_file)


def disk_bytes(job: Job) -> int:
    return _gguf_path(job).stat().st_size * 2


def build(job: Job, stage: Path, work: Path) -> Built:
    from exporter import quality
    from exporter.gguf.export import export_gguf
    from exporter.gguf.levels import EXACT, EXACT_POLICY, SEARCH, TWO_PASS, TWO_PASS_POLICY

    progress, level = job.progress, job.request.accuracy_level
    text = quality.read_texts(job.request.eval_text)
    searching = level in (None, SEARCH)
    ref, windows = _reference(job, text, searching=searching)
    policy = {TWO_PASS: TWO_PASS_POLICY, EXACT: EXACT_POLICY}.get(level, level)  # 4x2: the lm_head stays refined
    shown = "exact first, then the search" if searching else level
    with progress.step("export", f"GGUF blocks kept exactly, accuracy level: {shown}"):
        result = export_gguf(_gguf_path(job), stage, accuracy_level=EXACT_POLICY if searching else policy,
                             progress=progress.note)
    if not searching:
        return _built(job, result, ref)
    searched = _search(job, result.onnx_path, ref, windows)
    staged = EXACT_POLICY  # the policy of the graph in the stage
    while True:
        if searched.policy is not staged:
            with progress.step("rebuild", f"GGUF blocks kept exactly, {searched.policy}"):
                _clear(stage)
                result = export_gguf(_gguf_path(job), stage, accuracy_level=searched.policy, progress=progress.note)
            staged = searched.policy
        details = {**result.quantization.details, "accuracy_search": searched.details()}
        built = _built(job, replace(result, quantization=result.quantization.model_copy(update={"details": details})),
                       ref)
        missed = built.evidence.judge().failures
        if not missed or searched.chosen is None:  # passed, or the exact policy: the gate's verdict stands
            return replace(built, stats={**built.stats, "accuracy_policy": searched.line()})
        searched = searched.after_refusal(missed)
        progress.note(f"the gate refused the searched mix on its own text ({'; '.join(missed)}); "
                      f"next: {searched.policy}")


def _built(job: Job, result: Any, ref: Any) -> Built:
    """The graph export_gguf wrote, measured by the gate against the PyTorch reference."""
    spec_config = {**result.model_spec.config}
    if job.profile.shapes.max_context:
        spec_config["max_context"] = min(spec_config["max_context"], job.profile.shapes.max_context)
    return hf_lm.lm_built(job, result.onnx_path, ref,
                          model_spec=result.model_spec.model_copy(update={"config": spec_config}),
                          quantization=result.quantization, quantized=True, fp32_bytes=job.parameters * 4)


def _reference(job: Job, text: str, *, searching: bool) -> tuple[Any, Any]:
    """The PyTorch float32 reference of the dequantized GGUF on the evaluation text: the gate's, and the
    search's windows when it runs (the model is freed after)."""
    from exporter import quality
    from exporter.gguf.search import Windows
    from exporter.source import load_causal_lm, load_tokenizer

    with job.progress.step("load", f"{job.config.model_type}, {job.parameters / 1e6:,.1f}M parameters, "
                                   "dequantized reference"):
        model = load_causal_lm(job.src)
        tokenizer = load_tokenizer(job.src)
    with job.progress.step("reference", "PyTorch float32 on the evaluation text"):
        ref = quality.lm_reference(model, tokenizer, text, max_context=job.profile.shapes.max_context)
        windows = Windows.from_torch(model, tokenizer, _search_text(job, text)) if searching else None
    del model
    gc.collect()
    return ref, windows


def _search_text(job: Job, text: str) -> str:
    """What the search scores on: the user's evaluation text, or else every built-in English text (the
    gate's ~900 tokens alone would leave a top-1 bar of 97 % within one standard error, 0.6 %)."""
    if job.request.eval_text is not None:
        return text
    from exporter.calibration import (
        BUILTIN_EVAL,
        BUILTIN_MIXED_EVAL,
        calibration_texts,
        load_texts,
    )

    return "\n\n".join([text, *load_texts(BUILTIN_EVAL), *load_texts(BUILTIN_MIXED_EVAL), *calibration_texts()])


def _search(job: Job, exact_onnx: Path, ref: Any, windows: Any) -> Any:
    """The fastest level-0/4 mix that keeps the bar (exporter/gguf/search.py) on the evaluation text."""
    from exporter.gate import metric_of
    from exporter.gguf.search import run_candidate, run_probe, search_bar, search_policy

    bar = search_bar(job.request.thresholds)
    greedy = ref if any(metric_of(k) == "greedy_match" for k in bar) else None
    what = ", ".join(f"{k}={v:g}" for k, v in bar.items())
    with job.progress.step("search", f"the fastest accuracy levels within {what}, {windows.sequences.size} tokens"):
        return search_policy(exact_onnx, lambda path: run_candidate(path, windows, greedy), bar=bar,
                             probe=lambda path: run_probe(path, windows.sequences), progress=job.progress.note)


def _clear(stage: Path) -> None:
    """Empty the stage before a rebuild (export_gguf writes the model, its data and the tokenizer)."""
    for path in stage.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
