"""Decoder LMs: PyTorch -> ONE ONNX graph with KV cache (optimum's decoder-with-past layout), and a
small onnxruntime driver for it (prefill, decode, greedy) used by the quality gate, golden files
and the benchmark.

The graph takes `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` and
returns `logits`, `present.{i}.key/value` (docs/ARCHITECTURE.md). Past length 0 is the prefill, so
one file serves both phases.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import ConversionError, UnsupportedArchitecture

# model_type -> why it is here. Every entry is exported and gated in tests/test_exporter_lm.py.
SUPPORTED_DECODERS = {
    "llama": "Llama 2/3, TinyLlama, SmolLM",
    "qwen2": "Qwen2 / Qwen2.5",
    "mistral": "Mistral",
    "phi3": "Phi-3 / Phi-3.5 mini",
    "gemma": "Gemma",
}

# End-of-turn tokens of common chat templates: a chat turn ends there even when the checkpoint's
# eos_token_id names only the end-of-text token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def check_architecture(config: Any, *, optimum: bool = False) -> str:
    """The model_type, if some LM graph builder takes it (with `optimum`: if optimum's path does)."""
    from exporter.native import NATIVE_ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    known = dict(SUPPORTED_DECODERS) if optimum else {**SUPPORTED_DECODERS, **NATIVE_ARCHITECTURES}
    if model_type not in known:
        where = " by the optimum graph (the native graph takes more on CPU targets)" if optimum else ""
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r} for text-generation{where}; supported: {', '.join(known)}"
        )
    return model_type


def _onnx_config(model: Any) -> Any:
    """optimum's export config for this decoder, with position_ids for every architecture."""
    from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
    from optimum.exporters.onnx.model_configs import GemmaOnnxConfig
    from optimum.exporters.tasks import TasksManager

    model_type = model.config.model_type
    if model_type == "gemma":
        # optimum's Gemma config has no position_ids input; the bundle contract requires it.
        class GemmaWithPositionIds(TextDecoderWithPositionIdsOnnxConfig):
            NORMALIZED_CONFIG_CLASS = GemmaOnnxConfig.NORMALIZED_CONFIG_CLASS
            DUMMY_INPUT_GENERATOR_CLASSES = GemmaOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES
            DUMMY_PKV_GENERATOR_CLASS = GemmaOnnxConfig.DUMMY_PKV_GENERATOR_CLASS

        cls: Any = GemmaWithPositionIds
    else:
        cls = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task="text-generation-with-past", library_name="transformers"
        )
    return cls(model.config, task="text-generation", use_past=True, use_past_in_inputs=True)


def export_decoder(model: Any, work_dir: Path, *, opset: int) -> Path:
    """Export `model` (float32 PyTorch) to work_dir/model.onnx; returns its path."""
    from optimum.exporters.onnx import onnx_export_from_model

    check_architecture(model.config, optimum=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python bools: expected for HF decoders
            onnx_export_from_model(
                model,
                work_dir,
                task="text-generation-with-past",
                opset=opset,
                do_validation=False,  # our quality gate validates against PyTorch with real text
                custom_onnx_configs={"model": _onnx_config(model)},
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConversionError(f"ONNX export of the {model.config.model_type} model failed: {exc}") from exc
    gc.collect()
    path = work_dir / "model.onnx"
    if not path.exists():
        raise ConversionError(f"ONNX export wrote no model.onnx in {work_dir}")
    return path


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
