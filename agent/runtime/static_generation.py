"""The host side of a static-shape decoder (NPU bundles, `model.config.kv_layout == "static"`).

The graph (exporter/npu_lm.py) takes a fixed number S of new tokens and a fixed C-slot KV cache,
and returns logits plus the keys/values of the S new tokens only. This module owns the cache: it
pads each chunk to S, builds the additive attention bias (cache slots filled so far, causal among
the new tokens), and writes the new rows into the cache after the call.

    lm = StaticDecoder(session.run, step=32, cache=256, num_layers=.., kv_heads=.., head_dim=..,
                       decode=StaticGraph(decode_session.run, step=1))
    logits = lm.forward(prompt_ids)        # [len(prompt), vocab], 32 tokens per call
    next_logits = lm.forward([token])      # decode one token: a call of the step-1 graph

A bundle may carry a second graph for decoding (`model.config.decode_entry`, step
`decode_step_length`): the same weights and quantization at a shorter step, so a decode token does
not pay for a 32-token call. Chunks of at most that many tokens go to it; both read and fill the
one host cache.

`StaticTextGenerationModel` serves such a bundle through the agent's usual generation loop
(sampling, stop strings, streaming, prefix cache): only the model step differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.runtime.errors import Cancelled, InputError, LoadError
from agent.runtime.generation import TextGenerationModel

# exp(-100) is 0 for softmax, and unlike float32's minimum it leaves a 16-bit activation scale fine
# enough for the real scores (the exporter calibrates with this value)
MASK_VALUE = -100.0

Runner = Callable[[list[str] | None, dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class StaticGraph:
    """A second static graph over the same cache (the decode graph): how to run it and its step length."""

    run: Runner
    step: int
    output_names: Sequence[str] | None = None


class StaticDecoder:
    """Runs a static-shape decoder over a host-side KV cache, S tokens per call."""

    def __init__(self, run: Runner, *, step: int, cache: int, num_layers: int, kv_heads: int, head_dim: int,
                 output_names: Sequence[str] | None = None, mask_value: float = MASK_VALUE,
                 on_feed: Callable[[dict[str, np.ndarray]], None] | None = None, decode: StaticGraph | None = None):
        if decode is not None and not 0 < decode.step < step:
            raise ValueError(f"a decode graph's step {decode.step} must be shorter than the step {step}")
        self._run = run
        self.step, self.cache, self.num_layers = step, cache, num_layers
        self.decode = decode
        self.calls = {step: 0} | ({decode.step: 0} if decode else {})  # calls made per graph (step length)
        self._mask_value = np.float32(mask_value)
        self._on_feed = on_feed  # sees every feed (the exporter records calibration feeds with it)
        self.output_names = list(output_names) if output_names else _output_names(num_layers)
        self._decode_names = list(decode.output_names) if decode and decode.output_names else _output_names(num_layers)
        shape = (1, kv_heads, cache, head_dim)
        self._kv = {f"past_key_values.{i}.{n}": np.zeros(shape, np.float32)
                    for i in range(num_layers) for n in ("key", "value")}
        self.length = 0

    def reset(self) -> None:
        """Forget the cache (its slots are masked, so zeroing them is not needed)."""
        self.length = 0

    def load(self, past: Sequence[np.ndarray]) -> None:
        """Start from `past` (past_key_values.* order, [1, kv_heads, n, head_dim] each), e.g. a cached prefix."""
        n = past[0].shape[2] if past else 0
        if n > self.cache:
            raise InputError(f"a cached prefix of {n} tokens exceeds the model's {self.cache}-token cache")
        for array, value in zip(self._kv.values(), past):
            array[:, :, :n] = value
        self.length = n

    def cached(self, name: str) -> np.ndarray:
        """A copy of the filled part of one cache tensor (past_key_values.{i}.key/value)."""
        return self._kv[name][:, :, : self.length].copy()

    def feed(self, tokens: Sequence[int], *, step: int | None = None) -> dict[str, np.ndarray]:
        """The inputs of the graph of `step` (default: the prefill step) for up to `step` new tokens."""
        n, step = len(tokens), step or self.step
        if not 0 < n <= step:
            raise InputError(f"a static step takes 1..{step} tokens, got {n}")
        if self.length + n > self.cache:
            raise InputError(f"context of {self.length + n} tokens exceeds the model's {self.cache}-token cache")
        ids = np.zeros((1, step), np.int32)
        ids[0, :n] = tokens
        # padding rows sit at the next positions (in the rotary table) and are never written back
        pos = np.minimum(np.arange(self.length, self.length + step), self.cache + step - 1)
        bias = np.full((1, 1, step, self.cache + step), self._mask_value, np.float32)
        bias[0, 0, :, : self.length] = 0.0
        new = np.tril(np.ones((step, step), bool))
        new[n:, :] = False
        new[n:, n:] = np.eye(step - n, dtype=bool)  # padding rows see themselves: a harmless softmax
        bias[0, 0, :, self.cache:][new] = 0.0
        return {"input_ids": ids, "position_ids": pos[None, :].astype(np.int32), "attention_bias": bias, **self._kv}

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] for `tokens` after the cache; their keys/values join the cache."""
        rows = []
        for start in range(0, len(tokens), self.step):
            chunk = list(tokens[start : start + self.step])
            short = self.decode is not None and len(chunk) <= self.decode.step
            step = self.decode.step if short else self.step
            feed = self.feed(chunk, step=step)
            if self._on_feed is not None:
                self._on_feed(feed)
            run, names = (self.decode.run, self._decode_names) if short else (self._run, self.output_names)
            out = dict(zip(names, run(None, feed)))
            self.calls[step] += 1
            n = len(chunk)
            for i in range(self.num_layers):
                for kind in ("key", "value"):
                    self._kv[f"past_key_values.{i}.{kind}"][:, :, self.length : self.length + n] = \
                        out[f"present.{i}.{kind}"][:, :, :n]
            self.length += n
            rows.append(out["logits"][0, :n])
        return np.concatenate(rows).astype(np.float32)

    def greedy(self, prompt: Sequence[int], steps: int) -> np.ndarray:
        """`steps` greedy tokens after `prompt`, from an empty cache."""
        self.reset()
        logits = self.forward(list(prompt))
        out: list[int] = []
        for _ in range(steps):
            out.append(int(np.argmax(logits[-1])))
            if len(out) < steps:
                logits = self.forward(out[-1:])
        return np.array(out, np.int64)


def _output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _CacheView:
    """Stands for one present.* output in TextGenerationModel's loop; the data lives in the host cache."""

    def __init__(self, decoder: StaticDecoder, name: str):
        self._decoder, self._name = decoder, name

    def numpy(self) -> np.ndarray:
        return self._decoder.cached(self._name)


class StaticTextGenerationModel(TextGenerationModel):
    """A static-layout LM bundle (NPU): the generation loop of TextGenerationModel over a StaticDecoder."""

    REQUIRED_INPUTS = ("input_ids", "position_ids", "attention_bias")

    def __init__(self, bundle, choice, **kwargs) -> None:
        super().__init__(bundle, choice, **kwargs)
        cfg = self.manifest.model.config
        try:
            step, cache = int(cfg["step_length"]), int(cfg["cache_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{self.ref}: a static LM bundle needs step_length and cache_length in model.config ({exc})") from None
        self.max_context = min(self.max_context, cache)
        self.decode_session = self._decode_session(bundle, choice, step=step, cache=cache)
        decode = None if self.decode_session is None else StaticGraph(
            self._decode_run, int(cfg["decode_step_length"]), [o.name for o in self.decode_session.get_outputs()])
        self.decoder = StaticDecoder(self._session_run, step=step, cache=cache, num_layers=self.num_layers,
                                     kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                     output_names=self.output_names,
                                     mask_value=float(cfg.get("mask_value", MASK_VALUE)), decode=decode)

    def _decode_session(self, bundle, choice, *, step: int, cache: int):
        """The session of the decode graph (model.config.decode_entry), checked against the prefill graph;
        None for a bundle with one graph."""
        from agent.runtime.session import graph_session

        cfg = self.manifest.model.config
        entry = cfg.get("decode_entry")
        if not entry:
            return None
        try:
            d = int(cfg["decode_step_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{self.ref}: decode_entry needs decode_step_length in model.config ({exc})") from None
        if not 0 < d < step:
            raise LoadError(f"{self.ref}: decode_step_length {d} must be between 1 and the step length {step - 1}")
        session = graph_session(bundle, choice, str(entry), context=cfg.get("decode_ep_context"))
        want = {"input_ids": [1, d], "attention_bias": [1, 1, d, cache + d]}
        want |= {n: list(i.shape) for n, i in ((i.name, i) for i in self.session.get_inputs()) if n in self.past_names}
        got = {i.name: list(i.shape) for i in session.get_inputs()}
        bad = [f"{n} {got.get(n)} (want {shape})" for n, shape in want.items() if got.get(n) != shape]
        if bad:
            raise LoadError(f"{self.ref}: decode graph {entry!r} does not fit decode_step_length {d} and the "
                            f"{cache}-slot cache: {', '.join(bad[:3])}; re-export the bundle")
        return session

    def _decode_run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.closed:
            raise Cancelled(f"model {self.ref} was closed (swapped out) during generation")
        return self.decode_session.run(names, feed)

    def close(self) -> None:
        super().close()
        self.decode_session = None

    def _session_run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.closed:
            raise Cancelled(f"model {self.ref} was closed (swapped out) during generation")
        return self.session.run(names, feed)

    def _step(self, binding, ids: list[int], past_len: int, past: list) -> tuple[np.ndarray, list]:
        """One step of TextGenerationModel's loop: `past` is a cached prefix (arrays) or this model's own views."""
        if not (past and isinstance(past[0], _CacheView)):  # a new generation
            self.decoder.load([np.asarray(p) for p in past])
        elif past_len < self.decoder.length:  # the next choice of n > 1 restarts after the shared prompt
            self.decoder.length = past_len
        if self.decoder.length != past_len:
            raise InputError(f"static cache holds {self.decoder.length} tokens, the step expects {past_len}")
        logits = self.decoder.forward(ids)
        return logits[-1], [_CacheView(self.decoder, name) for name in self.past_names]
