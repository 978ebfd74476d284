"""A small real HTTP server for download tests, with switchable faults.

    srv = FileServer().start(); srv.add("b.tar", path); url = srv.url("b.tar")
    srv.fault = Fault("500", times=2)   # the next 2 requests get a 500, then normal service

Faults: "404", "500", "hang" (accept, then say nothing), "truncate" (promise the full length,
send `at` bytes, close), "slow" (limit_bps), "unsized" (no Content-Length: the file, then junk up
to `at` bytes in all, close-delimited or, with `chunked`, chunked). Range requests are honoured
unless `ranges=False`. `sent` counts the body bytes the socket accepted.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    kind: str  # "404" | "500" | "hang" | "truncate" | "slow" | "unsized"
    times: int | None = None  # apply to this many requests, then stop; None = always
    skip: int = 0  # let this many requests through untouched first (e.g. an update's manifest head fetch)
    at: int = 0  # truncate: bytes sent before closing; unsized: bytes sent in all
    chunked: bool = False  # unsized: Transfer-Encoding: chunked instead of close-delimited
    limit_bps: int = 0  # slow: bytes per second
    hang_s: float = 30.0


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.fault: Fault | None = None
        self.ranges = True
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True

    def start(self) -> FileServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, name: str, path: Path) -> str:
        self.files[name] = Path(path)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def _take_fault(self) -> Fault | None:
        with self._lock:
            f = self.fault
            if f is None:
                return None
            if f.skip > 0:
                f.skip -= 1
                return None
            if f.times is not None:
                if f.times <= 0:
                    return None
                f.times -= 1
            return f

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range", "")
        with self._lock:
            self.requests.append((h.path, rng))
        fault = self._take_fault()
        kind = fault.kind if fault else ""
        if kind in ("404", "500"):
            body = f"fault {kind}\n".encode()
            h.send_response(int(kind))
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if kind == "hang":
            self._stop.wait(fault.hang_s)
            h.close_connection = True
            return
        path = self.files.get(h.path.lstrip("/"))
        if path is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = path.read_bytes()
        if kind == "unsized":
            self._send_unsized(h, data, fault)
            return
        start, end, status = 0, len(data) - 1, 200
        m = _RANGE.match(rng) if self.ranges and rng else None
        if m:
            start = int(m[1])
            end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if kind == "truncate":
            h.wfile.write(body[:fault.at])
            h.wfile.flush()
            h.close_connection = True
            return
        if kind == "slow" and fault.limit_bps:
            step = max(1, fault.limit_bps // 20)
            for i in range(0, len(body), step):
                if self._stop.is_set():
                    return
                try:
                    h.wfile.write(body[i:i + step])
                    h.wfile.flush()
                except OSError:
                    return
                time.sleep(step / fault.limit_bps)
            return
        try:
            h.wfile.write(body)
        except OSError:
            pass

    def _send_unsized(self, h: BaseHTTPRequestHandler, data: bytes, fault: Fault) -> None:
        """200 without Content-Length (Range ignored): `data`, then zeros up to `fault.at` bytes."""
        h.send_response(200)
        if fault.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        step = 64 * 1024
        for i in range(0, max(fault.at, len(data)), step):
            piece = data[i:i + step] or bytes(min(step, fault.at - i))
            try:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if fault.chunked else piece)
                h.wfile.flush()
            except OSError:  # the client hung up
                return
            with self._lock:
                self.sent += len(piece)
        if fault.chunked:
            try:
                h.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
