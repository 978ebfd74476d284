"""The bundle manifest: a versioned pydantic model, serialized to canonical JSON bytes.

The signature covers exactly the bytes of manifest.json, and manifest.json is always written in
canonical form (sorted keys, no whitespace, UTF-8), so the bytes can be checked before parsing.
Unknown fields are ignored (a newer exporter may add optional fields within a schema version);
an unknown `schema_version` is refused.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.bundle.errors import ManifestError, UnknownSchemaVersion

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Task(StrEnum):
    TEXT_GENERATION = "text-generation"
    EMBEDDING = "embedding"
    CLASSIFICATION = "text-classification"


class FileRole(StrEnum):
    MODEL = "model"
    EXTERNAL_DATA = "external-data"
    TOKENIZER = "tokenizer"
    CONFIG = "config"
    GOLDEN = "golden"
    EP_CONTEXT = "ep-context"
    OTHER = "other"


class QualityStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed-quality"  # written only with --force; the agent refuses to deploy it
    NOT_RUN = "not-run"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def check_relative_path(value: str) -> str:
    """A bundle path: relative, POSIX, no '..', no empty or '.' parts."""
    p = PurePosixPath(value)
    if (
        not value
        or value.startswith("/")
        or "\\" in value
        or any(part in ("", ".", "..") for part in value.split("/"))
        or p.is_absolute()
    ):
        raise ValueError(f"unsafe bundle path {value!r}: must be relative, without '..' or '\\'")
    return value


def semver_key(version: str) -> tuple:
    """Sort key for a semver string (pre-releases sort before their release)."""
    m = SEMVER_RE.match(version)
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    pre_key: tuple = (1,) if pre is None else (0, *((0, int(x)) if x.isdigit() else (1, x) for x in pre.split(".")))
    return (major, minor, patch, pre_key)


class FileEntry(_Model):
    path: str
    sha256: str
    size: int = Field(ge=0)
    role: FileRole = FileRole.OTHER

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_relative_path(v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not SHA256_RE.match(v):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {v!r}")
        return v


class ExecutionProvider(_Model):
    name: str  # e.g. "QNNExecutionProvider", "CPUExecutionProvider"
    options: dict[str, str] = {}


class Runtime(_Model):
    onnxruntime: str = ">=1.20"  # PEP 440 specifier the device's onnxruntime must satisfy
    execution_providers: list[ExecutionProvider] = [ExecutionProvider(name="CPUExecutionProvider")]
    intra_op_threads: int | None = None  # None: the agent uses the CPUs it may really use

    @field_validator("onnxruntime")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            SpecifierSet(v)
        except InvalidSpecifier as exc:
            raise ValueError(f"onnxruntime requirement {v!r} is not a version specifier") from exc
        return v


class Target(_Model):
    profile: str  # name of configs/targets/<profile>.toml
    arch: list[str] = ["x86_64", "aarch64"]  # platform.machine() values the bundle runs on
    cpu_features: list[str] = []  # e.g. ["avx2"]; the device must have all of them
    device_class: Literal["cpu", "npu", "gpu"] = "cpu"


class ModelSpec(_Model):
    """How to run the model: entry file and task-specific facts the runtime needs."""

    entry: str  # the ONNX file to load
    inputs: list[str] = []
    outputs: list[str] = []
    architecture: str | None = None  # e.g. "llama", "bert"
    # text-generation: num_layers, num_kv_heads, head_dim, max_context, eos_token_ids, ...
    # embedding: pooling, normalize, dim; classification: labels
    config: dict[str, Any] = {}

    @field_validator("entry")
    @classmethod
    def _entry(cls, v: str) -> str:
        return check_relative_path(v)


class Quantization(_Model):
    recipe: str = "fp32"  # e.g. "int4-matmulnbits-b32-acc4", "int8-dynamic-per-channel"
    precision: str = "fp32"
    details: dict[str, Any] = {}


class QualityReport(_Model):
    status: QualityStatus = QualityStatus.NOT_RUN
    reference: str = ""  # what the model was compared with, e.g. "pytorch fp32"
    metrics: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    failures: list[str] = []  # one line per metric over its threshold
    details: dict[str, Any] = {}


class Benchmark(_Model):
    host: dict[str, Any] = {}  # cpu model, features, cores used
    metrics: dict[str, float] = {}  # latency_ms, prefill_tok_s, decode_tok_s, ...


class Golden(_Model):
    """Golden inputs/outputs for the agent's smoke test (npz files inside the bundle)."""

    inputs: str
    outputs: str
    atol: float = 1e-3
    rtol: float = 1e-3
    latency_budget_ms: float | None = None  # per golden run on the device; None = no budget

    @field_validator("inputs", "outputs")
    @classmethod
    def _paths(cls, v: str) -> str:
        return check_relative_path(v)


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    task: Task
    target: Target
    runtime: Runtime = Runtime()
    model: ModelSpec
    files: list[FileEntry]
    quantization: Quantization = Quantization()
    quality: QualityReport = QualityReport()
    benchmark: Benchmark = Benchmark()
    golden: Golden | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    created_by: str = ""
    min_agent_version: str = "0.1.0"
    source: dict[str, Any] = {}  # model id / path, revision, adapter

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unknown manifest schema_version {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"bundle name {v!r} must match {NAME_RE.pattern}")
        return v

    @field_validator("version", "min_agent_version")
    @classmethod
    def _version(cls, v: str) -> str:
        semver_key(v)
        return v

    @field_validator("files")
    @classmethod
    def _unique(cls, v: list[FileEntry]) -> list[FileEntry]:
        seen: set[str] = set()
        for entry in v:
            if entry.path in seen:
                raise ValueError(f"file {entry.path!r} listed twice")
            if entry.path in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ValueError(f"{entry.path!r} cannot be listed as a bundle file")
            seen.add(entry.path)
        return v

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse manifest bytes; every failure is a ManifestError, never another exception."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest.json is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest.json is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        sv = data.get("schema_version")
        if sv not in SUPPORTED_SCHEMA_VERSIONS:
            raise UnknownSchemaVersion(
                f"manifest schema_version {sv!r} is not supported by this agent "
                f"(supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade edgeship"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"manifest.json: {loc}: {first['msg']}") from None


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def agent_version_satisfies(agent_version: str, minimum: str) -> bool:
    return Version(agent_version) >= Version(minimum)
