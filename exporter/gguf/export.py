"""export_gguf: a llama.cpp GGUF file -> model.onnx (+ model.onnx.data) + tokenizer files, blocks kept exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from agent.bundle import ModelSpec, Quantization
from exporter.errors import ConversionError, ExportError
from exporter.gguf.arch import decoder_config, decoder_weights
from exporter.graph.decoder import Attention, DecoderConfig, ExternalData, build_decoder, io_names
from exporter.gguf.levels import EXACT_POLICY, AccuracyPolicy
from exporter.gguf.reader import GgufFile
from exporter.gguf.reference import tensor_map
from exporter.gguf.tokenizer import load_tokenizer

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
RECIPE = "gguf-exact"
# MatMulNBits accuracy level per weight class (exporter/gguf/levels.py has the measurements). export_gguf
# builds one policy; None is levels.EXACT_POLICY: the decoder's linears at level 0, the GGUF's own float math,
# and the lm_head at level 4 with each position's top-16 logits recomputed exactly (ppl +0.003 %, top-1 100 %,
# the same answers). `edgeship export file.gguf` does not stop there: by default it searches for the fastest
# level-0/4 mix within llama.cpp's quality class (exporter/gguf/search.py) and builds that policy.
# levels.TWO_PASS_POLICY (opt-in) decodes big 4-bit linears on level 4's int8 kernel in two passes (~5e-6 from
# float, 1.3-1.5x level 0's decode on a TinyLlama-sized model) but holds a second packed copy of those weights.
# An int accuracy_level overrides it: every MatMulNBits at that level (8-bit blocks at level 0 are split
# into two exact 4-bit halves, because MatMulNBits has a fast float kernel only for 4 bits).


@dataclass(frozen=True)
class GgufResult:
    """What export_gguf wrote; the exporter core seals it into a bundle."""

    onnx_path: Path
    files: list[Path]  # every file written into out_dir (model, external data, tokenizer)
    model_spec: ModelSpec
    quantization: Quantization
    config: DecoderConfig

    def summary(self) -> list[str]:
        """One line per GGUF tensor type: how many tensors and what happened to them."""
        types = self.quantization.details["types"]
        return [f"{t}: {v['tensors']} tensors, {v['handling']}" for t, v in types.items()]


def export_gguf(gguf_path: Path, out_dir: Path, *, accuracy_level: int | str | AccuracyPolicy | None = None,
                attention: Attention = "gqa", progress: Callable[[str], None] | None = None) -> GgufResult:
    """Write `out_dir`/model.onnx (LM bundle I/O layout) whose quantized weights are the GGUF's own blocks.

    accuracy_level: None (default) = levels.EXACT_POLICY (see above); an AccuracyPolicy (e.g. the search's); an int
    puts every MatMulNBits at that level (0 the GGUF's float math, 4 int8 activations), "4x2" every 4-bit
    linear of >= 4M weights at the two-pass int8 level (levels.TWO_PASS). attention "gqa" fuses each layer's attention
    into GroupQueryAttention; "plain" uses standard ONNX ops.
    """
    try:
        policy = (EXACT_POLICY if accuracy_level is None else accuracy_level
                  if isinstance(accuracy_level, AccuracyPolicy) else AccuracyPolicy.uniform(accuracy_level))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    say = progress or (lambda _msg: None)
    g = GgufFile(Path(gguf_path))
    cfg = decoder_config(g)
    tensor_map(g, cfg)  # every tensor the architecture needs is there (the graph takes a missing bias for none)
    say(f"reading {g.path.name}: {cfg.architecture}, {cfg.num_layers} layers")
    weights = decoder_weights(g, cfg)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = out_dir / MODEL_NAME, out_dir / DATA_NAME
    external = ExternalData(data_path)
    try:
        model = build_decoder(cfg, weights, accuracy_level=policy, external=external, attention=attention,
                              progress=say)
    except Exception as exc:
        raise ConversionError(f"building the ONNX graph for {g.path.name} failed: {exc}") from exc
    finally:
        external.close()
    onnx.save_model(model, onnx_path)
    say("tokenizer")
    tokenizer_files, special = _save_tokenizer(g, out_dir)

    inputs, outputs = io_names(cfg.num_layers, attention)
    shared = {"past_present_share_buffer": True, "attention": "GroupQueryAttention"} if attention == "gqa" else {}
    spec = ModelSpec(
        entry=MODEL_NAME, inputs=inputs, outputs=outputs, architecture=cfg.architecture,
        config={
            "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_context": cfg.max_context, "eos_token_ids": special["eos_token_ids"],
            "bos_token_id": special["bos_token_id"], "vocab_size": cfg.vocab_size,
            # GroupQueryAttention: the agent keeps one max_context KV buffer per layer, written in place
            **shared,
        },
    )
    types = g.report.as_dict()
    quant = Quantization(
        recipe=RECIPE,
        precision=_precision(g),
        details={
            "source": g.path.name,
            # one MatMulNBits level for all, or "per-weight": then accuracy_levels says which class got which and why
            "accuracy_level": policy.uniform_level if policy.uniform_level is not None else "per-weight",
            "accuracy_levels": policy.details(),
            "types": types,
            "exact_types": sorted(g.report.exact),
            "float_types": sorted(set(g.report.float) | set(g.report.dequantized)),
        },
    )
    files = [onnx_path, data_path, *tokenizer_files]
    return GgufResult(onnx_path=onnx_path, files=files, model_spec=spec, quantization=quant, config=cfg)


def _precision(g: GgufFile) -> str:
    """The weight precision in a word, from the type most linear layers use (e.g. "gguf-q4_1")."""
    counts = g.report.exact + g.report.dequantized
    return f"gguf-{counts.most_common(1)[0][0].lower()}" if counts else "fp32"


def _save_tokenizer(g: GgufFile, out_dir: Path) -> tuple[list[Path], dict]:
    """transformers builds the tokenizer (and chat template) from the GGUF; special ids come from its metadata."""
    before = set(out_dir.iterdir())
    tok = load_tokenizer(g)
    bos = g.meta("tokenizer.ggml.bos_token_id")
    eos = g.meta("tokenizer.ggml.eos_token_id")
    # transformers' GGUF conversion can mislabel the special tokens; the metadata's ids are the truth
    if bos is not None:
        tok.bos_token = tok.convert_ids_to_tokens(int(bos))
    if eos is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos))
    pad = g.meta("tokenizer.ggml.padding_token_id")
    if pad is not None:
        tok.pad_token = tok.convert_ids_to_tokens(int(pad))
    add_bos = g.meta("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        tok.add_bos_token = bool(add_bos)
    tok.vocab_file = None  # else save_pretrained copies the whole GGUF as "tokenizer.model"
    eos_ids = [int(eos)] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = g.meta(key)
        if extra is not None and int(extra) not in eos_ids:
            eos_ids.append(int(extra))
    tok.save_pretrained(out_dir)
    written = sorted(p for p in out_dir.iterdir() if p not in before and p.name not in (MODEL_NAME, DATA_NAME))
    return written, {"eos_token_ids": eos_ids, "bos_token_id": None if bos is None else int(bos)}
