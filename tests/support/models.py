"""Tiny random models of real architectures, built offline from configs (as optimum's tests do),
and the real-weight models that pip packages ship.
"""

from __future__ import annotations

import os
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


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGESHIP_TEST_CACHE", Path.home() / ".cache" / "edgeship-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


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

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import BertTokenizerFast

    tmp = out.with_name(out.name + ".tmp")
    torch.manual_seed(0)
    model_type = cfg.pop("model_type")
    if num_labels:
        cfg["num_labels"] = num_labels
        cfg["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    config = AutoConfig.for_model(model_type, **cfg)
    if arch in DECODERS:
        model = AutoModelForCausalLM.from_config(config)
    elif num_labels:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    if arch in DECODERS:
        _tiny_tokenizer(tmp, cfg["vocab_size"])
    else:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + \
            [f"##{chr(c)}" for c in range(97, 123)] + ["the", "capital", "of", "france", "is", "paris", "edge"]
        vocab += [f"tok{i}" for i in range(cfg["vocab_size"] - len(vocab))]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(tmp)
    os.replace(tmp, out)
    return out
