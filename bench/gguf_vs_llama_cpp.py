"""The exact GGUF bundle beside llama.cpp itself, on the same GGUF file: quality against the same reference, and speed.

llama.cpp is the runtime GGUF files are made for, so it is the yardstick of "runs at its original
quality". Both are judged as the exporter judges its bundles (exporter.gguf.quality.judge): perplexity on
the exporter's evaluation text, next-token top-1 agreement and the greedy 64-token chat answer, each against
transformers' fp32 dequantization of the file. llama.cpp's CPU kernels quantize activations to 8 bits per
block of 32 (Q8_0 / Q8_1) before their integer dot products -- the same class of rounding as MatMulNBits'
accuracy level 4 -- so the run also judges the same blocks at level 4 everywhere ("exact-acc4"), and how often
each model's next-token choice agrees with llama.cpp's own.

Speed: 128-token prompt, 64 greedy new tokens, the same thread count for both, rounds alternating; llama.cpp
through llama-cpp-python (its own build of llama.cpp, compiled on install for this CPU):

    pip install llama-cpp-python==0.3.36        # builds llama.cpp (~10 min on 2 cores); bench only, not a product dependency
    python -m bench.gguf_vs_llama_cpp [--gguf PATH] [--threads 2] [--rounds 3] [--policy-from BUNDLE] [--json OUT]

Numbers, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.gguf_exact_vs_requant import measure
from exporter.gguf.export import export_gguf
from exporter.gguf.quality import CHAT_PROMPT, OnnxDecoder, eval_text, gguf_reference, judge


class LlamaCpp:
    """A llama.cpp context on the GGUF, fed token ids (the bundle's tokenizer's, so both see the same tokens)."""

    def __init__(self, gguf: Path, *, threads: int, all_logits: bool, n_ctx: int = 2048):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=all_logits, verbose=False)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[tokens, vocab] next-token logits of every position of one sequence."""
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for _ in range(steps):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in eos:
                break
            self.llm.eval([nxt])
        return out

    def timed(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """(prefill, decode) seconds per token, as bench.gguf_exact_vs_requant.measure times a bundle."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval([int(t) for t in prompt])
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        t2 = time.perf_counter()
        return (t1 - t0) / len(prompt), (t2 - t1) / new_tokens


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeship.models import smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--policy-from", type=Path, default=None, metavar="BUNDLE",
                    help="also judge `searched`: the accuracy policy in this bundle's manifest (edgeship export's default)")
    args = ap.parse_args()
    gguf = args.gguf or smollm2_gguf_path()

    with tempfile.TemporaryDirectory() as tmp:
        exact = export_gguf(gguf, Path(tmp) / "exact")
        acc4 = export_gguf(gguf, Path(tmp) / "acc4", accuracy_level=4)
        judged = [("exact", exact), ("exact-acc4", acc4)]
        if args.policy_from:
            from exporter.gguf.levels import AccuracyPolicy

            manifest = json.loads((args.policy_from / "manifest.json").read_text())
            policy = AccuracyPolicy.from_details(manifest["quantization"]["details"]["accuracy_levels"])
            judged.append(("searched", export_gguf(gguf, Path(tmp) / "searched", accuracy_level=policy)))
        tokenizer_dir = exact.onnx_path.parent
        eos = exact.model_spec.config["eos_token_ids"]
        ref = gguf_reference(gguf, tokenizer_dir, eos_token_ids=eos)

        outputs: dict[str, tuple[np.ndarray, list[int]]] = {}
        for name, result in judged:
            dec = OnnxDecoder(result.onnx_path, threads=args.threads)
            outputs[name] = dec.run(ref.ids[None], dec.empty_past())[0][0], dec.greedy(ref.prompt, 64, set(eos))
        cpp = LlamaCpp(gguf, threads=args.threads, all_logits=True)
        outputs["llama.cpp"] = cpp.logits(ref.ids), cpp.greedy(ref.prompt, 64, set(eos))
        del cpp
        quality = {}
        for name, (logits, answer) in outputs.items():
            report = judge(ref, logits, answer, tokenizer_dir)
            quality[name] = {"status": report.status.value, **report.metrics, "greedy": report.details["greedy_onnx"],
                             "top1_vs_llama_cpp": float((logits[:-1].argmax(-1) == outputs["llama.cpp"][0][:-1].argmax(-1)).mean())}
        quality["reference"] = {"greedy": report.details["greedy_reference"]}

        prompt = ref.ids[: args.prompt_tokens]
        ours = OnnxDecoder(exact.onnx_path, threads=args.threads)
        fast = LlamaCpp(gguf, threads=args.threads, all_logits=False)
        runners = {"exact": lambda: measure(ours, prompt, args.new_tokens),
                   "llama.cpp": lambda: fast.timed(prompt, args.new_tokens)}
        for run in runners.values():  # warm-up
            run()
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                runs[name].append(run())

    speed = {name: {"prefill_tok_s": statistics.median(1 / p for p, _ in rs), "decode_tok_s": statistics.median(1 / d for _, d in rs)}
             for name, rs in runs.items()}
    print(f"{gguf.name}, {args.threads} threads; quality against transformers fp32 ({len(ref.ids)} tokens, "
          f"greedy chat answer to {CHAT_PROMPT!r}):")
    print(f"  reference answer: {quality['reference']['greedy']!r}")
    for name in outputs:
        q = quality[name]
        print(f"  {name:<11} {q['status']:<7} ppl {q['ppl_delta']:+.4%}  top-1 {q['top1_agreement']:.4f}  greedy match "
              f"{q['greedy_match']:.3f}  top-1 vs llama.cpp {q['top1_vs_llama_cpp']:.4f}  {q['greedy']!r}")
    for name, s in speed.items():
        print(f"  {name:<11} prefill {s['prefill_tok_s']:8.1f} tok/s  decode {s['decode_tok_s']:7.1f} tok/s")
    r = {k: speed["exact"][k] / speed["llama.cpp"][k] for k in ("prefill_tok_s", "decode_tok_s")}
    print(f"  exact / llama.cpp: prefill {r['prefill_tok_s']:.3f}x, decode {r['decode_tok_s']:.3f}x")
    if args.json:
        import llama_cpp
        import onnxruntime

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gguf": gguf.name,
            "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__,
            "threads": args.threads, "rounds": args.rounds, "cpus": os.cpu_count(),
            "quality": quality, "speed_medians": speed, "ratios_exact_vs_llama_cpp": r,
            "runs": {k: [list(x) for x in v] for k, v in runs.items()},
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
