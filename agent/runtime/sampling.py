"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

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

    def __post_init__(self) -> None:
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


@dataclass
class Sampler:
    params: SamplingParams
    rng: Any = field(init=False)  # numpy Generator; numpy is imported only once a model runs

    def __post_init__(self) -> None:
        import numpy as np

        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits) -> int:
        """logits: 1-D float numpy array over the vocabulary."""
        import numpy as np

        p = self.params
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
