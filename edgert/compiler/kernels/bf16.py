"""Float32 matmuls over many rows on AMX-BF16 tiles, split so that they keep float32's accuracy.

A float32 ``x`` is the sum of two bfloat16 numbers ``hi + lo`` up to 2^-18 of it (hi rounded to
nearest even, lo the rounded remainder); an f16 weight is such a sum exactly (its 11 significant
bits fit two times 8), a float32 one up to 2^-18. ``tdpbf16ps`` multiplies bfloat16 pairs exactly
and adds them in float32, so ``x·w ≈ xh·wh + xh·wl + xl·wh`` (the dropped ``xl·wl`` is below 2^-18
of the product): three tile products per K step instead of one, still about five times the float32
FMAs' rate on one core (a 16 x 16 x 32 ``tdpbf16ps`` every 16 cycles against 2 x 16 FMAs a cycle).
Whisper's encoder spends half its time in these matmuls on one thread (a busy device leaves it one
core): 1500 x 384 x 1536 took 4.6 against 13.4 ms of thread CPU time here, tiles against float32
FMAs (Intel Xeon with AMX, loaded). The tile loads bound it, not the products: with one product
instead of three, 3.7 ms.

Layout: `split_kernel` writes ``x`` as ``[2, m, k]`` bfloat16 bits (hi, lo; row-major is the A tile's
layout); `amx_gemm_kernel` takes it and the packed ``[N/B, K, B]`` f16 weights of `gemm_kernel`,
widens `task_span` column blocks of them per task into the tiles' pair layout (``[K/2, 16, 2]`` per
16 columns, hi and lo), and keeps 4 column tiles of 16 x 16 sums in tile registers across K. The
write-back is `gemm_kernel`'s (bias, GELU, the heads layout).
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from edgert.compiler.kernels.fastmath import activate
from edgert.compiler.kernels.intrin import amx

TILE = 16  # rows of an A tile and of a C tile, columns of a C tile (float32: 64 bytes)
KSTEP = 32  # bfloat16 K values in an A tile row (64 bytes)
AMX_BF16 = "amx-bf16"


def has_amx_bf16(target: Target | None = None) -> bool:
    """Whether the target's CPU has AMX-BF16 tiles (LLVM features ``amx-tile`` and ``amx-bf16``)."""
    target = target or Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:
        features = set(codegen.llvm_get_cpu_features(target))
    except Exception:  # an LLVM that cannot describe the target: no tiles
        return False
    return {"amx-tile", AMX_BF16} <= features


def fits(k: int, n: int, block: int, weight_dtype: str) -> bool:
    """Whether `amx_gemm_kernel` takes this shape: K in whole tile rows, columns in whole 16-column tiles,
    f16 or f32 weights."""
    return k % KSTEP == 0 and block % TILE == 0 and n % block == 0 and weight_dtype in ("float16", "float32")


def task_span(blocks: int) -> int:
    """Column blocks one task takes: a row tile's activations (2 x 16 x K bfloat16, 24 KB at K = 384) are
    read from memory once for all of them and stay in L1 for the rest, and their widened weights
    (2 x 2 x K x B bytes each, 98 KB) in L2; an even count of tasks where it can (two threads).

    One block a task read every row's activations again for every 64 columns (55 MB a call of the
    1500 x 384 x 1536 matmul): 6.4 against 4.6 ms of one thread."""
    for even in (True, False):
        for span in (4, 3, 2):
            if blocks % span == 0 and (not even or blocks // span % 2 == 0):
                return span
    return 1


def _bf16_bits(v: Any) -> Any:
    """The bfloat16 nearest ``v`` (float32; ties to even), as its 16 bits."""
    u = tirx.reinterpret("uint32", v)
    rounded = u + tirx.const(0x7FFF, "uint32") + ((u >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))
    return tirx.Cast("uint16", rounded >> tirx.const(16, "uint32"))


def _bf16_value(bits: Any) -> Any:
    """The float32 value of bfloat16 ``bits``."""
    return tirx.reinterpret("float32", tirx.Cast("uint32", bits) << tirx.const(16, "uint32"))


@functools.cache
def split_kernel(k: int, lanes: int) -> tirx.PrimFunc:
    """``xs[0] = bf16(x)``, ``xs[1] = bf16(x - xs[0])`` for x [m, k] float32 -> xs [2, m, k] bfloat16 bits."""

    @T.prim_func(s_tir=True)
    def split(x_h: T.handle, xs_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        xs = T.match_buffer(xs_h, (2, m, k), "uint16")
        with T.sblock("root"):  # one input, one output: Relax's reshape analysis expects a root block
            for i in T.parallel(m):
                for c in range(k // lanes):
                    for v in T.vectorized(lanes):
                        xs[0, i, c * lanes + v] = _bf16_bits(x[i, c * lanes + v])
                        xs[1, i, c * lanes + v] = _bf16_bits(x[i, c * lanes + v] - _bf16_value(xs[0, i, c * lanes + v]))

    return split.with_attr("global_symbol", f"bf16_split_k{k}_l{lanes}")


@functools.cache
def amx_gemm_kernel(
    k: int,
    n: int,
    block: int,
    weight_dtype: str,
    lanes: int,
    activation: str | None,
    heads: tuple[int, int, int] | None = None,
) -> tirx.PrimFunc:
    """`gemm_kernel`'s ``y = act(x Wᵀ + b)`` from `split_kernel`'s ``xs`` on AMX-BF16 tiles (three products a step).

    Tiles: 0-3 the sums of a row tile's 4 (or fewer) column tiles, 4 and 5 the activations' hi and lo,
    6 and 7 the weights' hi and lo of one column tile. A task takes `task_span` column blocks (B columns
    each) and runs every row tile over them; their weights, widened once, stay in L2 (2 x 2 x K x B
    bytes a block), a row tile's activations in L1 from the first block to the last.
    """
    if not fits(k, n, block, weight_dtype):
        raise ValueError(f"AMX-BF16 GEMM needs K % {KSTEP} == 0 and whole 16-column tiles: k={k} n={n} block={block}")
    cw = min(4, block // TILE)  # column tiles a pass keeps in tiles 0..cw-1
    passes, nb, ksteps, half = block // TILE // cw, n // block, k // KSTEP, k // 2
    nh, hd, tpart = heads or (1, n, -1)
    if heads and (n % (nh * hd) or hd % TILE):
        raise ValueError(f"{n} columns do not split into heads of {hd} in tiles of {TILE}")
    laid_out = heads is not None  # TVMScript branches on Python bools only
    y_rows = n // hd
    span = task_span(nb)

    def act(v: Any) -> Any:
        return activate(v, activation)

    @T.macro
    def configure(cfg, rows):
        # palette 1; bytes 16 + 2 t: a row's bytes of tile t, 48 + t: its rows
        for b in range(64):
            cfg[b] = T.uint8(0)
        cfg[0] = T.uint8(1)
        for t in range(8):
            cfg[16 + 2 * t] = T.uint8(64)
        for t in range(6):  # sums and activations: `rows` rows; weights: K/2 pairs of a step, 16 rows
            cfg[48 + t] = T.Cast("uint8", rows)
        cfg[48 + 6] = T.uint8(TILE)
        cfg[48 + 7] = T.uint8(TILE)
        amx("ldtilecfg", T.address_of(cfg[0]))

    @T.macro
    def widen(w, wb, jo, sb):
        # Column block jo's weights into the tiles' pair layout, hi and lo: wb[sb, part, c, kk // 2, col, kk % 2].
        for kp in range(half):
            for c in range(block // TILE):
                for e in range(2):
                    for v in T.vectorized(TILE):
                        wb[sb, 0, c, kp, v, e] = _bf16_bits(T.Cast("float32", w[jo, 2 * kp + e, c * TILE + v]))
                        wb[sb, 1, c, kp, v, e] = _bf16_bits(
                            T.Cast("float32", w[jo, 2 * kp + e, c * TILE + v]) - _bf16_value(wb[sb, 0, c, kp, v, e])
                        )

    @T.macro
    def products(xs, wb, sums, top, sb, cp):
        # One row tile (from row `top`) times column tiles cp * cw .. + cw - 1 into tiles 0..cw-1.
        for c in T.unroll(cw):
            amx("tilezero", T.uint8(c))
        for s in range(ksteps):
            amx("tileloadd64", T.uint8(4), T.address_of(xs[0, top, s * KSTEP]), T.int64(2 * k))
            amx("tileloadd64", T.uint8(5), T.address_of(xs[1, top, s * KSTEP]), T.int64(2 * k))
            for c in T.unroll(cw):
                amx("tileloadd64", T.uint8(6), T.address_of(wb[sb, 0, cp * cw + c, s * TILE, 0, 0]), T.int64(4 * TILE))
                amx("tileloadd64", T.uint8(7), T.address_of(wb[sb, 1, cp * cw + c, s * TILE, 0, 0]), T.int64(4 * TILE))
                amx("tdpbf16ps", T.uint8(c), T.uint8(4), T.uint8(6))
                amx("tdpbf16ps", T.uint8(c), T.uint8(5), T.uint8(6))
                amx("tdpbf16ps", T.uint8(c), T.uint8(4), T.uint8(7))
        for c in T.unroll(cw):
            amx("tilestored64", T.uint8(c), T.address_of(sums[c, 0, 0]), T.int64(4 * TILE))

    @T.macro
    def write(y, b, sums, m, top, rows, c0, c):
        # Rows top .. top + rows - 1 of column tile c (columns c0 ..): bias, activation, layout.
        if laid_out:
            if c0 // (nh * hd) == tpart:  # keys transposed: each column's rows are consecutive
                for ji in range(TILE):
                    for r in range(rows):
                        y[c0 // hd, (c0 % hd + ji) * m + top + r] = act(sums[c, r, ji] + b[c0 + ji])
            else:
                for r in range(rows):
                    for ji in T.vectorized(TILE):
                        y[c0 // hd, (top + r) * hd + c0 % hd + ji] = act(sums[c, r, ji] + b[c0 + ji])
        else:
            for r in range(rows):
                for ji in T.vectorized(TILE):
                    y[top + r, c0 + ji] = act(sums[c, r, ji] + b[c0 + ji])

    @T.prim_func
    def gemm(
        xs_h: T.handle,
        w: T.Buffer((nb, k, block), weight_dtype),
        b: T.Buffer((n,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        xs = T.match_buffer(xs_h, (2, m, k), "uint16")
        y = T.match_buffer(y_h, (y_rows, m * hd) if laid_out else (m, n), "float32")
        for task in T.parallel(nb // span):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            wb = T.alloc_buffer((span, 2, block // TILE, half, TILE, 2), "uint16", scope="local")
            sums = T.alloc_buffer((cw, TILE, TILE), "float32", scope="local")
            for sb in range(span):
                widen(w, wb, task * span + sb, sb)
            configure(cfg, TILE)
            for t in range(m // TILE):
                for sb in range(span):
                    for cp in range(passes):
                        products(xs, wb, sums, t * TILE, sb, cp)
                        for c in range(cw):
                            write(y, b, sums, m, t * TILE, TILE, (task * span + sb) * block + (cp * cw + c) * TILE, c)
            if m % TILE > 0:  # the last rows: tiles configured that short (no row past the end is read)
                configure(cfg, m % TILE)
                for sb in range(span):
                    for cp in range(passes):
                        products(xs, wb, sums, m // TILE * TILE, sb, cp)
                        for c in range(cw):
                            write(
                                y,
                                b,
                                sums,
                                m,
                                m // TILE * TILE,
                                m % TILE,
                                (task * span + sb) * block + (cp * cw + c) * TILE,
                                c,
                            )
            amx("tilerelease")

    name = f"amxbf16_k{k}_n{n}_b{block}_{weight_dtype}" + (f"_{activation}" if activation else "")
    name += f"_heads{nh}x{hd}t{tpart}" if heads else ""
    return gemm.with_attr("global_symbol", name)
