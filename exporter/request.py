"""`ExportRequest`: every option of one export, validated once, before any file is read.

    ExportRequest(model="org/name", out="bundles/x", key="keys/edgeship.key", quant="int4", ...)

A bad option raises InvalidRequest (an ExportError) with one line per bad field, each naming the
option as the CLI spells it, the value, and what to write instead. What can only be checked against
the world (the key file, the output directory, the model's architecture, free disk space) is
checked by `exporter.run.run_export`, still before any weights are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from agent.bundle.manifest import NAME_RE, SEMVER_RE
from exporter.errors import ExportError
from exporter.gguf.levels import EXACT, SEARCH, TWO_PASS
from exporter.profiles import ProfileError, QuantRecipe, TargetProfile, Thresholds, load_profile
from exporter.quantize import QUANT_CHOICES, quant_method

TASKS = ("text-generation", "embedding", "text-classification")
GRAPHS = ("auto", "native", "optimum")
INT4_ALGORITHMS = ("rtn", "hqq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4, TWO_PASS, EXACT, SEARCH)
GGUF_ONLY_LEVELS = (TWO_PASS, EXACT, SEARCH)


class InvalidRequest(ExportError):
    """One or more options are wrong; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def _one_of(value: Any, choices: Any, problem: str) -> Any:
    """`value` when it is unset (None) or one of `choices`; else ValueError(problem)."""
    if value is not None and value not in choices:
        raise ValueError(problem)
    return value


def _flag(name: str) -> str:
    return {"algorithm": "--int4-algorithm", "thresholds": "--threshold", "benchmark": "--no-benchmark",
            "model": "MODEL"}.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked for: the model, the target and the recipe overrides, each checked on its own.

    Paths are made absolute, `profile` is loaded into a TargetProfile, `accuracy_level` "3" becomes 3
    ("4x2" stays), `exclude` becomes a tuple and `thresholds` a read-only mapping.
    """

    model: str | Path
    out: str | Path
    key: str | Path
    profile: str | Path | TargetProfile = "cpu-x86-avx2"
    task: str | None = None
    # recipe overrides (None: the profile's)
    quant: str | None = None
    block_size: int | None = None
    accuracy_level: int | str | None = None
    symmetric: bool | None = None
    exclude: tuple[str, ...] | list[str] | None = None
    algorithm: str | None = None
    thresholds: Mapping[str, float] | None = None
    # the source
    revision: str | None = None
    trust_remote_code: bool = False
    adapter: str | Path | None = None
    requantize: bool = False
    graph: str = "auto"
    eval_text: str | Path | None = None
    calibration_text: str | Path | None = None
    # the bundle
    name: str | None = None
    version: str = "1.0.0"
    ep_context: bool = False
    force: bool = False
    overwrite: bool = False
    benchmark: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            check = getattr(self, f"_check_{f.name}", None)
            if check is None:
                continue
            try:
                value = check(getattr(self, f.name))
            except (ValueError, TypeError) as exc:  # ProfileError is a ValueError
                line, flag = str(exc), _flag(f.name)
                problems.append(line if line.startswith(flag) else f"{flag}: {line}")
            else:
                object.__setattr__(self, f.name, value)
        if problems:
            raise InvalidRequest(problems)

    # --- one check per field: the normalized value, or ValueError with the field's one line --------

    @staticmethod
    def _check_model(value: Any) -> str | Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(f"MODEL {value!r}: give a hub id (org/name), a local directory or a .gguf file")
        return value

    @staticmethod
    def _check_out(value: Any) -> Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(f"--out {value!r}: give the bundle directory to write")
        return Path(value).expanduser().resolve()

    @staticmethod
    def _check_key(value: Any) -> Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(f"--key {value!r}: give the Ed25519 signing key file (edgeship keys generate)")
        return Path(value).expanduser()

    @staticmethod
    def _check_profile(value: Any) -> TargetProfile:
        if isinstance(value, TargetProfile):
            return value
        if not isinstance(value, (str, Path)):
            raise ValueError(f"--profile {value!r}: give a profile name or a path to a .toml profile")
        try:
            return load_profile(value)
        except ProfileError as exc:
            raise ValueError(str(exc)) from None

    @staticmethod
    def _check_task(value: Any) -> str | None:
        return _one_of(value, TASKS, f"--task {value!r}: choose one of: {', '.join(TASKS)}")

    @staticmethod
    def _check_quant(value: Any) -> str | None:
        return _one_of(value, QUANT_CHOICES, f"--quant {value!r}: choose one of: {', '.join(QUANT_CHOICES)}")

    @staticmethod
    def _check_block_size(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"--block-size {value} must be a power of two >= 16 (e.g. 32, 64, 128)")
        return value

    @staticmethod
    def _check_accuracy_level(value: Any) -> int | str | None:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if value is not None and (isinstance(value, bool) or value not in ACCURACY_LEVELS):
            raise ValueError(f"--accuracy-level {value} must be 0-4 (0 exact, 4 int8 activations), or {TWO_PASS}, "
                             f"{EXACT} or {SEARCH} for exact GGUF imports")
        return value

    @staticmethod
    def _check_exclude(value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"--exclude {value!r}: give node-name patterns, one per --exclude")
        return tuple(value)

    @staticmethod
    def _check_algorithm(value: Any) -> str | None:
        return _one_of(value, INT4_ALGORITHMS, f"--int4-algorithm {value!r}: choose rtn (round to nearest) or hqq")

    @staticmethod
    def _check_thresholds(value: Any) -> Mapping[str, float]:
        value = dict(value or {})
        unknown = sorted(set(value) - set(Thresholds.model_fields))
        if unknown:
            raise ValueError(f"unknown threshold {unknown[0]!r}; known: {', '.join(Thresholds.model_fields)}")
        try:
            clean = {k: float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"--threshold {value!r}: write NAME=NUMBER, e.g. min_top1_agreement=0.9") from None
        return MappingProxyType(clean)

    @staticmethod
    def _check_graph(value: Any) -> str:
        if value not in GRAPHS:
            raise ValueError(f"--graph {value!r}: choose auto, native or optimum")
        return value

    @staticmethod
    def _check_name(value: Any) -> str | None:
        if value is not None and not (isinstance(value, str) and NAME_RE.match(value)):
            raise ValueError(f"--name {value!r}: use 1-64 lower-case letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
        return value

    @staticmethod
    def _check_version(value: Any) -> str:
        if not (isinstance(value, str) and SEMVER_RE.match(value)):
            raise ValueError(f"--version {value!r}: write a semantic version, e.g. 1.0.0 or 2.1.0-rc.1")
        return value

    @classmethod
    def _path_or_none(cls, name: str, value: Any) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(f"{_flag(name)} {value!r}: give a path")
        return Path(value).expanduser()

    @staticmethod
    def _check_adapter(value: Any) -> str | Path | None:
        if value is not None and (not isinstance(value, (str, Path)) or not str(value).strip()):
            raise ValueError(f"--adapter {value!r}: give the adapter's directory (or hub id)")
        return value  # resolve_source reads it

    def _check_eval_text(self, value: Any) -> Path | None:
        return self._path_or_none("eval_text", value)

    def _check_calibration_text(self, value: Any) -> Path | None:
        return self._path_or_none("calibration_text", value)

    def recipe(self, base: QuantRecipe, *, gguf_requantize: bool = False, device_class: str = "cpu") -> QuantRecipe:
        """The profile's recipe `base` with this request's overrides on top (GGUF weights requantized:
        HQQ by default, which refits their affine grid almost exactly; `--quant` read for `device_class`)."""
        update: dict[str, Any] = {}
        if self.quant is not None:
            update["method"] = quant_method(self.quant, device_class)
            if update["method"] != base.method and self.exclude is None and update["method"] in ("int4", "int8-dynamic"):
                update["exclude"] = base.exclude or ["lm_head"]
        if self.block_size is not None:
            update["block_size"] = self.block_size
        if self.accuracy_level is not None and self.accuracy_level not in GGUF_ONLY_LEVELS:
            update["accuracy_level"] = self.accuracy_level
        if self.symmetric is not None:
            update["symmetric"] = self.symmetric
        if self.exclude is not None:
            update["exclude"] = list(self.exclude)
        algorithm = "hqq" if self.algorithm is None and gguf_requantize else self.algorithm
        if algorithm is not None:
            update["algorithm"] = algorithm
        return base.model_copy(update=update)

    def thresholds_over(self, base: Thresholds) -> Thresholds:
        """The profile's thresholds `base` with this request's on top."""
        return base.model_copy(update=dict(self.thresholds)) if self.thresholds else base


def bundle_name(spec: str) -> str:
    """A valid bundle name from a model id, directory or .gguf file name."""
    stem = Path(spec.rstrip("/")).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return (name or "model")[:64]
