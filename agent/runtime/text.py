"""Tokenizer, chat template and streaming detokenization: pure text logic, no sessions.

The chat template is rendered the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`), so a bundle's prompt is byte for byte what the model
was trained and validated with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from agent.runtime.errors import InputError, LoadError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized as a dict
        return value.get("content")
    return value if isinstance(value, str) else None


class TemplateError(InputError):
    code = "chat_template_error"


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}", param="messages")


class ChatTemplate:
    """A compiled chat template with the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        from jinja2 import ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False, separators=None: \
            json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        from jinja2 import TemplateError as JinjaError

        extra = {"tools": tools} if tools else {}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **extra)
        except JinjaError as exc:
            raise TemplateError(f"rendering the model's chat template failed: {exc}", param="messages") from None


@dataclass
class TextCodec:
    """tokenizers.Tokenizer plus the bundle's tokenizer_config (special tokens, chat template)."""

    tokenizer: Any
    config: dict[str, Any] = field(default_factory=dict)
    chat_template_source: str | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> TextCodec:
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise LoadError(f"bundle {directory} has no tokenizer.json; re-export it with its tokenizer files")
        tokenizer = Tokenizer.from_file(str(path))
        config: dict[str, Any] = {}
        cfg_path = Path(directory) / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = Path(directory) / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        return cls(tokenizer, config, template)

    def special(self, name: str) -> str | None:
        return _token_text(self.config.get(name))

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        if not self.chat_template_source:
            return None
        specials = {n: self.special(n) or "" for n in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return ChatTemplate(self.chat_template_source, specials)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        if self.chat_template is None:
            raise InputError("this model has no chat template; use /v1/completions with a plain prompt",
                             param="messages", code="no_chat_template")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[Any]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        return '"ByteLevel"' in json.dumps(decoder)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a byte-level BPE piece may be part of a character)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if self._byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, inverted (character -> byte)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_level_table()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that are always whole UTF-8 characters.

    Decoding token by token breaks multi-byte characters and byte-level merges; instead decode a
    short window and emit only what was added once it no longer ends in a replacement character.
    """

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.codec.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.codec.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """What is left (possibly an incomplete character) at the end of generation."""
        prefix = self.codec.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.codec.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopMatcher:
    """Holds back text that might begin a stop string; reports when one is complete."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
