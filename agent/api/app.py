"""The ASGI application (starlette) in front of the handlers; no model work runs on its event loop.

    Gate        ASGI middleware: tracks requests in flight and responses by route and status, runs
                the Guard's Host / Origin / token checks before routing, and closes the connection
                after any answer that leaves the request body unread (no request is ever parsed out
                of a body the server skipped)
    info routes /healthz, /readyz, /v1/models[/{id}], /metrics answer on the event loop
    model routes read the body under the Guard's framing rules, validate it, take a place in the
                admission queue (503 at once when full), then run agent/api/handlers.py in a worker
                thread through a `_Bridge`, which writes to the connection and notices a disconnect
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from agent.api import bodies, handlers, metrics
from agent.api.errors import ApiError, BadRequest, MethodNotAllowed, NotFound, Overloaded
from agent.api.guard import Guard, Headers
from agent.api.handlers import ClientGone

if TYPE_CHECKING:
    from agent.api.server import ApiServer

MODEL_ROUTES = {  # path -> (request model in agent.api.schemas, handler)
    "/v1/chat/completions": ("ChatCompletionRequest", handlers.chat),
    "/v1/completions": ("CompletionRequest", handlers.completions),
    "/v1/embeddings": ("EmbeddingRequest", handlers.embeddings),
    "/v1/classifications": ("ClassificationRequest", handlers.classifications),
}
INFO_ROUTES = ("/v1/models", "/healthz", "/readyz", "/metrics")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False).encode(), status, headers, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    return json_response(exc.status, exc.body(), exc.headers())


def route_label(method: str, path: str) -> str:
    """The `path` label of edgeship_http_responses_total: a known route, or `other`."""
    if method == "POST" and path in MODEL_ROUTES or method == "GET" and path in INFO_ROUTES:
        return path
    if method == "GET" and path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class Gate:
    """The ASGI middleware every request passes first (see the module docstring)."""

    def __init__(self, app, *, api: ApiServer) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"])
        length = raw.get(b"content-length", b"0").strip()
        state = {"read": b"transfer-encoding" not in raw and length in (b"", b"0"), "status": 0}

        async def receive_() -> dict:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["read"] = True
            return message

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if not state["read"]:  # close: the unread body must never be parsed as a next request
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        self.api.request_started()
        try:
            try:
                self.api.guard.admit(scope["path"], Headers(scope["headers"]))
            except ApiError as exc:
                await error_response(exc)(scope, receive_, send_)
                return
            await self.app(scope, receive_, send_)
        finally:
            self.api.request_finished(route_label(scope["method"], scope["path"]), state["status"])


async def read_json(request: Request, guard: Guard) -> Any:
    """The request's JSON body, read only once its headers say it is JSON of an accepted size."""
    n = guard.body_length(Headers(request.scope["headers"]))
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > n:  # h11 frames the body by Content-Length; this is a second lock on the door
            raise BadRequest(f"the body is longer than its Content-Length {n}", code="invalid_length")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None


class _Bridge:
    """A handlers.Exchange over ASGI's `send`, for a worker thread: each write runs on the event loop
    and returns once uvicorn took it (so a client that does not read slows the worker, never the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send, *, timeout_s: float) -> None:
        self.loop, self._send, self.timeout_s = loop, send, timeout_s
        self.gone_event = threading.Event()  # set by the disconnect watcher
        self.status: int | None = None
        self.streaming = False

    def gone(self) -> bool:
        return self.gone_event.is_set()

    def _write(self, *messages: dict) -> None:
        if self.gone_event.is_set():
            raise ClientGone("the client went away")

        async def write() -> None:
            for message in messages:
                await self._send(message)

        try:
            future = asyncio.run_coroutine_threadsafe(write(), self.loop)
        except RuntimeError:  # the event loop is gone: the server was stopped
            raise ClientGone("the server's event loop has stopped") from None
        try:
            future.result(self.timeout_s)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, OSError) as exc:
            future.cancel()
            self.gone_event.set()
            raise ClientGone(f"cannot write to the client: {type(exc).__name__}") from None
        if self.gone_event.is_set():
            raise ClientGone("the client went away")

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.status = status
        self._write({"type": "http.response.start", "status": status, "headers": head},
                    {"type": "http.response.body", "body": data, "more_body": False})

    def start_events(self) -> None:
        self.status, self.streaming = 200, True
        self._write({"type": "http.response.start", "status": 200,
                     "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                 (b"cache-control", b"no-cache")]})

    def event(self, data: Any) -> None:
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self._write({"type": "http.response.body", "body": b"data: " + payload.encode() + b"\n\n", "more_body": True})


async def _watch_disconnect(receive, gone: threading.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class _Worker:
    """The ASGI response of a model route: `work(exchange)` in the server's worker threads."""

    def __init__(self, api: ApiServer, work: Callable[[handlers.Exchange], None], *, place, what: str) -> None:
        self.api, self.work, self.place, self.what = api, work, place, what

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        bridge = _Bridge(loop, send, timeout_s=self.api.request_timeout_s + 5)
        try:
            future = self.api.submit(handlers.run, bridge, self.work, what=self.what)
        except RuntimeError:  # the pool is shut down: stopping
            self.place.release()
            await error_response(Overloaded("the server is shutting down", retry_after=5))(scope, receive, send)
            return
        watcher = loop.create_task(_watch_disconnect(receive, bridge.gone_event))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            bridge.gone_event.set()  # the worker stops before its next token
            raise
        finally:
            watcher.cancel()
        if bridge.streaming and not bridge.gone():
            try:
                await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}),
                                       self.api.request_timeout_s)
            except TimeoutError:
                pass


def _model_endpoint(api: ApiServer, path: str):
    schema_name, handler = MODEL_ROUTES[path]

    async def endpoint(request: Request):
        from agent.api import schemas  # the request models are built on the first request

        deadline = time.monotonic() + api.request_timeout_s
        req = handlers.parse(await read_json(request, api.guard), getattr(schemas, schema_name))
        place = api.reserve()
        return _Worker(api, lambda ex: handler(api, ex, place, req, deadline=deadline), place=place,
                       what=f"POST {path}")

    return endpoint


def build_app(api: ApiServer) -> Starlette:
    """The ASGI app of one ApiServer."""

    async def models(request: Request) -> Response:
        model = api.host.current
        return json_response(200, {"object": "list", "data": [bodies.model_card(model)] if model else []})

    async def model(request: Request) -> Response:
        wanted = request.path_params["model_id"]
        current = api.host.current
        if current is None or wanted not in (current.name, current.ref):
            raise NotFound(f"model {wanted!r} is not served here (GET /v1/models)", param="model",
                           code="model_not_found")
        return json_response(200, bodies.model_card(current))

    async def healthz(request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        current = api.host.current
        if api.draining:
            return json_response(503, {"status": "not ready", "reason": "shutting down"}, {"Retry-After": "5"})
        if current is None:
            return json_response(503, {"status": "not ready", "reason": "no model loaded"}, {"Retry-After": "5"})
        return json_response(200, {"status": "ready", "model": current.ref,
                                   "execution_provider": current.execution_provider})

    async def metrics_(request: Request) -> Response:
        api.host.stats.queue_depth = api.admission.depth
        return Response(metrics.render(api.registry), 200, media_type=metrics.CONTENT_TYPE)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error_response(MethodNotAllowed(f"{method} is not allowed on {path}; use {allowed}"))
        known = ", ".join(sorted([*MODEL_ROUTES, *INFO_ROUTES, "/v1/models/{id}"]))
        return error_response(NotFound(f"no route {method} {path}; this server has {known}", code="unknown_route"))

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=400)  # nobody reads it: the client left while sending its body

    routes = [Route(path, _model_endpoint(api, path), methods=["POST"]) for path in MODEL_ROUTES]
    routes += [Route("/v1/models", models, methods=["GET"]),
               Route("/v1/models/{model_id:path}", model, methods=["GET"]),
               Route("/healthz", healthz, methods=["GET"]),
               Route("/readyz", readyz, methods=["GET"]),
               Route("/metrics", metrics_, methods=["GET"])]
    app = Starlette(routes=routes, middleware=[Middleware(Gate, api=api)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, ClientDisconnect: client_gone})
    app.router.redirect_slashes = False
    return app
