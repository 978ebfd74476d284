"""Text generation with a KV cache on optimum's decoder-with-past graph.

Prefill runs the prompt (minus any prefix the cache already holds) in one call; decode then feeds
one token at a time, handing each step's `present.*` OrtValues straight back as the next step's
`past_key_values.*` through IO binding, so the KV never round-trips through numpy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.runtime.constraints import Compiled, Vocabulary
from agent.runtime.errors import Cancelled, InputError, LoadError
from agent.runtime.model import LoadedModel
from agent.runtime.prefix_cache import PrefixCache
from agent.runtime.sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from agent.runtime.text import IncrementalDecoder, StopMatcher, TextCodec

MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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


@dataclass
class Generation:
    """An iterator of Chunks; `stats` fills in as it runs. close() (or `cancel`) stops it."""

    _chunks: Iterator[Chunk]
    stats: GenerationStats = field(default_factory=GenerationStats)
    texts: list[str] = field(default_factory=list)  # per choice
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when asked for

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

    def run(self) -> str:
        """Consume the whole stream and return the text."""
        for _ in self:
            pass
        return self.text


class TextGenerationModel(LoadedModel):
    REQUIRED_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")  # besides past_key_values.*

    def __init__(self, bundle, choice, *, prefix_cache_bytes: int = 256 << 20) -> None:
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
        self._keep_last = np.ones(1, np.int64) if "logits_to_keep" in inputs else None
        self.prefix_cache = PrefixCache(max_bytes=prefix_cache_bytes)
        self._mask = np.ones((1, self.max_context), np.int64)
        self._empty_kv = np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        self._lock = threading.Lock()  # one generation at a time per session (2 cores: no gain in more)
        # GroupQueryAttention graphs can read past and write present in one preallocated buffer per
        # layer (max_context long): no per-token concat or allocation of the KV cache.
        self.shared_kv = bool(cfg.get("past_present_share_buffer", False))
        self._kv_buffers: list[tuple[np.ndarray, Any]] | None = None
        self._vocab: Vocabulary | None = None
        self._vocab_lock = threading.Lock()

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
        gen = Generation(iter(()))
        stop_ids = set() if ignore_eos and constraint is None else set(self.eos_token_ids)
        gen._chunks = self._run(gen.stats, ids, max_tokens=max_tokens, sampler=Sampler(sampling or SamplingParams()),
                                stop=list(stop), stop_ids=stop_ids | set(stop_token_ids), cancel=cancel,
                                deadline=deadline, use_prefix_cache=use_prefix_cache, n=n, logprobs=logprobs,
                                constraint=constraint)
        gen.stats.prompt_tokens = len(ids)
        return gen

    def _run(self, stats: GenerationStats, ids: list[int], *, max_tokens: int, sampler: Sampler, stop: list[str],
             stop_ids: set[int], cancel: threading.Event | None, deadline: float | None,
             use_prefix_cache: bool, n: int = 1, logprobs: int | None = None,
             constraint: Compiled | None = None) -> Iterator[Chunk]:
        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise Cancelled("generation ran past its deadline")

        budget = min(max_tokens, self.max_context - len(ids))
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
                for (buf, _), part in zip(self._shared_buffers(len(ids) + budget), kv):
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
            for index in range(n):
                sampler.new_choice()
                mask = constraint.start() if constraint is not None else None
                logits, past, fed = prefill_logits, prefill_past, list(ids)
                decoder, matcher = IncrementalDecoder(self.codec), StopMatcher(stop)

                def take(token: int, lp: TokenLogprob | None) -> tuple[list[Chunk], str | None, bool]:
                    """One token of the answer: (chunks to yield, finish reason or None, ended by a stop string)."""
                    sampler.observe(token)
                    stats.completion_tokens += 1
                    if token in stop_ids:
                        return [], "stop", False
                    if mask is not None:
                        mask.advance(token)
                    text, stopped = matcher.feed(decoder.push(token))
                    if stopped:
                        return ([Chunk(text, token, index=index, logprob=lp)] if text or lp else []), "stop", True
                    done = mask is not None and mask.done  # the grammar allows only the end now
                    return [Chunk(text, token, index=index, logprob=lp)], ("stop" if done else None), False

                finish, by_string, produced = "length", False, 0
                while produced < budget:
                    token = sampler(mask.apply(logits) if mask is not None else logits)
                    produced += 1
                    lp = token_logprob(logits, token, logprobs) if logprobs is not None else None
                    chunks, end, by_string = take(token, lp)
                    yield from chunks
                    feed = [token]
                    # text the grammar forces (a tool call's opening, a schema's next key) goes in with the
                    # next step instead of one step per token; not with logprobs: those tokens have no logits
                    if end is None and mask is not None and logprobs is None:
                        for forced in mask.forced()[: budget - produced]:
                            produced += 1
                            stats.forced_tokens += 1
                            chunks, end, by_string = take(forced, None)
                            yield from chunks
                            feed.append(forced)
                            if end is not None:
                                break
                    if end is not None:
                        finish = end
                        break
                    if produced >= budget:
                        break
                    check()
                    logits, past = step(feed, len(fed), past)
                    fed.extend(feed)
                    stats.decode_s = time.perf_counter() - t_decode
                if not by_string:  # text held back for a possible stop string, or a last partial character
                    tail, stopped = matcher.feed(decoder.flush())
                    tail = tail if stopped else tail + matcher.flush()
                    if tail:
                        yield Chunk(tail, index=index)
                stats.finish_reason = finish
                stats.finish_reasons.append(finish)
                yield Chunk("", None, finish, index=index)
                if index + 1 < n:
                    check()
        finally:
            self._lock.release()
            if use_prefix_cache and fed:
                if self.shared_kv:
                    kv_out = tuple(buf[:, :, :len(fed)].copy() for buf, _ in self._shared_buffers())
                else:
                    kv_out = tuple(v.numpy() for v in past)
                self.prefix_cache.store(fed, kv_out)
