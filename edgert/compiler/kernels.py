"""Hand-scheduled TIR kernels for CPUs.

TVM's default lowering and `dlight.cpu.GEMV` were measured ~100x slower than numpy on the
decode GEMVs of a small LM (DESIGN.md), so the linear layers use an explicit schedule:
the weight is packed at compile time as ``[N/B, K, B]`` so that each of the B output
columns of a tile is contiguous; tiles are split across threads, the B columns are one
vector, and rows of the input are register-blocked by ``MT`` so prefill reuses each
weight tile from cache.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

ROW_TILE = 4


def pick_block(n: int) -> int | None:
    """The widest column tile (64, 32, 16 or 8) that divides ``n``; None if none does."""
    for block in (64, 32, 16, 8):
        if n % block == 0:
            return block
    return None


def packed_matmul(k: int, n: int, block: int, weight_dtype: str) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * w[n // block, k, n % block]`` with float32 x and y."""
    nb, mt = n // block, ROW_TILE

    @T.prim_func
    def matmul(x_h: T.handle, w: T.Buffer((nb, k, block), weight_dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        for jo in T.parallel(nb):
            acc = T.alloc_buffer((mt, block), "float32", scope="local")
            for io in range(m // mt):
                for ii in T.unroll(mt):
                    for ji in T.vectorized(block):
                        acc[ii, ji] = T.float32(0)
                for kk in range(k):
                    for ii in T.unroll(mt):
                        for ji in T.vectorized(block):
                            acc[ii, ji] = acc[ii, ji] + x[io * mt + ii, kk] * T.Cast("float32", w[jo, kk, ji])
                for ii in T.unroll(mt):
                    for ji in T.vectorized(block):
                        y[io * mt + ii, jo * block + ji] = acc[ii, ji]
            for i in range(m - m // mt * mt):
                for ji in T.vectorized(block):
                    acc[0, ji] = T.float32(0)
                for kk in range(k):
                    for ji in T.vectorized(block):
                        acc[0, ji] = acc[0, ji] + x[m // mt * mt + i, kk] * T.Cast("float32", w[jo, kk, ji])
                for ji in T.vectorized(block):
                    y[m // mt * mt + i, jo * block + ji] = acc[0, ji]

    return matmul.with_attr("global_symbol", f"packed_matmul_k{k}_n{n}_b{block}_{weight_dtype}")
