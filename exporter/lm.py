"""Decoder LMs: PyTorch -> ONE ONNX graph with KV cache (optimum's decoder-with-past layout), and a
small onnxruntime driver for it (prefill, decode, greedy) used by the quality gate, golden files
and the benchmark.

The graph takes `input_ids`, `attention_mask`, `position_ids` (where the model takes positions),
`past_key_values.{i}.key/value` and returns `logits`, `present.{i}.key/value` (docs/ARCHITECTURE.md).
Past length 0 is the prefill, so one file serves both phases. Every family optimum-onnx exports for
text-generation with past takes this path, less the refused ones (`supported_architectures`,
`refused_architectures`; the table in docs/EXPORT.md).
"""

from __future__ import annotations

import functools
import gc
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import ConversionError, UnsupportedArchitecture

# End-of-turn tokens of common chat templates: a chat turn ends there even when the checkpoint's
# eos_token_id names only the end-of-text token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

# model_type -> why edgeship refuses it although optimum-onnx exports it for text-generation with past
OPTIMUM_REFUSED = {
    "deepseek_v3": "optimum-onnx 0.1.0 traces its mixture-of-experts loop over only the experts its dummy input "
                   "routes to, so the graph drops the others (a tiny checkpoint's logits were 0.11 off PyTorch)",
}


@functools.cache
def _optimum_candidates() -> dict[str, str | None]:
    """model_type -> None when optimum's path takes it, else why not: every model_type optimum-onnx's
    TasksManager registers for text-generation-with-past. Each one taken is exported and checked against
    PyTorch in tests/test_exporter_families.py (or tests/test_exporter_lm.py)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: dict[str, str | None] = {}
    for model_type in sorted(TasksManager.get_supported_model_type_for_task("text-generation-with-past", "onnx")):
        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if causal is None or model_type not in CONFIG_MAPPING:
            out[model_type] = "transformers has no causal-LM class for it (remote code only)"
        elif CONFIG_MAPPING[model_type]().is_encoder_decoder:
            out[model_type] = "an encoder-decoder family (sequence-to-sequence checkpoints); LM bundles are decoder-only"
        elif causal.endswith("ForConditionalGeneration"):
            out[model_type] = (f"a vision-language model ({causal}); an LM bundle takes text only: export its "
                               "text model")
        else:
            out[model_type] = OPTIMUM_REFUSED.get(model_type)
    return out


def refused_architectures() -> dict[str, str]:
    """model_type -> why not, for what optimum-onnx registers for text-generation-with-past but edgeship refuses."""
    return {t: why_not for t, why_not in _optimum_candidates().items() if why_not is not None}


def optimum_architectures() -> tuple[str, ...]:
    """The model_types the optimum graph takes: optimum's text-generation-with-past set, less the refused."""
    return tuple(t for t, why_not in _optimum_candidates().items() if why_not is None)


def supported_architectures(*, optimum: bool = False) -> tuple[str, ...]:
    """Every model_type some LM graph builder takes, the native ones first (with `optimum`: optimum's only)."""
    from exporter.pipelines.native_lm import NATIVE_ARCHITECTURES

    found = optimum_architectures()
    return found if optimum else (*NATIVE_ARCHITECTURES, *(t for t in found if t not in NATIVE_ARCHITECTURES))


def check_architecture(config: Any, *, optimum: bool = False) -> str:
    """The model_type, if some LM graph builder takes it (with `optimum`: if optimum's path does)."""
    from exporter.pipelines.native_lm import NATIVE_ARCHITECTURES

    model_type = getattr(config, "model_type", None)
    if model_type in NATIVE_ARCHITECTURES and not optimum:
        return model_type  # without importing optimum's configs (3.6 s) for the native path
    known = supported_architectures(optimum=optimum)
    if model_type not in known:
        why_not = _optimum_candidates().get(model_type)
        where = " by the optimum graph (the native graph takes others on CPU targets)" if optimum else ""
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r} for text-generation{where}"
            + (f" ({why_not})" if why_not else "") + f"; supported: {', '.join(known)}"
        )
    return model_type


def _onnx_config(model: Any) -> Any:
    """optimum's export config for this decoder, with position_ids wherever the model's forward takes them."""
    from optimum.exporters.onnx.config import TextDecoderOnnxConfig, TextDecoderWithPositionIdsOnnxConfig
    from optimum.exporters.tasks import TasksManager

    base = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task="text-generation-with-past", library_name="transformers").func
    cls = base
    if issubclass(base, TextDecoderOnnxConfig) and not issubclass(base, TextDecoderWithPositionIdsOnnxConfig) \
            and "position_ids" in inspect.signature(model.forward).parameters:
        # some of optimum's configs (gemma, gemma2, nemotron, codegen, ...) leave positions to the trace; the bundle
        # contract feeds them wherever the model takes them (docs/ARCHITECTURE.md)
        def inputs(self: Any) -> dict[str, dict[int, str]]:
            return {**base.inputs.fget(self), "position_ids": {0: "batch_size", 1: "sequence_length"}}

        cls = type(f"{base.__name__}WithPositionIds", (base,), {"inputs": property(inputs)})
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


def head_patterns(model: Any, patterns: list[str]) -> list[str]:
    """`patterns` (a recipe's exclude or int8_blocks) with this model's output head added under its own module
    name wherever they name "lm_head": GPT-NeoX calls its head embed_out, and 4-bit would otherwise take it."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    return [*patterns, name] if "lm_head" in patterns and name not in patterns else list(patterns)


def cache_layout(path: Path) -> dict[str, int]:
    """num_kv_heads and head_dim of the KV cache as the graph at `path` declares it (optimum's past inputs are
    [batch, kv_heads, past, head_dim]): multi-query families (falcon, gpt_bigcode) keep one KV head whatever
    their config calls the attention heads."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    key, value = dims.get("past_key_values.0.key"), dims.get("past_key_values.0.value")
    if key is None or value is None or len(key) != 4 or not (key[1] and key[3]) or value[1::2] != key[1::2]:
        raise ConversionError(f"{path.name}: past_key_values.0.key {key} / .value {value} are not one "
                              "[batch, kv_heads, past, head_dim] layout; the agent's KV cache needs one (docs/ARCHITECTURE.md)")
    return {"num_kv_heads": key[1], "head_dim": key[3]}


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
