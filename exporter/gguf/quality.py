"""Quality of an exact GGUF export against the dequantized fp32 transformers model of the same file
(exporter/gguf/reference.py: transformers' own GGUF loader where it reads the file, else ours).

Metrics (agent.bundle.QualityReport):
    ppl_ref, ppl        perplexity of the reference and of the ONNX model on the evaluation text
    ppl_delta           (ppl - ppl_ref) / ppl_ref
    top1_agreement      share of positions whose next-token argmax agrees
    greedy_match        share of the greedy chat answer's tokens identical before the first split
"""

from __future__ import annotations

import os
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import QualityReport, QualityStatus

DEFAULT_THRESHOLDS = {"max_ppl_delta": 0.005, "min_top1_agreement": 0.98, "min_greedy_match": 1.0}
CHAT_PROMPT = "What is the capital of France?"


def eval_text() -> str:
    """The exporter's built-in real-English evaluation text."""
    return resources.files("exporter").joinpath("data/eval.txt").read_text(encoding="utf-8")


class OnnxDecoder:
    """Runs an LM bundle's model.onnx (decoder-with-past layout) with its KV cache."""

    def __init__(self, onnx_path: Path, *, threads: int = 0, spinning: bool = True):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if not spinning:  # as the agent runs it: idle intra-op threads sleep (shared cores)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def run(self, ids: np.ndarray, past: list[np.ndarray], *, keep: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [1, s] after `past` -> (logits [1, s, vocab], new past); keep = n > 0: the last n positions'
        logits only, where the graph takes logits_to_keep."""
        done = past[0].shape[2]
        total = done + ids.shape[1]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in self.input_names:  # plain-attention graphs; GroupQueryAttention derives positions
            feed["position_ids"] = np.arange(done, total, dtype=np.int64)[None]
        if "logits_to_keep" in self.input_names:
            feed["logits_to_keep"] = np.array([keep], np.int64)
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def greedy(self, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
        logits, past = self.run(np.array([prompt]), self.empty_past())
        tokens: list[int] = []
        for _ in range(steps):
            nxt = int(logits[0, -1].argmax())
            tokens.append(nxt)
            if nxt in eos:
                break
            logits, past = self.run(np.array([[nxt]]), past)
        return tokens


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[t+1] | ..t) for each t, from logits [tokens, vocab]."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]


@dataclass(frozen=True)
class Reference:
    """transformers' fp32 outputs for the GGUF: logits on the evaluation tokens and the greedy chat answer."""

    ids: np.ndarray  # evaluation tokens
    logits: np.ndarray  # [tokens, vocab]
    prompt: list[int]  # the chat prompt's tokens
    answer: list[int]  # its greedy answer


def gguf_reference(gguf_path: Path, tokenizer_dir: Path, *, eos_token_ids: list[int], text: str | None = None,
                   max_tokens: int = 1024, greedy_steps: int = 64) -> Reference:
    """Run the fp32 dequantization of the GGUF once (several exports can be judged against it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from exporter.gguf.reference import load_model

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = np.array(tok(text if text is not None else eval_text(), add_special_tokens=False)["input_ids"][:max_tokens])
    ref_model = load_model(gguf_path)
    with torch.no_grad():
        logits = ref_model(torch.from_numpy(ids)[None]).logits[0].numpy()
    prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True)
    with torch.no_grad():
        generated = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=greedy_steps, do_sample=False, eos_token_id=eos_token_ids,
                                       pad_token_id=eos_token_ids[0] if eos_token_ids else None)
    return Reference(ids=ids, logits=logits, prompt=list(prompt), answer=generated[0, len(prompt):].tolist())


def gguf_quality(gguf_path: Path, onnx_path: Path, tokenizer_dir: Path, *, eos_token_ids: list[int],
                 text: str | None = None, max_tokens: int = 1024, greedy_steps: int = 64, threads: int = 0,
                 thresholds: dict[str, float] | None = None, reference: Reference | None = None) -> QualityReport:
    """Compare the exported model with the fp32 dequantization of the same GGUF (`reference`, if
    already computed with the same text and steps).

    Ten parameters: the three files plus the measurement's own knobs (text, lengths, threads, limits),
    each with a default; the benchmarks set them one by one."""
    ref = reference or gguf_reference(gguf_path, tokenizer_dir, eos_token_ids=eos_token_ids, text=text,
                                      max_tokens=max_tokens, greedy_steps=greedy_steps)
    onnx = OnnxDecoder(onnx_path, threads=threads)
    logits = onnx.run(ref.ids[None], onnx.empty_past())[0][0]
    answer = onnx.greedy(ref.prompt, greedy_steps, set(eos_token_ids))
    return judge(ref, logits, answer, tokenizer_dir, thresholds=thresholds)


def judge(ref: Reference, logits: np.ndarray, answer: list[int], tokenizer_dir: Path, *,
          thresholds: dict[str, float] | None = None) -> QualityReport:
    """The quality report of a model whose logits on ref.ids are `logits` [tokens, vocab] and whose greedy
    answer to ref.prompt is `answer`, against the reference (any runtime: bench/gguf_vs_llama_cpp.py judges
    llama.cpp's own output with it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids, ref_logits, ref_answer = ref.ids, ref.logits, ref.answer
    ppl_ref, ppl = float(np.exp(nll(ref_logits, ids).mean())), float(np.exp(nll(logits, ids).mean()))
    top1 = float((ref_logits[:-1].argmax(-1) == logits[:-1].argmax(-1)).mean())
    same = 0
    for a, b in zip(ref_answer, answer):
        if a != b:
            break
        same += 1
    greedy_match = same / max(len(ref_answer), len(answer), 1)

    metrics = {"ppl_ref": ppl_ref, "ppl": ppl, "ppl_delta": (ppl - ppl_ref) / ppl_ref,
               "top1_agreement": top1, "greedy_match": greedy_match}
    limits = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    failures = []
    if "max_ppl_delta" in limits and abs(metrics["ppl_delta"]) > limits["max_ppl_delta"]:
        failures.append(f"ppl_delta {metrics['ppl_delta']:+.4%} outside ±{limits['max_ppl_delta']:.2%}")
    if "min_top1_agreement" in limits and top1 < limits["min_top1_agreement"]:
        failures.append(f"top1_agreement {top1:.4f} below {limits['min_top1_agreement']}")
    if "min_greedy_match" in limits and greedy_match < limits["min_greedy_match"]:
        failures.append(f"greedy_match {greedy_match:.4f} below {limits['min_greedy_match']}")
    details: dict[str, Any] = {
        "eval_tokens": int(len(ids)), "greedy_prompt": CHAT_PROMPT,
        "greedy_reference": tok.decode(ref_answer), "greedy_onnx": tok.decode(answer),
        "greedy_tokens": len(answer),
    }
    return QualityReport(
        status=QualityStatus.FAILED if failures else QualityStatus.PASSED,
        reference="transformers fp32, GGUF dequantized",
        metrics=metrics, thresholds=limits, failures=failures, details=details,
    )
