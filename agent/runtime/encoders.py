"""Embedding and classification bundles: tokenize a batch, run, pool/normalize or softmax."""

from __future__ import annotations

import numpy as np

from agent.runtime.errors import InputError, LoadError
from agent.runtime.model import LoadedModel
from agent.runtime.text import TextCodec

MAX_BATCH = 32


class _Encoder(LoadedModel):
    def __init__(self, bundle, choice) -> None:
        super().__init__(bundle, choice)
        cfg = self.manifest.model.config
        self.raw = cfg.get("kind") == "raw" or "input_ids" not in self.input_names
        self.codec = None if self.raw else TextCodec.from_dir(self.path)
        self.max_length = int(cfg.get("max_length") or cfg.get("max_context") or 512)
        self.pad_id = 0
        if self.codec is not None:
            pad = self.codec.token_id(self.codec.special("pad_token"))
            self.pad_id = 0 if pad is None else pad

    def _feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.codec.encode_batch(texts)
        ids = [e.ids[: self.max_length] for e in encodings]
        width = max(len(i) for i in ids)
        input_ids = np.full((len(ids), width), self.pad_id, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def _run(self, inputs: list) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        if self.closed:
            raise LoadError(f"model {self.ref} is closed")
        if not inputs:
            raise InputError("the input is empty; send at least one text", param="input")
        if self.raw:
            try:
                x = np.asarray(inputs, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError("this bundle takes numeric vectors, not text", param="input") from None
            shape = self.session.get_inputs()[0].shape
            if x.ndim != 2 or (isinstance(shape[-1], int) and x.shape[1] != shape[-1]):
                raise InputError(f"this bundle takes vectors of length {shape[-1]}, got shape {list(x.shape)}",
                                 param="input")
            return self.session.run(None, {self.input_names[0]: x})[0], None
        if not all(isinstance(t, str) for t in inputs):
            raise InputError("every input must be a string", param="input")
        feeds = self._feeds(inputs)
        return self.session.run(None, feeds)[0], feeds

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

    def embed(self, texts: list) -> np.ndarray:
        """[n, dim] float32; batches of at most MAX_BATCH."""
        parts = []
        for start in range(0, len(texts), MAX_BATCH) if texts else [0]:
            out, feeds = self._run(list(texts[start:start + MAX_BATCH]))
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

    def classify(self, texts: list) -> list[dict]:
        """Per text: {"label", "score", "scores": {label: p}} (softmax over logits)."""
        results = []
        for start in range(0, len(texts), MAX_BATCH) if texts else [0]:
            logits, _ = self._run(list(texts[start:start + MAX_BATCH]))
            z = logits - logits.max(axis=-1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
            labels = self.labels or [f"LABEL_{i}" for i in range(probs.shape[-1])]
            for row in probs:
                best = int(np.argmax(row))
                results.append({"label": labels[best], "score": float(row[best]),
                                "scores": {lab: float(p) for lab, p in zip(labels, row)}})
        return results
