"""The runtime on real onnxruntime sessions: generation vs PyTorch, prefix cache, stops, cancel,
EP fallback, golden smoke test, embeddings and classification vs PyTorch, ModelHost swap/drain."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import ExecutionProvider, Runtime, open_bundle
from agent.runtime import Cancelled, InputError, ModelHost, WrongTask, load_model, usable_cpus
from agent.runtime.prefix_cache import common_prefix_len
from tests.support.bundles import make_bundle
from tests.support.lm_bundle import export_lm, make_encoder_bundle, seal_lm_bundle
from tests.support.models import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "The capital of France is"}]


def _ids(gen) -> list[int]:
    return [c.token_id for c in gen if c.token_id is not None]


def test_greedy_generation_matches_pytorch_token_for_token(lm):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    prompt = lm.chat_prompt(CHAT)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                           eos_token_id=sorted(lm.eos_token_ids), pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    gen = lm.generate(messages=CHAT, max_tokens=24, use_prefix_cache=False)
    got = _ids(gen)
    if gen.stats.finish_reason == "stop":
        expected = expected[:-1]  # ours does not emit the eos token itself
    assert got == expected
    assert gen.stats.prompt_tokens == len(prompt)
    assert gen.stats.completion_tokens >= len(got)


def test_execution_provider_and_threads_are_reported(lm):
    assert lm.execution_provider == "CPUExecutionProvider"
    assert lm.threads == usable_cpus()


def test_second_chat_turn_prefills_only_new_tokens_and_matches_a_cold_run(lm):
    lm.prefix_cache.clear()
    first = lm.generate(messages=CHAT, max_tokens=8)
    reply_ids = _ids(first)
    assert first.stats.cached_tokens == 0
    fed = lm.chat_prompt(CHAT) + reply_ids[:-1] if first.stats.finish_reason == "length" else \
        lm.chat_prompt(CHAT) + reply_ids
    turn2 = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Spain?"}]
    prompt2 = lm.chat_prompt(turn2)
    warm = lm.generate(messages=turn2, max_tokens=12)
    warm_ids = _ids(warm)
    cached = warm.stats.cached_tokens
    assert cached == min(common_prefix_len(fed, prompt2), len(prompt2) - 1)
    assert cached >= len(lm.chat_prompt(CHAT))  # at least the whole first prompt was skipped
    assert warm.stats.prefilled_tokens == len(prompt2) - cached
    cold = lm.generate(messages=turn2, max_tokens=12, use_prefix_cache=False)
    assert _ids(cold) == warm_ids and cold.text == warm.text
    assert cold.stats.prefilled_tokens == len(prompt2)


def test_fixed_system_prompt_is_prefilled_once(lm):
    lm.prefix_cache.clear()
    system = {"role": "system", "content": "You answer questions about edge devices and fleets of gateways."}
    lm.generate(messages=[system, {"role": "user", "content": "hello"}], max_tokens=2).run()
    second = lm.generate(messages=[system, {"role": "user", "content": "world"}], max_tokens=2)
    second.run()
    sys_len = len(lm.codec.encode(lm.codec.render_chat([system], add_generation_prompt=False),
                                  add_special_tokens=False))
    assert second.stats.cached_tokens >= sys_len - 1


def test_prefix_cache_memory_is_bounded(lm):
    from agent.runtime.prefix_cache import PrefixCache

    cache = PrefixCache(max_bytes=10_000, max_entries=3)
    kv = (np.zeros((1, 2, 10, 16), np.float32),) * 4  # 5120 bytes
    cache.store(list(range(10)), kv)
    cache.store(list(range(100, 110)), kv)
    assert cache.nbytes <= 10_000 and len(cache._entries) == 1
    n, got = cache.lookup(list(range(100, 105)) + [1], limit=100)
    assert n == 5 and got[0].shape == (1, 2, 5, 16)


def test_stop_token_and_stop_string_and_max_tokens(lm):
    base = lm.generate(messages=CHAT, max_tokens=16, use_prefix_cache=False)
    ids = _ids(base)
    text = base.text
    assert base.stats.completion_tokens <= 16
    stopped = lm.generate(messages=CHAT, max_tokens=16, stop_token_ids=[ids[0]])
    assert stopped.run() == "" and stopped.stats.finish_reason == "stop"
    visible = [c for c in text if c.strip()]
    if len(visible) >= 3:
        marker = text[text.index(visible[2]):][:1]
        cut = lm.generate(messages=CHAT, max_tokens=16, stop=[marker])
        assert cut.run() == text[: text.index(marker)]
        assert cut.stats.finish_reason == "stop"
    short = lm.generate(messages=CHAT, max_tokens=3, stop_token_ids=[])
    short.run()
    assert short.stats.completion_tokens <= 3


def test_sampling_is_reproducible_with_a_seed(lm):
    from agent.runtime import SamplingParams

    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=11)
    a = lm.generate(messages=CHAT, max_tokens=10, sampling=p).run()
    b = lm.generate(messages=CHAT, max_tokens=10, sampling=p).run()
    assert a == b


def test_cancel_stops_generation_between_tokens(lm):
    cancel = threading.Event()
    gen = lm.generate(messages=CHAT, max_tokens=200, cancel=cancel, stop_token_ids=[], use_prefix_cache=False)
    it = iter(gen)
    next(it)
    cancel.set()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    assert gen.stats.completion_tokens < 5
    assert lm._lock.acquire(blocking=False)  # the session is free again
    lm._lock.release()


def test_bad_prompts_raise_input_errors(lm):
    with pytest.raises(InputError, match="context is 256 tokens") as info:
        lm.generate("hello " * 400)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InputError):
        lm.generate([], max_tokens=3)
    with pytest.raises(InputError):
        lm.generate("hi", max_tokens=0)
    with pytest.raises(WrongTask):
        lm.embed(["x"])


def test_ep_fallback_goes_to_cpu_and_says_why(tmp_path, keypair, trusted):
    onnx_dir = export_lm(tiny_model("llama"), "tiny-llama-lm")
    seal_lm_bundle(onnx_dir, tmp_path, keypair[0], runtime=Runtime(execution_providers=[
        ExecutionProvider(name="QNNExecutionProvider", options={"backend_type": "htp"}),
        ExecutionProvider(name="CPUExecutionProvider")]))
    model = load_model(open_bundle(tmp_path, trusted), threads=1)
    assert model.execution_provider == "CPUExecutionProvider"
    assert model.threads == 1
    assert any(note.startswith("QNNExecutionProvider") for note in model.provider_notes)
    model.close()


def test_golden_smoke_test_passes_and_catches_wrong_outputs(tmp_path, keypair, trusted):
    make_bundle(tmp_path / "good", keypair[0])
    make_bundle(tmp_path / "bad", keypair[0], golden_scale=2.0)
    good = load_model(open_bundle(tmp_path / "good", trusted)).run_golden()
    assert good.ok and good.max_abs_diff < 1e-4 and good.latency_ms > 0
    bad = load_model(open_bundle(tmp_path / "bad", trusted)).run_golden()
    assert not bad.ok and "max abs diff" in bad.reason


def test_raw_embedding_bundle_takes_vectors(tmp_path, keypair, trusted):
    make_bundle(tmp_path, keypair[0])
    model = load_model(open_bundle(tmp_path, trusted))
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    out = model.embed(x.tolist())
    assert out.shape == (3, 8)
    with pytest.raises(InputError, match="length 8"):
        model.embed([[1.0, 2.0]])


def _torch_bert(texts, *, num_labels=None):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    src = tiny_model("bert", num_labels=num_labels)
    tok = AutoTokenizer.from_pretrained(src)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        if num_labels:
            return torch.softmax(AutoModelForSequenceClassification.from_pretrained(src).eval()(**batch).logits,
                                 -1).numpy()
        h = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()


TEXTS = ["the capital of france is paris", "edge", "the edge of france"] * 15  # > one batch of 32


def test_embeddings_match_pytorch_in_batches(tmp_path, keypair, trusted):
    make_encoder_bundle(tmp_path, keypair[0])
    model = load_model(open_bundle(tmp_path, trusted))
    got = model.embed(TEXTS)
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, _torch_bert(TEXTS), atol=1e-4)
    with pytest.raises(WrongTask):
        model.generate("hi")


def test_classification_matches_pytorch(tmp_path, keypair, trusted):
    make_encoder_bundle(tmp_path, keypair[0], num_labels=3)
    model = load_model(open_bundle(tmp_path, trusted))
    got = model.classify(TEXTS[:3])
    ref = _torch_bert(TEXTS[:3], num_labels=3)
    for row, probs in zip(got, ref):
        assert row["label"] == f"label-{int(np.argmax(probs))}"
        np.testing.assert_allclose([row["scores"][f"label-{i}"] for i in range(3)], probs, atol=1e-4)


def test_model_host_swaps_at_once_and_drains_the_old_model(tmp_path, keypair, trusted):
    make_bundle(tmp_path / "a", keypair[0], name="a")
    make_bundle(tmp_path / "b", keypair[0], name="b", seed=1)
    a, b = (load_model(open_bundle(tmp_path / n, trusted)) for n in "ab")
    host = ModelHost(a)
    holding, release = threading.Event(), threading.Event()

    def busy():
        with host.acquire() as m:
            assert m is a
            holding.set()
            release.wait(5)

    t = threading.Thread(target=busy)
    t.start()
    holding.wait(5)
    old = host.swap(b)
    assert old is a and host.current is b and host.in_flight(a) == 1
    with host.acquire() as m:
        assert m is b
    assert host.drain(a, timeout=0.1) is False  # still busy: cut after the timeout
    release.set()
    t.join()
    assert a.closed and host.in_flight(a) == 0
    assert host.drain(b, timeout=1) is True and b.closed


def test_stats_snapshot_and_window():
    host = ModelHost()
    t0 = time.time()
    for ms in (10, 20, 30, 40, 1000):
        host.stats.record(ms, ok=True, prefill_tokens=100, prefill_s=0.5, decode_tokens=10, decode_s=1.0)
    host.stats.record(5, ok=False)
    host.stats.rejected()
    snap = host.stats.snapshot_and_reset()
    assert (snap.requests, snap.errors) == (7, 2)
    assert snap.p50_ms == 30 and snap.p95_ms == 1000
    assert snap.prefill_tok_s == pytest.approx(200) and snap.decode_tok_s == pytest.approx(10)
    assert host.stats.snapshot_and_reset().requests == 0
    requests, errors, p95 = host.stats.window(t0)
    assert (requests, errors, p95) == (7, 2, 1000)
    assert host.stats.window(time.time() + 1) == (0, 0, None)


def test_importing_the_agent_runtime_and_api_pulls_no_torch_and_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, agent.runtime, agent.api; from agent.runtime import load_model; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'fastapi', 'llguidance',"
            " 'onnxruntime', 'numpy')]; "  # onnxruntime, numpy, llguidance only once a model loads: small idle RSS
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
