"""The default accuracy policy of a GGUF import (exporter/gguf/search.py): a probe ranks the body's linears by
their level-4 error, the search keeps the fewest worst ones at level 0 that meet the bar, and the bundle
built from the chosen policy is the graph that was measured."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gguf")
pytest.importorskip("torch")

from exporter.gguf.export import export_gguf
from exporter.gguf.levels import EXACT_POLICY, LLAMA_CPP_CLASS, AccuracyPolicy
from exporter.gguf.search import (
    MAX_EVALUATIONS,
    Searched,
    Trial,
    body_units,
    probe_graph,
    run_probe,
    search_bar,
    search_policy,
    stem_of,
    worst_first,
)
from tests.test_gguf_export import write_tiny_gguf


def _levels(path) -> dict[str, set[int]]:
    """stem -> the accuracy levels of its MatMulNBits nodes (an 8-bit linear at level 0 is two nodes)."""
    model = onnx.load(path, load_external_data=False)
    out: dict[str, set[int]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            out.setdefault(stem_of(n), set()).add(next(a.i for a in n.attribute if a.name == "accuracy_level"))
    return out


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-search")
    path, _ = write_tiny_gguf("llama", d)
    return path, export_gguf(path, d / "exact")  # export_gguf's own default: EXACT_POLICY


def test_search_keeps_the_worst_linears_exact_and_the_bundle_is_the_graph_measured(exact, tmp_path):
    """The probe's order decides which linears stay at level 0; bisection finds the fewest; export_gguf of the
    chosen policy has, linear by linear, the levels of the candidate that met the bar."""
    path, result = exact
    units = body_units(onnx.load(result.onnx_path, load_external_data=False))
    assert units and not any(u.startswith("lm_head") for u in units) and len(units) == len(set(units))
    bad = {units[3], units[-1]}  # the two linears that "break" the model: the probe ranks them worst
    errors = {u: (0.5 if u in bad else 0.01 + 0.001 * i) for i, u in enumerate(units)}
    seen: list[dict[str, set[int]]] = []

    def probe(p):
        assert _levels(p)[units[0]] == {0}  # the probe runs the exact graph (plus level-4 twins)
        return {**{f"{u}|err": errors[u] ** 2 for u in units}, **{f"{u}|out": 1.0 for u in units}}

    def evaluate(p):
        levels = _levels(p)
        seen.append(levels)
        ok = all(levels[u] == {0} for u in bad)
        return {"ppl_delta": 0.001 if ok else 0.02, "top1_agreement": 0.99 if ok else 0.9}

    searched = search_policy(result.onnx_path, evaluate, bar=LLAMA_CPP_CLASS, probe=probe)
    assert searched.policy.exact_stems == bad and searched.policy.name == "searched"
    assert [t.kept for t in searched.trials][0] == 0 and len(searched.trials) <= 1 + MAX_EVALUATIONS
    assert searched.chosen is not None and searched.chosen.kept == 2
    assert not (result.onnx_path.parent / ".search.onnx").exists()  # the scratch graph is gone
    assert f"{len(units) - 2} of {len(units)} body linears at level 4" in searched.line()
    measured = seen[[t.kept for t in searched.trials].index(2)]
    assert all(measured[u] == ({0} if u in bad else {4}) for u in units)

    built = export_gguf(path, tmp_path / "searched", accuracy_level=searched.policy)
    levels = _levels(built.onnx_path)
    assert {u: levels[u] for u in units} == {u: measured[u] for u in units}
    assert levels["lm_head"] == {4}  # refined, as in every policy but a uniform one
    details = built.quantization.details["accuracy_levels"]
    assert details["policy"] == "searched" and set(details["kept_exact"]) == bad
    assert AccuracyPolicy.from_details(json.loads(json.dumps(details))) == searched.policy  # as a manifest holds it


def test_search_that_never_meets_the_bar_is_the_exact_policy(exact):
    _, result = exact
    units = body_units(onnx.load(result.onnx_path, load_external_data=False))
    probe = lambda _p: {**{f"{u}|err": 1.0 for u in units}, **{f"{u}|out": 1.0 for u in units}}
    searched = search_policy(result.onnx_path, lambda _p: {"ppl_delta": 0.5, "top1_agreement": 0.5},
                             bar=LLAMA_CPP_CLASS, probe=probe)
    assert searched.policy is EXACT_POLICY and searched.chosen is None
    assert 1 < len(searched.trials) <= 1 + MAX_EVALUATIONS and all(not t.passed for t in searched.trials)
    assert searched.line().startswith("exact: every linear at level 0")


def test_probe_measures_each_linear_and_leaves_the_model_alone(exact, tmp_path):
    """One run: each body linear's level-4 error relative to its output, every linear once (an 8-bit one's
    two exact halves as one), the logits those of the exact graph."""
    from exporter.lm import OrtDecoder

    _, result = exact
    model = onnx.load(result.onnx_path, load_external_data=False)
    units = body_units(model)
    probe_path = result.onnx_path.parent / "probe.onnx"
    onnx.save_model(probe_graph(model, units), probe_path)
    try:
        seqs = np.random.default_rng(3).integers(3, 500, size=(2, 24))
        sums = run_probe(probe_path, seqs)
        assert set(sums) == {f"{u}|{k}" for u in units for k in ("err", "out")}
        rel = {u: np.sqrt(sums[f"{u}|err"] / sums[f"{u}|out"]) for u in units}
        assert all(0 < r < 0.1 for r in rel.values()), rel  # int8 activations: ~1e-2, never zero
        a, b = OrtDecoder(probe_path), OrtDecoder(result.onnx_path)
        np.testing.assert_array_equal(a.run(seqs[:1], a.empty_past())[0], b.run(seqs[:1], b.empty_past())[0])
    finally:
        probe_path.unlink()


def test_the_bar_is_llama_cpps_class_unless_the_user_sets_one():
    assert search_bar(None) == LLAMA_CPP_CLASS == {"max_ppl_delta": 0.005, "min_top1_agreement": 0.97}
    assert search_bar({"min_top1_agreement": 0.99, "min_logits_cosine": 0.9}) == {
        "max_ppl_delta": 0.005, "min_top1_agreement": 0.99}  # cosine is the gate's business, not the search's
    assert search_bar({"min_greedy_match": 1.0})["min_greedy_match"] == 1.0


def test_default_import_searches_and_the_manifest_says_so(tmp_path, keypair):
    """exporter.export(file.gguf) with no accuracy level: the search ran on the evaluation text, the manifest
    records the policy, the bar and every trial, the summary has its one line; "exact" skips the search."""
    from agent.bundle import TrustedKeys, open_bundle
    from exporter import export

    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("llama", tmp_path / "src")
    res = export(path, out=tmp_path / "auto", key=keypair[0], benchmark=False,
                 thresholds={"min_top1_agreement": 0.9})
    details = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest.quantization.details
    search = details["accuracy_search"]
    assert search["bar"] == {"max_ppl_delta": 0.005, "min_top1_agreement": 0.9}
    assert search["trials"] and search["trials"][0]["kept_at_0"] == 0 and search["trials"][0]["eval_tokens"] >= 128
    policy = details["accuracy_levels"]
    assert policy["policy"] in ("searched", "exact")
    if policy["policy"] == "searched":  # the bundle's graph is the chosen trial's
        chosen = [t for t in search["trials"] if t["passed"] and t["kept_at_0"] == len(policy.get("kept_exact", []))]
        assert chosen and chosen[-1]["top1_agreement"] >= 0.9
        levels = _levels(res.bundle / "model.onnx")
        kept = set(policy.get("kept_exact", []))
        assert all(lv == ({0} if s in kept else {4}) for s, lv in levels.items() if s != "lm_head")
    assert res.stats["accuracy_policy"] and "\n" not in res.stats["accuracy_policy"]

    res = export(path, out=tmp_path / "exact", key=keypair[0], benchmark=False, accuracy_level="exact")
    details = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest.quantization.details
    assert details["accuracy_levels"]["policy"] == "exact" and "accuracy_search" not in details
    assert "accuracy_policy" not in res.stats


def test_a_mix_the_gate_refuses_steps_to_the_next_passing_trial_then_to_exact():
    """The search's windows and the gate's text differ, so a mix that met the bar by a hair can miss it at the
    gate: the next trial that passed with more linears at level 0 follows, then the exact policy."""
    errors = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.2}
    assert worst_first(errors) == ["b", "c", "d", "a"]
    ok = {"ppl_delta": 0.001, "top1_agreement": 0.971}
    trials = [Trial(0, {"ppl_delta": 0.01, "top1_agreement": 0.9}, ["ppl"]), Trial(2, ok, []), Trial(1, ok, []),
              Trial(3, ok, [])]
    first = Searched(AccuracyPolicy.uniform(4), dict(LLAMA_CPP_CLASS), 4, trials, errors, chosen=trials[2])
    second = first.after_refusal(["top1_agreement 0.9690 < 0.97 (min_top1_agreement)"])
    assert second.chosen.kept == 2 and second.policy.exact_stems == {"b", "c"}
    assert second.refused == ({"kept_at_0": 1, "failures": ["top1_agreement 0.9690 < 0.97 (min_top1_agreement)"]},)
    third = second.after_refusal(["x"]).after_refusal(["y"])
    assert third.policy is EXACT_POLICY and third.chosen is None
    assert [r["kept_at_0"] for r in third.refused] == [1, 2, 3]
    assert third.details()["gate_refused"][-1] == {"kept_at_0": 3, "failures": ["y"]}
    assert "the gate refused 3 on its own text: y)" in third.line() and "\n" not in third.line()
    assert second.line().endswith("the gate refused a mix with fewer at level 0: top1_agreement 0.9690 < 0.97 "
                                  "(min_top1_agreement)")
    assert "gate_refused" not in first.details()
    with pytest.raises(ValueError, match="exact"):
        third.after_refusal(["z"])


def test_an_import_whose_searched_mix_the_gate_refuses_ships_the_exact_policy(tmp_path, keypair, monkeypatch):
    """Every candidate passes the search (faked), every graph with a level-4 body linear fails the gate (its top-1
    faked low): the export does not fail, it ships the exact policy and the manifest says why."""
    from agent.bundle import TrustedKeys, open_bundle
    from exporter import export, quality
    from exporter.gguf import search

    monkeypatch.setattr(search, "run_candidate", lambda path, windows, ref=None: {
        "ppl_delta": 0.0, "top1_agreement": 1.0, "eval_tokens": 128.0})
    real = quality.lm_metrics
    gated: list[bool] = []

    def lm_metrics(onnx_path, ref, **kw):
        metrics, details = real(onnx_path, ref, **kw)
        level4 = any(4 in lv for s, lv in _levels(onnx_path).items() if s != "lm_head")
        gated.append(level4)
        return {**metrics, "top1_agreement": 0.5 if level4 else metrics["top1_agreement"]}, details

    monkeypatch.setattr(quality, "lm_metrics", lm_metrics)
    (tmp_path / "src").mkdir()
    path, _ = write_tiny_gguf("llama", tmp_path / "src")
    res = export(path, out=tmp_path / "out", key=keypair[0], benchmark=False,
                 thresholds={"min_top1_agreement": 0.9})
    assert gated == [True, False]  # the whole body at level 4 refused, then the exact graph passed
    assert res.report.status.value == "passed"
    details = open_bundle(res.bundle, TrustedKeys.from_paths([keypair[1]])).manifest.quantization.details
    assert details["accuracy_levels"]["policy"] == "exact"
    assert details["accuracy_search"]["gate_refused"] == [
        {"kept_at_0": 0, "failures": ["top1_agreement 0.5000 < 0.9 (min_top1_agreement)"]}]
    assert all(lv == {0} for s, lv in _levels(res.bundle / "model.onnx").items() if s != "lm_head")
    assert res.stats["accuracy_policy"].startswith("exact:") and "gate refused" in res.stats["accuracy_policy"]


def test_gguf_only_levels_are_refused_for_a_transformers_model(tmp_path, keypair):
    from exporter import export
    from exporter.errors import ExportError
    from tests.support.models import tiny_model

    for level in ("exact", "auto"):
        with pytest.raises(ExportError, match=f"--accuracy-level {level} .* is for exact GGUF imports"):
            export(tiny_model("llama"), out=tmp_path / level, key=keypair[0], benchmark=False, accuracy_level=level)


@pytest.mark.slow
def test_the_real_smollm2_default_meets_llama_cpps_class(monkeypatch):
    """The real SmolLM2-135M-Instruct Q4_1, as `edgeship serve` exports it by default (once per test cache): the
    search kept some linears exact and put the rest at level 4, and its chosen trial met the bar."""
    from agent import serve
    from agent.bundle import TrustedKeys, open_bundle
    from tests.support.models import cache_dir, smollm2_gguf_path

    monkeypatch.setenv("EDGESHIP_CACHE", str(cache_dir()))
    path, key = serve.export_cached(str(smollm2_gguf_path()))
    details = open_bundle(path, TrustedKeys.from_paths([key])).manifest.quantization.details
    policy, search = details["accuracy_levels"], details["accuracy_search"]
    assert policy["policy"] == "searched" and search["bar"] == LLAMA_CPP_CLASS
    assert search["body_linears"] == 120  # 30 layers x (qkv, o, gate_up, down)
    kept = policy.get("kept_exact", [])
    assert len(kept) < 120 // 2  # most of the body runs on the int8 kernel
    chosen = [t for t in search["trials"] if t["passed"] and t["kept_at_0"] == len(kept)][-1]
    assert chosen["ppl_delta"] <= 0.005 and chosen["top1_agreement"] >= 0.97 and chosen["eval_tokens"] >= 2000
