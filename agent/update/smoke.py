"""The smoke test, run in a SUBPROCESS so that a bundle that crashes the runtime cannot take the
serving process down:  python -m agent.update.smoke <bundle_dir> --manifest-sha256 SHA

Loads the bundle the way serving does (agent.runtime.load_model, same providers and threads),
runs its golden inputs, compares with its golden outputs within the manifest's atol/rtol and
checks latency against the budget. Prints ONE JSON line: {"ok", "code", "reason", "max_abs_diff",
"latency_ms", "execution_provider"}; exit status 0 when ok, 1 when not.
The parent (`run_smoke_test`) turns a crash, a hang or garbage output into a clear failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.update.crashpoint import crash_point


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    code: str = ""
    reason: str = ""
    max_abs_diff: float | None = None
    latency_ms: float | None = None
    execution_provider: str | None = None

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in (("max_abs_diff", self.max_abs_diff), ("latency_ms", self.latency_ms))
                if v is not None and math.isfinite(v)}


def run_smoke_test(bundle_dir: Path, manifest_sha256: str, *, providers: list[str] | None = None,
                   threads: int | None = None, latency_budget_ms: float | None = None,
                   timeout_s: float = 120.0) -> SmokeResult:
    """Run the smoke test in a child process; never raises for anything the bundle does."""
    cmd = [sys.executable, "-m", "agent.update.smoke", str(bundle_dir), "--manifest-sha256", manifest_sha256]
    if providers:
        cmd += ["--providers", ",".join(providers)]
    if threads:
        cmd += ["--threads", str(threads)]
    if latency_budget_ms is not None:
        cmd += ["--latency-budget-ms", str(latency_budget_ms)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, text=True, errors="replace")
    except subprocess.TimeoutExpired:
        return SmokeResult(False, "smoke_timeout", f"smoke test did not finish within {timeout_s:.0f}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return SmokeResult(False, "smoke_crashed",
                           f"the runtime crashed ({sig}) while smoke-testing the bundle; stderr: {proc.stderr[-300:].strip()}")
    try:
        data = json.loads(lines[-1])
        return SmokeResult(bool(data["ok"]), str(data.get("code", "")), str(data.get("reason", ""))[:1500],
                           data.get("max_abs_diff"), data.get("latency_ms"), data.get("execution_provider"))
    except (IndexError, ValueError, KeyError, TypeError):
        return SmokeResult(False, "smoke_crashed",
                           f"smoke test exited {proc.returncode} without a result; stderr: {proc.stderr[-300:].strip()}")


def _check(bundle_dir: Path, manifest_sha256: str, providers: list[str] | None, threads: int | None,
           latency_budget_ms: float | None) -> dict:
    from agent.bundle import Manifest, VerifiedBundle

    raw = (bundle_dir / "manifest.json").read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        return {"ok": False, "code": "manifest_sha_mismatch", "reason": f"{bundle_dir} is not bundle {manifest_sha256[:12]}"}
    # The parent verified signature and every file hash before staging; this is the same bundle.
    vb = VerifiedBundle(bundle_dir, Manifest.from_bytes(raw), "verified-by-parent", manifest_sha256)
    from agent.runtime import load_model

    crash_point("smoke:load")
    try:
        model = load_model(vb, threads=threads, providers=providers, huge_pages=False)  # golden, then closed
    except Exception as exc:  # any load failure is the bundle's, reported as such
        return {"ok": False, "code": "smoke_load_failed", "reason": f"loading {vb.manifest.ref} failed: {exc}"[:1500]}
    try:
        result = model.run_golden()
    finally:
        model.close()
    out = {"ok": result.ok, "code": "" if result.ok else "golden_mismatch", "reason": result.reason,
           "max_abs_diff": result.max_abs_diff if math.isfinite(result.max_abs_diff) else None,
           "latency_ms": result.latency_ms, "execution_provider": model.execution_provider}
    if result.ok and latency_budget_ms is not None and result.latency_ms > latency_budget_ms:
        out.update(ok=False, code="smoke_too_slow",
                   reason=f"golden run took {result.latency_ms:.1f} ms, over the device budget of {latency_budget_ms} ms")
    elif not result.ok and "latency" in result.reason and "diff" not in result.reason:
        out["code"] = "smoke_too_slow"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.update.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("bundle_dir", type=Path)
    parser.add_argument("--manifest-sha256", required=True)
    parser.add_argument("--providers", default="")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--latency-budget-ms", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        out = _check(args.bundle_dir, args.manifest_sha256, [p for p in args.providers.split(",") if p] or None,
                     args.threads, args.latency_budget_ms)
    except Exception as exc:
        out = {"ok": False, "code": "smoke_error", "reason": f"{type(exc).__name__}: {exc}"[:1500]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    os._exit(main())  # skip interpreter teardown: a runtime that crashes on unload is not the bundle's fault
