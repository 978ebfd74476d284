"""Sensitivity-based mixed precision for int8 dynamic quantization.

Per-channel int8 on every MatMul costs all-MiniLM-L6-v2 about 1.6 points of mean embedding
cosine; a handful of MatMuls (those fed by outlier-heavy activations) cause most of it. The search:

1. quantize every weight MatMul; if the judge is satisfied, done;
2. for each MatMul, measure the quality with only that one kept in float (exclude-one-at-a-time);
   the gain over the all-int8 model is its sensitivity;
3. keep MatMuls in float, most sensitive first, until the judge is satisfied
   or the float budget (a share of the MatMul multiply-adds, so the model stays clearly faster
   than fp32) is spent.

Step 2 does not re-run the quantizer for every candidate: the all-int8 graph is edited in memory
(the quantized pattern that produces the MatMul's output is swapped for the original float
MatMul, dead nodes pruned), which is exactly what excluding it from the quantizer produces
(onnxruntime's `nodes_to_exclude`, `row_quant.quantize_rows(exclude=...)`; both tested), at a fraction
of the cost. The final model is always written by the quantizer with the chosen exclusions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

# A judge looks at a candidate's outputs and says (score, passes); higher score is better.
Judge = Callable[[list[np.ndarray]], tuple[float, bool]]
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class SearchResult:
    """What the search chose and why."""

    float_nodes: list[str]  # MatMuls kept in float, in the order chosen
    ranking: list[str]  # every candidate, most sensitive first
    sensitivity: dict[str, float]  # node -> score gain when only it stays float
    base_score: float  # all-int8 score
    score: float  # score with `float_nodes` in float
    passed: bool  # the judge was satisfied within the float budget
    trials: int  # candidate graphs evaluated
    history: list[tuple[int, float]] = field(default_factory=list)  # (float count, score) per greedy step


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is an initializer (what dynamic int8 quantizes)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits]


def restore_float(quantized: onnx.ModelProto, fp32: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """`quantized` with the MatMuls `names` put back in float, as `nodes_to_exclude` would have left them."""
    if not names:
        return quantized
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    replace: dict[str, onnx.NodeProto] = {}  # output tensor -> float node that must produce it
    for name in names:
        node = fp32_nodes[name]
        replace[node.output[0]] = node
    nodes: list[onnx.NodeProto] = []
    for node in quantized.graph.node:
        hit = next((o for o in node.output if o in replace), None)
        if hit is None:
            nodes.append(node)
        else:
            nodes.append(replace.pop(hit))
    if replace:
        missing = [n.name for n in replace.values()]
        raise ValueError(f"quantized graph has no producer for the outputs of {missing}; was it made from this fp32 model?")
    nodes = _live_nodes(nodes, [o.name for o in quantized.graph.output])
    used = {i for n in nodes for i in n.input}
    inits = [i for i in quantized.graph.initializer if i.name in used]
    have = {i.name for i in inits}
    inits += [fp32_inits[t] for t in used if t in fp32_inits and t not in have]
    graph = onnx.helper.make_graph(nodes, quantized.graph.name, list(quantized.graph.input),
                                   list(quantized.graph.output), inits)
    model = onnx.helper.make_model(graph, opset_imports=list(quantized.opset_import))
    model.ir_version = quantized.ir_version
    return model


def _live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes that contribute to `outputs`, in their original (topological) order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    live: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[t] for t in nodes[i].input if t in producer)
    return [n for i, n in enumerate(nodes) if i in live]


def run_model(model: onnx.ModelProto | str, feeds: Sequence[Feeds]) -> list[np.ndarray]:
    """The first output of `model` for each feed, on the CPU EP."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def search(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    *,
    feeds: Sequence[Feeds],
    judge: Judge,
    max_float_fraction: float = 0.34,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Choose which weight MatMuls of `quantized` (the all-int8 graph of `fp32`) stay float."""
    candidates = weight_matmuls(fp32)
    cost = weight_costs(fp32)
    budget = max_float_fraction * sum(cost.values())

    def score(names: Sequence[str]) -> tuple[float, bool]:
        return judge(run_model(restore_float(quantized, fp32, names), feeds))

    base, ok = score([])
    trials = 1
    if ok:
        return SearchResult([], [], {}, base, base, True, trials, [(0, base)])
    sensitivity: dict[str, float] = {}
    for name in candidates:
        s, _ = score([name])
        trials += 1
        sensitivity[name] = s - base
    if progress:
        progress(f"sensitivity of {len(candidates)} MatMuls measured; all-int8 score {base:.4f}")
    # Most sensitive first. Ranking by gain per multiply-add instead was tried on MiniLM: it kept
    # 15 MatMuls (33 % of the multiply-adds) where this keeps 5 (24 %), for the same gate.
    ranking = sorted(candidates, key=lambda n: -sensitivity[n])
    chosen: list[str] = []
    history = [(0, base)]
    current, ok, spent = base, False, 0
    for name in ranking:
        if sensitivity[name] <= 0:
            break
        if spent + cost[name] > budget:
            continue
        chosen.append(name)
        spent += cost[name]
        current, ok = score(chosen)
        trials += 1
        history.append((len(chosen), current))
        if progress:
            progress(f"float {len(chosen)}: score {current:.5f}")
        if ok:
            break
    return SearchResult(chosen, ranking, sensitivity, base, current, ok, trials, history)


def weight_costs(model: onnx.ModelProto) -> dict[str, int]:
    """Weight element count of each weight MatMul: its multiply-adds per token."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return {n.name: sizes[n.input[1]] for n in model.graph.node if n.name in set(weight_matmuls(model))}


def float_share(model: onnx.ModelProto, names: Sequence[str]) -> float:
    """Share of the weight MatMuls' multiply-adds that `names` keep in float."""
    cost = weight_costs(model)
    return sum(cost[n] for n in names) / max(1, sum(cost.values()))
