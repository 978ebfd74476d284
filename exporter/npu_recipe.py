"""The quantization recipe for decoder LMs on the Hexagon HTP (npu-qnn-htp), and the cheap parts of its gate.

What the recipe changes against plain QDQ (uint16 activations, int8 per-channel weights, MinMax):

- **fp16 regions.** The residual stream and the RMSNorms that read it stay float; the QNN EP runs
  them in fp16 on the HTP (`enable_htp_fp16_precision=1`, which the QNN EP accepts only with a
  `soc_model`). SmolLM2-135M's residual stream reaches 1.4e4 while most of it is below 10: one
  uint16 scale per tensor makes its step 0.21, fp16 keeps 11 bits of every value.
- **Calibration windows.** The calibration texts are joined and cut into windows as long as the
  evaluation's, so the calibrated ranges cover later positions too, not only 10-token prompts.
- **Teacher-forced greedy.** The gate's greedy match is the share of reference greedy tokens the
  model also picks before the first split. Feeding the reference's own continuation gives that
  prefix exactly (while they agree, the model's input is the reference's) in a few prefill calls
  instead of one HTP call per token, so 64 greedy tokens cost what 16 did not.

bench/npu_lm_recipes.py measures each part (docs/EXPORT.md, "Language models on npu-qnn-htp").
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from exporter.errors import ConversionError
from exporter.gate import failures, metric_of

REGIONS = ("residual", "norm")
NORM_OPS = {"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization"}
# the QNN EP options that make the HTP run float nodes in fp16 (it refuses the first without the second)
FP16_OPTIONS = ("enable_htp_fp16_precision", "soc_model")


@dataclass(frozen=True)
class FloatRegions:
    """Nodes of the float graph that stay float in the QDQ model, by region."""

    residual: tuple[str, ...] = ()  # the Adds that carry the residual stream
    norm: tuple[str, ...] = ()  # the norms that read it

    @property
    def nodes(self) -> list[str]:
        return [*self.residual, *self.norm]

    def counts(self) -> dict[str, int]:
        return {"residual": len(self.residual), "norm": len(self.norm)}


def float_regions(model: onnx.ModelProto, regions: Sequence[str]) -> FloatRegions:
    """The residual-stream Adds and/or norms of the static decoder graph (exporter/npu_lm.py).

    A residual Add is one fed by an attention o_proj or MLP down_proj MatMul (the block output
    joining the stream); the norms are every RMSNorm/LayerNorm node (each reads the stream).
    """
    unknown = sorted(set(regions) - set(REGIONS))
    if unknown:
        raise ConversionError(f"unknown float region(s) {unknown}; use some of {list(REGIONS)}")
    producer = {o: n for n in model.graph.node for o in n.output}

    def joins_stream(node: onnx.NodeProto) -> bool:
        return any(i in producer and producer[i].op_type == "MatMul"
                   and ("o_proj" in producer[i].name or "down_proj" in producer[i].name) for i in node.input)

    residual = tuple(n.name for n in model.graph.node if n.op_type == "Add" and joins_stream(n)) \
        if "residual" in regions else ()
    norm = tuple(n.name for n in model.graph.node if n.op_type in NORM_OPS) if "norm" in regions else ()
    return FloatRegions(residual=residual, norm=norm)


def check_fp16_options(regions: Sequence[str], provider_options: Mapping[str, str], *, profile: str) -> None:
    """Float regions need the HTP's fp16 mode; say which QNN options the profile lacks."""
    if not regions:
        return
    missing = [k for k in FP16_OPTIONS if str(provider_options.get(k, "0" if k.startswith("enable") else "")) in ("", "0")]
    if missing:
        raise ConversionError(
            f"{profile}: float_regions {list(regions)} run in fp16 on the HTP, which needs the QNN options "
            f"{', '.join(missing)}; set enable_htp_fp16_precision = \"1\" and the SoC's soc_model in the profile"
        )


def calibration_windows(prompts: Sequence[np.ndarray], *, length: int) -> list[np.ndarray]:
    """The calibration texts joined end to end and cut into `length`-token windows (a short tail is kept
    as its own window, so a single short text still calibrates)."""
    if length < 1:
        raise ValueError(f"window length {length} must be >= 1")
    ids = np.concatenate([np.asarray(p, np.int64) for p in prompts if len(p)]) if prompts else np.zeros(0, np.int64)
    windows = [ids[k : k + length] for k in range(0, len(ids), length)]
    return [w for w in windows if len(w) >= min(length, len(ids)) // 2 or len(windows) == 1]


def forced_greedy(lm, prompts: np.ndarray, reference: np.ndarray) -> list[np.ndarray]:
    """Per prompt, the model's next-token picks along the reference's greedy continuation.

    `lm` is a StaticDecoder. `prefix_match(pick, reference)` equals the free-running greedy match:
    up to the first split the model's input is the reference's own.
    """
    picks = []
    for prompt, ref in zip(prompts, reference):
        lm.reset()
        logits = lm.forward([*prompt.tolist(), *ref[:-1].tolist()])
        picks.append(logits[len(prompt) - 1 :].argmax(-1).astype(np.int64))
    return picks


FP16_MAX = 65504.0
FP16_MIN_ELEMENTS = 1024  # weights and tables; the norms' small vectors stay float32


def store_fp16(model: onnx.ModelProto, *, names: Collection[str] | None = None) -> int:
    """fp16 bundles (and `names`, the float-kept weights of a QDQ one, when given: only those): every float32
    initializer of at least FP16_MIN_ELEMENTS stored as float16 and
    read through a Cast back to float32, in place; returns how many. The graph computes what it did with the
    weights rounded to fp16, which the HTP's fp16 mode does anyway; onnxruntime folds each Cast of a constant
    when it loads the graph, so both the QNN EP and the CPU fallback see float32 weights, and the file is half
    the size. A tensor beyond fp16's range stays float32."""
    from onnx import helper, numpy_helper

    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if (init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS
                or (names is not None and init.name not in names)):
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        if not np.isfinite(value).all() or np.abs(value).max() > FP16_MAX:
            kept.append(init)
            continue
        half = numpy_helper.from_array(value.astype(np.float16), init.name + "_fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], name=init.name + "_to_fp32",
                                      to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return len(casts)


# --- float fallback: the recipe measures itself ---------------------------------------------------------------
# With `mixed_precision` on, a w8a16 model that misses its gate keeps whole classes of linears float (the HTP runs
# them in fp16), most helpful class first, until the gate's metrics pass. Classes, not single MatMuls: SmolLM2's
# sensitivities are per class (docs/EXPORT.md: every class but q_proj flips a greedy run on its own) and a class is
# one candidate per layer kind (5) where single MatMuls would be 5 per layer (150 measurements for SmolLM2).

LINEAR_CLASS = re.compile(r"(?:^|/)((?:[a-z]+_)*proj|lm_head)(?:/|$)")


def linear_classes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Weight MatMuls of the static graph by the module they come from ("down_proj", "lm_head", ...), in graph
    order; MatMuls of two activations (attention scores) are no candidates."""
    inits = {i.name for i in model.graph.initializer}
    classes: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            m = LINEAR_CLASS.search(n.name)
            if m:
                classes.setdefault(m.group(1), []).append(n.name)
    return classes


def shortfall(metrics: Mapping[str, float], limits: Mapping[str, float]) -> tuple[float, float]:
    """(how far `metrics` are from passing `limits`, how far past them they are): the first sums each failing
    metric's distance past its bound, the second each metric's signed distance, both relative to the bound. A
    candidate ranks by the first (smaller is better), then by the second (larger is better), so candidates are
    ordered even when every one passes, or none does."""
    short = margin = 0.0
    for key, bound in limits.items():
        value = metrics.get(metric_of(key))
        if value is None:
            continue
        if not np.isfinite(value):
            return float("inf"), float("-inf")
        past = (value - bound if key.startswith("min_") else bound - value) / max(abs(bound), 1e-6)
        short += max(0.0, -past)
        margin += past
    return short, margin


class FloatFallback:
    """Classes of linears a w8a16 model keeps float (the HTP runs them in fp16) until it meets the gate.

    `start()` measures the all-quantized model (through `measure(float_nodes) -> metrics`, the CPU EP in the
    exporter) and, if it misses `limits`, each class float on its own; then keeps classes float, the one that
    recovers most first, until the measured metrics pass. `widen()` keeps one more class float, for when the
    target itself (the HTP) still refuses what the CPU EP passed; it ranks the classes first if `start()` did
    not need to. Classes, not single MatMuls: one candidate per layer kind (5 for a llama) where single MatMuls
    would be 5 per layer (150 measurements for SmolLM2), and SmolLM2's sensitivities are per class
    (docs/EXPORT.md: every class but q_proj flips a greedy run on its own).
    """

    def __init__(self, classes: Mapping[str, Sequence[str]], measure, limits: Mapping[str, float], *, progress=None):
        self.classes = {c: list(nodes) for c, nodes in classes.items()}
        self.measure, self.limits = measure, dict(limits)
        self.note = progress or (lambda _msg: None)
        self.trials: list[dict] = []  # every CPU EP measurement: the float classes and the metrics
        self.on_target: list[dict] = []  # the gate's own measurements of the chosen models (the HTP)
        self.ranking: list[str] | None = None
        self.alone: dict[str, dict[str, float]] = {}  # each class float on its own: its metrics, once ranked
        self.chosen: list[str] = []
        self.passed = False

    def nodes(self, classes: Sequence[str]) -> list[str]:
        return [n for c in classes for n in self.classes[c]]

    @property
    def float_nodes(self) -> list[str]:
        return self.nodes(self.chosen)

    def _run(self, chosen: Sequence[str]) -> dict[str, float]:
        metrics = self.measure(self.nodes(chosen))
        self.trials.append({"float_classes": list(chosen),
                            "metrics": {k: round(float(v), 6) for k, v in metrics.items()}})
        return metrics

    def _rank(self) -> list[str]:
        if self.ranking is None:
            self.alone = {c: self._run([c]) for c in self.classes}
            each = {c: shortfall(m, self.limits) for c, m in self.alone.items()}
            self.ranking = sorted(self.classes, key=lambda c: (each[c][0], -each[c][1]))
            self.note(f"linear classes ranked by what keeping them float recovers: {', '.join(self.ranking)}")
        return self.ranking

    def start(self) -> list[str]:
        """The classes to keep float, as the measurements say (none when the quantized model passes)."""
        base = self._run([])
        missed = failures(base, self.limits)
        if not missed:
            self.passed = True
            return self.chosen
        self.note(f"w8a16 misses the gate on the CPU EP: {'; '.join(missed)}")
        for c in self._rank():
            self.chosen.append(c)
            metrics = self.alone[c] if len(self.chosen) == 1 else self._run(self.chosen)
            if not failures(metrics, self.limits):
                self.passed = True
                break
        return self.chosen

    def widen(self, target_metrics: Mapping[str, float]) -> list[str] | None:
        """One class more float after the target measured `target_metrics` for the current choice; None when
        every class is float already."""
        self.on_target.append({"float_classes": list(self.chosen),
                               "metrics": {k: round(float(v), 6) for k, v in target_metrics.items()}})
        rest = [c for c in self._rank() if c not in self.chosen]
        if not rest:
            return None
        self.chosen.append(rest[0])
        return self.chosen

    def details(self) -> dict:
        return {"float_classes": list(self.chosen), "float_matmuls": len(self.float_nodes),
                "passed_on_cpu": self.passed, "ranking": self.ranking, "cpu_trials": self.trials,
                "refused_on_target": self.on_target}
