"""Structured output, tool calls, logprobs, n, seed and penalties through the official `openai` client, against a
real agent process serving the real SmolLM2-135M-Instruct bundle (short answers: seconds per test)."""

from __future__ import annotations

import enum
import json

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}


class Unit(str, enum.Enum):
    c = "c"
    f = "f"


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str
    unit: Unit


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Fruit(BaseModel):
    color: Color
    price: float
    tags: list[str]


@pytest.fixture(scope="module")
def client(smollm2_agent):
    return openai.OpenAI(base_url=smollm2_agent, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_parse_returns_a_pydantic_object(client, model):
    out = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "A red apple costs 1.5 dollars. Describe it as JSON."}],
        response_format=Fruit, max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Fruit)
    assert Fruit.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_answers_are_json_objects(client, model):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object about Paris."}],
        response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


def test_a_required_tool_call_has_schema_valid_arguments(client, model):
    out = client.chat.completions.create(model=model, messages=ASK, tools=[CLOCK, WEATHER], tool_choice="required",
                                         max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        WeatherArgs.model_validate_json(call.function.arguments)
    else:
        assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments), dict)

    # the named tool, streamed: delta.tool_calls, then finish_reason tool_calls
    stream = client.chat.completions.create(model=model, messages=ASK, tools=[CLOCK, WEATHER], max_tokens=60,
                                            temperature=0, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finish, content = {}, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        for item in delta.tool_calls or []:  # announced with id and name, then the arguments in pieces
            call = calls.setdefault(item.index, {"id": item.id, "name": item.function.name, "arguments": ""})
            call["arguments"] += item.function.arguments or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    [call] = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    args = WeatherArgs.model_validate_json(call["arguments"])

    # the client's parse() with a strict pydantic tool hands back the arguments as the model's instance
    parsed = client.chat.completions.parse(model=model, messages=ASK, max_tokens=60, temperature=0,
                                           tools=[openai.pydantic_function_tool(WeatherArgs, name="get_weather")],
                                           tool_choice="required")
    [call_] = parsed.choices[0].message.tool_calls
    assert isinstance(call_.function.parsed_arguments, WeatherArgs)

    # the call and its result go back into the conversation; the model then answers in text
    past_call = {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
    result = {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"city": args.city, "temperature": 21})}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [past_call]}, result]
    out = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content


def test_logprobs_chat_and_legacy(client, model):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Capital of France?"}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    items = choice.logprobs.content
    assert 1 <= len(items) <= out.usage.completion_tokens
    assert b"".join(bytes(i.bytes) for i in items).decode() == choice.message.content
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert item.token == item.top_logprobs[0].token and item.logprob == pytest.approx(values[0])  # greedy

    text = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_n_seed_and_penalties(client, model):
    ask = dict(model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=1.0)
    a = client.chat.completions.create(**ask, n=3, seed=11)
    b = client.chat.completions.create(**ask, n=3, seed=11)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # counted once for all choices
    greedy = dict(ask, temperature=0, max_tokens=24,
                  messages=[{"role": "user", "content": "Repeat the word yes twenty times."}])
    plain = client.chat.completions.create(**greedy).choices[0].message.content
    penalized = client.chat.completions.create(**greedy, frequency_penalty=2.0).choices[0].message.content
    assert plain != penalized
    assert penalized.lower().count("yes") < plain.lower().count("yes")


BAD = [
    ("json schema of an unknown type", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema"),
    ("unsatisfiable schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}},
     "response_format.json_schema.schema"),
    ("unsupported keyword under strict", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"not": {"type": "string"}}}}}, "response_format.json_schema.schema"),
    ("schema too large", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": [f"p{i}" for i in range(20000)],
        "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}@[a-z]{1,50}"} for i in range(20000)}}}}},
     "response_format.json_schema.schema"),
    ("tool without parameters", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools.0.function.parameters"),
    ("grammar that does not compile", {"response_format": {"type": "grammar", "grammar": "start: undefined_rule"}},
     "response_format.grammar"),
    ("regex that does not compile", {"response_format": {"type": "regex", "regex": "(("}}, "response_format.regex"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("named tool that is not given", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                          "function": {"name": "nope"}}},
     "tool_choice"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_an_unsatisfiable_constraint_ends_with_a_clear_error(smollm2_agent, model, stream):
    """An empty character class compiles; no token can start it: a 400 before any byte of the answer."""
    r = httpx.post(smollm2_agent + "/chat/completions", timeout=120,
                   json={"model": model, "messages": ASK, "max_tokens": 4, "stream": stream,
                         "response_format": {"type": "grammar", "grammar": "start: /[^\\x00-\\U0010FFFF]/"}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "constraint_unsatisfiable" and error["param"] == "response_format.grammar"
    assert "cannot be satisfied" in error["message"]


@pytest.mark.parametrize(("case", "extra", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_param_and_the_service_keeps_serving(smollm2_agent, model, case, extra, param):
    r = httpx.post(smollm2_agent + "/chat/completions", timeout=120,
                   json={"model": model, "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
    ok = httpx.post(smollm2_agent + "/chat/completions", timeout=120,
                    json={"model": model, "messages": ASK, "max_tokens": 2, "temperature": 0,
                          "response_format": {"type": "regex", "regex": "(yes|no)"}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in ("yes", "no")
