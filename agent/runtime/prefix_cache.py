"""Reuse the KV cache of recent sequences: a new prompt skips prefill for its longest known prefix.

Entries are (token ids, per-layer KV arrays covering exactly those ids). Memory is bounded by
bytes; the least recently used entry goes first. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedPrefix:
    tokens: tuple[int, ...]
    kv: tuple[np.ndarray, ...]  # per input name order: layer0.key, layer0.value, ...; [1, heads, len, dim]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)


def common_prefix_len(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, *, max_bytes: int = 256 << 20, max_entries: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, tokens: list[int], *, limit: int) -> tuple[int, tuple[np.ndarray, ...] | None]:
        """Longest cached prefix of `tokens` (at most `limit` long): (length, KV views) or (0, None)."""
        best_len, best = 0, None
        with self._lock:
            for key, entry in self._entries.items():
                n = min(common_prefix_len(key, tokens), limit)
                if n > best_len:
                    best_len, best = n, entry
            if best is None:
                return 0, None
            self._entries.move_to_end(best.tokens)
            self.hits += 1
            self.reused_tokens += best_len
        return best_len, tuple(np.ascontiguousarray(a[:, :, :best_len, :]) for a in best.kv)

    def store(self, tokens: list[int], kv: tuple[np.ndarray, ...]) -> None:
        entry = CachedPrefix(tuple(tokens), kv)
        if not tokens or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            # An entry that is a prefix of the new one is now redundant.
            for key in [k for k in self._entries if len(k) <= len(entry.tokens) and entry.tokens[:len(k)] == k]:
                self._bytes -= self._entries.pop(key).nbytes
            self._entries[entry.tokens] = entry
            self._bytes += entry.nbytes
            while self._entries and (self._bytes > self.max_bytes or len(self._entries) > self.max_entries):
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes
