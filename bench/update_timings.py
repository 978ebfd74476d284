"""Model update timings on this machine (numbers, never pass/fail).

1. Download of a bundle-sized archive from a loopback HTTP server: plain, and resumed with Range
   after the server cut the body at 50 %.
2. The smoke test subprocess (`python -m agent.update.smoke`) on the tiny test bundle.
3. A switch under steady load: request latency before / around ModelHost.swap, failures.
4. A full deploy through a real broker (ack -> committed, watch window 0 s).

    python bench/update_timings.py [--mb 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.bundle import TrustedKeys, generate_keypair, open_bundle  # noqa: E402
from agent.protocol import BundleRef, DeployCommand, WatchPolicy  # noqa: E402
from agent.runtime import ModelHost, load_model  # noqa: E402
from agent.update.download import DownloadOptions, download  # noqa: E402
from agent.update.smoke import run_smoke_test  # noqa: E402
from tests.support.broker import start_broker  # noqa: E402
from tests.support.http import Fault, FileServer  # noqa: E402
from tests.support.update_harness import Bundles, Controller, InProcessDevice, deadline_in  # noqa: E402


def bench_download(tmp: Path, mb: int) -> dict:
    blob = tmp / "blob.tar"
    blob.write_bytes(os.urandom(mb * 1024 * 1024))
    srv = FileServer().start()
    url = srv.add("blob.tar", blob)
    out = {}
    t0 = time.perf_counter()
    download([url], tmp / "a.part", expected_size=blob.stat().st_size)
    out["plain_s"] = time.perf_counter() - t0
    out["plain_MBps"] = mb / out["plain_s"]
    srv.fault = Fault("truncate", times=1, at=blob.stat().st_size // 2)
    t0 = time.perf_counter()
    download([url], tmp / "b.part", expected_size=blob.stat().st_size, opts=DownloadOptions(backoff_s=0.01))
    out["resumed_s"] = time.perf_counter() - t0
    out["resume_request"] = srv.requests[-1][1]
    srv.stop()
    return out


def bench_smoke(bundle_dir: Path, sha: str, n: int = 3) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = run_smoke_test(bundle_dir, sha)
        times.append(time.perf_counter() - t0)
        assert r.ok, r
    return {"runs": n, "median_s": statistics.median(times), "max_s": max(times)}


def bench_switch(v1: Path, v2: Path, trusted: TrustedKeys, threads: int = 4, swaps: int = 20) -> dict:
    host = ModelHost(load_model(open_bundle(v1, trusted)))
    bundles = [open_bundle(v1, trusted), open_bundle(v2, trusted)]
    stop, lat, fails = threading.Event(), [], [0]

    def client() -> None:
        x = [[0.1] * 8]
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with host.acquire() as m:
                    m.embed(x)
            except Exception:
                fails[0] += 1
            lat.append((time.perf_counter(), (time.perf_counter() - t0) * 1000))

    ts = [threading.Thread(target=client) for _ in range(threads)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    swap_ms, windows = [], []
    for i in range(swaps):
        new = load_model(bundles[(i + 1) % 2])  # loaded before the swap, as the manager does
        t0 = time.perf_counter()
        old = host.swap(new)
        swap_ms.append((time.perf_counter() - t0) * 1000)
        host.drain(old, 5)
        windows.append(t0)
        time.sleep(0.1)
    stop.set()
    for t in ts:
        t.join()
    near = [ms for t, ms in lat if any(abs(t - w) < 0.05 for w in windows)]
    steady = [ms for t, ms in lat if all(abs(t - w) >= 0.05 for w in windows)]
    q = lambda v, p: sorted(v)[int(p * (len(v) - 1))] if v else None  # noqa: E731
    return {"swaps": swaps, "requests": len(lat), "failed": fails[0], "swap_call_ms_max": max(swap_ms),
            "steady_p50_ms": q(steady, 0.5), "steady_p99_ms": q(steady, 0.99),
            "near_swap_p50_ms": q(near, 0.5), "near_swap_p99_ms": q(near, 0.99), "near_swap_max_ms": max(near)}


def bench_deploy(tmp: Path, bundles: Bundles, trusted: TrustedKeys) -> dict:
    broker = start_broker()
    srv = FileServer().start()
    ctl = Controller(broker.port, "bench")
    dev = InProcessDevice(tmp / "state", broker.port, "bench", trusted, install=bundles.made["v1"][0])
    _, tar, sha = bundles.made["v2"]
    url = srv.add("v2.tar", tar)
    t0 = time.perf_counter()
    ctl.send(DeployCommand(id="d1", device_id="dev1", rollout_id="r1", urls=[url], deadline=deadline_in(),
                           bundle=BundleRef(name="tiny", version="1.1.0", manifest_sha256=sha),
                           watch=WatchPolicy(window_s=0)))
    ctl.ack("d1")
    ack_s = time.perf_counter() - t0
    ev = ctl.final_event("d1")
    total_s = time.perf_counter() - t0
    stamps = {e.state.value: e.ts for e in ctl.events("d1") if e.bytes_done is None}
    dev.close()
    ctl.close()
    srv.stop()
    broker.stop()
    return {"final": ev.state.value, "ack_s": ack_s, "deploy_to_committed_s": total_s,
            "per_state_s": {k: round(stamps[k] - stamps["downloading"], 3) for k in stamps}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgeship-bench-update-"))
    kp = generate_keypair(tmp / "keys", "bench")
    trusted = TrustedKeys.from_paths([kp.public_path])
    bundles = Bundles(tmp / "bundles", kp.private_path)
    bundles.make("v1", version="1.0.0")
    bundles.make("v2", version="1.1.0", seed=3)
    v1_dir, v2_dir = bundles.made["v1"][0], bundles.made["v2"][0]
    result = {"cpus": os.cpu_count(), "note": "loopback, shared CI-class machine: contention inflates every number",
              "download": bench_download(tmp, args.mb),
              "smoke": bench_smoke(v2_dir, bundles.made["v2"][2]),
              "switch": bench_switch(v1_dir, v2_dir, trusted),
              "deploy": bench_deploy(tmp, bundles, trusted)}
    print(json.dumps(_rounded(result), indent=2))


def _rounded(v):
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


if __name__ == "__main__":
    main()
