"""GGUF quantized blocks -> MatMulNBits weights, exactly (pure numpy).

Every supported GGUF type is, per block of the input dimension, `w = scale * (code - zero_point)`
optionally plus a per-block `offset` (the "min" of Q4_1, Q5_1, Q2_K, Q4_K, Q5_K). `decode()` reads
the codes, scales and offsets out of the raw GGUF rows without rounding anything; `BlockWeight`
then packs them the way com.microsoft.MatMulNBits reads them:

- codes of `bits` (4 or 8) packed low-first along the input dimension, [N, K/block, block*bits/8];
  ggml keeps elements j and j+16 of a block in one byte, MatMulNBits keeps neighbours together;
- scales float32 [N, K/block]; integer zero points, omitted when MatMulNBits' default (2^(bits-1))
  is the right one;
- offsets (float32 [N, K/block]) are NOT zero points: float zero points are exact but 26-40x slower
  on CPU. The graph adds them as `blocksum(x) @ offsets^T` (see graph.py).

Codes wider than 4 bits (Q5_*, Q5_K, Q6_K) sit in an 8-bit container; values are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

QK_K = 256  # elements in a K-quant super-block


@dataclass(frozen=True)
class BlockWeight:
    """A [N, K] weight as `scale * (code - zero_point) + offset` per block of `block_size` along K."""

    ggml_type: str
    bits: int  # MatMulNBits container: 4 or 8
    block_size: int
    codes: np.ndarray  # uint8 [N, K], each < 2**bits
    scales: np.ndarray  # float32 [N, K // block_size]
    zero_point: int | np.ndarray  # one for all blocks (GGUF types), or uint8 [N, K // block_size]
    offsets: np.ndarray | None  # float32 [N, K // block_size], or None when the type has no min

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.bits not in (4, 8) or k % self.block_size:
            raise ValueError(f"bad BlockWeight: bits={self.bits}, K={k}, block_size={self.block_size}")
        if self.scales.shape != (n, k // self.block_size):
            raise ValueError(f"scales shape {self.scales.shape} does not fit codes {self.codes.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1] // self.block_size

    def packed(self) -> np.ndarray:
        """MatMulNBits input B: uint8 [N, K/block, block*bits/8]."""
        n, k = self.codes.shape
        if self.bits == 8:
            return np.ascontiguousarray(self.codes.reshape(n, self.n_blocks, self.block_size))
        pairs = self.codes.reshape(n, k // 2, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
        return np.ascontiguousarray(packed.reshape(n, self.n_blocks, self.block_size // 2))

    def zero_points(self) -> np.ndarray | None:
        """MatMulNBits input zero_points (uint8), or None when the default 2^(bits-1) applies."""
        n, nb = self.scales.shape
        if isinstance(self.zero_point, np.ndarray):
            zp = self.zero_point.astype(np.uint8)
        elif self.zero_point == 1 << (self.bits - 1):
            return None
        else:
            zp = np.full((n, nb), self.zero_point, dtype=np.uint8)
        if self.bits == 8:
            return zp
        if nb % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        return np.ascontiguousarray(zp[:, 0::2] | (zp[:, 1::2] << 4))

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], computed the way MatMulNBits does (for tests and float fallbacks)."""
        n, k = self.codes.shape
        zp = np.asarray(self.zero_point, dtype=np.float32)
        q = self.codes.reshape(n, self.n_blocks, self.block_size).astype(np.float32) - (zp[..., None] if zp.ndim else zp)
        w = q * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    def with_default_zero_point(self) -> BlockWeight:
        """The same weight with MatMulNBits' default zero point 2^(bits-1), the difference moved into the
        offsets: scale*(q - z) + o = scale*(q - d) + (o + scale*(d - z)). Explicit zero points take a
        slower kernel path; the offsets cost one blocksum, shared by the layers reading the same input."""
        default = 1 << (self.bits - 1)
        if isinstance(self.zero_point, np.ndarray) or self.zero_point == default:
            return self
        shift = self.scales * np.float32(default - self.zero_point)
        offsets = shift if self.offsets is None else self.offsets + shift
        return BlockWeight(self.ggml_type, self.bits, self.block_size, self.codes, self.scales, default,
                           np.ascontiguousarray(offsets, dtype=np.float32))

    def split_nibbles(self) -> tuple[BlockWeight, BlockWeight]:
        """An 8-bit weight as two 4-bit ones with the same sum: MatMulNBits has a fast float (level 0)
        kernel for 4 bits only. code - z = 16*(hi - 8) + (lo - 8) + (136 - z), hi/lo its nibbles;
        both halves use the default zero point 8 and the constant goes into the offsets."""
        if self.bits != 8:
            raise ValueError(f"split_nibbles needs an 8-bit weight, got {self.bits}-bit")
        zp = np.asarray(self.zero_point, dtype=np.float32)
        rest = self.scales * (np.float32(136) - zp)
        offsets = rest if self.offsets is None else rest + self.offsets
        hi = BlockWeight(self.ggml_type, 4, self.block_size, self.codes >> 4, self.scales * np.float32(16), 8, None)
        lo = BlockWeight(self.ggml_type, 4, self.block_size, self.codes & 0x0F, self.scales, 8,
                         np.ascontiguousarray(offsets, dtype=np.float32))
        return hi, lo

    def take_rows(self, rows: np.ndarray | slice) -> BlockWeight:
        """The same weight restricted to some output rows (rows are whole blocks: exact)."""
        return BlockWeight(
            ggml_type=self.ggml_type, bits=self.bits, block_size=self.block_size,
            codes=np.ascontiguousarray(self.codes[rows]), scales=np.ascontiguousarray(self.scales[rows]),
            zero_point=self.zero_point[rows] if isinstance(self.zero_point, np.ndarray) else self.zero_point,
            offsets=None if self.offsets is None else np.ascontiguousarray(self.offsets[rows]),
        )


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-element layout: byte j holds element j (low nibble) and j+16 (high nibble)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit j of a little-endian bit field -> uint8 array of `count` bits."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :count]


# Each decoder takes blocks uint8 [n_blocks, type_size] and returns
# (codes uint8 [n_blocks, sub, block], scales f32 [n_blocks, sub], offsets f32 [n_blocks, sub] | None).
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _q4_0(b: np.ndarray) -> Decoded:
    return _nibbles_split(b[:, 2:18])[:, None], _f16(b[:, 0:2])[:, None], None


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles_split(b[:, 4:20])[:, None], _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_0(b: np.ndarray) -> Decoded:
    codes = _nibbles_split(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4)
    return codes[:, None], _f16(b[:, 0:2])[:, None], None


def _q5_1(b: np.ndarray) -> Decoded:
    codes = _nibbles_split(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4)
    return codes[:, None], _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b: np.ndarray) -> Decoded:
    codes = b[:, 2:34] ^ np.uint8(0x80)  # int8 q -> q + 128, read back with zero point 128
    return codes[:, None], _f16(b[:, 0:2])[:, None], None


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block, from its 12 bytes."""
    lo_sc, lo_min, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (mixed & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_min & 0x3F, (mixed >> 4) | ((lo_min >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> Decoded:
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: low nibbles = sub-block 2c, high = 2c+1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    return codes, d * sc, -(dmin * mn)


def _q5_k(b: np.ndarray) -> Decoded:
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 48:176].reshape(-1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    # qh[l] bit i is the fifth bit of element l of sub-block i
    high = np.unpackbits(b[:, 16:48][:, None, :], axis=1, count=8, bitorder="little")
    return low | (high << 4), d * sc, -(dmin * mn)


def _q6_k(b: np.ndarray) -> Decoded:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [half, first/second 32 bytes, 32]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    d = _f16(b[:, 208:210])[:, None]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    # within a half of 128: groups of 32 are (ql lo, bytes 0-31), (ql lo, 32-63), (ql hi, 0-31), (ql hi, 32-63)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4, 32]
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03  # [n, half, 4, 32]
    codes = (low | (high << 4)).reshape(-1, 16, 16)  # sub-blocks of 16, each with its own scale
    return codes, d * sc, None


def _q3_k(b: np.ndarray) -> Decoded:
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])[:, None]
    lo = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=-1)  # 16 low 4-bit parts
    hi = (packed[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03
    sc = (lo | (hi.reshape(-1, 16) << 4)).astype(np.float32) - 32
    low = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03  # [n, 2, 4, 32]
    high = np.unpackbits(hmask[:, None, :], axis=1, count=8, bitorder="little").reshape(-1, 2, 4, 32)
    codes = (low | (high << 2)).reshape(-1, 16, 16)  # code - 4 == ggml's q (high bit set means no -4)
    return codes, d * sc, None


def _q2_k(b: np.ndarray) -> Decoded:
    packed, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82])[:, None], _f16(b[:, 82:84])[:, None]
    codes = ((qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03).reshape(-1, 16, 16)
    return codes, d * (packed & 0x0F).astype(np.float32), -(dmin * (packed >> 4).astype(np.float32))


@dataclass(frozen=True)
class _Format:
    elements: int  # per GGUF block
    type_size: int  # bytes per GGUF block
    decode: Callable[[np.ndarray], Decoded]
    bits: int  # MatMulNBits container
    block_size: int  # MatMulNBits block (the GGUF (sub-)block)
    zero_point: int


FORMATS: dict[str, _Format] = {
    "Q4_0": _Format(32, 18, _q4_0, 4, 32, 8),
    "Q4_1": _Format(32, 20, _q4_1, 4, 32, 0),
    "Q5_0": _Format(32, 22, _q5_0, 8, 32, 16),
    "Q5_1": _Format(32, 24, _q5_1, 8, 32, 0),
    "Q8_0": _Format(32, 34, _q8_0, 8, 32, 128),
    "Q2_K": _Format(QK_K, 84, _q2_k, 4, 16, 0),
    "Q3_K": _Format(QK_K, 110, _q3_k, 4, 16, 4),
    "Q4_K": _Format(QK_K, 144, _q4_k, 4, 32, 0),
    "Q5_K": _Format(QK_K, 176, _q5_k, 8, 32, 0),
    "Q6_K": _Format(QK_K, 210, _q6_k, 8, 16, 32),
}
SUPPORTED_TYPES = tuple(FORMATS)


def decode(ggml_type: str, raw: np.ndarray, k: int) -> BlockWeight:
    """Raw GGUF rows (uint8 [N, row_bytes]) of a [N, K] weight -> BlockWeight, bit-exact."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        raise ValueError(f"GGUF type {ggml_type!r} cannot be kept exactly; supported: {', '.join(SUPPORTED_TYPES)}")
    if k % fmt.elements:
        raise ValueError(f"{ggml_type} rows of {k} elements are not whole blocks of {fmt.elements}")
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // fmt.elements), fmt.type_size)
    codes, scales, offsets = fmt.decode(blocks)
    n_sub = k // fmt.block_size
    return BlockWeight(
        ggml_type=ggml_type, bits=fmt.bits, block_size=fmt.block_size,
        codes=np.ascontiguousarray(codes.reshape(n, k).astype(np.uint8)),
        scales=np.ascontiguousarray(scales.reshape(n, n_sub).astype(np.float32)),
        zero_point=fmt.zero_point,
        offsets=None if offsets is None else np.ascontiguousarray(offsets.reshape(n, n_sub).astype(np.float32)),
    )


def concat_rows(weights: list[BlockWeight]) -> BlockWeight | None:
    """Weights reading the same input as one (q/k/v, gate/up): one MatMulNBits instead of several.
    None when their blocks differ (bits, block size or zero point), e.g. Q4_K q/k with a Q6_K v.
    Per-block zero points (requantized weights) stack like the scales."""
    first = weights[0]
    per_block = all(isinstance(w.zero_point, np.ndarray) for w in weights)
    if any(w.bits != first.bits or w.block_size != first.block_size or w.shape[1] != first.shape[1]
           or (not per_block and (isinstance(w.zero_point, np.ndarray) or w.zero_point != first.zero_point))
           for w in weights):
        return None
    offsets = None
    if any(w.offsets is not None for w in weights):
        offsets = np.concatenate([w.offsets if w.offsets is not None else np.zeros_like(w.scales) for w in weights])
    zero_point = np.concatenate([w.zero_point for w in weights]) if per_block else first.zero_point
    return BlockWeight("+".join(dict.fromkeys(w.ggml_type for w in weights)), first.bits, first.block_size,
                       np.concatenate([w.codes for w in weights]), np.concatenate([w.scales for w in weights]),
                       zero_point, offsets)
