"""uvicorn's h11 protocol with the limits a device's API needs, per connection, without a thread each.

- Read timeout: a connection has `read_timeout_s` from accept to its first byte, and from the first
  byte of each request to its last (headers and body). A client that stalls gets a 408 and is closed;
  while a request is served, or between requests (uvicorn's keep-alive timeout), the clock is off.
- Connection cap: past `max_connections`, a new connection is answered 503 (Retry-After) and closed.
- Lingering close: when the server closes a connection whose request body it did not read (a 413, a
  403, a malformed request), it sends its answer, shuts down its sending side and drops whatever
  the client still sends for at most `linger_s`, then closes. The client reads the answer instead
  of a reset, nothing it sends after is parsed as a request, and nothing it sends is kept in memory.
- A request uvicorn's parser refuses (negative or malformed Content-Length, bad framing) gets an
  OpenAI-style 400 body rather than uvicorn's text.

This subclasses uvicorn's H11Protocol (its `cycle`, `conn`, `transport`, `connections` attributes
and the `on_response_complete` / `send_400_response` hooks); tests/test_api_http.py exercises
every one of them against the uvicorn version installed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 64
    read_timeout_s: float = 10.0
    linger_s: float = 2.0
    linger_bytes: int = 64 << 20  # dropped beyond this while lingering: close at once

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.read_timeout_s <= 0 or self.linger_s < 0:
            raise ValueError(f"max_connections={self.max_connections} must be >= 1, read_timeout_s="
                             f"{self.read_timeout_s} > 0 and linger_s={self.linger_s} >= 0")


def raw_response(status: int, reason: str, body: dict, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers sent outside h11's state machine."""
    data = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(data)}",
             "connection: close", "server: edgeship-agent", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def _error(message: str, code: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: close() lingers when the request body is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedH11Protocol) -> None:
        self._t = transport
        self._p = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self._closing or self._t.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._p.must_linger():
            self._t.close()
            return
        self._p.lingering = True
        if self._t.can_write_eof():
            self._t.write_eof()  # FIN after the answer; the client may go on sending until it reads it
        self._t.resume_reading()
        self._p.loop.call_later(self._p.limits.linger_s, self._t.close)

    def close_now(self) -> None:
        self._closing = True
        self._t.close()


class LimitedH11Protocol(H11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None, *, limits: ConnectionLimits,
                 on_refused=lambda: None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.on_refused = on_refused
        self.lingering = False
        self._lost = False
        self._force_linger = False
        self._dropped = 0
        self._awaiting = True  # between requests: the next byte starts a request's clock
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self.on_refused()
            self._force_linger = True
            self.transport.write(raw_response(503, "Service Unavailable", _error(
                f"the agent has {self.limits.max_connections} connections open (api.max_connections); "
                "retry after a second", "too_many_connections", "server_error"), {"retry-after": "1"}))
            self.transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the answer is out: what the client still sends is dropped, never parsed
            self._dropped += len(data)
            if self._dropped > self.limits.linger_bytes:
                self.transport.close_now()  # type: ignore[attr-defined]
            return
        if self._awaiting:
            self._awaiting = False
            self._arm()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        self._awaiting = True
        super().on_response_complete()

    def must_linger(self) -> bool:
        """True when closing now could reset a client still sending a body the server did not read."""
        if self._lost:
            return False
        return self._force_linger or self.conn.their_state in (h11.SEND_BODY, h11.ERROR)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(raw_response(400, "Bad Request", _error(
            "malformed HTTP request (request line, headers or framing: e.g. a negative or non-numeric "
            "Content-Length); send a well-formed HTTP/1.1 request", "invalid_http")))
        self._force_linger = True
        self.transport.close()

    # ---- the read clock -----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            return  # the whole request is in and being served: not a read any more
        if self.transport.is_closing():
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(raw_response(408, "Request Timeout", _error(
                f"the request was not received within api.read_timeout_s={self.limits.read_timeout_s:g} s; "
                "send the whole request at once", "request_timeout")))
        self.lingering = True
        self.transport.close_now()  # type: ignore[attr-defined]
