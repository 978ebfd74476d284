"""Target profiles: configs/targets/<name>.toml -> TargetProfile.

A profile says, for one kind of hardware, how to export: precision and quantization recipe per
task, opset, static or dynamic shapes, execution providers in order with their options, thread
defaults and quality thresholds. Users read, copy and edit them; `--profile PATH` takes a copy.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.bundle import ExecutionProvider

# A source checkout / editable install reads configs/targets; a wheel install gets the same files
# under <prefix>/share/edgeship (pyproject.toml [tool.setuptools.data-files]).
_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "configs" / "targets",
    Path(sys.prefix) / "share" / "edgeship" / "configs" / "targets",
)
TARGETS_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


class ProfileError(ValueError):
    """A profile that cannot be found or read."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Shapes(_M):
    static: bool = False  # NPUs compile fixed shapes; CPUs run dynamic ones
    sequence_length: int | None = None  # static: tokens per call
    max_context: int | None = None  # static LMs: KV-cache length


Method = Literal["none", "fp16", "int8-dynamic", "int4", "qdq-static"]


class QuantRecipe(_M):
    """One quantization choice. `method` picks the recipe; the rest are its knobs."""

    method: Method = "none"
    per_channel: bool = True
    block_size: int = 32  # int4 MatMulNBits
    accuracy_level: int = 4  # MatMulNBits: 0 = exact math, 4 = int8 activations (fast on CPU)
    symmetric: bool = False
    exclude: list[str] = []  # node/initializer name patterns kept in float (e.g. "lm_head")
    # int4: excluded MatMuls matching these patterns get 8-bit blocks (MatMulNBits bits=8) instead of
    # float: near-float quality at a quarter of the bytes decode reads for them (e.g. "lm_head")
    int8_blocks: list[str] = []
    # int4, native LM graph, with "lm_head" in int8_blocks: every logit from 4-bit blocks (the fewest bytes
    # decode reads per token), then each position's top k recomputed in float32 from the 8-bit blocks
    # (exporter.graph.decoder.ScannedHead). None: the whole head in 8-bit blocks.
    lm_head_top_k: int | None = None

    @property
    def int8_head(self) -> bool:
        """int4 with the lm_head kept out of 4 bits but given 8-bit blocks (int8_blocks) instead of float."""
        return self.method == "int4" and "lm_head" in self.int8_blocks and "lm_head" in self.exclude
    activation_type: Literal["uint8", "uint16", "int8", "int16"] = "uint8"  # qdq-static
    weight_type: Literal["uint8", "int8"] = "int8"  # qdq-static / int8-dynamic
    # int8-dynamic: int8 weights in 7 bits (onnxruntime's reduce_range). x86 CPUs without VNNI multiply
    # uint8 activations by int8 weights with VPMADDUBSW, which adds each pair of products in a saturating
    # int16: with full-range weights a large activation range overflows it (SmolLM2 requantized to int8:
    # ppl x97, top-1 17 % on an AMD EPYC, fine on a VNNI Xeon). 7-bit weights keep every pair in range.
    # TargetProfile.task() sets it where the profile's CPUs may lack VNNI (int8_saturates); True here forces it.
    reduce_range: bool = False
    mixed_precision: bool = False  # keep the most sensitive layers in float until the gate passes
    calibration_samples: int = 32
    # int4: "rtn" rounds each block to its min/max grid (fast); "hqq" fits scales and float zero
    # points to minimise the error (slower, better; recovers GGUF Q4_1/Q4_K grids almost exactly).
    algorithm: Literal["rtn", "hqq"] = "rtn"
    # LMs: a Linear whose input has max|x| / mean|x| above this on the evaluation text (the "massive
    # activations" of e.g. SmolLM2's down_proj) stays float; None keeps every Linear quantized.
    outlier_ratio: float | None = 200.0
    # qdq-static LMs on the HTP (exporter/npu_recipe.py): node groups kept float, which the HTP runs in
    # fp16 ("residual": the Adds carrying the residual stream, "norm": the RMSNorms reading it). Needs the
    # profile's QNN options enable_htp_fp16_precision = "1" and soc_model.
    float_regions: list[Literal["residual", "norm"]] = []


class Thresholds(_M):
    """Quality gate: each metric present is checked. min_* are lower bounds, max_* upper bounds."""

    min_top1_agreement: float | None = None  # LM next-token argmax agreement with reference
    min_greedy_match: float | None = None  # fraction of greedy tokens identical to reference
    max_ppl_delta: float | None = None  # relative perplexity change, e.g. 0.05 = +5%
    min_logits_cosine: float | None = None
    max_logits_abs_diff: float | None = None
    min_cosine_mean: float | None = None  # embeddings
    min_cosine_min: float | None = None
    min_batch_cosine: float | None = None  # a text alone vs in a padded batch (dynamic-shape graphs)
    min_label_agreement: float | None = None  # classification

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TaskSettings(_M):
    quantization: QuantRecipe = QuantRecipe()
    thresholds: Thresholds = Thresholds()
    # the gate for a recipe method `--quant` picks instead of quantization.method, in place of `thresholds`
    # (e.g. the NPU's fp16 LMs answer as the model does, so a looser QDQ bar would let a worse one through)
    quant_thresholds: dict[Method, Thresholds] = {}

    def thresholds_for(self, method: str) -> Thresholds:
        """The gate for a recipe of `method`: its own thresholds where the profile names them, else the task's."""
        return self.quant_thresholds.get(method, self.thresholds)  # type: ignore[call-overload]


class TargetProfile(_M):
    name: str
    description: str = ""
    device_class: Literal["cpu", "npu", "gpu"] = "cpu"
    arch: list[str] = ["x86_64", "aarch64"]
    cpu_features: list[str] = []
    opset: int = 17
    shapes: Shapes = Shapes()
    execution_providers: list[ExecutionProvider] = [ExecutionProvider(name="CPUExecutionProvider")]
    intra_op_threads: int = 0  # 0: the agent uses the CPUs it may really use
    onnxruntime: str = ">=1.20"
    tasks: dict[Literal["text-generation", "embedding", "text-classification"], TaskSettings] = Field(default_factory=dict)

    @property
    def int8_saturates(self) -> bool:
        """True when the profile's CPUs may lack VNNI (x86 without avx512_vnni / avx_vnni among the features it
        requires): their uint8 x int8 dot products saturate in int16, so int8-dynamic weights need 7 bits."""
        return (self.device_class == "cpu" and "x86_64" in self.arch
                and not {"avx512_vnni", "avx_vnni"} & set(self.cpu_features))

    def task(self, task: str) -> TaskSettings:
        try:
            settings = self.tasks[task]  # type: ignore[index]
        except KeyError:
            raise ProfileError(
                f"profile {self.name!r} has no settings for task {task!r}; it covers: {', '.join(self.tasks) or 'none'}"
            ) from None
        if self.int8_saturates and not settings.quantization.reduce_range:  # whatever method --quant picks later
            settings = settings.model_copy(update={"quantization": settings.quantization.model_copy(update={"reduce_range": True})})
        return settings


def available_profiles() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> TargetProfile:
    """A built-in profile by name (`cpu-x86-avx2`) or a TOML file by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = TARGETS_DIR / f"{name_or_path}.toml"
        if not p.exists():
            raise ProfileError(
                f"unknown target profile {str(name_or_path)!r}; built-in: {', '.join(available_profiles())} "
                "(or pass a path to a .toml profile)"
            )
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {p} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {p} is not valid TOML: {exc}") from None
    data.setdefault("name", p.stem)
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ProfileError(f"profile {p}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
