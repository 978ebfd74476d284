"""The tokenizer of a GGUF file, built from its tokenizer.* metadata by transformers' GGUF converters.

transformers' own `gguf_file=` load is tried first; it refuses architectures it has no model mapping for
(gemma, phi2, gptneox) and picks its converter by architecture (gemma2: sentencepiece, whatever the file
holds), so for those the converter the metadata names is called directly.
"""

from __future__ import annotations

import os
from typing import Any

from exporter.errors import SourceError
from exporter.gguf.reader import GgufFile


def load_tokenizer(g: GgufFile) -> Any:
    """transformers' tokenizer for the GGUF, from its metadata (no other file is read)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(g.path.parent, gguf_file=g.path.name, local_files_only=True)
    except (ValueError, TypeError):
        return from_metadata(g)
    except Exception as exc:
        raise SourceError(f"{g.path.name}: transformers cannot build a tokenizer from its metadata ({exc})") from None


def from_metadata(g: GgufFile) -> Any:
    """The tokenizer from the GGUF's tokenizer.* metadata through transformers' GGUF converters directly."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = g.meta(f"tokenizer.{key}")
        if value is not None:
            fields[name] = value
    kind = fields.get("tokenizer_type")
    converter = {"gpt2": "gpt2", "llama": "gemma2" if g.architecture.startswith("gemma") else "llama"}.get(kind)
    if converter is None or "tokens" not in fields:
        raise SourceError(f"{g.path.name}: tokenizer type {kind!r} cannot be rebuilt from GGUF metadata; "
                          "supported: gpt2 (byte-level BPE), llama (sentencepiece)")
    try:
        backend, extra = convert_gguf_tokenizer(converter, fields)
    except Exception as exc:
        raise SourceError(f"{g.path.name}: transformers cannot build a tokenizer from its metadata ({exc})") from None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **extra)
    template = g.meta("tokenizer.chat_template")
    if template is not None:
        tok.chat_template = str(template)
    return tok
