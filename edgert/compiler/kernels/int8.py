"""Quantized matmuls that multiply int8 activations with the integer weight codes.

`kernels.quant_matmul` widens every weight code to float32 and multiplies it with the float
activation: one float FMA per weight, per output column. llama.cpp instead quantizes the
activation row to int8 per group of 32 (one scale per group) and takes integer dot products
of 4 (ARM ``sdot``) or 2 (x86 ``vpmaddubsw``) byte pairs per 32-bit lane; the float scales are
applied once per group. This module does the same for every row, one token or a prompt (its
prefill: on AVX2 2.4x faster than dequantizing each tile to float, 0.59 against 1.42 ms for
128 x 1536 x 576 at 2 threads), with the dot products written as LLVM intrinsics because LLVM
does not find them in scalar TIR:

- x86 with AVX2: ``vpmaddubsw`` (unsigned x signed bytes to 16-bit pair sums), summed to int32
  by ``vpmaddwd`` with ones; q8 codes are signed, so their sign moves onto the activation
  (``vpsignb``) as llama.cpp does.
- aarch64 with dotprod: ``sdot`` (four signed byte products per int32 lane).

The weight layout puts 4 consecutive K values of one column next to each other, the operand
shape of both instructions: q8 codes ``int8 [N/B, K/4, B, 4]``; q4 codes ``uint8
[N/B, K/8, B, 4]`` with byte t of (kk, column) holding the code of row ``8 kk + t`` in its low
nibble and of row ``8 kk + 4 + t`` in its high nibble. Scales (and q4 mins) stay
``f16 [N/B, K/32, B]``. A column tile's codes (9 KiB for K = 576, q4) stay in L1 while every
row passes over them.

The int8 activation costs accuracy (the same rounding llama.cpp applies); ``tools/quant_accuracy.py``
reports it, and the float path stays selectable.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from edgert.compiler.kernels.fastmath import fast_exp
from edgert.compiler.kernels.intrin import amx, prefetch
from edgert.compiler.kernels.quant import GROUP

ISAS = ("avx2", "avx512vnni", "amx", "dotprod")
# Static row tiles of `multirow_quant_matmul`: m rows go as m // 5 tiles of 5 and the rest in a
# tile of its size, so no row is computed for nothing. Every tile costs LLVM time per kernel shape:
# 4 is a server's batch of 4 clients, 5 a verify pass over 4 drafts.
ROW_TILES = (1, 2, 3, 4, 5)
# From PROMPT_ROWS rows on (a prompt chunk) `multirow_quant_matmul` forms and rounds its activations
# on every thread instead of one; fewer rows (decode, verify passes, a server's batches) keep the
# serial prologue, bit for bit the code they had. The matmul of a chunk stays the tiles of 5: a
# GEMM path that unpacks a column tile's codes once into a u8 panel and runs row tiles of 4..14
# over it measured no faster (1 thread, 128 rows: 57.6..85 ms against 57.7; with int32 sums
# running over K instead of restarting per group, 63.8..76), since the unpacking is not what
# costs: 128 rows run at 5.0..5.6 G ``vpdpbusd``/s (`tools/bench_multirow.py`), what a C loop
# of the same shape reaches on znver5, and the per-group float work (convert, scale, two FMAs
# per row and 16 columns for 8 ``vpdpbusd``) shares their ports (docs/performance.md, prefill).
PROMPT_ROWS = 16
# From AMX_ROWS rows on, a CPU with AMX-INT8 (``isa="amx"``: the VNNI layout and kernels, and tiles)
# multiplies q8 matrices with ``tdpbssd`` instead of ``vpdpbusd`` (`amx_tiles`): SmolLM2's q8 LM head
# over 5 rows 2.25 against 3.61 ms, one thread. q4 matrices keep the VNNI tiles at every row count:
# a group's 32 K values fill half a tile row, so each group's int32 sums go out through memory to be
# scaled (and the min term added), as much work as the 8 ``vpdpbusd`` a row and 16 columns it saves.
# Tried three times. Codes unpacked to bytes in memory in the kernel: slower at 5 rows (the 30 gate/up
# matmuls 3.85 against 3.22 ms a pass) and at 128 (a prompt's matmuls 88.5 against 76.4 ms), even
# pipelined a group deep and with the codes prefetched. Codes stored one a byte at compile time
# (q8's layout with codes 0..15, ``tdpbssd``, bit for bit the VNNI kernel's outputs; commit ceac93c,
# its `tools/bench_q4_bytes.py`): slower at every row count on the 2-core Xeon with AMX (2026-12-06,
# loaded A/B, one thread), since a step streams its q4 codes from L3 at about 10 GB/s a core and
# bytes are twice the traffic. A step's 120 q4 matmuls (codes from L3): 1 row (VNNI tiles on bytes)
# 10.6 against 6.3 ms, 5 rows 11.0 against 7.5, 128 rows 89.8 against 79.5; with the codes in L2,
# 5 rows still 4.5 against 3.1 ms. SmolLM2 end to end (`edgert bench`, 10 rounds alternated): decode
# 0.65x the tokens/s, the 5-row verify pass 1.31x the CPU ms, a 128-token prompt 0.89x the tokens/s
# (two threads: 0.68-0.75x, 1.20x, 0.70-0.85x); the artifact 157 MB against 103, peak RSS 256 MB against 205.
# Third, for prompt chunks only (commit 0ff0c78): the codes kept two a byte and unpacked once per
# column tile into a byte panel that every full tile of 16 rows multiplies, one 16-column chunk at a
# time so that its float accumulators stay in registers (bit for bit again). The 120 q4 matmuls gain
# from about 80 rows (there, `tools/bench_multirow.py --isa amx --against` the int8.py before; loaded
# A/B: 128 rows 0.91x the time at one thread, 0.89x and 0.99x at two; 256 rows 0.91x; 64 rows
# 0.97..1.02x; 16 rows 1.12x), and a 128-token prompt took 0.92..0.96x the time at one thread but
# 1.01..1.07x at two (six runs of 16..40 alternated rounds, 128 and 256 tokens, load average 6..8):
# not the default, since the goals are measured at two threads.
AMX_ROWS = 2
# Groups of codes the AMX tiles prefetch ahead of the one they multiply (the weights stream from
# memory; without it the head's tile loads waited for them).
AMX_AHEAD = 4
# Bytes of codes the VNNI tiles of `multirow_quant_matmul` prefetch ahead of the group they multiply
# (0: none), by weight kind, with the group's scales (and mins), in the first row tile over a column
# tile (the later ones find them in cache); only below PROMPT_ROWS rows unless TILE_PREFETCH_PROMPT.
# A step's 120 q4 matmuls with their weights out of L3 (`tools/bench_multirow.py --cold 96`, one
# thread, loaded, 2026-12-06): 2, 4 and 5 rows 0.80..0.89x the time, 1 row 0.87..0.91x at 2..4 KiB
# (8 KiB less). The q8 LM head gains nothing: over 5 rows it runs ``vpdpbusd`` at the rate that 128
# rows reach (2.4..2.7 G/s on znver4), bound by the dot products, not the stream, and its one-row
# decode took 1.12..1.23 ms against 0.97 with 1..2 KiB prefetched. Prompt chunks (128 rows): within
# 1 %, so left as they were.
TILE_PREFETCH_BYTES = {"q4": 4096, "q8": 0}
TILE_PREFETCH_PROMPT = False


def vnni_layout(isa: str | None) -> bool:
    """Whether ``isa`` takes the AVX-512 VNNI kernels and weight layout (``amx`` adds tiles to them)."""
    return isa in ("avx512vnni", "amx")


def dot_isa(features: set[str] | list[str]) -> str | None:
    """The integer dot-product instruction set a CPU offers (``amx``, ``avx512vnni``, ``avx2``,
    ``dotprod``, ``i8mm``), or None.

    ``i8mm`` (aarch64 ``smmla``, `i8mm_quant_matmul`) is preferred where present, and on x86
    AVX-512 VNNI (``vpdpbusd``: four byte products summed into each int32 lane, 16 lanes), with
    AMX-INT8 tiles for several rows where the CPU has them (``amx``).
    """
    features = set(features)
    if "i8mm" in features:
        return "i8mm"
    if "dotprod" in features:
        return "dotprod"
    if {"avx512vnni", "avx512bw", "avx512f"} <= features:
        return "amx" if {"amx-tile", "amx-int8"} <= features else "avx512vnni"
    if "avx2" in features:
        return "avx2"
    return None


@functools.cache
def _llvm_major() -> int:
    from tvm.target import codegen

    return codegen.llvm_version_major()


def vpdpbusd(acc: Any, u8: Any, s8: Any, lanes: int) -> Any:
    """``acc`` (``lanes`` int32) plus, in each lane, four products of unsigned ``u8`` by signed ``s8``
    bytes: AVX-512 VNNI's ``vpdpbusd`` (16 lanes: 512 bits; 8: 256)."""
    if _llvm_major() < 22:  # LLVM 22 declares the byte operands <4 * lanes x i8>, older releases <lanes x i32>
        u8, s8 = T.reinterpret(f"int32x{lanes}", u8), T.reinterpret(f"int32x{lanes}", s8)
    name = T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{lanes * 32}")
    return T.call_llvm_pure_intrin(name, acc, u8, s8, dtype=f"int32x{lanes}")


@T.macro
def round_row_group(x, xq, xd, xsi, amax, src, i, g):
    """`round_group` of ``x``'s row ``src`` into row ``i`` of ``xq``, ``xd``, ``xsi``."""
    amax[0] = T.float32(0)
    for t in range(GROUP):
        amax[0] = T.max(amax[0], T.fabs(x[src, g * GROUP + t]))
    xd[i, g] = amax[0] / T.float32(127)
    xsi[i, g] = 0
    for t in range(GROUP):
        xq[i, g * GROUP + t] = T.Cast(
            "int8",
            T.round(
                x[src, g * GROUP + t] * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            ),
        )
        xsi[i, g] = xsi[i, g] + T.Cast("int32", xq[i, g * GROUP + t])


assert GROUP == 32, "round_row_group_lanes takes a group as two halves of 16 lanes"


def _lane_tree(value: Any, lanes: int, op: Any) -> Any:
    """``op`` over ``value(0) .. value(lanes - 1)`` as a tree of halves."""
    vals = [value(v) for v in range(lanes)]
    while len(vals) > 1:
        vals = [op(vals[v], vals[v + len(vals) // 2]) for v in range(len(vals) // 2)]
    return vals[0]


@T.macro
def round_row_group_lanes(x, xq, xd, xsi, amax, lanes, ilanes, src, i, g):
    """`round_row_group` 16 lanes at a time: the largest magnitude and the sum of the codes, exact in any
    order, are taken over lanes and then across them; the codes are the same products rounded. (One
    element at a time, its chain of 32 maxima and the serial rounding cost about 0.2 us a row of 576,
    on one thread before the matmul: a step's 121 matmuls paid it for every row of a verify pass.)"""
    for v in T.vectorized(16):
        lanes[v] = T.max(T.fabs(x[src, g * GROUP + v]), T.fabs(x[src, g * GROUP + 16 + v]))
    amax[0] = _lane_tree(lambda v: lanes[v], 16, T.max)
    xd[i, g] = amax[0] / T.float32(127)
    for t in T.vectorized(GROUP):
        xq[i, g * GROUP + t] = T.Cast(
            "int8",
            T.round(
                x[src, g * GROUP + t] * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            ),
        )
    for v in T.vectorized(16):
        ilanes[v] = T.Cast("int32", xq[i, g * GROUP + v]) + T.Cast("int32", xq[i, g * GROUP + 16 + v])
    xsi[i, g] = _lane_tree(lambda v: ilanes[v], 16, lambda a, b: a + b)


@T.macro
def round_group(x, xq, xd, xsi, amax, i, g):
    """Row ``i``'s group ``g`` of ``x`` rounded to int8 on one scale (its largest magnitude / 127), as
    llama.cpp's Q8 activation blocks: codes ``xq``, scale ``xd``, the integer sum of the codes ``xsi``."""
    round_row_group(x, xq, xd, xsi, amax, i, i, g)


@functools.cache
def int8_quant_matmul(k: int, n: int, block: int, kind: str, isa: str) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[n, k]``, W in the dot layout above, activations rounded to int8."""
    if k % GROUP:
        raise ValueError(f"quantized weights need K divisible by {GROUP}, got {k}")
    if isa not in ISAS:
        raise ValueError(f"unknown dot-product instruction set '{isa}' ({', '.join(ISAS)})")
    if block % 8:
        raise ValueError(f"the column tile must be a multiple of 8, got {block}")
    if vnni_layout(isa):
        return multirow_quant_matmul(k, n, block, kind, isa)
    nb, full, ng = -(-n // block), n // block, k // GROUP
    q4 = kind == "q4"
    kq = k // 8 if q4 else k // 4  # rows of 4-byte column groups
    code_dtype = "uint8" if q4 else "int8"
    cols = 8 if isa == "avx2" else 4  # output columns per vector instruction (32 or 16 bytes)
    chunks = block // cols
    nbytes = cols * 4
    per_g = GROUP // 8 if q4 else GROUP // 4  # 4-byte rows per group

    def xbcast(xq, i, k0):  # 4 activation bytes broadcast to every 32-bit lane of one vector
        word = T.reinterpret("int32", xq.vload([i, k0], "int8x4"))
        return T.reinterpret(f"int8x{nbytes}", T.broadcast(word, cols))

    def pair_sums(w, x):  # x86: int16 sums of adjacent unsigned-weight x signed-activation products
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), w, x, dtype="int16x16")

    def widen(p):  # x86: int16 pairs summed into int32 lanes
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), p, T.broadcast(T.int16(1), 16), dtype="int32x8"
        )

    def psign(a, b):  # x86: a negated where b < 0, zero where b == 0
        sign = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b")
        return T.call_llvm_pure_intrin(sign, a, b, dtype=f"int8x{nbytes}")

    def sdot(acc, w, x):
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), acc, w, x, dtype="int32x4"
        )

    @T.macro
    def dot_group(qw, xq, isum, pair, i, jo, g):
        """isum[0:block] = integer dot products of group g (32 rows) for every column of tile jo."""
        for c in T.unroll(chunks):
            lanes = T.ramp(c * cols, 1, cols)
            isum[lanes] = T.broadcast(T.int32(0), cols)
            if isa == "avx2" and q4:
                pair[T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                for kk in T.unroll(per_g):  # 4 x 2 x (15 * 127 * 2) < 32767: no int16 overflow
                    v = qw.vload([jo, g * per_g + kk, c * cols, 0], f"uint8x{nbytes}")
                    pair[T.ramp(0, 1, 16)] = (
                        pair[T.ramp(0, 1, 16)]
                        + pair_sums(v & T.broadcast(T.uint8(15), nbytes), xbcast(xq, i, g * GROUP + kk * 8))
                        + pair_sums(v >> T.broadcast(T.uint8(4), nbytes), xbcast(xq, i, g * GROUP + kk * 8 + 4))
                    )
                isum[lanes] = widen(pair[T.ramp(0, 1, 16)])
            elif isa == "avx2":
                for kk in T.unroll(per_g):  # int8 x int8: widen every pair sum (128 * 127 * 2 fits int16)
                    w = qw.vload([jo, g * per_g + kk, c * cols, 0], f"int8x{nbytes}")
                    x = xbcast(xq, i, g * GROUP + kk * 4)
                    isum[lanes] = isum[lanes] + widen(pair_sums(psign(w, w), psign(x, w)))
            elif q4:
                for kk in T.unroll(per_g):
                    v = qw.vload([jo, g * per_g + kk, c * cols, 0], f"uint8x{nbytes}")
                    isum[lanes] = sdot(
                        sdot(
                            isum[lanes],
                            T.reinterpret(f"int8x{nbytes}", v & T.broadcast(T.uint8(15), nbytes)),
                            xbcast(xq, i, g * GROUP + kk * 8),
                        ),
                        T.reinterpret(f"int8x{nbytes}", v >> T.broadcast(T.uint8(4), nbytes)),
                        xbcast(xq, i, g * GROUP + kk * 8 + 4),
                    )
            else:
                for kk in T.unroll(per_g):
                    isum[lanes] = sdot(
                        isum[lanes],
                        qw.vload([jo, g * per_g + kk, c * cols, 0], f"int8x{nbytes}"),
                        xbcast(xq, i, g * GROUP + kk * 4),
                    )

    @T.macro
    def body(x, qw, sc, mn, y, m):
        # Activations to int8, one scale per group of 32 (as llama.cpp's Q8 activation blocks).
        # The q4 min term takes the sum of the *quantized* group (as llama.cpp's Q8_1 does), so
        # every weight meets the same rounded activation: the error is sum(w * dx), not
        # sum(d * code * dx) with codes 0..15, which measured twice as large.
        xq = T.alloc_buffer((m, k), "int8")
        xd = T.alloc_buffer((m, ng), "float32")
        xs = T.alloc_buffer((m, ng), "float32")
        xsi = T.alloc_buffer((m, ng), "int32")
        amax = T.alloc_buffer((1,), "float32", scope="local")
        for i, g in T.grid(m, ng):
            round_group(x, xq, xd, xsi, amax, i, g)
            xs[i, g] = T.Cast("float32", xsi[i, g]) * xd[i, g]
        for jo in T.parallel(nb):
            acc = T.alloc_buffer((block,), "float32", scope="local")
            isum = T.alloc_buffer((block,), "int32", scope="local")
            pair = T.alloc_buffer((16,), "int16", scope="local")
            for i in range(m):
                for ji in T.vectorized(block):
                    acc[ji] = T.float32(0)
                for g in range(ng):
                    dot_group(qw, xq, isum, pair, i, jo, g)
                    for ji in T.vectorized(block):
                        acc[ji] = acc[ji] + T.Cast("float32", isum[ji]) * (T.Cast("float32", sc[jo, g, ji]) * xd[i, g])
                        if q4:
                            acc[ji] = acc[ji] + xs[i, g] * T.Cast("float32", mn[jo, g, ji])
                if jo < full:
                    for ji in T.vectorized(block):
                        y[i, jo * block + ji] = acc[ji]
                else:
                    for ji in range(block):
                        if jo * block + ji < n:
                            y[i, jo * block + ji] = acc[ji]

    symbol = f"int8_quant_matmul_{kind}_{isa}_k{k}_n{n}_b{block}"
    return _entry(body, k, n, (nb, kq, block, 4), code_dtype, (nb, ng, block), q4, symbol)


# -- many rows per unpacked weight tile (AVX-512 VNNI) ------------------------------------
# `int8_quant_matmul` above walks the rows one by one and unpacks every code again for each. On
# a CPU whose integer dot product is cheap (VNNI: one ``vpdpbusd`` takes 64 byte products) the
# unpacking (mask and shift of the q4 nibbles) costs as much as the products, so a verify pass
# over 5 tokens cost 5 unpackings. Here the rows go in a static tile of R (`ROW_TILES`): each
# 16-column register of codes is loaded and unpacked once per K step and multiplied into every
# row's int32 accumulator; the float scale (and the q4 min) is applied once per group of 32.
# With 16 columns per chunk the R int32 and R float accumulators plus the unpacked codes fit
# the 32 zmm registers up to R = 8; more rows go in several tiles (`ROW_TILES`).
# ``vpdpbusd`` multiplies unsigned by signed bytes: q4 codes (0..15) are the unsigned operand
# as they are; q8 codes get +128 (a xor of the sign bit) and the accumulator starts at
# -128 * (the sum of the group's int8 activations), which takes the offset back out exactly.


@functools.cache
def multirow_quant_matmul(
    k: int,
    n: int,
    block: int,
    kind: str,
    isa: str = "avx512vnni",
    prologue: str = "",
    eps: float = 1e-5,
    gamma_dtype: str = "float32",
    residual: bool = False,
) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[n, k]`` with int8 activations, each unpacked weight register
    reused by a tile of rows (W in the dot layout of `int8_quant_matmul`).

    ``prologue="swiglu"``: x is ``[m, 2 k]``, a SwiGLU's gate and up projections side by side, and
    the kernel multiplies ``silu(gate) * up`` as it quantizes its rows (the down projection
    of a Llama MLP: one kernel and one ``[m, 2 k]`` pass over memory instead of two).
    ``prologue="rmsnorm"``: the kernel takes a second input, ``gamma [k]`` (``gamma_dtype``), and
    multiplies ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * gamma`` instead of x (the projection after
    a pre-norm: the norm's kernel and its output go).
    ``residual``: the kernel takes ``res [m, n]`` after the weights and writes ``y = res + x W^T`` (a
    block's residual add in the output projection's write-back: without it each add was a kernel
    of its own, 58 a SmolLM2 step, about 3 us each). Not with the rmsnorm prologue.
    """
    if residual and prologue == "rmsnorm":
        raise ValueError("the residual epilogue goes with the plain or swiglu kernels, not rmsnorm")
    if prologue not in ("", "swiglu", "rmsnorm"):
        raise ValueError(f"unknown prologue '{prologue}' (swiglu, rmsnorm)")
    swiglu, rmsnorm = prologue == "swiglu", prologue == "rmsnorm"
    if k % GROUP:
        raise ValueError(f"quantized weights need K divisible by {GROUP}, got {k}")
    if isa not in ("avx512vnni", "amx", "dotprod"):
        raise ValueError(f"the multi-row kernel takes avx512vnni, amx or dotprod, not '{isa}'")
    if block % 8:
        raise ValueError(f"the column tile must be a multiple of 8, got {block}")
    nb, full, ng = -(-n // block), n // block, k // GROUP
    q4 = kind == "q4"
    kq = k // 8 if q4 else k // 4
    code_dtype = "uint8" if q4 else "int8"
    vnni = vnni_layout(isa)
    on_amx = isa == "amx" and not q4 and block in (16, 32)  # one or two 16-column tiles of sums per column tile
    cols = (16 if block % 16 == 0 else 8) if vnni else 4  # int32 lanes (output columns) per register
    nbytes, chunks = cols * 4, block // cols
    per_g = GROUP // 8 if q4 else GROUP // 4

    def xbcast(xq, row, k0):  # 4 activation bytes broadcast to every 32-bit lane
        word = T.reinterpret("int32", xq.vload([row, k0], "int8x4"))
        return T.reinterpret(f"int8x{nbytes}", T.broadcast(word, cols))

    def dot(acc, w, x):  # acc (int32 lanes) + four byte products per lane; w unsigned on x86
        if vnni:
            return vpdpbusd(acc, w, x, cols)
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            acc,
            T.reinterpret("int8x16", w),
            x,
            dtype="int32x4",
        )

    wdt = "uint8" if vnni else "int8"  # dtype of an unpacked code register
    # q8 on VNNI: the activation in two int8 parts, x ~ xd * xq + xd2 * xq2 (the second rounds the
    # first's remainder), so 8-bit weights meet a 16-bit activation. With one part SmolLM2's q8 LM
    # head alone took the greedy agreement with the f32 build from 0.969 to 0.945 (512 tokens).
    two = vnni and not q4

    def isums(isum, r, ci, v, na):  # a row's integer group sum over its accumulators
        return isum[r, ci, 0, v] + isum[r, ci, 1, v] if na > 1 else isum[r, ci, 0, v]

    def shape(rows: int) -> tuple[int, int]:
        # (column chunks side by side, int32 accumulators per row and chunk). Few rows take every
        # chunk of the tile at once, so each activation broadcast serves all of them, and one row
        # two accumulators (low and high nibbles, or even and odd K steps) for more independent
        # ``vpdpbusd`` chains, while the accumulators fit the registers (`ROW_TILES` goes up to 5
        # rows; wider tiles spilled: see `body`).
        # Registers: 32 (zmm or NEON q); the accumulators and unpacked codes get at most 28.
        # A ``vpdpbusd`` waits several cycles for its accumulator, so the instruction rate grows
        # with the independent chains up to about 20 (on znver5 12 chains reach 3.1 G/s a core,
        # 24 4.4 G/s). Two-part q8 tiles leave their float accumulators (used once a group) out
        # of the count: 5 rows then take both chunks, 20 chains instead of 10 (the LM head over
        # 5 rows 1.9 instead of 2.2 ms, loaded, one thread).
        na = 2 if rows <= 3 or two else 1
        facc = 0 if two else 1
        wide = chunks
        while wide > 1 and (rows * wide * (na + facc) + 2 * wide > 28 or chunks % wide):
            wide -= 1
        return wide, na

    # Groups of codes the tiles prefetch ahead (VNNI only; the aarch64 variants are not measured).
    fetch_bytes = TILE_PREFETCH_BYTES.get(kind, 0) if vnni else 0
    ahead = max(1, fetch_bytes // (per_g * block * 4)) if fetch_bytes else 0

    def out(res: Any, value: Any, row: Any, col: Any) -> Any:  # an output value, with the residual when taken
        return res[row, col] + value if residual else value

    @T.macro
    def fetch_ahead(qw, sc, mn, jo, co, cw, g):
        # The codes, scales (and mins) of group g + ahead of this column chunk pass, past the end of
        # the column tile into the next one's first groups (this thread's next, or another's).
        if jo * ng + g + ahead < nb * ng:
            for kk in T.unroll(per_g):
                for ci in T.unroll(cw):
                    T.evaluate(
                        prefetch(qw[jo + (g + ahead) // ng, (g + ahead) % ng * per_g + kk, (co * cw + ci) * cols, 0])
                    )
            T.evaluate(prefetch(sc[jo + (g + ahead) // ng, (g + ahead) % ng, co * cw * cols]))
            if q4:
                T.evaluate(prefetch(mn[jo + (g + ahead) // ng, (g + ahead) % ng, co * cw * cols]))

    @T.macro
    def tiles(qw, sc, mn, y, res, xq, xd, xs, xo, xq2, xd2, xo2, jo, first, count, rows: T.int32, cw, na, lead):
        # ``count`` tiles of ``rows`` rows from row ``first``, in column tile ``jo``; ``lead``: whether
        # the tile at row 0 prefetches the weights (the weight stream meets the dot products).
        if count > 0:
            acc = T.alloc_buffer((rows, cw, cols), "float32", scope="local")
            isum = T.alloc_buffer((rows, cw, na, cols), "int32", scope="local")
            wv = T.alloc_buffer((cw, 2, nbytes), wdt, scope="local")
            d = T.alloc_buffer((cols,), "float32", scope="local")
            lo = T.alloc_buffer((cols,), "float32", scope="local")
            for it in range(count):
                top = first + it * rows  # the tile's first row
                for co in range(chunks // cw):
                    for r, ci in T.grid(rows, cw):
                        acc[r, ci, T.ramp(0, 1, cols)] = T.broadcast(T.float32(0), cols)
                    for g in range(ng):
                        if ahead > 0:
                            if lead:
                                if top == 0:
                                    fetch_ahead(qw, sc, mn, jo, co, cw, g)
                        for r in T.unroll(rows):
                            for ci in T.unroll(cw):
                                if q4 or not vnni:
                                    for a in T.unroll(na):
                                        isum[r, ci, a, T.ramp(0, 1, cols)] = T.broadcast(T.int32(0), cols)
                                else:  # takes the +128 of the q8 codes back out, for each activation part
                                    isum[r, ci, 0, T.ramp(0, 1, cols)] = T.broadcast(xo[top + r, g], cols)
                                    isum[r, ci, 1, T.ramp(0, 1, cols)] = T.broadcast(xo2[top + r, g], cols)
                        for kk in T.unroll(per_g):
                            for ci in T.unroll(cw):
                                c = co * cw + ci
                                if q4:
                                    v = qw.vload([jo, g * per_g + kk, c * cols, 0], f"uint8x{nbytes}")
                                    wv[ci, 0, T.ramp(0, 1, nbytes)] = T.reinterpret(
                                        f"{wdt}x{nbytes}", v & T.broadcast(T.uint8(15), nbytes)
                                    )
                                    wv[ci, 1, T.ramp(0, 1, nbytes)] = T.reinterpret(
                                        f"{wdt}x{nbytes}", v >> T.broadcast(T.uint8(4), nbytes)
                                    )
                                elif vnni:
                                    v = qw.vload([jo, g * per_g + kk, c * cols, 0], f"int8x{nbytes}")
                                    wv[ci, 0, T.ramp(0, 1, nbytes)] = T.reinterpret(f"uint8x{nbytes}", v) ^ T.broadcast(
                                        T.uint8(128), nbytes
                                    )
                                else:
                                    wv[ci, 0, T.ramp(0, 1, nbytes)] = qw.vload(
                                        [jo, g * per_g + kk, c * cols, 0], f"int8x{nbytes}"
                                    )
                            for r in T.unroll(rows):
                                row = top + r
                                for ci in T.unroll(cw):
                                    if q4:
                                        isum[r, ci, 0, T.ramp(0, 1, cols)] = dot(
                                            isum[r, ci, 0, T.ramp(0, 1, cols)],
                                            wv[ci, 0, T.ramp(0, 1, nbytes)],
                                            xbcast(xq, row, g * GROUP + kk * 8),
                                        )
                                        isum[r, ci, na - 1, T.ramp(0, 1, cols)] = dot(
                                            isum[r, ci, na - 1, T.ramp(0, 1, cols)],
                                            wv[ci, 1, T.ramp(0, 1, nbytes)],
                                            xbcast(xq, row, g * GROUP + kk * 8 + 4),
                                        )
                                    elif two:
                                        isum[r, ci, 0, T.ramp(0, 1, cols)] = dot(
                                            isum[r, ci, 0, T.ramp(0, 1, cols)],
                                            wv[ci, 0, T.ramp(0, 1, nbytes)],
                                            xbcast(xq, row, g * GROUP + kk * 4),
                                        )
                                        isum[r, ci, 1, T.ramp(0, 1, cols)] = dot(
                                            isum[r, ci, 1, T.ramp(0, 1, cols)],
                                            wv[ci, 0, T.ramp(0, 1, nbytes)],
                                            xbcast(xq2, row, g * GROUP + kk * 4),
                                        )
                                    else:
                                        isum[r, ci, kk % na, T.ramp(0, 1, cols)] = dot(
                                            isum[r, ci, kk % na, T.ramp(0, 1, cols)],
                                            wv[ci, 0, T.ramp(0, 1, nbytes)],
                                            xbcast(xq, row, g * GROUP + kk * 4),
                                        )
                        for ci in T.unroll(cw):
                            for v in T.vectorized(cols):
                                d[v] = T.Cast("float32", sc[jo, g, (co * cw + ci) * cols + v])
                                lo[v] = T.Cast("float32", mn[jo, g, (co * cw + ci) * cols + v]) if q4 else T.float32(0)
                            for r in T.unroll(rows):
                                row = top + r
                                for v in T.vectorized(cols):
                                    if two:
                                        acc[r, ci, v] = (
                                            acc[r, ci, v]
                                            + T.Cast("float32", isum[r, ci, 0, v]) * (d[v] * xd[row, g])
                                            + T.Cast("float32", isum[r, ci, 1, v]) * (d[v] * xd2[row, g])
                                        )
                                    else:
                                        acc[r, ci, v] = acc[r, ci, v] + T.Cast("float32", isums(isum, r, ci, v, na)) * (
                                            d[v] * xd[row, g]
                                        )
                                    if q4:
                                        acc[r, ci, v] = acc[r, ci, v] + xs[row, g] * lo[v]
                    for r, ci in T.grid(rows, cw):  # the tiles cover exactly m rows: no row guard
                        if jo < full:
                            for v in T.vectorized(cols):
                                y[top + r, jo * block + (co * cw + ci) * cols + v] = out(
                                    res, acc[r, ci, v], top + r, jo * block + (co * cw + ci) * cols + v
                                )
                        else:
                            for v in range(cols):
                                if jo * block + (co * cw + ci) * cols + v < n:
                                    y[top + r, jo * block + (co * cw + ci) * cols + v] = out(
                                        res, acc[r, ci, v], top + r, jo * block + (co * cw + ci) * cols + v
                                    )

    # -- AMX (q8): the same integer group sums from tiles -------------------------------------
    # A tile of up to 16 rows x 32 int8 activations (one group) times a tile of 8 x 64 bytes (the
    # group's 32 codes of 16 columns, 4 consecutive K values a column: the VNNI layout as stored)
    # into 16 x 16 int32 sums (``tdpbssd``: signed by signed, so no +128 offset). Each group's sums go
    # through memory into the float epilogue of `tiles` (the same expressions: the outputs are the
    # VNNI tiles' bit for bit). Tiles: 0 = activations, 1 + c = codes of column chunk c, 3 + c = sums,
    # 5 + c = the sums of the activation's second part.
    amx_span = max(1, min(8, nb // 16))  # column tiles a task takes (16 tasks or more)

    @T.macro
    def amx_configure(cfg, rows):
        # (``ldtilecfg`` costs about as much as a group's products: once a task, again for a last,
        # shorter row tile)
        for b in range(64):
            cfg[b] = T.uint8(0)
        cfg[0] = T.uint8(1)  # palette 1; bytes 16 + 2 t: a row's bytes of tile t, 48 + t: its rows
        cfg[16] = T.uint8(32)
        cfg[48] = T.Cast("uint8", rows)
        for c in range(chunks):
            cfg[16 + 2 * (1 + c)] = T.uint8(64)
            cfg[48 + 1 + c] = T.uint8(8)
            for part in range(2 if two else 1):
                cfg[16 + 2 * (3 + 2 * part + c)] = T.uint8(64)
                cfg[48 + 3 + 2 * part + c] = T.Cast("uint8", rows)
        amx("ldtilecfg", T.address_of(cfg[0]))
        cfg[63] = T.Cast("uint8", rows)  # a reserved byte: the rows configured, for `amx_tiles`

    @T.macro
    def amx_dot(xsrc, sums, half, part, top, g):
        # rows top.. of group g of xsrc times the codes in tiles 1.., the sums to sums[half, part]
        # (the chunks' products side by side, then their stores: a store waits for its product)
        amx("tileloadd64", T.uint8(0), T.address_of(xsrc[top, g * GROUP]), T.int64(k))
        for c in T.unroll(chunks):
            amx("tilezero", T.uint8(3 + 2 * part + c))
        for c in T.unroll(chunks):
            amx("tdpbssd", T.uint8(3 + 2 * part + c), T.uint8(0), T.uint8(1 + c))
        for c in T.unroll(chunks):
            amx("tilestored64", T.uint8(3 + 2 * part + c), T.address_of(sums[half, part, c, 0, 0]), T.int64(64))

    @T.macro
    def amx_group(qw, xq, xq2, sums, jo, rt, top, g):
        # group g's codes into tiles 1.. (the first row tile prefetches ahead) and its sums out
        if rt == 0:  # the codes AMX_AHEAD groups on (into the next column tile's at the end)
            for kk, c in T.grid(per_g, chunks):
                if g + AMX_AHEAD < ng:
                    T.evaluate(prefetch(qw[jo, (g + AMX_AHEAD) * per_g + kk, c * 16, 0]))
                elif jo + 1 < nb:
                    T.evaluate(prefetch(qw[jo + 1, (g + AMX_AHEAD - ng) * per_g + kk, c * 16, 0]))
        for c in T.unroll(chunks):
            amx("tileloadd64", T.uint8(1 + c), T.address_of(qw[jo, g * per_g, c * 16, 0]), T.int64(4 * block))
        amx_dot(xq, sums, g % 2, 0, top, g)
        if two:
            amx_dot(xq2, sums, g % 2, 1, top, g)

    @T.macro
    def amx_epilogue(sc, xd, xd2, sums, acc, d, jo, top, rows, g):
        # group g's sums (stored a group earlier) scaled into the float accumulators, as `tiles` does
        for c in T.unroll(chunks):
            for v in T.vectorized(16):
                d[v] = T.Cast("float32", sc[jo, g, c * 16 + v])
            for r in range(rows):
                for v in T.vectorized(16):
                    if two:
                        acc[r, c, v] = (
                            acc[r, c, v]
                            + T.Cast("float32", sums[g % 2, 0, c, r, v]) * (d[v] * xd[top + r, g])
                            + T.Cast("float32", sums[g % 2, 1, c, r, v]) * (d[v] * xd2[top + r, g])
                        )
                    else:
                        acc[r, c, v] = acc[r, c, v] + T.Cast("float32", sums[g % 2, 0, c, r, v]) * (
                            d[v] * xd[top + r, g]
                        )

    @T.macro
    def amx_tiles(qw, sc, y, res, xq, xd, xq2, xd2, cfg, jo, m):
        # Two halves: a group's sums are read back a group after the tiles stored them, so the loads
        # do not wait for the tile stores (no forwarding from them) while the next group's tiles run.
        sums = T.alloc_buffer((2, 2 if two else 1, chunks, 16, 16), "int32", scope="local")
        acc = T.alloc_buffer((16, chunks, 16), "float32", scope="local")
        d = T.alloc_buffer((16,), "float32", scope="local")
        for rt in range((m + 15) // 16):
            top = rt * 16
            rows = T.min(T.int64(16), m - top)
            if T.Cast("int64", cfg[63]) != rows:
                amx_configure(cfg, rows)
            for r, ci in T.grid(16, chunks):
                acc[r, ci, T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
            amx_group(qw, xq, xq2, sums, jo, rt, top, 0)
            for g in range(1, ng):
                amx_group(qw, xq, xq2, sums, jo, rt, top, g)
                amx_epilogue(sc, xd, xd2, sums, acc, d, jo, top, rows, g - 1)
            amx_epilogue(sc, xd, xd2, sums, acc, d, jo, top, rows, ng - 1)
            for r, c in T.grid(rows, chunks):
                if jo < full:
                    for v in T.vectorized(16):
                        y[top + r, jo * block + c * 16 + v] = out(res, acc[r, c, v], top + r, jo * block + c * 16 + v)
                else:
                    for v in range(16):
                        if jo * block + c * 16 + v < n:
                            y[top + r, jo * block + c * 16 + v] = out(
                                res, acc[r, c, v], top + r, jo * block + c * 16 + v
                            )

    @T.macro
    def quantize(x, xq, xd, xs, xo, xq2, xd2, xo2, rest, amax, first, count):
        # rows first .. first + count - 1 of x
        lanes = T.alloc_buffer((16,), "float32", scope="local")
        ilanes = T.alloc_buffer((16,), "int32", scope="local")
        for ii, g in T.grid(count, ng):
            i = first + ii
            round_row_group_lanes(x, xq, xd, xo, amax, lanes, ilanes, i, i, g)
            xs[i, g] = T.Cast("float32", xo[i, g]) * xd[i, g]
            if two:  # the second part: the remainder x - xd * xq rounded to int8 on its own scale
                for t in T.vectorized(GROUP):
                    rest[0, g * GROUP + t] = x[i, g * GROUP + t] - T.Cast("float32", xq[i, g * GROUP + t]) * xd[i, g]
                round_row_group_lanes(rest, xq2, xd2, xo2, amax, lanes, ilanes, 0, i, g)
                xo2[i, g] = xo2[i, g] * T.int32(-128)
            xo[i, g] = xo[i, g] * T.int32(-128)

    @T.macro
    def swiglu_rows(x, act, first, count):  # silu(gate) * up, 16 lanes at a time: silu(g) = g / (1 + exp(-g))
        for ii, to in T.grid(count, k // 16):
            for v in T.vectorized(16):
                act[first + ii, to * 16 + v] = (
                    x[first + ii, to * 16 + v]
                    * x[first + ii, k + to * 16 + v]
                    / (T.float32(1.0) + fast_exp(T.float32(0.0) - x[first + ii, to * 16 + v]))
                )

    @T.macro
    def rmsnorm_rows(x, gamma, act, sq, amax, m, ib):
        # x * rsqrt(mean(x^2) + eps) * gamma for rows 4 ib .. 4 ib + 3, in the order and rounding of
        # TVM's `topi.nn.rms_norm` (the squares summed one by one), so that the int8 activations are
        # those of the unfused graph: a 16-lane sum changed SmolLM2's greedy continuations
        # (llama.cpp's Q4_1 file, first 16 tokens: 3 of 8 prompts matched instead of 5)
        # Four rows' sums advance side by side (each still one by one, in its own order): a chain
        # of k dependent additions per row cost as much as the rest of the prologue.
        for r in T.unroll(4):
            sq[r] = T.float32(0)
        for t in range(k):
            for r in T.unroll(4):  # rows past m repeat the last one, and are not used
                sq[r] = sq[r] + x[T.min(ib * 4 + r, m - 1), t] * x[T.min(ib * 4 + r, m - 1), t]
        for r in range(4):
            if ib * 4 + r < m:
                amax[0] = T.rsqrt(sq[r] / T.float32(k) + T.float32(eps))
                for to in range(k // 16):
                    for v in T.vectorized(16):
                        act[ib * 4 + r, to * 16 + v] = (
                            x[ib * 4 + r, to * 16 + v] * amax[0] * T.Cast("float32", gamma[to * 16 + v])
                        )

    @T.macro
    def body(x, qw, sc, mn, y, m, gamma, res):
        # Activations to int8 per group of 32, as `int8_quant_matmul` rounds them; xs is a group's
        # float sum (the q4 min term), xo -128 times its integer sum (the q8 offset).
        xq = T.alloc_buffer((m, k), "int8")
        xd = T.alloc_buffer((m, ng), "float32")
        xs = T.alloc_buffer((m, ng), "float32")
        xo = T.alloc_buffer((m, ng), "int32")
        xq2 = T.alloc_buffer((m, k) if two else (1, 1), "int8")
        xd2 = T.alloc_buffer((m, ng) if two else (1, 1), "float32")
        xo2 = T.alloc_buffer((m, ng) if two else (1, 1), "int32")
        act = T.alloc_buffer((m, k) if swiglu or rmsnorm else (1, 1), "float32")
        src = act if swiglu or rmsnorm else x  # the rows that are quantized
        acts = (xq, xd, xs, xo, xq2, xd2, xo2)
        if m >= PROMPT_ROWS:
            # A prompt chunk: the prologue and the rounding run on every thread, 4 rows a task (one
            # thread took them all before the matmul: about 4 ms of the layers' 40 for 128 rows at
            # one thread, which two threads did not share). Each row's values are the serial loop's.
            for ib in T.parallel((m + 3) // 4):
                rest = T.alloc_buffer((1, k) if two else (1, 1), "float32", scope="local")
                amax = T.alloc_buffer((1,), "float32", scope="local")
                sq = T.alloc_buffer((4,), "float32", scope="local")
                count = T.min(4, m - ib * 4)
                if swiglu:
                    swiglu_rows(x, act, ib * 4, count)
                elif rmsnorm:
                    rmsnorm_rows(x, gamma, act, sq, amax, m, ib)
                quantize(src, *acts, rest, amax, ib * 4, count)
        else:
            rest = T.alloc_buffer((1, k) if two else (1, 1), "float32")
            amax = T.alloc_buffer((1,), "float32", scope="local")
            if swiglu:
                swiglu_rows(x, act, 0, m)
            elif rmsnorm:
                sq = T.alloc_buffer((4,), "float32", scope="local")
                for ib in range((m + 3) // 4):
                    rmsnorm_rows(x, gamma, act, sq, amax, m, ib)
            quantize(src, *acts, rest, amax, 0, m)
        # Every row in a tile of its own count (`ROW_TILES`), none computed for nothing: tiles of 5,
        # then the rest (1..4 rows) in a tile of its size. The tiles of one column tile follow each
        # other, so its codes come from memory once and from L1 after that. (Tiles of 8 (one chunk
        # of columns at a time) and 16 (spilling) cost more per row than tiles of 5: 8 rows 7.9 ->
        # 6.0 ms, 12 rows 9.7 -> 8.0, a step's matmuls on a layer's worth of weights each, loaded.)
        tail = m % 5
        after = m - tail  # the first row after the tiles of 5
        if on_amx and m >= AMX_ROWS:
            # A task takes `amx_span` column tiles, so that its tile configuration serves several.
            for jp in T.parallel(-(-nb // amx_span)):
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                cfg[63] = T.uint8(0)  # nothing configured yet
                for jj in range(amx_span):
                    if jp * amx_span + jj < nb:
                        amx_tiles(qw, sc, y, res, xq, xd, xq2, xd2, cfg, jp * amx_span + jj, m)
                amx("tilerelease")
        else:
            lead = T.bool(True) if TILE_PREFETCH_PROMPT else m < PROMPT_ROWS
            for jo in T.parallel(nb):
                tiles(qw, sc, mn, y, res, *acts, jo, 0, m // 5, 5, *shape(5), lead)
                tiles(qw, sc, mn, y, res, *acts, jo, after, T.Cast("int64", tail == 4), 4, *shape(4), lead)
                tiles(qw, sc, mn, y, res, *acts, jo, after, T.Cast("int64", tail == 3), 3, *shape(3), lead)
                tiles(qw, sc, mn, y, res, *acts, jo, after, T.Cast("int64", tail == 2), 2, *shape(2), lead)
                tiles(qw, sc, mn, y, res, *acts, jo, after, T.Cast("int64", tail == 1), 1, *shape(1), lead)

    @T.macro
    def body_plain(x, qw, sc, mn, y, m):
        body(x, qw, sc, mn, y, m, x, y)

    @T.macro
    def body_gamma(x, qw, sc, mn, y, m, gamma):
        body(x, qw, sc, mn, y, m, gamma, y)

    @T.macro
    def body_res(x, qw, sc, mn, res, y, m):
        body(x, qw, sc, mn, y, m, x, res)

    pro = "_" + prologue if prologue else ""
    symbol = f"multirow_quant_matmul{pro}{'_res' if residual else ''}_{kind}_{isa}_k{k}_n{n}_b{block}"
    codes, scales = (nb, kq, block, 4), (nb, ng, block)
    if rmsnorm:
        return _entry_gamma(body_gamma, k, n, codes, code_dtype, scales, q4, symbol, gamma_dtype)
    if residual:
        return _entry_residual(body_res, k, n, codes, code_dtype, scales, q4, symbol, 2 * k if swiglu else k)
    return _entry(body_plain, k, n, codes, code_dtype, scales, q4, symbol, 2 * k if swiglu else k)


# -- aarch64 i8mm: two rows by two columns per instruction -----------------------------------
# ``smmla`` multiplies a 2 x 8 int8 block of activations by an 8 x 2 int8 block of weights into
# the four int32 sums of a 2 x 2 output block. Rows go in pairs, weight columns in pairs whose
# 8 consecutive K codes lie next to each other: q8 codes ``int8 [N/B, K/8, B, 8]``; q4 codes
# ``uint8 [N/B, K/16, B, 8]`` with byte t of (kk, column) holding row ``16 kk + t`` in its low
# nibble and row ``16 kk + 8 + t`` in its high one (`layout.pack_quantized_mmla`). Every row,
# one token or a prompt, takes the int8 activation path: the instruction pays off from two rows on.


@functools.cache
def i8mm_quant_matmul(k: int, n: int, block: int, kind: str) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * W[n, k]`` with int8 activations and ``smmla`` (W in the i8mm layout)."""
    if k % GROUP:
        raise ValueError(f"quantized weights need K divisible by {GROUP}, got {k}")
    if block % 2:
        raise ValueError(f"the column tile must be even, got {block}")
    nb, full, ng = -(-n // block), n // block, k // GROUP
    q4 = kind == "q4"
    kq = k // 16 if q4 else k // 8
    code_dtype = "uint8" if q4 else "int8"
    per_g = GROUP // 16 if q4 else GROUP // 8  # code rows of the layout per group

    def smmla(acc, a, b):
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"), acc, a, b, dtype="int32x4"
        )

    @T.macro
    def body(x, qw, sc, mn, y, m):
        # Activations to int8 per group of 32 (as `int8_quant_matmul`), laid out for smmla's first
        # operand: row pair p, K chunk c -> 16 bytes (row 2p: 8 codes, row 2p + 1: 8 codes).
        xq = T.alloc_buffer(((m + 1) // 2, k // 8, 16), "int8")
        xd = T.alloc_buffer(((m + 1) // 2 * 2, ng), "float32")
        xs = T.alloc_buffer(((m + 1) // 2 * 2, ng), "float32")
        amax = T.alloc_buffer((1,), "float32", scope="local")
        for i, g in T.grid((m + 1) // 2 * 2, ng):
            amax[0] = T.float32(0)
            if i < m:
                for t in range(GROUP):
                    amax[0] = T.max(amax[0], T.fabs(x[i, g * GROUP + t]))
            xd[i, g] = amax[0] / T.float32(127)
            xs[i, g] = T.float32(0)
            for t in range(GROUP):
                xq[i // 2, (g * GROUP + t) // 8, i % 2 * 8 + t % 8] = T.Cast(
                    "int8",
                    T.round(
                        T.if_then_else(i < m, x[T.min(i, m - 1), g * GROUP + t], T.float32(0))
                        * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                    ),
                )
                xs[i, g] = xs[i, g] + T.Cast("float32", xq[i // 2, (g * GROUP + t) // 8, i % 2 * 8 + t % 8])
            xs[i, g] = xs[i, g] * xd[i, g]
        for jo in T.parallel(nb):
            acc = T.alloc_buffer((2, block), "float32", scope="local")
            isum = T.alloc_buffer((4,), "int32", scope="local")
            for p in range((m + 1) // 2):
                for r, ji in T.grid(2, block):
                    acc[r, ji] = T.float32(0)
                for g in range(ng):
                    for cp in range(block // 2):
                        isum[T.ramp(0, 1, 4)] = T.broadcast(T.int32(0), 4)
                        for kk in T.unroll(per_g):
                            if q4:
                                v = qw.vload([jo, g * per_g + kk, cp * 2, 0], "uint8x16")
                                c0 = (g * per_g + kk) * 2  # the low nibbles' 8-row chunk; high: c0 + 1
                                isum[T.ramp(0, 1, 4)] = smmla(
                                    smmla(
                                        isum[T.ramp(0, 1, 4)],
                                        xq.vload([p, c0, 0], "int8x16"),
                                        T.reinterpret("int8x16", v & T.broadcast(T.uint8(15), 16)),
                                    ),
                                    xq.vload([p, c0 + 1, 0], "int8x16"),
                                    T.reinterpret("int8x16", v >> T.broadcast(T.uint8(4), 16)),
                                )
                            else:
                                isum[T.ramp(0, 1, 4)] = smmla(
                                    isum[T.ramp(0, 1, 4)],
                                    xq.vload([p, g * per_g + kk, 0], "int8x16"),
                                    qw.vload([jo, g * per_g + kk, cp * 2, 0], "int8x16"),
                                )
                        for r, c in T.grid(2, 2):
                            acc[r, cp * 2 + c] = acc[r, cp * 2 + c] + T.Cast("float32", isum[r * 2 + c]) * (
                                T.Cast("float32", sc[jo, g, cp * 2 + c]) * xd[p * 2 + r, g]
                            )
                            if q4:
                                acc[r, cp * 2 + c] = acc[r, cp * 2 + c] + xs[p * 2 + r, g] * T.Cast(
                                    "float32", mn[jo, g, cp * 2 + c]
                                )
                for r in range(2):
                    if p * 2 + r < m:
                        if jo < full:
                            for ji in T.vectorized(block):
                                y[p * 2 + r, jo * block + ji] = acc[r, ji]
                        else:
                            for ji in range(block):
                                if jo * block + ji < n:
                                    y[p * 2 + r, jo * block + ji] = acc[r, ji]

    symbol = f"i8mm_quant_matmul_{kind}_k{k}_n{n}_b{block}"
    return _entry(body, k, n, (nb, kq, block, 8), code_dtype, (nb, ng, block), q4, symbol)


def _entry(
    body: Any,
    k: int,
    n: int,
    codes: tuple,
    code_dtype: str,
    scales: tuple,
    q4: bool,
    symbol: str,
    kx: int | None = None,
) -> tirx.PrimFunc:
    """The kernel function around a ``body(x, qw, sc, mn, y, m)`` macro: x ``[m, kx]`` (kx = k
    unless a prologue combines wider rows) and y ``[m, n]`` float32 with m free, the codes, the f16
    scales and (q4) the f16 mins."""
    kx = k if kx is None else kx
    # Only the variant asked for is parsed: `T.prim_func` parses (and expands the body macro) at
    # definition, about 0.4-0.8 s a kernel, a few seconds of every LLM build's export.
    if q4:

        @T.prim_func
        def matmul_q4(
            x_h: T.handle,
            qw: T.Buffer(codes, code_dtype),
            sc: T.Buffer(scales, "float16"),
            mn: T.Buffer(scales, "float16"),
            y_h: T.handle,
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, kx), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, qw, sc, mn, y, m)

        return matmul_q4.with_attr("global_symbol", symbol)

    @T.prim_func
    def matmul_q8(x_h: T.handle, qw: T.Buffer(codes, code_dtype), sc: T.Buffer(scales, "float16"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, kx), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        body(x, qw, sc, sc, y, m)

    return matmul_q8.with_attr("global_symbol", symbol)


def _entry_residual(
    body: Any, k: int, n: int, codes: tuple, code_dtype: str, scales: tuple, q4: bool, symbol: str, kx: int
) -> tirx.PrimFunc:
    """`_entry` with ``res [m, n]`` after the weights (the residual epilogue's rows), for a
    ``body(x, qw, sc, mn, res, y, m)`` macro."""
    if q4:  # only the variant asked for is parsed, as in `_entry`

        @T.prim_func
        def matmul_q4(
            x_h: T.handle,
            qw: T.Buffer(codes, code_dtype),
            sc: T.Buffer(scales, "float16"),
            mn: T.Buffer(scales, "float16"),
            res_h: T.handle,
            y_h: T.handle,
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, kx), "float32")
            res = T.match_buffer(res_h, (m, n), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, qw, sc, mn, res, y, m)

        return matmul_q4.with_attr("global_symbol", symbol)

    @T.prim_func
    def matmul_q8(
        x_h: T.handle,
        qw: T.Buffer(codes, code_dtype),
        sc: T.Buffer(scales, "float16"),
        res_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, kx), "float32")
        res = T.match_buffer(res_h, (m, n), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        body(x, qw, sc, sc, res, y, m)

    return matmul_q8.with_attr("global_symbol", symbol)


def _entry_gamma(
    body: Any, k: int, n: int, codes: tuple, code_dtype: str, scales: tuple, q4: bool, symbol: str, gamma_dtype: str
) -> tirx.PrimFunc:
    """`_entry` with a second input after x, ``gamma [k]`` (the RMSNorm prologue's weight)."""
    if q4:  # only the variant asked for is parsed, as in `_entry`

        @T.prim_func
        def matmul_q4(
            x_h: T.handle,
            gamma: T.Buffer((k,), gamma_dtype),
            qw: T.Buffer(codes, code_dtype),
            sc: T.Buffer(scales, "float16"),
            mn: T.Buffer(scales, "float16"),
            y_h: T.handle,
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            body(x, qw, sc, mn, y, m, gamma)

        return matmul_q4.with_attr("global_symbol", symbol)

    @T.prim_func
    def matmul_q8(
        x_h: T.handle,
        gamma: T.Buffer((k,), gamma_dtype),
        qw: T.Buffer(codes, code_dtype),
        sc: T.Buffer(scales, "float16"),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        body(x, qw, sc, sc, y, m, gamma)

    return matmul_q8.with_attr("global_symbol", symbol)
