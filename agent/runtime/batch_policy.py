"""How a text-generation model shares its decode steps among concurrent requests (no numpy here: the
agent imports this while idle)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """max_batch: sequences decoded together (1: one request at a time, the sequential path).
    kv_cache_mb: the batch's KV buffers, all rows together, stay within this; a lone answer is capped
    to what fits. prefill_chunk: a joining prompt runs this many tokens between the others' decode
    steps, so they stall for one chunk at a time. prefix_cache_mb: the KV of finished and preempted
    sequences kept for the next request that shares their prefix (0: none; a preempted sequence then
    recomputes its tokens when it resumes)."""

    max_batch: int = 4
    kv_cache_mb: float = 512
    prefill_chunk: int = 128
    prefix_cache_mb: float = 256

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch {self.max_batch} is out of range; use 1 (no batching) to 256")
        if not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb {self.kv_cache_mb} must be positive")
        if not self.prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb {self.prefix_cache_mb} must be 0 (no prefix cache) or more")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {self.prefill_chunk} must be at least 1")


SEQUENTIAL = BatchPolicy(max_batch=1)
