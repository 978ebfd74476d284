"""Does the model still answer? What the systemd watchdog pings are made of.

A live main loop proves little: onnxruntime can wedge inside a run (a driver hang, a deadlock in
an execution provider) while the loop happily ticks. So WATCHDOG=1 is sent only while inference
is proven to answer: a request finished successfully in the last `max_silence_s`, or the probe
(one tiny inference through the same admission queue as requests, every `interval_s` while no
request proved it) did. A wedged runtime holds its admission slot forever, so neither happens,
the pings stop, and systemd restarts the agent after WatchdogSec.

`answers()` is the pure decision; `InferenceProbe` is the thread that feeds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.bundle.manifest import Task

if TYPE_CHECKING:  # agent/config.py imports the policy; the runtime (onnxruntime) loads only with the service
    from agent.runtime import ModelHost
    from agent.runtime.model import LoadedModel

log = logging.getLogger("edgeship.agent.liveness")


@dataclass(frozen=True)
class LivenessPolicy:
    """How often to probe and how long inference may go without a proven answer."""

    interval_s: float = 10.0
    max_silence_s: float = 150.0  # > api.request_timeout_s (120): one long request may hold the only slot

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.max_silence_s:
            raise ValueError(f"probe_interval_s={self.interval_s} must be > 0 and below max_silence_s="
                             f"{self.max_silence_s} (a probe needs a chance to answer); raise max_silence_s")


def answers(*, now: float, last_answer: float, model_loaded: bool, policy: LivenessPolicy) -> bool:
    """True while the runtime is proven to answer (monotonic seconds). No model: nothing can wedge."""
    return not model_loaded or now - last_answer <= policy.max_silence_s


def tiny_inference(model: LoadedModel) -> None:
    """The smallest real inference for the model's task: one generated token, or one short input."""
    if model.task == Task.TEXT_GENERATION:
        model.generate("ok", max_tokens=1, use_prefix_cache=False).run()
        return
    if getattr(model, "raw", False):  # a bundle without a tokenizer takes numeric vectors
        width = model.session.get_inputs()[0].shape[-1]
        inputs: list = [[0.0] * (width if isinstance(width, int) else 1)]
    else:
        inputs = ["ok"]
    (model.embed if model.task == Task.EMBEDDING else model.classify)(inputs)


class InferenceProbe:
    """Runs `tiny_inference` every `interval_s` unless a request answered more recently."""

    def __init__(self, host: ModelHost, *, admit: Callable[[float], AbstractContextManager],
                 policy: LivenessPolicy = LivenessPolicy(), run: Callable[[LoadedModel], None] = tiny_inference,
                 clock: Callable[[], float] = time.monotonic):
        self.host = host
        self.admit = admit  # deadline (monotonic) -> the API's admission slot, so the probe never races a request
        self.policy = policy
        self.run = run
        self.clock = clock
        self._last_probe = clock()  # a model just loaded is given one max_silence_s to answer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last_answer(self) -> float:
        return max(self._last_probe, self.host.stats.last_ok_monotonic)

    def answers(self) -> bool:
        return answers(now=self.clock(), last_answer=self.last_answer, model_loaded=self.host.current is not None,
                       policy=self.policy)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # a probe stuck in a wedged runtime cannot be joined; it is a daemon thread and dies with us
        self._stop.set()

    def probe_once(self) -> bool:
        """One probe unless a request answered within `interval_s`; True if inference answered."""
        now = self.clock()
        if now - self.last_answer < self.policy.interval_s or self.host.current is None:
            return True
        try:
            with self.admit(now + self.policy.interval_s), self.host.acquire() as model:
                self.run(model)
        except Exception as exc:  # busy, swapped out, or failing: not an answer; the deadline decides
            log.debug("inference probe got no answer: %s", exc)
            return False
        self._last_probe = self.clock()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            self.probe_once()
