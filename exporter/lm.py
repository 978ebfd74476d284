"""Decoder LMs, whichever pipeline built them: the bundle's KV-cache layout and a small onnxruntime
driver for it (prefill, decode, greedy) used by the quality gate, golden files and the benchmark.

The graph takes `input_ids`, `attention_mask`, `position_ids` (where the model takes positions),
`past_key_values.{i}.key/value` and returns `logits`, `present.{i}.key/value` (docs/ARCHITECTURE.md).
Past length 0 is the prefill, so one file serves both phases. The graphs themselves come from
exporter/pipelines/ (native_lm, optimum_lm, gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


# End-of-turn tokens of common chat templates: a chat turn ends there even when the checkpoint's
# eos_token_id names only the end-of-text token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

def eos_token_ids(config: Any, generation_config: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids


def decoder_spec(model: Any, tokenizer: Any, *, max_context: int | None) -> dict[str, Any]:
    """manifest.model.config for an LM bundle: what the agent needs to build the KV cache and stop."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    limit = getattr(cfg, "max_position_embeddings", None) or 2048
    bos = getattr(cfg, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None)
    return {
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_context": min(limit, max_context) if max_context else limit,
        "eos_token_ids": eos_token_ids(cfg, getattr(model, "generation_config", None), tokenizer),
        "bos_token_id": bos,
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        "kv_dtype": "float32",
    }


def head_patterns(model: Any, patterns: list[str]) -> list[str]:
    """`patterns` (a recipe's exclude or int8_blocks) with this model's output head added under its own module
    name wherever they name "lm_head": GPT-NeoX calls its head embed_out, and 4-bit would otherwise take it."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    return [*patterns, name] if "lm_head" in patterns and name not in patterns else list(patterns)


@dataclass(frozen=True)
class Past:
    """The KV cache between calls: present.* of the last call, renamed to past_key_values.*."""

    tensors: dict[str, np.ndarray]
    length: int


class OrtDecoder:
    """Runs an exported decoder graph with onnxruntime: prefill, one decode step, greedy generation."""

    def __init__(self, path: Path, *, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def empty_past(self, batch: int = 1) -> Past:
        tensors = {}
        for i in self._past_inputs:
            _, kv_heads, _, head_dim = i.shape
            tensors[i.name] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
        return Past(tensors, 0)

    def feed(self, ids: np.ndarray, past: Past, *, keep: int = 0) -> dict[str, np.ndarray]:
        """The input dict for `ids` [b, s] after `past`; `keep` = n > 0 asks graphs that take logits_to_keep
        (edgeship's native and GGUF graphs) for the last n positions' logits only (0: every position)."""
        b, s = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, past.length + s), np.int64),
            "position_ids": np.tile(np.arange(past.length, past.length + s, dtype=np.int64), (b, 1)),
            "logits_to_keep": np.array([keep], np.int64),
            **past.tensors,
        }
        return {k: v for k, v in feed.items() if k in self.input_names}

    def run(self, ids: np.ndarray, past: Past, *, keep: int = 0) -> tuple[np.ndarray, Past]:
        outputs = self.session.run(None, self.feed(ids, past, keep=keep))
        named = dict(zip(self.output_names, outputs))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in named.items() if k.startswith("present.")}
        return named["logits"], Past(present, past.length + ids.shape[1])

    def greedy(self, prompt: np.ndarray, steps: int) -> np.ndarray:
        """`steps` greedy tokens after `prompt` (1-D), decoding one token per call through the KV cache."""
        logits, past = self.run(prompt[None, :], self.empty_past())
        out = []
        for _ in range(steps):
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            logits, past = self.run(np.array([[token]], np.int64), past)
        return np.array(out, np.int64)
