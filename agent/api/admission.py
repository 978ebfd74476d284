"""Admission control: a fixed number of running requests and a bounded FIFO of waiting ones.

A request that finds the queue full is refused at once (never piles up); a waiting request gives
up when its deadline passes or its client goes away.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.api.errors import Overloaded, Timeout
from agent.runtime.errors import Cancelled


class Admission:
    def __init__(self, *, slots: int = 1, queue_size: int = 16) -> None:
        if slots < 1 or queue_size < 0:
            raise ValueError(f"slots={slots} must be >= 1 and queue_size={queue_size} >= 0")
        self.slots = slots
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[object] = deque()
        self.closed = False

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @contextmanager
    def enter(self, *, deadline: float, gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold a slot for the block. Raises Overloaded (full / closed), Timeout, or Cancelled (client gone)."""
        ticket = object()
        with self._cond:
            if self.closed:
                raise Overloaded("the server is shutting down; retry on another instance or later", retry_after=5)
            if self._running >= self.slots and len(self._waiting) >= self.queue_size:
                raise Overloaded(f"all {self.slots} slot(s) busy and {len(self._waiting)} request(s) queued "
                                 f"(queue_size {self.queue_size}); retry after a second", retry_after=1)
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._running < self.slots):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout("the request waited in the queue past request_timeout_s; retry later")
                    if self.closed:
                        raise Overloaded("the server is shutting down", retry_after=5)
                    self._cond.wait(min(left, 0.05))
                    if gone():
                        raise Cancelled("the client went away while queued")
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
