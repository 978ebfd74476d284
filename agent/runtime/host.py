"""ModelHost: the serving model, swapped without downtime; and the inference statistics."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.protocol.messages import InferenceStats
from agent.runtime.errors import NoModelLoaded
from agent.runtime.model import LoadedModel

WINDOW_KEEP_S = 3600.0
WINDOW_MAX = 50_000


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


@dataclass
class _Period:
    requests: int = 0
    errors: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def __post_init__(self) -> None:
        self.latencies: list[float] = []


class StatsCollector:
    """Thread-safe request statistics: per-heartbeat snapshots, a time window, and running totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._period = _Period()
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=WINDOW_MAX)  # (t, latency_ms, ok)
        self.totals = {"requests": 0, "errors": 0, "rejected": 0, "prompt_tokens": 0, "completion_tokens": 0,
                       "cached_prompt_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}
        self.latency_buckets = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
        self.latency_counts = [0] * (len(self.latency_buckets) + 1)
        self.latency_sum_ms = 0.0
        self.queue_depth = 0  # set by the API server
        self.last_ok_monotonic = 0.0  # when a request last succeeded (agent/liveness.py)
        self.in_flight = 0

    def record(self, latency_ms: float, *, ok: bool, prefill_tokens: int = 0, prefill_s: float = 0.0,
               decode_tokens: int = 0, decode_s: float = 0.0, prompt_tokens: int = 0, completion_tokens: int = 0,
               cached_tokens: int = 0) -> None:
        now = time.time()
        with self._lock:
            p = self._period
            p.requests += 1
            p.errors += 0 if ok else 1
            if ok:  # a failure's latency says nothing about serving speed
                p.latencies.append(latency_ms)
                self.last_ok_monotonic = time.monotonic()
            p.prefill_tokens += prefill_tokens
            p.prefill_s += prefill_s
            p.decode_tokens += decode_tokens
            p.decode_s += decode_s
            self._recent.append((now, latency_ms, ok))
            while self._recent and self._recent[0][0] < now - WINDOW_KEEP_S:
                self._recent.popleft()
            t = self.totals
            t["requests"] += 1
            t["errors"] += 0 if ok else 1
            t["prompt_tokens"] += prompt_tokens
            t["completion_tokens"] += completion_tokens
            t["cached_prompt_tokens"] += cached_tokens
            t["prefill_seconds"] += prefill_s
            t["decode_seconds"] += decode_s
            self.latency_counts[bisect.bisect_left(self.latency_buckets, latency_ms)] += 1
            self.latency_sum_ms += latency_ms

    def rejected(self) -> None:
        """A request refused at the door (queue full): an error for health, not a latency sample."""
        with self._lock:
            self.totals["rejected"] += 1
            self._period.requests += 1
            self._period.errors += 1
            self._recent.append((time.time(), 0.0, False))

    def snapshot_and_reset(self) -> InferenceStats:
        """Statistics since the previous call (for heartbeats)."""
        with self._lock:
            p, self._period = self._period, _Period()
        lat = sorted(p.latencies)
        return InferenceStats(
            requests=p.requests, errors=p.errors, p50_ms=_percentile(lat, 0.50), p95_ms=_percentile(lat, 0.95),
            prefill_tok_s=p.prefill_tokens / p.prefill_s if p.prefill_s > 0 else None,
            decode_tok_s=p.decode_tokens / p.decode_s if p.decode_s > 0 else None,
            queue_depth=self.queue_depth,
        )

    def window(self, since: float) -> tuple[int, int, float | None]:
        """(requests, errors, p95 latency ms) of requests finished at or after `since` (time.time())."""
        with self._lock:
            rows = [r for r in self._recent if r[0] >= since]
        lat = sorted(r[1] for r in rows if r[2])
        return len(rows), sum(1 for r in rows if not r[2]), _percentile(lat, 0.95)


class ModelHost:
    """Holds the serving model. swap() is atomic for new requests; old ones finish on the old model."""

    def __init__(self, model: LoadedModel | None = None) -> None:
        self._cond = threading.Condition()
        self._current = model
        self._in_flight: dict[int, int] = {}
        self.stats = StatsCollector()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        with self._cond:
            old, self._current = self._current, new
            return old

    @contextmanager
    def acquire(self) -> Iterator[LoadedModel]:
        """The current model, counted as in use until the block ends."""
        with self._cond:
            model = self._current
            if model is None:
                raise NoModelLoaded("no model is loaded yet; wait for /readyz or deploy a bundle")
            self._in_flight[id(model)] = self._in_flight.get(id(model), 0) + 1
            self.stats.in_flight += 1
        try:
            yield model
        finally:
            with self._cond:
                left = self._in_flight[id(model)] - 1
                if left:
                    self._in_flight[id(model)] = left
                else:
                    del self._in_flight[id(model)]
                self.stats.in_flight -= 1
                self._cond.notify_all()

    def in_flight(self, model: LoadedModel) -> int:
        with self._cond:
            return self._in_flight.get(id(model), 0)

    def drain(self, old: LoadedModel | None, timeout: float) -> bool:
        """Wait up to `timeout` s for `old`'s requests to finish, then close it. True if none was cut."""
        if old is None:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight.get(id(old), 0) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            drained = not self._in_flight.get(id(old), 0)
        old.close()
        return drained
