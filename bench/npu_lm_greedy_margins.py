"""Why the 64-token greedy match of SmolLM2-135M on the HTP stays low: where each greedy run split, how
close PyTorch's own top-1 and top-2 logits were.

    .venv/bin/python bench/npu_lm_greedy_margins.py bench/results/npu_lm_smollm2-2026-12-03-fp16-regions.json

Reads the gate's greedy_prefix_matches from a bench/npu_lm_smollm2.py result, reruns PyTorch's greedy
continuations of the same 4 prompts and prints, per run, the reference's top-1 minus top-2 logit at the
split and along the run. Not a test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch

    from edgeship.models import smollm2_gguf_path
    from exporter import quality
    from exporter.pipelines import npu_lm
    from exporter.source import load_causal_lm, load_tokenizer, resolve_source

    result = json.loads(Path(sys.argv[1]).read_text())
    shares = result["greedy_prefix_matches"]
    size = npu_lm.EVAL_SIZE
    src = resolve_source(str(smollm2_gguf_path()))
    model, tok = load_causal_lm(src), load_tokenizer(src)
    seqs = quality.eval_sequences(tok, quality.read_texts(None), count=size["count"], length=size["length"])
    rows = []
    with torch.inference_mode():
        for prompt, share in zip(seqs[:, : size["prompt_len"]], shares):
            ids = torch.from_numpy(prompt[None])
            run = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=size["steps"],
                                 min_new_tokens=size["steps"], do_sample=False, num_beams=1, pad_token_id=0,
                                 eos_token_id=None)
            logits = model(run).logits[0, len(prompt) - 1 : -1].float().numpy()  # the picks of each greedy token
            top = np.sort(logits, -1)[:, -2:]
            margin = top[:, 1] - top[:, 0]
            split = round(share * size["steps"])
            rows.append({"split_at": split, "margin_at_split": round(float(margin[split]), 3) if split < len(margin) else None,
                         "median_margin": round(float(np.median(margin)), 3),
                         "positions_with_margin_below_0.5": int((margin < 0.5).sum())})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
