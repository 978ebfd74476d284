"""Where `edgeship serve`'s start -> ready time goes: numbers, never pass/fail.

Two measurements per round, each in a fresh process:
  - end to end: `edgeship serve BUNDLE` started, /readyz polled every 5 ms until it answers 200;
  - stage by stage: a child that does what `edgeship serve` does (agent/serve_cli.py) with a clock between the
    steps: interpreter, imports, opening and verifying the bundle, the onnxruntime session, the file pages and
    huge pages after it, the model object (tokenizer, buffers), trimming the heap, the HTTP server up.

    python bench/serve_startup.py                       # SmolLM2-135M Q4_1, the bundle `edgeship export` makes
    python bench/serve_startup.py --bundle DIR --key PUB --rounds 5 --json bench/results/serve_startup-LABEL.json

Measure alone: start-up is CPU-bound on one core and anything else running moves it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import emit  # noqa: E402
from bench.serve_vs_llama_cpp import (  # noqa: E402
    edgeship_command, exported_bundle, file_digest, free_port, host_profile, tree_env,
)

# the child: the serve path with a clock. argv: bundle, public key, threads
CHILD = r'''
import sys, time, json
t0 = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = round((time.perf_counter() - t0) * 1000, 1)
from pathlib import Path
import tempfile
from agent.api import ApiServer
from agent.bundle import TrustedKeys
from agent.runtime import ModelHost, load_model
from agent.runtime.batch_policy import BatchPolicy
from agent.serve import open_for_serving
mark("imports")
import agent.runtime.session as session_mod
import agent.runtime.memory as memory_mod
def timed(mod, name, label):
    real = getattr(mod, name)
    def wrapper(*a, **k):
        s = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            marks[label] = round(marks.get(label, 0) + (time.perf_counter() - s) * 1000, 1)
    setattr(mod, name, wrapper)
timed(session_mod, "_open", "in: onnxruntime session (graph load, optimization, prepacking)")
timed(session_mod, "release_clean_file_pages", "in: release file pages")
timed(session_mod, "_collapse", "in: huge pages (MADV_COLLAPSE)")
timed(memory_mod, "trim_heap", "in: trim heap")
with tempfile.TemporaryDirectory() as tmp:
    trusted = TrustedKeys.from_paths([Path(sys.argv[2])])
    opened = open_for_serving(Path(sys.argv[1]), trusted, workdir=Path(tmp))
    mark("bundle opened and verified")
    model = load_model(opened.bundle, threads=int(sys.argv[3]), batching=BatchPolicy(max_batch=4))
    mark("model loaded")
    server = ApiServer(ModelHost(model), host_addr="127.0.0.1", port=0, slots=4)
    server.start()
    mark("server listening")
    server.stop()
    model.close()
print(json.dumps(marks))
'''


def end_to_end(bundle: Path, public: Path, threads: int) -> float:
    port = free_port()
    cmd = [*edgeship_command(), "serve", str(bundle), "--trusted-key", str(public), "--port", str(port),
           "--threads", str(threads)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=tree_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 120:
            if proc.poll() is not None:
                sys.exit(f"edgeship serve exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
        sys.exit("edgeship serve not ready after 120 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stages(bundle: Path, public: Path, threads: int) -> dict[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(public), str(threads)], env=tree_env(),
                       cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"stage child failed: {r.stderr[-2000:]}")
    marks = json.loads(r.stdout.strip().splitlines()[-1])
    marks["process (interpreter start to exit)"] = round((time.perf_counter() - t0) * 1000, 1)
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a bundle directory (default: SmolLM2's, exported once and cached)")
    ap.add_argument("--key", type=Path, help="its public key (with --bundle)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--label", default="shared")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.bundle:
        if not args.key:
            sys.exit("--bundle needs --key, the bundle's public key")
        bundle, public = args.bundle, args.key
    else:
        from edgeship.models import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        bundle, public, _ = exported_bundle(gguf, file_digest(gguf), profile=host_profile(), export_args=[])
    ready, runs = [], []
    for i in range(args.rounds):
        ready.append(end_to_end(bundle, public, args.threads))
        runs.append(stages(bundle, public, args.threads))
        print(f"round {i + 1}: start -> ready {ready[-1]:.3f} s; stages (ms from interpreter start) {runs[-1]}",
              file=sys.stderr, flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {"bundle": str(bundle), "threads": args.threads, "label": args.label,
              "start_to_ready_s": {"median": round(statistics.median(ready), 3), "all": [round(x, 3) for x in ready]},
              "stages_ms_median": median, "stages_ms": runs}
    emit(result, args.json)


if __name__ == "__main__":
    main()
