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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from exporter.errors import ConversionError

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


def store_fp16(model: onnx.ModelProto) -> int:
    """`--quant fp16` bundles: every float32 initializer of at least FP16_MIN_ELEMENTS stored as float16 and
    read through a Cast back to float32, in place; returns how many. The graph computes what it did with the
    weights rounded to fp16, which the HTP's fp16 mode does anyway; onnxruntime folds each Cast of a constant
    when it loads the graph, so both the QNN EP and the CPU fallback see float32 weights, and the file is half
    the size. A tensor beyond fp16's range stays float32."""
    from onnx import helper, numpy_helper

    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
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
