"""Text generation with a KV cache on optimum's decoder-with-past graph.

Prefill runs the prompt (minus any prefix the cache already holds) in one call; decode then feeds
one token at a time, handing each step's `present.*` OrtValues straight back as the next step's
`past_key_values.*` through IO binding, so the KV never round-trips through numpy.

Graphs that write the KV in place (GroupQueryAttention, `past_present_share_buffer`) are served by the
batch scheduler (agent/runtime/batching.py) when BatchPolicy.max_batch > 1: concurrent requests then
share each decode step. Other graphs, and max_batch 1, run one request at a time here. Both drive the
same per-request state (agent/runtime/decoding.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.runtime.batch_policy import SEQUENTIAL, BatchPolicy
from agent.runtime.constraints import Compiled, Vocabulary
from agent.runtime.decoding import (
    AnswerSpec,
    Chunk,
    Decoding,
    GenerationStats,
    stop_reason,
)
from agent.runtime.errors import Cancelled, InputError, LoadError
from agent.runtime.model import LoadedModel
from agent.runtime.prefix_cache import PrefixCache
from agent.runtime.sampling import Sampler, SamplingParams, TokenLogprob
from agent.runtime.text import TextCodec

__all__ = ["Chunk", "Generation", "GenerationStats", "TextGenerationModel"]

MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Generation:
    """An iterator of Chunks; `stats` fills in as it runs. close() (or `cancel`) stops it."""

    _chunks: Iterator[Chunk]
    stats: GenerationStats = field(default_factory=GenerationStats)
    texts: list[str] = field(default_factory=list)  # per choice
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when asked for
    on_close: Callable[[], None] | None = None  # tells the batch scheduler the answer is no longer read

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in self._chunks:
            while len(self.texts) <= chunk.index:
                self.texts.append("")
                self.logprobs.append([])
            self.texts[chunk.index] += chunk.text
            if chunk.logprob is not None:
                self.logprobs[chunk.index].append(chunk.logprob)
            yield chunk

    def close(self) -> None:
        self._chunks.close()
        if self.on_close is not None:
            self.on_close()

    def run(self) -> str:
        """Consume the whole stream and return the text."""
        for _ in self:
            pass
        return self.text


class TextGenerationModel(LoadedModel):
    REQUIRED_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")  # besides past_key_values.*

    def __init__(self, bundle, choice, *, prefix_cache_bytes: int | None = None,
                 batching: BatchPolicy = SEQUENTIAL) -> None:
        super().__init__(bundle, choice)
        cfg = self.manifest.model.config
        try:
            self.num_layers = int(cfg["num_layers"])
            self.max_context = int(cfg["max_context"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"{self.ref}: manifest model.config needs num_layers and max_context ({exc})") from None
        self.codec = TextCodec.from_dir(self.path)
        eos = cfg.get("eos_token_ids", [])
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        if not self.eos_token_ids and (tid := self.codec.token_id(self.codec.special("eos_token"))) is not None:
            self.eos_token_ids = frozenset([tid])
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in [*self.REQUIRED_INPUTS, *self.past_names] if n not in inputs]
        if missing:
            raise LoadError(f"{self.ref}: the LM graph lacks inputs {missing[:4]}; "
                            "re-export with the decoder-with-past layout (docs/ARCHITECTURE.md)")
        first = inputs[self.past_names[0]]
        self.kv_dtype = _DTYPES.get(first.type, np.float32)
        self.num_kv_heads = int(cfg.get("num_kv_heads") or first.shape[1])
        self.head_dim = int(cfg.get("head_dim") or first.shape[3])
        self.has_position_ids = "position_ids" in inputs
        # edgeship's own LM graphs take logits_to_keep (0: all positions); 1 skips the lm_head for every
        # prompt token but the last
        self.has_logits_to_keep = "logits_to_keep" in inputs
        self._keep_last = np.ones(1, np.int64) if self.has_logits_to_keep else None
        self.prefix_cache = PrefixCache(max_bytes=int(batching.prefix_cache_mb * 2**20) if prefix_cache_bytes is None
                                        else prefix_cache_bytes)
        self._mask = np.ones((1, self.max_context), np.int64)
        self._empty_kv = np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        self._lock = threading.Lock()  # one generation at a time per session (2 cores: no gain in more)
        # GroupQueryAttention graphs can read past and write present in one preallocated buffer per
        # layer (max_context long): no per-token concat or allocation of the KV cache.
        self.shared_kv = bool(cfg.get("past_present_share_buffer", False))
        self._kv_buffers: list[tuple[np.ndarray, Any]] | None = None
        self._vocab: Vocabulary | None = None
        self._vocab_lock = threading.Lock()
        self.batcher = None
        if self.shared_kv and batching.max_batch > 1:
            from agent.runtime.batching import BatchScheduler

            self.batcher = BatchScheduler(self, batching)

    @property
    def max_concurrency(self) -> int:
        """Requests this model runs at once (the API admits that many)."""
        return self.batcher.policy.max_batch if self.batcher is not None else 1

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        super().close()

    # ---- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat template rendered with a generation prompt (as transformers does)."""
        text = self.codec.render_chat(messages, add_generation_prompt=True, tools=tools)
        return self.codec.encode(text, add_special_tokens=False)

    def vocabulary(self) -> Vocabulary:
        """The tokenizer in the constraint library's form, built on first use (about a second)."""
        with self._vocab_lock:
            if self._vocab is None:
                tokenizer_json = (self.path / "tokenizer.json").read_text(encoding="utf-8")
                self._vocab = Vocabulary(tokenizer_json, eos_token_ids=self.eos_token_ids)
            return self._vocab

    def text_prompt(self, prompt: str) -> list[int]:
        return self.codec.encode(prompt, add_special_tokens=True)

    def check_prompt(self, ids: list[int], *, param: str = "prompt") -> None:
        if not ids:
            raise InputError("the prompt is empty; send at least one token of text", param=param)
        if len(ids) >= self.max_context:
            raise InputError(f"the prompt is {len(ids)} tokens; this model's context is {self.max_context} "
                             "tokens including the answer: shorten the prompt",
                             param=param, code="context_length_exceeded")

    # ---- the model ----------------------------------------------------------------------------

    def _bind_step_inputs(self, binding, ids: list[int], past_len: int) -> None:
        """Bind a step's inputs besides the KV cache: `ids` after `past_len` cached positions."""
        if self.closed:
            raise Cancelled(f"model {self.ref} was closed (swapped out) during generation")
        n = len(ids)
        binding.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        binding.bind_cpu_input("attention_mask", self._mask[:, : past_len + n])
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", np.arange(past_len, past_len + n, dtype=np.int64)[None])
        if self._keep_last is not None:
            binding.bind_cpu_input("logits_to_keep", self._keep_last)

    def _step(self, binding, ids: list[int], past_len: int, past: list) -> tuple[np.ndarray, list]:
        """Run `ids` after `past_len` cached positions; return last-position logits and the new KV."""
        import onnxruntime as ort

        self._bind_step_inputs(binding, ids, past_len)
        for name, value in zip(self.past_names, past):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        binding.clear_binding_outputs()
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        logits = outs[0].numpy()[0, -1]
        return logits, outs[1:]

    def _shared_buffers(self, need: int | None = None) -> list[tuple[np.ndarray, Any]]:
        """The per-layer KV buffers, at least `need` positions long.

        They grow with use (in steps of 256 positions, at least doubling) up to max_context, instead
        of being allocated max_context long up front: a 32k-context Qwen2.5-0.5B would take 805 MB
        of KV for a 200-token chat. Generations copy their cached prefix in, so growing needs no copy.
        """
        import onnxruntime as ort

        have = 0 if self._kv_buffers is None else self._kv_buffers[0][0].shape[2]
        if self._kv_buffers is None or (need is not None and need > have):
            want = max(need or 0, 2 * have, 256)
            length = min(self.max_context, -(-want // 256) * 256)
            shape = (1, self.num_kv_heads, length, self.head_dim)
            self._kv_buffers = None  # drop the old ones before allocating the new
            arrays = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
            self._kv_buffers = [(a, ort.OrtValue.ortvalue_from_numpy(a)) for a in arrays]
        return self._kv_buffers

    def _step_shared(self, binding, ids: list[int], past_len: int) -> np.ndarray:
        """_step for shared-buffer graphs: the KV stays in self._kv_buffers, written in place."""
        self._bind_step_inputs(binding, ids, past_len)
        binding.clear_binding_outputs()
        binding.bind_output("logits", "cpu")
        for past, present, (_, value) in zip(self.past_names, self.present_names, self._shared_buffers()):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0, -1]

    def generate(self, prompt: str | list[int] | None = None, *, messages: list[dict[str, Any]] | None = None,
                 max_tokens: int = 256, sampling: SamplingParams | None = None, stop: list[str] | tuple = (),
                 stop_token_ids: list[int] | tuple = (), cancel: threading.Event | None = None,
                 deadline: float | None = None, use_prefix_cache: bool = True,
                 ignore_eos: bool = False, n: int = 1, logprobs: int | None = None,
                 constraint: Compiled | None = None, tools: list[dict[str, Any]] | None = None) -> Generation:
        """Stream a completion of `prompt` (text or token ids) or of chat `messages`.

        Prompt problems raise InputError here, before anything runs. The returned Generation runs
        lazily; `cancel` (an Event) or `deadline` (time.monotonic()) stop it with Cancelled.
        `n` choices share one prefill; `logprobs` (0..20 alternatives, None: off) adds each token's
        log-probability; `constraint` (compile_constraint) masks every step to its grammar; `tools`
        reach the chat template.
        """
        if self.closed:
            raise LoadError(f"model {self.ref} is closed")
        if not 1 <= n <= MAX_CHOICES:
            raise InputError(f"n {n} is out of range; use 1 to {MAX_CHOICES}", param="n")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs {logprobs} is out of range; use 0 to {MAX_TOP_LOGPROBS}",
                             param="top_logprobs")
        if messages is not None:
            ids, param = self.chat_prompt(messages, tools=tools), "messages"
        elif isinstance(prompt, str):
            ids, param = self.text_prompt(prompt), "prompt"
        elif prompt is not None:
            ids, param = [int(t) for t in prompt], "prompt"
        else:
            raise InputError("give a prompt or messages", param="prompt")
        self.check_prompt(ids, param=param)
        if max_tokens < 1:
            raise InputError(f"max_tokens {max_tokens} must be at least 1", param="max_tokens")
        stats = GenerationStats(prompt_tokens=len(ids))
        stop_ids = set() if ignore_eos and constraint is None else set(self.eos_token_ids)
        budget = min(max_tokens, self.max_context - len(ids))
        if self.batcher is not None:
            alone = self.batcher.max_tokens_alone
            if len(ids) >= alone:
                raise InputError(f"the prompt is {len(ids)} tokens; this agent's KV memory holds {alone} tokens "
                                 "per request (runtime.kv_cache_mb): shorten the prompt or raise kv_cache_mb",
                                 param=param, code="context_length_exceeded")
            budget = min(budget, alone - len(ids))
        spec = AnswerSpec(budget=budget, sampler=Sampler(sampling or SamplingParams()), stop=tuple(stop),
                          stop_ids=frozenset(stop_ids | set(stop_token_ids)), n=n, logprobs=logprobs,
                          constraint=constraint)
        if self.batcher is not None:
            return self.batcher.submit(ids, spec, stats, cancel=cancel, deadline=deadline,
                                       use_prefix_cache=use_prefix_cache)
        gen = Generation(self._run(stats, ids, spec, cancel=cancel, deadline=deadline,
                                   use_prefix_cache=use_prefix_cache), stats)
        return gen

    def _run(self, stats: GenerationStats, ids: list[int], spec: AnswerSpec, *, cancel: threading.Event | None,
             deadline: float | None, use_prefix_cache: bool) -> Iterator[Chunk]:
        def check() -> None:
            if (why := stop_reason(cancel, deadline)) is not None:
                raise Cancelled(why)

        while not self._lock.acquire(timeout=0.05):
            check()
        past: list = []
        fed: list[int] = []
        try:
            check()
            binding = self.session.io_binding()
            cached, kv = (self.prefix_cache.lookup(ids, limit=len(ids) - 1) if use_prefix_cache else (0, None))
            if kv is None:
                cached, kv = 0, (self._empty_kv,) * len(self.past_names)
            stats.cached_tokens, stats.prefilled_tokens = cached, len(ids) - cached
            if self.shared_kv:
                for (buf, _), part in zip(self._shared_buffers(len(ids) + spec.budget), kv):
                    buf[:, :, :cached] = part
                step = lambda new, past_len, _past: (self._step_shared(binding, new, past_len), None)  # noqa: E731
            else:
                step = lambda new, past_len, past_kv: self._step(binding, new, past_len, past_kv)  # noqa: E731
            t0 = time.perf_counter()
            prefill_logits, prefill_past = step(ids[cached:], cached, list(kv))
            fed = list(ids)
            stats.prefill_s = time.perf_counter() - t0
            t_decode = time.perf_counter()
            # every choice decodes from the one prefill: its KV stays valid (positions past the prompt are
            # overwritten, or new outputs are allocated, by the next choice's steps)
            decoding = Decoding(spec, self.codec, stats)
            logits, past = prefill_logits, prefill_past
            while True:
                chunks, feed = decoding.step(logits)
                yield from chunks
                if feed is None:
                    if decoding.done:
                        break
                    check()
                    decoding.next_choice()
                    logits, past, fed = prefill_logits, prefill_past, list(ids)
                    continue
                check()
                logits, past = step(feed, len(fed), past)
                fed.extend(feed)
                stats.decode_s = time.perf_counter() - t_decode
        finally:
            self._lock.release()
            if use_prefix_cache and fed:
                if self.shared_kv:
                    kv_out = tuple(buf[:, :, :len(fed)].copy() for buf, _ in self._shared_buffers())
                else:
                    kv_out = tuple(v.numpy() for v in past)
                self.prefix_cache.store(fed, kv_out)
