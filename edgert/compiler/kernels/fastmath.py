"""Elementwise functions in float32 arithmetic that LLVM vectorizes.

``T.exp`` and ``T.exp2`` become calls of ``expf`` / ``exp2f``, one per lane even in a vectorized
loop; these build the result from a polynomial and the exponent bits instead, as SLEEF and
TVM's ``topi.fast_exp`` do.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T


def _scaled_exp(r: Any, n: Any) -> Any:
    """``exp(r) 2^n`` for r in [-ln 2 / 2, ln 2 / 2] and an integral float n in [-126, 127]: Cephes'
    degree-7 polynomial of ``expf``, the power of two built in the exponent bits."""
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23)))
    return (p * r * r + r + T.float32(1.0)) * two_n


def fast_exp(x: Any) -> Any:
    """``exp(x)``, a few ulp from ``expf``: Cody-Waite reduction of x to ``r + n ln 2``. x is clamped
    to [-87, 88], so that 2^n stays a normal number (below -87 the result is exp(-87), 1.6e-38)."""
    x = T.max(T.min(x, T.float32(88.0)), T.float32(-87.0))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    return _scaled_exp(x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4), n)


def fast_exp2(x: Any) -> Any:
    """``2^x``, a few ulp from ``exp2f``: x = n + f with f in [-1/2, 1/2] (exact), ``2^f = exp(f ln 2)``.
    x is clamped to [-126, 127] (below: 2^-126)."""
    x = T.max(T.min(x, T.float32(127.0)), T.float32(-126.0))
    n = T.floor(x + T.float32(0.5))
    return _scaled_exp((x - n) * T.float32(0.6931471805599453), n)
