"""The official `openai` Python client, pointed at the agent's API, works unchanged."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from agent.api import ApiServer
from agent.bundle import TrustedKeys, open_bundle
from agent.runtime import ModelHost, load_model
from tests.support.lm_bundle import make_encoder_bundle, make_lm_bundle

MESSAGES = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, keypair):
    trusted = TrustedKeys.from_paths([keypair[1]])
    d = tmp_path_factory.mktemp("oa")
    make_lm_bundle(d / "lm", keypair[0])
    make_encoder_bundle(d / "emb", keypair[0])
    lm = ApiServer(ModelHost(load_model(open_bundle(d / "lm", trusted))), port=0)
    emb = ApiServer(ModelHost(load_model(open_bundle(d / "emb", trusted))), port=0)
    lm.start()
    emb.start()
    yield lm, emb
    lm.stop(1)
    emb.stop(1)


def _client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=30)


def test_chat_plain_and_streamed(servers):
    c = _client(servers[0])
    done = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1
    stream = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == done.choices[0].message.content
    assert usage.completion_tokens == done.usage.completion_tokens


def test_completions_and_models(servers):
    c = _client(servers[0])
    out = c.completions.create(model="tiny-llama", prompt="Edge devices", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens >= 1
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-llama", prompt="Edge devices", max_tokens=5, temperature=0, stream=True))
    assert streamed == out.choices[0].text
    assert [m.id for m in c.models.list()] == ["tiny-llama"]
    assert c.models.retrieve("tiny-llama").id == "tiny-llama"


def test_errors_map_to_openai_exceptions(servers):
    c = _client(servers[0])
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10**6)
    assert br.value.param == "max_tokens"


def test_embeddings(servers):
    c = _client(servers[1])
    texts = ["the capital of france is paris", "edge"]
    res = c.embeddings.create(model="tiny-bert-emb", input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in res.data], np.float32)
    expected = servers[1].host.current.embed(texts)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    as_float = c.embeddings.create(model="tiny-bert-emb", input="edge", encoding_format="float")
    np.testing.assert_allclose(as_float.data[0].embedding, expected[1], atol=1e-6)
