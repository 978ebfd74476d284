"""OpenAI response bodies and stream chunks, built from a Generation: pure functions, no sockets.

    body = completion_body(gen, kind="chat", rid=rid, model=name, codec=model.codec, tools=plan.tools)
    stream = ChatStream(rid=rid, model=name, codec=model.codec, tools=plan.tools)
    for chunk in gen: events = stream.feed(chunk)        # chunk dicts to send as server-sent events

Log-probabilities follow OpenAI: chat `choices[].logprobs.content[]` of {token, logprob, bytes,
top_logprobs}; completions the legacy {tokens, token_logprobs, top_logprobs, text_offset}.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from agent.runtime.sampling import TokenLogprob
from agent.runtime.tools import CLOSE, OPEN, ToolCall, ToolSpec, parse_calls


def system_fingerprint(model_ref: str) -> str:
    """Names the bundle an answer came from (OpenAI's field for 'same seed, same backend')."""
    return f"edgeship-{model_ref}"


def _token(codec, token_id: int) -> tuple[str, list[int]]:
    raw = codec.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(codec, items: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for lp in items:
        text, raw = _token(codec, lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = _token(codec, tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def legacy_logprobs(codec, items: list[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for lp in items:
        text, _ = _token(codec, lp.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token(codec, tid)[0]: v for tid, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def usage(stats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def completion_body(gen, *, kind: str, rid: str, model: str, codec, tools: tuple[ToolSpec, ...] = (),
                    want_logprobs: bool = False, fingerprint: str | None = None) -> dict[str, Any]:
    """The non-streaming body of a chat completion (`kind` "chat") or a text completion."""
    choices = []
    reasons = gen.stats.finish_reasons or [gen.stats.finish_reason]
    for index, text in enumerate(gen.texts or [""]):
        finish = reasons[index] if index < len(reasons) else None
        items = gen.logprobs[index] if index < len(gen.logprobs) else []
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tools:
                content, calls = parse_calls(text, list(tools))
                if calls:
                    message["content"], message["tool_calls"] = content, tool_calls_json(calls)
                    finish = "tool_calls" if finish == "stop" else finish
            logprobs = chat_logprobs(codec, items) if want_logprobs else None
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
        else:
            logprobs = legacy_logprobs(codec, items) if want_logprobs else None
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
    body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage(gen.stats)}
    if fingerprint:
        body["system_fingerprint"] = fingerprint
    return body


_HEADER = re.compile(re.escape(OPEN) + r'\s*\{"name":\s*"([^"]*)",\s*"arguments":\s*')
_END = "}\n" + CLOSE  # the constrained syntax closes a call with exactly this


class CallText:
    """One choice's tool calls, streamed from their text: a delta announcing each call, then its arguments.

    The text is constrained (compact JSON, name before arguments), so a call's arguments end right before
    the first "}\n</tool_call>" after its header: JSON strings cannot hold a raw newline.
    """

    def __init__(self) -> None:
        self.text = ""
        self.scan = 0  # where the next call's header may start
        self.completed = 0
        self._current: list[int] | None = None  # [call index, arguments start, sent up to]

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        deltas: list[dict[str, Any]] = []
        while True:
            if self._current is None:
                header = _HEADER.search(self.text, self.scan)
                if header is None:
                    return deltas
                index = self.completed
                self._current = [index, header.end(), header.end()]
                deltas.append({"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": header.group(1), "arguments": ""}})
            index, start, sent = self._current
            close = self.text.find(_END, start)
            upto = close if close >= 0 else max(sent, len(self.text) - len(_END))
            if upto > sent:
                deltas.append({"index": index, "function": {"arguments": self.text[sent:upto]}})
                self._current[2] = upto
            if close < 0:
                return deltas
            self.completed += 1
            self.scan = close + len(_END)
            self._current = None


class ChatStream:
    """Turns a Generation's chunks into OpenAI stream chunks (chat or text completions).

    With tools, a choice whose text starts like a tool call is held back until it is sure; a call is then
    sent as OpenAI does: a `delta.tool_calls` item with its id and name, then its arguments as they grow,
    and finish_reason "tool_calls".
    """

    def __init__(self, *, kind: str, rid: str, model: str, codec, tools: tuple[ToolSpec, ...] = (),
                 want_logprobs: bool = False, fingerprint: str | None = None) -> None:
        self.kind, self.rid, self.model, self.codec = kind, rid, model, codec
        self.tools, self.want_logprobs, self.fingerprint = tools, want_logprobs, fingerprint
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._started: set[int] = set()
        self._held: dict[int, str] = {}  # text that may begin a tool call
        self._decided: dict[int, bool] = {}  # the choice is text
        self._calls: dict[int, CallText] = {}
        self._offset: dict[int, int] = {}

    def _wrap(self, choice: dict[str, Any], *, usage_: dict | None = None) -> dict[str, Any]:
        out = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
               "choices": [choice] if choice else []}
        if self.fingerprint:
            out["system_fingerprint"] = self.fingerprint
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def _choice(self, index: int, *, text: str | None = None, finish: str | None = None,
                logprob: TokenLogprob | None = None, tool_calls: list | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            lp = chat_logprobs(self.codec, [logprob]) if self.want_logprobs and logprob is not None else None
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        offset = self._offset.get(index, 0)
        lp = (legacy_logprobs(self.codec, [logprob], offset=offset)
              if self.want_logprobs and logprob is not None else None)
        self._offset[index] = offset + len(text or "")
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}

    def feed(self, chunk) -> list[dict[str, Any]]:
        """The stream chunks for one runtime Chunk (possibly none)."""
        i, events = chunk.index, []
        if self.kind == "chat" and i not in self._started:
            self._started.add(i)
            events.append(self._wrap({"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}))
        text, call_deltas = chunk.text, []
        if self.tools and self.kind == "chat":
            text, call_deltas = self._route(i, text)
        if text or (chunk.logprob is not None and self.want_logprobs):
            events.append(self._wrap(self._choice(i, text=text, logprob=chunk.logprob)))
        for delta in call_deltas:
            events.append(self._wrap(self._choice(i, tool_calls=[delta])))
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
            held = self._held.pop(i, None)
            if held:  # it ended before it could be told from a call: it was text
                events.append(self._wrap(self._choice(i, text=held)))
            calls = self._calls.pop(i, None)
            if calls is not None and calls.completed and finish == "stop":
                finish = "tool_calls"
            events.append(self._wrap(self._choice(i, finish=finish)))
        return events

    def _route(self, i: int, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send, tool-call deltas) for choice i's next text."""
        if i in self._calls:
            return "", self._calls[i].feed(text)
        if i not in self._held:
            if self._decided.get(i):
                return text, []
            self._held[i] = ""
        held = self._held[i] + text
        stripped = held.lstrip()
        if stripped.startswith(OPEN):
            del self._held[i]
            self._calls[i] = CallText()
            return "", self._calls[i].feed(stripped)
        if OPEN.startswith(stripped):  # may still become a call: hold
            self._held[i] = held
            return "", []
        del self._held[i]
        self._decided[i] = True
        return held, []

    def usage_chunk(self, stats) -> dict[str, Any]:
        return self._wrap({}, usage_=usage(stats))
