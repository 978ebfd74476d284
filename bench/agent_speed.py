"""Agent speed at the hardware's limit: numbers, never pass/fail.

Models (random weights, shapes of the real ones; `--model`):
  tinyllama-1.1b  hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000
  qwen2.5-0.5b    hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied
                  embeddings, q/k/v bias, rope_theta 1e6, 32768 positions
128-token prompt, 64 new tokens, greedy, one process for all variants. Every variant runs once per
round, in turn, `--rounds` times (default 3), `--repeats` timed generations each (default 2): this
machine's speed drifts by 10-20 % over minutes, so a variant measured only at the start or the end
would meet other weather. Reported: best and median of all its timed runs; ratios of both.

Variants, side by side in one run:
  - edgeship export default: `exporter.export(model, out=, key=, profile=<this CPU's>, benchmark=False)`,
    i.e. what a user gets out of the box (native GroupQueryAttention graph, int4 body, 8-bit
    lm_head), loaded through agent.runtime with no flags (threads and EP as a device picks them).
    force=True only so that the bundle is written although random weights miss the quality gate
    (the gate's result is recorded; it changes nothing in the graph).
  - edgeship, lm_head 4-bit scan: the same export with `lm_head_top_k = 16` added to the profile (every
    logit from 4-bit blocks, each position's top 16 from the 8-bit ones; an option, off by default).
  - optimum graph (TinyLlama only): optimum's decoder-with-past trace, int4 with onnxruntime's
    MatMulNBitsQuantizer (block 32, symmetric, accuracy_level 4, lm_head int4 too), same runtime.
  - PyTorch fp32 (same weights, same thread count).
  - with --genai: onnxruntime-genai 0.18.0 in bench/.venv-genai (its builder's int4 model, default
    and tuned threads), and agent.runtime on genai's graph (shared KV buffer).
  - memory bandwidth (numpy copy of a large array); each variant's weight bytes read per decoded
    token and the fraction of the bandwidth limit its decode reaches.
  - idle RSS of an agent API process without a model; RSS with the edgeship bundle loaded vs its
    size; time from process start to /readyz.

    python bench/agent_speed.py --model all --genai --build      # build every cache once, measure nothing
    python bench/agent_speed.py --model all --genai --json bench/results/agent_speed-<date>.json

Everything runs on loopback; models are cached under ~/.cache/edgeship-bench (EDGESHIP_BENCH_CACHE).
Building takes ~9 GB RAM at peak (TinyLlama's export) and many minutes on 2 cores. The cache is not
keyed on the exporter's code: after exporter changes, delete `*-edgeship-*` there to export again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("EDGESHIP_BENCH_CACHE", Path.home() / ".cache" / "edgeship-bench"))
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                  sliding_window=32768, max_window_layers=24, bos_token_id=151643, eos_token_id=151645)
PROMPT_TOKENS = 128
NEW_TOKENS = 64
THREADS = 2  # the setting; our runtime gets it by default from usable_cpus() on this machine


@dataclass(frozen=True)
class Shape:
    """A benchmark model: random weights in a real model's shape."""

    label: str
    cache_name: str
    config: dict
    optimum_graph: bool  # also measure the old optimum-traced graph (TinyLlama: the earlier baseline)
    tokenizer_from: str  # tiny test model whose trained BPE tokenizer + chat template stand in

    @property
    def vocab(self) -> int:
        return self.config["vocab_size"]


SHAPES = {
    "tinyllama-1.1b": Shape("TinyLlama-1.1B-shaped", "tinyllama-1.1b-random", TINYLLAMA, True, "llama"),
    "qwen2.5-0.5b": Shape("Qwen2.5-0.5B-shaped", "qwen2.5-0.5b-random", QWEN25_05B, False, "qwen2"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- building the models (cached) ----------------------------------------------------------------


def hf_dir(shape: Shape) -> Path:
    out = CACHE / shape.cache_name
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.support.models import tiny_model

    log(f"building random {shape.cache_name} (fp32) ...")
    torch.manual_seed(0)
    cfg = dict(shape.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # default init gives near-uniform logits; scale like a trained model a little
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("_proj.bias"):  # q/k/v biases: nonzero, so they are exercised
                p.normal_(0.0, 0.02)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    src = tiny_model(shape.tokenizer_from)  # a real trained BPE tokenizer (ids beyond its vocab decode to "")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    del model
    gc.collect()
    os.replace(tmp, out)
    return out


def keys() -> tuple[Path, Path]:
    """The bench's signing key pair (private, public), made once."""
    from agent.bundle import generate_keypair

    d = CACHE / "keys"
    if not (d / "bench.pub").exists():
        generate_keypair(d, "bench")
    return d / "bench.key", d / "bench.pub"


def profile_for_host() -> str:
    """The target profile a user on this CPU picks."""
    from agent.runtime import cpu_facts

    return "cpu-x86-avx512-vnni" if "avx512_vnni" in cpu_facts()["flags"] else "cpu-x86-avx2"


EXPORT_CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from exporter import export
r = export(sys.argv[2], out=sys.argv[3], key=sys.argv[4], profile=sys.argv[5], benchmark=False, force=True,
           overwrite=True)
rep = r.report
print(json.dumps({"stats": r.stats, "quality_status": str(rep.status.value), "metrics": rep.metrics,
                  "failures": list(rep.failures), "quantization": r.manifest.quantization.model_dump(mode="json")},
                 default=str))
"""


def edgeship_bundle(src: Path, profile: str) -> Path:
    """The bundle `exporter.export` makes with the profile's defaults, exported in a child process."""
    out = CACHE / f"{src.name}-edgeship-{Path(profile).stem}"
    if (out / "manifest.json").exists():
        return out
    private, _ = keys()
    log(f"exporting {src.name} with exporter.export(profile={profile}) in a child process (minutes) ...")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(ROOT), str(src), str(out), str(private), profile],
                       stdout=subprocess.PIPE, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if r.returncode != 0:
        sys.exit(f"export of {src} failed ({r.returncode}); its stderr is above")
    info = json.loads(r.stdout.strip().splitlines()[-1]) | {"wall_s": round(time.perf_counter() - t0, 1)}
    (CACHE / f"{out.name}.export.json").write_text(json.dumps(info, indent=2))
    log(f"exported in {info['wall_s']:.0f} s; quality {info['quality_status']} (random weights: means nothing)")
    return out


def scan_profile(profile: str) -> Path:
    """The profile with `lm_head_top_k = 16`: the lm_head scores every token with 4-bit blocks and recomputes
    each position's top 16 logits from its 8-bit blocks (exporter.graph.decoder.ScannedHead; off by default)."""
    from exporter.profiles import TARGETS_DIR

    text = (TARGETS_DIR / f"{profile}.toml").read_text()
    if "\nint8_blocks" not in text:
        raise SystemExit(f"profile {profile} has no int8_blocks line to put lm_head_top_k after")
    out = CACHE / f"{profile}-scan16.toml"
    out.write_text(text.replace("\nint8_blocks", "\nlm_head_top_k = 16\nint8_blocks", 1))
    return out


def onnx_fp32(src: Path) -> Path:
    out = CACHE / (src.name + "-onnx-fp32")
    if (out / "model.onnx").exists():
        return out
    from optimum.exporters.onnx import main_export

    log("exporting with optimum (text-generation-with-past) ...")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    main_export(str(src), str(tmp), task="text-generation-with-past", device="cpu")
    os.replace(tmp, out)
    return out


def onnx_int4(fp32: Path) -> Path:
    out = CACHE / fp32.name.replace("-fp32", "-int4")
    if (out / "model.onnx").exists():
        return out
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    log("quantizing to int4 (MatMulNBits, block 32, symmetric, accuracy_level 4) ...")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = onnx.load(str(fp32 / "model.onnx"))
    q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, accuracy_level=4))
    q.process()
    q.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
    for f in fp32.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, out)
    return out


def optimum_bundle(src: Path) -> Path:
    """A sealed bundle of the optimum-traced int4 model."""
    from tests.support.lm_bundle import seal_lm_bundle

    int4 = onnx_int4(onnx_fp32(src))
    out = CACHE / (int4.name + "-bundle")
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        seal_lm_bundle(int4, out, keys()[0], name=f"{src.name}-optimum-int4", version="1.0.0")
    return out


def gqa_bundle(genai_dir: Path, src: Path) -> Path:
    """A bundle of onnxruntime-genai's int4 graph, run by our runtime with a shared KV buffer."""
    from tests.support.lm_bundle import lm_config, seal_lm_bundle

    out = CACHE / f"{genai_dir.name}-shared-bundle"
    if not (out / "manifest.json").exists():
        config = lm_config(src) | {"past_present_share_buffer": True}
        seal_lm_bundle(genai_dir, out, keys()[0], name=f"{src.name}-genai-gqa", config=config)
    return out


# ---- measurements --------------------------------------------------------------------------------


def prompt_ids(seed: int = 0, vocab: int = TINYLLAMA["vocab_size"]) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, PROMPT_TOKENS).tolist()


def measure_runtime(bundle_dir: Path, public: Path, *, vocab: int, repeats: int, spin: bool = True) -> dict:
    from agent.bundle import TrustedKeys, open_bundle
    from agent.runtime import load_model

    vb = open_bundle(bundle_dir, TrustedKeys.from_paths([public]), check_hashes=False)
    t0 = time.perf_counter()
    model = load_model(vb, spin=spin)  # no other flags: threads and EP as a device would pick them
    load_s = time.perf_counter() - t0
    runs = []
    for i in range(repeats + 1):
        gen = model.generate(prompt_ids(i, vocab), max_tokens=NEW_TOKENS, ignore_eos=True, use_prefix_cache=False)
        gen.run()
        s = gen.stats
        assert s.completion_tokens == NEW_TOKENS, s
        if i:  # the first run warms allocations and kernels up
            runs.append((s.prefill_tok_s, s.decode_tok_s))
    first = model.generate(prompt_ids(0, vocab), max_tokens=8, ignore_eos=True, use_prefix_cache=False)
    out = {"threads": model.threads, "execution_provider": model.execution_provider, "load_s": load_s,
           "prefill_tok_s": max(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs),
           "prefill_runs": [round(r[0], 1) for r in runs], "decode_runs": [round(r[1], 2) for r in runs],
           "tokens": [c.token_id for c in first if c.token_id is not None],
           "bundle_mb": dir_mb(bundle_dir)}
    model.close()
    return out


def measure_torch(src: Path, *, vocab: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    best_p = best_d = 0.0
    first_tokens = None
    with torch.inference_mode():
        for i in range(repeats + 1):
            ids = torch.tensor([prompt_ids(i, vocab)])
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - t0
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            tokens = [int(tok)]
            t1 = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[0, -1].argmax()
                tokens.append(int(tok))
            decode = time.perf_counter() - t1
            if i:
                best_p, best_d = max(best_p, PROMPT_TOKENS / prefill), max(best_d, (NEW_TOKENS - 1) / decode)
            else:
                first_tokens = tokens[:8]
    del model
    gc.collect()
    return {"threads": THREADS, "prefill_tok_s": best_p, "decode_tok_s": best_d, "tokens": first_tokens}


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of a large numpy array, best of `repeats`."""
    src = np.ones(size_mb << 20, np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best / 1e9


# Inputs that a decode step reads one row of, not whole: the embedding table (Gather data) and the
# rotary cos/sin caches of GroupQueryAttention (inputs 7 and 8).
ROW_READ_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0,), "GroupQueryAttention": (7, 8)}


def weight_bytes_per_token(model_file: Path) -> dict:
    """Bytes of initializers a decode step reads, by the graph's structure (any builder's names).

    Counts every initializer some node reads whole: MatMulNBits packed weights + scales + zero
    points (int4 body, 8-bit lm_head), float MatMuls, norms, biases. Excludes an initializer only
    when every reader takes one row of it (ROW_READ_INPUTS); a tied table that also feeds a MatMul counts.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    m = onnx.load(str(model_file), load_external_data=False)
    size = {i.name: int(np.prod(i.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(i.data_type)).itemsize
            for i in m.graph.initializer}
    whole, rows = set(), set()
    for node in m.graph.node:
        row_slots = ROW_READ_INPUTS.get(node.op_type, ())
        for k, name in enumerate(node.input):
            if name in size:
                (rows if k in row_slots else whole).add(name)
    counted = {n for n in size if n in whole or n not in rows}
    reader: dict[str, str] = {}  # the op an initializer is booked under: a MatMul kind if any reads it
    for node in m.graph.node:
        for name in node.input:
            if name in counted and (name not in reader or node.op_type.startswith("MatMul")):
                reader[name] = node.op_type
    by_op: dict[str, int] = {}
    for name in counted:
        by_op[reader.get(name, "(unused)")] = by_op.get(reader.get(name, "(unused)"), 0) + size[name]
    return {"bytes": sum(by_op.values()), "by_op": {k: v for k, v in sorted(by_op.items()) if v},
            "row_read_bytes": sum(size[n] for n in rows - whole)}


def dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 2**20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_process(bundle_dir: Path | None, public: Path | None, *, vocab: int = 0) -> dict:
    """Start an agent API process (optionally loading the bundle); time to /readyz, RSS when ready."""
    import httpx

    # The child imports only what the agent imports (not this script's numpy): a fair idle RSS.
    args = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from bench.serve_child import main; main(sys.argv[1:])"]
    if bundle_dir is not None:
        args += [str(bundle_dir), str(public)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = int(proc.stdout.readline())
        ready = None
        while time.perf_counter() - t0 < 600:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if r.status_code == 200 or bundle_dir is None:
                    ready = time.perf_counter() - t0
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        out = {"ready_s": ready, "rss_mb": rss_mb(proc.pid)}
        if bundle_dir is not None:
            name = json.loads((bundle_dir / "manifest.json").read_text())["name"]
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600,
                           json={"model": name, "prompt": prompt_ids(0, vocab), "max_tokens": NEW_TOKENS,
                                 "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            out["rss_after_generation_mb"] = rss_mb(proc.pid)
            out["bundle_mb"] = dir_mb(bundle_dir)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


# ---- one model, every variant --------------------------------------------------------------------


def build(shape: Shape, *, genai: bool) -> dict[str, Path]:
    """Every cached artifact this shape's run needs: {variant: bundle or model directory}."""
    src = hf_dir(shape)
    built = {"hf": src, "edgeship": edgeship_bundle(src, profile_for_host()),
             "edgeship_scan": edgeship_bundle(src, str(scan_profile(profile_for_host())))}
    if shape.optimum_graph:
        built["optimum"] = optimum_bundle(src)
    if genai:
        from bench import genai_speed

        if genai_speed.VENV_PY.exists():
            built["genai"] = genai_speed.build(src)
            built["genai_gqa"] = gqa_bundle(built["genai"], src)
        else:
            log(f"{genai_speed.VENV_PY} missing; see bench/genai_speed.py's docstring (genai skipped)")
    return built


def with_bandwidth(r: dict, model_file: Path, bandwidth_gbs: float) -> dict:
    """r plus the weight bytes per decoded token of `model_file` and the bandwidth fraction decode reaches."""
    w = weight_bytes_per_token(model_file)
    return r | {"weight_bytes_per_token": w["bytes"], "weight_bytes_by_op": w["by_op"],
                "decode_bandwidth_fraction": w["bytes"] * r["decode_tok_s"] / (bandwidth_gbs * 1e9)}


def merged(parts: list[dict]) -> dict:
    """One variant's rounds as one result: every timed run kept, best and median of them."""
    out = dict(parts[0])
    for key in ("prefill", "decode"):
        runs = [x for p in parts for x in p[f"{key}_runs"]]
        out[f"{key}_runs"] = runs
        out[f"{key}_tok_s"] = max(runs)
        out[f"{key}_tok_s_median"] = statistics.median(runs)
    return out


def run_shape(shape: Shape, *, bandwidth_gbs: float, genai: bool, torch: bool, repeats: int, rounds: int) -> dict:
    """Every variant, `rounds` times in turn (machine load drifts over minutes: each round meets it alike)."""
    built = build(shape, genai=genai)
    _, public = keys()
    v = shape.vocab
    agent_variants = {"edgeship export default": (built["edgeship"], True),
                      "edgeship export, spin_wait off": (built["edgeship"], False),
                      "edgeship, lm_head 4-bit scan": (built["edgeship_scan"], True)}
    if "optimum" in built:
        agent_variants["optimum graph (int4 sym)"] = (built["optimum"], True)
    if "genai_gqa" in built:
        agent_variants["agent on genai's graph"] = (built["genai_gqa"], True)
    parts: dict[str, list[dict]] = {}
    for rnd in range(1, rounds + 1):
        for name, (bundle, spin) in agent_variants.items():
            log(f"{shape.label} round {rnd}/{rounds}: {name} ...")
            r = measure_runtime(bundle, public, vocab=v, repeats=repeats, spin=spin)
            parts.setdefault(name, []).append(with_bandwidth(r, bundle / "model.onnx", bandwidth_gbs))
        if "genai" in built:
            from bench import genai_speed

            log(f"{shape.label} round {rnd}/{rounds}: onnxruntime-genai ...")
            g = genai_speed.run(built["hf"], prompt_ids(1, v), new_tokens=NEW_TOKENS, repeats=repeats)
            for r in g["runs"]:
                parts.setdefault(f"onnxruntime-genai int4 {r['label']}", []).append(with_bandwidth(
                    r | {"bundle_mb": g["model_mb"]}, built["genai"] / "model.onnx", bandwidth_gbs))
    runs = {name: merged(p) for name, p in parts.items()}
    details = CACHE / f"{built['edgeship'].name}.export.json"
    if details.exists():
        runs["edgeship export default"]["export"] = json.loads(details.read_text())
    if torch:
        log(f"{shape.label}: pytorch fp32 ...")
        runs["pytorch fp32"] = measure_torch(built["hf"], vocab=v, repeats=max(1, repeats - 1))
    log(f"{shape.label}: agent process loading the edgeship bundle ...")
    loaded = serve_process(built["edgeship"], public, vocab=v)
    return {"label": shape.label, "config": shape.config, "profile": profile_for_host(),
            "paths": {k: str(p) for k, p in built.items()}, "runs": runs, "loaded": loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*SHAPES, "all"], default="tinyllama-1.1b")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--genai", action="store_true", help="also run onnxruntime-genai in bench/.venv-genai")
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per variant and round (after a warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="times every variant runs, in turn")
    ap.add_argument("--build", action="store_true", help="only build the cached models, measure nothing")
    args = ap.parse_args()

    from agent.runtime import cpu_facts

    shapes = list(SHAPES.values()) if args.model == "all" else [SHAPES[args.model]]
    if args.build:
        for shape in shapes:
            for k, p in build(shape, genai=args.genai).items():
                log(f"{shape.label} {k}: {p}")
        return
    facts = cpu_facts()
    log(f"host: {facts}")
    for shape in shapes:  # build everything before measuring anything
        build(shape, genai=args.genai)
    res: dict = {"host": facts, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
                 "rounds": args.rounds}
    log("memory bandwidth (numpy copy) ...")
    res["bandwidth_gbs"] = memory_bandwidth_gbs()
    log("agent process without a model ...")
    res["idle"] = serve_process(None, None)
    res["models"] = {}
    for key, shape in SHAPES.items():
        if shape in shapes:
            res["models"][key] = run_shape(shape, bandwidth_gbs=res["bandwidth_gbs"], genai=args.genai,
                                           torch=not args.skip_torch, repeats=args.repeats, rounds=args.rounds)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


# ---- printing ------------------------------------------------------------------------------------


def report(res: dict) -> None:
    h = res["host"]
    print(f"\nhost: {h['model']} ({h['arch']}), usable cores {h['cores_usable']}, flags {' '.join(h['flags'])}")
    print(f"memory bandwidth (numpy copy): {res['bandwidth_gbs']:.1f} GB/s; prompt {res['prompt_tokens']} tokens, "
          f"{res['new_tokens']} new, greedy; {res.get('rounds', 1)} rounds of every variant in turn, {res['repeats']} "
          "timed runs each after a warm-up: best (median)")
    idle = res["idle"]
    print(f"agent process RSS without a model: {idle['rss_mb']:.1f} MB (ready in {idle['ready_s']:.2f} s)")
    for m in res["models"].values():
        report_shape(m)


def report_shape(m: dict) -> None:
    runs = m["runs"]
    print(f"\n== {m['label']} (random weights), profile {m['profile']} ==")
    print(f"{'variant':34} {'threads':>7} {'MB':>6} {'prefill tok/s':>16} {'decode tok/s':>15} "
          f"{'GB/token':>8} {'% of bw':>7}")

    def both(r: dict, key: str) -> str:
        med = r.get(f"{key}_tok_s_median")
        return f"{r[f'{key}_tok_s']:.1f}" + (f" ({med:.1f})" if med is not None else "")

    for name, r in runs.items():
        gb = f"{r['weight_bytes_per_token'] / 1e9:.3f}" if "weight_bytes_per_token" in r else "-"
        bw = f"{r['decode_bandwidth_fraction'] * 100:.0f}%" if "decode_bandwidth_fraction" in r else "-"
        mb = f"{r['bundle_mb']:.0f}" if "bundle_mb" in r else "-"
        print(f"{name:34} {r['threads']!s:>7} {mb:>6} {both(r, 'prefill'):>16} {both(r, 'decode'):>15} {gb:>8} {bw:>7}")
    ours = runs["edgeship export default"]
    if "export" in ours:
        e = ours["export"]
        q = e["quantization"]
        print(f"edgeship export: {q.get('recipe')}, graph {q.get('details', {}).get('graph')}, "
              f"8-bit blocks {q.get('details', {}).get('int8_block_nodes')}, quality {e['quality_status']} "
              f"(random weights), export {e['wall_s']:.0f} s, "
              f"peak RSS {e['stats'].get('peak_rss_mb', 0) / 1024:.1f} GB")
    def ratio(key: str, r: dict) -> str:
        best = f"{ours[f'{key}_tok_s'] / r[f'{key}_tok_s']:.2f}x"
        if f"{key}_tok_s_median" in r:
            best += f" (medians {ours[f'{key}_tok_s_median'] / r[f'{key}_tok_s_median']:.2f}x)"
        return best

    for name, r in runs.items():
        if name != "edgeship export default":
            print(f"edgeship export default / {name}: prefill {ratio('prefill', r)}, decode {ratio('decode', r)}")
    if m["label"].startswith("TinyLlama"):
        print(f"vs the issue's figures: decode {ours['decode_tok_s'] / 17.5:.2f}x genai default (17.5), "
              f"{ours['decode_tok_s'] / 33:.2f}x genai tuned (33); prefill {ours['prefill_tok_s'] / 71:.2f}x "
              "llama.cpp (71)")
    loaded = m["loaded"]
    print(f"agent process with the edgeship bundle ({loaded['bundle_mb']:.0f} MB): {loaded['rss_mb']:.0f} MB RSS "
          f"loaded, {loaded['rss_after_generation_mb']:.0f} MB after a generation = "
          f"{loaded['rss_after_generation_mb'] / loaded['bundle_mb']:.2f}x the bundle; start to /readyz "
          f"{loaded['ready_s']:.1f} s")


if __name__ == "__main__":
    main()
