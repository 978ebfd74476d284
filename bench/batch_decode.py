"""Continuous batching inside the runtime, without HTTP: numbers, never pass/fail.

For a text-generation bundle (default: the real SmolLM2-135M-Instruct Q4_1 GGUF, exported as
`edgeship serve` does), in one process:
  - single stream on the sequential path (BatchPolicy max_batch 1, the path before batching) and on
    the scheduler (max_batch 8, one request): decode tok/s, time to first token;
  - 1, 2, 4 and 8 concurrent clients on the scheduler, each asking for --new tokens after its own
    ~--prompt-token chat prompt: aggregate completion tok/s, p50 / p95 time to first token, tokens
    per batched step;
  - one model step at 1, 2, 4 and 8 rows (the cost of a batched decode step against one row's);
  - what c clients can get from those costs (a cost model, not a measurement): each of the c prompts is
    prefilled once (the single stream's time to first token) and the other new - 1 tokens come in steps of c
    rows, so aggregate ~ c * new / (c * ttft + (new - 1) * step(c)) however the scheduler interleaves them
    (issue #21: with 130-token prompts on 2 cores the 4 prefills take about as long as one stream's whole
    decode, so 4 clients cannot reach 2x the single stream's decode rate even if a 4-row step cost one row's).
Variants run in turn each round (`--rounds`), so drift lands on all of them alike; medians reported.

    python bench/batch_decode.py [--bundle DIR --key PUB] [--rounds 3] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Explain how a refrigerator keeps food cold.", "Write a short story about a lighthouse keeper.",
             "What are the main causes of the seasons on Earth?", "Describe how to bake bread at home.",
             "Why is the sky blue during the day?", "Give advice to someone learning to program.",
             "Summarize the history of the bicycle.", "How do bees make honey?"]


def _prompt(model, i: int, tokens: int) -> list[int]:
    """A chat prompt of about `tokens` tokens, different per client (no shared prefix beyond the template)."""
    filler = " ".join(f"Note {i}.{k}: keep the answer plain." for k in range(64))
    ids = model.chat_prompt([{"role": "system", "content": filler}, {"role": "user", "content": QUESTIONS[i % 8]}])
    return ids[-tokens:] if len(ids) > tokens else ids


def _one(model, ids: list[int], new: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds in all, tokens) of one greedy generation."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in model.generate(ids, max_tokens=new, ignore_eos=True, use_prefix_cache=False):
        if chunk.token_id is not None:
            n += 1
            if first is None:
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, n


def _clients(model, prompts: list[list[int]], new: int) -> dict:
    out: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def work(i: int) -> None:
        start.wait()
        out[i] = _one(model, prompts[i], new)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    steps0, tokens0 = model.batcher.steps, model.batcher.batched_tokens
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in out)
    steps = model.batcher.steps - steps0
    return {"aggregate_tok_s": sum(r[2] for r in out) / wall, "ttft_p50_s": ttft[len(ttft) // 2],
            "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "tokens_per_step": (model.batcher.batched_tokens - tokens0) / steps if steps else None}


def _step_ms(model, rows: int, past: int = 160, repeats: int = 20) -> float:
    """One decode step of `rows` rows after `past` positions, through the scheduler's own model call."""
    import numpy as np

    b = model.batcher
    b.pool.resize(8, 512, used_rows=0, used_length=0)
    ids = np.ones((rows, 1), np.int64)
    b._run(0, rows, ids, [past] * rows)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b._run(0, rows, ids, [past] * rows)
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a bundle directory (default: the SmolLM2 GGUF, exported once)")
    ap.add_argument("--key", type=Path, help="the bundle's public key")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=130)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.bundle import TrustedKeys, open_bundle
    from agent.runtime import load_model
    from agent.runtime.batch_policy import BatchPolicy

    if args.bundle is None:
        from agent.serve import export_cached
        from tests.support.models import smollm2_gguf_path

        bundle, key = export_cached(str(smollm2_gguf_path()), announce=print)
    else:
        bundle, key = args.bundle, args.key
    vb = open_bundle(bundle, TrustedKeys.from_paths([key]))
    clients = [int(c) for c in args.clients.split(",")]
    sequential = load_model(vb, threads=args.threads)
    batched = load_model(vb, threads=args.threads, batching=BatchPolicy(max_batch=max(clients)))
    prompts = [_prompt(batched, i, args.prompt_tokens) for i in range(max(clients))]
    runs: dict[str, list] = {}
    for r in range(args.rounds):
        for name, model in (("sequential", sequential), ("scheduler", batched)):
            ttft, total, n = _one(model, prompts[0], args.new)
            runs.setdefault(f"single/{name}", []).append({"ttft_s": ttft, "decode_tok_s": (n - 1) / (total - ttft)})
        for k in clients:
            runs.setdefault(f"clients/{k}", []).append(_clients(batched, prompts[:k], args.new))
        if r == 0:
            for rows in (1, 2, 4, 8):
                runs.setdefault(f"step/{rows}", []).append({"step_ms": _step_ms(batched, rows)})
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    medians = {name: {k: statistics.median(x[k] for x in rs if x[k] is not None) for k in rs[0] if rs[0][k] is not None}
               for name, rs in runs.items()}
    single = medians["single/scheduler"]["decode_tok_s"]
    print(f"{'variant':<22}{'tok/s':>10}{'x single':>10}{'ttft p50':>10}{'ttft p95':>10}{'tok/step':>10}")
    for name in ("single/sequential", "single/scheduler"):
        m = medians[name]
        print(f"{name:<22}{m['decode_tok_s']:>10.1f}{m['decode_tok_s'] / single:>10.2f}{m['ttft_s']:>10.3f}")
    for k in clients:
        m = medians[f"clients/{k}"]
        print(f"{'clients ' + str(k):<22}{m['aggregate_tok_s']:>10.1f}{m['aggregate_tok_s'] / single:>10.2f}"
              f"{m['ttft_p50_s']:>10.3f}{m['ttft_p95_s']:>10.3f}{m.get('tokens_per_step', 0):>10.2f}")
    one = medians["step/1"]["step_ms"]
    print("one decode step, ms (x one row): " + ", ".join(
        f"{rows} rows {medians[f'step/{rows}']['step_ms']:.1f} ({medians[f'step/{rows}']['step_ms'] / one:.2f})"
        for rows in (1, 2, 4, 8)))
    ttft = medians["single/scheduler"]["ttft_s"]
    modelled = {k: k * args.new / (k * ttft + (args.new - 1) * medians[f"step/{k}"]["step_ms"] / 1000)
                for k in clients if f"step/{k}" in medians}
    for k, tok_s in modelled.items():
        got = medians[f"clients/{k}"]["aggregate_tok_s"]
        print(f"clients {k}: cost model {tok_s:.1f} tok/s ({tok_s / single:.2f}x single) from a {ttft * 1000:.0f} ms "
              f"prefill each and {k}-row steps; measured {got:.1f} ({got / tok_s:.0%} of it)")
    if args.json:
        args.json.write_text(json.dumps({
            "bench": "batch_decode", "label": args.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bundle": vb.manifest.ref, "threads": batched.threads, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "prompt_tokens": len(prompts[0]), "new_tokens": args.new,
            "rounds": args.rounds, "medians": medians, "runs": runs,
            "cost_model_aggregate_tok_s": modelled}, indent=1))
    sequential.close()
    batched.close()


if __name__ == "__main__":
    main()
