"""Hand-scheduled CPU kernels for Whisper's encoder (and its decoder's cross-attention), and the module swap.

TVM's default lowering of the attention matmuls (batched [heads, n, 64] x [heads, 64, m]) is
scalar and single-threaded: 11.7 of the 14.4 s of Whisper tiny's encoder on 2 cores; and the
GEMV-shaped `packed_matmul` tile (4 rows x 64 columns = 32 vector registers on AVX2, which has 16)
spills when it runs over the encoder's 1500 rows. The kernels here size their register tiles
from the target's vector width:

- `gemm_kernel`: y = act(x Wᵀ + b) over many rows, W in the packed ``[N/B, K, B]`` layout;
  ``GEMM_ROWS`` rows x 2 vectors of columns stay in registers across K; the bias and GELU are
  applied on the write-back (GELU's erf as a rational polynomial, so it vectorizes; libm's
  ``erff`` is a scalar call per element). For a `HeadsProjection` (q, k, v or k, v) the write-back
  also lays the output out per head, keys transposed, so no copy kernel runs between the matmul
  and the attention (those copies were ~35 ms of a 10 s transcription).
- `attention_kernel`: per head, ``ATTN_ROWS`` query rows at a time: scores against keys stored
  transposed [heads, d, m] (each key vector loaded once for all rows), a softmax with a
  vectorized polynomial exp, then the value sum in column slices that fit the registers. The
  encoder's variant reads q, k and v from the heads layout and writes [frames, heads * head_dim].
"""

from __future__ import annotations

import functools
import re
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target

from edgert.compiler.kernels import bf16
from edgert.compiler.kernels.fastmath import _f32, _horner, activate

GEMM_ROWS = 6  # 6 rows x 2 vectors = 12 accumulators + 2 weight vectors + 1 broadcast: AVX2's 16 registers
GEMM_CHUNK = 8  # row tiles per parallel work item (48 rows)
ATTN_ROWS = 6  # query rows sharing each loaded key vector: 6 x 2 vectors = 12 accumulators
ATTN_BLOCK = 4  # groups of ATTN_ROWS rows sharing one pass over a head's keys and values (1.4x at 1500 keys)
# The same where the CPU has AMX tiles (Intel's server cores: 2 MB of L2 each): 48 rows' scores (288 KB
# at 1500 frames) beside a head's keys and values (768 KB). Whisper's encoder self-attention, one
# thread, thread CPU time: 44.1 -> 38.0 ms a layer (24 -> 48 rows; 60 and 96 rows 36.6-36.9, within the
# noise), the same outputs bit for bit (each row sums in the same order).
ATTN_BLOCK_L2 = 8

# exp(x) = 2^n · e^f, n = round(x / ln 2), e^f by a degree-7 polynomial (Cephes' expf coefficients).
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def vector_lanes(target: Target | None = None) -> int:
    """float32 lanes of the target's vectors (8 for AVX2, 16 for AVX-512, 4 for NEON); 8 without a target."""
    target = target or Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 8
    from edgert.compiler.schedules.rules import _lanes

    return _lanes(target)


def fast_exp(v: Any) -> Any:
    """exp in float32 (relative error ~2e-7) from its exponent and a polynomial; vectorizable."""
    x = tirx.max(tirx.min(v, _f32(88.3762626647950)), _f32(-88.3762626647949))
    n = tirx.floor(x * _f32(1.44269504088896341) + _f32(0.5))
    f = x - n * _f32(0.6931471805599453)
    y = _horner(f, _EXP_P) * f * f + f + _f32(1.0)
    scale = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n + _f32(127.0)), tirx.const(23, "int32")))
    return y * scale


@functools.cache
def gemm_kernel(
    k: int,
    n: int,
    block: int,
    weight_dtype: str,
    lanes: int,
    activation: str | None,
    heads: tuple[int, int, int] | None = None,
) -> tirx.PrimFunc:
    """``y[m, n] = act(sum_k x[m, k] * w[n // block, k, n % block] + b[n])`` for many rows m.

    With ``heads = (heads, head_dim, transposed)``, y is written in `HeadsProjection`'s layout
    instead, [parts * heads, m * head_dim] with part ``transposed`` stored [head_dim, m] per head:
    the split into heads and the keys' transpose cost nothing beyond the stores.
    """
    cols = min(2 * lanes, block)
    subs, nb, mt = block // cols, n // block, GEMM_ROWS
    chunk = mt * GEMM_CHUNK
    nh, hd, tpart = heads or (1, n, -1)
    if heads and (n % (nh * hd) or hd % cols):
        raise ValueError(f"{n} columns do not split into heads of {hd} in vectors of {cols}")
    laid_out = heads is not None  # TVMScript branches on Python bools only
    y_rows = n // hd

    def act(v: Any) -> Any:
        return activate(v, activation)

    @T.macro
    def store(y, m, row, c0, acc, r, b):
        # One vector of `cols` outputs of one row; c0 is a multiple of `cols` (one head's slice).
        if laid_out:
            if c0 // (nh * hd) == tpart:
                for ji in range(cols):
                    y[c0 // hd, (c0 % hd + ji) * m + row] = act(acc[r, ji] + b[c0 + ji])
            else:
                for ji in T.vectorized(cols):
                    y[c0 // hd, row * hd + c0 % hd + ji] = act(acc[r, ji] + b[c0 + ji])
        else:
            for ji in T.vectorized(cols):
                y[row, c0 + ji] = act(acc[r, ji] + b[c0 + ji])

    @T.prim_func
    def gemm(x_h: T.handle, w: T.Buffer((nb, k, block), weight_dtype), b: T.Buffer((n,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (y_rows, m * hd) if laid_out else (m, n), "float32")
        for p in T.parallel(nb * ((m + chunk - 1) // chunk)):
            acc = T.alloc_buffer((mt, cols), "float32", scope="local")
            jo = p % nb
            r0 = p // nb * chunk
            rows = T.min(m - r0, chunk)
            for t in range(rows // mt):
                for sub in range(subs):
                    for ii in T.unroll(mt):
                        for ji in T.vectorized(cols):
                            acc[ii, ji] = T.float32(0)
                    for kk in range(k):
                        for ii in T.unroll(mt):
                            for ji in T.vectorized(cols):
                                acc[ii, ji] = acc[ii, ji] + x[r0 + t * mt + ii, kk] * T.Cast(
                                    "float32", w[jo, kk, sub * cols + ji]
                                )
                    for ii in T.unroll(mt):
                        store(y, m, r0 + t * mt + ii, jo * block + sub * cols, acc, ii, b)
            for i in range(rows % mt):
                for sub in range(subs):
                    for ji in T.vectorized(cols):
                        acc[0, ji] = T.float32(0)
                    for kk in range(k):
                        for ji in T.vectorized(cols):
                            acc[0, ji] = acc[0, ji] + x[r0 + rows // mt * mt + i, kk] * T.Cast(
                                "float32", w[jo, kk, sub * cols + ji]
                            )
                    store(y, m, r0 + rows // mt * mt + i, jo * block + sub * cols, acc, 0, b)

    name = f"gemm_k{k}_n{n}_b{block}_{weight_dtype}_l{lanes}" + (f"_{activation}" if activation else "")
    name += f"_heads{nh}x{hd}t{tpart}" if heads else ""
    return gemm.with_attr("global_symbol", name)


def decoder_rows(lanes: int) -> int:
    """Rows one `rows_kernel` tile keeps in registers: 7 x 4 vectors = 28 accumulators and 4 widened
    weight vectors fill AVX-512's 32 registers (x broadcast from memory), 2 x 4 of AVX2's or NEON's 16.
    A verify pass over 6 drafts (7 rows) is one tile. Measured on the 51,904 x 384 f16 head at 7 rows
    (znver5, one thread, loaded): 7 x 4 vectors 1.75-1.79 ms, 4 x 4 plus an exact tile of 3
    1.81-1.91, 8 x 2 4.6, 4 x 2 2.8, 8 x 1 3.1, the 4-row `packed_matmul` 2.2: a wide tile shares
    each row's broadcast of x among more FMAs, and every extra tile widens the weights again."""
    return 7 if lanes >= 16 else 2


def cross_rows(lanes: int) -> int:
    """Decoder rows sharing one pass over the cross-attention's keys and values: a 7-row verify pass
    in one tile on AVX-512 (the frames' 4.6 MB a layer come from memory once; cold, 7 rows
    0.23 ms in a 7-row tile against 0.28 in a tile of 8 with a copied row), 4 on 16-register ISAs."""
    return 7 if lanes >= 16 else 2 * decoder_rows(lanes)


@functools.cache
def rows_kernel(k: int, n: int, block: int, weight_dtype: str, lanes: int, activation: str | None, bias: bool):
    """``y[m, n] = act(sum_k x[m, k] * w[n // block, k, n % block] (+ b[n]))`` for the decoder's few rows.

    Rows go through tiles of `decoder_rows` rows and one tile of the remaining m % rows (one token,
    plain decoding: a tile of one): each weight vector is loaded and widened once per tile and FMA'd
    into every row's accumulator. Every row sums over k in the same order whatever its tile, so a
    verify pass gives each token the logits a one-token step gives it.
    """
    cols = min(4 * lanes, block)
    subs, nb, rt = block // cols, n // block, decoder_rows(lanes)

    def act(v: Any) -> Any:
        return activate(v, activation)

    @T.macro
    def tile(x, w, b, y, acc, wv, jo, p, r0, nr):
        # Rows r0 .. r0 + nr - 1 (nr static) over one column slice: each weight vector is widened once.
        for ii in T.unroll(nr):
            for ji in T.vectorized(cols):
                acc[ii, ji] = T.float32(0)
        for kk in range(k):
            # Into registers first: LLVM does not merge the rows' loads and converts of the same vector.
            for ji in T.vectorized(cols):
                wv[ji] = T.Cast("float32", w[jo, kk, p % subs * cols + ji])
            for ii in T.unroll(nr):
                for ji in T.vectorized(cols):
                    acc[ii, ji] = acc[ii, ji] + x[r0 + ii, kk] * wv[ji]
        for ii in T.unroll(nr):
            for ji in T.vectorized(cols):
                if bias:
                    y[r0 + ii, p * cols + ji] = act(acc[ii, ji] + b[p * cols + ji])
                else:
                    y[r0 + ii, p * cols + ji] = act(acc[ii, ji])

    @T.macro
    def tail(x, w, b, y, acc, wv, jo, p, m, nr: T.int32):
        if nr < rt:  # a Python bool: TVMScript emits the tile only for sizes below the full one
            if m % rt == nr:
                tile(x, w, b, y, acc, wv, jo, p, m // rt * rt, nr)

    @T.macro
    def body(x, w, b, y, m):
        for p in T.parallel(nb * subs):
            acc = T.alloc_buffer((rt, cols), "float32", scope="local")
            wv = T.alloc_buffer((cols,), "float32", scope="local")
            jo = p // subs
            for t in range(m // rt):
                tile(x, w, b, y, acc, wv, jo, p, t * rt, rt)
            # The last m % rt rows in a tile of their own size (no padding rows: the FMAs are the cost).
            # The weight slice (k x cols) is still in L1/L2 from the full tiles.
            tail(x, w, b, y, acc, wv, jo, p, m, 1)
            tail(x, w, b, y, acc, wv, jo, p, m, 2)
            tail(x, w, b, y, acc, wv, jo, p, m, 3)
            tail(x, w, b, y, acc, wv, jo, p, m, 4)
            tail(x, w, b, y, acc, wv, jo, p, m, 5)
            tail(x, w, b, y, acc, wv, jo, p, m, 6)

    if bias:

        @T.prim_func
        def rows(x_h: T.handle, w: T.Buffer((nb, k, block), weight_dtype), b: T.Buffer((n,), "float32"), y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, w, b, y, m)

    else:

        @T.prim_func
        def rows(x_h: T.handle, w: T.Buffer((nb, k, block), weight_dtype), y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, w, w, y, m)

    name = f"rows_k{k}_n{n}_b{block}_{weight_dtype}_l{lanes}" + ("_bias" if bias else "")
    name += f"_{activation}" if activation else ""
    return rows.with_attr("global_symbol", name)


@functools.cache
def attention_kernel(
    heads: int,
    m: int,
    d: int,
    scale: float,
    lanes: int = 8,
    rows: int = 0,
    cross_layers: int = 0,
    layer: int = 0,
    block: int = 0,
    frames: bool = False,
    clamp: bool = False,
) -> tirx.PrimFunc:
    """``o[h, i] = softmax(scale · q[h, i] · kt[h]) · v[h]`` for q [heads, n, d], kt [heads, d, m], v [heads, m, d].

    With ``cross_layers``, kt and v are both a whole cross-attention cache [cross_layers * 2,
    heads, m * d] and the kernel reads layer ``layer``'s keys and values from it in place
    (slicing them out first would copy 2 x heads x m x d floats per layer and decoder step).
    With ``frames``, q, kt and v are one `HeadsProjection` output [3 * heads, m * d] (self-attention
    of all m frames) and o is written [m, heads * d], ready for the output projection.
    With ``clamp`` (the decoder's few rows: a verify pass, beams), rows go through tiles of
    ``rows * block`` rows and the remainder through one tile of 1, 2, 4 or ``rows * block`` rows,
    filled up with copies of row n - 1 (not stored), so up to that many rows share one pass over
    the keys and values. Each row sums in one order whatever its tile: a row's output is the same
    in a verify pass as in a one-token step.
    """

    def query(qb: Any, h: Any, i: Any, dd: Any, n: Any = None) -> Any:
        if clamp:  # rows past the last one repeat it
            i = tirx.min(tirx.Cast("int64", i), n - 1)
        return qb[h, i * d + dd] if frames else qb[h, i, dd]

    if frames:
        k_shape = v_shape = (3 * heads, m * d)

        def key(kb: Any, h: Any, dd: Any, j: Any) -> Any:
            return kb[heads + h, dd * m + j]

        def val(vb: Any, h: Any, j: Any, dd: Any) -> Any:
            return vb[2 * heads + h, j * d + dd]
    elif cross_layers:
        k_shape, v_shape = (2 * cross_layers, heads, m * d), (2 * cross_layers, heads, m * d)

        def key(kb: Any, h: Any, dd: Any, j: Any) -> Any:
            return kb[2 * layer, h, dd * m + j]

        def val(vb: Any, h: Any, j: Any, dd: Any) -> Any:
            return vb[2 * layer + 1, h, j * d + dd]
    else:
        k_shape, v_shape = (heads, d, m), (heads, m, d)

        def key(kb: Any, h: Any, dd: Any, j: Any) -> Any:
            return kb[h, dd, j]

        def val(vb: Any, h: Any, j: Any, dd: Any) -> Any:
            return vb[h, j, dd]

    kv = 2 * lanes  # keys per score tile
    dv = min(2 * lanes, d)  # value columns per slice
    if d % dv:
        raise ValueError(f"head width {d} is not a multiple of {dv}")
    full, scale_f = m // kv * kv, float(scale)
    vector_tail = full < m and m >= kv  # TVMScript branches on Python bools only
    sub_rows = rows or ATTN_ROWS
    tile_rows = sub_rows * (block or ATTN_BLOCK)

    @T.macro
    def tile(q, kt, v, o, h, i0, rows, sub, nq):
        # `rows` query rows share one pass over the head's keys and values (read from memory once
        # per tile instead of once per `sub` rows); `sub` rows at a time stay in registers.
        s = T.alloc_buffer((rows, m), "float32", scope="local")
        part = T.alloc_buffer((sub, kv), "float32", scope="local")
        acc = T.alloc_buffer((sub, dv), "float32", scope="local")
        red = T.alloc_buffer((rows, 2), "float32", scope="local")
        for mo in range(m // kv):
            for sb in range(rows // sub):
                for r in T.unroll(sub):
                    for mi in T.vectorized(kv):
                        part[r, mi] = T.float32(0)
                for dd in range(d):
                    for r in T.unroll(sub):
                        for mi in T.vectorized(kv):
                            qi = query(q, h, i0 + sb * sub + r, dd, nq)
                            part[r, mi] = part[r, mi] + qi * key(kt, h, dd, mo * kv + mi)
                for r in T.unroll(sub):
                    for mi in T.vectorized(kv):
                        s[sb * sub + r, mo * kv + mi] = part[r, mi] * T.float32(scale_f)
        if vector_tail:
            # The last m % kv keys in one more vector tile over the last kv keys (the overlap is
            # recomputed and not stored): a scalar dot product per (row, key) is a 64-FMA latency
            # chain, ~0.1 ms of a layer's 8-row pass over 1500 frames.
            for sb in range(rows // sub):
                for r in T.unroll(sub):
                    for mi in T.vectorized(kv):
                        part[r, mi] = T.float32(0)
                for dd in range(d):
                    for r in T.unroll(sub):
                        for mi in T.vectorized(kv):
                            qi = query(q, h, i0 + sb * sub + r, dd, nq)
                            part[r, mi] = part[r, mi] + qi * key(kt, h, dd, m - kv + mi)
                for r in T.unroll(sub):
                    for mi in range(m - full):
                        s[sb * sub + r, full + mi] = part[r, kv - (m - full) + mi] * T.float32(scale_f)
        else:
            for r in range(rows):
                for j in range(m - full):
                    red[r, 0] = T.float32(0)
                    for dd in range(d):
                        red[r, 0] = red[r, 0] + query(q, h, i0 + r, dd, nq) * key(kt, h, dd, full + j)
                    s[r, full + j] = red[r, 0] * T.float32(scale_f)
        # one row at a time: the partials of its maximum and sum take the first of `part`'s `sub` rows
        for r in range(rows):
            for mi in T.vectorized(kv):
                part[0, mi] = T.float32(-3.4e38)
            for mo in range(m // kv):
                for mi in T.vectorized(kv):
                    part[0, mi] = T.max(part[0, mi], s[r, mo * kv + mi])
            red[r, 0] = T.float32(-3.4e38)
            for mi in range(kv):
                red[r, 0] = T.max(red[r, 0], part[0, mi])
            for j in range(m - full):
                red[r, 0] = T.max(red[r, 0], s[r, full + j])
            for mi in T.vectorized(kv):
                part[0, mi] = T.float32(0)
            for mo in range(m // kv):
                for mi in T.vectorized(kv):
                    s[r, mo * kv + mi] = fast_exp(s[r, mo * kv + mi] - red[r, 0])
                    part[0, mi] = part[0, mi] + s[r, mo * kv + mi]
            red[r, 1] = T.float32(0)
            for mi in range(kv):
                red[r, 1] = red[r, 1] + part[0, mi]
            for j in range(m - full):
                s[r, full + j] = fast_exp(s[r, full + j] - red[r, 0])
                red[r, 1] = red[r, 1] + s[r, full + j]
        for dq in range(d // dv):
            for sb in range(rows // sub):
                for r in T.unroll(sub):
                    for di in T.vectorized(dv):
                        acc[r, di] = T.float32(0)
                for j in range(m):
                    for r in T.unroll(sub):
                        for di in T.vectorized(dv):
                            acc[r, di] = acc[r, di] + s[sb * sub + r, j] * val(v, h, j, dq * dv + di)
                for r in T.unroll(sub):
                    if clamp:
                        if T.Cast("int64", i0 + sb * sub + r) < nq:
                            for di in T.vectorized(dv):
                                o[h, i0 + sb * sub + r, dq * dv + di] = acc[r, di] / red[sb * sub + r, 1]
                    else:
                        for di in T.vectorized(dv):
                            if frames:
                                o[i0 + sb * sub + r, h * d + dq * dv + di] = acc[r, di] / red[sb * sub + r, 1]
                            else:
                                o[h, i0 + sb * sub + r, dq * dv + di] = acc[r, di] / red[sb * sub + r, 1]

    @T.prim_func
    def attention(
        q_h: T.handle,
        kt: T.Buffer(k_shape, "float32"),
        v: T.Buffer(v_shape, "float32"),
        o_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        q = T.match_buffer(q_h, (3 * heads, n * d) if frames else (heads, n, d), "float32")
        o = T.match_buffer(o_h, (n, heads * d) if frames else (heads, n, d), "float32")
        if clamp:
            # One head's tiles one after another: its keys and values (768 KB at 1,500 frames) stay
            # in L2 for the tiles after the first (a pass over 8 rows as 7 + 1, a prompt's rows).
            for h in T.parallel(heads):
                for t in range(n // tile_rows):
                    tile(q, kt, v, o, h, t * tile_rows, tile_rows, sub_rows, n)
                # The last n % tile_rows rows in the smallest tile of 1, 2, 4 or tile_rows that holds
                # them (copies of the last row, their FMAs wasted: a verify pass of 2 tokens in a tile
                # of 8 cost twice what it needs).
                rest = n % tile_rows
                base = n // tile_rows * tile_rows
                if rest == 1:
                    tile(q, kt, v, o, h, base, 1, 1, n)
                if rest == 2:
                    tile(q, kt, v, o, h, base, 2, 2, n)
                if rest > 2 and rest <= 4 and tile_rows > 4:
                    tile(q, kt, v, o, h, base, 4, 4, n)
                if rest > 4 or (rest > 2 and tile_rows <= 4):
                    tile(q, kt, v, o, h, base, tile_rows, sub_rows, n)
        else:
            for p in T.parallel(heads * (n // tile_rows)):
                tile(q, kt, v, o, p % heads, p // heads * tile_rows, tile_rows, sub_rows, n)
            for p in T.parallel(heads * (n % tile_rows // sub_rows)):
                tile(q, kt, v, o, p % heads, n // tile_rows * tile_rows + p // heads * sub_rows, sub_rows, sub_rows, n)
            for p in T.parallel(heads * (n % sub_rows)):
                tile(q, kt, v, o, p % heads, n // sub_rows * sub_rows + p // heads, 1, 1, n)

    name = f"attention_h{heads}_m{m}_d{d}_l{lanes}" + (f"_cross{layer}of{cross_layers}" if cross_layers else "")
    name += "_frames" if frames else ""
    name += f"_clamp{tile_rows}" if clamp else ""
    return attention.with_attr("global_symbol", name)


class KernelAttention(nn.Module):
    """Drop-in for a family's `Attend` module, computed by `attention_kernel`."""

    def __init__(self, heads: int, keys: int, head_dim: int, scale: float):
        self.heads, self.keys, self.head_dim, self.scale = heads, keys, head_dim, scale

    def forward(self, q: Tensor, kt: Tensor, v: Tensor) -> Tensor:
        kernel = attention_kernel(self.heads, self.keys, self.head_dim, self.scale, vector_lanes())
        return op.tensor_ir_op(kernel, "attention", [q, kt, v], Tensor.placeholder(q.shape, "float32"))

    def cross(self, q: Tensor, cross: Tensor, layer: int) -> Tensor:
        """Attend over layer ``layer`` of a cross-attention cache [layers * 2, heads, keys * head_dim] in place."""
        layers = int(cross.shape[0]) // 2
        lanes = vector_lanes()
        # The decoder's rows (a verify pass of up to 7 tokens, beams) share one pass over the window.
        kernel = attention_kernel(
            self.heads,
            self.keys,
            self.head_dim,
            self.scale,
            lanes,
            cross_rows(lanes),
            layers,
            layer,
            1,
            clamp=True,
        )
        return op.tensor_ir_op(kernel, "attention", [q, cross, cross], Tensor.placeholder(q.shape, "float32"))

    def frames(self, qkv: Tensor) -> Tensor:
        """Self-attention over all frames from a `HeadsProjection` of q, k, v -> [frames, heads * head_dim]."""
        block = ATTN_BLOCK_L2 if bf16.has_amx_bf16() else ATTN_BLOCK
        kernel = attention_kernel(
            self.heads, self.keys, self.head_dim, self.scale, vector_lanes(), block=block, frames=True
        )
        out = Tensor.placeholder((self.keys, self.heads * self.head_dim), "float32")
        return op.tensor_ir_op(kernel, "attention", [qkv, qkv, qkv], out)


class GemmProjection(nn.Module):
    """Drop-in for a family's `Projection` (a packed bias-free linear plus a bias, and an optional
    activation) over many rows, computed by `gemm_kernel`. Keeps the module's parameters (same names)."""

    def __init__(
        self, proj: nn.Module, bias: nn.Parameter, activation: str | None, heads: tuple[int, int, int] | None = None
    ):
        self.proj, self.bias, self.activation, self.heads = proj, bias, activation, heads

    def forward(self, x: Tensor) -> Tensor:
        *lead, k = x.shape
        rows = 1
        for d in lead:
            rows = rows * d
        w = self.proj.weight
        n = self.proj.out_features
        lanes = vector_lanes()
        # On AMX-BF16 tiles where the CPU has them (float32's accuracy kept by splitting: `kernels.bf16`):
        # 4.6 against 13.4 ms of one thread for 1500 x 384 x 1536 (Intel Xeon, loaded).
        amx = bf16.has_amx_bf16() and bf16.fits(k, n, self.proj.block, w.dtype)
        if amx:
            kernel = bf16.amx_gemm_kernel(k, n, self.proj.block, w.dtype, lanes, self.activation, self.heads)
        else:
            kernel = gemm_kernel(k, n, self.proj.block, w.dtype, lanes, self.activation, self.heads)
        # Reshapes only where there are other than two dimensions: back-to-back reshapes of the
        # same shape (one layer's output, the next one's input) fuse into a copy kernel.
        flat = len(lead) == 1 or self.heads is not None  # `HeadsProjection` takes [rows, k] inputs
        rows2d = x if flat else op.reshape(x, (rows, k))
        if amx:
            split = bf16.split_kernel(k, lanes)
            rows2d = op.tensor_ir_op(split, "split", [rows2d], Tensor.placeholder((2, rows, k), "uint16"))
        if self.heads:  # `HeadsProjection`'s layout
            _, head_dim, _ = self.heads
            out = Tensor.placeholder((n // head_dim, rows * head_dim), "float32")
            return op.tensor_ir_op(kernel, "gemm", [rows2d, w, self.bias], out)
        y = op.tensor_ir_op(kernel, "gemm", [rows2d, w, self.bias], Tensor.placeholder((rows, n), "float32"))
        return y if len(lead) == 1 else op.reshape(y, (*lead, n))


class RowsLinear(nn.Module):
    """Drop-in for a `PackedLinear` over the decoder's few rows (`rows_kernel`); keeps its ``weight``."""

    def __init__(self, linear: nn.Module):
        self.weight, self.block, self.out_features = linear.weight, linear.block, linear.out_features

    def forward(self, x: Tensor, bias: nn.Parameter | None = None, activation: str | None = None) -> Tensor:
        *lead, k = x.shape
        rows = 1
        for d in lead:
            rows = rows * d
        n = self.out_features
        kernel = rows_kernel(k, n, self.block, self.weight.dtype, vector_lanes(), activation, bias is not None)
        args = [op.reshape(x, (rows, k)), self.weight] + ([bias] if bias is not None else [])
        y = op.tensor_ir_op(kernel, "rows", args, Tensor.placeholder((rows, n), "float32"))
        return op.reshape(y, (*lead, n))


class RowsProjection(nn.Module):
    """Drop-in for a `Projection` (bias and activation fused) over the decoder's few rows; same parameter names."""

    def __init__(self, proj: nn.Module, bias: nn.Parameter, activation: str | None):
        self.proj, self.bias, self.activation = RowsLinear(proj), bias, activation

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x, self.bias, self.activation)


def apply_seq2seq_kernels(model: nn.Module, gemm: str | None = None, rows: str | None = None) -> int:
    """Swap every `Attend` module (any class named so, with heads/keys/head_dim/scale) in place, and
    every `Projection` whose path matches the regular expression ``gemm`` (layers that run over many
    rows) when its linear was packed by `apply_cpu_layout`, and every `Projection` or packed linear
    matching ``rows`` (the decoder's, over one to a few rows); return how many modules were swapped."""
    swapped = [0]
    pattern = re.compile(gemm) if gemm else None
    few = re.compile(rows) if rows else None

    class _Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> nn.Module:
            if type(node).__name__ == "Attend" and getattr(node, "keys", None):
                swapped[0] += 1
                return KernelAttention(node.heads, node.keys, node.head_dim, node.scale)
            packed = type(getattr(node, "proj", None)).__name__ == "PackedLinear"
            kind = type(node).__name__
            if few and few.fullmatch(name):
                if kind == "PackedLinear":
                    swapped[0] += 1
                    return RowsLinear(node)
                if kind == "Projection" and packed:
                    swapped[0] += 1
                    return RowsProjection(node.proj, node.bias, getattr(node, "activation", None))
            if pattern and kind in ("Projection", "HeadsProjection") and packed and pattern.fullmatch(name):
                swapped[0] += 1
                heads = (node.heads, node.head_dim, node.transposed) if kind == "HeadsProjection" else None
                return GemmProjection(node.proj, node.bias, getattr(node, "activation", None), heads)
            return self.visit(name, node)

    _Swap().visit("", model)
    return swapped[0]
