"""Export a TinyLlama-1.1B-shaped random model and report export time, peak RSS, bundle size.

    .venv/bin/python bench/export_tinyllama.py [--quant int4] [--profile cpu-x86-avx2] [--keep DIR]
    .venv/bin/python bench/export_tinyllama.py --profile npu-qnn-htp [--quant profile|int8|fp16]

`--quant profile` takes the profile's own recipe (on npu-qnn-htp: the float graph in fp16 for LMs; `--quant int8` there
is the w8a16 static QDQ recipe; both judged on the HTP simulator).

The model has TinyLlama-1.1B's config (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate
5632, vocab 32000) and random weights, so quality numbers mean nothing here; time and memory do.
The export runs as `edgeship export` in a subprocess, so its peak RSS is the export's alone.
The random checkpoint is cached in ~/.cache/edgeship-bench (4.4 GB). Not a test: never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
              rms_norm_eps=1e-5, rope_theta=10000.0)


def checkpoint() -> Path:
    out = Path(os.environ.get("EDGESHIP_BENCH_CACHE", Path.home() / ".cache" / "edgeship-bench")) / "tinyllama-random"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.support.models import tiny_model

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))
    model.save_pretrained(tmp, safe_serialization=True)
    # the tiny test tokenizer (ids < 32000) stands in for TinyLlama's: tokenization cost is not measured
    for f in tiny_model("llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    print(f"made random checkpoint in {time.perf_counter() - t0:.0f}s: {out}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4", choices=["int4", "int8", "fp16", "none", "profile"])
    ap.add_argument("--profile", default="cpu-x86-avx2")
    ap.add_argument("--keep", type=Path, help="Write the bundle here instead of a temporary directory.")
    args = ap.parse_args()

    from agent.bundle import generate_keypair

    model = checkpoint()
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        key = generate_keypair(Path(tmp) / "keys", "bench").private_path
        out = args.keep or Path(tmp) / "bundle"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "edgeship.cli", "export", str(model), "--out", str(out),
                            "--key", str(key), *(["--quant", args.quant] if args.quant != "profile" else []),
                            "--profile", args.profile, "--json",
                            "--overwrite", "--threshold", "min_top1_agreement=0", "--force"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"export failed ({p.returncode}):\n{p.stderr[-3000:]}\n{p.stdout[-2000:]}")
        # the JSON document is the last line: a library may print to stdout before it
        result = json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("{")))
        noise = [line for line in p.stdout.splitlines() if not line.startswith("{")]
    stats = result["stats"]
    report = {
        "model": "TinyLlama-1.1B-shaped random",
        "quant": args.quant,
        "parameters": stats["parameters"],
        "wall_seconds": round(wall, 1),
        "export_seconds": stats["export_seconds"],
        "steps_seconds": stats["steps_seconds"],
        "peak_rss_gb": round(stats["peak_rss_mb"] / 1024, 2),
        "peak_rss_over_fp32_weights": round(stats["peak_rss_mb"] * 2**20 / (stats["parameters"] * 4), 2),
        "fp32_onnx_gb": round(stats["fp32_bytes"] / 1e9, 3),
        "model_gb": round(stats["model_bytes"] / 1e9, 3),
        "bundle_gb": round(stats["bundle_bytes"] / 1e9, 3),
        "prefill_tok_s": stats.get("prefill_tok_s"),
        "decode_tok_s": stats.get("decode_tok_s"),
        "htp_compile_seconds": stats.get("htp_compile_seconds"),  # the simulator's seconds, not a device's
        "htp_seconds_per_call": stats.get("htp_seconds_per_call"),
        "recipe": result["manifest"]["quantization"]["recipe"],
        # random weights: the metrics say nothing about a real model's quality; qnn says what the HTP took
        "quality_metrics": result["manifest"]["quality"]["metrics"],
        "qnn": {k: v for k, v in result["manifest"]["quantization"].get("details", {}).get("qnn", {}).items()
                if k != "reasons"},
        "cpus": os.cpu_count(),
        "stdout_noise": noise[:5],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
