"""Host benchmark of an exported LM: prefill and decode tokens/s with onnxruntime at the profile's threads.

Numbers describe the export host, not the device; the manifest says which host.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import Benchmark


def host_info(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "machine": platform.machine(), "threads": threads or usable, "usable_cpus": usable,
            "onnxruntime": ort.__version__, "where": "export host"}


def benchmark_lm(model_path: Path, *, threads: int, prefill_tokens: int = 64, decode_tokens: int = 32,
                 vocab_size: int, max_context: int, repeats: int = 2) -> Benchmark:
    """Best of `repeats` runs: one prefill of `prefill_tokens`, then `decode_tokens` single-token steps."""
    from exporter.lm import OrtDecoder

    prefill_tokens = max(1, min(prefill_tokens, max_context - decode_tokens - 1))
    dec = OrtDecoder(model_path, threads=threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab_size, (1, prefill_tokens), dtype=np.int64)
    dec.run(prompt[:, :4], dec.empty_past())  # warm-up: kernels, allocator
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, past = dec.run(prompt, dec.empty_past())
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
            logits, past = dec.run(token, past)
        t2 = time.perf_counter()
        best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return Benchmark(
        host=host_info(threads),
        metrics={
            "prefill_tokens": prefill_tokens,
            "prefill_latency_ms": round(best_prefill * 1e3, 3),
            "prefill_tok_s": round(prefill_tokens / best_prefill, 2),
            "decode_tokens": decode_tokens,
            "decode_latency_ms_per_token": round(best_decode * 1e3 / decode_tokens, 3),
            "decode_tok_s": round(decode_tokens / best_decode, 2),
        },
    )


def benchmark_latency(model_path: Path, feed: dict[str, np.ndarray], *, threads: int, runs: int = 20) -> Benchmark:
    """Median and p90 latency of one call with `feed` (encoders: the golden batch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    batch = len(next(iter(feed.values())))
    median = float(np.median(times))
    return Benchmark(host=host_info(threads), metrics={
        "batch": batch,
        "latency_ms": round(median * 1e3, 3),
        "latency_p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
        "items_per_s": round(batch / median, 2),
    })
