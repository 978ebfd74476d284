"""The local OpenAI-compatible HTTP API: uvicorn (h11) and starlette on an event loop of their own.

    ApiServer.start()   binds (TCP or a Unix socket; an OSError here is the caller's), runs uvicorn
                        in the `edgeship-api` thread, returns once it accepts connections
    ApiServer.stop()    stops accepting, lets requests in flight finish for `drain_timeout_s`, then
                        cuts them (streams end with an error event and [DONE])

Connections cost no thread (agent/api/transport.py bounds them: count, read timeout); model work
runs in a pool of slots + queue_size worker threads, admitted by agent/api/admission.py. Routes:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   POST /v1/classifications
    GET  /v1/models[/{id}]      GET /healthz   GET /readyz   GET /metrics
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from agent.api import metrics
from agent.api.admission import Admission, Place
from agent.api.errors import Overloaded
from agent.api.guard import MAX_BODY_BYTES, Guard
from agent.api.transport import ConnectionLimits
from agent.runtime.host import ModelHost

log = logging.getLogger(__name__)

BACKLOG = 128


class ApiServer:
    """OpenAI-compatible HTTP on loopback (or a Unix socket) in front of a ModelHost."""

    def __init__(self, host: ModelHost, *, host_addr: str = "127.0.0.1", port: int = 8088,
                 unix_socket: str | Path | None = None, queue_size: int = 16, request_timeout_s: float = 300.0,
                 slots: int = 1, max_connections: int = 64, read_timeout_s: float = 10.0,
                 allowed_hosts: tuple[str, ...] | list[str] = (), token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.host = host
        self.host_addr = host_addr
        self.port = port
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self.request_timeout_s = request_timeout_s
        self.admission = Admission(slots=slots, queue_size=queue_size)
        self.limits = ConnectionLimits(max_connections=max_connections, read_timeout_s=read_timeout_s)
        self.guard = Guard(None if self.unix_socket else host_addr, frozenset(allowed_hosts), token, max_body_bytes)
        self._lock = threading.Lock()
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self.draining = False
        self._abort = threading.Event()  # set when stop()'s drain deadline passes: cut streams
        self.http_counts: Counter[tuple[str, int]] = Counter()
        self.cancelled = 0
        self.refused_connections = 0
        self.registry = metrics.registry(metrics.ApiCollector(
            host, http_counts=self._http_counts, cancelled=lambda: self.cancelled,
            running=lambda: self.admission.running, refused=lambda: self.refused_connections))
        self._server = None  # uvicorn.Server
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        import uvicorn

        from agent.api.app import build_app
        from agent.api.transport import LimitedH11Protocol

        sock = self._bind()
        protocol = functools.partial(LimitedH11Protocol, limits=self.limits, on_refused=self._count_refused)
        config = uvicorn.Config(build_app(self), http=protocol, ws="none", lifespan="off", loop="asyncio",
                                log_config=None, log_level="warning", access_log=False, server_header=False,
                                headers=[("server", "edgeship-agent")], backlog=BACKLOG,
                                timeout_keep_alive=max(1, min(5, int(self.limits.read_timeout_s))))
        config.load()
        self._server = uvicorn.Server(config)
        self._pool = ThreadPoolExecutor(self.admission.slots + self.admission.queue_size,
                                        thread_name_prefix="edgeship-api-work")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="edgeship-api",
                                        daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            sock.close()
            raise OSError(f"the API server on {self.url} did not start (see the log)")
        log.info("API listening on %s", self.url)

    def _bind(self) -> socket.socket:
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.unix_socket))
                os.chmod(self.unix_socket, 0o660)
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                raise
            return sock
        family = socket.AF_INET6 if ":" in self.host_addr else socket.AF_INET
        sock = socket.create_server((self.host_addr, self.port), family=family, backlog=BACKLOG)
        self.port = sock.getsockname()[1]
        return sock

    @property
    def listening(self) -> bool:
        return (self._server is not None and self._thread is not None and self._thread.is_alive()
                and not self._server.should_exit)

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        host = f"[{self.host_addr}]" if ":" in self.host_addr else self.host_addr
        return f"http://{host}:{self.port}"

    @property
    def aborting(self) -> bool:
        return self._abort.is_set()

    def stop(self, drain_timeout_s: float = 10.0) -> bool:
        """Stop accepting, let running requests finish for up to `drain_timeout_s`, then cut them.

        Returns True when every request finished on its own.
        """
        self.draining = True
        self.admission.close()
        if self._server is not None:
            self._server.config.timeout_graceful_shutdown = int(drain_timeout_s) + 6
            self._server.should_exit = True  # uvicorn closes the listener and idle connections within 0.1 s
        deadline = time.monotonic() + drain_timeout_s
        with self._idle:
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            clean = not self._active
        if not clean:
            self._abort.set()
            with self._idle:
                self._idle.wait_for(lambda: not self._active, timeout=5.0)
        if self._thread is not None:
            self._thread.join(5.0)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
        return clean

    # ---- what the app and handlers use --------------------------------------------------------

    def submit(self, fn, *args, **kwargs) -> Future:
        assert self._pool is not None
        return self._pool.submit(fn, *args, **kwargs)

    def reserve(self) -> Place:
        """A place in the admission queue, or Overloaded (503) at once."""
        try:
            place = self.admission.reserve()
        except Overloaded:
            self.host.stats.rejected()
            raise
        self.host.stats.queue_depth = self.admission.depth
        return place

    def request_started(self) -> None:
        with self._lock:
            self._active += 1

    def request_finished(self, label: str, status: int) -> None:
        with self._lock:
            self._active -= 1
            self.http_counts[(label, status)] += 1
            self._idle.notify_all()

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def _count_refused(self) -> None:
        self.refused_connections += 1  # on the event loop thread only

    def _http_counts(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self.http_counts)
