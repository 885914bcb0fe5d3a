"""Elementwise functions in float32 arithmetic that LLVM vectorizes.

``T.exp`` and ``T.exp2`` become calls of ``expf`` / ``exp2f``, one per lane even in a vectorized
loop; these build the result from a polynomial and the exponent bits instead, as SLEEF and
TVM's ``topi.fast_exp`` do. ``fast_erf`` is a rational polynomial, and ``activate`` the GEMM
epilogues' activation built on it (the float GEMMs of `seq2seq` and `bf16`).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

# erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (the float32 rational approximation Eigen and TVM's fast_erf use).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)  # fmt: skip


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


def _f32(v: float) -> Any:
    return tirx.const(v, "float32")


def _horner(x: Any, coeffs: tuple[float, ...]) -> Any:
    acc = _f32(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + _f32(c)
    return acc


def fast_erf(v: Any) -> Any:
    """erf as a rational polynomial in float32 (max error ~1e-7), vectorizable."""
    x = tirx.max(tirx.min(v, _f32(4.0)), _f32(-4.0))
    x2 = x * x
    return x * _horner(x2, _ERF_P) / _horner(x2, _ERF_Q)


def activate(v: Any, activation: str | None) -> Any:
    """``v`` through a GEMM epilogue's activation: None, or "gelu" (erf form, `fast_erf`)."""
    if activation is None:
        return v
    if activation == "gelu":
        return _f32(0.5) * v * (_f32(1.0) + fast_erf(v * _f32(0.7071067811865476)))
    raise ValueError(f"unknown activation '{activation}'")
