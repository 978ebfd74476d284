"""CPU detection and the pure text pieces of the runtime: streaming decode, stops, templates, sampling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import cpu_facts, usable_cpus
from agent.runtime.cpu import _cgroup_quota
from agent.runtime.errors import InputError
from agent.runtime.sampling import Sampler, SamplingParams
from agent.runtime.text import IncrementalDecoder, StopMatcher, TextCodec
from tests.support.models import tiny_model


def test_usable_cpus_is_affinity_bounded():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_is_read_from_the_process_cgroup(tmp_path: Path):
    own = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line[3:] for line in own if line.startswith("0::")), "/")
    d = tmp_path / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    (d / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None


def test_cpu_facts_come_from_proc_cpuinfo():
    facts = cpu_facts()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith(("flags", "features")):
            flags = set(line.split(":", 1)[1].split())
            break
    assert set(facts["flags"]) <= flags
    assert ("avx2" in facts["flags"]) == ("avx2" in flags)
    assert facts["cores_usable"] == usable_cpus()
    assert facts["arch"] == os.uname().machine


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.from_dir(tiny_model("llama"))


@pytest.mark.parametrize("text", ["héllo wörld", "edge 🚀 devices — 東京", "plain ascii text"])
def test_incremental_decoding_yields_whole_characters(codec: TextCodec, text: str):
    ids = codec.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(codec)
    parts = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == codec.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)


@pytest.mark.parametrize(("stops", "pieces", "expected", "stopped"), [
    (["END"], ["abc", "E", "N", "D", "tail"], "abc", True),
    (["END"], ["abc", "E", "x"], "abcEx", False),
    (["\n\n", "###"], ["one\n", "\ntwo"], "one", True),
    ([], ["a", "b"], "ab", False),
    (["stop"], ["nonstop"], "non", True),
])
def test_stop_strings_hold_back_only_what_could_match(stops, pieces, expected, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (expected, stopped)


def test_chat_template_renders_like_transformers(codec: TextCodec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    assert codec.render_chat(messages) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert codec.encode(codec.render_chat(messages), add_special_tokens=False) == \
        tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)


def test_chat_template_raise_exception_is_an_input_error():
    from agent.runtime.text import ChatTemplate

    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
                     {})
    with pytest.raises(InputError, match="first must be user"):
        t.render([{"role": "system", "content": "x"}])


def test_sampling_greedy_seeded_and_truncated():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(100).astype(np.float32)
    assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.0, top_k=1))(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))(logits) == int(np.argmax(logits))
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(5)]
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert a[0] == s(logits)
    draws = {Sampler(SamplingParams(temperature=1.5, seed=i))(logits) for i in range(50)}
    assert len(draws) > 5  # really samples
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {Sampler(SamplingParams(temperature=2.0, top_k=5, seed=i))(logits) for i in range(50)} <= top5


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_values_are_refused(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
