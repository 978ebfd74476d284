"""Admission control: a fixed number of running requests and a bounded FIFO of waiting ones.

`slots` is the most that ever run at once; each request also names the serving model's own limit
(1, or a batching LM's max_batch). A request that finds the queue full is refused at once (never piles up); a waiting request gives
up when its deadline passes or its client goes away. The HTTP server takes a `Place` on its event
loop (`reserve()`, never blocks) before it hands the request to a worker thread, which waits for
the slot there: threads are bounded by slots + queue_size, never by connections.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.api.errors import Overloaded, Timeout
from agent.runtime.errors import Cancelled


class Place:
    """A place in the queue; `wait()` turns it into a running slot, `release()` gives either back."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.state = "waiting"  # waiting -> running -> done, or waiting -> done

    def wait(self, *, deadline: float, gone: Callable[[], bool] = lambda: False, limit: int | None = None) -> None:
        """Block until a slot is ours. Raises Overloaded (closed), Timeout, or Cancelled (client gone).

        `limit`: run only while fewer than this many requests run (the serving model's concurrency)."""
        self._admission._wait(self, deadline=deadline, gone=gone, limit=limit)

    def release(self) -> None:
        self._admission._release(self)

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Admission:
    def __init__(self, *, slots: int = 1, queue_size: int = 16) -> None:
        if slots < 1 or queue_size < 0:
            raise ValueError(f"slots={slots} must be >= 1 and queue_size={queue_size} >= 0")
        self.slots = slots
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[Place] = deque()
        self.closed = False

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def reserve(self) -> Place:
        """Join the queue now, or raise Overloaded at once (full, or shutting down). Never blocks."""
        with self._cond:
            if self.closed:
                raise Overloaded("the server is shutting down; retry on another instance or later", retry_after=5)
            if self._running >= self.slots and len(self._waiting) >= self.queue_size:
                raise Overloaded(f"all {self.slots} slot(s) busy and {len(self._waiting)} request(s) queued "
                                 f"(queue_size {self.queue_size}); retry after a second", retry_after=1)
            place = Place(self)
            self._waiting.append(place)
            return place

    @contextmanager
    def enter(self, *, deadline: float, gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold a slot for the block. Raises Overloaded (full / closed), Timeout, or Cancelled (client gone)."""
        with self.reserve() as place:
            place.wait(deadline=deadline, gone=gone)
            yield

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _wait(self, place: Place, *, deadline: float, gone: Callable[[], bool], limit: int | None = None) -> None:
        slots = self.slots if limit is None else max(1, min(self.slots, limit))
        with self._cond:
            if place.state != "waiting":
                raise RuntimeError(f"this place is {place.state}, not waiting")
            try:
                while not (self._waiting[0] is place and self._running < slots):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout("the request waited in the queue past request_timeout_s; retry later")
                    if self.closed:
                        raise Overloaded("the server is shutting down", retry_after=5)
                    self._cond.wait(min(left, 0.05))
                    if gone():
                        raise Cancelled("the client went away while queued")
            except BaseException:
                self._leave(place)
                raise
            self._waiting.remove(place)
            place.state = "running"
            self._running += 1
            self._cond.notify_all()

    def _release(self, place: Place) -> None:
        with self._cond:
            if place.state == "running":
                self._running -= 1
            elif place.state == "waiting":
                self._waiting.remove(place)
            place.state = "done"
            self._cond.notify_all()

    def _leave(self, place: Place) -> None:  # under self._cond
        if place.state == "waiting":
            self._waiting.remove(place)
            place.state = "done"
            self._cond.notify_all()
