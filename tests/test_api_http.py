"""The local API's HTTP edge cases, over raw sockets against a real server (uvicorn + h11).

What a hostile or broken client can send: bad framing, bodies over the cap, requests smuggled
behind a refused body, stalled connections, too many connections, and what a web page in a
browser on the device can send (foreign Host, cross-origin Origin, text/plain bodies).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from agent.api import ApiServer
from agent.api.guard import Guard, Headers
from agent.runtime import ModelHost

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def api(lm):
    server = ApiServer(ModelHost(lm), port=0, read_timeout_s=READ_TIMEOUT_S, max_connections=400)
    server.start()
    yield server
    server.stop(1)


def _connect(server: ApiServer, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))} | {
        k.replace("_", "-"): v for k, v in headers.items()}
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _read_all(s: socket.socket, limit_s: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    s.settimeout(limit_s)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _responses(raw: bytes) -> list[tuple[int, dict]]:
    """The (status, JSON body) of each response in a raw byte stream of Content-Length framed responses."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        n = int(fields.get("content-length", "0"))
        out.append((status, json.loads(rest[:n]) if n else {}))
        raw = rest[n:]
    return out


def _rss_kb() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1])


def test_negative_content_length_is_400_and_the_body_is_never_read(api):
    s = _connect(api)
    s.sendall(_request("POST", "/v1/chat/completions", Content_Length="-1"))
    rss = _rss_kb()
    block = b"x" * (1 << 20)
    try:
        for _ in range(32):  # 32 MiB more: dropped while the server lingers, never buffered
            s.sendall(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = _read_all(s)
    s.close()
    [(status, body)] = _responses(got)
    assert status == 400 and body["error"]["code"] == "invalid_http"
    assert _rss_kb() - rss < 16 << 10, "the server kept what it should have dropped"
    assert httpx.get(f"{api.url}/healthz").status_code == 200


@pytest.mark.parametrize("length", ["abc", "1, 2", "+5"])
def test_malformed_content_length_is_400(api, length):
    s = _connect(api)
    s.sendall(_request("POST", "/v1/chat/completions", b"{}", Content_Length=length))
    [(status, body)] = _responses(_read_all(s))
    s.close()
    assert status == 400 and body["error"]["code"] in ("invalid_http", "invalid_length")


def test_oversized_body_is_413_before_it_is_sent_and_rss_does_not_grow(api):
    s = _connect(api)
    s.sendall(_request("POST", "/v1/chat/completions", Content_Length=str(200 << 20)))
    s.settimeout(30)
    head = s.recv(65536)  # the answer comes before a byte of the body is sent
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"connection: close" in head.lower()
    rss = _rss_kb()
    block = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < 200 << 20:
            s.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    rest = _read_all(s)
    s.close()
    assert not rest.count(b"HTTP/1.1 "), rest
    assert sent < 200 << 20, "the server read the whole 200 MiB body"
    assert _rss_kb() - rss < 16 << 10


def test_no_request_is_smuggled_behind_a_413(api):
    smuggled = _request("GET", "/v1/models")
    s = _connect(api)
    s.sendall(_request("POST", "/v1/chat/completions", Content_Length=str(5 << 20)) + smuggled)
    responses = _responses(_read_all(s))
    s.close()
    assert [status for status, _ in responses] == [413]


@pytest.mark.parametrize("extra", [{}, {"Content_Length": "47"}], ids=["chunked", "chunked+content-length"])
def test_no_request_is_smuggled_in_a_chunked_body(api, extra):
    smuggled = _request("GET", "/v1/models")
    body = b"0\r\n\r\n" + smuggled
    s = _connect(api)
    s.sendall(_request("POST", "/v1/chat/completions", body, Transfer_Encoding="chunked",
                       Content_Length=extra.get("Content_Length")))
    responses = _responses(_read_all(s))
    s.close()
    assert len(responses) == 1 and responses[0][0] in (400, 411), responses
    if responses[0][0] == 411:
        assert responses[0][1]["error"]["code"] == "length_required"


def test_keep_alive_still_serves_several_requests_on_one_connection(api):
    s = _connect(api)
    s.sendall(_request("GET", "/healthz") + _request("GET", "/v1/models", Connection="close"))
    responses = _responses(_read_all(s))
    s.close()
    assert [status for status, _ in responses] == [200, 200]
    assert responses[1][1]["data"][0]["id"] == MODEL


def test_stalled_connections_hold_no_thread_and_are_dropped_after_the_read_timeout(api):
    threads = threading.active_count()
    stalled = []
    for i in range(300):
        s = _connect(api)
        if i % 2:  # half stop inside their headers, half inside their body
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        else:
            s.sendall(_request("POST", "/v1/chat/completions", Content_Length="100") + b'{"mo')
        stalled.append(s)
    assert threading.active_count() - threads < 5
    r = httpx.post(f"{api.url}/v1/chat/completions", json=CHAT, timeout=30)  # the server still serves
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    for s in stalled:
        got = _read_all(s, limit_s=30)
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got
        s.close()
    assert time.monotonic() - t0 < 30
    assert threading.active_count() - threads < 5


def test_connections_over_the_cap_get_503_at_once(lm):
    server = ApiServer(ModelHost(lm), port=0, max_connections=3, read_timeout_s=30)
    server.start()
    held = [_connect(server) for _ in range(3)]
    try:
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")  # keep-alive: still open
        extra = _connect(server)
        [(status, body)] = _responses(_read_all(extra, limit_s=10))
        extra.close()
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the freed place is taken by the next connection
            with _connect(server) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if _read_all(s).startswith(b"HTTP/1.1 200 "):
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "edgeship_connections_refused_total 1.0" in metrics, metrics
    finally:
        for s in held:
            s.close()
        server.stop(1)


def _status(api: ApiServer, raw: bytes) -> tuple[int, dict]:
    s = _connect(api)
    s.sendall(raw)
    responses = _responses(_read_all(s))
    s.close()
    assert len(responses) == 1, responses
    return responses[0]


def test_a_foreign_host_is_refused(api):
    body = json.dumps(CHAT).encode()
    status, err = _status(api, _request("POST", "/v1/chat/completions", body, Host=f"evil.example:{api.port}",
                                        Connection="close"))
    assert status == 403 and err["error"]["code"] == "host_not_allowed"
    assert "api.allowed_hosts" in err["error"]["message"]
    for host in (f"localhost:{api.port}", f"127.0.0.1:{api.port}", "127.0.0.1"):
        status, _ = _status(api, _request("GET", "/healthz", Host=host, Connection="close"))
        assert status == 200, host


def test_a_cross_origin_browser_request_is_refused(api):
    body = json.dumps(CHAT).encode()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{api.port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
        status, err = _status(api, _request("POST", "/v1/chat/completions", body, Connection="close", **headers))
        assert status == 403 and err["error"]["code"] == "cross_origin", headers
    status, _ = _status(api, _request("POST", "/v1/chat/completions", body, Connection="close",
                                      Origin=f"http://127.0.0.1:{api.port}", Host=f"127.0.0.1:{api.port}"))
    assert status == 200


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_json_is_refused_with_415(api, kind):
    status, err = _status(api, _request("POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                                        Content_Type=kind, Connection="close"))
    assert status == 415 and err["error"]["code"] == "unsupported_media_type"
    assert "application/json" in err["error"]["message"]


def test_a_configured_token_is_required_except_on_healthz(lm):
    server = ApiServer(ModelHost(lm), port=0, token="s3cret-token", allowed_hosts=["device.lan"])
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
            assert c.get("/metrics").status_code == 401
            r = c.get("/v1/models", headers={"Authorization": "Bearer s3cret-token", "Host": "device.lan"})
            assert r.status_code == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-token", max_retries=0, timeout=30)
        assert client.chat.completions.create(**CHAT).choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop(1)


def test_a_prompt_is_tokenized_only_once_admitted(lm):
    """A request waiting in the queue has not been tokenized: tokenization happens on the worker that runs it."""
    server = ApiServer(ModelHost(lm), port=0, queue_size=2)
    server.start()
    calls: list[str] = []
    original = lm.chat_prompt
    lm.chat_prompt = lambda messages, **kw: calls.append(threading.current_thread().name) or original(messages, **kw)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            held = server.admission.reserve()  # someone else is ahead in the queue
            held.wait(deadline=time.monotonic() + 5)
            try:
                worker = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=CHAT))
                worker.start()
                deadline = time.monotonic() + 10
                while server.admission.depth < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                time.sleep(0.2)
                assert calls == []  # queued, not tokenized
            finally:
                held.release()
            worker.join(30)
        assert len(calls) == 1 and calls[0].startswith("edgeship-api-work")
    finally:
        lm.chat_prompt = original
        server.stop(1)


@pytest.mark.parametrize(("bound", "host", "ok"), [
    ("127.0.0.1", "127.0.0.1:8321", True), ("127.0.0.1", "localhost", True), ("127.0.0.1", "[::1]:8321", True),
    ("127.0.0.1", "app.localhost:8321", True), ("127.0.0.1", "10.0.0.5:8321", False),
    ("127.0.0.1", "evil.example", False), ("0.0.0.0", "10.0.0.5:8321", True), ("0.0.0.0", "evil.example", False),
    ("127.0.0.1", "device.lan:8321", True), ("127.0.0.1", "DEVICE.LAN", True),
])
def test_guard_host_rules(bound, host, ok):
    guard = Guard(bound, frozenset({"device.lan"}))
    headers = Headers([(b"host", host.encode())])
    if ok:
        guard.admit("/v1/models", headers)
    else:
        with pytest.raises(PermissionError):
            guard.admit("/v1/models", headers)
