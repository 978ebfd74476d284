"""Embedding and classification bundles: tokenize, pad to what the graph takes, run, pool/normalize or softmax.

Dynamic graphs (CPU profiles) get batches of up to MAX_BATCH texts padded to the longest one.
Static graphs (the NPU profile, `model.config.static_shapes`) get exactly the graph's shape: every
text padded to the fixed length with attention mask 0 on the padding, and batches of the fixed
batch size (one text per call for [1, length] graphs, filler rows whose outputs are dropped
otherwise). A text longer than the model's limit is an error naming the limit, as OpenAI's
embeddings API does; `truncate=True` cuts it instead (keeping the tokenizer's special tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import numpy as np

from agent.runtime.errors import InputError, LoadError
from agent.runtime.model import LoadedModel
from agent.runtime.text import TextCodec

MAX_BATCH = 32


def _fixed(dim) -> int | None:
    """A graph dimension's size when it is fixed, None when symbolic."""
    return dim if isinstance(dim, int) and dim > 0 else None


class _Encoder(LoadedModel):
    def __init__(self, bundle, choice) -> None:
        super().__init__(bundle, choice)
        cfg = self.manifest.model.config
        self.raw = cfg.get("kind") == "raw" or "input_ids" not in self.input_names
        self.codec = None if self.raw else TextCodec.from_dir(self.path)
        if self.codec is not None:
            # transformers saves the padding/truncation of its last call into tokenizer.json (the
            # exporter's was "pad to 128, truncate"); lengths must be seen whole to refuse over-long text.
            self.codec.tokenizer.no_padding()
            self.codec.tokenizer.no_truncation()
        inputs = self.session.get_inputs()
        first = next((i for i in inputs if i.name == "input_ids"), inputs[0]).shape
        graph_batch = _fixed(first[0]) if len(first) > 0 else None
        graph_length = _fixed(first[1]) if len(first) > 1 and not self.raw else None
        declared = cfg.get("max_length") or cfg.get("max_context")
        if graph_length is not None and declared and int(declared) != graph_length:
            raise LoadError(f"bundle {self.ref} declares max_length {declared} but its graph takes {graph_length} "
                            "tokens; re-export it")
        self.max_length = graph_length or int(declared or 512)
        self.static = bool(cfg.get("static_shapes")) or graph_length is not None
        self.fixed_length: int | None = self.max_length if self.static and not self.raw else None
        self.fixed_batch: int | None = graph_batch
        self.pad_id = 0
        if self.codec is not None:
            pad = self.codec.token_id(self.codec.special("pad_token"))
            self.pad_id = 0 if pad is None else pad

    @cached_property
    def _truncating(self):
        """A copy of the tokenizer that truncates to max_length the way transformers does."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.codec.tokenizer.to_str())
        tok.enable_truncation(self.max_length)
        return tok

    def token_ids(self, texts: list[str], *, truncate: bool = False) -> list[list[int]]:
        """Token ids per text; a text over max_length is an InputError unless `truncate`."""
        encodings = self.codec.encode_batch(list(texts))
        over = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if over and not truncate:
            i = over[0]
            why = " (the bundle is compiled for that fixed length)" if self.static else ""
            raise InputError(f"input[{i}] is {len(encodings[i].ids)} tokens but this model takes at most "
                             f"{self.max_length} tokens per input{why}; shorten or split it",
                             param="input", code="context_length_exceeded")
        ids = [e.ids for e in encodings]
        for i, e in zip(over, self._truncating.encode_batch([texts[i] for i in over], add_special_tokens=True)):
            ids[i] = e.ids
        return ids

    def batches(self, ids: list[list[int]]) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Session feeds for `ids` in order, each with how many of its leading rows are real texts."""
        size = self.fixed_batch or MAX_BATCH
        for start in range(0, len(ids), size):
            rows = ids[start:start + size]
            real = len(rows)
            if self.fixed_batch:  # a fixed-batch graph gets filler rows; their outputs are dropped
                rows = rows + [rows[0]] * (self.fixed_batch - real)
            width = self.fixed_length or max(len(r) for r in rows)
            input_ids = np.full((len(rows), width), self.pad_id, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for row, seq in enumerate(rows):
                input_ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
            yield {k: v for k, v in feeds.items() if k in self.input_names}, real

    def _run(self, inputs: list, *, truncate: bool) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray] | None]]:
        """(first output, feeds) per session call, cut to the real rows; inputs are checked before any call."""
        if self.closed:
            raise LoadError(f"model {self.ref} is closed")
        if not inputs:
            raise InputError("the input is empty; send at least one text", param="input")
        if self.raw:
            yield from self._run_raw(inputs)
            return
        if not all(isinstance(t, str) for t in inputs):
            raise InputError("every input must be a string", param="input")
        for feeds, real in self.batches(self.token_ids(inputs, truncate=truncate)):
            out = self.session.run(None, feeds)[0]
            yield out[:real], {k: v[:real] for k, v in feeds.items()}

    def _run_raw(self, inputs: list) -> Iterator[tuple[np.ndarray, None]]:
        try:
            x = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError("this bundle takes numeric vectors, not text", param="input") from None
        shape = self.session.get_inputs()[0].shape
        if x.ndim != 2 or (isinstance(shape[-1], int) and x.shape[1] != shape[-1]):
            raise InputError(f"this bundle takes vectors of length {shape[-1]}, got shape {list(x.shape)}",
                             param="input")
        for start in range(0, len(x), MAX_BATCH):
            yield self.session.run(None, {self.input_names[0]: x[start:start + MAX_BATCH]})[0], None

    def tokens(self, texts: list[str]) -> int:
        """How many tokens `texts` are (for usage reports)."""
        if self.codec is None:
            return 0
        return sum(min(len(e.ids), self.max_length) for e in self.codec.encode_batch(list(texts)))


class EmbeddingModel(_Encoder):
    def __init__(self, bundle, choice) -> None:
        super().__init__(bundle, choice)
        self.output = "sentence_embedding" if "sentence_embedding" in self.output_names else self.output_names[0]
        self.normalize = bool(self.manifest.model.config.get("normalize", self.output != "sentence_embedding"))

    def embed(self, texts: list, *, truncate: bool = False) -> np.ndarray:
        """[n, dim] float32; an over-long text is an InputError unless `truncate`."""
        parts = []
        for out, feeds in self._run(list(texts), truncate=truncate):
            if out.ndim == 3:  # last_hidden_state: mean-pool over real tokens
                mask = feeds["attention_mask"][..., None].astype(out.dtype)
                out = (out * mask).sum(1) / np.maximum(mask.sum(1), 1)
            if self.normalize and self.output != "sentence_embedding":
                out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
            parts.append(out.astype(np.float32))
        return np.concatenate(parts)


class ClassificationModel(_Encoder):
    def __init__(self, bundle, choice) -> None:
        super().__init__(bundle, choice)
        labels = self.manifest.model.config.get("labels")
        if isinstance(labels, dict):  # {"0": "neg", ...}
            labels = [labels[k] for k in sorted(labels, key=int)]
        self.labels: list[str] | None = labels

    def classify(self, texts: list, *, truncate: bool = False) -> list[dict]:
        """Per text: {"label", "score", "scores": {label: p}} (softmax over logits)."""
        results = []
        for logits, _ in self._run(list(texts), truncate=truncate):
            z = logits - logits.max(axis=-1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
            labels = self.labels or [f"LABEL_{i}" for i in range(probs.shape[-1])]
            for row in probs:
                best = int(np.argmax(row))
                results.append({"label": labels[best], "score": float(row[best]),
                                "scores": {lab: float(p) for lab, p in zip(labels, row)}})
        return results
