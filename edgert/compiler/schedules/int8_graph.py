"""Integer matmuls of int8 ONNX graphs on AVX-512 VNNI: ``u8 x s8 -> int32`` with ``vpdpbusd``.

onnxruntime's dynamic quantizer writes each linear layer as ``DynamicQuantizeLinear`` (uint8
activations, a zero point) + ``MatMulInteger`` by an int8 weight + a float rescale. TVM's importer
widens both operands to int32 and multiplies them (``vpmulld``: 16 products per instruction at a
latency of 10 cycles), 2-3x slower than onnxruntime's integer kernels. Here such a matmul by a
constant weight becomes one kernel:

    y[m, n] = sum_k xq[m, k] * W[k, n] - zp * sum_k W[k, n]

``vpdpbusd`` adds four unsigned x signed byte products into each of 16 int32 lanes (64 products
per instruction); the lanes are 16 output columns, the four bytes four consecutive k, so the
weight is packed ``int8 [N/B, K/4, B, 4]`` at compile time (the layout of
`edgert.compiler.kernels.int8`) and four activation bytes are broadcast to every lane. The zero
point comes out through the weight's column sums (``- zp * colsum``), so the activation is read
as it is. Integer arithmetic throughout, without saturation: the result equals onnxruntime's
MatMulInteger exactly (|sum| < 2^31 for any K below 2^16).

A tile is ``rows`` output rows x ``B`` columns of accumulators in registers (at most 24 of the
32 zmm), one weight load serving every row; threads take (column tile, row tile) pairs. Where the
target has AMX-INT8, `u8s8_amx_gemm` multiplies the same GEMMs on tiles (``tdpbusd``), with the
same integer results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import GenericConst
from tvm.script import tirx as T

from edgert.compiler.kernels.int8 import vpdpbusd
from edgert.compiler.kernels.intrin import amx
from edgert.compiler.schedules.rules import chunks

# The integer kernels keep 16 parallel chunks at most: each chunk allocates its 1 KiB accumulator
# tile from the workspace pool (convnet.qdq at 2 threads: 0.075 ms with 16, 0.102 with 64, quiet).
INT8_CHUNKS = 16

LANES = 16  # int32 lanes of one zmm register


def has_vnni(target: Any) -> bool:
    """Whether ``target`` (an LLVM CPU target) has AVX-512 VNNI."""
    from tvm.target.codegen import llvm_get_cpu_features

    if target.kind.name != "llvm":
        return False
    return {"avx512vnni", "avx512bw", "avx512f"} <= set(llvm_get_cpu_features(target))


# Below this many multiply-adds an integer kernel runs on one thread: a parallel region costs
# more than it saves. Four times the float rules' `MIN_PARALLEL_MACS` (one vpdpbusd does 64 where
# an FMA does 16): ~4 us of work. At 1 << 24 the twelve 40x512x512 GEMMs of encoder_512's
# attention (10.5M, 20 us each) stayed on one thread.
MIN_PARALLEL_INT8_MACS = 1 << 21
# Each parallel chunk gets at least this many multiply-adds (the float rules' `CHUNK_MACS`, x4).
INT8_CHUNK_MACS = 1 << 19


def _loop_kind(macs: int) -> Any:
    """``T.parallel`` for a kernel of ``macs`` multiply-adds worth splitting over threads, else ``T.serial``."""
    return T.parallel if macs >= MIN_PARALLEL_INT8_MACS else T.serial


def _chunks(tiles: int, loop: Any, macs: int) -> int:
    """Parallel iterations for ``tiles`` register tiles of a kernel of ``macs`` multiply-adds."""
    return chunks(tiles, loop is T.parallel, max(2, min(INT8_CHUNKS, macs // INT8_CHUNK_MACS)))


def row_tile(m: int) -> int:
    """Rows per register tile: all of them up to 12, else the tile of 6..12 rows wasting the fewest."""
    if m <= 12:
        return m
    return min(range(12, 5, -1), key=lambda r: -(-m // r) * r - m)


def pack_weight(w: np.ndarray, block: int) -> np.ndarray:
    """int8 [K, N] -> [ceil(N/B), K/4, B, 4]: four consecutive k of one column side by side."""
    k, n = w.shape
    pad = -n % block
    w = np.pad(w, ((0, 0), (0, pad))) if pad else w
    return np.ascontiguousarray(w.reshape(k // 4, 4, -1, block).transpose(2, 0, 3, 1).astype(np.int8))


@functools.cache
def u8s8_gemm(m: int, k: int, n: int, block: int) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[k, n] - zp[0] * colsum[n]``: x uint8, W int8 packed by
    `pack_weight`, y int32."""
    if k % 4 or block % LANES:
        raise ValueError(f"u8s8_gemm needs K divisible by 4 and a block of whole vectors, got K={k}, B={block}")
    nb, full, cw = -(-n // block), n // block, block // LANES
    rows = row_tile(m)
    nt = -(-m // rows)
    nbytes = LANES * 4
    tiles = _loop_kind(m * k * n)
    nc = _chunks(nb * nt, tiles, m * k * n)
    per = nb * nt // nc

    @T.prim_func
    def gemm(
        x: T.Buffer((m, k), "uint8"),
        wp: T.Buffer((nb, k // 4, block, 4), "int8"),
        colsum: T.Buffer((nb * block,), "int32"),
        zp: T.Buffer((1,), "int32"),
        y: T.Buffer((m, n), "int32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for c in tiles(nc):
            acc = T.alloc_buffer((rows, cw, LANES), "int32", scope="local")
            wv = T.alloc_buffer((cw, nbytes), "int8", scope="local")
            for tt in range(per):
                t: T.let = c * per + tt
                jo: T.let = t // nt
                it: T.let = t % nt
                for r, ci in T.grid(rows, cw):
                    acc[r, ci, T.ramp(0, 1, LANES)] = T.broadcast(T.int32(0), LANES)
                for kk in range(k // 4):
                    for ci in T.unroll(cw):
                        wv[ci, T.ramp(0, 1, nbytes)] = wp.vload([jo, kk, ci * LANES, 0], f"int8x{nbytes}")
                    for r in T.unroll(rows):
                        row: T.let = T.min(it * rows + r, m - 1)  # rows past m repeat the last one, unwritten
                        word: T.let = T.reinterpret("int32", x.vload([row, kk * 4], "uint8x4"))
                        xb: T.let = T.reinterpret(f"uint8x{nbytes}", T.broadcast(word, LANES))
                        for ci in T.unroll(cw):
                            acc[r, ci, T.ramp(0, 1, LANES)] = vpdpbusd(
                                acc[r, ci, T.ramp(0, 1, LANES)], xb, wv[ci, T.ramp(0, 1, nbytes)], LANES
                            )
                for r, ci in T.grid(rows, cw):
                    if it * rows + r < m:
                        if jo < full:
                            for v in T.vectorized(LANES):
                                y[it * rows + r, jo * block + ci * LANES + v] = (
                                    acc[r, ci, v] - zp[0] * colsum[jo * block + ci * LANES + v]
                                )
                        else:
                            for v in range(LANES):
                                if jo * block + ci * LANES + v < n:
                                    y[it * rows + r, jo * block + ci * LANES + v] = (
                                        acc[r, ci, v] - zp[0] * colsum[jo * block + ci * LANES + v]
                                    )

    return gemm.with_attr("global_symbol", f"u8s8_gemm_m{m}_k{k}_n{n}_b{block}")


# -- AMX-INT8 tiles ---------------------------------------------------------------------------
# A CPU with AMX-INT8 (Sapphire Rapids on) multiplies tiles: ``tdpbusd`` adds a 16-row x 64-byte
# uint8 tile of activations times a 16 x 64-byte int8 tile of weights (64 K values of 16 columns,
# four consecutive K a column: `pack_weight`'s layout with a block of 16, each column tile's K
# contiguous) into 16 x 16 int32 sums: 16384 products an instruction, 256 times a ``vpdpbusd``'s.
# The graph's scales are per tensor, so each output's integer sum runs over all of K inside the
# tiles and leaves them once, where the LLM's per-group q8 sums go out every 32 K values. Tiles:
# 0-2 = up to three row tiles of activations (a block of 48 rows), 3 = the weights, 4-6 = the
# three row tiles' sums. The zero point enters as the sums' starting value, ``-zp * colsum`` loaded
# with a row stride of 0 (one row for every row), and the sums go straight to ``y``.
AMX_K = 64  # K values a tile multiplies (64 bytes a row): AMX takes K in multiples of it
AMX_BLOCK = 48  # rows a block of three row tiles covers
# From this many rows on, a target with AMX-INT8 takes the tiles (one row: the VNNI tiles). One thread,
# loaded, x512 -> 512: 1 row 2.5 us on tiles, 2.4 VNNI; 2 rows 2.6 / 3.0; 4 rows 2.6 / 3.9.
AMX_GRAPH_ROWS = 2
# Below this many multiply-adds an AMX GEMM runs on one thread (8x `MIN_PARALLEL_INT8_MACS`): the
# tiles took 7.7 us for encoder_512's 40x512x512 where ``vpdpbusd`` took 33 (one thread, loaded,
# 2-core Intel Xeon), and a parallel region costs a few.
MIN_PARALLEL_AMX_MACS = 1 << 24


@functools.cache
def u8s8_amx_gemm(m: int, k: int, n: int) -> tirx.PrimFunc:
    """`u8s8_gemm` on AMX tiles: ``y[m, n] = sum_k x[m, k] * W[k, n] - zp[0] * colsum[n]``, x uint8,
    W int8 packed by ``pack_weight(W, 16)``, y int32; K a multiple of `AMX_K`."""
    if k % AMX_K:
        raise ValueError(f"u8s8_amx_gemm needs K divisible by {AMX_K}, got {k}")
    nb, full = -(-n // 16), n // 16
    nfull, rest = divmod(m, AMX_BLOCK)  # blocks of three row tiles, and the rows after them
    ks = k // AMX_K
    loop = T.parallel if m * k * n >= MIN_PARALLEL_AMX_MACS else T.serial
    nc = chunks(nb, loop is T.parallel, INT8_CHUNKS)
    per = nb // nc

    @T.macro
    def configure(cfg, tiles, count):
        # ``tiles`` row tiles (a Python int) over ``count`` rows, each 16 but the last. Palette 1;
        # bytes 16 + 2 t: a row's bytes of tile t, 48 + t: its rows.
        for b in range(64):
            cfg[b] = T.uint8(0)
        cfg[0] = T.uint8(1)
        cfg[16 + 2 * 3] = T.uint8(64)
        cfg[48 + 3] = T.uint8(16)
        for t in T.unroll(tiles):
            cfg[16 + 2 * t] = T.uint8(64)
            cfg[48 + t] = T.Cast("uint8", T.min(16, count - 16 * t))
            cfg[16 + 2 * (4 + t)] = T.uint8(64)
            cfg[48 + 4 + t] = T.Cast("uint8", T.min(16, count - 16 * t))
        amx("ldtilecfg", T.address_of(cfg[0]))

    @T.macro
    def block(x, wp, y, bias, part, top, jo, tiles, count):
        # rows top .. top + count - 1 of column tile jo, in ``tiles`` row tiles
        for t in T.unroll(tiles):
            amx("tileloadd64", T.uint8(4 + t), T.address_of(bias[0]), T.int64(0))
        for s in range(ks):
            amx("tileloadd64", T.uint8(3), T.address_of(wp[jo, s * 16, 0, 0]), T.int64(64))
            for t in T.unroll(tiles):
                amx("tileloadd64", T.uint8(t), T.address_of(x[top + 16 * t, s * AMX_K]), T.int64(k))
            for t in T.unroll(tiles):
                amx("tdpbusd", T.uint8(4 + t), T.uint8(t), T.uint8(3))
        if jo < full:
            for t in T.unroll(tiles):
                amx("tilestored64", T.uint8(4 + t), T.address_of(y[top + 16 * t, jo * 16]), T.int64(4 * n))
        else:  # the last, partial column tile: through a buffer
            for t in T.unroll(tiles):
                amx("tilestored64", T.uint8(4 + t), T.address_of(part[16 * t, 0]), T.int64(64))
            for r, v in T.grid(count, 16):
                # read outside the guard: a read under it let TVM shrink the buffer to the columns
                # written (8 of 16 a row), a row stride the tile store did not know
                value: T.let = part[r, v]
                if jo * 16 + v < n:
                    y[top + r, jo * 16 + v] = value

    @T.macro
    def column(colsum, zp, bias, jo):
        for v in T.vectorized(16):
            bias[v] = T.int32(0) - zp[0] * colsum[jo * 16 + v]

    @T.prim_func
    def gemm(
        x: T.Buffer((m, k), "uint8"),
        wp: T.Buffer((nb, k // 4, 16, 4), "int8"),
        colsum: T.Buffer((nb * 16,), "int32"),
        zp: T.Buffer((1,), "int32"),
        y: T.Buffer((m, n), "int32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for c in loop(nc):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            bias = T.alloc_buffer((16,), "int32", scope="local")
            part = T.alloc_buffer((AMX_BLOCK, 16), "int32", scope="local")
            if nfull > 0:
                configure(cfg, 3, AMX_BLOCK)
                for b in range(nfull):
                    for jj in range(per):
                        column(colsum, zp, bias, c * per + jj)
                        block(x, wp, y, bias, part, b * AMX_BLOCK, c * per + jj, 3, AMX_BLOCK)
            if rest > 0:
                configure(cfg, -(-rest // 16), rest)
                for jj in range(per):
                    column(colsum, zp, bias, c * per + jj)
                    block(x, wp, y, bias, part, nfull * AMX_BLOCK, c * per + jj, -(-rest // 16), rest)
            amx("tilerelease")

    return gemm.with_attr("global_symbol", f"u8s8_amx_gemm_m{m}_k{k}_n{n}")


def tvm_op(name: str) -> Any:
    """The Relax operator registered as ``name``."""
    return tvm.ir.Op.get(name)


def _static_shape(expr: Any) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _dtype(expr: Any) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _constant(expr: Any, lookup: Any, depth: int = 4) -> np.ndarray | None:
    """The value of ``expr`` if it is a constant, or casts and differences of constants (the
    importer's ``astype(W) - astype(zp)``, which FoldConstant leaves for integer dtypes)."""
    if isinstance(expr, relax.Var):
        expr = lookup(expr)
    if isinstance(expr, GenericConst):
        return expr.value.numpy()
    if depth == 0 or not isinstance(expr, relax.Call):
        return None
    if expr.op == tvm_op("relax.astype"):
        value = _constant(expr.args[0], lookup, depth - 1)
        return None if value is None else value.astype(str(expr.attrs.dtype))
    if expr.op == tvm_op("relax.subtract"):
        a, b = (_constant(e, lookup, depth - 1) for e in expr.args)
        return None if a is None or b is None else np.subtract(a, b, dtype=np.result_type(a, b))
    return None


def rewrite_int_matmul(bb: Any, call: relax.Call, lookup: Any, isa: str = "avx512vnni") -> relax.Expr | None:
    """``matmul(astype(xq, int32) [- zp], W, out_dtype=int32)`` with xq uint8, W an int32 constant
    of int8 values and zp a scalar: the VNNI kernel above (`u8s8_amx_gemm` for ``isa`` amx where
    its shape fits, `portable_conv` for dotprod or avx2), or None where the pattern does not hold
    (the caller keeps the call)."""
    if len(call.args) != 2 or str(call.attrs.out_dtype) != "int32":
        return None
    a, w = call.args
    weight = _constant(w, lookup)
    if weight is None or weight.ndim != 2 or weight.dtype != np.int32 or weight.shape[0] % 4:
        return None
    if weight.min() < -128 or weight.max() > 127:  # a uint8 weight less its zero point: not int8
        return None
    zp: relax.Expr = relax.const(np.zeros(1, np.int32))
    bound = lookup(a) if isinstance(a, relax.Var) else a
    if isinstance(bound, relax.Call) and bound.op == tvm_op("relax.subtract"):
        lhs, zp_expr = bound.args
        if _static_shape(zp_expr) not in ([], [1]) or _dtype(zp_expr) != "int32":
            return None
        zp = relax.op.reshape(zp_expr, [1])
        bound = lookup(lhs) if isinstance(lhs, relax.Var) else lhs
    if not (isinstance(bound, relax.Call) and bound.op == tvm_op("relax.astype")):
        return None
    xq = bound.args[0]
    shape = _static_shape(xq)
    if _dtype(xq) != "uint8" or shape is None or len(shape) < 2:
        return None
    k, n = weight.shape
    m = int(np.prod(shape[:-1]))
    if shape[-1] != k or m == 0:
        return None
    if isa not in ("avx512vnni", "amx"):
        return _portable_matmul(bb, isa, xq, shape, weight, zp)
    if isa == "amx" and k % AMX_K == 0 and m >= AMX_GRAPH_ROWS:
        block, func, name = 16, u8s8_amx_gemm(m, k, n), f"u8s8_amx_gemm_m{m}_k{k}_n{n}"
    else:
        block = 2 * LANES if n % (2 * LANES) == 0 or n > 2 * LANES else LANES
        func, name = u8s8_gemm(m, k, n, block), f"u8s8_gemm_m{m}_k{k}_n{n}"
    packed = pack_weight(weight.astype(np.int8), block)
    colsum = np.zeros(packed.shape[0] * block, np.int32)
    colsum[:n] = weight.sum(axis=0, dtype=np.int64).astype(np.int32)
    x2 = xq if len(shape) == 2 else bb.emit(relax.op.reshape(xq, [m, k]))
    y = relax.call_tir(
        bb.add_func(func, name),
        [x2, relax.const(packed), relax.const(colsum), bb.emit(zp)],
        out_ty=relax.TensorType([m, n], "int32"),
    )
    if len(shape) == 2:
        return y
    return relax.op.reshape(bb.emit(y), [*shape[:-1], n])


@functools.cache
def u8s8_conv(
    inp: tuple[int, ...],
    out: tuple[int, ...],
    taps: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    cp: int,
    n: int,
    block: int,
    requant: tuple[float, float, float, str] | None = None,
    border: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0),
) -> tirx.PrimFunc:
    """A channels-last conv (groups 1) as `u8s8_gemm` over output positions: ``y[p, co] = sum over
    taps and channels of xp[pos(p, tap), c] * W[tap, c, co] - zp * colsum[co]``, ``xp`` the uint8
    input already padded (with the zero point) and its channels padded to ``cp`` (a multiple of 4).
    1-D convs take a unit height.

    With ``requant = (zero point, low, high, dtype)`` the kernel takes two more float32 inputs per
    output channel, ``bias`` and ``mult``, and writes ``dtype`` (uint8 or int8) values
    ``max(min(round((float(y) + bias) * mult) + zero point, high), low)``: the graph's
    requantization in its own float32 operations and order (see `fuse_requantize`). ``border = (top,
    bottom, left, right, value)`` (with ``requant``) writes those into a ``y`` that large, the next
    conv's padded input: the output at offset (top, left), the border set to ``value``."""
    (hp, wp), (oh, ow), (kh, kw), (sh, sw), (dh, dw) = inp, out, taps, strides, dilation
    m, c4 = oh * ow, cp // 4
    k4 = kh * kw * c4
    nb, full, cw = -(-n // block), n // block, block // LANES
    rows = row_tile(m)
    nt = -(-m // rows)
    nbytes = LANES * 4
    tiles = _loop_kind(m * k4 * 4 * n)
    nc = _chunks(nb * nt, tiles, m * k4 * 4 * n)
    per = nb * nt // nc

    @T.macro
    def accumulate(x, wpk, acc, wv, jo, it):
        for r, ci in T.grid(rows, cw):
            acc[r, ci, T.ramp(0, 1, LANES)] = T.broadcast(T.int32(0), LANES)
        for ty, tx, cc in T.grid(kh, kw, c4):
            for ci in T.unroll(cw):
                wv[ci, T.ramp(0, 1, nbytes)] = wpk.vload(
                    [jo, (ty * kw + tx) * c4 + cc, ci * LANES, 0], f"int8x{nbytes}"
                )
            for r in T.unroll(rows):
                p: T.let = T.min(it * rows + r, m - 1)  # positions past m repeat the last one, unwritten
                word: T.let = T.reinterpret(
                    "int32", x.vload([0, p // ow * sh + ty * dh, p % ow * sw + tx * dw, cc * 4], "uint8x4")
                )
                xb: T.let = T.reinterpret(f"uint8x{nbytes}", T.broadcast(word, LANES))
                for ci in T.unroll(cw):
                    acc[r, ci, T.ramp(0, 1, LANES)] = vpdpbusd(
                        acc[r, ci, T.ramp(0, 1, LANES)], xb, wv[ci, T.ramp(0, 1, nbytes)], LANES
                    )

    name = f"u8s8_conv_{hp}x{wp}x{cp}_{kh}x{kw}_s{sh}x{sw}_d{dh}x{dw}_n{n}"
    if requant is None:

        @T.prim_func
        def conv(
            x: T.Buffer((1, hp, wp, cp), "uint8"),
            wpk: T.Buffer((nb, k4, block, 4), "int8"),
            colsum: T.Buffer((nb * block,), "int32"),
            zp: T.Buffer((1,), "int32"),
            y: T.Buffer((1, oh, ow, n), "int32"),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for c in tiles(nc):
                acc = T.alloc_buffer((rows, cw, LANES), "int32", scope="local")
                wv = T.alloc_buffer((cw, nbytes), "int8", scope="local")
                for tt in range(per):
                    t: T.let = c * per + tt
                    jo: T.let = t // nt
                    it: T.let = t % nt
                    accumulate(x, wpk, acc, wv, jo, it)
                    for r, ci in T.grid(rows, cw):
                        if it * rows + r < m:
                            if jo < full:
                                for v in T.vectorized(LANES):
                                    y[0, (it * rows + r) // ow, (it * rows + r) % ow, jo * block + ci * LANES + v] = (
                                        acc[r, ci, v] - zp[0] * colsum[jo * block + ci * LANES + v]
                                    )
                            else:
                                for v in range(LANES):
                                    if jo * block + ci * LANES + v < n:
                                        y[
                                            0, (it * rows + r) // ow, (it * rows + r) % ow, jo * block + ci * LANES + v
                                        ] = acc[r, ci, v] - zp[0] * colsum[jo * block + ci * LANES + v]

        return conv.with_attr("global_symbol", name)

    zpo, low, high, odt = requant
    pt, pb, pl, pr, fill = border
    yh, yw = oh + pt + pb, ow + pl + pr

    def requantized(value: Any, bias: Any, mult: Any) -> Any:
        # the graph's ops in its order: astype, + bias, * mult, round, + zero point, min, max, cast
        scaled = tirx.round((tirx.Cast("float32", value) + bias) * mult) + tirx.const(zpo, "float32")
        clamped = tirx.max(tirx.min(scaled, tirx.const(high, "float32")), tirx.const(low, "float32"))
        return tirx.Cast(odt, clamped)

    @T.prim_func
    def fused(
        x: T.Buffer((1, hp, wp, cp), "uint8"),
        wpk: T.Buffer((nb, k4, block, 4), "int8"),
        colsum: T.Buffer((nb * block,), "int32"),
        zp: T.Buffer((1,), "int32"),
        bias: T.Buffer((nb * block,), "float32"),
        mult: T.Buffer((nb * block,), "float32"),
        y: T.Buffer((1, yh, yw, n), odt),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        # the border (the next conv's padding; none without one): rows above and below, then columns
        for h, w in T.grid(pt + pb, yw):
            for v in T.vectorized(n):
                y[0, T.Select(h < pt, h, h + oh), w, v] = T.Cast(odt, fill)
        for h, w in T.grid(oh, pl + pr):
            for v in T.vectorized(n):
                y[0, pt + h, T.Select(w < pl, w, w + ow), v] = T.Cast(odt, fill)
        for c in tiles(nc):
            acc = T.alloc_buffer((rows, cw, LANES), "int32", scope="local")
            wv = T.alloc_buffer((cw, nbytes), "int8", scope="local")
            for tt in range(per):
                t: T.let = c * per + tt
                jo: T.let = t // nt
                it: T.let = t % nt
                accumulate(x, wpk, acc, wv, jo, it)
                for r, ci in T.grid(rows, cw):
                    if it * rows + r < m:
                        if jo < full:
                            for v in T.vectorized(LANES):
                                y[
                                    0,
                                    (it * rows + r) // ow + pt,
                                    (it * rows + r) % ow + pl,
                                    jo * block + ci * LANES + v,
                                ] = requantized(
                                    acc[r, ci, v] - zp[0] * colsum[jo * block + ci * LANES + v],
                                    bias[jo * block + ci * LANES + v],
                                    mult[jo * block + ci * LANES + v],
                                )
                        else:
                            for v in range(LANES):
                                if jo * block + ci * LANES + v < n:
                                    col: T.let = jo * block + ci * LANES + v
                                    y[0, (it * rows + r) // ow + pt, (it * rows + r) % ow + pl, col] = requantized(
                                        acc[r, ci, v] - zp[0] * colsum[col], bias[col], mult[col]
                                    )

    padded = f"_p{pt}x{pb}x{pl}x{pr}" if any(border[:4]) else ""
    return fused.with_attr("global_symbol", f"{name}_q{odt[0]}{padded}")


# TVM fuses no epilogue into a call_tir: the integer conv's requantization is written into the
# conv by `fuse_requantize` where the graph's pattern holds, else a separate elementwise kernel
# follows the int32 result; a float conv of the same integers fuses it. The float conv is kept
# below this many products per output: with few of them it won (MobileNet's
# 1x1 convs, 16-64 input channels: 0.075 -> 0.16 ms for the model); 3x3 convs over 32-64 channels
# (288-576 products) won (convnet.qdq 0.31 -> 0.19 ms). Loaded measurements, one thread.
MIN_CONV_REDUCTION = 128


def _quantized_source(x: relax.Expr, lookup: Any) -> tuple[relax.Expr, int] | None:
    """For a conv input ``x = q - zp`` with ``q`` integral in [0, 255] (a uint8 tensor cast to float,
    or a quantize's rounded and clamped float): (q as a uint8 expression, zp)."""
    bound = lookup(x) if isinstance(x, relax.Var) else None
    if not (isinstance(bound, relax.Call) and bound.op == tvm_op("relax.subtract")):
        return None
    q, zp = bound.args
    if not isinstance(zp, GenericConst) or zp.value.numpy().size != 1:
        return None
    zp_value = float(zp.value.numpy().reshape(()))
    if zp_value != int(zp_value) or not 0 <= zp_value <= 255:
        return None
    inner = lookup(q) if isinstance(q, relax.Var) else None
    if not isinstance(inner, relax.Call):
        return None
    if inner.op == tvm_op("relax.astype") and _dtype(inner.args[0]) == "uint8":
        return inner.args[0], int(zp_value)
    if inner.op == tvm_op("relax.astype") and _dtype(inner.args[0]) == "float32":  # layout's identity cast
        q = inner.args[0]
        inner = lookup(q) if isinstance(q, relax.Var) else None
        if not isinstance(inner, relax.Call):
            return None
        if inner.op == tvm_op("relax.astype") and _dtype(inner.args[0]) == "uint8":  # a fused conv's bytes
            return inner.args[0], int(zp_value)
    # maximum(minimum(round(..) + c, 255), 0): layout._ScalarQDQ's quantize to uint8
    if inner.op != tvm_op("relax.maximum") or not _is_value(inner.args[1], 0.0):
        return None
    low = lookup(inner.args[0]) if isinstance(inner.args[0], relax.Var) else inner.args[0]
    if not (isinstance(low, relax.Call) and low.op == tvm_op("relax.minimum") and _is_value(low.args[1], 255.0)):
        return None
    added = lookup(low.args[0]) if isinstance(low.args[0], relax.Var) else low.args[0]
    if not (isinstance(added, relax.Call) and added.op == tvm_op("relax.add")):
        return None
    rounded = lookup(added.args[0]) if isinstance(added.args[0], relax.Var) else added.args[0]
    c = added.args[1]
    if not (isinstance(rounded, relax.Call) and rounded.op == tvm_op("relax.round")) or not isinstance(c, GenericConst):
        return None
    cv = float(c.value.numpy().reshape(()))
    if cv != int(cv):
        return None
    return relax.op.astype(q, "uint8"), int(zp_value)


def _is_value(expr: Any, value: float) -> bool:
    return isinstance(expr, GenericConst) and expr.value.numpy().size == 1 and float(expr.value.numpy()) == value


def rewrite_int_conv(
    bb: Any, call: relax.Call, lookup: Any, isa: str = "avx512vnni", fusable: dict | None = None
) -> relax.Expr | None:
    """A channels-last conv (groups 1, static shapes) of ``q - zp`` (``q`` uint8 values) by a
    constant weight of int8 values: `u8s8_conv` over the input padded with the zero point, the
    int32 result cast to float32 (exact below 2^24, as the float conv it replaces); None where
    the pattern does not hold. ``fusable`` (where given) records the VNNI conv's int32 result for
    `fuse_requantize`."""
    name = call.op.name
    if name not in ("relax.nn.conv1d", "relax.nn.conv2d"):
        return None
    a = call.attrs
    if a.data_layout not in ("NWC", "NHWC") or a.kernel_layout not in ("OWI", "OHWI") or int(a.groups) != 1:
        return None
    x, w = call.args
    if not isinstance(w, GenericConst) or str(w.value.dtype) != "float32":
        return None
    weight = w.value.numpy()
    if np.any(weight != np.round(weight)) or weight.min() < -128 or weight.max() > 127:
        return None
    shape = _static_shape(x)
    found = _quantized_source(x, lookup)
    moved = lookup(x) if found is None and isinstance(x, relax.Var) else None
    last = [0, *range(2, len(shape or [])), 1]
    if (
        isinstance(moved, relax.Call)
        and moved.op == tvm_op("relax.permute_dims")
        and [int(v) for v in moved.attrs.axes or []] == last
    ):
        # The channels-first side of the graph's edge (its input quantized): transpose the uint8 values.
        inner = _quantized_source(moved.args[0], lookup)
        found = None if inner is None else (relax.op.permute_dims(bb.emit(inner[0]), last), inner[1])
    if shape is None or found is None or shape[0] != 1:
        return None
    q, zp = found
    nsp = len(shape) - 2
    padding = [int(p) for p in a.padding]
    before, after = padding[:nsp], padding[nsp:] if len(padding) == 2 * nsp else padding[:nsp]
    strides, dilation = [int(s) for s in a.strides], [int(d) for d in a.dilation]
    co, *taps, ci = weight.shape
    spatial = shape[1:-1]
    out_sp = [
        (spatial[i] + before[i] + after[i] - dilation[i] * (taps[i] - 1) - 1) // strides[i] + 1 for i in range(nsp)
    ]
    if nsp == 1:  # a unit height
        spatial, out_sp, taps, strides, dilation = (
            [1, *spatial],
            [1, *out_sp],
            [1, *taps],
            [1, *strides],
            [1, *dilation],
        )
        before, after = [0, *before], [0, *after]
    weight = weight.reshape(co, *taps, ci)
    if int(np.prod(taps)) * ci < MIN_CONV_REDUCTION:
        return None
    cp = -(-ci // 4) * 4
    w4 = np.zeros((co, *taps, cp), np.int8)
    w4[..., :ci] = weight.astype(np.int8)
    wk = w4.reshape(co, -1).T  # [taps x cp, co]
    block = 2 * LANES if co % (2 * LANES) == 0 or co > 2 * LANES else LANES
    packed = pack_weight(wk, block)
    colsum = np.zeros(packed.shape[0] * block, np.int32)
    colsum[:co] = wk.astype(np.int64).sum(axis=0).astype(np.int32)
    hp, wp_ = spatial[0] + before[0] + after[0], spatial[1] + before[1] + after[1]

    # Relax's own pad (borders and channels past ci take the zero point, a real zero; those
    # channels meet zero weights): FuseOps fuses the previous layer's requantization into it,
    # where the call_tir of a TE pad stayed a kernel of its own.
    widths = [0, 0, before[0], after[0], before[1], after[1], 0, cp - ci]
    xp = _padded_by_producer(bb, q, fusable, [1, *spatial, ci], tuple(widths[2:6]), zp) if cp == ci else None
    if xp is None:
        qe = bb.emit(q)
        if nsp == 1:
            qe = bb.emit(relax.op.reshape(qe, [1, 1, spatial[1], ci]))
        xp = bb.emit(relax.op.nn.pad(qe, widths, pad_value=float(zp)))
    if isa not in ("avx512vnni", "amx"):  # aarch64 sdot, AVX2 vpmaddwd (AMX: the VNNI conv)
        func = portable_conv(isa, (hp, wp_), tuple(out_sp), tuple(taps), tuple(strides), tuple(dilation), cp, co)
        zp_const = relax.const(np.array([zp], np.int32))
        y = bb.emit(_portable_call(bb, func, xp, wk, isa, zp_const, [1, *out_sp, co]))
        if nsp == 1:
            y = bb.emit(relax.op.reshape(y, [1, out_sp[1], co]))
        return relax.op.astype(y, "float32")
    func = u8s8_conv((hp, wp_), tuple(out_sp), tuple(taps), tuple(strides), tuple(dilation), cp, co, block)
    gv = bb.add_func(func, func.attrs["global_symbol"])
    y = relax.call_tir(
        gv,
        [xp, relax.const(packed), relax.const(colsum), relax.const(np.array([zp], np.int32))],
        out_ty=relax.TensorType([1, *out_sp, co], "int32"),
    )
    y = bb.emit(y)
    if fusable is not None:
        fusable[y] = _ConvCall(
            ((hp, wp_), tuple(out_sp), tuple(taps), tuple(strides), tuple(dilation), cp, co, block),
            [xp, relax.const(packed), relax.const(colsum), relax.const(np.array([zp], np.int32))],
            [1, *out_sp, co],
        )
    if nsp == 1:
        y = bb.emit(relax.op.reshape(y, [1, out_sp[1], co]))
    return relax.op.astype(y, "float32")


def _padded_by_producer(
    bb: Any, q: Any, fusable: dict | None, shape: list[int], pads: tuple[int, ...], zp: int
) -> relax.Expr | None:
    """The uint8 ``q`` padded by ``pads`` (top, bottom, left, right) with ``zp``, written by the fused
    conv that produces ``q`` (`fuse_requantize`) into the larger tensor itself, where ``q`` is one
    (with ``shape``); else None. The unpadded call stays only where something else reads it."""
    conv = fusable.get(q) if fusable is not None and isinstance(q, relax.Var) else None
    if conv is None or conv.requant is None or conv.requant[3] != "uint8" or conv.out != shape:
        return None
    if not any(pads) or min(pads) < 0:
        return None
    func = u8s8_conv(*conv.shape, requant=conv.requant, border=(*pads, zp))
    gv = bb.add_func(func, func.attrs["global_symbol"])
    out = [1, shape[1] + pads[0] + pads[1], shape[2] + pads[2] + pads[3], shape[3]]
    return bb.emit(relax.call_tir(gv, conv.args, out_ty=relax.TensorType(out, "uint8")))


@dataclasses.dataclass(frozen=True)
class _ConvCall:
    """A `u8s8_conv` call as `rewrite_int_conv` emitted it: its shape arguments, inputs, output shape."""

    shape: tuple
    args: list
    out: list[int]
    requant: tuple | None = None  # `u8s8_conv`'s requant: a fused conv's bytes (args then hold bias and mult)


def _per_channel(expr: Any, co: int, width: int) -> np.ndarray | None:
    """A float32 constant that varies along the last axis only (or is a scalar), as ``width`` values
    (the ``co`` channels, then zeros for the padded block), or None."""
    if not isinstance(expr, GenericConst) or str(expr.value.dtype) != "float32":
        return None
    value = expr.value.numpy()
    if value.size == 1:
        flat = np.full(co, value.reshape(()), np.float32)
    elif value.shape[-1] == co and value.size == co:
        flat = value.reshape(co)
    else:
        return None
    out = np.zeros(width, np.float32)
    out[:co] = flat
    return out


def fuse_requantize(bb: Any, call: relax.Call, lookup: Any, fusable: dict) -> relax.Expr | None:
    """``maximum(minimum(round((astype(y, float32) [+ bias]) * mult) + zp, high), low)`` of a VNNI
    conv's int32 result ``y`` (recorded in ``fusable`` by `rewrite_int_conv`), the requantization
    QLinearConv and QDQ convs import as, with bias and mult per output channel and low..high within
    uint8 or int8: the conv writing those bytes itself (`u8s8_conv` with ``requant``), read back as
    float32 (exact: small integers), or None where the pattern does not hold. The int32 tensor and
    the separate requantization kernel go (its consumers' casts back to the bytes fold away)."""

    bound = functools.partial(_bound, lookup=lookup)

    if call.op != tvm_op("relax.maximum") or not _is_scalar(call.args[1]):
        return None
    low = float(call.args[1].value.numpy().reshape(()))
    lower = bound(call.args[0], "relax.minimum")
    if lower is None or not _is_scalar(lower.args[1]):
        return None
    high = float(lower.args[1].value.numpy().reshape(()))
    shifted = bound(lower.args[0], "relax.add")
    if shifted is None or not _is_scalar(shifted.args[1]):
        return None
    zpo = float(shifted.args[1].value.numpy().reshape(()))
    rounded = bound(shifted.args[0], "relax.round")
    scaled = None if rounded is None else bound(rounded.args[0], "relax.multiply")
    if scaled is None:
        return None
    biased = bound(scaled.args[0], "relax.add")
    cast = bound(biased.args[0] if biased is not None else scaled.args[0], "relax.astype")
    if cast is None or str(cast.attrs.dtype) != "float32":
        return None
    y = cast.args[0]
    reshaped = bound(y, "relax.reshape")
    if reshaped is not None:  # a 1-D conv's unit height dropped
        y = reshaped.args[0]
    conv = fusable.get(y)
    if conv is None:
        return None
    if 0 <= low and high <= 255:
        odt = "uint8"
    elif -128 <= low and high <= 127:
        odt = "int8"
    else:
        return None
    if any(v != int(v) for v in (low, high, zpo)):
        return None
    co, width = conv.out[-1], conv.args[2].value.numpy().size
    bias = np.zeros(width, np.float32) if biased is None else _per_channel(biased.args[1], co, width)
    mult = _per_channel(scaled.args[1], co, width)
    if bias is None or mult is None:
        return None
    func = u8s8_conv(*conv.shape, requant=(zpo, low, high, odt))
    gv = bb.add_func(func, func.attrs["global_symbol"])
    args = [*conv.args, relax.const(bias), relax.const(mult)]
    q = bb.emit(relax.call_tir(gv, args, out_ty=relax.TensorType(conv.out, odt)))
    fusable[q] = _ConvCall(conv.shape, args, conv.out, (zpo, low, high, odt))
    if reshaped is not None:
        q = bb.emit(relax.op.reshape(q, _static_shape(reshaped)))
    return relax.op.astype(q, "float32")


def pool_quantized(bb: Any, call: relax.Call, lookup: Any) -> relax.Expr | None:
    """``max_pool2d((astype(q, float32) [- zp]) * s)`` with ``q`` uint8 or int8 and ``s > 0`` (QDQ's
    dequantize before a pool): the pool on the bytes, dequantized after. The same floats: the
    dequantization is monotone (exact subtraction, rounded multiplication by a positive scale), so
    it commutes with max. A quarter of the bytes in, and the dequantization fuses into the next
    requantization. None where the pattern does not hold (padding or ceil mode: left as it was)."""

    bound = functools.partial(_bound, lookup=lookup)

    if call.op != tvm_op("relax.nn.max_pool2d") or any(int(p) for p in call.attrs.padding) or call.attrs.ceil_mode:
        return None
    scaled = bound(call.args[0], "relax.multiply")
    if scaled is None or not _is_scalar(scaled.args[1]) or not float(scaled.args[1].value.numpy()) > 0:
        return None
    shifted = bound(scaled.args[0], "relax.subtract")
    if shifted is not None and not _is_scalar(shifted.args[1]):
        return None
    cast = bound(shifted.args[0] if shifted is not None else scaled.args[0], "relax.astype")
    if cast is None or str(cast.attrs.dtype) != "float32" or _dtype(cast.args[0]) not in ("uint8", "int8"):
        return None
    pooled: relax.Expr = relax.op.astype(bb.emit(relax.Call(call.op, [cast.args[0]], call.attrs)), "float32")
    if shifted is not None:
        pooled = relax.op.subtract(bb.emit(pooled), shifted.args[1])
    return relax.op.multiply(bb.emit(pooled), scaled.args[1])


def narrowed(call: relax.Call, lookup: Any) -> relax.Expr | None:
    """``astype(astype(q, float32), dtype)`` with ``q`` already of ``dtype`` (uint8 or int8, which
    float32 holds exactly): ``q``; None otherwise."""
    if call.op != tvm_op("relax.astype") or str(call.attrs.dtype) not in ("uint8", "int8"):
        return None
    inner = lookup(call.args[0]) if isinstance(call.args[0], relax.Var) else call.args[0]
    if not (isinstance(inner, relax.Call) and inner.op == tvm_op("relax.astype")):
        return None
    if str(inner.attrs.dtype) != "float32" or _dtype(inner.args[0]) != str(call.attrs.dtype):
        return None
    return inner.args[0]


def _bound(expr: Any, op: str, lookup: Any) -> relax.Call | None:
    """The call of ``op`` that ``expr`` is (or is bound to), else None."""
    value = lookup(expr) if isinstance(expr, relax.Var) else expr
    return value if isinstance(value, relax.Call) and value.op == tvm_op(op) else None


def _is_scalar(expr: Any) -> bool:
    return isinstance(expr, GenericConst) and expr.value.numpy().size == 1 and str(expr.value.dtype) == "float32"


# -- aarch64 dotprod and AVX2 -----------------------------------------------------------------
# The same kernel on CPUs without VNNI, chosen by `int8_isa` as the LLM's `dot_isa` chooses:
#
# - aarch64 ``sdot``: four signed x signed byte products per int32 lane (4 lanes). onnxruntime's
#   activations are uint8, so each byte has its sign bit flipped (``x ^ 0x80 = x - 128`` as int8)
#   and the 128 comes back through the column sums: ``sum x W - zp colsum = sum (x - 128) W -
#   (zp - 128) colsum``. Weight layout as VNNI's, ``int8 [N/B, K/4, B, 4]``.
# - AVX2: ``vpmaddubsw`` (u8 x s8) saturates its 16-bit pair sums (2 x 255 x 127 > 32767), so
#   onnxruntime's bytes would not come out; ``vpmaddwd`` multiplies 16-bit pairs into int32 lanes
#   exactly (16 products per instruction, twice ``vpmulld``'s 8). The weight, ``int8 [N/B, K/2,
#   B, 2]``, is widened to int16 as it is loaded (``vpmovsxbw``: half the bytes of an int16 copy,
#   and artifacts store no int16), and two activation bytes make one 32-bit word.
#
# A GEMM is the conv below over a [1, 1, m, k] input with one tap.

PORTABLE_ISAS = ("dotprod", "avx2")
# Below this many multiply-adds a kernel runs on one thread (the float rules' `MIN_PARALLEL_MACS`:
# these instructions do 16 products each, as a 512-bit FMA does).
MIN_PARALLEL_PORTABLE_MACS = 1 << 22


def int8_isa(target: Any) -> str | None:
    """The integer instruction set the graph's int8 kernels use on ``target``: ``amx`` (AMX-INT8
    tiles for GEMMs of `AMX_GRAPH_ROWS` rows or more and K a multiple of `AMX_K`, the VNNI kernels
    for the rest), ``avx512vnni``, ``dotprod`` (also on i8mm cores, which have it), ``avx2``, or
    None (the float path)."""
    from tvm.target.codegen import llvm_get_cpu_features

    from edgert.compiler.kernels.int8 import dot_isa

    if target.kind.name != "llvm":
        return None
    isa = dot_isa(set(llvm_get_cpu_features(target)))
    return {"i8mm": "dotprod"}.get(isa, isa) if isa else None


def _portable_shape(isa: str, n: int) -> tuple[int, int, int, int]:
    """(int32 lanes per register, bytes of K per lane, column block, most rows per tile) for ``isa``."""
    lanes, unit, registers = (4, 4, 32) if isa == "dotprod" else (8, 2, 16)
    # 16 columns: 4 NEON or 2 ymm registers a K step, leaving room for 6 rows of accumulators.
    block = 16 if n > 8 else max(lanes, -(-n // lanes) * lanes)
    cw = block // lanes
    # The rows' accumulators, the weight registers of one K step and the activation broadcast.
    rows = max(1, min(8, (registers - cw - 1) // cw))
    return lanes, unit, block, rows


def pack_portable(w: np.ndarray, isa: str) -> tuple[np.ndarray, np.ndarray, int]:
    """int8 [K, N] (K a multiple of 4) -> (packed weight, column sums padded to the block, block)."""
    k, n = w.shape
    _, unit, block, _ = _portable_shape(isa, n)
    pad = -n % block
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    packed = np.ascontiguousarray(wp.reshape(k // unit, unit, -1, block).transpose(2, 0, 3, 1).astype(np.int8))
    colsum = np.zeros(packed.shape[0] * block, np.int32)
    colsum[:n] = w.sum(axis=0, dtype=np.int64).astype(np.int32)
    return packed, colsum, block


@functools.cache
def portable_conv(
    isa: str,
    inp: tuple[int, ...],
    out: tuple[int, ...],
    taps: tuple[int, ...],
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    cp: int,
    n: int,
) -> tirx.PrimFunc:
    """`u8s8_conv` for ``dotprod`` or ``avx2`` (weights packed by `pack_portable`): ``y[p, co] =
    sum over taps and channels of xp[pos(p, tap), c] * W[tap, c, co] - zp * colsum[co]``."""
    if isa not in PORTABLE_ISAS:
        raise ValueError(f"portable_conv takes {' or '.join(PORTABLE_ISAS)}, not '{isa}'")
    (hp, wp), (oh, ow), (kh, kw), (sh, sw), (dh, dw) = inp, out, taps, strides, dilation
    lanes, unit, block, max_rows = _portable_shape(isa, n)
    if cp % unit:
        raise ValueError(f"portable_conv needs channels in multiples of {unit}, got {cp}")
    m, cu = oh * ow, cp // unit
    nb, full, cw = -(-n // block), n // block, block // lanes
    rows = m if m <= max_rows else min(range(max_rows, max(1, max_rows // 2) - 1, -1), key=lambda r: -(-m // r) * r)
    nt = -(-m // rows)
    nbytes = lanes * 4
    wdt, wlanes = ("int8", nbytes) if isa == "dotprod" else ("int16", lanes * 2)
    offset = 128 if isa == "dotprod" else 0  # sdot's signed activations: x - 128, returned via colsum
    tiles = T.parallel if m * kh * kw * cp * n >= MIN_PARALLEL_PORTABLE_MACS else T.serial

    def word(x: Any, p: Any, ty: Any, tx: Any, cc: Any) -> Any:
        """The ``unit`` activation bytes of one K step as an int32 (sign-flipped for sdot)."""
        row, col = p // ow * sh + ty * dh, p % ow * sw + tx * dw
        if isa == "dotprod":
            return T.reinterpret("int32", x.vload([0, row, col, cc * 4], "uint8x4")) ^ T.int32(-2139062144)
        lo = T.Cast("int32", x[0, row, col, cc * 2])
        return lo | (T.Cast("int32", x[0, row, col, cc * 2 + 1]) << 16)

    def dot(acc: Any, w: Any, xw: Any) -> Any:
        if isa == "dotprod":
            xb = T.reinterpret("int8x16", T.broadcast(xw, 4))
            return T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), acc, w, xb, dtype="int32x4"
            )
        xb = T.reinterpret("int16x16", T.broadcast(xw, 8))
        return acc + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), w, xb, dtype="int32x8"
        )

    @T.prim_func
    def conv(
        x: T.Buffer((1, hp, wp, cp), "uint8"),
        wpk: T.Buffer((nb, kh * kw * cu, block, unit), "int8"),
        colsum: T.Buffer((nb * block,), "int32"),
        zp: T.Buffer((1,), "int32"),
        y: T.Buffer((1, oh, ow, n), "int32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in tiles(nb * nt):
            jo = t // nt
            it = t % nt
            acc = T.alloc_buffer((rows, cw, lanes), "int32", scope="local")
            wv = T.alloc_buffer((cw, wlanes), wdt, scope="local")
            for r, ci in T.grid(rows, cw):
                acc[r, ci, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
            for ty, tx, cc in T.grid(kh, kw, cu):
                for ci in T.unroll(cw):
                    wv[ci, T.ramp(0, 1, wlanes)] = T.Cast(
                        f"{wdt}x{wlanes}", wpk.vload([jo, (ty * kw + tx) * cu + cc, ci * lanes, 0], f"int8x{wlanes}")
                    )
                for r in T.unroll(rows):
                    xw = word(x, T.min(it * rows + r, m - 1), ty, tx, cc)  # rows past m repeat the last
                    for ci in T.unroll(cw):
                        acc[r, ci, T.ramp(0, 1, lanes)] = dot(
                            acc[r, ci, T.ramp(0, 1, lanes)], wv[ci, T.ramp(0, 1, wlanes)], xw
                        )
            for r, ci in T.grid(rows, cw):
                if it * rows + r < m:
                    if jo < full:
                        for v in T.vectorized(lanes):
                            y[0, (it * rows + r) // ow, (it * rows + r) % ow, jo * block + ci * lanes + v] = (
                                acc[r, ci, v] - (zp[0] - offset) * colsum[jo * block + ci * lanes + v]
                            )
                    else:
                        for v in range(lanes):
                            if jo * block + ci * lanes + v < n:
                                y[0, (it * rows + r) // ow, (it * rows + r) % ow, jo * block + ci * lanes + v] = (
                                    acc[r, ci, v] - (zp[0] - offset) * colsum[jo * block + ci * lanes + v]
                                )

    name = f"u8s8_{isa}_conv_{hp}x{wp}x{cp}_{kh}x{kw}_s{sh}x{sw}_d{dh}x{dw}_n{n}"
    return conv.with_attr("global_symbol", name)


def _portable_call(
    bb: Any, func: tirx.PrimFunc, xp: relax.Expr, wk: np.ndarray, isa: str, zp: relax.Expr, out: list[int]
) -> relax.Expr:
    """``call_tir`` of a `portable_conv` on the uint8 input ``xp`` by the int8 weight ``wk`` [K, N]."""
    packed, colsum, _ = pack_portable(wk, isa)
    gv = bb.add_func(func, func.attrs["global_symbol"])
    return relax.call_tir(gv, [xp, relax.const(packed), relax.const(colsum), zp], out_ty=relax.TensorType(out, "int32"))


def _portable_matmul(
    bb: Any, isa: str, xq: relax.Expr, shape: list[int], weight: np.ndarray, zp: relax.Expr
) -> relax.Expr:
    """`rewrite_int_matmul`'s integer GEMM on ``isa``: a one-tap `portable_conv` over [1, 1, m, k]."""
    k, n = weight.shape
    m = int(np.prod(shape[:-1]))
    func = portable_conv(isa, (1, m), (1, m), (1, 1), (1, 1), (1, 1), k, n)
    func = func.with_attr("global_symbol", f"u8s8_{isa}_gemm_m{m}_k{k}_n{n}")
    x4 = bb.emit(relax.op.reshape(xq, [1, 1, m, k]))
    y = bb.emit(_portable_call(bb, func, x4, weight.astype(np.int8), isa, bb.emit(zp), [1, 1, m, n]))
    return relax.op.reshape(y, [*shape[:-1], n])
