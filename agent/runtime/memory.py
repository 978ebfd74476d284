"""Give back the bundle's file pages that a loaded session no longer reads (Linux).

onnxruntime maps a bundle's external data file and, on CPU, repacks the 4-/8-bit MatMulNBits weights
into its own buffers while the session is created. Reading them for that leaves their file pages
resident in the process: for TinyLlama-1.1B int4 about 140 MB of scales and zero points that the
packed kernels never read again (measured: they do not come back during generation). They are clean
pages of a read-only file, so the kernel could reclaim them under pressure, but until then they count
in the agent's RSS and in what the device reports.

release_clean_file_pages() drops them with madvise(MADV_DONTNEED). It only touches mappings of files
under the bundle directory whose pages are all clean (no Private_Dirty or Shared_Dirty in
/proc/self/smaps): such a page is an exact copy of the file, and any page still in use (an
embedding row, say) is read back from the file on its next access. Bundles are immutable once
verified (updates go to the other slot), so what comes back is what was there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on [start, start + length); True when it succeeded (errno logged at debug otherwise)."""
    if _libc().madvise(start, length, advice) == 0:
        return True
    log.debug("madvise(%#x, %d, %d) failed: errno %d", start, length, advice, ctypes.get_errno())
    return False


def file_mappings(directory: Path, smaps: str = "/proc/self/smaps") -> list[tuple[int, int, int, int]]:
    """(start, end, resident kB, dirty kB) of every mapping of a file under `directory`."""
    root = str(Path(directory).resolve()) + os.sep
    out: list[list[int]] = []
    current: list[int] | None = None
    with open(smaps) as f:
        for line in f:
            m = _RANGE.match(line)
            if m:
                current = None
                if m.group(4).startswith(root):
                    current = [int(m.group(1), 16), int(m.group(2), 16), 0, 0]
                    out.append(current)
            elif current is not None:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    current[2] = int(rest.split()[0])
                elif key in ("Private_Dirty", "Shared_Dirty"):
                    current[3] += int(rest.split()[0])
    return [tuple(r) for r in out]  # type: ignore[misc]


def release_clean_file_pages(directory: Path) -> int:
    """Drop the resident, clean pages of files under `directory` mapped by this process; bytes released.

    0 where there is nothing to do or no /proc (not Linux): the caller never needs to care."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/smaps"):
        return 0
    try:
        maps = file_mappings(directory)
    except OSError as exc:
        log.debug("cannot read /proc/self/smaps: %s", exc)
        return 0
    released = 0
    for start, end, rss_kb, dirty_kb in maps:
        # a written page is not the file's: never drop it
        if rss_kb and not dirty_kb and _madvise(start, end - start, MADV_DONTNEED):
            released += rss_kb * 1024
    return released


# ---- huge pages for the repacked weights ------------------------------------------------------------

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1+: make huge pages of a range now, not when khugepaged gets to it
HUGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anonymous_regions(maps: str = "/proc/self/maps") -> set[tuple[int, int]]:
    """(start, end) of this process's private, writable anonymous mappings and [heap] (where large allocations
    go once glibc's mmap threshold has grown); not files, not reserved-but-inaccessible arena space."""
    out = set()
    try:
        with open(maps) as f:
            for line in f:
                parts = line.split()
                if parts[1] == "rw-p" and (len(parts) == 5 or parts[5] == "[heap]"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.add((start, end))
    except OSError:
        pass
    return out


def huge_pages_available() -> bool:
    """Transparent huge pages are not switched off ("[never]") on this kernel."""
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def collapse_to_huge_pages(regions: set[tuple[int, int]], *, min_bytes: int = 4 << 20, min_total: int = 0) -> int:
    """Back the 2 MiB-aligned inside of each region of at least `min_bytes` with huge pages now
    (madvise MADV_HUGEPAGE, then MADV_COLLAPSE); bytes collapsed. 0 where the kernel cannot, and when
    those regions add up to less than `min_total` (a small model gains nothing worth the copy).

    Decode streams every weight once per token: with 4 KiB pages that is a TLB miss every 4 KiB,
    with 2 MiB pages one every 2 MiB. Measured (bench/agent_speed.py shapes, 2 cores, interleaved
    generations in one process): Qwen2.5-0.5B int4 decode median +7.6 %, TinyLlama-1.1B +5.8 %.
    The content does not change; a region that is freed meanwhile just makes madvise fail."""
    if not sys.platform.startswith("linux") or not huge_pages_available():
        return 0
    big = [(start, end) for start, end in sorted(regions) if end - start >= min_bytes]
    if sum(end - start for start, end in big) < min_total:
        return 0
    done = 0
    for start, end in big:
        lo, hi = -(-start // HUGE) * HUGE, end // HUGE * HUGE
        # MADV_COLLAPSE fails with EINVAL on kernels without it (khugepaged may still do it later), and with
        # EAGAIN/ENOMEM when there is no room: the region just keeps its 4 KiB pages
        if hi > lo and _madvise(lo, hi - lo, MADV_HUGEPAGE) and _madvise(lo, hi - lo, MADV_COLLAPSE):
            done += hi - lo
    return done


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the kernel (glibc malloc_trim(0)); False where there is none.

    Loading a session frees what it read and parsed (protobuf, initializers before repacking), and a
    generation frees its KV buffers and logits; glibc keeps all of it mapped for reuse. Measured on the
    real SmolLM2 bundle: 23 MB back after loading, 25 MB after three requests (bench/agent_memory.py).
    Called where the process is idle (after a load, once the batch has been empty for half a second), never per token.
    """
    if not sys.platform.startswith("linux"):
        return False
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:  # musl and other C libraries: nothing to call
        return False
    trim(0)
    return True
