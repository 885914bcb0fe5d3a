"""edgert's own group-wise, weight-only quantization, and the choice of storage per weight.

``--quant`` picks how the linear layers (and the tied embedding) are stored:

- ``source`` (default): GGUF Q4_0/Q4_1/Q8_0, Q5_0 and K-quant (Q4_K, Q5_K, Q6_K) tensors stay
  exactly as the file has them (as q4/q8 codes and scales, see `edgert.frontend.quantized`); every
  other tensor is stored f16.
- ``q4`` / ``q8``: every matrix is q4 (Q4_1 style: per group of 32 a scale and a min) or q8
  (Q8_0 style: a scale per group of 32). Weights already in that form are kept as they are;
  others are quantized here from their float values.
- ``f16`` / ``f32``: everything dequantized and stored in that float type.
"""

from __future__ import annotations

import numpy as np

from edgert.errors import EdgertError
from edgert.frontend.quantized import GROUP, QuantizedRows

QUANT_MODES = ("source", "q4", "q8", "f16", "f32")
FLOAT_DTYPES = {"f16": "float16", "f32": "float32"}


def quantize_rows(w: np.ndarray, kind: str) -> QuantizedRows:
    """Quantize a float ``[N, K]`` matrix (K a multiple of 32) group-wise to ``kind`` (q4 or q8).

    The arithmetic follows ggml's reference quantizers for Q4_1 and Q8_0.
    """
    n, k = w.shape
    if k % GROUP:
        raise EdgertError(f"cannot quantize a matrix with {k} columns in groups of {GROUP}")
    g = np.asarray(w, dtype=np.float32).reshape(n, k // GROUP, GROUP)
    if kind == "q8":
        amax = np.abs(g).max(axis=-1)
        d = amax / 127
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        scaled = g * inv[..., None]
        codes = np.trunc(scaled + np.copysign(0.5, scaled)).astype(np.int8)  # C's roundf, as ggml
        return QuantizedRows("q8", codes.reshape(n, k), d.astype(np.float16))
    if kind == "q4":
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        d = (hi - lo) / 15
        inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
        codes = np.clip(np.trunc((g - lo[..., None]) * inv[..., None] + 0.5), 0, 15).astype(np.uint8)
        return QuantizedRows("q4", codes.reshape(n, k), d.astype(np.float16), lo.astype(np.float16))
    raise EdgertError(f"unknown quantization kind '{kind}' (q4 or q8)")


def choose_storage(w: np.ndarray | QuantizedRows, mode: str) -> np.ndarray | QuantizedRows:
    """A weight matrix in the storage that ``mode`` asks for (see the module docstring)."""
    if mode not in QUANT_MODES:
        raise EdgertError(f"--quant '{mode}' is not one of {', '.join(QUANT_MODES)}")
    if mode == "source":
        return w if isinstance(w, QuantizedRows) else np.asarray(w, dtype=np.float16)
    if mode in FLOAT_DTYPES:
        dense = w.dequantize() if isinstance(w, QuantizedRows) else w
        return np.asarray(dense, dtype=FLOAT_DTYPES[mode])
    if isinstance(w, QuantizedRows) and w.fmt.key == mode:
        return w
    dense = w.dequantize() if isinstance(w, QuantizedRows) else np.asarray(w, dtype=np.float32)
    if dense.shape[1] % GROUP:
        return dense.astype(np.float16)  # a row length not in whole groups stays float
    return quantize_rows(dense, mode)


def storage_kind(w: np.ndarray | QuantizedRows) -> str:
    """``q4``, ``q8`` (or a K-quant variant, `QuantFormat.key`), ``f16`` or ``f32``: how a chosen weight is stored."""
    if isinstance(w, QuantizedRows):
        return w.fmt.key
    return "f32" if w.dtype == np.float32 else "f16"
