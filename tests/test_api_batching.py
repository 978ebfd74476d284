"""The API in front of a batching model: concurrent requests share decode steps, answer as they would
alone, a client that leaves frees its row at once, and a full KV pool makes requests wait or get 503,
never a crash."""

from __future__ import annotations

import httpx
import pytest

from agent.api import ApiServer
from agent.bundle import TrustedKeys, open_bundle
from agent.runtime import ModelHost, load_model
from agent.runtime.batch_policy import BatchPolicy
from tests.support.lm_bundle import make_gqa_lm_bundle
from tests.support.threads import run_together, slow_scheduler, wait_until

MODEL = "tiny-gqa"
PER_POSITION = 2 * 2 * 16 * 4  # the tiny model's KV bytes per position


@pytest.fixture(scope="module")
def vb(tmp_path_factory, keypair):
    d = tmp_path_factory.mktemp("gqa-api")
    make_gqa_lm_bundle(d, keypair[0], shared_kv=True)
    return open_bundle(d, TrustedKeys.from_paths([keypair[1]]))


def _serve(model, **kwargs) -> ApiServer:
    server = ApiServer(ModelHost(model), port=0, **kwargs)
    server.start()
    return server


def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    def work(i: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/v1/completions", json=bodies[i])

    return run_together(len(bodies), work, timeout=90)


def _metric(c: httpx.Client, name: str) -> float:
    line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_concurrent_requests_share_decode_steps_and_answer_as_alone(vb):
    alone = load_model(vb)
    model = load_model(vb, batching=BatchPolicy(max_batch=4))
    prompts = ["The capital of France is", "One two three", "Hello there, how are", "Tell me a story about"]
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 30, "ignore_eos": True, "temperature": 0} for p in prompts]
    slow_scheduler(model)  # the tiny model's 30 tokens outlast the requests' arrival: they surely overlap
    server = _serve(model, slots=4, queue_size=8)
    try:
        got = _post_all(server.url, bodies)
        assert [r.status_code for r in got] == [200] * 4
        for p, r in zip(prompts, got):
            ref = alone.generate(p, max_tokens=30, ignore_eos=True, use_prefix_cache=False)
            ref.run()
            assert r.json()["choices"][0]["text"] == ref.text
            assert r.json()["usage"]["completion_tokens"] == 30
        with httpx.Client(base_url=server.url) as c:
            steps, tokens = _metric(c, "edgeship_batch_steps_total"), _metric(c, "edgeship_batch_tokens_total")
            assert tokens / steps > 1.5  # requests ran together
            assert _metric(c, "edgeship_batch_sequences") == 0
    finally:
        server.stop(1)
        model.close()
        alone.close()


def test_a_full_kv_pool_makes_requests_wait_or_get_503_never_a_crash(vb):
    # room for one prompt and its answer at a time: the others wait in the scheduler or the queue
    model = load_model(vb, batching=BatchPolicy(max_batch=4, kv_cache_mb=60 * PER_POSITION / 2**20))
    slow_scheduler(model)  # answers take 0.4 s each: all nine requests arrive while the first ones run
    server = _serve(model, slots=4, queue_size=2, request_timeout_s=60)
    body = {"model": MODEL, "prompt": "One two three", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    try:
        got = _post_all(server.url, [body] * 9)
        codes = sorted(r.status_code for r in got)
        assert set(codes) <= {200, 503} and codes.count(200) >= 4 and 503 in codes, codes
        refused = next(r for r in got if r.status_code == 503)
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "overloaded"
        answers = {r.json()["choices"][0]["text"] for r in got if r.status_code == 200}
        assert len(answers) == 1  # each capped to what the pool holds, and all the same
        with httpx.Client(base_url=server.url, timeout=30) as c:
            long = c.post("/v1/completions", json={**body, "prompt": list(range(5, 75))})  # 70 tokens
            assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
            assert "kv_cache_mb" in long.json()["error"]["message"]
            assert c.post("/v1/completions", json=body).status_code == 200  # still serving
    finally:
        server.stop(1)
        model.close()


def _stream_text(r: httpx.Response) -> str:
    import json

    text = ""
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_a_client_leaving_mid_batch_frees_its_row_for_the_next_request(vb):
    alone = load_model(vb)
    model = load_model(vb, batching=BatchPolicy(max_batch=2))
    slow_scheduler(model, 0.03)  # 100 tokens take >= 3 s: the leaver is surely mid-answer when it goes
    server = _serve(model, slots=2, queue_size=4, request_timeout_s=60)
    body = {"model": MODEL, "prompt": "One two three", "ignore_eos": True, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c, httpx.Client(base_url=server.url, timeout=60) as d:
            cancelled = _metric(c, "edgeship_requests_cancelled_total")
            with d.stream("POST", "/v1/completions", json={**body, "max_tokens": 100}) as stay, \
                    c.stream("POST", "/v1/completions", json={**body, "prompt": "Hello there", "max_tokens": 100}) as leave:
                assert stay.status_code == leave.status_code == 200
                next(leave.iter_lines())
                wait_until(lambda: _metric(c, "edgeship_batch_sequences") == 2)
                leave.close()  # mid-answer; `stay` stays open, unread for now
                wait_until(lambda: _metric(c, "edgeship_requests_cancelled_total") == cancelled + 1)
                wait_until(lambda: _metric(c, "edgeship_batch_sequences") == 1)
                # both slots were taken: the next request gets the leaver's row and answers while `stay` runs
                nxt = c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 20})
                assert nxt.status_code == 200
                assert _metric(c, "edgeship_batch_sequences") == 1  # `stay` has not finished meanwhile
                ref = alone.generate("One two three", max_tokens=20, ignore_eos=True, use_prefix_cache=False)
                ref.run()
                assert nxt.json()["choices"][0]["text"] == ref.text
                got = _stream_text(stay)
            ref = alone.generate("One two three", max_tokens=100, ignore_eos=True, use_prefix_cache=False)
            ref.run()
            assert got == ref.text
    finally:
        server.stop(1)
        model.close()
        alone.close()
