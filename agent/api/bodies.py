"""Response bodies of the OpenAI-compatible API: plain functions of the results, no I/O."""

from __future__ import annotations

import base64
import time
from typing import Any


def usage(stats) -> dict:
    """`usage` of a generation from its GenerationStats."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def completion(gen, *, kind: str, rid: str, model_name: str) -> dict:
    """The whole answer of a finished Generation: a chat.completion or a text_completion."""
    finish = gen.stats.finish_reason
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                  "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": gen.text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice],
            "usage": usage(gen.stats)}


class Chunks:
    """The server-sent events of one streamed answer (same id and created on every chunk)."""

    def __init__(self, *, kind: str, rid: str, model_name: str) -> None:
        self.kind, self.rid, self.model_name = kind, rid, model_name
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _wrap(self, choices: list, **extra: Any) -> dict:
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def role(self) -> dict:
        """The first chunk of a chat stream: the assistant's role, no text yet."""
        return self._wrap([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                            "logprobs": None}])

    def text(self, text: str | None, finish: str | None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._wrap([choice])

    def usage(self, stats) -> dict:
        return self._wrap([], usage=usage(stats))


def embeddings(vectors, *, model_name: str, encoding_format: str, tokens: int) -> dict:
    if encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return {"object": "list", "model": model_name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def classifications(results: list[dict], *, model_name: str, tokens: int) -> dict:
    return {"object": "list", "model": model_name,
            "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_card(model) -> dict:
    return {"id": model.name, "object": "model", "created": int(model.manifest.created_at.timestamp()),
            "owned_by": "edgeship", "version": model.manifest.version, "task": model.task.value,
            "execution_provider": model.execution_provider,
            "max_context": getattr(model, "max_context", None)}
