"""GroupQueryAttention graphs (what onnxruntime-genai's builder emits): the runtime runs them with
the KV cache concatenated by the graph, or written in place in one preallocated buffer per layer
(config.past_present_share_buffer); both give the same tokens, with and without the prefix cache."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle import TrustedKeys, open_bundle
from agent.runtime import load_model
from tests.support.lm_bundle import make_gqa_lm_bundle


@pytest.fixture(scope="module")
def models(tmp_path_factory, keypair):
    trusted = TrustedKeys.from_paths([keypair[1]])
    out = {}
    for shared in (False, True):
        d = tmp_path_factory.mktemp(f"gqa-{shared}")
        make_gqa_lm_bundle(d, keypair[0], shared_kv=shared)
        out[shared] = load_model(open_bundle(d, trusted))
    return out


PROMPT = [5, 17, 42, 99, 7, 300, 12, 64, 250, 3, 77, 18]


def _ids(gen):
    return [c.token_id for c in gen if c.token_id is not None]


def test_first_token_matches_a_plain_session_run(models):
    model = models[False]
    feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, len(PROMPT)), np.int64),
             "past_key_values.0.key": np.zeros((1, 2, 0, 16), np.float32),
             "past_key_values.0.value": np.zeros((1, 2, 0, 16), np.float32)}
    session = ort.InferenceSession(str(model.path / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = int(np.argmax(session.run(["logits"], feeds)[0][0, -1]))
    assert _ids(model.generate(PROMPT, max_tokens=1, ignore_eos=True, use_prefix_cache=False)) == [expected]


def test_shared_buffer_gives_the_same_tokens_as_concat(models):
    concat = _ids(models[False].generate(PROMPT, max_tokens=40, ignore_eos=True, use_prefix_cache=False))
    shared = _ids(models[True].generate(PROMPT, max_tokens=40, ignore_eos=True, use_prefix_cache=False))
    assert len(concat) == 40 and shared == concat
    assert models[True].shared_kv and not models[False].shared_kv


@pytest.mark.parametrize("shared", [False, True])
def test_prefix_cache_continuation_on_gqa(models, shared):
    model = models[shared]
    model.prefix_cache.clear()
    model.generate(PROMPT[:8], max_tokens=3, ignore_eos=True).run()
    warm = model.generate(PROMPT, max_tokens=20, ignore_eos=True)
    warm_ids = _ids(warm)
    assert warm.stats.cached_tokens >= 8
    cold = _ids(model.generate(PROMPT, max_tokens=20, ignore_eos=True, use_prefix_cache=False))
    assert warm_ids == cold
