"""Seconds per call of an NPU LM bundle's prefill (S = 32) and decode (S = 1) graphs on onnxruntime-qnn's
HTP simulator, their compile times, and what loading their compiled EP contexts takes instead.

    .venv/bin/python bench/npu_lm_decode_calls.py BUNDLE [--calls 3] [--contexts DIR] [--out FILE.json]

BUNDLE: an npu-qnn-htp LM bundle with a decode graph (e.g. `bench/npu_lm_smollm2.py --keep DIR`). Each
call is one decode step at cache position 40. The seconds are the x86_64 simulator's on this host, not a
device's, and move with whatever else runs on the host (the load average is printed). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--contexts", type=Path, help="write the compiled contexts here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    import onnxruntime as ort

    from agent.runtime.qnn import qnn_session_options
    from agent.runtime.static_generation import StaticDecoder
    from exporter import npu
    from exporter.pipelines import npu_lm

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    cfg = manifest["model"]["config"]
    options = {**npu.DEFAULT_PROVIDER_OPTIONS, **manifest["runtime"]["execution_providers"][0]["options"]}
    graphs = {cfg["step_length"]: manifest["model"]["entry"], cfg["decode_step_length"]: cfg["decode_entry"]}
    host = StaticDecoder(None, step=cfg["step_length"], cache=cfg["cache_length"], num_layers=cfg["num_layers"],
                         kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"])
    host.length = 40
    result: dict = {"bundle": str(args.bundle), "graphs": {}}
    for step, entry in graphs.items():
        t0 = time.perf_counter()
        sess = npu_lm.htp_session(args.bundle / entry, options)
        compile_s = time.perf_counter() - t0
        feed = host.feed([1], step=step)
        seconds = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            sess.run(None, feed)
            seconds.append(round(time.perf_counter() - t0, 2))
        del sess
        result["graphs"][f"S={step}"] = {"entry": entry, "compile_seconds": round(compile_s, 2),
                                         "seconds_per_call": seconds}
    ctx_dir = args.contexts or Path(tempfile.mkdtemp(prefix="edgeship-npu-ctx-"))
    ctx_dir.mkdir(parents=True, exist_ok=True)
    for step, entry in graphs.items():
        ctx = ctx_dir / entry.replace(".onnx", "_ctx.onnx")
        npu.write_ep_context(args.bundle / entry, ctx, provider_options=options)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so = qnn_session_options(cpu_fallback=False, provider_options=options, sess_options=so)
        t0 = time.perf_counter()
        ort.InferenceSession(str(ctx), sess_options=so)
        result["graphs"][f"S={step}"].update(context_load_seconds=round(time.perf_counter() - t0, 2),
                                             context_bytes=ctx.stat().st_size)
    result["weights_file_bytes"] = (args.bundle / npu_lm.DATA_NAME).stat().st_size
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
