"""What CPU this process really has: usable cores (affinity + cgroup quota) and feature flags.

Everything is read at run time from /proc and /sys; nothing about the hardware is assumed.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Flags that matter to onnxruntime's kernels, in the order people ask about them.
INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
                     "neon", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max or v1 cfs), None when unlimited or unknown."""
    for rel in _own_cgroup_paths():
        cpu_max = root / rel.lstrip("/") / "cpu.max"
        try:
            quota, period = cpu_max.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            return int(quota) / int(period)
        return None
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _own_cgroup_paths() -> list[str]:
    """This process's cgroup v2 path and its ancestors (a parent's cpu.max limits us too)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ["/"]
    for line in lines:
        if line.startswith("0::"):
            path = line[3:] or "/"
            parts = [p for p in path.split("/") if p]
            return ["/".join(parts[:i]) or "/" for i in range(len(parts), -1, -1)]
    return ["/"]


def usable_cpus() -> int:
    """CPUs this process may really use: min(affinity, ceil(cgroup quota)), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cpu_facts() -> dict:
    """Model name, architecture, usable and online cores, and the feature flags of interest."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {
        "arch": platform.machine(),
        "model": model or platform.processor() or "unknown",
        "cores_online": os.cpu_count() or 1,
        "cores_usable": usable_cpus(),
        "flags": [f for f in INTERESTING_FLAGS if f in flags],
    }
