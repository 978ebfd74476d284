"""onnxruntime-genai 0.18.0 on the same random weights (TinyLlama- or Qwen2.5-0.5B-shaped), for the
side-by-side in agent_speed.py. It needs transformers 5 (the project pins < 4.58), so it lives in its
own venv, which sees the project venv's packages (torch, onnx) after its own (transformers 5):

    /work/main/.venv/bin/python -m venv bench/.venv-genai
    echo /work/main/.venv/lib/python3.11/site-packages > bench/.venv-genai/lib/python3.11/site-packages/zz-main.pth
    bench/.venv-genai/bin/pip install onnxruntime-genai==0.18.0 "transformers>=5"

build() makes the genai int4 model with its model builder (defaults: `-p int4 -e cpu`) next to the
checkpoint (`<checkpoint>-genai-int4`, cached); run() times generation twice: with genai's default
session options and with intra_op_num_threads = 2.

    python bench/genai_speed.py [tinyllama-1.1b|qwen2.5-0.5b]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PY = HERE / ".venv-genai" / "bin" / "python"

CHILD = r"""
import json, sys, time
import onnxruntime_genai as og
path, prompt, new, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = og.Model(path)
runs = []
for rep in range(repeats + 1):  # the first run warms up
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    decode = time.perf_counter() - t1
    if rep:
        runs.append((len(prompt) / prefill, n / decode))
print(json.dumps({"prefill_tok_s": max(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs),
                  "prefill_runs": [round(r[0], 1) for r in runs], "decode_runs": [round(r[1], 2) for r in runs]}))
"""


def build(hf_dir: Path) -> Path:
    """genai's int4 CPU model of the checkpoint `hf_dir`, built once with the builder's defaults."""
    out = hf_dir.with_name(hf_dir.name + "-genai-int4")
    if (out / "genai_config.json").exists():
        return out
    print(f"building {out.name} with onnxruntime-genai's model builder (-p int4 -e cpu) ...", file=sys.stderr)
    tmp, log = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".build.log")
    shutil.rmtree(tmp, ignore_errors=True)
    with log.open("w") as f:  # the builder logs every tensor it saves: keep that out of the bench's output
        r = subprocess.run([str(VENV_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
                            "-p", "int4", "-e", "cpu", "-c", str(out.with_name(out.name + "-cache"))],
                           stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        sys.exit(f"onnxruntime-genai's builder failed ({r.returncode}) on {hf_dir}; see {log}")
    os.replace(tmp, out)
    return out


def tuned_copy(model_dir: Path, threads: int) -> Path:
    """The same model files with intra_op_num_threads set in genai_config.json."""
    out = model_dir.with_name(model_dir.name + f"-threads{threads}")
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            os.symlink(f, out / f.name)
    cfg = json.loads((model_dir / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run(hf_dir: Path, prompt: list[int], *, new_tokens: int, threads: int = 2, repeats: int = 2) -> dict:
    """Best prefill and decode tok/s of `repeats` generations after a warm-up, default and tuned threads."""
    if not VENV_PY.exists():
        return {"error": f"{VENV_PY} missing; see bench/genai_speed.py's docstring", "runs": []}
    model_dir = build(hf_dir)
    runs = []
    for label, path, n in (("default", model_dir, "default"), ("tuned", tuned_copy(model_dir, threads), threads)):
        r = subprocess.run([str(VENV_PY), "-c", CHILD, str(path), json.dumps(prompt), str(new_tokens), str(repeats)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai ({label}) failed with exit {r.returncode}: {r.stderr[-2000:]}")
        runs.append({"label": label, "threads": n, **json.loads(r.stdout.strip().splitlines()[-1])})
    return {"runs": runs, "model_mb": sum(f.stat().st_size for f in model_dir.iterdir()) / 2**20}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    from bench.agent_speed import NEW_TOKENS, SHAPES, hf_dir, prompt_ids

    shape = SHAPES[sys.argv[1] if len(sys.argv) > 1 else "tinyllama-1.1b"]
    print(json.dumps(run(hf_dir(shape), prompt_ids(1, shape.vocab), new_tokens=NEW_TOKENS), indent=2))
