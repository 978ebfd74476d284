"""Tiny random models of real architectures, built offline from configs (as optimum's tests do),
and the real-weight models that pip packages ship.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgeship.models import minilm_path, smollm2_gguf_path  # noqa: F401  (re-exported for tests)

# Small but structurally real: GQA where the architecture has it, >1 layer, tied/untied heads as
# the family does. vocab kept small so exports take seconds.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                  tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                    sliding_window=None),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                 original_max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                  max_position_embeddings=256),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=512, max_position_embeddings=128),
}
DECODERS = ("llama", "qwen2", "mistral", "phi3", "gemma")

# Every further decoder family optimum's graph takes (exporter.lm.optimum_architectures()), tiny and random the same
# way, special tokens inside the tiny tokenizer's vocabulary. Parameter names are each config class's own.
_TOKENS = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, **_TOKENS)
_GPT2_LIKE = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_TOKENS)
FAMILY_CONFIGS: dict[str, dict] = {
    # Phi-2: multi-head attention (optimum's dummy cache has num_attention_heads heads), partial rotary, parallel block
    "phi": dict(_LLAMA_LIKE, num_key_value_heads=4),
    # GPT-NeoX / Polyglot-Ko / Dolly: rotary over a quarter of each head, parallel residual
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=256, **_TOKENS),
    # Gemma 2: a sliding window shorter than the evaluation text, so the gate compares windowed attention
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, sliding_window=16),
    "arcee": dict(_LLAMA_LIKE),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, **_TOKENS),  # ALiBi, no position_ids
    "codegen": dict(_GPT2_LIKE, n_ctx=256, rotary_dim=8),
    "cohere": dict(_LLAMA_LIKE),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "glm": dict(_LLAMA_LIKE, head_dim=16),
    "gpt2": dict(_GPT2_LIKE),
    "gptj": dict(_GPT2_LIKE, rotary_dim=8),
    "granite": dict(_LLAMA_LIKE),
    "helium": dict(_LLAMA_LIKE, head_dim=16),
    "nemotron": dict(_LLAMA_LIKE, head_dim=16),
    "olmo": dict(_LLAMA_LIKE),
    "olmo2": dict(_LLAMA_LIKE),
    "smollm3": dict(_LLAMA_LIKE),
    "stablelm": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),  # native too (tests/test_exporter_native.py); here its optimum graph
    "qwen3_moe": dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                   **_TOKENS),  # multi-query: one KV head
    "gpt_bigcode": dict(_GPT2_LIKE),  # multi-query: one KV head
    # mixture of experts, attention sinks, alternating sliding / full attention
    "gpt_oss": dict(_LLAMA_LIKE, intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "gpt_neo": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, window_size=16,
                    attention_types=[[["global", "local"], 1]], max_position_embeddings=256, **_TOKENS),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256, **_TOKENS),  # ALiBi
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256, **_TOKENS),
}
TINY_CONFIGS.update({arch: dict(cfg, model_type=arch) for arch, cfg in FAMILY_CONFIGS.items()})
CAUSAL = (*DECODERS, *FAMILY_CONFIGS)


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGESHIP_TEST_CACHE", Path.home() / ".cache" / "edgeship-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def cache_lock(out: Path) -> Iterator[None]:
    """Hold `out`'s build lock: pytest-xdist workers (or two test runs) build a cache entry once, never
    into each other's half-written `.tmp`. Check for the entry again inside the lock."""
    with open(out.with_name(out.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_exact_bundle() -> tuple[Path, Path]:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF exported with `--accuracy-level exact` (the GGUF's float math),
    once per test cache, and the public key that verifies it.

    Tests that compare answers token for token across computation paths (batched vs alone, a prefix-cache hit
    vs a full prefill) serve this bundle: the default (searched) bundle runs most linears on int8
    activations, like llama.cpp, where a path's ~1e-6 float differences can flip an int8 rounding and, after a
    near tie, the answer (docs/AGENT.md "Concurrent requests")."""
    from agent.bundle import generate_keypair
    from exporter import export

    root = cache_dir()
    out, keys = root / "smollm2-exact-bundle", root / "smollm2-exact-keys"
    with cache_lock(out):
        if not (keys / "test.pub").exists():
            generate_keypair(keys, "test")
        if not (out / "manifest.json").exists():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            export(smollm2_gguf_path(), out=tmp, key=keys / "test.key", accuracy_level="exact", benchmark=False)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out, keys / "test.pub"


def _tiny_tokenizer(out: Path, vocab_size: int) -> None:
    """A real (trained) byte-level BPE tokenizer of `vocab_size`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The capital of France is Paris.", "Edge devices run small language models.",
              "A fleet of gateways is updated in waves.", "hello world " * 5] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out)


def tiny_model(arch: str, *, num_labels: int | None = None) -> Path:
    """Directory with a tiny random `arch` model (safetensors + config + tokenizer), cached."""
    cfg = dict(TINY_CONFIGS[arch])
    name = f"tiny-{arch}" + (f"-cls{num_labels}" if num_labels else "")
    out = cache_dir() / name
    if (out / "config.json").exists():
        return out  # cached: no torch import (it costs seconds per process)
    with cache_lock(out):
        if not (out / "config.json").exists():
            _build_tiny_model(out, arch, cfg, num_labels)
    return out


def _build_tiny_model(out: Path, arch: str, cfg: dict, num_labels: int | None) -> None:

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import BertTokenizerFast

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model_type = cfg.pop("model_type")
    if num_labels:
        cfg["num_labels"] = num_labels
        cfg["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    config = AutoConfig.for_model(model_type, **cfg)
    if arch in CAUSAL:
        model = AutoModelForCausalLM.from_config(config)
    elif num_labels:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    if arch in CAUSAL:
        _tiny_tokenizer(tmp, cfg["vocab_size"])
    else:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + \
            [f"##{chr(c)}" for c in range(97, 123)] + ["the", "capital", "of", "france", "is", "paris", "edge"]
        vocab += [f"tok{i}" for i in range(cfg["vocab_size"] - len(vocab))]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(tmp)
    os.replace(tmp, out)
