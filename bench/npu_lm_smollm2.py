"""Export the packaged SmolLM2-135M (its GGUF, dequantized) for npu-qnn-htp and print what the gate
measured on onnxruntime-qnn's HTP simulator, the HTP compile time and seconds per call.

    .venv/bin/python bench/npu_lm_smollm2.py [--quant int8 [--threshold min_top1_agreement=0.97]] [--keep DIR] [--out bench/results/FILE.json]

Most of the time is the simulator running the gate's 20 static calls (S = 32: 4 windows of 64
tokens, 4 teacher-forced greedy runs of 64 tokens); its seconds per call are the simulator's on
this host, not a device's. `qnn.decode` is the export's check of the step-1 decode graph against the
prefill graph (4 greedy tokens both ways on HTP) with the simulator's seconds per call of each graph
(S = 32 and S = 1). Not a test: never pass/fail. docs/EXPORT.md quotes its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the bundle here instead of a temporary directory")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quant", choices=["int8", "fp16"],
                        help="int8: the w8a16 QDQ recipe instead of the profile's fp16 default (fp16: the default, named)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="a gate threshold on top of the profile's (repeatable), e.g. min_top1_agreement=0.97")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from agent.bundle import generate_keypair
    from edgeship.models import smollm2_gguf_path
    from exporter import export
    from exporter.cli import _threshold

    tmp = Path(tempfile.mkdtemp(prefix="edgeship-npu-lm-"))
    out = args.keep or tmp / "bundle"
    try:
        key = generate_keypair(tmp / "keys", "bench").private_path
        t0 = time.perf_counter()
        r = export(smollm2_gguf_path(), out=out, key=key, profile="npu-qnn-htp", force=True, overwrite=True,
                   quant=args.quant, thresholds=_threshold(tuple(args.threshold)))
        qnn = r.manifest.quantization.details["qnn"]
        details = r.manifest.quantization.details
        result = {
            "status": r.report.status.value,
            "recipe": {"name": r.manifest.quantization.recipe,
                       **{k: details.get(k) for k in ("precision", "activation_type", "weight_type", "per_channel",
                                                      "calibration_texts", "calibration_windows", "calibration_samples",
                                                      "float_regions")}},
            "metrics": r.report.metrics,
            "greedy_prefix_matches": r.report.details.get("greedy_prefix_matches"),
            "qnn": {k: qnn.get(k) for k in ("ok", "rejected_nodes", "compile_seconds", "calls", "seconds_per_call",
                                                  "decode")},
            "decode_graph": details.get("decode_graph"),
            "thresholds": r.report.thresholds,
            "float_fallback": details.get("float_fallback"),
            "export_seconds": round(time.perf_counter() - t0, 1),
            "steps_seconds": r.stats["steps_seconds"],
            "peak_rss_mb": r.stats["peak_rss_mb"],
            "bundle_bytes": r.stats["bundle_bytes"],
            "load_average": os.getloadavg(),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
