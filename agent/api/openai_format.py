"""OpenAI response bodies and stream chunks, built from a Generation: pure functions, no sockets.

    body = completion_body(gen, kind="chat", rid=rid, model=name, codec=model.codec, tools=plan.tools)
    stream = ChatStream(rid=rid, model=name, codec=model.codec, tools=plan.tools)
    for chunk in gen: events = stream.feed(chunk)        # chunk dicts to send as server-sent events

Log-probabilities follow OpenAI: chat `choices[].logprobs.content[]` of {token, logprob, bytes,
top_logprobs}; completions the legacy {tokens, token_logprobs, top_logprobs, text_offset}.
"""

from __future__ import annotations

import time
from typing import Any

from agent.runtime.sampling import TokenLogprob
from agent.runtime.tools import OPEN, ToolCall, ToolSpec, parse_calls


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


def tool_calls_json(calls: list[ToolCall], *, streaming: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        item = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": i, **item} if streaming else item)
    return out


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


class ChatStream:
    """Turns a Generation's chunks into OpenAI stream chunks (chat or text completions).

    With tools, a choice whose text starts like a tool call is held back and sent, once complete, as
    `delta.tool_calls` with finish_reason "tool_calls".
    """

    def __init__(self, *, kind: str, rid: str, model: str, codec, tools: tuple[ToolSpec, ...] = (),
                 want_logprobs: bool = False, fingerprint: str | None = None) -> None:
        self.kind, self.rid, self.model, self.codec = kind, rid, model, codec
        self.tools, self.want_logprobs, self.fingerprint = tools, want_logprobs, fingerprint
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._started: set[int] = set()
        self._text: dict[int, str] = {}
        self._held: dict[int, str] = {}
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
        text = chunk.text
        if self.tools and self.kind == "chat":
            so_far = self._text.get(i, "") + text
            self._text[i] = so_far
            stripped = so_far.lstrip()
            if OPEN.startswith(stripped) or stripped.startswith(OPEN):  # a call, or may become one: hold
                self._held[i] = self._held.get(i, "") + text
                text = ""
            elif i in self._held:  # it looked like a call and is not: release what was held
                text = self._held.pop(i) + text
        if chunk.finish_reason is not None:
            finish, calls = chunk.finish_reason, None
            held = self._held.pop(i, None)
            if held is not None:
                content, parsed = parse_calls(held, list(self.tools))
                if parsed:
                    calls = tool_calls_json(parsed, streaming=True)
                    finish = "tool_calls" if finish == "stop" else finish
                    text = text + (content or "")
                else:
                    text = held + text
            if text or chunk.logprob is not None:
                events.append(self._wrap(self._choice(i, text=text, logprob=chunk.logprob)))
            if calls:
                events.append(self._wrap(self._choice(i, tool_calls=calls)))
            events.append(self._wrap(self._choice(i, finish=finish)))
            return events
        if text or (chunk.logprob is not None and self.want_logprobs):
            events.append(self._wrap(self._choice(i, text=text, logprob=chunk.logprob)))
        return events

    def usage_chunk(self, stats) -> dict[str, Any]:
        return self._wrap({}, usage_=usage(stats))
