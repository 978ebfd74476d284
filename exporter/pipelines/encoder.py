"""The encoder pipeline (BERT/MiniLM family): sentence embeddings and text classification -> ONNX files of a bundle.

    build(job, stage, work) -> Built                   the pipeline, driven by exporter.run.run_export
    build_encoder(model, out_dir, task=..., ...) -> EncoderBuild   model and tokenizer files, measured
    export_encoder(model, out_dir, task=..., ...) -> EncoderResult the same, judged, with golden files

Embedding graphs end in the final vector: mean pooling over the attention mask (or CLS, as the
checkpoint's sentence-transformers config says) and L2 normalization happen inside the graph,
output `sentence_embedding` [batch, dim]. Classification graphs output `logits` [batch, labels].
CPU profiles get dynamic batch and sequence axes; static profiles (the NPU) get [1, sequence_length].

Steps: PyTorch reference on the evaluation sentences -> ONNX fp32 (checked against the reference)
-> quantization per recipe (int8 with per-row dynamic activations and per-channel weights, with
automatic mixed precision; fp16; or static QDQ for QNN HTP, verified on the HTP backend) -> quality
gate -> golden files. Dynamic-shape embedding graphs are judged one text per call and in padded
batches (GATE_BATCHES): against PyTorch at every layout, and a text's vector alone against the same
text's vector in a batch (`min_batch_cosine`), since a RAG index is built in batches and queried one
sentence at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from agent.bundle import Golden, ModelSpec, QualityReport, Quantization
from exporter import calibration, mixed_precision
from exporter.errors import ConversionError, IncompatibleTarget, SourceError, TaskNotSupported, UnsupportedArchitecture
from exporter.gate import Evidence, metric_of
from exporter.gate import failures as gate_failures
from exporter.golden import GoldenCase, golden_files, write_golden
from exporter.profiles import QuantRecipe, TargetProfile, Thresholds
from exporter.progress import Progress
from exporter.quantize import recipe_name
from exporter.row_quant import quantize_rows

ENCODER_TASKS = ("embedding", "text-classification")
SUPPORTED_ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
ENCODER_METHODS = ("none", "fp16", "int8-dynamic", "qdq-static")
# Additive attention-mask value. The exported graph fills masked keys with float32's minimum;
# quantizing that Add to 16 bits would spend the whole range on the mask and leave the attention
# scores no resolution. exp(-100) is 4e-44: masked keys still get no weight.
MASK_FILL = -100.0
ONNX_NAME = "model.onnx"
GOLDEN_ROWS = 4
NAME = "encoder"
# The mixed-precision search must beat the thresholds on calibration text by this share of the
# distance to 1.0, so that the unseen evaluation text passes too.
SEARCH_MARGIN = 0.25
# Mixed precision may keep at most this share of the weight MatMuls' multiply-adds in float.
FLOAT_BUDGET = 0.34
# A text's embedding alone vs in a padded batch: per-row activation scales make them equal up to float
# summation order (~1e-7); one scale per tensor moved MiniLM sentences to 0.95.
MIN_BATCH_COSINE = 0.999
DEFAULT_EMBED_THRESHOLDS = {"min_cosine_mean": 0.995, "min_cosine_min": 0.98, "min_batch_cosine": MIN_BATCH_COSINE}
# The layouts dynamic embedding graphs are judged in: one text per call (as queries arrive) and padded
# batches up to the agent's largest (agent.runtime.encoders.MAX_BATCH), texts shuffled so batches mix lengths.
GATE_BATCHES = (1, 8, 32)
DEFAULT_CLS_THRESHOLDS = {"min_label_agreement": 0.95}


@dataclass(frozen=True)
class EncoderBuild:
    """The model and tokenizer in out_dir, and what the gate and the golden writer need."""

    onnx_path: Path  # inside out_dir
    files: list[Path]  # every file written into out_dir
    model_spec: ModelSpec
    quantization: Quantization
    evidence: Evidence
    golden_case: GoldenCase
    size_fp32_bytes: int
    size_bytes: int


@dataclass(frozen=True)
class EncoderResult(EncoderBuild):
    """An EncoderBuild judged, with its golden files written (export_encoder)."""

    quality: QualityReport
    golden: Golden


@dataclass(frozen=True)
class _Prepared:
    """Tokenized text as the ONNX graph takes it. Static graphs take one row per call.

    `order`: the text each output row belongs to, when the feeds hold the texts shuffled."""

    feeds: list[dict[str, np.ndarray]]
    order: tuple[int, ...] | None = None


def export_encoder(model: str | Path, out_dir: Path, **options: Any) -> EncoderResult:
    """Export an encoder checkpoint to `out_dir` (model, tokenizer, golden files) and judge it: build_encoder
    (whose keywords `options` are) plus the gate and the golden files, for callers that want the files
    without a bundle (benchmarks, tests)."""
    built = build_encoder(model, out_dir, **options)
    golden = write_golden(Path(out_dir), built.golden_case)
    fields = {**vars(built), "files": built.files + golden_files(Path(out_dir))}
    return EncoderResult(**fields, quality=built.evidence.judge(), golden=golden)


def build_encoder(
    model: str | Path,
    out_dir: Path,
    *,
    task: str,
    profile: TargetProfile,
    recipe: QuantRecipe,
    thresholds: Thresholds,
    eval_texts: list[str] | None = None,
    calibration_texts: list[str] | None = None,
    progress: Progress | None = None,
    ep_context: bool = False,
) -> EncoderBuild:
    """Write an encoder checkpoint's model and tokenizer to `out_dir` and measure it against PyTorch.

    Ten parameters: the model, where to write, and the eight things an encoder export is made of (task,
    target, recipe, limits, the two text sets, progress, the NPU context binary); export_encoder and the
    benchmarks call it with all of them, so a Job (which needs a resolved request) would not serve them."""
    progress = progress or Progress()
    if task not in ENCODER_TASKS:
        raise TaskNotSupported(f"encoder export does task embedding or text-classification, not {task!r}")
    if recipe.method not in ENCODER_METHODS:
        raise IncompatibleTarget(
            f"quantization {recipe.method!r} is not available for encoders; use one of: {', '.join(ENCODER_METHODS)}"
        )
    static = profile.shapes.static
    if recipe.method == "qdq-static" and not static:
        raise IncompatibleTarget(f"qdq-static is the NPU recipe and needs a static-shape profile; {profile.name} is dynamic")
    if ep_context and profile.device_class != "npu":
        raise IncompatibleTarget(f"an EP context binary is an NPU artefact; profile {profile.name} is {profile.device_class}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batched = task == "embedding" and not static
    # the mixed set (short, long, non-English, code) is judged in batches; the NPU's HTP simulator
    # takes seconds a call and its static graphs take one text per call anyway
    evals = eval_texts or calibration.eval_texts() + (calibration.mixed_eval_texts() if batched else [])
    calib = (calibration_texts or calibration.calibration_texts())[: max(recipe.calibration_samples, 32)]

    with progress.step("load", str(model)):
        src = _resolve(model)
        torch_model, tokenizer, config = _load(src, task)
        pooling = _pooling_mode(src.path) if task == "embedding" else None
        seq_len = _sequence_length(profile, tokenizer, config, src.path)
        input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
        graph = _graph_module(torch_model, input_names, task=task, pooling=pooling)
    with progress.step("reference", f"PyTorch float32 on {len(evals)} evaluation texts"):
        eval_in = _tokenize(tokenizer, evals, input_names, static=static, seq_len=seq_len)
        calib_in = _tokenize(tokenizer, calib, input_names, static=static, seq_len=seq_len)
        reference = _torch_outputs(graph, eval_in)
        layouts = ({size: _batched(tokenizer, evals, input_names, size=size, seq_len=seq_len) for size in GATE_BATCHES}
                   if batched else {1: eval_in})

    with tempfile.TemporaryDirectory(prefix="edgeship-encoder-") as tmp:
        work = Path(tmp)
        fp32_path = work / "fp32.onnx"
        with progress.step("export", f"ONNX opset {profile.opset}, {'static [1, %d]' % seq_len if static else 'dynamic'} shapes"):
            _export_onnx(graph, eval_in.feeds[0], fp32_path, input_names=input_names, task=task,
                         opset=profile.opset, static=static)
            fp32_out = _run(fp32_path, eval_in)
            drift = float(np.abs(fp32_out - reference).max())
            if drift > 1e-3 * max(1.0, float(np.abs(reference).max())):
                raise ConversionError(f"the float32 ONNX graph differs from PyTorch by {drift:.3g}; the export is broken")
        size_fp32 = _model_bytes(fp32_path)

        final = work / ONNX_NAME
        details: dict[str, Any] = {}
        qnn_report = None
        with progress.step("quantize", recipe.method):
            if recipe.method == "none":
                shutil.copyfile(fp32_path, final)
                quant = Quantization(recipe="fp32", precision="fp32")
            elif recipe.method == "fp16":
                details = _to_fp16(fp32_path, final)
                quant = Quantization(recipe="fp16", precision="fp16", details=details)
            elif recipe.method == "int8-dynamic":
                details = _int8_dynamic(fp32_path, final, task=task, recipe=recipe, thresholds=thresholds,
                                        calib=calib_in, layouts=layouts, reference=reference, progress=progress)
                quant = Quantization(recipe=_int8_recipe_name(recipe, details), precision="int8", details=details)
            else:
                from exporter import npu

                details = npu.quantize_qdq(fp32_path, final, recipe=recipe, feeds=calib_in.feeds[: recipe.calibration_samples])
                quant = Quantization(recipe=f"qdq-a{recipe.activation_type}-w{recipe.weight_type}",
                                     precision=f"{recipe.activation_type}/{recipe.weight_type}", details=details)
        runs = {size: _run(final, prepared) for size, prepared in layouts.items()}
        if recipe.method == "qdq-static":
            from exporter import npu

            qnn_ep = next((ep for ep in profile.execution_providers if ep.name == "QNNExecutionProvider"), None)
            with progress.step("verify", "QNN HTP backend, CPU fallback disabled"):
                qnn_report = npu.verify_on_qnn(final, eval_in.feeds, provider_options=dict(qnn_ep.options) if qnn_ep else None)
            if qnn_report.ok:
                runs = {1: np.concatenate(qnn_report.outputs)}
        with progress.step("validate", f"{task} gate vs PyTorch" + (f", batches of {GATE_BATCHES}" if batched else "")):
            evidence = _evidence(task, runs, reference, _limits(task, thresholds, batched=batched), qnn=qnn_report,
                                 reference_name="pytorch fp32", texts=evals)
            if qnn_report is not None:
                quant = Quantization(recipe=quant.recipe, precision=quant.precision,
                                     details={**quant.details, "qnn": _qnn_details(qnn_report)})

        # Everything below writes into out_dir.
        files: list[Path] = []
        onnx_path = out_dir / ONNX_NAME
        files += _save_model(final, onnx_path)
        golden = _golden_case(onnx_path, eval_in, quantized=recipe.method != "none",
                              qnn_outputs=qnn_report.outputs if qnn_report and qnn_report.ok else None)
        files += _write_tokenizer(src, tokenizer, out_dir)
        if ep_context and qnn_report is not None and qnn_report.ok:
            from exporter import npu

            ctx = npu.write_ep_context(onnx_path, out_dir / "model_ctx.onnx",
                                       provider_options=dict(qnn_ep.options) if qnn_ep else None)
            files.append(ctx)

    spec_config: dict[str, Any] = {"max_length": seq_len, "static_shapes": static}
    if task == "embedding":
        spec_config |= {"pooling": pooling, "normalize": True, "dim": int(reference.shape[1])}
    else:
        spec_config["labels"] = _labels(config)
    if ep_context and (out_dir / "model_ctx.onnx").exists():
        spec_config["ep_context"] = "model_ctx.onnx"
    spec = ModelSpec(entry=ONNX_NAME, inputs=input_names,
                     outputs=["sentence_embedding" if task == "embedding" else "logits"],
                     architecture=config.model_type, config=spec_config)
    return EncoderBuild(onnx_path=onnx_path, files=files, model_spec=spec, quantization=quant, evidence=evidence,
                        golden_case=golden, size_fp32_bytes=size_fp32, size_bytes=_model_bytes(onnx_path))


# --- loading -----------------------------------------------------------------------------------


def _resolve(model: str | Path):
    from exporter.source import resolve_source

    return resolve_source(model)


def _load(src, task: str):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from exporter.source import load_config, load_tokenizer

    config = load_config(src)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported encoder architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if task == "text-classification":
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise TaskNotSupported(
                f"{src.spec} has no sequence-classification head (architectures: {', '.join(archs) or 'none'}); "
                "use --task embedding or a checkpoint fine-tuned for classification"
            )
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModel
    tokenizer = load_tokenizer(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(src.path, dtype=torch.float32, **src.load_kwargs)
    model.eval()
    return model, tokenizer, config


def _pooling_mode(path: Path) -> str:
    """'mean' or 'cls', from a sentence-transformers checkpoint's 1_Pooling/config.json; mean otherwise."""
    cfg = path / "1_Pooling" / "config.json"
    if not cfg.exists():
        return "mean"
    data = json.loads(cfg.read_text())
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_mean_tokens", True):
        return "mean"
    modes = [k for k, v in data.items() if k.startswith("pooling_mode") and v]
    raise TaskNotSupported(f"{cfg}: pooling {modes} is not supported; edgeship exports mean or cls pooling")


def _sequence_length(profile: TargetProfile, tokenizer, config, path: Path) -> int:
    limit = min(int(getattr(config, "max_position_embeddings", 512) or 512), 512)
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < limit:
        limit = int(tokenizer.model_max_length)
    st_config = path / "sentence_bert_config.json"  # sentence-transformers truncates here (256 for MiniLM)
    if st_config.exists():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length") or limit))
    if not profile.shapes.static:
        return limit
    n = profile.shapes.sequence_length
    if not n:
        raise IncompatibleTarget(f"profile {profile.name} has static shapes but no shapes.sequence_length; set it")
    if n > limit:
        raise IncompatibleTarget(
            f"profile {profile.name} wants sequence_length {n} but the model takes at most {limit} tokens; "
            f"set shapes.sequence_length <= {limit} in a copy of the profile"
        )
    return n


def _labels(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def _graph_module(model, input_names: list[str], *, task: str, pooling: str | None):
    import torch

    class EncoderGraph(torch.nn.Module):
        """The HF model plus what the device should not have to do: pooling and normalization."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            kw = dict(zip(input_names, inputs))
            out = self.model(**kw)
            if task == "text-classification":
                return out.logits
            hidden = out.last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                # Mean over unmasked tokens as a [b,1,s] x [b,s,h] MatMul: the same numbers, but
                # one op that NPUs run well instead of a long quantized ReduceSum.
                mask = kw["attention_mask"].to(hidden.dtype).unsqueeze(1)
                weights = mask / mask.sum(-1, keepdim=True).clamp(min=1e-9)
                pooled = torch.matmul(weights, hidden).squeeze(1)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return EncoderGraph().eval()


def _tokenize(tokenizer, texts: Sequence[str], names: list[str], *, static: bool, seq_len: int) -> _Prepared:
    if static:
        enc = tokenizer(list(texts), padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
        arrays = {n: enc[n].astype(np.int64) for n in names}
        return _Prepared([{n: a[i : i + 1] for n, a in arrays.items()} for i in range(len(texts))])
    enc = tokenizer(list(texts), padding=True, max_length=seq_len, truncation=True, return_tensors="np")
    return _Prepared([{n: enc[n].astype(np.int64) for n in names}])


def _batched(tokenizer, texts: Sequence[str], names: list[str], *, size: int, seq_len: int) -> _Prepared:
    """`texts` in padded batches of `size`; above 1, in a fixed shuffled order so that batches mix lengths."""
    order = np.random.default_rng(size).permutation(len(texts)) if size > 1 else np.arange(len(texts))
    feeds = [_tokenize(tokenizer, [texts[i] for i in order[start:start + size]], names, static=False,
                       seq_len=seq_len).feeds[0] for start in range(0, len(texts), size)]
    return _Prepared(feeds, order=tuple(int(i) for i in order))


def _torch_outputs(graph, prepared: _Prepared) -> np.ndarray:
    import torch

    with torch.no_grad():
        outs = [graph(*(torch.from_numpy(v) for v in f.values())).numpy() for f in prepared.feeds]
    return np.concatenate(outs).astype(np.float32)


# --- export and quantization -----------------------------------------------------------------


def _export_onnx(graph, sample: dict[str, np.ndarray], path: Path, *, input_names: list[str], task: str,
                 opset: int, static: bool) -> None:
    import torch

    output = "sentence_embedding" if task == "embedding" else "logits"
    axes = None if static else {**{n: {0: "batch", 1: "sequence"} for n in input_names}, output: {0: "batch"}}
    args = tuple(torch.from_numpy(v) for v in sample.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, args, str(path), input_names=input_names, output_names=[output],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        except Exception as exc:  # torch raises many kinds; the message is what the user needs
            raise ConversionError(f"ONNX export of the encoder failed: {exc}") from exc
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(path))
    _soften_mask(model)
    # 2-D Linear layers (pooler, classifier head) export as Gemm; onnxruntime's quantizer turns
    # them into MatMul + Add anyway. Doing it here lets mixed precision see every MatMul it quantizes.
    ONNXModel(model).replace_gemm_with_matmul()
    onnx.save(model, str(path))


def _soften_mask(model: onnx.ModelProto) -> int:
    """Replace float32-minimum attention-mask fill constants by MASK_FILL; returns how many."""
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                value = numpy_helper.to_array(attr.t)
                if value.size and np.all(value < -1e30):
                    attr.t.CopyFrom(numpy_helper.from_array(np.full_like(value, MASK_FILL), attr.t.name))
                    changed += 1
    return changed


def _to_fp16(src: Path, dst: Path) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))
    return {"keep_io_types": True}


def _dynamic_quantize(fp32: onnx.ModelProto, dst: Path, *, recipe: QuantRecipe, exclude: Sequence[str]) -> None:
    """Per-row int8 activations (exporter.row_quant) on the weight MatMuls not in `exclude`.

    Not onnxruntime's quantize_dynamic: its one activation scale per tensor gives a sentence another
    vector in every batch. Activation x activation MatMuls (attention scores) stay float: quantizing
    both sides of a product of two dynamic ranges costs much accuracy for little speed."""
    try:
        # 7-bit weights where uint8 x int8 pairs saturate (no VNNI)
        model = quantize_rows(fp32, exclude=exclude, per_channel=recipe.per_channel, reduce_range=recipe.reduce_range)
        onnx.save(model, str(dst))
    except (ValueError, KeyError, onnx.checker.ValidationError) as exc:
        raise ConversionError(f"int8 dynamic quantization failed: {exc}") from exc


def _int8_dynamic(src: Path, dst: Path, *, task: str, recipe: QuantRecipe, thresholds: Thresholds,
                  calib: _Prepared, layouts: dict[int, _Prepared], reference: np.ndarray, progress: Progress) -> dict:
    """int8 with per-row activations, and the mixed-precision search that keeps the most sensitive MatMuls float.

    Nine parameters: the search needs the recipe and limits, both text sets (calibration to search, the
    evaluation layouts to confirm) and the reference; they are build_encoder's locals, passed once."""
    fp32 = onnx.load(str(src))
    candidates = mixed_precision.weight_matmuls(fp32)
    user_excluded = [n.name for n in fp32.graph.node if n.name in candidates and _matches(n, recipe.exclude)]
    details: dict[str, Any] = {
        "per_channel": recipe.per_channel,
        "weight_type": "int8",  # symmetric, whatever the recipe's weight_type: per-row activations are symmetric too
        "activations": "per-row",
        "reduce_range": recipe.reduce_range,
        "matmuls": len(candidates),
        "mixed_precision": recipe.mixed_precision,
    }
    limits = _limits(task, thresholds, batched=len(layouts) > 1)
    search_limits = {k: v for k, v in limits.items() if k != "min_batch_cosine"}  # one calibration batch
    float_nodes = list(user_excluded)
    if recipe.mixed_precision:
        all_q = src.parent / "int8-all.onnx"
        _dynamic_quantize(fp32, all_q, recipe=recipe, exclude=user_excluded)
        calib_ref = _run(src, calib)
        judge = _judge(task, calib_ref, search_limits, margin=SEARCH_MARGIN)
        found = mixed_precision.search(fp32, onnx.load(str(all_q)), feeds=calib.feeds, judge=judge,
                                       max_float_fraction=FLOAT_BUDGET, progress=progress.note)
        float_nodes += [n for n in found.float_nodes if n not in float_nodes]
        # Confirm on the evaluation text; if the unseen text still fails, keep the next most
        # sensitive MatMuls in float while the float budget lasts.
        spare = [n for n in found.ranking if n not in float_nodes and found.sensitivity[n] > 0]
        while True:
            _dynamic_quantize(fp32, dst, recipe=recipe, exclude=float_nodes)
            runs = {size: _run(dst, prepared) for size, prepared in layouts.items()}
            ok = not gate_failures(layout_metrics(task, runs, reference), limits)
            spare = [n for n in spare if mixed_precision.float_share(fp32, float_nodes + [n]) <= FLOAT_BUDGET]
            if ok or not spare:
                break
            float_nodes.append(spare.pop(0))
        details |= {
            "search_trials": found.trials,
            "search_score_all_int8": round(found.base_score, 5),
            "search_score": round(found.score, 5),
            "sensitivity_top": {n: round(found.sensitivity[n], 5)
                                for n in sorted(found.sensitivity, key=lambda n: -found.sensitivity[n])[:8]},
            "float_share_of_macs": round(mixed_precision.float_share(fp32, float_nodes), 4),
        }
    else:
        _dynamic_quantize(fp32, dst, recipe=recipe, exclude=float_nodes)
    q = onnx.load(str(dst), load_external_data=False)
    ops = Counter(n.op_type for n in q.graph.node)
    details |= {
        "float_nodes": float_nodes,
        "quantized_matmuls": ops.get("MatMulIntegerToFloat", 0),
        "float_matmuls": ops.get("MatMul", 0),
        "quantized_activations": ops.get("QuantizeLinear", 0),
    }
    details |= _speed(src, dst, layouts[min(layouts)])
    return details


def _int8_recipe_name(recipe: QuantRecipe, details: dict) -> str:
    # the LM path's name for the same recipe, the per-row activations, and what the search kept in float
    name = recipe_name(recipe) + "-rowwise"
    if details.get("float_nodes"):
        name += f"-mixed-{len(details['float_nodes'])}float"
    return name


def _matches(node: onnx.NodeProto, patterns: Sequence[str]) -> bool:
    return any(p in node.name or any(p in i for i in node.input) for p in patterns)


def _speed(fp32: Path, quantized: Path, prepared: _Prepared, *, repeats: int = 3) -> dict:
    """Host timing of the evaluation batch, fp32 vs quantized (best of `repeats`); informational."""
    import onnxruntime as ort

    def best(path: Path) -> float:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        for f in prepared.feeds:
            sess.run(None, f)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for f in prepared.feeds:
                sess.run(None, f)
            times.append(time.perf_counter() - t0)
        return min(times)

    t32, tq = best(fp32), best(quantized)
    return {"host_ms_fp32": round(t32 * 1e3, 2), "host_ms": round(tq * 1e3, 2), "speedup_vs_fp32": round(t32 / tq, 3)}


# --- quality ------------------------------------------------------------------------------------


def _run(path: Path, prepared: _Prepared) -> np.ndarray:
    """The model's outputs, one row per text in text order."""
    out = np.concatenate(mixed_precision.run_model(str(path), prepared.feeds)).astype(np.float32)
    if prepared.order is None:
        return out
    ordered = np.empty_like(out)
    ordered[list(prepared.order)] = out
    return ordered


def _limits(task: str, thresholds: Thresholds, *, batched: bool) -> dict[str, float]:
    """The gate's bounds: the thresholds' own for `task`, else the defaults; the batch check only for
    `batched` (dynamic-shape embedding) graphs, and always there."""
    keys = (("min_cosine_mean", "min_cosine_min", "min_batch_cosine") if task == "embedding"
            else ("min_label_agreement", "min_logits_cosine"))
    have = {k: v for k, v in thresholds.as_dict().items() if k in keys}
    limits = have or dict(DEFAULT_EMBED_THRESHOLDS if task == "embedding" else DEFAULT_CLS_THRESHOLDS)
    if batched:
        limits.setdefault("min_batch_cosine", MIN_BATCH_COSINE)
    else:
        limits.pop("min_batch_cosine", None)
    return limits


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def encoder_metrics(task: str, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Embedding: cosine mean/min per row; classification: label agreement and logits cosine."""
    a, b = outputs.astype(np.float64), reference.astype(np.float64)
    cos = _cosines(a, b)
    metrics = {"max_abs_diff": float(np.abs(a - b).max())}
    if task == "embedding":
        metrics |= {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    else:
        metrics |= {"label_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "logits_cosine": float(cos.mean())}
    return metrics


def layout_metrics(task: str, runs: dict[int, np.ndarray], reference: np.ndarray) -> dict[str, float]:
    """encoder_metrics at the worst of the batch layouts in `runs` (batch size -> outputs in text order);
    with several layouts also `batch_cosine_min`, the least cosine between a text alone and in a batch."""
    per = [encoder_metrics(task, out, reference) for out in runs.values()]
    worst = {k: (max if k == "max_abs_diff" else min)(m[k] for m in per) for k in per[0]}
    alone = runs[min(runs)]
    batched = [_cosines(out, alone).min() for size, out in runs.items() if size != min(runs)]
    if batched:
        worst["batch_cosine_min"] = float(min(batched))
    return worst


def _judge(task: str, reference: np.ndarray, limits: dict[str, float], *, margin: float):
    """A mixed-precision judge: score = minus the summed, threshold-normalized distances to perfect."""

    def judge(outputs: list[np.ndarray]) -> tuple[float, bool]:
        m = encoder_metrics(task, np.concatenate(outputs), reference)
        score, ok = 0.0, True
        for key, bound in limits.items():
            value, room = m[metric_of(key)], max(1.0 - bound, 1e-6)
            score -= (1.0 - value) / room
            ok &= value >= bound + margin * room
        if task == "text-classification":
            score += m["logits_cosine"]  # agreement moves in steps; the cosine ranks candidates between them
        return score, ok

    return judge


def _evidence(task: str, runs: dict[int, np.ndarray], reference: np.ndarray, limits: dict[str, float], *, qnn,
              reference_name: str, texts: Sequence[str]) -> Evidence:
    """The gate's input: the worst layout's metrics, per batch size, and what QNN HTP made of the graph."""
    cos = np.min([_cosines(out, reference) for out in runs.values()], axis=0)
    details: dict[str, Any] = {"eval_texts": len(texts), "worst_text": texts[int(cos.argmin())][:120]}
    if len(runs) > 1:
        details["batch_sizes"] = {str(size): {"cosine_mean": round(float(_cosines(out, reference).mean()), 6),
                                              "cosine_min": round(float(_cosines(out, reference).min()), 6)}
                                  for size, out in runs.items()}
    if qnn is not None:
        details["qnn"] = qnn.summary()
        if qnn.ok:
            details["measured_on"] = "QNN HTP (onnxruntime-qnn, CPU fallback disabled)"
    return Evidence(layout_metrics(task, runs, reference), limits, reference_name, details,
                    refused=tuple(qnn.failures()) if qnn is not None else ())


def _qnn_details(report) -> dict:
    return {
        "ok": report.ok,
        "rejected_nodes": report.rejected,
        "reasons": report.reasons,
        "error": report.error,
        "compile_seconds": round(report.compile_seconds, 2),
        "run_seconds": round(report.run_seconds, 2),
    }


# --- files --------------------------------------------------------------------------------------


def _model_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    extra = {
        e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"
    }
    return path.stat().st_size + sum((path.parent / x).stat().st_size for x in extra)


def _save_model(src: Path, dst: Path) -> list[Path]:
    """Write the model; weights over 2 GB go to `<name>.data` (protobuf's limit)."""
    model = onnx.load(str(src))
    if model.ByteSize() < 2**31 - 2**20:
        onnx.save(model, str(dst))
        return [dst]
    data = dst.with_name(dst.name + ".data")
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [dst, data]


def _golden_case(model_path: Path, prepared: _Prepared, *, quantized: bool,
                 qnn_outputs: list[np.ndarray] | None) -> GoldenCase:
    """A few evaluation rows and the model's CPU outputs; the tolerance covers other kernels and the NPU."""
    import onnxruntime as ort

    feeds = {k: v[:GOLDEN_ROWS] for k, v in prepared.feeds[0].items()}  # static graphs: one row
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
        output_name = sess.get_outputs()[0].name
        outs.append(sess.run(None, feeds)[0])
    spread = float(np.abs(outs[0] - outs[1]).max())
    if qnn_outputs:
        spread = max(spread, float(np.abs(qnn_outputs[0][: len(outs[0])] - outs[0]).max()))
    floor = 5e-3 if quantized else 1e-4
    return GoldenCase(feeds, {output_name: outs[0]}, atol=max(floor, 2 * spread), rtol=1e-2 if quantized else 1e-3)


def _write_tokenizer(src, tokenizer, out_dir: Path) -> list[Path]:
    """The shared tokenizer writer (exporter.source.write_tokenizer); returns every file it added."""
    from exporter.source import write_tokenizer

    before = set(out_dir.iterdir())
    write_tokenizer(src, tokenizer, out_dir)
    return sorted(p for p in out_dir.iterdir() if p not in before and p.is_file())


# --- the pipeline -------------------------------------------------------------------------------


def disk_bytes(job: Any) -> int:
    return 4 * sum(p.stat().st_size for p in job.src.path.glob("*.safetensors"))


def build(job: Any, stage: Path, work: Path) -> Any:
    """The encoder files in `stage`, measured; run_export judges, writes the golden files and seals."""
    from exporter.benchmark import benchmark_latency
    from exporter.pipelines import Built

    request, profile = job.request, job.profile
    try:
        evals = calibration.eval_texts(request.eval_text) if request.eval_text else None
        calib = calibration.calibration_texts(request.calibration_text) if request.calibration_text else None
    except calibration.CalibrationError as exc:
        raise SourceError(str(exc)) from None
    made = build_encoder(job.src.path, stage, task=job.task, profile=profile, recipe=job.recipe,
                         thresholds=job.thresholds, eval_texts=evals, calibration_texts=calib,
                         ep_context=request.ep_context, progress=job.progress)
    feed = made.golden_case.inputs
    return Built(
        entry=made.onnx_path, model_spec=made.model_spec, quantization=made.quantization, evidence=made.evidence,
        golden=made.golden_case, fp32_bytes=made.size_fp32_bytes,
        host_benchmark=(lambda: benchmark_latency(made.onnx_path, feed, threads=profile.intra_op_threads))
        if profile.device_class == "cpu" else None,
    )
