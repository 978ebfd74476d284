"""Which MatMulNBits accuracy level each weight of an exact GGUF graph gets, and why.

Level 0 computes in float32: the GGUF's own math. Level 4 quantizes activations to int8 per block
(~2x faster GEMV on CPU, relative error ~5e-3 per product). Measured on SmolLM2-135M-Instruct Q4_1
against transformers' fp32 dequantization (883 tokens of exporter/data/eval.txt + the greedy chat
answer, whose first token is a near tie: margin 0.082 logits), one weight class at level 4 at a time:

| at level 4 | ppl change | top-1 | logit rms error | greedy answer (first-token margin) |
|---|---|---|---|---|
| none (all 0) | +0.0000 % | 100 % | 1.3e-5 | identical (0.082) |
| q/k/v | +0.12 % | 97.96 % | 0.107 | flips (-0.004) |
| gate/up | +0.09 % | 98.75 % | 0.138 | flips (-0.005) |
| down | -0.02 % | 98.19 % | 0.075 | flips (-0.096) |
| o | +0.04 % | 99.32 % | 0.028 | identical, half the margin gone (0.041) |
| lm_head | +0.10 % | 98.07 % | 0.060 | flips (-0.051) |
| lm_head, exact top-16 | +0.003 % | 100 % | 0.060 | identical (0.082) |

EXACT_POLICY keeps the body at level 0: the GGUF's own answers, token for token. It is no longer the
default of an import: llama.cpp itself rounds activations to 8 bits per block of 32 (ppl +0.19 %, top-1
97.05 % on SmolLM2, its greedy answer flips), so the default (exporter/gguf/search.py) is the fastest
policy whose quality is at least that class: LLAMA_CPP_CLASS below, measured per model at export time,
the body at level 4 but for the linears that break it. EXACT_POLICY stays one flag away
(--accuracy-level exact), and TWO_PASS (opt-in) runs level 4 in two passes that together are within ~5e-6
of float, for decode on big 4-bit linears, at the price of a second packed copy of them.
The lm_head is the one weight where level 4 is safe to use: its
output is the logits themselves, so the graph recomputes the 16 largest approximate logits of each
position exactly (float rows of the same blocks) and scatters them back: argmax, greedy answers
and the softmax mass are the GGUF's own; only logits far below the top carry level-4 error. At
level 0 an 8-bit table runs as two exact 4-bit halves (no fast 8-bit float kernel); refined, SmolLM2's
49152x576 Q8_0 lm_head costs a third of that: 15-20 % less prefill and 8-11 % less decode CPU in all.
o_proj at level 4 passed too, for 4-6 % less decode CPU, but it spends half the near tie's margin on
one prompt of one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WEIGHT_CLASSES = ("attn_qkv", "attn_out", "mlp_in", "mlp_out", "lm_head")
# the default smallest 4-bit linear (N*K weights) that takes TWO_PASS; see TWO_PASS_POLICY below for why
TWO_PASS_MIN_WEIGHTS = 1 << 22
# Not a MatMulNBits attribute value: level 4's int8 kernel run on x split into hi (on the int8 grid the
# kernel itself would pick, so it quantizes hi without error) and lo = x - hi, both rows in one call; the
# sum is x @ w^T to ~5e-6 relative, for ~1.2-1.5x one level-4 call (bench/matmulnbits_levels.py).
TWO_PASS = "4x2"
LEVELS = (0, 1, 2, 3, 4, TWO_PASS)
# what --accuracy-level also takes for an exact GGUF import: EXACT_POLICY, or the search (the default)
EXACT, SEARCH = "exact", "auto"
EXACT_TOP_K = 16
# What the default (searched) policy must keep on the evaluation text against the fp32 dequantization: llama.cpp's
# own class on its own file (SmolLM2 Q4_1: ppl +0.19 %, top-1 97.05 %). A user's --threshold on the same
# metric takes its place.
LLAMA_CPP_CLASS = {"max_ppl_delta": 0.005, "min_top1_agreement": 0.97}

# the torch module name's last part -> weight class (stems are "model.layers.3.mlp.down_proj", "lm_head")
_CLASS_OF = {
    "q_proj": "attn_qkv", "k_proj": "attn_qkv", "v_proj": "attn_qkv", "qkv_proj": "attn_qkv",
    "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
    "down_proj": "mlp_out", "lm_head": "lm_head",
}


def weight_class(stem: str) -> str | None:
    """The weight class of a linear's module path; None for a module outside the decoder's five."""
    for part in reversed(stem.split(".")):
        if part in _CLASS_OF:
            return _CLASS_OF[part]
    return None


@dataclass(frozen=True)
class AccuracyPolicy:
    """A MatMulNBits accuracy level per weight class, and whether the lm_head's top-k logits are recomputed exactly."""

    levels: dict[str, int | str]
    exact_top_k: int | None = None  # lm_head at a level > 0: the top-k logits of each position recomputed in float
    reasons: dict[str, str] = field(default_factory=dict)
    name: str = "custom"
    two_pass_min_weights: int = TWO_PASS_MIN_WEIGHTS  # smaller 4-bit linears at TWO_PASS run level 0 instead
    # linears (module paths, "model.layers.3.self_attn.qkv_proj") kept at level 0 whatever their class's level:
    # the outliers a search (exporter/gguf/search.py) found
    exact_stems: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.levels) - set(WEIGHT_CLASSES)
        if unknown or set(WEIGHT_CLASSES) - set(self.levels):
            raise ValueError(f"accuracy levels must name exactly {', '.join(WEIGHT_CLASSES)}; got {sorted(self.levels)}")
        bad = {c: lv for c, lv in self.levels.items() if lv not in LEVELS}
        if bad:
            raise ValueError(f"accuracy levels {bad} are not MatMulNBits levels; use 0 (exact float) .. 4 (int8 activations) "
                             f"or {TWO_PASS!r} (int8, two passes)")
        if self.exact_top_k is not None and self.exact_top_k < 1:
            raise ValueError(f"exact_top_k {self.exact_top_k} must be at least 1 (or None)")
        if self.two_pass_min_weights < 0:
            raise ValueError(f"two_pass_min_weights {self.two_pass_min_weights} must be 0 (every 4-bit linear) or more")
        if isinstance(self.exact_stems, str) or not all(isinstance(s, str) and s for s in self.exact_stems):
            raise ValueError(f"exact_stems {self.exact_stems!r} must be module paths, e.g. model.layers.3.mlp.down_proj")
        object.__setattr__(self, "exact_stems", frozenset(self.exact_stems))

    @classmethod
    def uniform(cls, level: int) -> AccuracyPolicy:
        """Every weight at `level`, nothing recomputed (the accuracy_level override)."""
        if level not in LEVELS:
            raise ValueError(f"accuracy_level {level!r} is not a MatMulNBits level; use 0 (exact float) .. 4 (int8 activations) "
                             f"or {TWO_PASS!r} (int8, two passes)")
        why = "accuracy_level override"
        return cls({c: level for c in WEIGHT_CLASSES}, None, {c: why for c in WEIGHT_CLASSES}, name=f"uniform-{level}")

    @classmethod
    def from_details(cls, details: dict) -> AccuracyPolicy:
        """The policy a manifest's quantization.details.accuracy_levels records (what details() wrote)."""
        return cls(dict(details["levels"]), details.get("lm_head_exact_top_k"), dict(details.get("reasons", {})),
                   name=details.get("policy", "custom"),
                   two_pass_min_weights=details.get("two_pass_min_weights", TWO_PASS_MIN_WEIGHTS),
                   exact_stems=frozenset(details.get("kept_exact", ())))

    @property
    def uniform_level(self) -> int | None:
        """The one level every weight gets, or None when the levels differ (or the lm_head is refined)."""
        levels = set(self.levels.values())
        return levels.pop() if len(levels) == 1 and self.exact_top_k is None and not self.exact_stems else None

    def level(self, stem: str) -> int | str:
        """The level of the linear at module path `stem`; a module outside the five classes gets the uniform level,
        or else the most exact one (0 before the two-pass int8)."""
        if stem in self.exact_stems:
            return 0
        cls = weight_class(stem)
        if cls is not None:
            return self.levels[cls]
        levels = set(self.levels.values())
        return levels.pop() if len(levels) == 1 else min(lv for lv in levels if lv != TWO_PASS)

    def refines(self, stem: str) -> bool:
        """True when `stem` is the lm_head and its top-k logits are recomputed exactly."""
        return self.exact_top_k is not None and weight_class(stem) == "lm_head" and self.levels["lm_head"] == 4

    def two_pass(self, weight_bits: int, weights: int) -> bool:
        """Whether a linear of `weights` (N*K) weights in `weight_bits`-bit blocks at level TWO_PASS takes the two
        passes: 4-bit ones of at least two_pass_min_weights (8-bit prompts would need the 8-bit blocks and their
        two 4-bit halves, twice the bytes; below the size the ~14 extra ops cost more than the kernel saves)."""
        return weight_bits == 4 and weights >= self.two_pass_min_weights

    def details(self) -> dict:
        """What the manifest records: the level of each weight class, the top-k refinement, and why."""
        out = {"policy": self.name, "levels": dict(self.levels), "lm_head_exact_top_k": self.exact_top_k,
               "reasons": dict(self.reasons)}
        if TWO_PASS in self.levels.values():
            out["two_pass_min_weights"] = self.two_pass_min_weights
        if self.exact_stems:
            out["kept_exact"] = sorted(self.exact_stems, key=_layer_order)
        return out

    def __str__(self) -> str:
        levels = ", ".join(f"{c} {lv}" for c, lv in self.levels.items())
        top = f", lm_head top-{self.exact_top_k} exact" if self.exact_top_k is not None and self.levels["lm_head"] == 4 else ""
        kept = f", {len(self.exact_stems)} linears kept at 0" if self.exact_stems else ""
        return f"{self.name} ({levels}{top}{kept})"


def _layer_order(stem: str) -> tuple:
    """model.layers.10.mlp.down_proj after model.layers.9.*: digits compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in stem.split("."))


_BODY = "level 0 (float32, the GGUF's math): at level 4 alone it flips SmolLM2's greedy chat answer"
EXACT_POLICY = AccuracyPolicy(
    levels={"attn_qkv": 0, "attn_out": 0, "mlp_in": 0, "mlp_out": 0, "lm_head": 4},
    exact_top_k=EXACT_TOP_K,
    reasons={
        "attn_qkv": _BODY, "mlp_in": _BODY, "mlp_out": _BODY,
        "attn_out": "level 0: level 4 passed SmolLM2's gate but halved its greedy answer's near-tie margin for 4-6 % decode CPU",
        "lm_head": f"level 4 (int8 activations) for all logits, then the top {EXACT_TOP_K} of each position recomputed "
                   "in float32 from the same blocks: argmax and softmax mass exact, a third of the level-0 cost",
    },
    name="exact",
)

# A 4-bit linear at TWO_PASS: one-row steps (decode) on level 4's int8 kernel as hi + lo, ~5e-6 from float;
# prompts (more rows) at level 0 behind an If. Opt-in (TWO_PASS_POLICY), not the default, because onnxruntime
# prepacks each MatMulNBits node's weights for itself: the two branches hold two packed copies (TinyLlama-1.1B
# shape: session RSS 1320 MB instead of 499). It costs ~14 small ops (~27 us on a 2-core Xeon) per linear,
# so by default only linears of at least TWO_PASS_MIN_WEIGHTS weights take it; smaller ones, and 8-bit ones, stay
# at 0. Where level 0's one-row kernel is slower (2-core AMD EPYC, AVX2 without VNNI: 576 -> 3072 takes 203 us at
# level 0, 48 at level 4), every 4-bit linear gains: dataclasses.replace(TWO_PASS_POLICY, two_pass_min_weights=0).
# One 4-bit linear, one decode row, 2 threads (1 thread), us:   level 0   two-pass   level 4
#   576 -> 576 (SmolLM2 o_proj)                                  32 (46)    50 (54)    20 (22)
#   576 -> 3072 (SmolLM2 gate/up)                                92 (165)   73 (109)   44 (51)
#   2048 -> 11264 (TinyLlama gate/up)                          1149 (2129) 509 (931)  334 (626)
# Whole model, decode tok/s, 2 threads (bench/gguf_two_pass_size.py, random Q4_0 blocks; this VM drifts):
#   TinyLlama-1.1B shape: level 0 12.7-15.4, two-pass 18.5-19.4 (1.26-1.53x), level 4 21.8-24.8
# SmolLM2 with every linear at two-pass: ppl +0.008 %, top-1 100 %, the same greedy answer (tests/test_gguf_export.py).
_TWO_PASS = ("opt-in: linears of >= 4M 4-bit weights decode on level 4's int8 kernel in two passes (x = hi + lo, "
             "~5e-6 from float), prompts at level 0; ~1.3-1.5x level 0's decode, a second packed copy of the weights")
TWO_PASS_POLICY = AccuracyPolicy(
    levels={"attn_qkv": TWO_PASS, "attn_out": TWO_PASS, "mlp_in": TWO_PASS, "mlp_out": TWO_PASS, "lm_head": 4},
    exact_top_k=EXACT_TOP_K,
    reasons={**{c: _TWO_PASS for c in ("attn_qkv", "attn_out", "mlp_in", "mlp_out")},
             "lm_head": EXACT_POLICY.reasons["lm_head"]},
    name="two-pass-decode",
)
