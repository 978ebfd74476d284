"""The GGUF pipeline: a llama.cpp file imported with its quantized blocks kept exactly (exporter/gguf/).

The graph is exporter/graph/decoder.py's, built from the GGUF's own blocks; the gate compares it
with transformers' dequantized float32 model, like every other LM. With --requantize a GGUF takes
the native or optimum pipeline instead (transformers dequantizes it, the profile's recipe applies).
"""

from __future__ import annotations

import gc
from pathlib import Path

from exporter.pipelines import Built, Job, hf_lm

NAME = "gguf"


def _gguf_path(job: Job) -> Path:
    return job.src.path / str(job.src.gguf_file)


def disk_bytes(job: Job) -> int:
    return _gguf_path(job).stat().st_size * 2


def build(job: Job, stage: Path, work: Path) -> Built:
    from exporter import quality
    from exporter.gguf.export import export_gguf
    from exporter.gguf.levels import TWO_PASS, TWO_PASS_POLICY
    from exporter.source import load_causal_lm, load_tokenizer

    progress, profile, level = job.progress, job.profile, job.request.accuracy_level
    text = quality.read_texts(job.request.eval_text)
    with progress.step("load", f"{job.config.model_type}, {job.parameters / 1e6:,.1f}M parameters, "
                               "dequantized reference"):
        model = load_causal_lm(job.src)
        tokenizer = load_tokenizer(job.src)
    with progress.step("reference", "PyTorch float32 on the evaluation text"):
        ref = quality.lm_reference(model, tokenizer, text, max_context=profile.shapes.max_context)
    del model
    gc.collect()
    policy = TWO_PASS_POLICY if level == TWO_PASS else level  # 4x2: the lm_head stays refined
    shown = "the measured per-weight policy" if level is None else level
    with progress.step("export", f"GGUF blocks kept exactly, accuracy level: {shown}"):
        result = export_gguf(_gguf_path(job), stage, accuracy_level=policy, progress=progress.note)
    spec_config = {**result.model_spec.config}
    if profile.shapes.max_context:
        spec_config["max_context"] = min(spec_config["max_context"], profile.shapes.max_context)
    return hf_lm.lm_built(job, result.onnx_path, ref,
                          model_spec=result.model_spec.model_copy(update={"config": spec_config}),
                          quantization=result.quantization, quantized=True, fp32_bytes=job.parameters * 4)
