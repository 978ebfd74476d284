"""Token-level constraints on decoding, with llguidance: a JSON schema, any JSON object, a regex, a grammar.

    spec = ConstraintSpec(kind="json_schema", source={...}, param="response_format.json_schema.schema")
    compiled = compile_constraint(spec, model.vocabulary(), timeout_s=30)   # ConstraintError: a 400
    mask = compiled.start()                # one per choice
    logits = mask.apply(logits)            # disallowed tokens -> -inf; ConstraintError if none is left
    mask.advance(token)                    # after sampling; mask.done once the grammar is complete

llguidance was chosen over xgrammar: xgrammar's wheel requires torch, transformers and triton (the agent
install is torch-free), while llguidance has no Python dependency and reads the bundle's tokenizer.json
as is. Its Earley parser computes masks lazily, so there is no per-schema precompilation to wait for.

Errors: ConstraintError(InputError, agent/runtime/errors.py) — code `invalid_constraint` (does not
compile, too large, too slow to compile) or `constraint_unsatisfiable` (no token can continue); `.param` names the request field.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from agent.runtime.errors import ConstraintError

Kind = Literal["json_schema", "json_object", "regex", "grammar", "lark"]


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request constrains its answer to. `source`: a schema (dict) or the regex / grammar text."""

    kind: Kind
    source: Any = None
    param: str = "response_format"
    strict: bool = True  # json_schema: refuse keywords llguidance cannot enforce (else ignore them)

    def __post_init__(self) -> None:
        if self.kind == "json_schema" and not isinstance(self.source, (dict, bool)):
            raise ConstraintError(f"{self.param} must be a JSON schema object", param=self.param)
        if self.kind in ("regex", "grammar", "lark") and not (isinstance(self.source, str) and self.source):
            raise ConstraintError(f"{self.param} must be a non-empty string", param=self.param)

    def grammar(self) -> str:
        """The llguidance grammar text (not yet checked)."""
        import llguidance

        options = {"whitespace_flexible": False, "lenient": not self.strict}
        try:
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(self.source), overrides=options)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.source)
            if self.kind == "lark":
                return llguidance.LLMatcher.grammar_from_lark(self.source)
            return llguidance.grammar_from("grammar", self.source)  # Lark, or llama.cpp's GBNF
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"{self.param} does not compile: {_first_line(exc)}", param=self.param) from None


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [""])[0][:300]


class Vocabulary:
    """The bundle's tokenizer in llguidance's form (building it takes about a second: once per model)."""

    def __init__(self, tokenizer_json: str, *, eos_token_ids: frozenset[int]) -> None:
        import llguidance

        eos = sorted(eos_token_ids)
        # slices=[]: without the slicer's precomputed token subsets the tokenizer takes 33 MB, not 51 MB, on
        # SmolLM2's 49k vocabulary, and a mask 0.2 ms instead of 0.04-0.4 ms: nothing next to a decode step
        self.tokenizer = llguidance.LLTokenizer(_plain_byte_level(tokenizer_json), eos_token=eos or None, slices=[])
        self.size = self.tokenizer.vocab_size


def _plain_byte_level(tokenizer_json: str) -> str:
    """The tokenizer with a plain ByteLevel decoder where it is byte-level BPE behind a decoder Sequence.

    transformers' GGUF conversion writes decoders [ByteFallback, Fuse, Replace, ByteLevel]; llguidance
    then reads tokens as text ("Ċ" instead of a newline). On a ByteLevel-pretokenized vocabulary the
    other three never apply, so the plain decoder gives every token the same bytes.
    """
    data = json.loads(tokenizer_json)
    decoder, pre = data.get("decoder") or {}, data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and decoder.get("type") == "Sequence":
        inner = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if inner:
            data["decoder"] = inner[0]
            return json.dumps(data)
    return tokenizer_json


@lru_cache(maxsize=1)
def _limits():
    import llguidance

    # llguidance's defaults, with a grammar-size cap fit for a device: a bigger schema is a 400, not minutes
    return llguidance.LLParserLimits(max_grammar_size=100_000, verbose_errors=False)


@dataclass(frozen=True)
class Compiled:
    """A checked grammar over one vocabulary; start() gives a fresh matcher per choice."""

    spec: ConstraintSpec
    vocab: Vocabulary
    prototype: Any  # llguidance.LLMatcher in its initial state

    def start(self) -> TokenMask:
        return TokenMask(self.prototype.deep_copy(), self.vocab, self.spec)


def compile_constraint(spec: ConstraintSpec, vocab: Vocabulary, *, timeout_s: float) -> Compiled:
    """Compile and check `spec` within `timeout_s`; a ConstraintError naming spec.param otherwise."""
    import llguidance

    grammar = spec.grammar()
    result: dict[str, Any] = {}

    def build() -> None:  # llguidance drops the GIL while it builds; a thread lets us stop waiting
        try:
            result["matcher"] = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0, limits=_limits())
        except Exception as exc:  # noqa: BLE001 (reported below as the constraint's error)
            result["error"] = exc

    worker = threading.Thread(target=build, name="constraint-compile", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout_s))
    if worker.is_alive():
        raise ConstraintError(f"{spec.param} is too large to compile within the {timeout_s:g} s request timeout "
                              "(api.request_timeout_s); simplify it", param=spec.param)
    if "error" in result:
        raise ConstraintError(f"{spec.param} does not compile: {_first_line(result['error'])}", param=spec.param)
    matcher = result["matcher"]
    if matcher.is_error():
        raise ConstraintError(f"{spec.param} does not compile: {_first_line(matcher.get_error())}", param=spec.param)
    return Compiled(spec, vocab, matcher)


class TokenMask:
    """One choice's matcher: masks logits before sampling, advances on the sampled token."""

    def __init__(self, matcher: Any, vocab: Vocabulary, spec: ConstraintSpec) -> None:
        self.matcher, self.vocab, self.spec = matcher, vocab, spec
        self.steps = 0

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only end-of-sequence)."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean array over the tokenizer's vocabulary."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab.size].astype(bool)
        if self.matcher.is_error() or not allowed.any():
            why = _first_line(self.matcher.get_error()) if self.matcher.is_error() else "no token is allowed"
            raise ConstraintError(f"{self.spec.param} cannot be satisfied after {self.steps} tokens: {why}; "
                                  "check that the schema, regex or grammar accepts some text",
                                  param=self.spec.param, code="constraint_unsatisfiable")
        return allowed

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar does not allow at -inf."""
        allowed = self.allowed()
        out = np.full(logits.shape, -np.inf, np.float32)
        n = min(allowed.size, logits.size)
        keep = allowed[:n]
        out[:n][keep] = logits[:n][keep]
        return out

    def forced(self) -> list[int]:
        """Tokens the grammar forces next, whatever the model would say (llguidance's fast-forward)."""
        return list(self.matcher.compute_ff_tokens())

    def advance(self, token: int) -> None:
        self.steps += 1
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"{self.spec.param}: token {token} broke the constraint "
                                  f"({_first_line(self.matcher.get_error())})", param=self.spec.param,
                                  code="constraint_unsatisfiable")
