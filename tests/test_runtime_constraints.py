"""Constrained decoding, n choices on one prefill, tool-call syntax and the stream format, on the tiny LM."""

from __future__ import annotations

import json
import re

import pytest

from agent.api.openai_format import ChatStream
from agent.runtime.constraints import ConstraintError, ConstraintSpec, compile_constraint
from agent.runtime.generation import Chunk
from agent.runtime.sampling import SamplingParams
from agent.runtime.text import ChatTemplate
from agent.runtime.tools import ToolSpec, call_grammar, parse_calls, render_messages

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]})


def test_sampled_answers_match_the_regex(lm):
    regex = r"(red|green|blue)-[0-9]{2,3}"
    compiled = compile_constraint(ConstraintSpec("regex", regex), lm.vocabulary(), timeout_s=30)
    gen = lm.generate("Colour:", max_tokens=30, n=4, constraint=compiled,
                      sampling=SamplingParams(temperature=1.0, seed=5))
    gen.run()
    assert len(gen.texts) == 4 and gen.stats.finish_reasons == ["stop"] * 4
    for text in gen.texts:
        assert re.fullmatch(regex, text), text


def test_n_choices_decode_from_one_prefill(lm):
    one = lm.generate("Edge devices", max_tokens=8, ignore_eos=True, use_prefix_cache=False)
    one.run()
    three = lm.generate("Edge devices", max_tokens=8, ignore_eos=True, use_prefix_cache=False, n=3, logprobs=2)
    three.run()
    assert three.texts == [one.text] * 3
    assert three.stats.prefilled_tokens == one.stats.prefilled_tokens
    assert three.stats.completion_tokens == 3 * one.stats.completion_tokens
    assert all(len(lp) == 8 and all(len(t.top) == 2 for t in lp) for lp in three.logprobs)


def test_a_grammar_too_slow_to_compile_is_refused_naming_the_param(lm):
    schema = {"type": "object", "required": [f"p{i}" for i in range(3000)],
              "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,40}@[a-z]{1,40}"} for i in range(3000)}}
    spec = ConstraintSpec("json_schema", schema, param="response_format.json_schema.schema")
    with pytest.raises(ConstraintError, match="too large to compile within the 0.001 s") as err:
        compile_constraint(spec, lm.vocabulary(), timeout_s=0.001)
    assert err.value.param == "response_format.json_schema.schema"


def test_tool_syntax_default_and_native():
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "get_weather",
                                                                    "arguments": '{"city": "Oslo"}'}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3 C"}]
    msgs, template_tools = render_messages(history, [WEATHER], native=False)
    assert template_tools is None and msgs[0]["role"] == "system" and '"get_weather"' in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n3 C\n</tool_response>"}
    native = ChatTemplate("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                          "{{ m.role }}:{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}"
                          "{{ m.content }};{% endfor %}", {})
    msgs, template_tools = render_messages(history, [WEATHER], native=True)
    assert native.render(msgs, tools=template_tools) == "[get_weather]user:Weather?;assistant:Oslo;tool:3 C;"

    content, calls = parse_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
                                 [WEATHER])
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert parse_calls('<tool_call>{"name": "other", "arguments": {}}</tool_call>', [WEATHER])[1] == []
    assert "start: calls\n" in call_grammar([WEATHER], mode="required", parallel=False)
    with pytest.raises(ValueError, match="parameters is missing"):
        ToolSpec("f", {})


def test_a_streamed_tool_call_is_announced_then_its_arguments_grow(lm):
    stream = ChatStream(kind="chat", rid="r", model="m", codec=lm.codec, tools=(WEATHER,))
    events = []
    for text in [" <tool", "_call>\n", '{"name":"get_weather",', '"arguments":{"city":', '"Rome"', "}}", "\n</tool_call>",
                 "\n<tool_call>\n", '{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>']:
        events += stream.feed(Chunk(text, 1))
    events += stream.feed(Chunk("", None, "stop"))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert not any(d.get("content") for d in deltas[1:])
    items = [c for d in deltas for c in d.get("tool_calls", [])]
    heads = [c for c in items if "id" in c]
    assert [(c["index"], c["function"]) for c in heads] == [(0, {"name": "get_weather", "arguments": ""}),
                                                            (1, {"name": "get_weather", "arguments": ""})]
    args = ["".join(c["function"]["arguments"] for c in items if c["index"] == k) for k in (0, 1)]
    assert args == ['{"city":"Rome"}', '{"city":"Oslo"}']
    assert len([c for c in items if c["index"] == 0]) > 2  # the arguments came in pieces, as they grew
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    plain = ChatStream(kind="chat", rid="r", model="m", codec=lm.codec, tools=(WEATHER,))
    sent = [plain.feed(Chunk(t, 1)) for t in ["<", "b>bold", " text"]]
    assert len(sent[0]) == 1  # only the role: "<" may begin a call
    assert [e["choices"][0]["delta"] for e in sent[1] + sent[2]] == [{"content": "<b>bold"}, {"content": " text"}]


def test_auto_tool_choice_takes_a_call_or_the_response_format_and_nothing_else(lm):
    vocab = lm.vocabulary()
    text_rule = '%json {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], ' \
                '"x-guidance": {"whitespace_flexible": false}}'
    compiled = compile_constraint(ConstraintSpec("lark", call_grammar([WEATHER], mode="auto", parallel=False,
                                                                      text=text_rule), param="tools"),
                                  vocab, timeout_s=30)

    def accepts(text: str) -> bool:
        mask = compiled.start()
        try:
            for token in vocab.tokenizer.tokenize_str(text):
                if not mask.allowed()[token]:
                    return False
                mask.advance(token)
        except ConstraintError:
            return False
        return mask.matcher.is_accepting()

    assert accepts('{"a":7}')
    assert accepts('<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call>')  # city is required
    assert not accepts("hello")
    assert not accepts('{"a":"seven"}')


def test_forced_text_goes_in_without_a_step_per_token(lm):
    sentence = "Edge devices run small models"
    spec = ConstraintSpec("grammar", f'start: "{sentence}" | "{sentence}!"')
    compiled = compile_constraint(spec, lm.vocabulary(), timeout_s=30)
    gen = lm.generate("Say:", max_tokens=40, constraint=compiled)
    assert gen.run() in (sentence, sentence + "!")
    assert gen.stats.forced_tokens >= len(lm.codec.encode(sentence, add_special_tokens=False)) - 1
    with_lp = lm.generate("Say:", max_tokens=40, constraint=compiled, logprobs=1)
    assert with_lp.run() in (sentence, sentence + "!") and with_lp.stats.forced_tokens == 0
    assert b"".join(lm.codec.token_bytes(t.token_id) for t in with_lp.logprobs[0]).decode() == with_lp.text
