"""What the native and optimum LM pipelines share: a transformers decoder in, a quantized LM graph out.

    build(job, stage, work, graph=native_lm | optimum_lm) -> Built

Load the model (adapter merged, GGUF dequantized when requantizing), run the PyTorch reference on
the evaluation text, fit the recipe to the model (its head's own name, Linears with massive input
activations kept float), let `graph` write the float32 graph into `work`, quantize it into the
stage and measure it against the reference. The two pipelines differ only in their graph module:

    NAME                                          "native" / "optimum"
    node_patterns(patterns)                       optimum node-name patterns -> this graph's names
    export_graph(model, work, recipe=, spec_config=, job=) -> Graph
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.bundle import ModelSpec
from exporter.pipelines import Built, Job


@dataclass(frozen=True)
class Graph:
    """The float32 graph a graph module wrote, and what the bundle says about it."""

    path: Path
    spec: dict[str, Any] = field(default_factory=dict)  # manifest.model.config entries this graph decides
    head_top_k: int | None = None  # the lm_head's top-k refinement, when the graph has it
    details: dict[str, Any] = field(default_factory=dict)  # manifest.quantization.details entries


def disk_bytes(job: Job) -> int:
    return job.parameters * 4 * 2  # float32 ONNX + quantized copy


def build(job: Job, stage: Path, work: Path, *, graph: ModuleType) -> Built:
    from exporter import lm, quality
    from exporter.quantize import quantize, recipe_name
    from exporter.source import load_causal_lm, load_tokenizer, write_tokenizer

    progress, profile = job.progress, job.profile
    text = quality.read_texts(job.request.eval_text)
    with progress.step("load", f"{job.config.model_type}, {job.parameters / 1e6:,.1f}M parameters"):
        model = load_causal_lm(job.src)
        tokenizer = load_tokenizer(job.src)
    max_context = profile.shapes.max_context
    with progress.step("reference", "PyTorch float32 on the evaluation text"):
        ref = quality.lm_reference(model, tokenizer, text, max_context=max_context)
    recipe = job.recipe.model_copy(update={"exclude": lm.head_patterns(model, job.recipe.exclude),
                                           "int8_blocks": lm.head_patterns(model, job.recipe.int8_blocks)})
    outliers = graph.node_patterns(quality.outlier_patterns(ref.activation_ratio, recipe.outlier_ratio))
    if outliers and recipe.method in ("int8-dynamic", "int4"):
        recipe = recipe.model_copy(update={"exclude": [*recipe.exclude, *outliers]})
        progress.note(f"{len(outliers)} Linear(s) with massive input activations stay float: {', '.join(outliers)}")
    spec_config = lm.decoder_spec(model, tokenizer, max_context=max_context)
    made = graph.export_graph(model, work, recipe=recipe, spec_config=spec_config, job=job)
    spec_config.update(made.spec)
    recipe = recipe.model_copy(update={"lm_head_top_k": made.head_top_k})  # the recipe says what was applied
    model.config.save_pretrained(stage)
    write_tokenizer(job.src, tokenizer, stage)
    del model
    gc.collect()
    fp32_bytes = sum(p.stat().st_size for p in work.iterdir() if p.name.startswith("model.onnx"))
    entry = stage / "model.onnx"
    with progress.step("quantize", recipe_name(recipe)):
        quant = quantize(made.path, entry, recipe)
    details = {**quant.details, "graph": graph.NAME, **made.details}
    if outliers and recipe.method in ("int8-dynamic", "int4"):
        ratios = {graph.node_patterns(quality.outlier_patterns({n: r}, 0))[0]: round(r, 1)
                  for n, r in ref.activation_ratio.items()}
        details |= {"outlier_ratio_limit": recipe.outlier_ratio, "outlier_ratios": {p: ratios[p] for p in outliers}}
    dec = lm.OrtDecoder(entry)
    spec = ModelSpec(entry="model.onnx", inputs=dec.input_names, outputs=dec.output_names,
                     architecture=job.config.model_type, config=spec_config)
    del dec
    return lm_built(job, entry, ref, model_spec=spec, quantization=quant.model_copy(update={"details": details}),
                    quantized=recipe.method != "none", fp32_bytes=fp32_bytes)


def lm_built(job: Job, entry: Path, ref: Any, *, model_spec: ModelSpec, quantization: Any, quantized: bool,
             fp32_bytes: int) -> Built:
    """A KV-cache LM graph in the stage, measured against the PyTorch reference `ref` (also the GGUF pipeline's end)."""
    from exporter import quality
    from exporter.benchmark import benchmark_lm
    from exporter.gate import Evidence
    from exporter.golden import lm_case

    with job.progress.step("validate", "against PyTorch"):
        metrics, details = quality.lm_metrics(entry, ref)
    config = model_spec.config
    return Built(
        entry=entry, model_spec=model_spec, quantization=quantization,
        evidence=Evidence(metrics, job.thresholds.as_dict(), job.reference, details),
        golden=lm_case(entry, ref.sequences[0], quantized=quantized),
        fp32_bytes=fp32_bytes, stats={"parameters": job.parameters},
        host_benchmark=lambda: benchmark_lm(entry, threads=job.profile.intra_op_threads,
                                            vocab_size=config["vocab_size"], max_context=config["max_context"]),
    )
