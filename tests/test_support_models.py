"""The test fixtures' tiny models are real architectures that transformers runs, offline."""

from __future__ import annotations

import pytest

from tests.support.models import CAUSAL, minilm_path, smollm2_gguf_path


def test_tiny_models_are_real_architectures(tiny_models):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    assert set(tiny_models) >= {"llama", "qwen2", "mistral", "phi3", "gemma", "bert"}
    for arch, path in tiny_models.items():
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.model_type == arch
        tok = AutoTokenizer.from_pretrained(path)
        # decoders take no token types (BLOOM refuses them)
        ids = tok("The capital of France is", return_tensors="pt", return_token_type_ids=arch not in CAUSAL)
        model = (AutoModelForCausalLM if arch in CAUSAL else AutoModel).from_pretrained(path).eval()
        with torch.no_grad():
            out = model(**ids)
        if arch in CAUSAL:
            assert out.logits.shape[-1] == cfg.vocab_size
            assert tok.chat_template, "decoder fixtures carry a chat template"
        else:
            assert out.last_hidden_state.shape[-1] == cfg.hidden_size


def test_real_weight_packages_present():
    assert (minilm_path() / "config.json").exists()
    assert smollm2_gguf_path().stat().st_size > 50_000_000
