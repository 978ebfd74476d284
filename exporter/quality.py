"""The LM measures: compare the exported model with its PyTorch reference on real text (the gate
that judges them is exporter/gate.py, shared with the encoders).

LM metrics (each checked only when the profile or the user sets its threshold):
    logits_abs_diff   max |logits_onnx - logits_torch| over every position      (max_logits_abs_diff)
    logits_cosine     mean cosine of the logit vectors per position               (min_logits_cosine)
    top1_agreement    share of positions whose next-token argmax agrees           (min_top1_agreement)
    greedy_match      share of N greedy tokens identical before the first split  (min_greedy_match)
    ppl_delta         (ppl_onnx - ppl_torch) / ppl_torch on the evaluation text  (max_ppl_delta)

The greedy run decodes one token per call through the KV cache, so the decode path is checked
as well as the prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import SourceError

DEFAULT_SEQUENCES = 4
DEFAULT_SEQ_LEN = 128
DEFAULT_GREEDY_PROMPT = 16
DEFAULT_GREEDY_STEPS = 16


def builtin_eval_text() -> str:
    return resources.files("exporter").joinpath("data/eval.txt").read_text(encoding="utf-8")


def read_texts(path: Path | None) -> str:
    """The evaluation text: a user's file (plain text, or JSONL with a "text" field) or the built-in one."""
    if path is None:
        return builtin_eval_text()
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read evaluation text {path}: {exc}; pass a UTF-8 .txt or .jsonl file") from None
    if path.suffix == ".jsonl":
        import json

        try:
            raw = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{path}: every JSONL line needs a \"text\" string ({exc})") from None
    if len(raw.split()) < 50:
        raise SourceError(f"evaluation text {path} has fewer than 50 words; give at least a few paragraphs")
    return raw


@dataclass(frozen=True)
class LMReference:
    """What the PyTorch model says on the evaluation text; computed once, before export."""

    sequences: np.ndarray  # [n, seq_len] token ids
    logits: np.ndarray  # [n, seq_len, vocab] float32
    prompts: np.ndarray  # [n, prompt_len]
    greedy: np.ndarray  # [n, steps]
    activation_ratio: dict[str, float] = field(default_factory=dict)  # Linear name -> max|x| / mean|x| of its input


def eval_sequences(tokenizer: Any, text: str, *, count: int, length: int) -> np.ndarray:
    """`count` windows of `length` tokens spread over the tokenized text."""
    ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    if len(ids) < length + 1:
        raise SourceError(
            f"evaluation text is {len(ids)} tokens, fewer than the {length + 1} one window needs; give a longer text"
        )
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    return np.stack([ids[s : s + length] for s in starts])


def lm_reference(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    count: int = DEFAULT_SEQUENCES,
    length: int = DEFAULT_SEQ_LEN,
    prompt_len: int = DEFAULT_GREEDY_PROMPT,
    steps: int = DEFAULT_GREEDY_STEPS,
    max_context: int | None = None,
) -> LMReference:
    import torch

    if max_context:
        length = min(length, max_context)
        prompt_len = min(prompt_len, max(1, max_context - steps))
    seqs = eval_sequences(tokenizer, text, count=count, length=length)
    prompts = seqs[:, :prompt_len]
    with torch.inference_mode(), _activation_stats(model) as ratio:
        logits = np.stack([model(torch.from_numpy(s[None, :])).logits[0].float().numpy() for s in seqs])
    with torch.inference_mode():
        greedy = []
        for p in prompts:
            ids = torch.from_numpy(p[None, :])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
            greedy.append(out[0, p.shape[0] :].numpy())
    return LMReference(seqs, logits.astype(np.float32), prompts, np.stack(greedy).astype(np.int64), dict(ratio))


@contextmanager
def _activation_stats(model: Any) -> Iterator[dict[str, float]]:
    """Per nn.Linear (but the lm_head): max|x| / mean|x| of its input over every call in the block."""
    import torch

    peak: dict[str, float] = {}
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    ratio: dict[str, float] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach().abs().float()
            peak[name] = max(peak.get(name, 0.0), float(x.max()))
            total[name] = total.get(name, 0.0) + float(x.sum())
            count[name] = count.get(name, 0) + x.numel()

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    try:
        yield ratio
    finally:
        for h in handles:
            h.remove()
        ratio.update({n: peak[n] / max(total[n] / count[n], 1e-12) for n in peak})


def outlier_patterns(ratio: dict[str, float], limit: float | None) -> list[str]:
    """ONNX node-name patterns of the Linears whose input ratio exceeds `limit`, worst first.

    torch module `model.layers.11.mlp.down_proj` is exported as node `/model/layers.11/mlp/down_proj/MatMul`.
    """
    if limit is None:
        return []
    from exporter.graph.decoder import node_name

    out = []
    for name, r in sorted(ratio.items(), key=lambda kv: -kv[1]):
        if r <= limit:
            break
        out.append(node_name(name, ""))  # "/model/layers.11/mlp/down_proj/": matches that Linear's nodes
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) of `ids` [n, s] under `logits` [n, s, v]."""
    lp = _log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    return float(np.exp(nll.mean()))


def prefix_match(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions before the first disagreement."""
    differ = np.nonzero(a != b)[0]
    return 1.0 if len(differ) == 0 else float(differ[0]) / len(a)


def lm_metrics(onnx_path: Path, ref: LMReference, *, threads: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    from exporter.lm import OrtDecoder

    dec = OrtDecoder(onnx_path, threads=threads)
    got = np.stack([dec.run(s[None, :], dec.empty_past())[0][0] for s in ref.sequences]).astype(np.float32)
    greedy = [dec.greedy(p, ref.greedy.shape[1]) for p in ref.prompts]
    return compare_lm(got, ref.logits, ref.sequences, greedy, ref)


def compare_lm(got: np.ndarray, want: np.ndarray, sequences: np.ndarray, greedy: list, ref: LMReference
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """The LM gate's metrics: logits `got` vs `want` [seqs, positions, vocab] over token `sequences`, and
    each greedy continuation of ref.prompts against the reference's."""
    a, b = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    ppl_ref, ppl_got = perplexity(want, sequences), perplexity(got, sequences)
    matches = [prefix_match(g, r) for g, r in zip(greedy, ref.greedy)]
    metrics = {
        "logits_abs_diff": float(np.abs(a - b).max()),
        "logits_cosine": float(cos.mean()),
        "logits_cosine_min": float(cos.min()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "greedy_match": float(np.mean(matches)),
        "ppl_reference": ppl_ref,
        "ppl": ppl_got,
        "ppl_delta": (ppl_got - ppl_ref) / ppl_ref,
    }
    details = {
        "eval_sequences": int(sequences.shape[0]),
        "eval_tokens_per_sequence": int(sequences.shape[1]),
        "greedy_prompts": int(ref.prompts.shape[0]),
        "greedy_steps": int(ref.greedy.shape[1]),
        "greedy_prefix_matches": [round(m, 4) for m in matches],
    }
    return metrics, details
