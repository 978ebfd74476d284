"""One request's answer, token by token, apart from the model that computes the logits.

`Decoding.step(logits)` samples the next token (penalties, constraint mask), detokenizes it, watches
the stop strings and the budget, and says which tokens the model must run next. The sequential
generator (agent/runtime/generation.py) and the batch scheduler (agent/runtime/batching.py) drive it
the same way, so an answer does not depend on which of them ran it:

    chunks, feed = decoding.step(logits)   # feed: tokens to run next, or None: this choice ended
    if feed is None and decoding.done: ...  # every choice ended
    if feed is None: decoding.next_choice(); logits = the prompt's logits again
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from agent.runtime.constraints import Compiled
from agent.runtime.sampling import Sampler, TokenLogprob, token_logprob
from agent.runtime.text import IncrementalDecoder, StopMatcher, TextCodec


@dataclass(frozen=True)
class Chunk:
    """One step of a stream: text to show (may be empty), the token, and why it ended (last chunk).

    `index` is the choice (n > 1 streams choice 0 to its end, then choice 1, ...); `logprob` is set
    when the request asked for logprobs.
    """

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    index: int = 0
    logprob: TokenLogprob | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefilled_tokens: int = 0  # prompt tokens the model really ran
    completion_tokens: int = 0
    forced_tokens: int = 0  # completion tokens a constraint forced, fed without a step of their own
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # the last choice's
    finish_reasons: list[str] = field(default_factory=list)  # per choice

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        steps = self.completion_tokens - 1  # the first token comes out of prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None


def stop_reason(cancel: threading.Event | None, deadline: float | None, now: float | None = None) -> str | None:
    """Why a generation must stop now (its `cancel` Event set, its time.monotonic() `deadline` passed), or None."""
    if cancel is not None and cancel.is_set():
        return "generation cancelled"
    if deadline is not None and (time.monotonic() if now is None else now) > deadline:
        return "generation ran past its deadline"
    return None


@dataclass(frozen=True)
class AnswerSpec:
    """What a request asks of its answer, besides the prompt."""

    budget: int  # new tokens per choice, already capped by the context
    sampler: Sampler
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    n: int = 1
    logprobs: int | None = None  # top alternatives per token (0..20); None: off
    constraint: Compiled | None = None


class Decoding:
    """The state of one request's choices; `step` is pure CPU work, no model call."""

    def __init__(self, spec: AnswerSpec, codec: TextCodec, stats: GenerationStats) -> None:
        self.spec = spec
        self.codec = codec
        self.stats = stats
        self.index = -1
        self.done = False
        self.next_choice()

    def next_choice(self) -> None:
        """Start the next choice (from the prompt's logits again)."""
        self.index += 1
        self.produced = 0
        self.spec.sampler.new_choice()
        self.mask = self.spec.constraint.start() if self.spec.constraint is not None else None
        self.decoder = IncrementalDecoder(self.codec)
        self.matcher = StopMatcher(list(self.spec.stop))

    def _take(self, token: int, lp: TokenLogprob | None) -> tuple[list[Chunk], str | None, bool]:
        """One token of the answer: (chunks to yield, finish reason or None, ended by a stop string)."""
        self.spec.sampler.observe(token)
        self.stats.completion_tokens += 1
        if token in self.spec.stop_ids:
            return [], "stop", False
        if self.mask is not None:
            self.mask.advance(token)
        text, stopped = self.matcher.feed(self.decoder.push(token))
        if stopped:
            return ([Chunk(text, token, index=self.index, logprob=lp)] if text or lp else []), "stop", True
        done = self.mask is not None and self.mask.done  # the grammar allows only the end now
        return [Chunk(text, token, index=self.index, logprob=lp)], ("stop" if done else None), False

    def step(self, logits) -> tuple[list[Chunk], list[int] | None]:
        """The next token(s) from `logits` (1-D, the last position): chunks to emit, and the tokens the
        model runs next, or None when this choice ended (its last chunk carries the finish reason)."""
        spec = self.spec
        token = spec.sampler(self.mask.apply(logits) if self.mask is not None else logits)
        self.produced += 1
        lp = token_logprob(logits, token, spec.logprobs) if spec.logprobs is not None else None
        chunks, end, by_string = self._take(token, lp)
        feed = [token]
        # text the grammar forces (a tool call's opening, a schema's next key) goes in with the next step
        # instead of one step per token; not with logprobs: those tokens have no logits
        if end is None and self.mask is not None and spec.logprobs is None:
            for forced in self.mask.forced()[: spec.budget - self.produced]:
                self.produced += 1
                self.stats.forced_tokens += 1
                more, end, by_string = self._take(forced, None)
                chunks += more
                feed.append(forced)
                if end is not None:
                    break
        if end is None and self.produced < spec.budget:
            return chunks, feed
        finish = end or "length"
        if not by_string:  # text held back for a possible stop string, or a last partial character
            tail, stopped = self.matcher.feed(self.decoder.flush())
            tail = tail if stopped else tail + self.matcher.flush()
            if tail:
                chunks.append(Chunk(tail, index=self.index))
        self.stats.finish_reason = finish
        self.stats.finish_reasons.append(finish)
        chunks.append(Chunk("", None, finish, index=self.index))
        self.done = self.index + 1 >= spec.n
        return chunks, None
