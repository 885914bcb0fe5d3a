"""Hand-scheduled TIR kernels for CPUs.

TVM's default lowering and `dlight.cpu.GEMV` were measured ~100x slower than numpy on the
decode GEMVs of a small LM (DESIGN.md), so the linear layers use an explicit schedule:
the weight is packed at compile time as ``[N/B, K, B]`` so that each of the B output
columns of a tile is contiguous; tiles are split across threads, the B columns are one
vector, and rows of the input are register-blocked by ``MT`` so prefill reuses each
weight tile from cache.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from edgert.frontend.quantized import parse_kind

ROW_TILE = 4
SMALL_M = 8  # quant_matmul's shared-code path serves 2..SMALL_M rows (speculative verify, short prompts)
# One-token path: how far ahead of the codes being read each thread prefetches its tile stream,
# the scales (and mins) as many rows ahead (Gemma 3 270M decode per CPU second on the 2-core
# znver5, loaded, codes only: 0 B 88, 1 KiB 85, 4 KiB 96, 8 KiB 98, 16 KiB 95 tok/s; with the
# scales 112 against 101), and the partial sums per group (independent FMA chains: +13-17 % on
# matrices in cache, no change measured in decode). docs/gemma3.md has the decode step per kernel.
PREFETCH_BYTES = 8192
CHAINS = 2
VECTOR = 8  # columns per register in the shared-code path: one AVX2 register, two NEON registers


def pick_block(n: int) -> int | None:
    """The widest column tile (64, 32, 16 or 8) that divides ``n``; None if none does."""
    for block in (64, 32, 16, 8):
        if n % block == 0:
            return block
    return None


@functools.cache  # parsing TVMScript takes a while; layers of one shape share the kernel
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


# -- group-quantized weights ---------------------------------------------------------------
# Layout (chosen at compile time, see layout.py): output columns in tiles of B; q4 codes are
# packed eight to a uint32 along K, ``qweight[N/B, K/8, B]`` (nibble s of word kk is row
# 8 kk + s), q8 codes are ``int8[N/B, K, B]``; ``scale``/``min`` are ``f16[N/B, K/G, B]`` (f32 for
# K-quants whose sub-block scales are not f16 values; G = 16 for Q6_K; q8 has a min for Q5_K).
# The last tile is zero-padded when B does not divide N.
#
# One token (decode): each thread takes tiles of B columns and streams their codes once,
# dequantizing in registers: ``part = sum_k x[k] * code[k]`` over a group, then
# ``acc += part * d + xsum * m`` (xsum = the group's sum of x), so the scale and min cost
# one FMA per group instead of one per weight.
# A few tokens (2..SMALL_M, q8 2..5: speculative verify, short prompts): each code word is loaded and
# dequantized once (``w = code * d + m``, one FMA shared by all rows) and FMA'd into every row's
# accumulator (the decode trick above would need a second register per accumulator). Rows live
# in a static tile (2, 3, 5 = verify of 4 drafts, or SMALL_M) so the accumulators stay in
# registers; rows past m repeat the last row and are not written (each tile costs ~0.3 s of
# LLVM time per kernel shape, so not every m gets its own). Columns go 8 or 16 at a time
# so that the accumulators plus the weight and scale registers fit the 16 AVX2 / 32 NEON
# registers; the tile's codes (<= 24 KiB for K = 1536) stay in L1 between the column chunks.
# Many tokens (prefill): each thread dequantizes a [K, B] tile to float32 once and reuses
# it for every row, register-blocked by ROW_TILE rows like `packed_matmul`.

GROUP = 32


def quant_block(n: int) -> int:
    """Column tile of quantized weights: 32 columns (4 AVX2 / 2 AVX-512 / 8 NEON vectors) unless N is small."""
    for block in (32, 16, 8):
        if n >= block:
            return block
    return 8


@functools.cache
def quant_matmul(k: int, n: int, block: int, kind: str) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[n, k]`` with W group-quantized; float32 x, y.

    ``kind`` is a storage name of `edgert.frontend.quantized.parse_kind`: q4 or q8, with optional
    group 16, f32 scales and (q8) a min.
    """
    fmt = parse_kind(kind)
    group, sdt, has_min = fmt.group, fmt.scale_dtype, fmt.has_min
    if k % group:
        raise ValueError(f"quantized weights need K divisible by {group}, got {k}")
    nb, full, ng, mt = -(-n // block), n // block, k // group, ROW_TILE
    q4 = fmt.base == "q4"
    per_g = group // 8 if q4 else group
    kq = k // 8 if q4 else k
    code_dtype = "uint32" if q4 else "int8"

    def code(jo, kk, s, ji, qw):  # weight code of column tile jo, row 8 kk + s (q4) or kk (q8)
        if q4:
            return T.Cast("float32", T.Cast("int32", (qw[jo, kk, ji] >> T.uint32(4 * s)) & T.uint32(15)))
        return T.Cast("float32", qw[jo, kk, ji])

    def offset(jo, g, ji, mn, xsum):  # the group's min times the sum of x (formats with a min)
        return xsum * T.Cast("float32", mn[jo, g, ji]) if has_min else T.float32(0)

    lanes = 8 if q4 else 1
    unroll = 1 if q4 else CHAINS  # code words per step of the one-token path (a q4 word holds 8 rows)
    step = lanes * unroll
    code_bytes = 4 if q4 else 1
    per_line = 64 // code_bytes  # codes per cache line
    lines = max(1, unroll * block * code_bytes // 64)  # cache lines of codes one step reads
    ahead = max(1, PREFETCH_BYTES // (block * code_bytes))  # code rows ahead
    scale_bytes = 4 if sdt == "float32" else 2
    s_line = 64 // scale_bytes
    scale_lines = max(1, block * scale_bytes // 64)
    ahead_g = max(1, ahead // per_g)  # groups ahead

    def partial_sum(part, ji):  # the CHAINS partial sums, added pairwise
        terms = [part[u, ji] for u in range(CHAINS)]
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
        return terms[0]

    def width(rows: int) -> int:
        # Two registers per row give >= 4 independent FMA chains (latency 4) without spilling the
        # 16 AVX2 registers (2 rows x 32 columns spilled and ran 15 % slower than 2 x 16); from
        # 6 rows on, one register per row already gives 6+ chains.
        return 2 * VECTOR if rows <= 5 and block >= 2 * VECTOR else VECTOR

    @T.macro
    def shared_codes(x, qw, sc, mn, y, m, rows: T.int32, vw: T.int32):
        for jo in T.parallel(nb):
            acc = T.alloc_buffer((rows, vw), "float32", scope="local")
            wv = T.alloc_buffer((vw,), "float32", scope="local")
            d = T.alloc_buffer((vw,), "float32", scope="local")
            lo = T.alloc_buffer((vw,), "float32", scope="local")
            for jc in range(block // vw):
                for ii in T.unroll(rows):
                    for v in T.vectorized(vw):
                        acc[ii, v] = T.float32(0)
                for g in range(ng):
                    for v in T.vectorized(vw):
                        d[v] = T.Cast("float32", sc[jo, g, jc * vw + v])
                        lo[v] = T.Cast("float32", mn[jo, g, jc * vw + v]) if has_min else T.float32(0)
                    for kk in range(per_g):
                        for s in T.unroll(lanes):
                            for v in T.vectorized(vw):
                                wv[v] = code(jo, g * per_g + kk, s, jc * vw + v, qw) * d[v] + lo[v]
                            for ii in T.unroll(rows):
                                for v in T.vectorized(vw):
                                    acc[ii, v] = (
                                        acc[ii, v]
                                        + x[T.min(T.Cast("int64", ii), m - 1), (g * per_g + kk) * lanes + s] * wv[v]
                                    )
                for ii in range(rows):
                    if T.Cast("int64", ii) < m:
                        if jo < full:
                            for v in T.vectorized(vw):
                                y[ii, jo * block + jc * vw + v] = acc[ii, v]
                        else:
                            for v in range(vw):
                                if jo * block + jc * vw + v < n:
                                    y[ii, jo * block + jc * vw + v] = acc[ii, v]

    # q8 at 6..8 rows: the dequantize-tile path measured faster (tools/bench_kernels.py --rows 8).
    shared_max = SMALL_M if q4 else 5

    @T.macro
    def body(x, qw, sc, mn, y, m):
        if m == 2:
            shared_codes(x, qw, sc, mn, y, m, 2, width(2))
        elif m == 3:
            shared_codes(x, qw, sc, mn, y, m, 3, width(3))
        elif m > 3 and m <= 5:
            shared_codes(x, qw, sc, mn, y, m, 5, width(5))
        elif m > 5 and m <= shared_max:
            shared_codes(x, qw, sc, mn, y, m, SMALL_M, width(SMALL_M))
        elif m < mt:
            xs = T.alloc_buffer((mt, ng), "float32")
            for i, g in T.grid(m, ng):
                xs[i, g] = T.float32(0)
                for t in range(group):
                    xs[i, g] = xs[i, g] + x[i, g * group + t]
            for jo in T.parallel(nb):
                acc = T.alloc_buffer((block,), "float32", scope="local")
                part = T.alloc_buffer((CHAINS, block), "float32", scope="local")
                for i in range(m):
                    for ji in T.vectorized(block):
                        acc[ji] = T.float32(0)
                    for g in range(ng):
                        for u in T.unroll(CHAINS):
                            for ji in T.vectorized(block):
                                part[u, ji] = T.float32(0)
                        # The scale (and min) rows of the group `ahead` rows on, as the codes below.
                        for line in T.unroll(scale_lines):
                            T.evaluate(
                                T.call_intrin(
                                    "void", "tirx.prefetch", T.address_of(sc[jo, g + ahead_g, line * s_line]), 0, 3, 1
                                )
                            )
                            if has_min:
                                T.evaluate(
                                    T.call_intrin(
                                        "void",
                                        "tirx.prefetch",
                                        T.address_of(mn[jo, g + ahead_g, line * s_line]),
                                        0,
                                        3,
                                        1,
                                    )
                                )
                        # Row t of the group goes to partial sum t % CHAINS: independent FMA chains.
                        for kk in range(per_g // unroll):
                            # Prefetch (read, keep in all levels, data) the lines `ahead` rows on: the
                            # hardware prefetcher alone left the GEMVs under the memory's rate. Past the
                            # tile it reaches the next one (this thread's next, or harmlessly another's).
                            for line in T.unroll(lines):
                                T.evaluate(
                                    T.call_intrin(
                                        "void",
                                        "tirx.prefetch",
                                        T.address_of(qw[jo, g * per_g + kk * unroll + ahead, line * per_line]),
                                        0,
                                        3,
                                        1,
                                    )
                                )
                            for u in T.unroll(step):
                                for ji in T.vectorized(block):
                                    part[u % CHAINS, ji] = part[u % CHAINS, ji] + x[
                                        i, g * group + kk * step + u
                                    ] * code(jo, g * per_g + kk * unroll + u // lanes, u % lanes, ji, qw)
                        for ji in T.vectorized(block):
                            acc[ji] = (
                                acc[ji]
                                + partial_sum(part, ji) * T.Cast("float32", sc[jo, g, ji])
                                + offset(jo, g, ji, mn, xs[i, g])
                            )
                    if jo < full:
                        for ji in T.vectorized(block):
                            y[i, jo * block + ji] = acc[ji]
                    else:
                        for ji in range(block):
                            if jo * block + ji < n:
                                y[i, jo * block + ji] = acc[ji]
        else:
            for jo in T.parallel(nb):
                w = T.alloc_buffer((k, block), "float32")
                acc = T.alloc_buffer((mt, block), "float32", scope="local")
                for kk in range(kq):
                    for s in T.unroll(lanes):
                        for ji in T.vectorized(block):
                            w[kk * lanes + s, ji] = code(jo, kk, s, ji, qw) * T.Cast(
                                "float32", sc[jo, kk * lanes // group, ji]
                            ) + (T.Cast("float32", mn[jo, kk * lanes // group, ji]) if has_min else T.float32(0))
                for io in range(m // mt):
                    for ii in T.unroll(mt):
                        for ji in T.vectorized(block):
                            acc[ii, ji] = T.float32(0)
                    for kk in range(k):
                        for ii in T.unroll(mt):
                            for ji in T.vectorized(block):
                                acc[ii, ji] = acc[ii, ji] + x[io * mt + ii, kk] * w[kk, ji]
                    for ii in T.unroll(mt):
                        if jo < full:
                            for ji in T.vectorized(block):
                                y[io * mt + ii, jo * block + ji] = acc[ii, ji]
                        else:
                            for ji in range(block):
                                if jo * block + ji < n:
                                    y[io * mt + ii, jo * block + ji] = acc[ii, ji]
                for i in range(m - m // mt * mt):
                    for ji in T.vectorized(block):
                        acc[0, ji] = T.float32(0)
                    for kk in range(k):
                        for ji in T.vectorized(block):
                            acc[0, ji] = acc[0, ji] + x[m // mt * mt + i, kk] * w[kk, ji]
                    for ji in range(block):
                        if jo * block + ji < n:
                            y[m // mt * mt + i, jo * block + ji] = acc[0, ji]

    symbol = f"quant_matmul_{kind}_k{k}_n{n}_b{block}"
    # With or without a min buffer; only that variant is parsed (`T.prim_func` parses at definition).
    if has_min:

        @T.prim_func
        def matmul_q4(
            x_h: T.handle,
            qw: T.Buffer((nb, kq, block), code_dtype),
            sc: T.Buffer((nb, ng, block), sdt),
            mn: T.Buffer((nb, ng, block), sdt),
            y_h: T.handle,
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, qw, sc, mn, y, m)

        return matmul_q4.with_attr("global_symbol", symbol)

    @T.prim_func
    def matmul_q8(
        x_h: T.handle,
        qw: T.Buffer((nb, kq, block), code_dtype),
        sc: T.Buffer((nb, ng, block), sdt),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        body(x, qw, sc, sc, y, m)

    return matmul_q8.with_attr("global_symbol", symbol)
