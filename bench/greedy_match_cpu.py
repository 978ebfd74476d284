"""The NPU gate's 64-token greedy match, measured for CPU runtimes on the same GGUF: is 0.8 a CPU-class bar?

    .venv/bin/python bench/greedy_match_cpu.py [--gguf PATH] [--llama-cpp /work/llama.cpp-build/bin] [--out FILE.json]

Issue #22 asks the HTP model of SmolLM2-135M for a greedy 64-token match of at least 0.8 against PyTorch's
float32 model. This computes that same measure -- the gate's 4 prompts of 16 tokens from the evaluation text,
64 greedy tokens each, share before the first split (`exporter.quality.lm_reference`, `prefix_match`, with
`npu_lm.EVAL_SIZE`) -- for what users run on a CPU:

- llama.cpp on its own file (`llama-server`, fed the same token ids, greedy, EOS ignored), built by
  `bash bench/build_llama_cpp.sh`;
- edgeship's CPU bundles of the file (`edgeship export`, cached as bench/serve_vs_llama_cpp.py caches them): the
  searched default (llama.cpp's class) and `--accuracy-level exact`.

Per run it also prints PyTorch's own top-1 minus top-2 logit where the run split. Numbers, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_vs_llama_cpp import exported_bundle, file_digest, host_profile, llama_server  # noqa: E402


def llama_cpp_greedy(gguf: Path, bin_dir: Path, prompts, steps: int, logdir: Path) -> list[list[int]]:
    """llama-server's greedy continuations of token-id prompts (no BOS added, EOS ignored, no prompt cache)."""
    import httpx

    server = llama_server(gguf, bin_dir, threads=2, parallel=1, ctx=512, extra=[], logdir=logdir)
    server.start()
    try:
        out = []
        for p in prompts:
            body = {"prompt": [int(t) for t in p], "n_predict": steps, "temperature": 0, "top_k": 1,
                    "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
            r = httpx.post(server.base + "/completion", json=body, timeout=120).json()
            if r.get("tokens_evaluated") != len(p):
                raise RuntimeError(f"llama-server evaluated {r.get('tokens_evaluated')} prompt tokens, not {len(p)}")
            out.append([int(t) for t in r["tokens"]])
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the packaged SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--llama-cpp", type=Path, default=Path("/work/llama.cpp-build/bin"), help="llama-server's folder")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch

    from edgeship.models import smollm2_gguf_path
    from exporter import quality
    from exporter.gguf.quality import OnnxDecoder
    from exporter.pipelines import npu_lm
    from exporter.source import load_causal_lm, load_tokenizer, resolve_source

    gguf = args.gguf or smollm2_gguf_path()
    size = npu_lm.EVAL_SIZE
    src = resolve_source(str(gguf))
    model, tok = load_causal_lm(src), load_tokenizer(src)
    ref = quality.lm_reference(model, tok, quality.read_texts(None), max_context=256, **size)
    with torch.inference_mode():  # PyTorch's top-1 minus top-2 logit at each of its own greedy picks
        margins = []
        for p, g in zip(ref.prompts, ref.greedy):
            run = torch.from_numpy(np.concatenate([p, g])[None])
            top = np.sort(model(run).logits[0, len(p) - 1 : -1].float().numpy(), -1)[:, -2:]
            margins.append(top[:, 1] - top[:, 0])
    del model

    runs: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if (args.llama_cpp / "llama-server").exists():
            runs["llama.cpp (llama-server)"] = llama_cpp_greedy(gguf, args.llama_cpp, ref.prompts, size["steps"],
                                                                 Path(tmp))
        else:
            print(f"no llama-server in {args.llama_cpp}: run `bash bench/build_llama_cpp.sh`; llama.cpp left out",
                  file=sys.stderr)
        for name, extra in (("edgeship searched default", []), ("edgeship exact", ["--accuracy-level", "exact"])):
            bundle, _, _ = exported_bundle(gguf, file_digest(gguf), profile=host_profile(), export_args=extra)
            dec = OnnxDecoder(bundle / "model.onnx", threads=2)
            runs[name] = [dec.greedy([int(t) for t in p], size["steps"], set()) for p in ref.prompts]

    result = {"gguf": str(gguf), "prompts": len(ref.prompts), "steps": size["steps"], "runtimes": {}}
    for name, greedy in runs.items():
        shares, at_split = [], []
        for g, want, margin in zip(greedy, ref.greedy, margins):
            share = quality.prefix_match(np.array(g[: len(want)]), want)
            shares.append(round(share, 4))
            split = round(share * len(want))
            at_split.append(round(float(margin[split]), 3) if split < len(want) else None)
        result["runtimes"][name] = {"greedy_match": round(float(np.mean(shares)), 4), "per_prompt": shares,
                                    "reference_margin_at_split": at_split}
    result["reference_margin_median"] = [round(float(np.median(m)), 3) for m in margins]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
