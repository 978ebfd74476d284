"""Real SmolLM2-135M-Instruct (fp32 bundle): a greedy chat completion through the API is, token for
token, what the PyTorch model generates from the same chat template."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from agent.api import ApiServer
from agent.bundle import TrustedKeys, open_bundle
from agent.runtime import ModelHost, load_model
from tests.support.lm_bundle import export_lm, lm_config, seal_lm_bundle
from tests.support.models import cache_dir, cache_lock, smollm2_gguf_path

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smollm2_hf():
    """SmolLM2-135M-Instruct dequantized from its GGUF to an fp32 transformers checkpoint (cached)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = cache_dir() / "smollm2-135m-instruct-hf"
    with cache_lock(out):
        if not (out / "config.json").exists():
            _dequantize(out)
    return out


def _dequantize(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32) \
        .save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    os.replace(tmp, out)


@pytest.fixture(scope="module")
def server(smollm2_hf, tmp_path_factory, keypair):
    onnx_dir = export_lm(smollm2_hf, "smollm2-135m-instruct-lm")
    config = lm_config(onnx_dir)
    from tokenizers import Tokenizer

    im_end = Tokenizer.from_file(str(onnx_dir / "tokenizer.json")).token_to_id("<|im_end|>")
    config["eos_token_ids"] = sorted(set(config["eos_token_ids"]) | {im_end})
    config["max_context"] = min(config["max_context"], 2048)
    d = tmp_path_factory.mktemp("smollm2")
    seal_lm_bundle(onnx_dir, d, keypair[0], name="smollm2-135m-instruct", config=config)
    host = ModelHost(load_model(open_bundle(d, TrustedKeys.from_paths([keypair[1]]))))
    api = ApiServer(host, port=0)
    api.start()
    yield api
    api.stop(1)


def test_greedy_chat_matches_pytorch_token_for_token(server, smollm2_hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = server.host.current
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_hf, torch_dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert model.chat_prompt(MESSAGES) == prompt  # same template, same tokens
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                 eos_token_id=sorted(model.eos_token_ids), pad_token_id=tok.pad_token_id or 0)
    ref_ids = out[0, len(prompt):].tolist()
    if ref_ids and ref_ids[-1] in model.eos_token_ids:
        ref_ids = ref_ids[:-1]
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                   json={"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ours = [c.token_id for c in model.generate(messages=MESSAGES, max_tokens=40) if c.token_id is not None]
    assert ours == ref_ids
    assert body["choices"][0]["message"]["content"] == tok.decode(ref_ids, skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] in (len(ref_ids), len(ref_ids) + 1)  # + the eos when it stopped
    assert "Paris" in body["choices"][0]["message"]["content"]
