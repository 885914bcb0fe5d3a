"""The packed weight layout the dense and convolution rewrites share."""

from __future__ import annotations

import numpy as np


def pack(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [ceil(N/B), K, B], zero-padded columns."""
    k, n = w.shape
    pad = -n % block
    w = np.pad(w, ((0, 0), (0, pad))) if pad else w
    return np.ascontiguousarray(w.reshape(k, -1, block).transpose(1, 0, 2))
