"""all-MiniLM-L6-v2 quantization recipes side by side: quality vs PyTorch and host speed vs fp32.

    python bench/minilm_recipes.py [--threads N] [--rounds R]

Recipes: fp32; optimum's --avx2 dynamic preset (u8/u8, every quantizable op incl. attention MatMuls and
the embedding Gather, through optimum's ORTQuantizer) per-tensor and per-channel; per-channel int8 on
the weight MatMuls only (edgeship's base); edgeship's automatic mixed precision (cpu-x86-avx2 profile).
Quality: cosine of the sentence embeddings against sentence-transformers-style PyTorch (mean
pooling + L2) on the built-in 52 evaluation sentences. Speed: sentences/s, one sentence per call
(as a device serves requests), best of R rounds interleaved across recipes. Numbers taken on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def torch_reference(model_dir: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def measure(models: dict[str, Path], feeds: list[dict[str, np.ndarray]], reference: np.ndarray, *, threads: int,
            rounds: int) -> dict[str, dict[str, float]]:
    """Quality of each model, and its best-of-`rounds` speed; rounds interleave the models so that
    a burst of load from other processes does not land on one recipe only."""
    import onnxruntime as ort

    sessions, rows = {}, {}
    for name, path in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = sessions[name] = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        out = np.concatenate([sess.run(None, f)[0] for f in feeds])
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        rows[name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sent_s": 0.0,
                      "mb": path.stat().st_size / 1e6}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for f in feeds:
                sess.run(None, f)
            rows[name]["sent_s"] = max(rows[name]["sent_s"], len(feeds) / (time.perf_counter() - t0))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    from exporter.calibration import eval_texts
    from exporter.pipelines.encoder import export_encoder
    from exporter.profiles import load_profile
    from tests.support.models import minilm_path

    src = minilm_path()
    texts = eval_texts()
    reference = torch_reference(src, texts)
    tok = AutoTokenizer.from_pretrained(src)
    feeds = [{k: v.astype(np.int64) for k, v in tok([t], return_tensors="np").items()} for t in texts]
    prof = load_profile("cpu-x86-avx2")
    settings = prof.task("embedding")

    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as tmp:
        work = Path(tmp)
        fp32 = export_encoder(src, work / "fp32", task="embedding", profile=prof,
                              recipe=settings.quantization.model_copy(update={"method": "none"}),
                              thresholds=settings.thresholds).onnx_path
        models: dict[str, Path] = {"fp32": fp32}

        (work / "optimum").mkdir()
        for name in ("config.json",):
            (work / "fp32" / name).write_bytes((src / name).read_bytes())  # ORTQuantizer wants the config
        q = ORTQuantizer.from_pretrained(work / "fp32", file_name="model.onnx")
        q.quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=False), work / "optimum")
        models["optimum --avx2 (per-tensor)"] = next((work / "optimum").glob("*.onnx"))
        (work / "optimum-pc").mkdir()
        q.quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=True), work / "optimum-pc")
        models["optimum --avx2 --per_channel"] = next((work / "optimum-pc").glob("*.onnx"))

        models["per-channel int8, weight MatMuls"] = work / "per_channel.onnx"
        quantize_dynamic(str(fp32), str(models["per-channel int8, weight MatMuls"]), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})

        t0 = time.perf_counter()
        mixed = export_encoder(src, work / "mixed", task="embedding", profile=prof, recipe=settings.quantization,
                               thresholds=settings.thresholds)
        search_s = time.perf_counter() - t0
        models[f"mixed precision ({len(mixed.quantization.details['float_nodes'])} of 36 float)"] = mixed.onnx_path

        rows = measure(models, feeds, reference, threads=args.threads, rounds=args.rounds)
    base = rows["fp32"]["sent_s"]
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences, batch 1, {args.threads} threads, best of {args.rounds}")
    print(f"{'recipe':<34} {'cos mean':>9} {'cos min':>8} {'sent/s':>8} {'x fp32':>7} {'MB':>6}")
    for name, r in rows.items():
        print(f"{name:<34} {r['cos_mean']:9.4f} {r['cos_min']:8.4f} {r['sent_s']:8.1f} {r['sent_s'] / base:7.2f} {r['mb']:6.1f}")
    print(f"mixed-precision export (search included): {search_s:.0f}s; kept float: {mixed.quantization.details['float_nodes']}")


if __name__ == "__main__":
    main()
