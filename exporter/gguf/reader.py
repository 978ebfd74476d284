"""A GGUF file's metadata and tensors (via the `gguf` package, memory-mapped), as weights for graph.py.

Quantized tensors of a type repack.py maps come out as exact `BlockWeight`s; F32/F16/BF16 come out
as float32 arrays; any other quantized type is dequantized with `gguf.quants` (float, exact values)
and counted as such, so the summary can say per type what happened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import SourceError
from exporter.gguf.repack import FORMATS, BlockWeight, decode

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class TypeReport:
    """What happened to the GGUF tensors, per GGUF type: kept exactly (MatMulNBits) or in float."""

    exact: Counter = field(default_factory=Counter)  # type -> tensors kept as GGUF blocks
    float: Counter = field(default_factory=Counter)  # type -> tensors run in float32
    dequantized: Counter = field(default_factory=Counter)  # quantized types we cannot map, run in float

    def as_dict(self) -> dict[str, Any]:
        types = sorted(set(self.exact) | set(self.float) | set(self.dequantized))
        out: dict[str, Any] = {}
        for t in types:
            if self.exact[t]:
                out[t] = {"tensors": self.exact[t], "handling": "exact: GGUF blocks repacked into MatMulNBits / GatherBlockQuantized"}
            if self.dequantized[t]:
                out.setdefault(t, {"tensors": 0})
                out[t]["tensors"] += self.dequantized[t]
                out[t]["handling"] = "dequantized to float32 (no exact MatMulNBits mapping for this type)"
            if self.float[t]:
                out.setdefault(t, {"tensors": 0})
                out[t]["tensors"] += self.float[t]
                out[t]["handling"] = "float32 (norms, biases and unquantized weights)"
        return out


class GgufFile:
    """Metadata and tensors of one .gguf file."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"GGUF file {str(self.path)!r} not found; pass the path of a .gguf file")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # the gguf package raises ValueError/struct.error/... on bad files
            raise SourceError(f"{self.path} is not a readable GGUF file ({exc}); check the download") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.report = TypeReport()

    def meta(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            return default
        value = f.contents()
        return default if value is None else value

    @property
    def architecture(self) -> str:
        return str(self.meta("general.architecture", ""))

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> Any:
        """The gguf package's tensor `name`; a SourceError naming it when the file lacks it."""
        t = self.tensors.get(name)
        if t is None:
            raise SourceError(f"{self.path.name}: tensor {name!r} is missing; the file is incomplete or not a "
                              f"{self.architecture or 'known'} model as llama.cpp writes it (re-convert or re-download it)")
        return t

    def type_of(self, name: str) -> str:
        return self.tensor(name).tensor_type.name

    def vector(self, name: str) -> np.ndarray:
        """A 1-D float tensor (norm weights, biases, rope factors) as float32."""
        t = self.tensor(name)
        self.report.float[t.tensor_type.name] += 1
        return self._float(name).reshape(-1)

    def weight(self, name: str, *, rows: np.ndarray | None = None) -> BlockWeight | np.ndarray:
        """A 2-D weight [N, K] (ggml stores ne = [K, N]): exact blocks where the type maps, else float32."""
        t = self.tensor(name)
        kind = t.tensor_type.name
        k = int(t.shape[0])
        if kind in FORMATS:
            w: BlockWeight | np.ndarray = decode(kind, np.asarray(t.data).reshape(int(t.shape[1]), -1), k)
            self.report.exact[kind] += 1
            return w if rows is None else w.take_rows(rows)
        if kind in FLOAT_TYPES:
            self.report.float[kind] += 1
        else:
            self.report.dequantized[kind] += 1
        w = self._float(name).reshape(-1, k)
        return w if rows is None else w[rows]

    def dense(self, name: str) -> np.ndarray:
        """Any tensor dequantized to float32 in numpy's order ([N, K] for a weight), outside the type report."""
        t = self.tensor(name)
        return self._float(name).reshape(tuple(int(n) for n in reversed(t.shape)))

    def _float(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensor(name)
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        if kind == "F32":
            return data.astype(np.float32)
        if kind == "F16":
            return data.astype(np.float32)
        try:
            return np.asarray(dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32)
        except (NotImplementedError, KeyError):
            raise SourceError(
                f"tensor {name!r} has GGUF type {kind}, which can neither be kept exactly nor dequantized; "
                f"exact types: {', '.join(FORMATS)}; float types: {', '.join(FLOAT_TYPES)}"
            ) from None
