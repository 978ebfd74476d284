"""The default accuracy policy of a GGUF import: the fastest one whose quality is at least llama.cpp's class.

Level 4 (activations rounded to int8 per block, the arithmetic llama.cpp's own CPU kernels use) decodes
1.5-4x faster per linear than level 0 (exporter/gguf/levels.py), but its error is not spread evenly: a
few linears whose inputs carry outliers make most of it. So the search, on the gate's own evaluation
sequences and against its PyTorch float32 reference:

1. probe: one run of the exact graph with every body MatMulNBits beside a level-4 twin of itself gives
   each linear's own level-4 error, ||y4 - y0|| / ||y0|| over the sequences;
2. the whole body at level 4: if it meets the bar (levels.LLAMA_CPP_CLASS, or the user's --threshold on
   the same metric), that is the policy;
3. else the k linears with the largest error stay at level 0, k the smallest that meets the bar, found by
   bisection over the probe's order in at most MAX_EVALUATIONS runs; k = all is the exact policy, which
   needs no run;
4. the caller builds the chosen policy and its gate measures it on the gate's own text. Should the gate refuse
   a mix the search passed (the two texts differ, so a bar the search met by a hair can be missed there),
   `Searched.after_refusal` steps to the next passing trial that kept more linears at level 0, then to the exact
   policy, and the manifest records each refusal.

Candidates are the exact graph with its MatMulNBits accuracy_level attributes changed (the weights are
the same blocks), so a step costs one session and one pass over the sequences, not a rebuild; the
caller then builds the chosen policy itself. An 8-bit linear runs at level 0 as two exact 4-bit halves:
both halves at level 4 compute what the one 8-bit node at level 4 does (the same int8 activations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.gate import failures, metric_of
from exporter.gguf.quality import nll as token_nll
from exporter.gguf.levels import (
    EXACT_POLICY,
    EXACT_TOP_K,
    LLAMA_CPP_CLASS,
    AccuracyPolicy,
    weight_class,
)

BODY_CLASSES = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")
MAX_EVALUATIONS = 6  # bisection steps after the all-level-4 try: ~1/64 of the linears' resolution
SEARCH_METRICS = ("ppl_delta", "top1_agreement", "greedy_match")  # the limits a user's --threshold adds to the bar
WINDOW, MAX_WINDOWS = 128, 16  # the evaluation text in disjoint 128-token windows, ~2,000 tokens: top-1 to ~0.4 %


@dataclass(frozen=True)
class Trial:
    """One candidate the search measured: how many linears it kept at level 0, and its metrics."""

    kept: int
    metrics: dict[str, float]
    misses: list[str]

    @property
    def passed(self) -> bool:
        return not self.misses


@dataclass(frozen=True)
class Searched:
    """The search's answer: the policy, the bar it met, every trial, and each linear's level-4 error."""

    policy: AccuracyPolicy
    bar: dict[str, float]
    linears: int  # body linears in the graph
    trials: list[Trial] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # stem -> relative level-4 output error
    chosen: Trial | None = None  # the trial of the chosen policy (None: the exact policy, which was not run)
    refused: tuple[dict[str, Any], ...] = ()  # mixes the gate then refused on its own text: kept_at_0, failures

    def line(self) -> str:
        """The summary's one line: what runs at which level, and the quality it was chosen on."""
        bar = ", ".join(_bar_text(k, v) for k, v in self.bar.items())
        why = "; ".join(self.refused[-1]["failures"]) if self.refused else ""
        refused = f"; the gate refused a mix with fewer at level 0: {why}" if self.refused else ""
        if self.chosen is None and self.refused:
            return (f"exact: every linear at level 0 (the search's level-4 mixes met {bar} on its windows, the gate "
                    f"refused {len(self.refused)} on its own text: {why})")
        if self.chosen is None:
            return (f"exact: every linear at level 0 (no level-4 mix of the {self.linears} body linears met "
                    f"{bar} in {len(self.trials)} tries)")
        m = self.chosen.metrics
        kept = len(self.policy.exact_stems)
        where = "the whole body" if not kept else f"{self.linears - kept} of {self.linears} body linears"
        return (f"{where} at level 4 (int8 activations, llama.cpp's class), lm_head top-{EXACT_TOP_K} exact; "
                f"ppl {m['ppl_delta']:+.2%}, top-1 {m['top1_agreement']:.2%} (bar: {bar}){refused}")

    def after_refusal(self, failures: Sequence[str]) -> Searched:
        """The next more exact policy once the gate refused this one on its own text, which can differ from the
        search's windows by a few tenths of a percent at a bar's edge: of the trials that passed, the one that
        kept the fewest linears beyond this one; if none did, the exact policy."""
        if self.chosen is None:
            raise ValueError("the exact policy has no more exact policy after it")
        refused = (*self.refused, {"kept_at_0": self.chosen.kept, "failures": list(failures)})
        later = [t for t in self.trials if t.passed and t.kept > self.chosen.kept]
        if not later:
            return replace(self, policy=EXACT_POLICY, chosen=None, refused=refused)
        step = min(later, key=lambda t: t.kept)
        return replace(self, policy=searched_policy(worst_first(self.errors)[:step.kept], self.errors), chosen=step,
                       refused=refused)

    def details(self) -> dict[str, Any]:
        """What the manifest records beside the policy: the bar, the trials, the worst linears."""
        worst = sorted(self.errors.items(), key=lambda kv: -kv[1])[:8]
        return {
            "bar": dict(self.bar), "body_linears": self.linears,
            "trials": [{"kept_at_0": t.kept, **{k: round(v, 6) for k, v in t.metrics.items()}, "passed": t.passed}
                       for t in self.trials],
            "largest_level4_errors": {k: round(v, 6) for k, v in worst},
            **({"gate_refused": [dict(r) for r in self.refused]} if self.refused else {}),
        }


def search_bar(user: Mapping[str, float] | None = None) -> dict[str, float]:
    """LLAMA_CPP_CLASS with the user's limits on the same or other quality metrics on top (theirs win)."""
    bar = dict(LLAMA_CPP_CLASS)
    for key, value in (user or {}).items():
        if metric_of(key) in SEARCH_METRICS:
            bar[key] = value
    return bar


Evaluate = Callable[[Path], dict[str, float]]


def search_policy(exact_onnx: Path, evaluate: Evaluate, *, bar: Mapping[str, float],
                  probe: Callable[[Path], dict[str, float]],
                  progress: Callable[[str], None] | None = None) -> Searched:
    """The fastest policy for the exact graph at `exact_onnx` (built with EXACT_POLICY) that meets `bar`.

    `probe(path)` runs a probe graph and returns its outputs' sums (see probe_graph); `evaluate(path)` runs a
    candidate graph and returns the gate's metrics."""
    say = progress or (lambda _msg: None)
    exact_onnx = Path(exact_onnx)
    model = onnx.load(exact_onnx, load_external_data=False)
    units = body_units(model)
    if not units:
        return Searched(EXACT_POLICY, dict(bar), 0)
    scratch = exact_onnx.parent / ".search.onnx"  # beside the model: its external data is found by relative path
    try:
        onnx.save_model(probe_graph(model, units), scratch)
        sums = probe(scratch)
        errors = {u: float(np.sqrt(sums[f"{u}|err"] / max(sums[f"{u}|out"], 1e-30))) for u in units}
        order = worst_first(errors)  # kept at level 0 first
        say(f"level-4 error per linear: largest {errors[order[0]]:.3g} ({order[0]}), median "
            f"{float(np.median(list(errors.values()))):.3g}")

        trials: list[Trial] = []

        def trial(k: int) -> Trial:
            kept = frozenset(order[:k])
            onnx.save_model(with_levels(model, units, kept), scratch)
            metrics = evaluate(scratch)
            t = Trial(k, metrics, failures(metrics, bar))
            trials.append(t)
            say(f"{len(units) - k} of {len(units)} linears at level 4: ppl {metrics['ppl_delta']:+.3%}, "
                f"top-1 {metrics['top1_agreement']:.2%}: {'meets the bar' if t.passed else 'misses it'}")
            return t

        best: Trial | None = trial(0)  # None: only the exact policy (all kept at level 0) is known to pass
        if not best.passed:
            low, high, best = 0, len(units), None  # trial(low) fails
            for _ in range(MAX_EVALUATIONS):
                if high - low <= 1:
                    break
                mid = (low + high) // 2
                if (t := trial(mid)).passed:
                    high, best = mid, t
                else:
                    low = mid
    finally:
        scratch.unlink(missing_ok=True)
    if best is None:
        return Searched(EXACT_POLICY, dict(bar), len(units), trials, errors)
    return Searched(searched_policy(order[:best.kept], errors), dict(bar), len(units), trials, errors, chosen=best)


def worst_first(errors: Mapping[str, float]) -> list[str]:
    """The linears by level-4 error, largest first (ties in graph order): the order they stay at level 0 in."""
    return sorted(errors, key=lambda u: -errors[u])


def run_probe(path: Path, sequences: np.ndarray) -> dict[str, float]:
    """probe_graph's sums over the evaluation sequences [n, s], each run as one prompt."""
    from exporter.lm import OrtDecoder

    dec = OrtDecoder(path)
    names = [n for n in dec.output_names if "|" in n]
    sums = dict.fromkeys(names, 0.0)
    for seq in sequences:
        for name, value in zip(names, dec.session.run(names, dec.feed(seq[None, :], dec.empty_past()))):
            sums[name] += float(value)
    return sums


@dataclass(frozen=True)
class Windows:
    """The search's evaluation set: token windows over the evaluation text, with the float32 reference's
    argmax at every position and its negative log-likelihood of every next token (not its logits: 16
    windows of a 150k vocabulary would be 1.2 GB)."""

    sequences: np.ndarray  # int64 [n, length]
    argmax: np.ndarray  # int64 [n, length]
    nll: np.ndarray  # float64 [n, length - 1]

    @classmethod
    def from_torch(cls, model: Any, tokenizer: Any, text: str, *, length: int = WINDOW,
                   max_windows: int = MAX_WINDOWS) -> Windows:
        """Up to `max_windows` disjoint windows of `length` tokens of `text`, scored by the PyTorch `model`."""
        import torch

        from exporter import quality

        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        seqs = quality.eval_sequences(tokenizer, text, count=max(1, min(max_windows, tokens // length)), length=length)
        argmax, nll = [], []
        with torch.inference_mode():
            for seq in seqs:
                logits = model(torch.from_numpy(seq[None, :])).logits[0].float().numpy()
                argmax.append(logits.argmax(-1))
                nll.append(token_nll(logits, seq))
        return cls(seqs, np.stack(argmax), np.stack(nll))

    def metrics(self, logits_of: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        """ppl_delta and top1_agreement of a model whose logits [length, vocab] for a window are logits_of(window)."""
        agree, nll = [], []
        for seq, want in zip(self.sequences, self.argmax):
            logits = logits_of(seq)
            agree.append(logits.argmax(-1) == want)
            nll.append(token_nll(logits, seq))
        ppl_ref, ppl = float(np.exp(self.nll.mean())), float(np.exp(np.mean(nll)))
        return {"ppl_delta": ppl / ppl_ref - 1.0, "top1_agreement": float(np.mean(agree)),
                "eval_tokens": float(self.sequences.size)}


def run_candidate(path: Path, windows: Windows, ref: Any = None) -> dict[str, float]:
    """The candidate at `path` on the search's windows; with `ref` (the gate's quality.LMReference) also its
    greedy_match, for a bar that bounds it (the greedy continuations cost a decode loop each)."""
    from exporter import quality
    from exporter.lm import OrtDecoder

    dec = OrtDecoder(path)
    metrics = windows.metrics(lambda seq: dec.run(seq[None, :], dec.empty_past())[0][0])
    if ref is not None:
        greedy = [dec.greedy(p, ref.greedy.shape[1]) for p in ref.prompts]
        metrics["greedy_match"] = float(np.mean([quality.prefix_match(g, r) for g, r in zip(greedy, ref.greedy)]))
    return metrics


def searched_policy(kept: Sequence[str], errors: Mapping[str, float]) -> AccuracyPolicy:
    """The body at level 4 but for `kept` (at level 0), the lm_head at 4 with its top logits exact."""
    why = "level 4 (int8 activations per block, llama.cpp's own class): the search's bar held on the evaluation text"
    return AccuracyPolicy(
        levels={**{c: 4 for c in BODY_CLASSES}, "lm_head": 4}, exact_top_k=EXACT_TOP_K, name="searched",
        reasons={**{c: why for c in BODY_CLASSES}, "lm_head": EXACT_POLICY.reasons["lm_head"],
                 **({"kept_exact": f"{len(kept)} linears whose level-4 error was largest (>= "
                                   f"{min(errors[s] for s in kept):.3g}) stay at level 0"} if kept else {})},
        exact_stems=frozenset(kept),
    )


def stem_of(node: onnx.NodeProto) -> str:
    """/model/layers.3/mlp/down_proj.hi/MatMulNBits -> model.layers.3.mlp.down_proj (an 8-bit pair's halves: one)."""
    stem = node.name.rsplit("/", 1)[0].lstrip("/").replace("/", ".")
    return stem[:-3] if stem.endswith((".hi", ".lo")) else stem


def body_units(model: onnx.ModelProto) -> list[str]:
    """The stems of the decoder body's MatMulNBits nodes (not the lm_head), in graph order."""
    seen: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and weight_class(stem_of(node)) in BODY_CLASSES:
            seen.setdefault(stem_of(node))
    return list(seen)


def with_levels(model: onnx.ModelProto, units: Sequence[str], kept: frozenset[str]) -> onnx.ModelProto:
    """A copy of the exact graph with the body at level 4 but for the `kept` stems."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    body = set(units)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits" and stem_of(node) in body:
            _set_level(node, 0 if stem_of(node) in kept else 4)
    return out


def probe_graph(model: onnx.ModelProto, units: Sequence[str]) -> onnx.ModelProto:
    """The exact graph plus, for each body MatMulNBits, a level-4 twin on the same inputs and two scalar
    outputs per stem: "<stem>|err" = sum((y4 - y0)^2) and "<stem>|out" = sum(y0^2) (an 8-bit pair adds up its halves)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    body = set(units)
    parts: dict[str, tuple[list[str], list[str]]] = {}
    extra: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "MatMulNBits" or stem_of(node) not in body:
            continue
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name, twin.output[0] = node.name + "/probe4", node.output[0] + "/probe4"
        _set_level(twin, 4)
        diff = node.output[0] + "/probe_diff"
        extra += [twin, helper.make_node("Sub", [twin.output[0], node.output[0]], [diff])]
        for kind, source in (("err", diff), ("out", node.output[0])):
            name = f"{source}/probe_ss_{kind}"
            extra.append(helper.make_node("ReduceSumSquare", [source], [name], keepdims=0))
            parts.setdefault(stem_of(node), ([], []))[kind == "out"].append(name)
    graph.node.extend(extra)
    for stem, (errs, outs) in parts.items():
        for kind, names in (("err", errs), ("out", outs)):
            total = names[0] if len(names) == 1 else _sum(graph, names, f"{stem}|{kind}/sum")
            graph.node.append(helper.make_node("Identity", [total], [f"{stem}|{kind}"]))
            graph.output.append(helper.make_tensor_value_info(f"{stem}|{kind}", TensorProto.FLOAT, []))
    return out


def _sum(graph: onnx.GraphProto, names: list[str], out: str) -> str:
    graph.node.append(helper.make_node("Sum", names, [out]))
    return out


def _set_level(node: onnx.NodeProto, level: int) -> None:
    for attr in node.attribute:
        if attr.name == "accuracy_level":
            attr.i = level
            return
    node.attribute.append(helper.make_attribute("accuracy_level", level))


def _bar_text(key: str, value: float) -> str:
    metric = metric_of(key).replace("_agreement", "").replace("_delta", "")
    shown = f"{value:+.1%}" if metric == "ppl" else f"{value:.0%}" if metric == "top1" else f"{value:g}"
    return f"{metric} {'<=' if key.startswith('max_') else '>='} {shown}"
