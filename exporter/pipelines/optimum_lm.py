"""The optimum LM pipeline: a transformers decoder traced by optimum-onnx into one graph with KV cache.

Every family optimum-onnx 0.1.0 exports for text-generation with past takes this path, less the
refused ones (`optimum_architectures`, `refused_architectures`; the table in docs/EXPORT.md). The
graph is optimum's decoder-with-past layout, with position_ids wherever the model takes them; the
rest of the pipeline (load, reference, quantization, measures) is exporter/pipelines/hf_lm.py.
"""

from __future__ import annotations

import functools
import gc
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

from exporter.errors import ConversionError
from exporter.pipelines import Built, Job, hf_lm

NAME = "optimum"

# model_type -> why edgeship refuses it although optimum-onnx exports it for text-generation with past
OPTIMUM_REFUSED = {
    "deepseek_v3": "optimum-onnx 0.1.0 traces its mixture-of-experts loop over only the experts its dummy input "
                   "routes to, so the graph drops the others (a tiny checkpoint's logits were 0.11 off PyTorch)",
}


@functools.cache
def _optimum_candidates() -> dict[str, str | None]:
    """model_type -> None when optimum's path takes it, else why not: every model_type optimum-onnx's
    TasksManager registers for text-generation-with-past. Each one taken is exported and checked against
    PyTorch in tests/test_exporter_families.py (or tests/test_exporter_lm.py)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: dict[str, str | None] = {}
    for model_type in sorted(TasksManager.get_supported_model_type_for_task("text-generation-with-past", "onnx")):
        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if causal is None or model_type not in CONFIG_MAPPING:
            out[model_type] = "transformers has no causal-LM class for it (remote code only)"
        elif CONFIG_MAPPING[model_type]().is_encoder_decoder:
            out[model_type] = "an encoder-decoder family (sequence-to-sequence checkpoints); LM bundles are decoder-only"
        elif causal.endswith("ForConditionalGeneration"):
            out[model_type] = (f"a vision-language model ({causal}); an LM bundle takes text only: export its "
                               "text model")
        else:
            out[model_type] = OPTIMUM_REFUSED.get(model_type)
    return out


def refused_architectures() -> dict[str, str]:
    """model_type -> why not, for what optimum-onnx registers for text-generation-with-past but edgeship refuses."""
    return {t: why_not for t, why_not in _optimum_candidates().items() if why_not is not None}


def optimum_architectures() -> tuple[str, ...]:
    """The model_types the optimum graph takes: optimum's text-generation-with-past set, less the refused."""
    return tuple(t for t, why_not in _optimum_candidates().items() if why_not is None)


def _onnx_config(model: Any) -> Any:
    """optimum's export config for this decoder, with position_ids wherever the model's forward takes them."""
    from optimum.exporters.onnx.config import TextDecoderOnnxConfig, TextDecoderWithPositionIdsOnnxConfig
    from optimum.exporters.tasks import TasksManager

    base = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task="text-generation-with-past", library_name="transformers").func
    cls = base
    if issubclass(base, TextDecoderOnnxConfig) and not issubclass(base, TextDecoderWithPositionIdsOnnxConfig) \
            and "position_ids" in inspect.signature(model.forward).parameters:
        # some of optimum's configs (gemma, gemma2, nemotron, codegen, ...) leave positions to the trace; the bundle
        # contract feeds them wherever the model takes them (docs/ARCHITECTURE.md)
        def inputs(self: Any) -> dict[str, dict[int, str]]:
            return {**base.inputs.fget(self), "position_ids": {0: "batch_size", 1: "sequence_length"}}

        cls = type(f"{base.__name__}WithPositionIds", (base,), {"inputs": property(inputs)})
    return cls(model.config, task="text-generation", use_past=True, use_past_in_inputs=True)


def export_decoder(model: Any, work_dir: Path, *, opset: int) -> Path:
    """Export `model` (float32 PyTorch) to work_dir/model.onnx; returns its path."""
    from optimum.exporters.onnx import onnx_export_from_model

    from exporter.pipelines import check_architecture

    check_architecture(model.config, optimum=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python bools: expected for HF decoders
            onnx_export_from_model(
                model,
                work_dir,
                task="text-generation-with-past",
                opset=opset,
                do_validation=False,  # our quality gate validates against PyTorch with real text
                custom_onnx_configs={"model": _onnx_config(model)},
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConversionError(f"ONNX export of the {model.config.model_type} model failed: {exc}") from exc
    gc.collect()
    path = work_dir / "model.onnx"
    if not path.exists():
        raise ConversionError(f"ONNX export wrote no model.onnx in {work_dir}")
    return path


def cache_layout(path: Path) -> dict[str, int]:
    """num_kv_heads and head_dim of the KV cache as the graph at `path` declares it (optimum's past inputs are
    [batch, kv_heads, past, head_dim]): multi-query families (falcon, gpt_bigcode) keep one KV head whatever
    their config calls the attention heads."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    key, value = dims.get("past_key_values.0.key"), dims.get("past_key_values.0.value")
    if key is None or value is None or len(key) != 4 or not (key[1] and key[3]) or value[1::2] != key[1::2]:
        raise ConversionError(f"{path.name}: past_key_values.0.key {key} / .value {value} are not one "
                              "[batch, kv_heads, past, head_dim] layout; the agent's KV cache needs one (docs/ARCHITECTURE.md)")
    return {"num_kv_heads": key[1], "head_dim": key[3]}


def why_not_optimum(model_type: str | None) -> str | None:
    """Why optimum's path refuses `model_type` although optimum-onnx registers it (None: it does not, or takes it)."""
    return _optimum_candidates().get(model_type) if model_type else None


def node_patterns(patterns: list[str]) -> list[str]:
    """optimum's node names are the patterns' own."""
    return list(patterns)


def export_graph(model: Any, work: Path, *, recipe: Any, spec_config: dict[str, Any], job: Job) -> hf_lm.Graph:
    """optimum's graph; its past inputs say the KV layout (multi-query families keep one KV head)."""
    with job.progress.step("export", f"ONNX opset {job.profile.opset}, KV cache"):
        path = export_decoder(model, work, opset=job.profile.opset)
    return hf_lm.Graph(path, spec=cache_layout(path))  # the graph's, not the config's name for it


def disk_bytes(job: Job) -> int:
    return hf_lm.disk_bytes(job)


def build(job: Job, stage: Path, work: Path) -> Built:
    return hf_lm.build(job, stage, work, graph=sys.modules[__name__])
