"""Group-quantized weight matrices, as GGUF stores them: integer codes plus a scale (and min) per group.

A ``QuantizedRows`` holds an ``[N, K]`` matrix (rows = output features) as one code per weight
and, for each group of ``GROUP`` consecutive weights of a row, an f16 scale ``d`` and an
optional f16 offset ``m``:

    q4:  w = d * code + m,  code in 0..15   (GGUF Q4_1; Q4_0 is the same with m = -8 d)
    q8:  w = d * code,      code in -128..127 (GGUF Q8_0)

Row operations (permuting q/k rows, concatenating q, k, v) act on codes and scales alike, so
the values stay exactly the file's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROUP = 32
# GGUF block types kept in block form, and the edgert kind each becomes.
GGUF_KINDS = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}


@dataclass
class QuantizedRows:
    """An ``[N, K]`` matrix as integer codes with per-group scales (and mins for q4)."""

    kind: str  # "q4" or "q8"
    codes: np.ndarray  # [N, K] uint8 (q4) or int8 (q8)
    scale: np.ndarray  # [N, K / GROUP] float16
    min: np.ndarray | None = None  # [N, K / GROUP] float16, q4 only

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the matrix."""
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """The matrix in float32, computed as the GGUF reference does (f16 scales widened first)."""
        n, k = self.shape
        codes = self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
        w = codes * self.scale.astype(np.float32)[..., None]
        if self.min is not None:
            w = w + self.min.astype(np.float32)[..., None]
        return w.reshape(n, k)

    def take_rows(self, index: np.ndarray) -> QuantizedRows:
        """Rows reordered (or selected) by ``index``."""
        return QuantizedRows(
            self.kind, self.codes[index], self.scale[index], None if self.min is None else self.min[index]
        )


def concat_rows(parts: Sequence[QuantizedRows | np.ndarray]) -> QuantizedRows | np.ndarray:
    """Stack matrices along the rows; mixed or differently quantized parts become float32."""
    kinds = {p.kind if isinstance(p, QuantizedRows) else None for p in parts}
    if len(kinds) == 1 and None not in kinds:
        qs = [p for p in parts if isinstance(p, QuantizedRows)]
        mins = None if qs[0].min is None else np.concatenate([q.min for q in qs])  # type: ignore[misc]
        return QuantizedRows(
            qs[0].kind, np.concatenate([q.codes for q in qs]), np.concatenate([q.scale for q in qs]), mins
        )
    return np.concatenate([p.dequantize() if isinstance(p, QuantizedRows) else p for p in parts])


def from_gguf_blocks(kind: str, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedRows:
    """Decode a GGUF tensor's raw bytes (``uint8 [N, row bytes]``) of type Q4_0, Q4_1 or Q8_0."""
    n, k = shape
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
