"""Choosing the next token from logits: penalties, then greedy or temperature / top-k / top-p sampling.

Also the log-probabilities a request may ask for (OpenAI's `logprobs` / `top_logprobs`): those of
the model's own distribution, before penalties, constraints, temperature and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.runtime.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: minus this once a token has appeared in the answer
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the answer

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InputError(f"{name} {getattr(self, name)} is out of range; use -2 to 2", param=name)
        if not 0.0 <= self.temperature <= 5.0:
            raise InputError(f"temperature {self.temperature} is out of range; use 0 (greedy) to 5",
                             param="temperature")
        if self.top_k < 0:
            raise InputError(f"top_k {self.top_k} is negative; use 0 (off) or a positive count", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p {self.top_p} is out of range; use a value in (0, 1]", param="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the `top` most likely tokens', as (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits, token: int, top: int) -> TokenLogprob:
    """Log-softmax of `logits` at `token`, plus the `top` best tokens (most likely first)."""
    import numpy as np

    x = logits.astype(np.float64)
    m = x.max()
    log_z = m + np.log(np.exp(x - m).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        idx = np.argpartition(-x, min(top, x.size) - 1)[:top]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        best = tuple((int(i), float(x[i] - log_z)) for i in idx)
    return TokenLogprob(int(token), float(x[token] - log_z), best)


@dataclass
class Sampler:
    """Samples one choice's tokens; `observe` each chosen token so the penalties can count it."""

    params: SamplingParams
    rng: Any = field(init=False)  # numpy Generator; numpy is imported only once a model runs
    counts: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        import numpy as np

        self.rng = np.random.default_rng(self.params.seed)

    def new_choice(self) -> None:
        """Forget the previous choice's tokens (the random stream goes on: choices differ, seeds repeat)."""
        self.counts = {}

    def observe(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1

    def penalized(self, logits):
        p = self.params
        if not self.counts or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return logits
        import numpy as np

        ids = np.fromiter(self.counts.keys(), np.int64, len(self.counts))
        n = np.fromiter(self.counts.values(), np.float32, len(self.counts))
        out = np.array(logits, np.float32)
        out[ids] -= n * p.frequency_penalty + p.presence_penalty
        return out

    def __call__(self, logits) -> int:
        """logits: 1-D float numpy array over the vocabulary (-inf where a constraint forbids)."""
        import numpy as np

        p = self.params
        logits = self.penalized(logits)
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p) + 1)]
            trimmed = np.zeros_like(probs)
            trimmed[keep] = probs[keep]
            probs = trimmed / trimmed.sum()
        return int(self.rng.choice(probs.size, p=probs))
