"""agent/liveness.py: the decision that gates WATCHDOG=1, and the probe's tiny inference on real
bundles of every task. (The wedged-runtime end of it runs in test_agent_service.py.)"""

from __future__ import annotations

import time

import pytest

from agent.api.admission import Admission
from agent.bundle import open_bundle
from agent.liveness import InferenceProbe, LivenessPolicy, answers, tiny_inference
from agent.runtime import ModelHost, load_model
from tests.support.bundles import make_bundle
from tests.support.lm_bundle import make_encoder_bundle

POLICY = LivenessPolicy(interval_s=10, max_silence_s=150)


@pytest.mark.parametrize("age, loaded, expected", [
    (0, True, True),
    (150, True, True),      # exactly max_silence_s: still proven
    (150.5, True, False),   # past it: the pings stop
    (10_000, False, True),  # no model: nothing can wedge
])
def test_answers_is_a_deadline_on_the_last_proven_answer(age, loaded, expected):
    assert answers(now=1000.0 + age, last_answer=1000.0, model_loaded=loaded, policy=POLICY) is expected


def test_a_policy_whose_probe_cannot_answer_in_time_is_refused():
    with pytest.raises(ValueError, match="probe_interval_s=10 must be > 0 and below max_silence_s=5"):
        LivenessPolicy(interval_s=10, max_silence_s=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory, keypair, trusted, lm):
    root = tmp_path_factory.mktemp("liveness")
    make_bundle(root / "raw", keypair[0])
    make_encoder_bundle(root / "emb", keypair[0])
    make_encoder_bundle(root / "cls", keypair[0], num_labels=3)
    loaded = {name: load_model(open_bundle(root / name, trusted)) for name in ("raw", "emb", "cls")}
    yield {"lm": lm, **loaded}
    for m in loaded.values():
        m.close()


@pytest.mark.parametrize("name", ["lm", "raw", "emb", "cls"])
def test_the_probe_inference_runs_on_every_task(models, name):
    tiny_inference(models[name])  # raises if the model cannot answer it


def test_the_probe_runs_only_when_no_request_answered_lately(models):
    host, runs = ModelHost(models["raw"]), []
    admission = Admission(slots=1, queue_size=1)
    now = [1000.0]
    probe = InferenceProbe(host, admit=lambda deadline: admission.enter(deadline=time.monotonic() + 0.2),
                           policy=LivenessPolicy(interval_s=10, max_silence_s=30),
                           run=lambda m: runs.append(tiny_inference(m)), clock=lambda: now[0])
    now[0] += 5
    assert probe.probe_once() and runs == []  # the load itself counts as an answer for interval_s
    now[0] += 10
    assert probe.probe_once() and len(runs) == 1 and probe.last_answer == now[0]
    host.stats.last_ok_monotonic = now[0] + 8  # a request answered
    now[0] += 9
    assert probe.probe_once() and len(runs) == 1  # no probe needed
    with admission.enter(deadline=time.monotonic() + 5):  # the only slot is held (a stuck request)
        now[0] += 20
        assert not probe.probe_once()
        now[0] += 10
        assert not probe.answers()  # 30 s past the last answer
