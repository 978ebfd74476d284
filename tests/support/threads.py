"""Run work in several threads at once, and wait for a condition: for tests of concurrent clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def run_together(n: int, work: Callable[[int], Any], *, timeout: float = 60.0) -> list[Any]:
    """work(0) .. work(n - 1), each in its own thread, released at once; their results (or the exception
    one raised) in order."""
    out: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = work(i)
        except Exception as exc:  # reported by the caller's assertion
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def slow_scheduler(model, seconds: float = 0.01) -> None:
    """Every model call of `model`'s batch scheduler takes at least `seconds`: a tiny model's answers then
    outlast a test's checks, and concurrent requests surely overlap (the scheduler decodes ahead of readers)."""
    run = model.batcher._run

    def slow(*args):
        time.sleep(seconds)
        return run(*args)

    model.batcher._run = slow


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
