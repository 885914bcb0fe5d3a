"""Group-quantized weight matrices, as GGUF stores them: integer codes plus a scale (and min) per group.

A ``QuantizedRows`` holds an ``[N, K]`` matrix (rows = output features) as one code per weight
and, for each group of ``group`` (32 or 16) consecutive weights of a row, a scale ``d`` and an
optional offset ``m``, both f16 or f32:

    q4:  w = d * code + m,  code in 0..15   (GGUF Q4_1; Q4_0 is the same with m = -8 d; Q4_K)
    q8:  w = d * code (+ m), code in -128..127 (GGUF Q8_0, Q5_0; Q6_K in groups of 16; Q5_K with m)

K-quants (super-blocks of 256 with 6-/8-bit sub-block scales) are flattened to one scale (and
min) per sub-block: ``d * sc`` and ``-(dmin * m)`` are exact in f32 (11 + 8 significant bits),
and are stored f16 only where every one of a tensor's values is exactly an f16. The codes are the
file's, so ``dequantize`` reproduces `gguf`'s dequantization bit for bit.

Row operations (permuting q/k rows, concatenating q, k, v) act on codes and scales alike, so
the values stay exactly the file's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROUP = 32
QK_K = 256  # weights per K-quant super-block
# GGUF block types kept in block form, and the edgert base kind each becomes.
GGUF_KINDS = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8", "Q5_0": "q8", "Q4_K": "q4", "Q5_K": "q8", "Q6_K": "q8"}


@dataclass(frozen=True)
class QuantFormat:
    """How a quantized matrix is stored: base kind, group size, scale (and min) dtype, min or not."""

    base: str  # "q4" or "q8"
    group: int = GROUP
    scale_dtype: str = "float16"
    has_min: bool = False

    @property
    def key(self) -> str:
        """The storage name: ``q4``/``q8`` for the plain formats (f16 scales, groups of 32, q4 with
        a min, q8 without), with suffixes ``g16`` (group), ``s32`` (f32 scales), ``m`` (q8 min)."""
        key = self.base + ("" if self.group == GROUP else f"g{self.group}")
        key += "" if self.scale_dtype == "float16" else "s32"
        return key + ("m" if self.has_min and self.base == "q8" else "")

    @property
    def plain(self) -> bool:
        """True for the formats the int8-activation and GPU kernels also take."""
        return self.key in ("q4", "q8")


def is_quantized(kind: str) -> bool:
    """True for a storage name of a quantized format (see `QuantFormat.key`)."""
    return kind.startswith("q")


def parse_kind(kind: str) -> QuantFormat:
    """The `QuantFormat` of a storage name (``q4``, ``q8``, ``q8g16s32``, ``q4s32``, ``q8s32m``...)."""
    m = re.fullmatch(r"(q4|q8)(?:g(16|32))?(s32)?(m)?", kind)
    if m is None or (m.group(4) and m.group(1) == "q4"):
        raise ValueError(f"unknown quantized storage '{kind}'")
    base = m.group(1)
    return QuantFormat(
        base, int(m.group(2) or GROUP), "float32" if m.group(3) else "float16", base == "q4" or bool(m.group(4))
    )


@dataclass
class QuantizedRows:
    """An ``[N, K]`` matrix as integer codes with per-group scales (and mins for q4)."""

    kind: str  # "q4" or "q8": the base kind (see `fmt` for the whole storage format)
    codes: np.ndarray  # [N, K] uint8 (q4) or int8 (q8)
    scale: np.ndarray  # [N, K / group] float16 or float32
    min: np.ndarray | None = None  # [N, K / group] as scale; always for q4, optional for q8
    group: int = GROUP

    @property
    def fmt(self) -> QuantFormat:
        """The storage format (group, scale dtype, min)."""
        return QuantFormat(self.kind, self.group, str(self.scale.dtype), self.min is not None)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the matrix."""
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """The matrix in float32, computed as the GGUF reference does (f16 scales widened first)."""
        n, k = self.shape
        codes = self.codes.reshape(n, k // self.group, self.group).astype(np.float32)
        w = codes * self.scale.astype(np.float32)[..., None]
        if self.min is not None:
            w = w + self.min.astype(np.float32)[..., None]
        return w.reshape(n, k)

    def take_rows(self, index: np.ndarray) -> QuantizedRows:
        """Rows reordered (or selected) by ``index``."""
        return QuantizedRows(
            self.kind, self.codes[index], self.scale[index], None if self.min is None else self.min[index], self.group
        )


def concat_rows(parts: Sequence[QuantizedRows | np.ndarray]) -> QuantizedRows | np.ndarray:
    """Stack matrices along the rows; mixed or differently quantized parts become float32."""
    kinds = {p.fmt if isinstance(p, QuantizedRows) else None for p in parts}
    if len(kinds) == 1 and None not in kinds:
        qs = [p for p in parts if isinstance(p, QuantizedRows)]
        mins = None if qs[0].min is None else np.concatenate([q.min for q in qs])  # type: ignore[misc]
        return QuantizedRows(
            qs[0].kind, np.concatenate([q.codes for q in qs]), np.concatenate([q.scale for q in qs]), mins, qs[0].group
        )
    return np.concatenate([p.dequantize() if isinstance(p, QuantizedRows) else p for p in parts])


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row (last axis) as float32 widened from f16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _narrowest(a: np.ndarray) -> np.ndarray:
    """float32 values as f16 when every one is exactly an f16 (then the kernels read half the bytes)."""
    with np.errstate(over="ignore"):
        half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), a) else a


def _kquant(kind: str, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedRows:
    """Q5_0, Q4_K, Q5_K, Q6_K bytes as codes and per-sub-block scales (arithmetic of `gguf.quants`)."""
    import gguf

    n, k = shape
    if kind == "Q5_0":
        b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, 22)
        qh = b[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)
        ql = b[:, 6:, None] >> np.array([0, 4], np.uint8)  # [blocks, 16, 2]: low nibbles first
        ql = (ql & 0x0F).transpose(0, 2, 1).reshape(-1, 32)
        codes = (ql | ((qh & 1).astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
        return QuantizedRows("q8", codes.reshape(n, k), _f16(b[:, 0:2]).reshape(n, -1).astype(np.float16))
    if k % QK_K:
        raise ValueError(f"{kind} rows of {k} are not whole super-blocks of {QK_K}")
    if kind == "Q6_K":
        b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, 210)
        ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(-1, 8, 32)
        qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 0x03).reshape(-1, 8, 32)
        codes = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
        scale = _f16(b[:, 208:210])[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)
        return QuantizedRows("q8", codes.reshape(n, k), _narrowest(scale.reshape(n, -1)), None, 16)
    size = {"Q4_K": 144, "Q5_K": 176}[kind]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, size)
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
    scale = _f16(b[:, 0:2])[:, None] * sc.astype(np.float32)
    low = -(_f16(b[:, 2:4])[:, None] * m.astype(np.float32))  # d * q + (-dm) == d * q - dm exactly
    qs = b[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, 8, 32)
    if kind == "Q5_K":
        qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (q | ((qh & 1) << 4)).astype(np.int8)
    scale, low = scale.reshape(n, -1), low.reshape(n, -1)
    half = _narrowest(np.concatenate([scale, low], axis=1))  # one dtype for both
    scale, low = (scale.astype(np.float16), low.astype(np.float16)) if half.dtype == np.float16 else (scale, low)
    return QuantizedRows("q4" if kind == "Q4_K" else "q8", q.reshape(n, k), scale, low)


def from_gguf_blocks(kind: str, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedRows:
    """Decode a GGUF tensor's raw bytes (``uint8 [N, row bytes]``) of a type in `GGUF_KINDS`."""
    n, k = shape
    if kind in ("Q5_0", "Q4_K", "Q5_K", "Q6_K"):
        return _kquant(kind, blocks, shape)
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(n, k // GROUP, -1)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        return QuantizedRows("q8", b[..., 2:].copy().view(np.int8).reshape(n, k), d)
    off = 4 if kind == "Q4_1" else 2
    qs = b[..., off:]
    # Byte i of a block holds weight i in its low nibble and weight i + 16 in its high one.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    if kind == "Q4_1":
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
    else:
        m = (d.astype(np.float32) * -8).astype(np.float16)  # exact: a power-of-two multiple
    return QuantizedRows("q4", codes, d, m)
