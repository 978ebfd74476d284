"""Response bodies of the OpenAI-compatible API for encoders and models: plain functions, no I/O.

Generation answers and their stream chunks (logprobs, tool calls, n choices) are in
agent/api/openai_format.py."""

from __future__ import annotations

import base64


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
