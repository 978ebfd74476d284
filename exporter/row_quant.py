"""Per-row dynamic int8 for weight MatMuls: every token row gets its own activation scale.

    quantize_rows(fp32_model, exclude=..., reduce_range=...) -> onnx.ModelProto

onnxruntime's dynamic int8 (`DynamicQuantizeLinear`) takes one activation scale per tensor, so a
sentence's numbers depend on what it is batched with and on the padding. Here each row x of the
activation [.., k] is quantized alone:

    m = max(|x|)                  (per row, ReduceMax over the last axis)
    q = QuantizeLinear(x / m, 1/127, 128)                 uint8, zero point 128 (symmetric)
    y = MatMulIntegerToFloat(q, Wq, 1/127, w_scale, 128) * m      int8 per-channel weights

A row's output depends on that row alone: a sentence gets the same vector alone and in any padded
batch. The quantization of one activation is shared by every MatMul that reads it (q, k, v).
Weights are symmetric int8 per output channel (or per tensor), in 7 bits with `reduce_range` (CPUs without VNNI add
uint8 x int8 products in pairs in a saturating int16). The graph keeps the original MatMul output
names, so `mixed_precision.restore_float` can put any of them back in float.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.mixed_precision import weight_matmuls

MS_DOMAIN = "com.microsoft"
# A row of zeros would give m = 0 and x / m = NaN, whose uint8 code is up to the kernel (onnxruntime's CPU
# output is then 0 * code = 0); a positive floor keeps every code defined (a zero row's are all 128).
MIN_SCALE = 1e-12


def quantize_rows(fp32: onnx.ModelProto, *, exclude: Sequence[str] = (), per_channel: bool = True,
                  reduce_range: bool) -> onnx.ModelProto:
    """`fp32` with every weight MatMul not named in `exclude` on per-row int8 activations."""
    inits = {i.name: i for i in fp32.graph.initializer}
    targets = set(weight_matmuls(fp32)) - set(exclude)
    qmax = 63 if reduce_range else 127
    consts = [
        numpy_helper.from_array(np.array(1.0 / 127, np.float32), "rowq.step"),  # the unit row's code step
        numpy_helper.from_array(np.array(MIN_SCALE, np.float32), "rowq.min_scale"),
        # uint8 codes around 128, not int8: signed x signed ran at 0.39x fp32 on an AVX2 EPYC without VNNI
        numpy_helper.from_array(np.array(128, np.uint8), "rowq.zero_point"),
    ]
    new_inits, nodes, quantized = list(consts), [], {}
    for node in fp32.graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, w_name = node.input
        if x not in quantized:  # one quantization per activation, shared by its readers
            quantized[x] = _quantize_activation(x, nodes, tag=f"rowq.{len(quantized)}")
        q, scale = quantized[x]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)  # [k, n]
        amax = np.abs(w).max(axis=0) if per_channel else np.full(w.shape[1], np.abs(w).max())
        w_scale = np.maximum(amax, 1e-12) / qmax
        w_q = np.clip(np.rint(w / w_scale), -qmax, qmax).astype(np.int8)
        name = node.name
        new_inits += [numpy_helper.from_array(w_q, f"{w_name}.rowq_int8"),
                      numpy_helper.from_array(w_scale.astype(np.float32), f"{w_name}.rowq_scale")]
        nodes += [
            helper.make_node("MatMulIntegerToFloat",
                             [q, f"{w_name}.rowq_int8", "rowq.step", f"{w_name}.rowq_scale", "rowq.zero_point"],
                             [f"{name}.rowq_acc"], name=f"{name}/RowQ", domain=MS_DOMAIN),
            helper.make_node("Mul", [f"{name}.rowq_acc", scale], list(node.output), name=name),
        ]
    used = {i for n in nodes for i in n.input}
    kept = [i for i in fp32.graph.initializer if i.name in used]
    graph = helper.make_graph(nodes, fp32.graph.name, list(fp32.graph.input), list(fp32.graph.output),
                              kept + [i for i in new_inits if i.name in used])
    opsets = [o for o in fp32.opset_import if o.domain != MS_DOMAIN] + [helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = fp32.ir_version
    return model


def _quantize_activation(x: str, nodes: list[onnx.NodeProto], *, tag: str) -> tuple[str, str]:
    """Append the nodes that quantize activation `x` row by row; returns (uint8 codes, row scales)."""
    nodes += [
        helper.make_node("Abs", [x], [f"{tag}.abs"], name=f"{tag}/Abs"),
        helper.make_node("ReduceMax", [f"{tag}.abs"], [f"{tag}.amax"], axes=[-1], keepdims=1, name=f"{tag}/ReduceMax"),
        helper.make_node("Max", [f"{tag}.amax", "rowq.min_scale"], [f"{tag}.scale"], name=f"{tag}/Floor"),
        helper.make_node("Div", [x, f"{tag}.scale"], [f"{tag}.unit"], name=f"{tag}/Div"),
        helper.make_node("QuantizeLinear", [f"{tag}.unit", "rowq.step", "rowq.zero_point"], [f"{tag}.q"],
                         name=f"{tag}/Quantize"),
    ]
    return f"{tag}.q", f"{tag}.scale"
