"""Runnable text-generation / embedding / classification bundles for agent runtime and API tests.

The ONNX exports (optimum for decoders, torch.onnx for the pooled encoder) are cached under
tests.support.models.cache_dir(); sealing a fresh copy per test is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from agent.bundle import Manifest, ModelSpec, Target, Task, load_private_key, seal_bundle
from tests.support.models import cache_dir, cache_lock, tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.txt")


def export_lm(model_dir: Path, name: str) -> Path:
    """optimum's decoder-with-past export of `model_dir`, cached as `name`."""
    out = cache_dir() / f"onnx-{name}"
    if (out / "model.onnx").exists():
        return out
    with cache_lock(out):
        if not (out / "model.onnx").exists():
            _export_lm(model_dir, out)
    return out


def _export_lm(model_dir: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():  # tracing warns a lot; pytest's "error" filter would abort the export
        warnings.simplefilter("ignore")
        main_export(str(model_dir), str(tmp), task="text-generation-with-past", device="cpu")
    for rel in TOKENIZER_FILES:  # main_export copies most; make sure the template travels
        if (Path(model_dir) / rel).exists() and not (tmp / rel).exists():
            shutil.copy2(Path(model_dir) / rel, tmp / rel)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def lm_config(onnx_dir: Path) -> dict:
    """manifest.model.config for a decoder from its HF config.json (as the exporter writes it)."""
    cfg = json.loads((onnx_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    tok_cfg = json.loads((onnx_dir / "tokenizer_config.json").read_text()) if \
        (onnx_dir / "tokenizer_config.json").exists() else {}
    if eos is None:
        eos_text = tok_cfg.get("eos_token")
        vocab = json.loads((onnx_dir / "tokenizer.json").read_text())
        eos = next((t["id"] for t in vocab.get("added_tokens", []) if t["content"] == eos_text), None)
    return {
        "num_layers": cfg["num_hidden_layers"],
        "num_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "max_context": cfg.get("max_position_embeddings", 2048),
        "eos_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "bos_token_id": cfg.get("bos_token_id"),
    }


def seal_lm_bundle(onnx_dir: Path, directory: Path, private_key_path: Path, *, name: str = "tiny-llama",
                   version: str = "1.0.0", config: dict | None = None, **fields) -> Manifest:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in onnx_dir.iterdir():
        if f.name.startswith("model.onnx") or f.name in TOKENIZER_FILES:
            shutil.copy2(f, directory / f.name)
    return seal_bundle(directory, private_key=load_private_key(private_key_path), name=name, version=version,
                       task=Task.TEXT_GENERATION, target=Target(profile="cpu-x86-avx2"),
                       model=ModelSpec(entry="model.onnx", architecture="llama", config=config or lm_config(onnx_dir)),
                       **fields)


def make_lm_bundle(directory: Path, private_key_path: Path, *, arch: str = "llama", **kwargs) -> Manifest:
    """A sealed tiny random `arch` LM bundle in `directory`."""
    return seal_lm_bundle(export_lm(tiny_model(arch), f"tiny-{arch}-lm"), directory, private_key_path,
                          name=kwargs.pop("name", f"tiny-{arch}"), **kwargs)


def _export_encoder(name: str, *, num_labels: int | None) -> Path:
    """Tiny BERT as ONNX: pooled + L2-normalized `sentence_embedding`, or classification `logits`."""
    out = cache_dir() / f"onnx-{name}"
    if (out / "model.onnx").exists():
        return out
    with cache_lock(out):
        if not (out / "model.onnx").exists():
            _build_encoder(out, num_labels=num_labels)
    return out


def _build_encoder(out: Path, *, num_labels: int | None) -> None:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    src = tiny_model("bert", num_labels=num_labels)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if num_labels:
        inner = AutoModelForSequenceClassification.from_pretrained(src).eval()

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

        out_name = "logits"
    else:
        inner = AutoModel.from_pretrained(src).eval()

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                h = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)

        out_name = "sentence_embedding"
    ids = torch.tensor([[2, 40, 41, 3], [2, 42, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, mask, torch.zeros_like(ids)), str(tmp / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=[out_name],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask",
                                                                            "token_type_ids")}
                          | {out_name: {0: "batch"}}, opset_version=17, dynamo=False)
    for rel in TOKENIZER_FILES:
        if (src / rel).exists():
            shutil.copy2(src / rel, tmp / rel)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def make_encoder_bundle(directory: Path, private_key_path: Path, *, num_labels: int | None = None,
                        name: str | None = None, version: str = "1.0.0") -> Manifest:
    """A sealed tiny BERT embedding bundle, or a classification bundle when `num_labels` is given."""
    src = _export_encoder("tiny-bert-cls" if num_labels else "tiny-bert-emb", num_labels=num_labels)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, directory / f.name)
    if num_labels:
        task, config = Task.CLASSIFICATION, {"labels": [f"label-{i}" for i in range(num_labels)], "max_length": 128}
        outputs = ["logits"]
    else:
        task, config = Task.EMBEDDING, {"pooling": "mean", "normalize": True, "dim": 64, "max_length": 128}
        outputs = ["sentence_embedding"]
    return seal_bundle(directory, private_key=load_private_key(private_key_path),
                       name=name or ("tiny-bert-cls" if num_labels else "tiny-bert-emb"), version=version, task=task,
                       target=Target(profile="cpu-x86-avx2"),
                       model=ModelSpec(entry="model.onnx", architecture="bert",
                                       inputs=["input_ids", "attention_mask", "token_type_ids"], outputs=outputs,
                                       config=config))


def gqa_lm_onnx(path: Path, *, vocab: int = 512, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                seed: int = 0) -> None:
    """A one-layer LM built on com.microsoft GroupQueryAttention, with the LM bundle I/O names
    (no position_ids), like the graphs onnxruntime-genai's builder emits."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hd = hidden // heads
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    past = ["past_key_values.0.key", "past_key_values.0.value"]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "Wq"], ["q"]),
        helper.make_node("MatMul", ["emb", "Wk"], ["k"]),
        helper.make_node("MatMul", ["emb", "Wv"], ["v"]),
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["len64"], keepdims=0),
        helper.make_node("Sub", ["len64", "one64"], ["seqlens64"]),
        helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "idx1"], ["total64"], axis=0),
        helper.make_node("Cast", ["total64"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", *past, "seqlens_k", "total"],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft",
                         num_heads=heads, kv_num_heads=kv_heads),
        helper.make_node("MatMul", ["attn", "Wo"], ["o"]),
        helper.make_node("Add", ["o", "emb"], ["h"]),
        helper.make_node("MatMul", ["h", "Wlm"], ["logits"]),
    ]
    kv_shape = ["batch", kv_heads, "past_sequence_length", hd]
    graph = helper.make_graph(
        nodes, "tiny-gqa",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in past]],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence_length", vocab]),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv_heads, "total_sequence_length", hd])
           for n in ("present.0.key", "present.0.value")]],
        [w("E", vocab, hidden), w("Wq", hidden, heads * hd), w("Wk", hidden, kv_heads * hd),
         w("Wv", hidden, kv_heads * hd), w("Wo", heads * hd, hidden), w("Wlm", hidden, vocab),
         numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(np.array(1, np.int64), "one64"),
         numpy_helper.from_array(np.array(1, np.int64), "idx1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    onnx.save(model, str(path))


def make_gqa_lm_bundle(directory: Path, private_key_path: Path, *, shared_kv: bool, name: str = "tiny-gqa",
                       version: str = "1.0.0") -> Manifest:
    """A sealed GroupQueryAttention LM bundle; `shared_kv` sets config.past_present_share_buffer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gqa_lm_onnx(directory / "model.onnx")
    src = tiny_model("llama")
    for rel in TOKENIZER_FILES:
        if (src / rel).exists():
            shutil.copy2(src / rel, directory / rel)
    config = {"num_layers": 1, "num_kv_heads": 2, "head_dim": 16, "max_context": 128, "eos_token_ids": [2],
              "bos_token_id": 1, "past_present_share_buffer": shared_kv}
    return seal_bundle(directory, private_key=load_private_key(private_key_path), name=name, version=version,
                       task=Task.TEXT_GENERATION, target=Target(profile="cpu-x86-avx2"),
                       model=ModelSpec(entry="model.onnx", architecture="llama", config=config))
