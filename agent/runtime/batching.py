"""Continuous batching: the running sequences of one model decode together, one model call for all.

    BatchScheduler.submit(...) -> Generation     any thread; the answer streams back through a queue
    the `edgeship-batch` thread, in a loop:
        admit    waiting sequences join while a row is free and the KV pool has room (FIFO)
        prefill  one chunk of one sequence's pending tokens (its prompt, or tokens a grammar forced)
        decode   one step for every sequence with exactly one pending token, all rows in one call
        advance  each sequence samples from its own logits (agent/runtime/decoding.py) and streams

The KV cache is one buffer per layer and kind, [rows, kv_heads, length, head_dim], read and written
in place by GroupQueryAttention (past and present share it); it takes per-row lengths from each
row's attention mask. A sequence owns a row; rows 0..k-1 are in use, and a leaving sequence's row is
refilled by the last one, so a step always runs rows[:k]. rows x length x bytes per position stays
within BatchPolicy.kv_cache_mb. When a sequence must grow and cannot, the most recently admitted
sequence is preempted: its KV goes to the prefix cache and it waits at the head of the queue, to
resume where it stopped (its sampler, grammar and stop-string state are kept).

A row that is not decoding this step (its prompt is still being prefilled) is fed a placeholder token
at its next position; that position is overwritten by its own next chunk, and its logits are ignored.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.runtime.batch_policy import BatchPolicy
from agent.runtime.decoding import AnswerSpec, Decoding, GenerationStats, stop_reason
from agent.runtime.errors import Cancelled, InputError, LoadError
from agent.runtime.memory import release_clean_file_pages, trim_heap

if TYPE_CHECKING:
    from agent.runtime.generation import TextGenerationModel

log = logging.getLogger(__name__)

_END = object()
_ALIGN = 256  # buffer lengths are multiples of this many positions
IDLE_S = 0.5  # empty this long before the KV pool, the C heap and the file pages are given back (~15 ms of work)


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler. `tokens[:length]` have their KV in the row; the rest are pending."""

    tokens: list[int]
    prompt_len: int
    decoding: Decoding
    stats: GenerationStats
    cancel: threading.Event | None
    deadline: float | None
    use_prefix_cache: bool
    order: int  # admission order: the newest is preempted first
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    abandoned: threading.Event = field(default_factory=threading.Event)
    length: int = 0
    row: int = -1
    prompt_logits: np.ndarray | None = None  # kept for the next choice when n > 1
    decode_started: float | None = None
    first_admission: bool = True

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.length

    def why_stop(self, now: float) -> str | None:
        return "generation cancelled" if self.abandoned.is_set() else stop_reason(self.cancel, self.deadline, now)


class KvPool:
    """The batch's KV buffers; grows (rows, then length) on demand within `capacity` positions."""

    def __init__(self, names: list[str], *, kv_heads: int, head_dim: int, dtype, capacity: int,
                 max_rows: int, max_length: int) -> None:
        self.names = names
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.capacity = capacity  # rows x length, in positions
        self.max_rows, self.max_length = max_rows, max_length
        self.rows, self.length = 0, 0
        self.arrays: list[np.ndarray] = []
        self._views: dict[tuple[int, int], list[Any]] = {}

    @staticmethod
    def bytes_per_position(num_buffers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return num_buffers * kv_heads * head_dim * np.dtype(dtype).itemsize

    def fits(self, rows: int, length: int) -> bool:
        return rows <= self.max_rows and length <= self.max_length and rows * length <= self.capacity

    def plan(self, rows: int, length: int) -> tuple[int, int] | None:
        """The shape to hold `rows` rows of `length` positions: the present one if it does, else grown
        generously (rows to a power of two, length doubled) when that fits the pool, else exactly;
        None when even the exact shape does not fit."""
        if rows <= self.rows and length <= self.length:
            return self.rows, self.length
        more_rows = max(self.rows, rows)
        grown_rows = min(self.max_rows, 1 << (more_rows - 1).bit_length())
        exact_len = min(self.max_length, -(-length // _ALIGN) * _ALIGN)
        grown_len = self.length if length <= self.length else min(
            self.max_length, -(-max(length, 2 * self.length, _ALIGN) // _ALIGN) * _ALIGN)
        for r in (grown_rows, more_rows, rows):
            for n in (grown_len, exact_len, length):
                if r >= rows and n >= length and self.fits(r, n):
                    return r, n
        return None

    def resize(self, rows: int, length: int, *, used_rows: int, used_length: int) -> None:
        """New buffers of [rows, heads, length, dim], keeping rows[:used_rows] positions[:used_length]."""
        old = self.arrays
        self.arrays, self._views = [], {}
        for a in old:
            b = np.zeros((rows, self.kv_heads, length, self.head_dim), self.dtype)
            if used_rows and used_length:
                b[:used_rows, :, :used_length] = a[:used_rows, :, :used_length]
            self.arrays.append(b)
        if not old:
            self.arrays = [np.zeros((rows, self.kv_heads, length, self.head_dim), self.dtype) for _ in self.names]
        self.rows, self.length = rows, length

    def release(self) -> None:
        self.arrays, self._views = [], {}
        self.rows = self.length = 0

    def views(self, start: int, stop: int) -> list[Any]:
        """OrtValues over rows[start:stop] of every buffer (contiguous: the row is the leading axis)."""
        import onnxruntime as ort

        key = (start, stop)
        got = self._views.get(key)
        if got is None:
            got = self._views[key] = [ort.OrtValue.ortvalue_from_numpy(a[start:stop]) for a in self.arrays]
        return got

    def move(self, src: int, dst: int, length: int) -> None:
        for a in self.arrays:
            a[dst, :, :length] = a[src, :, :length]

    def read(self, row: int, length: int) -> tuple[np.ndarray, ...]:
        return tuple(a[row : row + 1, :, :length].copy() for a in self.arrays)

    def write(self, row: int, parts: tuple[np.ndarray, ...]) -> None:
        for a, part in zip(self.arrays, parts):
            a[row : row + 1, :, : part.shape[2]] = part


class BatchScheduler:
    """Runs every generation of one shared-buffer GroupQueryAttention model on one thread, batched."""

    def __init__(self, model: TextGenerationModel, policy: BatchPolicy) -> None:
        self.model = model
        self.policy = policy
        per_position = KvPool.bytes_per_position(len(model.past_names), model.num_kv_heads, model.head_dim,
                                                 model.kv_dtype)
        self.capacity = max(1, int(policy.kv_cache_mb * 2**20) // per_position)  # positions, all rows together
        self.pool = KvPool(model.past_names, kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                           dtype=model.kv_dtype, capacity=self.capacity, max_rows=policy.max_batch,
                           max_length=model.max_context)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []  # index = row; touched by the scheduler thread only
        self._order = itertools.count()
        self._stopping = False
        self._binding = None
        self._keep_last = np.ones(1, np.int64)
        self.steps = 0  # decode steps run (all rows in one call)
        self.batched_tokens = 0  # tokens those steps produced
        self.preempted = 0
        self._thread = threading.Thread(target=self._loop, name="edgeship-batch", daemon=True)
        self._thread.start()

    # ---- the client side ------------------------------------------------------------------------

    @property
    def max_tokens_alone(self) -> int:
        """The longest sequence (prompt and answer) the pool holds, alone."""
        return min(self.model.max_context, self.capacity)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, ids: list[int], spec: AnswerSpec, stats: GenerationStats, *, cancel: threading.Event | None,
               deadline: float | None, use_prefix_cache: bool):
        """Queue a generation; returns the Generation that streams it."""
        from agent.runtime.generation import Generation

        seq = Sequence(tokens=list(ids), prompt_len=len(ids), decoding=Decoding(spec, self.model.codec, stats),
                       stats=stats, cancel=cancel, deadline=deadline, use_prefix_cache=use_prefix_cache,
                       order=next(self._order))
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise LoadError(f"model {self.model.ref} is closed")
            self._waiting.append(seq)
            self._cond.notify_all()
        return Generation(self._stream(seq), stats, on_close=lambda: self._abandon(seq))

    def _abandon(self, seq: Sequence) -> None:
        seq.abandoned.set()
        with self._cond:
            self._cond.notify_all()

    def _stream(self, seq: Sequence):
        try:
            while True:
                try:
                    item = seq.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise LoadError(f"model {self.model.ref}: the batch scheduler stopped") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._abandon(seq)  # closed early (client gone): the scheduler drops it at the next step

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still queued or running (the model is closing) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._stopping and not self._waiting and not self._active and self.pool.rows:
                        self._cond.wait(IDLE_S)  # a request right behind the last one skips the clean-up
                    idle = not self._stopping and not self._waiting and not self._active
                if idle and self.pool.rows:
                    # idle: the KV buffers go back to the kernel, and so do the bundle's file pages that
                    # generation mapped (embedding rows, scales: 32 MB for SmolLM2; clean copies of the
                    # file, mapped again on the next request's first step at ~0.5 us per 64 KB)
                    self.pool.release()
                    trim_heap()
                    release_clean_file_pages(self.model.path)
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_waiting(time.monotonic())
                try:
                    self._iterate()
                except Exception as exc:  # the model call failed: every running request gets the error
                    log.exception("batched generation step failed for %s", self.model.ref)
                    for seq in list(self._active):
                        self._leave(seq, exc)
        finally:
            reason = Cancelled(f"model {self.model.ref} was closed (swapped out) during generation")
            with self._cond:
                self._stopping = True
                waiting, self._waiting = list(self._waiting), deque()
            for seq in list(self._active):
                self._leave(seq, reason)
            for seq in waiting:
                seq.out.put(reason)
            self.pool.release()

    def _drop_waiting(self, now: float) -> None:  # under self._cond
        for seq, why in [(s, w) for s in self._waiting if (w := s.why_stop(now))]:
            self._waiting.remove(seq)
            seq.out.put(Cancelled(why))

    def _iterate(self) -> None:
        now = time.monotonic()
        for seq in list(self._active):
            if (why := seq.why_stop(now)) is not None:
                self._leave(seq, Cancelled(why))
        if self.model.closed:
            raise Cancelled(f"model {self.model.ref} was closed (swapped out) during generation")
        self._admit()
        if not self._active:
            return
        prefilling = [s for s in self._active if s.pending > 1]
        decoding = [s for s in self._active if s.pending == 1]
        if prefilling:
            seq = min(prefilling, key=lambda s: s.order)
            # alone, the whole prompt goes in one call (as the sequential path does); with others
            # decoding, one chunk at a time so their tokens keep coming
            n = seq.pending if len(self._active) == 1 else min(seq.pending, self.policy.prefill_chunk)
            if self._ensure(seq.length + n):
                t0 = time.perf_counter()
                logits = self._run(seq.row, seq.row + 1, np.asarray([seq.tokens[seq.length : seq.length + n]]),
                                   [seq.length])[0]
                seq.stats.prefill_s += time.perf_counter() - t0
                seq.length += n
                if seq.pending == 0:
                    self._advance(seq, logits)
            decoding = [s for s in self._active if s.pending == 1]
        if decoding:
            if not self._ensure(0):
                return
            k = len(self._active)
            ids = np.zeros((k, 1), np.int64)
            for s in self._active:
                if s.pending >= 1:
                    ids[s.row, 0] = s.tokens[s.length]  # a prefilling row: placeholder at its next position
            logits = self._run(0, k, ids, [s.length for s in self._active])
            self.steps += 1
            self.batched_tokens += len(decoding)
            for s in decoding:
                s.length += 1
            # rows are read first: a sequence that leaves hands its row to the last one
            for s, row_logits in [(s, logits[s.row]) for s in decoding]:
                self._advance(s, row_logits)

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and len(self._active) < self.policy.max_batch:
                seq = self._waiting[0]
                need = max([len(seq.tokens) + 1] + [s.length + 1 for s in self._active])
                shape = self.pool.plan(len(self._active) + 1, need)
                if shape is None:
                    break  # FIFO: the head waits for room; nobody overtakes it
                self._waiting.popleft()
                self._resize(*shape)
                seq.row = len(self._active)
                self._active.append(seq)
                self._load(seq)

    def _load(self, seq: Sequence) -> None:
        """Put the longest cached prefix of the sequence's tokens into its row."""
        cache = self.model.prefix_cache
        cached, kv = 0, None
        if seq.use_prefix_cache or not seq.first_admission:  # a resumed sequence finds its own KV there
            cached, kv = cache.lookup(seq.tokens, limit=len(seq.tokens) - 1)
        if kv is not None:
            self.pool.write(seq.row, kv)
        seq.length = cached
        if seq.first_admission:
            seq.stats.cached_tokens, seq.stats.prefilled_tokens = cached, len(seq.tokens) - cached
            seq.first_admission = False

    def _resize(self, rows: int, length: int) -> None:
        if (rows, length) != (self.pool.rows, self.pool.length):
            used = max((s.length for s in self._active), default=0)
            self.pool.resize(rows, length, used_rows=len(self._active), used_length=min(used, length))

    def _ensure(self, length: int) -> bool:
        """Room for `length` positions (and every row's next one). When the pool lacks it, the newest
        sequence is preempted and False returned: the caller skips this step and plans again."""
        need = max([length] + [s.length + 1 for s in self._active])
        shape = self.pool.plan(len(self._active), need)
        if shape is not None:
            self._resize(*shape)
            return True
        victim = max(self._active, key=lambda s: s.order)
        if len(self._active) == 1:  # cannot happen: submit() caps every answer to what fits alone
            self._leave(victim, LoadError(f"the KV pool ({self.policy.kv_cache_mb} MB) cannot hold "
                                          f"{need} positions; raise runtime.kv_cache_mb"))
        else:
            self._preempt(victim)
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.preempted += 1
        if seq.length:
            self.model.prefix_cache.store(seq.tokens[: seq.length], self.pool.read(seq.row, seq.length))
        self._remove(seq)
        with self._cond:
            self._waiting.appendleft(seq)
        log.info("%s: preempted a sequence of %d tokens (KV pool of %d MB full); it resumes when room frees",
                 self.model.ref, len(seq.tokens), self.policy.kv_cache_mb)

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token(s) from its logits; it leaves when its last choice ends."""
        now = time.perf_counter()
        if seq.decode_started is None:
            seq.decode_started = now
            if seq.decoding.spec.n > 1:
                seq.prompt_logits = np.array(logits, copy=True)
        while True:
            try:
                chunks, feed = seq.decoding.step(logits)
            except InputError as exc:  # a constraint no token satisfies: this request's, not the batch's
                self._leave(seq, exc)
                return
            for chunk in chunks:
                seq.out.put(chunk)
            seq.stats.decode_s = now - seq.decode_started
            if feed is not None:
                seq.tokens.extend(feed)
                return
            if seq.decoding.done:
                self._leave(seq, None)
                return
            seq.decoding.next_choice()  # from the prompt again: later positions are overwritten
            del seq.tokens[seq.prompt_len :]
            seq.length = min(seq.length, seq.prompt_len)
            logits = seq.prompt_logits

    def _leave(self, seq: Sequence, error: BaseException | None) -> None:
        if seq not in self._active:
            return
        if error is None and seq.use_prefix_cache and seq.length:
            self.model.prefix_cache.store(seq.tokens[: seq.length], self.pool.read(seq.row, seq.length))
        self._remove(seq)
        seq.out.put(_END if error is None else error)

    def _remove(self, seq: Sequence) -> None:
        """Free the sequence's row; the last row moves into it so rows[:k] stay in use."""
        last = self._active[-1]
        if last is not seq:
            self.pool.move(last.row, seq.row, last.length)
            last.row = seq.row
            self._active[seq.row] = last
        self._active.pop()
        seq.row = -1

    def _run(self, start: int, stop: int, ids: np.ndarray, past: list[int]) -> np.ndarray:
        """Logits [rows, vocab] at the last position of `ids` [rows, S], row r after `past[r]` positions."""
        model = self.model
        if model.closed:
            raise Cancelled(f"model {model.ref} was closed (swapped out) during generation")
        rows, width = ids.shape
        total = max(past) + width
        mask = np.zeros((rows, total), np.int64)
        for r, n in enumerate(past):
            mask[r, : n + width] = 1
        if self._binding is None:
            self._binding = model.session.io_binding()
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        if model.has_logits_to_keep:
            b.bind_cpu_input("logits_to_keep", self._keep_last)
        b.bind_output("logits", "cpu")
        for past_name, present_name, value in zip(model.past_names, model.present_names, self.pool.views(start, stop)):
            b.bind_ortvalue_input(past_name, value)
            b.bind_ortvalue_output(present_name, value)
        model.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[:, -1]
