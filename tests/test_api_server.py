"""The local API over real HTTP on 127.0.0.1 (and a Unix socket), in front of real onnxruntime models."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from agent.api import ApiServer
from agent.bundle import open_bundle
from agent.runtime import ModelHost, load_model
from tests.support.bundles import make_bundle
from tests.support.lm_bundle import make_encoder_bundle

MODEL = "tiny-llama"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France is"}]


def _serve(model, **kwargs) -> ApiServer:
    server = ApiServer(ModelHost(model), port=0, **kwargs)
    server.start()
    return server


@pytest.fixture(scope="module")
def api(lm):
    server = _serve(lm, queue_size=4, request_timeout_s=60)
    yield server
    server.stop(1)


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api.url, timeout=30) as c:
        yield c


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _sse(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_ready_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == f"{MODEL}@1.0.0"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["max_context"] == 256


def test_chat_completion_is_the_runtimes_greedy_answer(client, lm):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 12,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == lm.generate(messages=CHAT, max_tokens=12).run()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(lm.chat_prompt(CHAT))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_streaming_sends_token_deltas_then_done(client):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions",
                       json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert len({c["id"] for c in chunks}) == 1


def test_completions_plain_and_streamed(client):
    body = {"model": MODEL, "prompt": "The capital of France", "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert r.json()["object"] == "text_completion"
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
        events = _sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text


def test_multi_turn_chat_reuses_the_prefix_cache(client, lm):
    lm.prefix_cache.clear()
    first = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 6,
                                                      "temperature": 0}).json()
    turn2 = CHAT + [first["choices"][0]["message"], {"role": "user", "content": "And Spain?"}]
    second = client.post("/v1/chat/completions", json={"model": MODEL, "messages": turn2, "max_tokens": 6,
                                                       "temperature": 0}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]


def test_stop_strings_and_seeded_sampling(client):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    marker = next((ch for ch in text[2:] if ch.strip()), None)
    if marker is not None:
        cut = client.post("/v1/chat/completions", json=body | {"stop": [marker]}).json()["choices"][0]
        assert cut["message"]["content"] == text[: text.index(marker)] and cut["finish_reason"] == "stop"
    sampled = body | {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 5}
    a = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=sampled).json()["choices"][0]["message"]["content"]
    assert a == b


BAD = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [', 400, "invalid_json", None),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_body", None),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "invalid_value",
     "messages"),
    ("wrong role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "invalid_value", "messages.0.role"),
    ("temperature a string", "/v1/chat/completions",
     {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("max_tokens a string", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400,
     "invalid_value", "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400,
     "invalid_value", "max_tokens"),
    ("max_tokens over context", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400,
     "invalid_value", "max_tokens"),
    ("prompt over context", "/v1/completions", {"model": MODEL, "prompt": "hello world " * 300}, 400,
     "context_length_exceeded", "prompt"),
    ("chat over context", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "edge " * 400}]}, 400, "context_length_exceeded",
     "messages"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model_not_found", "model"),
    ("n > 16", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "n": 17}, 400, "invalid_value", "n"),
    ("penalty > 2", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "presence_penalty": 2.5}, 400,
     "invalid_value", "presence_penalty"),
    ("top_logprobs > 20", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True,
                                                   "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "invalid_value", "messages"),
    ("embeddings on an LM", "/v1/embeddings", {"model": MODEL, "input": "x"}, 400, "wrong_model_task", "model"),
    ("top_p out of range", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 3}, 400,
     "invalid_value", "top_p"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "code", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_service_keeps_serving(client, case, path, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["message"]
    ok = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert ok.status_code == 200


def test_unknown_route_and_wrong_method(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"x" * (5 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_queue_full_is_refused_at_once_with_retry_after(lm):
    server = _serve(lm, queue_size=1, request_timeout_s=30)
    results: list[int] = []
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            lm._lock.acquire()  # another user of the session is busy: the running request waits on it
            try:
                workers = [threading.Thread(target=lambda: results.append(
                    c.post("/v1/chat/completions", json=body).status_code)) for _ in range(2)]
                workers[0].start()
                _wait(lambda: server.admission.running == 1)
                workers[1].start()
                _wait(lambda: server.admission.depth == 1)
                assert _metric(c, "edgeship_queue_depth") == 1
                t0 = time.monotonic()
                r = c.post("/v1/chat/completions", json=body)
                assert time.monotonic() - t0 < 2
                assert r.status_code == 503 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
            finally:
                lm._lock.release()
            for w in workers:
                w.join(30)
            assert results == [200, 200]
            assert _metric(c, "edgeship_requests_rejected_total") == 1
    finally:
        server.stop(1)


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_request_timeout_gives_504(lm):
    server = _serve(lm, queue_size=2, request_timeout_s=0.5)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            lm._lock.acquire()
            try:
                r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
            finally:
                lm._lock.release()
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert c.get("/healthz").status_code == 200
    finally:
        server.stop(1)


def _raw_stream_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _read_until_first_event(s: socket.socket) -> bytes:
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, f"the server closed the stream before its first event: {got!r}"
        got += chunk
    return got


def _dechunk(raw: bytes) -> bytes:
    """The body of a raw HTTP/1.1 response with Transfer-Encoding: chunked."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body, rest = body + rest[:n], rest[n + 2:]
    return body


def test_client_disconnect_cancels_generation(api, client, lm):
    before_tokens = _metric(client, "edgeship_completion_tokens_total")
    before_cancelled = _metric(client, "edgeship_requests_cancelled_total")
    s = _raw_stream_request(api.port, {"model": MODEL, "messages": CHAT, "max_tokens": 240, "stream": True,
                                       "ignore_eos": True, "temperature": 0})
    _read_until_first_event(s)
    s.close()
    _wait(lambda: _metric(client, "edgeship_requests_cancelled_total") == before_cancelled + 1)
    produced = _metric(client, "edgeship_completion_tokens_total") - before_tokens
    assert produced < 120, f"{produced} tokens generated after the client left"
    assert lm._lock.acquire(timeout=5)
    lm._lock.release()
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200


def test_metrics_are_prometheus_text(client):
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    line = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})?'
                      r" -?[0-9.e+]+(Inf)?$")
    for row in r.text.strip().splitlines():
        assert row.startswith("# HELP ") or row.startswith("# TYPE ") or line.match(row), row
    assert re.search(r'^edgeship_model_loaded\{.*\bname="tiny-llama".*\} 1(\.0)?$', r.text, re.M)
    assert _metric(client, "edgeship_inference_requests_total") >= 1
    assert re.search(r'^edgeship_request_duration_ms_bucket\{le="\+Inf"\} [\d.]+$', r.text, re.M)


def test_not_ready_without_a_model_then_ready_after_swap(lm):
    host = ModelHost()
    server = ApiServer(host, port=0)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/readyz").status_code == 503
            assert c.get("/v1/models").json()["data"] == []
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
            assert _metric(c, "edgeship_model_loaded") == 0
            host.swap(lm)
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                        "max_tokens": 2}).status_code == 200
    finally:
        server.stop(1)


class _SlowGeneration:
    """A generation whose tokens come 20 ms apart, so a stream is surely still going at a deadline."""

    def __init__(self, gen) -> None:
        self._gen = gen

    def __getattr__(self, name: str):
        return getattr(self._gen, name)

    def __iter__(self):
        for chunk in self._gen:
            time.sleep(0.02)
            yield chunk


def test_stop_cuts_streams_after_the_drain_deadline(lm, monkeypatch):
    generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda *a, **kw: _SlowGeneration(generate(*a, **kw)))
    server = _serve(lm)
    s = _raw_stream_request(server.port, {"model": MODEL, "messages": CHAT, "max_tokens": 240, "stream": True,
                                          "ignore_eos": True})
    got = _read_until_first_event(s)
    clean = server.stop(drain_timeout_s=0.01)
    s.settimeout(10)
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    assert not server.listening
    body = _dechunk(got)
    assert not clean  # 240 tokens at 20 ms each: the stream was still going, so it ends with an error and [DONE]
    assert b'"code": "overloaded"' in body and body.rstrip().endswith(b"data: [DONE]")
    assert b'"finish_reason": "length"' not in body
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)


def test_embeddings_float_and_base64(tmp_path, keypair, trusted):
    make_encoder_bundle(tmp_path, keypair[0])
    model = load_model(open_bundle(tmp_path, trusted))
    server = _serve(model)
    texts = ["the capital of france is paris", "edge"]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/embeddings", json={"model": "tiny-bert-emb", "input": texts})
            assert r.status_code == 200, r.text
            body = r.json()
            vectors = np.array([d["embedding"] for d in body["data"]], np.float32)
            np.testing.assert_allclose(vectors, model.embed(texts), atol=1e-6)
            assert body["usage"]["prompt_tokens"] > 0 and [d["index"] for d in body["data"]] == [0, 1]
            r = c.post("/v1/embeddings", json={"model": "tiny-bert-emb", "input": "edge",
                                               "encoding_format": "base64"})
            vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
            np.testing.assert_allclose(vec, model.embed(["edge"])[0], atol=1e-6)
            for bad, param in (({"input": ""}, "input"), ({"input": 5}, "input"), ({"input": []}, "input"),
                               ({"input": "x", "dimensions": 3}, "dimensions")):
                r = c.post("/v1/embeddings", json={"model": "tiny-bert-emb"} | bad)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    finally:
        server.stop(1)


def test_raw_bundle_embeddings_and_classification(tmp_path, keypair, trusted):
    make_bundle(tmp_path / "raw", keypair[0])
    make_encoder_bundle(tmp_path / "cls", keypair[0], num_labels=3)
    raw = load_model(open_bundle(tmp_path / "raw", trusted))
    server = _serve(raw)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            x = [[0.1 * i for i in range(8)], [1.0] * 8]
            r = c.post("/v1/embeddings", json={"model": "tiny", "input": x})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], raw.embed(x), atol=1e-6)
            r = c.post("/v1/embeddings", json={"model": "tiny", "input": [[1.0, 2.0]]})
            assert r.status_code == 400 and "length 8" in r.json()["error"]["message"]
            server.host.swap(load_model(open_bundle(tmp_path / "cls", trusted)))
            r = c.post("/v1/classifications", json={"model": "tiny-bert-cls", "input": ["edge", "paris"]})
            assert r.status_code == 200, r.text
            rows = r.json()["data"]
            assert [row["label"] in {"label-0", "label-1", "label-2"} for row in rows] == [True, True]
            assert abs(sum(rows[0]["scores"].values()) - 1) < 1e-5
    finally:
        server.stop(1)


def test_unix_socket(lm, tmp_path):
    path = tmp_path / "api.sock"
    server = ApiServer(ModelHost(lm), unix_socket=path)
    server.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://agent", timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3})
            assert r.status_code == 200, r.text
            with c.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3,
                                                                "stream": True}) as s:
                assert _sse(s.iter_lines())[-1] == "[DONE]"
    finally:
        server.stop(1)
    assert not path.exists()
