"""The local OpenAI-compatible HTTP API, on the standard library (a small idle footprint).

One thread per connection (ThreadingHTTPServer); model work goes through `Admission` (a fixed
number of running requests and a bounded queue). Routes:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   POST /v1/classifications
    GET  /v1/models[/{id}]      GET /healthz   GET /readyz   GET /metrics
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import select
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.api import metrics
from agent.api.admission import Admission
from agent.api.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Timeout,
)
from agent.api.openai_format import ChatStream, completion_body, system_fingerprint
from agent.bundle import Task
from agent.runtime.errors import Cancelled, InputError, NoModelLoaded, WrongTask
from agent.runtime.host import ModelHost

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
# pydantic names the union member in an error's loc ("temperature.int"); the param is the field
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|list|dict)$|[\[\-]")


class ClientGone(Exception):
    """The client closed its connection; stop working for it."""


class _Exchange:
    """One request/response on a handler: reading the body, writing JSON or server-sent events."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.h = handler
        self.status: int | None = None

    def body(self) -> Any:
        length = self.h.headers.get("Content-Length")
        if length is None:
            raise BadRequest("the request has no Content-Length; send a JSON body", code="missing_body")
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length {length!r} is not a number") from None
        if n > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the body is {n} bytes, over the {MAX_BODY_BYTES} byte limit")
        raw = self.h.rfile.read(n)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body, ensure_ascii=False).encode(), "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.h.send_response(status)
        self.h.send_header("Content-Type", content_type)
        self.h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.h.send_header(k, v)
        self.h.end_headers()
        self.h.wfile.write(data)
        self.h.wfile.flush()

    def start_events(self) -> None:
        self.status = 200
        self.h.send_response(200)
        self.h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.h.send_header("Cache-Control", "no-cache")
        self.h.send_header("Connection", "close")
        self.h.end_headers()
        self.h.close_connection = True
        self.h.wfile.flush()

    def event(self, data: Any) -> None:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        try:
            self.h.wfile.write(b"data: " + payload.encode() + b"\n\n")
            self.h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    def gone(self) -> bool:
        """True once the client has closed its side (polled between tokens, never blocks)."""
        sock = self.h.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-agent"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.api._dispatch(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.api._dispatch(self, "POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.server.api._dispatch(self, "PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.api._dispatch(self, "DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self.server.api._dispatch(self, "PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("api: " + format, *args)


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler expects a (host, port) address


class _Queued:
    """admission.enter() that keeps the queue-depth gauge current and counts refusals."""

    def __init__(self, api: ApiServer, ex: _Exchange, deadline: float) -> None:
        self.api, self.cm = api, api.admission.enter(deadline=deadline, gone=ex.gone)

    def __enter__(self) -> None:
        stats = self.api.host.stats
        stats.queue_depth = self.api.admission.depth + 1
        try:
            self.cm.__enter__()
        except Overloaded:
            stats.rejected()
            raise
        finally:
            stats.queue_depth = self.api.admission.depth

    def __exit__(self, *exc) -> None:
        self.cm.__exit__(*exc)


class ApiServer:
    """OpenAI-compatible HTTP on loopback (or a Unix socket) in front of a ModelHost."""

    def __init__(self, host: ModelHost, *, host_addr: str = "127.0.0.1", port: int = 8088,
                 unix_socket: str | Path | None = None, queue_size: int = 16, request_timeout_s: float = 300.0,
                 slots: int = 1) -> None:
        self.host = host
        self.host_addr = host_addr
        self.port = port
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self.request_timeout_s = request_timeout_s
        self.admission = Admission(slots=slots, queue_size=queue_size)
        self._httpd: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._draining = False
        self._abort = threading.Event()  # set when stop()'s drain deadline passes: cut streams
        self.http_counts: Counter[tuple[str, int]] = Counter()
        self.cancelled = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
            httpd = _UnixServer(str(self.unix_socket), _Handler)
            os.chmod(self.unix_socket, 0o660)
        else:
            httpd = _TcpServer((self.host_addr, self.port), _Handler)
            self.port = httpd.server_address[1]
        httpd.api = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgeship-api", daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.url)

    @property
    def listening(self) -> bool:
        return self._httpd is not None and self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"http://{self.host_addr}:{self.port}"

    def stop(self, drain_timeout_s: float = 10.0) -> bool:
        """Stop accepting, let running requests finish for up to `drain_timeout_s`, then cut them.

        Returns True when every request finished on its own.
        """
        self._draining = True
        self.admission.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        deadline = time.monotonic() + drain_timeout_s
        with self._idle:
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            clean = not self._active
        if not clean:
            self._abort.set()
            with self._idle:
                self._idle.wait_for(lambda: not self._active, timeout=5.0)
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
        self._httpd = None
        return clean

    # ---- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        ex = _Exchange(handler)
        routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/classifications"): self._classifications,
            ("GET", "/v1/models"): self._models,
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
        }
        route = routes.get((method, path))
        if route is None and method == "GET" and path.startswith("/v1/models/"):
            route = self._model
        with self._lock:
            self._active += 1
        try:
            if route is None and any(p == path for _, p in routes):
                allowed = ", ".join(sorted(m for m, p in routes if p == path))
                raise MethodNotAllowed(f"{method} is not allowed on {path}; use {allowed}")
            if route is None:
                known = sorted({p for _, p in routes})
                raise NotFound(f"no route {method} {path}; this server has {', '.join(known)}", code="unknown_route")
            route(ex)
        except ApiError as exc:
            self._send_error(ex, exc)
        except (ClientGone, Cancelled):  # the client left (possibly while queued): nobody to answer
            pass
        except Exception as exc:  # the service keeps serving; the client gets a 500 with the reason
            log.exception("API request %s %s failed", method, path)
            self._send_error(ex, ApiError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            label = path if route is not None else "other"
            with self._lock:
                self._active -= 1
                self.http_counts[(label if not label.startswith("/v1/models/") else "/v1/models/{id}",
                                  ex.status or 0)] += 1
                self._idle.notify_all()

    def _send_error(self, ex: _Exchange, exc: ApiError) -> None:
        if ex.status is not None:  # headers already out (a stream): report in-band
            try:
                ex.event(exc.body())
                ex.event("[DONE]")
            except ClientGone:
                pass
            return
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        try:
            ex.send_json(exc.status, exc.body(), headers)
        except OSError:
            pass

    # ---- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _parse(ex: _Exchange, schema: type[BaseModel]) -> Any:
        data = ex.body()
        if not isinstance(data, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_body")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.match(str(p)))
            got = json.dumps(first.get("input"), default=str)[:80]
            raise BadRequest(f"{loc or 'body'}: {first['msg']} (got {got})", param=loc or None,
                             code="invalid_value") from None

    @contextmanager
    def _serving(self, requested: str, task: Task) -> Iterator[Any]:
        """The serving model, counted in flight, if `requested` names it and it does `task`."""
        try:
            with self.host.acquire() as model:
                if requested not in (model.name, model.ref):
                    raise NotFound(f"model {requested!r} is not served here; this agent serves {model.name!r} "
                                   "(GET /v1/models)", param="model", code="model_not_found")
                if model.task != task:
                    raise BadRequest(f"model {model.name!r} is a {model.task.value} model; it cannot serve this "
                                     "endpoint", param="model", code="wrong_model_task")
                yield model
        except NoModelLoaded as exc:
            raise Overloaded(str(exc), code="model_not_loaded", retry_after=5) from None

    def _deadline(self) -> float:
        return time.monotonic() + self.request_timeout_s

    # ---- generation ---------------------------------------------------------------------------

    def _chat(self, ex: _Exchange) -> None:
        from agent.api.schemas import ChatCompletionRequest  # the request models are built on the first request

        req = self._parse(ex, ChatCompletionRequest)
        self._generate(ex, req, kind="chat", prompt=None)

    def _completions(self, ex: _Exchange) -> None:
        from agent.api.schemas import CompletionRequest

        req = self._parse(ex, CompletionRequest)
        self._generate(ex, req, kind="text", prompt=req.prompt_value())

    def _generate(self, ex: _Exchange, req, *, kind: str, prompt) -> None:
        from agent.api.plan import plan_generation

        with self._serving(req.model, Task.TEXT_GENERATION) as model:
            limit = req.limit()
            if limit is not None and not 1 <= limit <= model.max_context:
                raise BadRequest(f"max_tokens {limit} is out of range; use 1 to {model.max_context} "
                                 "(this model's context)", param="max_tokens", code="invalid_value")
            if limit is None:
                limit = model.max_context if kind == "chat" else 16
            deadline = self._deadline()
            cancel = threading.Event()
            try:
                plan = plan_generation(req, model, kind=kind, timeout_s=self.request_timeout_s)
                gen = model.generate(prompt, messages=plan.messages, max_tokens=limit, stop=req.stops(), cancel=cancel,
                                     deadline=deadline, ignore_eos=req.ignore_eos, **plan.generate_options())
            except InputError as exc:
                raise BadRequest(str(exc), param=getattr(exc, "param", None), code=exc.code) from None
            started = time.perf_counter()
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
            ok, gone = False, False
            try:
                with self._queued(ex, deadline):
                    if req.stream:
                        self._stream(ex, gen, req, kind=kind, rid=rid, model=model, cancel=cancel, plan=plan)
                    else:
                        for _ in gen:
                            if ex.gone() or self._abort.is_set():
                                cancel.set()
                        ex.send_json(200, completion_body(gen, kind=kind, rid=rid, model=model.name, codec=model.codec,
                                                          tools=plan.tools, want_logprobs=plan.logprobs is not None,
                                                          fingerprint=system_fingerprint(model.ref)))
                ok = True
            except InputError as exc:  # a constraint no token can satisfy: the client's, not the model's
                ok = True
                raise BadRequest(str(exc), param=exc.param, code=exc.code) from None
            except ClientGone:
                gone, ok = True, True
                raise
            except Cancelled:
                if self._abort.is_set():
                    raise Overloaded("the server is shutting down; the request was cut", retry_after=5) from None
                if time.monotonic() >= deadline:
                    raise Timeout(f"the request took longer than request_timeout_s={self.request_timeout_s}") \
                        from None
                gone, ok = True, True  # client went away
                raise ClientGone("client went away") from None
            finally:
                gen.close()
                if gone:
                    with self._lock:
                        self.cancelled += 1
                s = gen.stats
                self.host.stats.record((time.perf_counter() - started) * 1000, ok=ok,
                                       prefill_tokens=s.prefilled_tokens, prefill_s=s.prefill_s,
                                       decode_tokens=max(0, s.completion_tokens - 1), decode_s=s.decode_s,
                                       prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                                       cached_tokens=s.cached_tokens)

    def _queued(self, ex: _Exchange, deadline: float):
        return _Queued(self, ex, deadline)

    def _stream(self, ex: _Exchange, gen, req, *, kind: str, rid: str, model, cancel: threading.Event, plan) -> None:
        stream = ChatStream(kind=kind, rid=rid, model=model.name, codec=model.codec, tools=plan.tools,
                            want_logprobs=plan.logprobs is not None, fingerprint=system_fingerprint(model.ref))
        iterator = iter(gen)
        item = next(iterator)  # prefill runs here; a failure before any byte is out is a plain 4xx/5xx
        ex.start_events()
        while True:
            for event in stream.feed(item):
                ex.event(event)
            if ex.gone() or self._abort.is_set():
                cancel.set()  # the runtime stops before the next token
            try:
                item = next(iterator)
            except StopIteration:
                break
        if req.stream_options is not None and req.stream_options.include_usage:
            ex.event(stream.usage_chunk(gen.stats))
        ex.event("[DONE]")

    # ---- encoders -----------------------------------------------------------------------------

    def _encode(self, ex: _Exchange, req, task: Task, run) -> tuple[Any, Any, int]:
        with self._serving(req.model, task) as model:
            inputs = req.inputs()
            started = time.perf_counter()
            ok = False
            try:
                with self._queued(ex, self._deadline()):
                    result = run(model, inputs)
                ok = True
            except (InputError, WrongTask) as exc:
                ok = True  # the client's mistake, not the model's
                raise BadRequest(str(exc), param=getattr(exc, "param", "input"), code=exc.code) from None
            finally:
                self.host.stats.record((time.perf_counter() - started) * 1000, ok=ok)
            tokens = model.tokens(inputs) if inputs and isinstance(inputs[0], str) else 0
            return model, result, tokens

    def _embeddings(self, ex: _Exchange) -> None:
        from agent.api.schemas import EmbeddingRequest

        req = self._parse(ex, EmbeddingRequest)
        model, vectors, tokens = self._encode(ex, req, Task.EMBEDDING, lambda m, x: m.embed(x))
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise BadRequest(f"dimensions {req.dimensions} is not this model's size {vectors.shape[1]}; "
                             "omit it", param="dimensions", code="invalid_value")
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        ex.send_json(200, {"object": "list", "model": model.name,
                           "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _classifications(self, ex: _Exchange) -> None:
        from agent.api.schemas import ClassificationRequest

        req = self._parse(ex, ClassificationRequest)
        model, results, tokens = self._encode(ex, req, Task.CLASSIFICATION, lambda m, x: m.classify(x))
        ex.send_json(200, {"object": "list", "model": model.name,
                           "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(results)],
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- info ---------------------------------------------------------------------------------

    @staticmethod
    def _model_card(model) -> dict:
        return {"id": model.name, "object": "model", "created": int(model.manifest.created_at.timestamp()),
                "owned_by": "edgeship", "version": model.manifest.version, "task": model.task.value,
                "execution_provider": model.execution_provider,
                "max_context": getattr(model, "max_context", None)}

    def _models(self, ex: _Exchange) -> None:
        model = self.host.current
        ex.send_json(200, {"object": "list", "data": [self._model_card(model)] if model else []})

    def _model(self, ex: _Exchange) -> None:
        wanted = ex.h.path.split("?", 1)[0][len("/v1/models/"):]
        model = self.host.current
        if model is None or wanted not in (model.name, model.ref):
            raise NotFound(f"model {wanted!r} is not served here (GET /v1/models)", param="model",
                           code="model_not_found")
        ex.send_json(200, self._model_card(model))

    def _healthz(self, ex: _Exchange) -> None:
        ex.send_json(200, {"status": "ok"})

    def _readyz(self, ex: _Exchange) -> None:
        model = self.host.current
        if self._draining:
            ex.send_json(503, {"status": "not ready", "reason": "shutting down"}, {"Retry-After": "5"})
        elif model is None:
            ex.send_json(503, {"status": "not ready", "reason": "no model loaded"}, {"Retry-After": "5"})
        else:
            ex.send_json(200, {"status": "ready", "model": model.ref, "execution_provider": model.execution_provider})

    def _metrics(self, ex: _Exchange) -> None:
        self.host.stats.queue_depth = self.admission.depth
        with self._lock:
            counts = dict(self.http_counts)
            cancelled = self.cancelled
        text = metrics.render(self.host, http_counts=counts, cancelled=cancelled, running=self.admission.running)
        ex.send_bytes(200, text.encode(), metrics.CONTENT_TYPE)
