"""What 8-bit and 4-bit weights cost SmolLM2-135M by themselves, before any activation is rounded.

    PYTHONPATH=. .venv/bin/python bench/npu_lm_weight_bits.py [--out bench/results/npu_lm_weight_bits-DATE.json]

PyTorch float32 (the packaged Q4_1 GGUF, dequantized) against itself with every linear's weight rounded to a
grid and back (symmetric; one scale per output channel, or per block of `block` inputs), everything else
float. The lm_head is untied from the embedding first and rounded alone: on the NPU the embedding is a Gather
of its own 16-bit table. Measured as the NPU gate measures (4 windows of 64 tokens, 4 greedy runs of 64 after
16-token prompts, share before the first split) and on 2,048 tokens (16 windows of 128) for ppl and top-1,
where one position is 0.05 %. Not a test; minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import emit  # noqa: E402

# name: (bits, block or None for one scale per output channel, which linears, MSE-clipped scales)
VARIANTS = {
    "int8 per-channel, every linear": (8, None, "all", False),
    "int4 per-channel, every linear": (4, None, "all", False),
    "int4 per-channel, MSE-clipped": (4, None, "all", True),
    "int4 block 128, every linear": (4, 128, "all", False),
    "int4 block 64, every linear": (4, 64, "all", False),
    "int4 block 32, every linear": (4, 32, "all", False),
    "int4 block 32 body, lm_head float": (4, 32, "body", False),
    "int4 block 32 MLP only (gate/up/down)": (4, 32, "mlp", False),
}


def fake_quant(w, bits: int, block: int | None, mse: bool):
    """w rounded to a symmetric `bits` grid with one scale per row (or per block of a row), back in float."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    pad = (-cols) % block if block else 0  # a short last block (576 inputs in blocks of 128), zeros round to zero
    w = torch.nn.functional.pad(w, (0, pad))
    g = w.reshape(rows, -1, block) if block else w.reshape(rows, 1, cols)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    best = None
    for clip in ([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7] if mse else [1.0]):
        scale = amax * clip / qmax
        q = (g / scale).round().clamp(-qmax - 1, qmax) * scale
        err = ((q - g) ** 2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best = torch.where(better, q, best)
            best_err = torch.minimum(err, best_err)
    return best.reshape(rows, cols + pad)[:, :cols]


def chosen(name: str, which: str) -> bool:
    if which == "all":
        return True
    if which == "body":
        return name != "lm_head"
    return any(k in name for k in ("gate_proj", "up_proj", "down_proj"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", nargs="*", help="Variant names to run (default: all).")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch

    from edgeship.models import smollm2_gguf_path
    from exporter import quality
    from exporter.pipelines import npu_lm
    from exporter.source import load_causal_lm, load_tokenizer, resolve_source

    torch.manual_seed(0)
    src = resolve_source(str(smollm2_gguf_path()))
    model, tok = load_causal_lm(src).float().eval(), load_tokenizer(src)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie: quantized alone
    text = quality.read_texts(None)
    size = npu_lm.EVAL_SIZE
    gate_ref = quality.lm_reference(model, tok, text, **size)
    long_seqs = quality.eval_sequences(tok, text, count=16, length=128)

    def logits_of(seqs):
        with torch.inference_mode():
            return np.stack([model(torch.from_numpy(s[None])).logits[0].float().numpy() for s in seqs])

    def greedy_of(prompts, steps):
        out = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.from_numpy(p[None])
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                                   do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
                out.append(g[0, p.shape[0]:].numpy())
        return out

    long_ref = logits_of(long_seqs)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    rows = {}
    for name, (bits, block, which, mse) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        touched = 0
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n])
                if chosen(n, which):
                    m.weight.copy_(fake_quant(original[n], bits, block, mse))
                    touched += m.weight.numel()
        gate, details = quality.compare_lm(logits_of(gate_ref.sequences), gate_ref.logits, gate_ref.sequences,
                                           greedy_of(gate_ref.prompts, size["steps"]), gate_ref)
        long, _ = quality.compare_lm(logits_of(long_seqs), long_ref, long_seqs, [], gate_ref)
        bits_per_weight = bits + (16 / block if block else 0)  # an fp16 scale per block
        rows[name] = {
            "bits": bits, "block": block, "linears": which, "mse_clipped": mse, "weights_rounded": touched,
            "approx_bits_per_weight": round(bits_per_weight, 2),
            "gate": {k: round(gate[k], 5) for k in ("ppl_delta", "top1_agreement", "logits_cosine",
                                                     "logits_cosine_min", "greedy_match")},
            "greedy_prefix_matches": details["greedy_prefix_matches"],
            "ppl_delta_2048": round(long["ppl_delta"], 5), "top1_2048": round(long["top1_agreement"], 5),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    result = {"model": str(src), "eval": {"gate": size, "long": {"count": 16, "length": 128}},
              "threads": torch.get_num_threads(), "variants": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
