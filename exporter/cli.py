"""`edgeship export MODEL --profile P --out DIR --key KEY`: parse into an ExportRequest, run_export it, print.

Exit codes: 0 bundle written (also with --force when the gate failed: the manifest says
failed-quality), 1 quality gate failed (no bundle), 2 bad input (one line saying what to change).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from exporter.profiles import available_profiles

EXIT_GATE = 1
EXIT_INPUT = 2


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """--json: while the export runs, file descriptor 1 points at stderr, so that native libraries writing to
    it (QNN's HTP backend prints a "# LIBNATIVE: ..." line) cannot put text before the JSON document."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _threshold(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip().replace("-", "_")] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: write NAME=NUMBER, e.g. min_top1_agreement=0.9") from None
    return out


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--profile", default="cpu-x86-avx2", show_default=True,
              help=f"Target profile: {', '.join(available_profiles())}, or a path to a .toml profile.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--key", default="keys/edgeship.key", show_default=True, type=click.Path(path_type=Path),
              help="Ed25519 signing key (edgeship keys generate).")
@click.option("--task", type=click.Choice(["text-generation", "embedding", "text-classification"]),
              help="Default: what the checkpoint was trained for.")
@click.option("--quant", type=click.Choice(["int4", "int8", "fp16", "none"]),
              help="Override the profile's precision (on an NPU profile, int8 is the static QDQ graph: int8 weights, "
                   "uint16 activations).")
@click.option("--block-size", type=int, help="int4: weights per quantization block (power of two, >= 16).")
@click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "3", "4", "4x2", "exact", "auto"]),
              help="int4: MatMulNBits kernel, 0 exact math .. 4 int8 activations. GGUF only: auto (default) = the "
                   "fastest mix of levels 0/4 whose ppl change <= +0.5 %% and top-1 >= 97 %% (llama.cpp's own class; "
                   "--threshold changes the bar); exact = the GGUF's float math, its answers token for token; "
                   "4x2 = two-pass int8 decode (~float accuracy, a second packed copy of big linears in RAM).")
@click.option("--symmetric/--asymmetric", default=None, help="int4: symmetric (no zero points) or asymmetric weights.")
@click.option("--int4-algorithm", "algorithm", type=click.Choice(["rtn", "hqq"]),
              help="int4: round-to-nearest (fast) or HQQ (slower, lower error). Default: the profile's; hqq for GGUF.")
@click.option("--exclude", multiple=True, help="Keep MatMuls whose node name contains this in float (repeatable).")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a quality threshold, e.g. min_top1_agreement=0.9 or max_ppl_delta=0.05 (repeatable).")
@click.option("--eval-text", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Evaluation text (.txt, or .jsonl with a \"text\" field); default: a built-in English text.")
@click.option("--calibration-text", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration text for static quantization (NPU profiles).")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="LoRA/PEFT adapter directory merged into the model before export.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of a hub model.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (hub models).")
@click.option("--requantize", is_flag=True,
              help="GGUF: dequantize with transformers and requantize with the profile's recipe instead of importing the GGUF weights as they are.")
@click.option("--graph", type=click.Choice(["auto", "native", "optimum"]), default="auto", show_default=True,
              help="LM graph: native = edgeship's builder with fused GroupQueryAttention (CPU targets, supported "
                   "architectures), optimum = traced by optimum; auto = native where it applies.")
@click.option("--ep-context", is_flag=True,
              help="NPU profiles: also write the HTP-compiled EP context (model_ctx.onnx; LMs also "
                   "model_decode_ctx.onnx) so the device skips compiling.")
@click.option("--name", help="Bundle name (default: from the model).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Bundle version (semver).")
@click.option("--force", is_flag=True, help="Write the bundle even if the quality gate fails (marked failed-quality).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out directory.")
@click.option("--no-benchmark", is_flag=True, help="Skip the host speed benchmark.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (no progress).")
def cli(model: str, profile: str, out: Path, key: Path, task: str | None, quant: str | None, block_size: int | None,
        accuracy_level: str | None, symmetric: bool | None, algorithm: str | None, exclude: tuple[str, ...], thresholds: tuple[str, ...],
        eval_text: Path | None, calibration_text: Path | None, adapter: Path | None, revision: str | None,
        trust_remote_code: bool, requantize: bool, graph: str, ep_context: bool, name: str | None, version: str, force: bool, overwrite: bool,
        no_benchmark: bool, as_json: bool) -> None:
    """Export MODEL (hub id, local directory or .gguf file) to a signed, validated bundle in --out.

    \f
    One parameter per option, because click passes each option by name; they go straight into an
    ExportRequest, which validates them all at once."""
    from exporter.errors import ExportError, QualityGateFailed
    from exporter.profiles import ProfileError
    from exporter.progress import Progress, RichProgress, summary_table
    from exporter.request import ExportRequest
    from exporter.run import run_export

    progress = Progress() if as_json else RichProgress()
    try:
        request = ExportRequest(
            model=model, out=out, key=key, profile=profile, task=task, quant=quant, block_size=block_size,
            accuracy_level=accuracy_level, symmetric=symmetric, exclude=exclude or None, algorithm=algorithm,
            thresholds=_threshold(thresholds), force=force, overwrite=overwrite, name=name, version=version,
            revision=revision, trust_remote_code=trust_remote_code, adapter=adapter, eval_text=eval_text,
            calibration_text=calibration_text, requantize=requantize, graph=graph, ep_context=ep_context,
            benchmark=not no_benchmark,
        )
        with _stdout_to_stderr(as_json):
            result = run_export(request, progress=progress)
    except QualityGateFailed as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "quality": exc.report.model_dump(mode="json")}))
        else:
            from rich.console import Console

            Console(stderr=True).print(summary_table({}, exc.report))
            click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_GATE)
    except (ExportError, ProfileError) as exc:  # one line per problem (InvalidRequest has one per bad option)
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc)}))
        else:
            for line in str(exc).splitlines():
                click.echo(f"error: {line}", err=True)
        sys.exit(EXIT_INPUT)
    if as_json:
        click.echo(json.dumps({
            "ok": True,
            "bundle": str(result.bundle),
            "manifest": result.manifest.model_dump(mode="json"),
            "stats": result.stats,
        }))
        return
    from rich.console import Console

    console = Console()
    console.print(summary_table(result.stats, result.report))
    status = result.report.status.value
    console.print(f"bundle {result.manifest.ref} written to {result.bundle} (quality: {status})")
    if status != "passed":
        console.print("[red]warning:[/] this bundle FAILED its quality gate; agents refuse to deploy it")
