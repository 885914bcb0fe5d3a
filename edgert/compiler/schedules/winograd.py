"""Winograd F(4x4, 3x3) for channels-last 3x3 convolutions (stride 1, any dilation) on CPUs.

A direct 3x3 conv does 9 multiply-adds per output and input channel; convnet's largest convs ran
at the FMA units' peak and no faster than onnxruntime's (0.138 against 0.140 ms). Winograd's
minimal filtering computes a 4x4 output tile from a 6x6 input tile with 36 products per channel
pair instead of 144 (Lavin & Gray, 2015):

    Y = A^T [ (G g G^T) * (B^T d B) ] A     (* elementwise, summed over input channels)

so the conv becomes three kernels: the input transform ``V[ab, tile, c] = (B^T d B)[ab]``, 36
matmuls ``M[ab] = V[ab] @ U[ab]`` (``U = G g G^T`` computed at compile time, the `Matmul` rule
tiles them) and the output transform ``Y = A^T M A``. A dilated conv is the same on each of its
``d x d`` interleaved sub-grids (the input tile's samples ``d`` apart). The transforms are
straight-line code generated here with the matrices' constants (most are 0, +-1, powers of 2),
vectorized over channels.

Rounding: the points 0, +-1, +-2 keep the transform error near float32's epsilon times the
largest coefficient (8): measured below 1e-5 relative on the zoo's convnet.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

M, R = 4, 3  # output tile, kernel size
ALPHA = M + R - 1
BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
G = [
    [Fraction(1, 4), 0, 0],
    [Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)],
    [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
    [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)],
    [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
    [0, 0, 1],
]
AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]
# Below this many multiply-adds (direct) a conv keeps the direct kernel: three kernels and two
# buffers cost more than the products they save.
MIN_MACS = 1 << 21
# The transformed input and the matmuls' result (36 values per tile and channel) stay below this:
# measured only on the zoo's small images (at most 0.6 MB); larger maps keep the direct kernel
# rather than stream several times their size through memory untiled.
MAX_TRANSFORMED_BYTES = 8 << 20
# A transform goes over threads from this many tile x channel-vector iterations (about 300 vector
# instructions each, ~50 us on one thread). convnet's (128-256, 3-8 us) ran faster on the calling
# thread: 0.148 against 0.157 ms for the model at 2 threads (each engine alone, loaded).
MIN_PARALLEL_VECTORS = 1024


def matmul_rows(nt: int, c: int, co: int) -> int:
    """Rows of the 36 matmuls for ``nt`` tiles: at least ``nt``, a multiple of 6 or 8 (whole
    register tiles), and no multiple of 2 KiB between two matmuls' rows of V or M. 36 rows 4 or
    8 KiB apart fell into one L1 set (the input transform writes one vector to each per tile:
    14.7 -> 8.6 us for convnet's 32x32x32 input, padded from 64 to 72 rows)."""
    for rows in range(nt, nt + 24):
        if (rows % 8 == 0 or rows % 6 == 0) and (rows * c * 4) % 2048 and (rows * co * 4) % 2048:
            return rows
    return nt


def fits(weight_shape: tuple[int, ...], strides: list[int], dilation: list[int], out_sp: list[int], lanes: int) -> bool:
    """Whether a channels-last conv2d (groups 1, weight [co, kh, kw, ci]) takes the Winograd path."""
    co, kh, kw, ci = weight_shape
    d = dilation[0]
    return (
        (kh, kw) == (R, R)
        and list(strides) == [1, 1]
        and dilation[0] == dilation[1]
        and all(o % (M * d) == 0 for o in out_sp)
        and ci % lanes == 0
        and co % lanes == 0
        and out_sp[0] * out_sp[1] * ci * co * R * R >= MIN_MACS
        and ALPHA * ALPHA * (out_sp[0] // M) * (out_sp[1] // M) * max(ci, co) * 4 <= MAX_TRANSFORMED_BYTES
    )


def _combination(coefs: list[Any], names: list[str]) -> str:
    """``sum(c * name)`` over vectors of ``VEC`` lanes as TVMScript, zero terms left out."""
    terms = []
    for c, name in zip(coefs, names, strict=True):
        if c == 0:
            continue
        if c == 1:
            terms.append(name)
        elif c == -1:
            terms.append(f"(T.broadcast(T.float32(0.0), VEC) - {name})")
        else:
            terms.append(f"T.broadcast(T.float32({float(c)!r}), VEC) * {name}")
    return " + ".join(terms)


def _tile_origin(d: int, ty: int, tx: int) -> list[str]:
    """Statements binding (r0, c0), tile ``t``'s top-left sample in the padded input and in the
    output (the same coordinates): sub-grid ``ph`` of the ``d x d`` interleaved ones, then the
    tile's row and column in it."""
    return [
        f"ph: T.let = t // {ty * tx}",
        f"r0: T.let = ph // {d} + {d * M} * (t % {ty * tx} // {tx})",
        f"c0: T.let = ph % {d} + {d * M} * (t % {tx})",
    ]


def _parse(src: str) -> tirx.PrimFunc:
    from tvm.script import tirx as T

    return tvm.script.from_source(src, extra_vars={"T": T})


@functools.cache
def input_transform(hp: int, wp: int, c: int, d: int, ty: int, tx: int, rows: int, lanes: int) -> tirx.PrimFunc:
    """``V[a*6+b, t, c] = (B^T d_t B)[a, b]`` over the padded input [1, hp, wp, c]; ``rows`` >= the
    tile count (rows past it are zeros)."""
    nt = d * d * ty * tx
    inner = [
        f'x{i}{j}: T.let = x.vload([0, r0 + {i * d}, c0 + {j * d}, ch], "float32xVEC")'
        for i in range(ALPHA)
        for j in range(ALPHA)
    ]
    # Rows first: w[i][b] = sum_j BT[b][j] x[i][j], then V[a][b] = sum_i BT[a][i] w[i][b].
    for i in range(ALPHA):
        inner += [f"w{i}{b}: T.let = " + _combination(BT[b], [f"x{i}{j}" for j in range(ALPHA)]) for b in range(ALPHA)]
    inner += [
        f"v[{a * ALPHA + b}, t, T.ramp(ch, 1, VEC)] = " + _combination(BT[a], [f"w{i}{b}" for i in range(ALPHA)])
        for a in range(ALPHA)
        for b in range(ALPHA)
    ]
    params = [
        f'x: T.Buffer((1, {hp}, {wp}, {c}), "float32")',
        f'v: T.Buffer(({ALPHA * ALPHA}, {rows}, {c}), "float32")',
    ]
    src = _kernel("wino_in", params, nt, c, lanes, _tile_origin(d, ty, tx), inner)
    if rows > nt:  # zeros in the matmul's padding rows (whatever they hold goes through it unread)
        src += (
            "\n".join(
                [
                    f"        for t, ab, cv in T.grid({rows - nt}, {ALPHA * ALPHA}, {c // lanes}):",
                    f"            v[ab, {nt} + t, T.ramp(cv * {lanes}, 1, {lanes})] = "
                    f"T.broadcast(T.float32(0.0), {lanes})",
                ]
            )
            + "\n"
        )
    return _parse(src).with_attr("global_symbol", f"wino_in_{hp}x{wp}x{c}_d{d}")


@functools.cache
def output_transform(oh: int, ow: int, co: int, d: int, rows: int, lanes: int) -> tirx.PrimFunc:
    """``Y[0, tile rows, tile cols, co] = (A^T M_t A)`` for the matmuls' result M [36, rows, co]."""
    ty, tx = oh // (M * d), ow // (M * d)
    nt = d * d * ty * tx
    inner = [
        f'm{a}{b}: T.let = m.vload([{a * ALPHA + b}, t, ch], "float32xVEC")' for a in range(ALPHA) for b in range(ALPHA)
    ]
    for u in range(M):
        inner += [f"s{u}{b}: T.let = " + _combination(AT[u], [f"m{a}{b}" for a in range(ALPHA)]) for b in range(ALPHA)]
    inner += [
        f"y[0, r0 + {u * d}, c0 + {v * d}, T.ramp(ch, 1, VEC)] = "
        + _combination(AT[v], [f"s{u}{b}" for b in range(ALPHA)])
        for u in range(M)
        for v in range(M)
    ]
    params = [
        f'm: T.Buffer(({ALPHA * ALPHA}, {rows}, {co}), "float32")',
        f'y: T.Buffer((1, {oh}, {ow}, {co}), "float32")',
    ]
    src = _kernel("wino_out", params, nt, co, lanes, _tile_origin(d, ty, tx), inner)
    return _parse(src).with_attr("global_symbol", f"wino_out_{oh}x{ow}x{co}_d{d}")


def _kernel(name: str, params: list[str], nt: int, c: int, lanes: int, body: list[str], inner: list[str]) -> str:
    """A TVMScript kernel: tiles (over threads when there are enough), channel vectors of
    ``lanes``, then the straight-line ``inner`` statements on whole vectors (``vload``, ramps).

    Values are bound with ``T.let``: a plain ``x = ...`` in TVMScript is a one-element local
    buffer, which inside a parallel loop's body LowerTVMBuiltin turns into a workspace
    allocation per value and iteration (convnet's input transform: 101 against 4.6 us, one
    thread); in a vectorized loop only its last lane was written."""
    lines = [
        "@T.prim_func(s_tir=True)",
        f"def {name}({', '.join(params)}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})',
        '    with T.sblock("root"):',  # Relax's op-pattern analysis expects a root block
        f"        for t in {'T.parallel' if nt * c // lanes >= MIN_PARALLEL_VECTORS else 'T.serial'}({nt}):",
        *(" " * 12 + s for s in body),
        f"            for cv in range({c // lanes}):",
        f"                ch: T.let = cv * {lanes}",
        *(" " * 16 + s for s in inner),
    ]
    return "\n".join(lines).replace("VEC", str(lanes)) + "\n"


def weight_transform(weight: np.ndarray) -> np.ndarray:
    """``U[a*6+b, ci, co] = (G g G^T)[a, b]`` for the OHWI weight [co, 3, 3, ci], in float64 then float32."""
    g = np.array([[float(v) for v in row] for row in G])
    u = np.einsum("ai,oijc,bj->abco", g, weight.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(ALPHA * ALPHA, weight.shape[3], weight.shape[0]).astype(np.float32))


def conv(bb: Any, xp: relax.Expr, weight: np.ndarray, dilation: int, out_sp: list[int], lanes: int) -> relax.Expr:
    """The conv of the padded channels-last input ``xp`` [1, hp, wp, ci] by ``weight`` [co, 3, 3, ci]:
    [1, oh, ow, co]."""
    co, _, _, ci = weight.shape
    _, hp, wp, _ = (int(v) for v in xp.ty.shape.values)
    oh, ow = out_sp
    d = dilation
    ty, tx = oh // (M * d), ow // (M * d)
    nt = d * d * ty * tx
    rows = matmul_rows(nt, ci, co)
    fin = input_transform(hp, wp, ci, d, ty, tx, rows, lanes)
    v = bb.emit(
        relax.call_tir(
            bb.add_func(fin, fin.attrs["global_symbol"]),
            [xp],
            out_ty=relax.TensorType([ALPHA * ALPHA, rows, ci], "float32"),
        )
    )
    m = bb.emit(relax.op.matmul(v, relax.const(weight_transform(weight))))
    fout = output_transform(oh, ow, co, d, rows, lanes)
    return relax.call_tir(
        bb.add_func(fout, fout.attrs["global_symbol"]), [m], out_ty=relax.TensorType([1, oh, ow, co], "float32")
    )
