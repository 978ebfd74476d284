"""Native graph (exporter/pipelines/native_lm.py) against optimum's traced graph for one decoder family,
side by side in one run: decode latency per token, float32, on one random model per family shaped like a
small real checkpoint (8 layers, hidden 512). This is what decides whether a family takes the native
path by default (exporter/pipelines/native_lm.NATIVE_ARCHITECTURES).

Both graphs run through exporter.lm.OrtDecoder (present copied back into past each step, as the gate
runs them; the agent's in-place KV buffer would only help the native graph). Each round prefills a
64-token prompt (--prompt) and times 64 decode steps; rounds alternate between the two graphs so a busy neighbour
slows both alike. Reported: median ms/token over rounds, and the max abs diff of the two graphs'
logits (both should equal PyTorch).

    python bench/native_vs_optimum.py gemma2 [--rounds 6] [--threads 2] [--prompt 64] [--json OUT]

Numbers, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMALL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             max_position_embeddings=512, vocab_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gemma2": dict(SMALL, model_type="gemma2", num_key_value_heads=4, head_dim=64, sliding_window=64),
    "phi": dict(SMALL, model_type="phi", num_key_value_heads=8, partial_rotary_factor=0.5),
    "gpt_neox": dict(SMALL, model_type="gpt_neox", rotary_pct=0.25, use_parallel_residual=True),
}
PROMPT, STEPS = 64, 64


def random_model(family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(FAMILIES[family])
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config).eval()


def decode_ms_per_token(dec, prompt: np.ndarray) -> float:
    logits, past = dec.run(prompt, dec.empty_past(), keep=1)
    token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        logits, past = dec.run(token, past, keep=1)
        token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
    return (time.perf_counter() - t0) * 1000 / STEPS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens before the timed decode steps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import onnxruntime as ort

    from exporter.lm import OrtDecoder
    from exporter.pipelines.native_lm import export_native
    from exporter.pipelines.optimum_lm import export_decoder

    model = random_model(args.family)
    prompt = np.random.default_rng(0).integers(3, FAMILIES[args.family]["vocab_size"], (1, args.prompt))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"native": export_native(model, Path(tmp) / "native"),
                 "optimum": export_decoder(model, Path(tmp) / "optimum", opset=17)}
        decoders = {name: OrtDecoder(path, threads=args.threads) for name, path in paths.items()}
        check = {name: dec.run(prompt, dec.empty_past())[0] for name, dec in decoders.items()}
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for name in decoders:  # warm-up
            decode_ms_per_token(decoders[name], prompt)
        for r in range(args.rounds):
            order = list(decoders) if r % 2 == 0 else list(reversed(decoders))
            for name in order:
                times[name].append(decode_ms_per_token(decoders[name], prompt))
    result = {
        "family": args.family, "config": FAMILIES[args.family], "onnxruntime": ort.__version__,
        "threads": args.threads, "prompt": args.prompt, "steps": STEPS, "rounds": args.rounds,
        "decode_ms_per_token": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "all_rounds_ms": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "max_abs_diff_native_vs_optimum": float(np.abs(check["native"] - check["optimum"]).max()),
    }
    med = result["decode_ms_per_token"]
    result["optimum_over_native"] = round(med["optimum"] / med["native"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
