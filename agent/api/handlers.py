"""What each model route does, synchronously, in a worker thread, through an `Exchange`.

Transport-independent: the ASGI app (agent/api/app.py) reads and validates the body, takes a place
in the admission queue on its event loop, and runs one of these in a worker thread with an Exchange
that writes to the connection. Here the request waits for its slot, and only then is the prompt
tokenized and the model run. Response bodies come from agent/api/bodies.py and openai_format.py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ValidationError

from agent.api import bodies
from agent.api.admission import Place
from agent.api.errors import ApiError, BadRequest, NotFound, Overloaded, Timeout
from agent.api.openai_format import ChatStream, completion_body, system_fingerprint
from agent.bundle import Task
from agent.runtime.errors import Cancelled, InputError, NoModelLoaded, WrongTask

if TYPE_CHECKING:
    from agent.api.server import ApiServer

log = logging.getLogger(__name__)

# pydantic names the union member in an error's loc ("temperature.int"); the param is the field
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|list|dict)$|[\[\-]")


class ClientGone(Exception):
    """The client closed its connection; stop working for it."""


class Exchange(Protocol):
    """One response, written from a worker thread."""

    status: int | None  # set once headers are out

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None: ...
    def start_events(self) -> None: ...
    def event(self, data: Any) -> None: ...  # raises ClientGone
    def gone(self) -> bool: ...  # never blocks


def parse(data: Any, schema: type[BaseModel]) -> Any:
    """A request model from a decoded JSON body, or a BadRequest naming the first bad field."""
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


def run(ex: Exchange, work: Callable[[Exchange], None], *, what: str) -> None:
    """Run `work(ex)`; every error becomes an answer (a JSON error, or in-band once a stream started)."""
    try:
        work(ex)
    except ApiError as exc:
        send_error(ex, exc)
    except (ClientGone, Cancelled):  # the client left (possibly while queued): nobody to answer
        pass
    except Exception as exc:  # the service keeps serving; the client gets a 500 with the reason
        log.exception("API request %s failed", what)
        send_error(ex, ApiError(f"internal error: {type(exc).__name__}: {exc}"))


def send_error(ex: Exchange, exc: ApiError) -> None:
    try:
        if ex.status is not None:  # headers already out (a stream): report in-band
            ex.event(exc.body())
            ex.event("[DONE]")
        else:
            ex.send_json(exc.status, exc.body(), exc.headers())
    except ClientGone:
        pass


@contextmanager
def serving(api: ApiServer, requested: str, task: Task) -> Iterator[Any]:
    """The serving model, counted in flight, if `requested` names it and it does `task`."""
    try:
        with api.host.acquire() as model:
            if requested not in (model.name, model.ref):
                raise NotFound(f"model {requested!r} is not served here; this agent serves {model.name!r} "
                               "(GET /v1/models)", param="model", code="model_not_found")
            if model.task != task:
                raise BadRequest(f"model {model.name!r} is a {model.task.value} model; it cannot serve this "
                                 "endpoint", param="model", code="wrong_model_task")
            yield model
    except NoModelLoaded as exc:
        raise Overloaded(str(exc), code="model_not_loaded", retry_after=5) from None


def wait_for_slot(api: ApiServer, place: Place, ex: Exchange, deadline: float, model) -> None:
    """Block until the request may run (as many run as `model` takes at once), keeping the queue-depth
    gauge current and counting refusals."""
    stats = api.host.stats
    try:
        place.wait(deadline=deadline, gone=ex.gone, limit=model.max_concurrency)
    except Overloaded:
        stats.rejected()
        raise
    finally:
        stats.queue_depth = api.admission.depth


# ---- generation -------------------------------------------------------------------------------


def chat(api: ApiServer, ex: Exchange, place: Place, req, *, deadline: float) -> None:
    _generate(api, ex, place, req, kind="chat", prompt=None, deadline=deadline)


def completions(api: ApiServer, ex: Exchange, place: Place, req, *, deadline: float) -> None:
    _generate(api, ex, place, req, kind="text", prompt=req.prompt_value(), deadline=deadline)


def _generate(api: ApiServer, ex: Exchange, place: Place, req, *, kind: str, prompt, deadline: float) -> None:
    from agent.api.plan import plan_generation  # numpy and the constraint library: once a model serves

    with place, serving(api, req.model, Task.TEXT_GENERATION) as model:
        limit = req.limit()
        if limit is not None and not 1 <= limit <= model.max_context:
            raise BadRequest(f"max_tokens {limit} is out of range; use 1 to {model.max_context} "
                             "(this model's context)", param="max_tokens", code="invalid_value")
        if limit is None:
            limit = model.max_context if kind == "chat" else 16
        wait_for_slot(api, place, ex, deadline, model)
        cancel = threading.Event()
        # With the slot held: the constraint is compiled and the prompt tokenized by this worker.
        try:
            plan = plan_generation(req, model, kind=kind, timeout_s=max(0.0, deadline - time.monotonic()))
            gen = model.generate(prompt, messages=plan.messages, max_tokens=limit, stop=req.stops(), cancel=cancel,
                                 deadline=deadline, ignore_eos=req.ignore_eos, **plan.generate_options())
        except InputError as exc:
            raise BadRequest(str(exc), param=getattr(exc, "param", None), code=exc.code) from None
        started = time.perf_counter()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        shape = dict(kind=kind, rid=rid, model=model.name, codec=model.codec, tools=plan.tools,
                     want_logprobs=plan.logprobs is not None, fingerprint=system_fingerprint(model.ref))
        ok, gone = False, False
        try:
            if req.stream:
                _stream(api, ex, gen, req, stream=ChatStream(**shape), cancel=cancel)
            else:
                for _ in gen:
                    if ex.gone() or api.aborting:
                        cancel.set()
                ex.send_json(200, completion_body(gen, **shape))
            ok = True
        except InputError as exc:  # a constraint no token can satisfy: the client's, not the model's
            ok = True
            raise BadRequest(str(exc), param=exc.param, code=exc.code) from None
        except ClientGone:
            gone, ok = True, True
            raise
        except Cancelled:
            if api.aborting:
                raise Overloaded("the server is shutting down; the request was cut", retry_after=5) from None
            if time.monotonic() >= deadline:
                raise Timeout(f"the request took longer than request_timeout_s={api.request_timeout_s}") from None
            gone, ok = True, True  # client went away
            raise ClientGone("client went away") from None
        finally:
            gen.close()
            if gone:
                api.count_cancelled()
            s = gen.stats
            api.host.stats.record((time.perf_counter() - started) * 1000, ok=ok,
                                  prefill_tokens=s.prefilled_tokens, prefill_s=s.prefill_s,
                                  decode_tokens=max(0, s.completion_tokens - 1), decode_s=s.decode_s,
                                  prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                                  cached_tokens=s.cached_tokens)


def _stream(api: ApiServer, ex: Exchange, gen, req, *, stream: ChatStream, cancel: threading.Event) -> None:
    iterator = iter(gen)
    item = next(iterator)  # prefill runs here; a failure before any byte is out is a plain 4xx/5xx
    ex.start_events()
    while True:
        for event in stream.feed(item):  # with n > 1, one choice finishing does not end the stream
            ex.event(event)
        if ex.gone() or api.aborting:
            cancel.set()  # the runtime stops before the next token
        try:
            item = next(iterator)
        except StopIteration:
            break
    if req.stream_options is not None and req.stream_options.include_usage:
        ex.event(stream.usage_chunk(gen.stats))
    ex.event("[DONE]")


# ---- encoders ---------------------------------------------------------------------------------


def _encode(api: ApiServer, ex: Exchange, place: Place, req, task: Task, work, deadline: float) -> tuple[Any, Any, int]:
    with place, serving(api, req.model, task) as model:
        inputs = req.inputs()
        wait_for_slot(api, place, ex, deadline, model)
        started = time.perf_counter()
        ok = False
        try:
            result = work(model, inputs)
            ok = True
        except (InputError, WrongTask) as exc:
            ok = True  # the client's mistake, not the model's
            raise BadRequest(str(exc), param=getattr(exc, "param", "input"), code=exc.code) from None
        finally:
            api.host.stats.record((time.perf_counter() - started) * 1000, ok=ok)
        tokens = model.tokens(inputs) if inputs and isinstance(inputs[0], str) else 0
        return model, result, tokens


def embeddings(api: ApiServer, ex: Exchange, place: Place, req, *, deadline: float) -> None:
    model, vectors, tokens = _encode(api, ex, place, req, Task.EMBEDDING, lambda m, x: m.embed(x), deadline)
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise BadRequest(f"dimensions {req.dimensions} is not this model's size {vectors.shape[1]}; "
                         "omit it", param="dimensions", code="invalid_value")
    ex.send_json(200, bodies.embeddings(vectors, model_name=model.name, encoding_format=req.encoding_format,
                                        tokens=tokens))


def classifications(api: ApiServer, ex: Exchange, place: Place, req, *, deadline: float) -> None:
    model, results, tokens = _encode(api, ex, place, req, Task.CLASSIFICATION, lambda m, x: m.classify(x), deadline)
    ex.send_json(200, bodies.classifications(results, model_name=model.name, tokens=tokens))
