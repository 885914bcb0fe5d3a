"""Decode attention over the paged KV cache, vectorized and split across threads.

TVM's `TIRPagedKVCache` ships a CPU decode kernel (``_attention_decode_cpu``) that walks one
head and one cached token at a time with scalar loops and an online softmax: about 2 ms of a
14 ms SmolLM2 step at 20 tokens of context and 11 ms at 520 (DESIGN.md). This kernel has the
same signature and results for the case edgert builds (RoPE applied before the cache, no
sliding window): heads go to threads, q·k and p·v run as vectors over the head dimension,
and the softmax is computed in two passes over a score row instead of rescaling the output
for every token. `use_fast_decode_attention` swaps it into an exported module.

The same holds for a few new tokens over a cached prefix (a speculative verify pass, a batch of
drafts): TVM's ``batch_prefill_paged_kv_cpu`` walks heads and tokens serially with scalar loops
and an online softmax, 16 of a SmolLM2 verify pass's 46 ms over 5 tokens at 64 tokens of context
(loaded machine), and ``batch_prefill_ragged_kv`` (the new tokens among themselves) likewise.
`paged_prefill_attention` and `ragged_prefill_attention` compute them as the decode kernel does,
one (token, head) pair per task, with the causal mask cutting each token's row of scores.

A verify pass of up to a page of tokens no longer takes that path on the host: it runs as decode
rows of one sequence (`rows_append`, then `paged_decode_attention` with each row masked to its
position), so that each row's logits are a decode step's bit for bit; the prefill kernels serve
prompts, scoring and longer chunks. Those rows go as tasks of up to 8 rows per KV head
(`_rows_tile`), which read each page they all see once for all their queries.

In the model the pages are cold (the weights stream through the caches between steps): the passes
prefetch each row's key and value 32 rows ahead, since pages are 4 KiB blocks in no order and the
hardware prefetcher starts over at each (the row tiles fetch the keys in their keys' pass and the
values in their values' pass, so neither pass waits on both).
"""

from __future__ import annotations

import math
from typing import Any

from tvm import DataType, IRModule, tirx
from tvm.script import tirx as T

from edgert.compiler.kernels.fastmath import fast_exp2
from edgert.compiler.kernels.intrin import prefetch

DECODE_KERNEL = "batch_decode_paged_kv_cpu"  # the name of TIRPagedKVCache's CPU decode kernel in the module
PREFILL_KERNEL = "batch_prefill_paged_kv_cpu"  # its CPU prefill kernel over the pages (no sliding window)
RAGGED_KERNEL = "batch_prefill_ragged_kv"  # its CPU prefill kernel of new tokens among themselves
APPEND_KERNEL = "tir_kv_cache_transpose_append"  # its copy of new keys and values into the pages
ROPE_KERNEL = "fused_rope"  # its split of the fused q/k/v projection, with RoPE on q and k
LANES = 16
EXP_LANES = 16  # rows whose exps `_paged_rows` takes in one vector
# Fewer (row, KV head) tasks than this run as (row, head) tasks, with the same sums. Alone the kernel
# favours tiles even for a SmolLM2 decode step (3 KV heads: 3.9 against 6.1 us at 128 keys, one thread,
# tools/bench_attention.py), but in the model that step's attention call took 0.68 ms against 0.51
# (`edgert bench --verify-rows 5 --operators -t 1`, loaded, 2026-12-05). The benchmark ran on hot
# pages; in the model the weights (96 MB a step) evict them, and on cold pages (`--cold`) tiles
# gain nothing: the pass waits on memory, and 3 tasks leave one of 2 threads half idle.
TILE_TASKS = 4
SERIAL_ROPE = 4  # tokens `fused_rope` splits on the calling thread rather than in a pool launch
ROWS_PER_TASK = 8  # rows of one sequence that `_rows_tile` takes in one task (each with its KV head's queries)
AHEAD = 32  # rows a key pass prefetches ahead: two pages of 16


def _dtype(x: Any) -> str:
    """An expression's dtype (a load's is its type)."""
    dtype = getattr(x, "dtype", None)
    return str(dtype if dtype is not None else x.ty)


def _f32(x: Any) -> Any:
    """A key, value or query element as float32: the sums run in float32 whatever the cache stores."""
    return x if _dtype(x) == "float32" else T.Cast("float32", x)


def _bytes(dtype: str) -> int:
    """Bytes an element of ``dtype`` (the KV cache's: float32 or float16)."""
    return DataType(dtype).bits // 8


def _to(buffer: Any, x: Any) -> Any:
    """``x`` (float32) as an element of ``buffer`` (the cache's dtype)."""
    return x if _dtype(x) == str(buffer.dtype) else T.Cast(str(buffer.dtype), x)


def _lane_sum(part: Any, lanes: int, op: Any = None) -> Any:
    """The sum (or ``op``) of ``part[0 .. lanes - 1]`` as a tree of halves (lane v with lane v + lanes
    / 2, ...): four dependent adds for 16 lanes where a running sum took sixteen."""
    vals = [part[v] for v in range(lanes)]
    while len(vals) > 1:
        half = len(vals) // 2
        vals = [op(vals[v], vals[v + half]) if op else vals[v] + vals[v + half] for v in range(half)] + vals[2 * half :]
    return vals[0]


def _paged_rows(d: int, lanes: int, page_size: int, g: int = 1, window: bool = True, elem: int = 4) -> Any:
    """The two passes of one (query, head) over rows ``lo`` .. ``hi`` - 1 of a sequence's pages: each
    score ``qs·k`` into ``scores`` and their maximum into ``stat[0]``, then ``out = sum exp2(score -
    max) v`` and the sum of the exps into ``stat[1]``. Row r lives at position r before ``sink`` and
    at r - sink + start after it (TVM's sliding-window layout; ``sink = hi``, ``start = 0``: row r
    at position r). Every paged kernel below runs it, and the ragged one `_softmax_rows` with
    keys and values read from its arrays, so their rows sum in one order (a prompt's keys and
    values are those decode rows would write).

    No value is carried from one row to the next through memory at every row (the local buffers
    live in the thread's workspace, where LLVM keeps them, and each row waited on the last one's
    store): the maximum is taken 16 rows at a time after the scores, the exps 16 at a time with
    `fast_exp2` (``T.exp2`` called ``exp2f`` once per row), and ``out`` gathers 4 rows a step.
    The rows past the last whole chunk go one by one with the same arithmetic; a row's result
    depends on its own ``lo`` and ``hi`` only, so a verify row is still its decode step bit for bit.
    """

    def at(page_values: Any, first: Any, sink: Any, start: Any, r: Any) -> tuple[Any, Any]:
        # Without a window row r is at position r: the compiler then sees a block of 16 rows from 0 as
        # one page (one table read, no per-row select and gather of page numbers).
        pos = T.if_then_else(r < sink, r, r - sink + start) if window else r
        return page_values[first + pos // page_size], pos % page_size

    def key(pages: Any, page_values: Any, first: Any, kv: Any, sink: Any, start: Any, r: Any, i: Any) -> Any:
        page, slot = at(page_values, first, sink, start, r)
        return pages[page, 0, kv, slot, i]

    def value(pages: Any, page_values: Any, first: Any, kv: Any, sink: Any, start: Any, r: Any, i: Any) -> Any:
        page, slot = at(page_values, first, sink, start, r)
        return pages[page, 1, kv, slot, i]

    return _softmax_rows(d, lanes, key, value, g, elem)


def _lane_sums_16() -> Any:
    """``scores[at + r] = _lane_sum(pb[base + 16 r .. base + 16 r + 15])`` for 16 rows r, as vector adds of
    shuffled rows: the tree's step of width w adds, for every row, lane v and lane v + w (v < w) as
    `_lane_sum` does, two rows per vector at w = 8, four at 4, eight at 2, sixteen at 1, so each sum
    is the same adds of the same values (15 adds and their shuffles for 16 rows, not 16 reductions)."""
    n = LANES
    s1x = [v for v in range(8)] + [16 + v for v in range(8)]  # rows r, s: lanes 0..7 of each
    s2x = [8 * m + v for m in range(4) for v in range(4)]  # four rows' 8 lanes: their first 4
    s3x = [4 * m + v for m in range(8) for v in range(2)]
    s4x = [2 * m for m in range(16)]
    s1y, s2y, s3y, s4y = [x + 8 for x in s1x], [x + 4 for x in s2x], [x + 2 for x in s3x], [x + 1 for x in s4x]

    @T.macro
    def lane_sums(pb, base, scores, at):
        a = T.alloc_buffer((8 * n,), "float32", scope="local")
        b = T.alloc_buffer((4 * n,), "float32", scope="local")
        c = T.alloc_buffer((2 * n,), "float32", scope="local")
        for p in T.unroll(8):
            a[T.Ramp(p * n, 1, n)] = T.Shuffle(
                [pb[T.Ramp(base + 2 * p * n, 1, n)], pb[T.Ramp(base + (2 * p + 1) * n, 1, n)]], s1x
            ) + T.Shuffle([pb[T.Ramp(base + 2 * p * n, 1, n)], pb[T.Ramp(base + (2 * p + 1) * n, 1, n)]], s1y)
        for p in T.unroll(4):
            b[T.Ramp(p * n, 1, n)] = T.Shuffle([a[T.Ramp(2 * p * n, 1, n)], a[T.Ramp((2 * p + 1) * n, 1, n)]], s2x) + (
                T.Shuffle([a[T.Ramp(2 * p * n, 1, n)], a[T.Ramp((2 * p + 1) * n, 1, n)]], s2y)
            )
        for p in T.unroll(2):
            c[T.Ramp(p * n, 1, n)] = T.Shuffle([b[T.Ramp(2 * p * n, 1, n)], b[T.Ramp((2 * p + 1) * n, 1, n)]], s3x) + (
                T.Shuffle([b[T.Ramp(2 * p * n, 1, n)], b[T.Ramp((2 * p + 1) * n, 1, n)]], s3y)
            )
        scores[T.Ramp(at, 1, n)] = T.Shuffle([c[T.Ramp(0, 1, n)], c[T.Ramp(n, 1, n)]], s4x) + T.Shuffle(
            [c[T.Ramp(0, 1, n)], c[T.Ramp(n, 1, n)]], s4y
        )

    return lane_sums


def _softmax_parts(d: int) -> tuple[Any, Any, Any]:
    """The steps of a query's softmax that every kernel here shares, so that a verify row's output is
    its decode step's bit for bit: ``exps`` (query ``q``'s maximum over its scores ``base + lo`` ..
    ``base + hi - 1`` into ``stat[2 q]``, 16 at a time and then the rest, the scores replaced by
    their exps, its exp sum and output cleared), ``add4`` (the exp sum and output advanced by four
    rows: scores ``s .. s + 3`` and their values in ``vbuf``, added as pairs, then the pairs' sums)
    and ``add1`` (the same for one row)."""
    vl = EXP_LANES

    @T.macro
    def exps(scores, vec, stat, out, q, base, lo, hi):
        for v in T.vectorized(vl):
            vec[v] = T.float32(-3.0e38)
        for ro in range((hi - lo) // vl):
            for v in T.vectorized(vl):
                vec[v] = T.max(vec[v], scores[base + lo + ro * vl + v])
        stat[2 * q] = _lane_sum(vec, vl, T.max)
        for r in range(lo + (hi - lo) // vl * vl, hi):
            stat[2 * q] = T.max(stat[2 * q], scores[base + r])
        for ro in range((hi - lo) // vl):
            for v in T.vectorized(vl):
                scores[base + lo + ro * vl + v] = fast_exp2(scores[base + lo + ro * vl + v] - stat[2 * q])
        for r in range(lo + (hi - lo) // vl * vl, hi):
            scores[base + r] = fast_exp2(scores[base + r] - stat[2 * q])
        stat[2 * q + 1] = T.float32(0)
        for i in T.vectorized(d):
            out[q * d + i] = T.float32(0)

    @T.macro
    def add4(out, stat, scores, vbuf, q, s):
        stat[2 * q + 1] = stat[2 * q + 1] + ((scores[s] + scores[s + 1]) + (scores[s + 2] + scores[s + 3]))
        for i in T.vectorized(d):
            out[q * d + i] = out[q * d + i] + (
                (scores[s] * vbuf[i] + scores[s + 1] * vbuf[d + i])
                + (scores[s + 2] * vbuf[2 * d + i] + scores[s + 3] * vbuf[3 * d + i])
            )

    @T.macro
    def add1(out, stat, scores, vbuf, q, s):
        stat[2 * q + 1] = stat[2 * q + 1] + scores[s]
        for i in T.vectorized(d):
            out[q * d + i] = out[q * d + i] + scores[s] * vbuf[i]

    return exps, add4, add1


def _softmax_rows(d: int, lanes: int, key: Any, value: Any, g: int = 1, elem: int = 4) -> Any:
    """`_paged_rows` with row r's key and value element i read by ``key(a, b, first, kv, sink, start,
    r, i)`` and ``value(...)``: the paged kernels pass the pages and the page table as ``a``, ``b``;
    the ragged one its key and value arrays.

    ``g`` queries (the query heads of one KV head) go through the rows together: each key and value
    vector is loaded once into ``kbuf`` / ``vbuf`` and used by all of them, while each query keeps its
    own sums in the one-query order (``qs``, ``part``, ``out``, ``stat`` and ``scores`` hold query j's
    at ``j * d``, ``j * lanes``, ``j * d``, ``2 * j`` and ``j * span``), so its bits are those of ``g = 1``.
    ``elem``: bytes an element of the keys and values (4: float32, 2: float16), for the prefetches' lines.
    """
    vl = EXP_LANES
    chunks = d // lanes
    blocks = lanes == LANES
    lane_sums = _lane_sums_16()
    exps, add4, add1 = _softmax_parts(d)

    @T.macro
    def fetch(pages, page_values, first, kv, sink, start, r, hi):
        """Prefetch row ``r + AHEAD``'s key and value (clamped to the last row): pages are 4 KiB
        blocks in no order, so the hardware prefetcher starts over at every page and a cold pass
        (the model's weights evict the cache between steps) waits on memory row by row."""
        ra: T.let[T.int32] = T.min(r, hi - 1)
        for line in T.unroll(max(d * elem // 64, 1)):
            T.evaluate(prefetch(key(pages, page_values, first, kv, sink, start, ra, line * (64 // elem))))
            T.evaluate(prefetch(value(pages, page_values, first, kv, sink, start, ra, line * (64 // elem))))

    @T.macro
    def rows(pages, page_values, first, kv, lo, hi, sink, start, qs, scores, span, part, out, stat):
        vec = T.alloc_buffer((vl,), "float32", scope="local")
        kbuf = T.alloc_buffer((d,), "float32", scope="local")
        vbuf = T.alloc_buffer((4 * d,), "float32", scope="local")
        pb = T.alloc_buffer((g * LANES * LANES,), "float32", scope="local")  # query j, row rr: its 16 partial sums
        for r in range(lo, T.min(lo + AHEAD, hi)):  # the first rows, which the loops' prefetches do not reach
            fetch(pages, page_values, first, kv, sink, start, r, hi)
        if blocks:  # 16 rows at a time: each query's 16 partial sums, then their lane sums together
            for rb in range((hi - lo) // LANES):
                for rr in T.unroll(LANES):
                    fetch(pages, page_values, first, kv, sink, start, lo + rb * LANES + rr + AHEAD, hi)
                    for i in T.vectorized(d):
                        kbuf[i] = _f32(key(pages, page_values, first, kv, sink, start, lo + rb * LANES + rr, i))
                    for j in T.unroll(g):
                        for v in T.vectorized(LANES):
                            pb[(j * LANES + rr) * LANES + v] = T.float32(0)
                        for c in T.unroll(chunks):
                            for v in T.vectorized(LANES):
                                pb[(j * LANES + rr) * LANES + v] = (
                                    pb[(j * LANES + rr) * LANES + v] + qs[j * d + c * LANES + v] * kbuf[c * LANES + v]
                                )
                for j in T.unroll(g):
                    lane_sums(pb, j * LANES * LANES, scores, j * span + lo + rb * LANES)
        for r in range(lo + T.if_then_else(blocks, (hi - lo) // LANES * LANES, 0), hi):
            fetch(pages, page_values, first, kv, sink, start, r + AHEAD, hi)
            for i in T.vectorized(d):
                kbuf[i] = _f32(key(pages, page_values, first, kv, sink, start, r, i))
            for j in T.unroll(g):
                for v in T.vectorized(lanes):
                    part[j * lanes + v] = T.float32(0)
                for c in T.unroll(chunks):
                    for v in T.vectorized(lanes):
                        part[j * lanes + v] = part[j * lanes + v] + qs[j * d + c * lanes + v] * kbuf[c * lanes + v]
                scores[j * span + r] = _lane_sum([part[j * lanes + v] for v in range(lanes)], lanes)
        for j in T.unroll(g):
            exps(scores, vec, stat, out, j, j * span, lo, hi)
        for ro in range((hi - lo) // 4):
            r0: T.let[T.int32] = lo + ro * 4
            for u in T.unroll(4):
                for i in T.vectorized(d):
                    vbuf[u * d + i] = _f32(value(pages, page_values, first, kv, sink, start, r0 + u, i))
            for j in T.unroll(g):
                s: T.let[T.int32] = j * span + r0
                add4(out, stat, scores, vbuf, j, s)
        for r in range(lo + (hi - lo) // 4 * 4, hi):
            for i in T.vectorized(d):
                vbuf[i] = _f32(value(pages, page_values, first, kv, sink, start, r, i))
            for j in T.unroll(g):
                add1(out, stat, scores, vbuf, j, j * span + r)

    return rows


def _head_task(d: int, lanes: int, g: int, softmax_rows: Any) -> Any:
    """The per-task prologue and epilogue every kernel here puts around `_softmax_rows`: queries
    ``q[t, h0 .. h0 + g - 1]`` scaled by ``sm_scale * log2(e)``, their outputs normalized into
    ``output[t, h0 ..]`` and their log2-sum-exps into ``lse[t, h0 ..]`` (``empty`` where no row is visible)."""
    log2e = math.log2(math.e)

    @T.macro
    def task(q, t, h0, output, lse, pages, page_values, first, kv, lo, hi, sink, start, span, sm_scale, empty):
        scores = T.alloc_buffer((g * span,), "float32")
        qs = T.alloc_buffer((g * d,), "float32", scope="local")
        part = T.alloc_buffer((g * lanes,), "float32", scope="local")
        out = T.alloc_buffer((g * d,), "float32", scope="local")
        stat = T.alloc_buffer((2 * g,), "float32", scope="local")  # per query: max, sum of exps
        for j in T.unroll(g):
            for i in T.vectorized(d):
                qs[j * d + i] = _f32(q[t, h0 + j, i]) * sm_scale * T.float32(log2e)
        softmax_rows(pages, page_values, first, kv, lo, hi, sink, start, qs, scores, span, part, out, stat)
        for j in T.unroll(g):
            for i in T.vectorized(d):  # no visible row: zeros, as TVM's kernels give
                output[t, h0 + j, i] = _to(output, out[j * d + i] / T.max(stat[2 * j + 1], T.float32(1e-30)))
            lse[t, h0 + j] = T.if_then_else(
                hi > lo, stat[2 * j] + T.log2(T.max(stat[2 * j + 1], T.float32(1e-30))), empty
            )

    return task


def _rows_tile(d: int, page_size: int, g: int, most: int, elem: int = 4) -> Any:
    """One task for up to ``most`` rows of one sequence (a verify pass run as decode rows) and one KV
    head: its ``n`` rows x ``g`` query heads, whose keys and values are one set of pages, each row
    seeing a prefix of them (``lens``, each row's length).

    Each page of the rows all of them see (``common``: whole 16-row blocks, hence whole groups of 4)
    is read once for all the queries (its keys from L1 after the first query), instead of once per
    row (the row tiles of `_paged_rows` read all the pages for each row: at 5 rows most of a verify
    pass's attention). Each query's sums are `_paged_rows`' for its row, in the same order, with the
    same expressions: blocks of 16 scores from 0 and the rows after the last block one by one, the
    maximum, the exps in vectors of 16 from 0, then groups of 4 values from 0 and the last rows one by
    one; so every row is its decode step bit for bit."""
    log2e = math.log2(math.e)
    lane_sums = _lane_sums_16()
    exps, add4, add1 = _softmax_parts(d)
    chunks = d // LANES
    nq = most * g

    def key(pages: Any, page: Any, kv: Any, slot: Any, i: Any) -> Any:
        return pages[page, 0, kv, slot, i]

    @T.macro
    def fetch_row(pages, page_values, first, kv, part, r):
        """Prefetch row ``r``'s key (``part`` 0) or value (1): its 4 cache lines."""
        at: T.let[T.int32] = page_values[first + r // page_size]
        for line in T.unroll(max(d * elem // 64, 1)):
            T.evaluate(prefetch(pages[at, part, kv, r % page_size, line * (64 // elem)]))

    @T.macro
    def task(q, b0, n, kv, lens, output, lse, pages, page_values, first, span, sm_scale):
        scores = T.alloc_buffer((nq * span,), "float32")
        qs = T.alloc_buffer((nq * d,), "float32", scope="local")
        out = T.alloc_buffer((nq * d,), "float32", scope="local")
        stat = T.alloc_buffer((2 * nq,), "float32", scope="local")  # per query: max, sum of exps
        pb = T.alloc_buffer((LANES * LANES,), "float32", scope="local")
        part = T.alloc_buffer((LANES,), "float32", scope="local")
        kbuf = T.alloc_buffer((d,), "float32", scope="local")
        vbuf = T.alloc_buffer((4 * d,), "float32", scope="local")
        vec = T.alloc_buffer((EXP_LANES,), "float32", scope="local")
        low = T.alloc_buffer((2,), "int32", scope="local")  # the fewest and the most rows a query sees
        low[0] = lens[0]
        low[1] = lens[0]
        for u in range(1, n):
            low[0] = T.min(low[0], lens[u])
            low[1] = T.max(low[1], lens[u])
        common: T.let[T.int32] = low[0] // LANES * LANES  # rows every query sees, in whole blocks
        for u in range(n * g):
            for i in T.vectorized(d):
                qs[u * d + i] = _f32(q[b0 + u // g, kv * g + u % g, i]) * sm_scale * T.float32(log2e)
        # Scores of the common blocks: a page's keys once from memory, then from L1 for each query.
        for rb in range(common // LANES):
            page: T.let[T.int32] = page_values[first + rb]
            for rr in T.unroll(LANES):  # the keys AHEAD rows on (see `_paged_rows`; the values in their pass)
                fetch_row(pages, page_values, first, kv, 0, T.min(rb * LANES + rr + AHEAD, low[1] - 1))
            for u in range(n * g):
                for rr in T.unroll(LANES):
                    for v in T.vectorized(LANES):
                        pb[rr * LANES + v] = T.float32(0)
                    for c in T.unroll(chunks):
                        for v in T.vectorized(LANES):
                            pb[rr * LANES + v] = pb[rr * LANES + v] + qs[u * d + c * LANES + v] * _f32(
                                key(pages, page, kv, rr, c * LANES + v)
                            )
                lane_sums(pb, 0, scores, u * span + rb * LANES)
        for u in range(n * g):
            hi: T.let[T.int32] = lens[u // g]
            for rb in range(common // LANES, hi // LANES):  # this row's further blocks, as `_paged_rows`
                for rr in T.unroll(LANES):
                    for i in T.vectorized(d):
                        kbuf[i] = _f32(key(pages, page_values[first + rb], kv, rr, i))
                    for v in T.vectorized(LANES):
                        pb[rr * LANES + v] = T.float32(0)
                    for c in T.unroll(chunks):
                        for v in T.vectorized(LANES):
                            pb[rr * LANES + v] = pb[rr * LANES + v] + qs[u * d + c * LANES + v] * kbuf[c * LANES + v]
                lane_sums(pb, 0, scores, u * span + rb * LANES)
            for r in range(hi // LANES * LANES, hi):
                for i in T.vectorized(d):
                    kbuf[i] = _f32(key(pages, page_values[first + r // page_size], kv, r % page_size, i))
                for v in T.vectorized(LANES):
                    part[v] = T.float32(0)
                for c in T.unroll(chunks):
                    for v in T.vectorized(LANES):
                        part[v] = part[v] + qs[u * d + c * LANES + v] * kbuf[c * LANES + v]
                scores[u * span + r] = _lane_sum([part[v] for v in range(LANES)], LANES)
            exps(scores, vec, stat, out, u, u * span, 0, hi)
        # Values of the common rows, 4 at a time, once for all the queries. Each pass prefetches its
        # own half of the rows AHEAD on: with the keys' pass fetching the values too, that pass waited
        # on twice the memory while the values' pass ran on cached rows (cold pages, one thread, 5 rows
        # at 128 and 256 keys: 53.5 -> 47.0 and 96.2 -> 80.4 us, `tools/bench_attention.py --cold --cpu`).
        for r in range(T.min(AHEAD, low[1])):
            fetch_row(pages, page_values, first, kv, 1, r)
        for ro in range(common // 4):
            r0: T.let[T.int32] = ro * 4
            page: T.let[T.int32] = page_values[first + r0 // page_size]
            for w in T.unroll(4):
                fetch_row(pages, page_values, first, kv, 1, T.min(r0 + w + AHEAD, low[1] - 1))
            for w in T.unroll(4):
                for i in T.vectorized(d):
                    vbuf[w * d + i] = _f32(pages[page, 1, kv, r0 % page_size + w, i])
            for u in range(n * g):
                s: T.let[T.int32] = u * span + r0
                add4(out, stat, scores, vbuf, u, s)
        for u in range(n * g):
            hi: T.let[T.int32] = lens[u // g]
            for ro in range(common // 4, hi // 4):
                r0: T.let[T.int32] = ro * 4
                for w in T.unroll(4):
                    for i in T.vectorized(d):
                        vbuf[w * d + i] = _f32(
                            pages[page_values[first + (r0 + w) // page_size], 1, kv, (r0 + w) % page_size, i]
                        )
                s: T.let[T.int32] = u * span + r0
                add4(out, stat, scores, vbuf, u, s)
            for r in range(hi // 4 * 4, hi):
                for i in T.vectorized(d):
                    vbuf[i] = _f32(pages[page_values[first + r // page_size], 1, kv, r % page_size, i])
                add1(out, stat, scores, vbuf, u, u * span + r)
            for i in T.vectorized(d):  # no visible row: zeros, as TVM's kernels give
                output[b0 + u // g, kv * g + u % g, i] = _to(
                    output, out[u * d + i] / T.max(stat[2 * u + 1], T.float32(1e-30))
                )
            lse[b0 + u // g, kv * g + u % g] = T.if_then_else(
                hi > 0, stat[2 * u] + T.log2(T.max(stat[2 * u + 1], T.float32(1e-30))), T.float32(-3.0e38)
            )

    return task


def paged_decode_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, page_size: int = 16, dtype: str = "float32"
) -> tirx.PrimFunc:
    """``output[b, h] = softmax(q·K^T * sm_scale) V`` over sequence b's pages; also its log2-sum-exp."""
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1
    tiled = _head_task(d, lanes, group, _paged_rows(d, lanes, page_size, group, window=False, elem=_bytes(dtype)))
    shared = _rows_tile(d, page_size, group, ROWS_PER_TASK if lanes == LANES else 1, _bytes(dtype))
    single = _head_task(d, lanes, 1, _paged_rows(d, lanes, page_size, window=False, elem=_bytes(dtype)))

    @T.prim_func
    def decode(
        q_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (batch, h_qo, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        last_page_len = T.match_buffer(length_info_handle, (batch,), "int32", elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (batch, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (batch, h_qo), "float32")
        # edgert's caches apply RoPE before storing k (RopeMode.NORMAL), so rotary_mode is 0 here.
        assert rotary_mode == 0, "edgert's decode attention expects RoPE applied before the cache"
        for b in range(batch):  # rows of one sequence: move the keys and values `rows_append` parked
            first: T.let[T.int32] = page_indptr[b]
            n_pages: T.let[T.int32] = page_indptr[b + 1] - first
            full: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
            back: T.let[T.int32] = full - 1 - (q_rope_position[b] - k_rope_pos_offset[b])  # rows after b's
            if back > 0 and back > (full - 1) % page_size:
                for j, i in T.grid(h_kv, d):
                    for kv_part in range(2):
                        pages[
                            page_values[first + (full - 1 - back) // page_size],
                            kv_part,
                            j,
                            (full - 1 - back) % page_size,
                            i,
                        ] = pages[
                            page_values[first + n_pages - 1], kv_part, j, (full - 1) % page_size - back + page_size, i
                        ]
        # Rows of one sequence (entry 0 sits before its sequence's end) share their keys and values: they go
        # as (KV head, up to ROWS_PER_TASK rows) tasks of `_rows_tile` (head sizes of whole 16-lane
        # vectors; else (row, KV head) tiles). Separate sequences (a server's batch) and decode steps
        # keep (row, head) tasks: their pages are cold in the model, where a pass is memory-bound and
        # sharing loads gains nothing (`tools/bench_attention.py --cold`, 4 sequences of 256 tokens at
        # 2 threads: 35.6 us as (sequence, KV head) tasks against 32.6, loaded, 2026-12-05).
        n0: T.let[T.int32] = page_indptr[1] - page_indptr[0]
        full0: T.let[T.int32] = T.if_then_else(n0 > 0, (n0 - 1) * page_size + last_page_len[0], 0)
        blocks: T.let[T.int32] = (batch + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        per_block: T.let[T.int32] = (batch + blocks - 1) // blocks  # rows a task: as even as they go
        # The path through memory: as nested conditions, the else branches' negations made
        # CompactBufferAllocation take a minute over the tasks' buffers; a load is opaque to it.
        path = T.alloc_buffer((1,), "int32", scope="local")
        path[0] = 0  # separate sequences or a decode step: (row, head) tasks
        if q_rope_position[0] - k_rope_pos_offset[0] < full0 - 1:  # rows of one sequence
            if batch > 1 and lanes == LANES:
                path[0] = 2
            elif batch * h_kv >= TILE_TASKS:
                path[0] = 1
        if path[0] == 2:
            # KV head-major, so that a thread's consecutive tasks share a KV head's pages
            for kb in T.parallel(h_kv * blocks):
                b0: T.let[T.int32] = kb % blocks * per_block
                n: T.let[T.int32] = T.min(per_block, batch - b0)
                lens = T.alloc_buffer((ROWS_PER_TASK,), "int32", scope="local")
                for u in range(n):
                    nu: T.let[T.int32] = page_indptr[b0 + u + 1] - page_indptr[b0 + u]
                    fu: T.let[T.int32] = T.if_then_else(nu > 0, (nu - 1) * page_size + last_page_len[b0 + u], 0)
                    lens[u] = T.max(T.min(fu, q_rope_position[b0 + u] - k_rope_pos_offset[b0 + u] + 1), 0)
                shared(
                    q,
                    b0,
                    n,
                    kb // blocks,
                    lens,
                    output,
                    lse,
                    pages,
                    page_values,
                    page_indptr[b0],
                    nnz_pages * page_size,
                    sm_scale,
                )
        elif path[0] == 1:
            for bk in T.parallel(batch * h_kv):
                b: T.let[T.int32] = bk // h_kv
                first: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - first
                full: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
                # A query sees the positions up to its own: all of them in a decode step; in a verify pass
                # run as rows of one sequence (`rows_append`), each row the prefix and the rows before it.
                length: T.let[T.int32] = T.max(T.min(full, q_rope_position[b] - k_rope_pos_offset[b] + 1), 0)
                tiled(
                    q,
                    b,
                    bk % h_kv * group,
                    output,
                    lse,
                    pages,
                    page_values,
                    first,
                    bk % h_kv,
                    0,
                    length,
                    length,
                    0,
                    nnz_pages * page_size,
                    sm_scale,
                    T.float32(-3.0e38),
                )
        else:  # too few tasks for the threads: (row, head) ones, with the same sums
            # Head-major: the pool hands each thread a contiguous run of tasks, so sequence-major runs
            # gave one thread the short sequences of a server's batch and the other the long ones
            # (4 sequences of 30, 80, 150 and 210 tokens: one thread waited on the other).
            for hb in T.parallel(batch * h_qo):
                b: T.let[T.int32] = hb % batch
                bh: T.let[T.int32] = b * h_qo + hb // batch
                first: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - first
                full: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
                length: T.let[T.int32] = T.max(T.min(full, q_rope_position[b] - k_rope_pos_offset[b] + 1), 0)
                single(
                    q,
                    b,
                    bh % h_qo,
                    output,
                    lse,
                    pages,
                    page_values,
                    first,
                    bh % h_qo // group,
                    0,
                    length,
                    length,
                    0,
                    nnz_pages * page_size,
                    sm_scale,
                    T.float32(-3.0e38),
                )

    return decode.with_attr("global_symbol", "edgert_paged_decode_attention")


def _zigzag(p: Any, n: Any) -> Any:
    """Token ``p`` of ``n`` in the order 0, n - 1, 1, n - 2, ...: a causal token's row grows with its index,
    and the pool hands each thread a contiguous run of tasks, so in index order the thread with the
    later tokens did three times the other's work; in this order each pair of tasks costs the same."""
    return T.if_then_else(p % 2 == 0, p // 2, n - 1 - p // 2)


def paged_prefill_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, page_size: int = 16, dtype: str = "float32"
) -> tirx.PrimFunc:
    """``output[t, h] = softmax(q·K^T * sm_scale) V`` for every new token t of a sequence over its pages,
    causal (token t of n new ones sees all but the last n - 1 - t cached tokens) when ``causal``;
    also the log2-sum-exp. The signature of TIRPagedKVCache's ``batch_prefill_paged_kv_cpu``."""
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1
    task = _head_task(d, lanes, group, _paged_rows(d, lanes, page_size, group, window=False, elem=_bytes(dtype)))

    @T.prim_func
    def prefill(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (total_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        last_page_len = T.match_buffer(length_info_handle, (batch,), "int32", elem_offset=length_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (total_len, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (total_len, h_qo), "float32")
        assert rotary_mode == 0, "edgert's prefill attention expects RoPE applied before the cache"
        for b in range(batch):
            first: T.let[T.int32] = page_indptr[b]
            n_pages: T.let[T.int32] = page_indptr[b + 1] - first
            kv_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
            q0: T.let[T.int32] = q_indptr[b]
            qo_len: T.let[T.int32] = q_indptr[b + 1] - q0
            for tk in T.parallel(qo_len * h_kv):  # (token, KV head) pairs: its query heads share the loads
                t: T.let[T.int32] = _zigzag(tk // h_kv, qo_len)
                length: T.let[T.int32] = T.if_then_else(
                    causal > 0, T.max(T.min(kv_len - qo_len + t + 1, kv_len), 0), kv_len
                )
                # no visible token: zeros, and a log-sum-exp merging to nothing
                task(
                    q,
                    q0 + t,
                    tk % h_kv * group,
                    output,
                    lse,
                    pages,
                    page_values,
                    first,
                    tk % h_kv,
                    0,
                    length,
                    length,
                    0,
                    kv_len,
                    sm_scale,
                    T.float32(-5e4),
                )

    return prefill.with_attr("global_symbol", "edgert_paged_prefill_attention")


def ragged_prefill_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str = "float32"
) -> tirx.PrimFunc:
    """``output[t, h] = softmax(q·K^T * sm_scale) V`` of new tokens over new keys and values (not yet in
    pages), causal when ``causal``; also the log2-sum-exp. The signature of TIRPagedKVCache's
    CPU ``batch_prefill_ragged_kv``, whose scalar loops cost as much as the paged part."""
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1

    def key(k: Any, v: Any, k0: Any, kv: Any, sink: Any, start: Any, r: Any, i: Any) -> Any:
        return k[k0 + r, kv, i]

    def value(k: Any, v: Any, k0: Any, kv: Any, sink: Any, start: Any, r: Any, i: Any) -> Any:
        return v[k0 + r, kv, i]

    task = _head_task(d, lanes, group, _softmax_rows(d, lanes, key, value, group, _bytes(dtype)))

    @T.prim_func
    def ragged(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        kv_indptr_handle: T.handle,
        q_rope_position_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        qo_total = T.int32()
        kv_total = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(q_handle, (qo_total, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(k_handle, (kv_total, h_kv, d), dtype)
        v = T.match_buffer(v_handle, (kv_total, h_kv, d), dtype)
        kv_indptr = T.match_buffer(kv_indptr_handle, (batch + 1,), "int32", elem_offset=kv_indptr_offset)
        T.match_buffer(q_rope_position_handle, (qo_total,), "int32", elem_offset=q_rope_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(output_handle, (qo_total, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (qo_total, h_qo), "float32")
        assert rotary_mode == 0, "edgert's ragged attention expects RoPE applied before the cache"
        for b in range(batch):
            q0: T.let[T.int32] = q_indptr[b]
            qo_len: T.let[T.int32] = q_indptr[b + 1] - q0
            k0: T.let[T.int32] = kv_indptr[b]
            kv_len: T.let[T.int32] = kv_indptr[b + 1] - k0
            for tk in T.parallel(qo_len * h_kv):  # (token, KV head) pairs: its query heads share the loads
                t: T.let[T.int32] = _zigzag(tk // h_kv, qo_len)
                length: T.let[T.int32] = T.if_then_else(
                    causal > 0, T.max(T.min(kv_len - qo_len + t + 1, kv_len), 0), kv_len
                )
                task(
                    q,
                    q0 + t,
                    tk % h_kv * group,
                    output,
                    lse,
                    k,
                    v,
                    k0,
                    tk % h_kv,
                    0,
                    length,
                    length,
                    0,
                    kv_len,
                    sm_scale,
                    T.float32(-5e4),
                )

    return ragged.with_attr("global_symbol", "edgert_ragged_prefill_attention")


def fused_rope(
    theta: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str = "float32"
) -> tirx.PrimFunc:
    """Split ``qkv[s, heads, d]`` into q, k, v with Llama's RoPE (rotate-half, no scaling) on q and k.

    TVM's ``fused_rope`` (``llama_rope_with_position_map``) computes ``theta ** (2i / d)``, a cosine and a
    sine for every element of every head, serially: about 1.2 ms of a 6.5 ms SmolLM2 decode step
    (2-core znver5, `perf`). Here each token's ``d / 2`` angles are computed once, with the same
    expression, and shared by all heads; tokens go to threads.
    """
    fused, half, d = num_q_heads + 2 * num_kv_heads, head_dim // 2, head_dim

    @T.macro
    def token(qkv, position_map, q, k, v, apply_rope, s):
        cs = T.alloc_buffer((half,), "float32", scope="local")
        sn = T.alloc_buffer((half,), "float32", scope="local")
        for i in range(half):
            if apply_rope > 0:  # TVM's angle: position / theta ** ((2 i % d) / d)
                cs[i] = T.cos(
                    T.Cast("float32", position_map[s])
                    / T.pow(T.float32(theta), T.Cast("float32", i * 2) / T.float32(d))
                )
                sn[i] = T.sin(
                    T.Cast("float32", position_map[s])
                    / T.pow(T.float32(theta), T.Cast("float32", i * 2) / T.float32(d))
                )
            else:
                cs[i] = T.float32(1)
                sn[i] = T.float32(0)
        for h in range(num_q_heads + num_kv_heads):
            for j in T.vectorized(half):
                if h < num_q_heads:
                    q[s, h, j] = _to(q, cs[j] * _f32(qkv[s, h, j]) - sn[j] * _f32(qkv[s, h, j + half]))
                    q[s, h, j + half] = _to(q, cs[j] * _f32(qkv[s, h, j + half]) + sn[j] * _f32(qkv[s, h, j]))
                else:
                    k[s, h - num_q_heads, j] = _to(k, cs[j] * _f32(qkv[s, h, j]) - sn[j] * _f32(qkv[s, h, j + half]))
                    k[s, h - num_q_heads, j + half] = _to(
                        k, cs[j] * _f32(qkv[s, h, j + half]) + sn[j] * _f32(qkv[s, h, j])
                    )
        for h, j in T.grid(num_kv_heads, d):
            v[s, h, j] = qkv[s, num_q_heads + num_kv_heads + h, j]

    @T.prim_func
    def rope(
        qkv_handle: T.handle,
        position_map_handle: T.handle,
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        seq_len = T.int32()
        position_offset = T.int32()
        qkv = T.match_buffer(qkv_handle, (seq_len, fused, d), dtype)
        position_map = T.match_buffer(position_map_handle, (seq_len,), "int32", elem_offset=position_offset)
        q = T.match_buffer(q_handle, (seq_len, num_q_heads, d), dtype)
        k = T.match_buffer(k_handle, (seq_len, num_kv_heads, d), dtype)
        v = T.match_buffer(v_handle, (seq_len, num_kv_heads, d), dtype)
        # A decode step's token alone: a pool launch (~1.5 us at 2 threads, 30 a step) costs more than
        # the work (~0.4 us a token), so up to SERIAL_ROPE tokens run on the calling thread.
        if seq_len <= SERIAL_ROPE:
            for s in range(seq_len):
                token(qkv, position_map, q, k, v, apply_rope, s)
        else:
            for s in T.parallel(seq_len):
                token(qkv, position_map, q, k, v, apply_rope, s)

    return rope.with_attr("global_symbol", "edgert_fused_rope")


def rows_append(num_kv_heads: int, head_dim: int, page_size: int = 16, dtype: str = "float32") -> tirx.PrimFunc:
    """TIRPagedKVCache's ``tir_kv_cache_transpose_append``: new keys and values into their page slots.

    A verify pass can run as a decode step whose rows are one sequence's consecutive tokens (the
    cache is told the sequence id once per row, `PagedKVCache.begin_rows`), so each row's attention
    is a decode row's, bit for bit. The cache then gives all n rows the slot of the last one; row
    n - 1 - k belongs k positions before it. Where that is on the same page it is written there,
    else to the page's k-th slot from the end, past the sequence (n <= page_size), and
    `paged_decode_attention` moves it to the page before. Distinct slots (every other step) are
    written as TVM's kernel writes them.
    """
    h_kv, d = num_kv_heads, head_dim

    @T.prim_func
    def append(pages_handle: T.handle, k_handle: T.handle, v_handle: T.handle, position_map_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        ntoken = T.int64()
        num_pages = T.int64()
        pages_offset = T.int64()
        map_offset = T.int32()
        pages = T.match_buffer(pages_handle, (num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_offset)
        k = T.match_buffer(k_handle, (ntoken, h_kv, d), dtype)
        v = T.match_buffer(v_handle, (ntoken, h_kv, d), dtype)
        position_map = T.match_buffer(position_map_handle, (ntoken,), "int32", elem_offset=map_offset)
        for t in range(ntoken):
            later = T.alloc_buffer((1,), "int32", scope="local")  # rows after t given the same slot
            later[0] = 0
            for j in range(1, page_size):
                if t + j < ntoken:
                    if position_map[t + j] == position_map[t]:
                        later[0] = later[0] + 1
            slot: T.let[T.int32] = position_map[t]
            if slot != -1:
                page: T.let[T.int32] = slot // page_size
                at: T.let[T.int32] = (slot % page_size - later[0] + page_size) % page_size
                for h, i in T.grid(h_kv, d):
                    pages[page, 0, h, at, i] = k[t, h, i]
                    pages[page, 1, h, at, i] = v[t, h, i]

    return append.with_attr("global_symbol", "edgert_rows_append")


# The kernel TIRPagedKVCache calls for a tree pass over the pages. TVM 0.27's CPU cache lists its two
# tree kernels in the other order than its C++ reads them (argument 20 is the pages' one), so the
# cache calls the ragged kernel (``batch_tree_attn``) with the paged kernel's 16 arguments; that is
# the one replaced. (The other is never reached: edgert's tree passes append before attention.)
TREE_KERNEL = "batch_tree_attn"
MAX_TREE = 256  # TVM's kTreeAttnMaxTreeSize: the most nodes of a token tree


def paged_tree_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, page_size: int = 16, dtype: str = "float32"
) -> tirx.PrimFunc:
    """TIRPagedKVCache's tree pass over the pages (``tree_attn_paged_kv_cpu``), as decode steps of each
    node's path: node a of a token tree attends to the prefix and then its ancestors and itself, in
    that order, through the same `_softmax_rows` as `paged_decode_attention`, so each node's output is
    the decode step's at the end of its path bit for bit.

    TVM's kernel visits the tree's rows in their slot order with a mask and an online softmax (and
    its ragged variant merges a second softmax in): another summation order, so the accepted path's
    logits would differ from decode's in the last bits and greedy output could drift. The cache runs
    this kernel when it appends before attention (`PagedKVCache.begin_tree`); ``tree_order`` holds each
    node's DFS interval [first, second): j is an ancestor of a (or a) iff first_j <= first_a < second_j,
    and parents come before children, so ancestors are met in depth order.
    """
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1

    def key(pages: Any, page_values: Any, first: Any, kv: Any, sink: Any, path: Any, r: Any, i: Any) -> Any:
        pos = T.if_then_else(r < sink, r, sink + path[T.max(r - sink, 0)])  # prefix rows, then the path's slots
        return pages[page_values[first + pos // page_size], 0, kv, pos % page_size, i]

    def value(pages: Any, page_values: Any, first: Any, kv: Any, sink: Any, path: Any, r: Any, i: Any) -> Any:
        pos = T.if_then_else(r < sink, r, sink + path[T.max(r - sink, 0)])
        return pages[page_values[first + pos // page_size], 1, kv, pos % page_size, i]

    task = _head_task(d, lanes, group, _softmax_rows(d, lanes, key, value, group, _bytes(dtype)))

    @T.prim_func
    def tree(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
        tree_order_indptr_handle: T.handle,
        tree_order_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        tree_total = T.int32()
        q_indptr_offset = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        order_indptr_offset = T.int32()
        order_offset = T.int32()
        q = T.match_buffer(q_handle, (total_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        last_page_len = T.match_buffer(length_info_handle, (batch,), "int32", elem_offset=length_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (total_len, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (total_len, h_qo), "float32")
        order_indptr = T.match_buffer(tree_order_indptr_handle, (batch + 1,), "int32", elem_offset=order_indptr_offset)
        order = T.match_buffer(tree_order_handle, (tree_total, 2), "int32", elem_offset=order_offset)
        assert rotary_mode == 0, "edgert's tree attention expects RoPE applied before the cache"
        for tk in T.parallel(total_len * h_kv):  # (node, KV head) pairs: its query heads share the loads
            t: T.let[T.int32] = tk // h_kv
            which = T.alloc_buffer((1,), "int32", scope="local")  # the tree (batch entry) of node t
            which[0] = 0
            for bb in range(batch):
                if q_indptr[bb] <= t:
                    which[0] = bb
            b: T.let[T.int32] = which[0]
            first: T.let[T.int32] = page_indptr[b]
            n_pages: T.let[T.int32] = page_indptr[b + 1] - first
            full: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
            tree_len: T.let[T.int32] = order_indptr[b + 1] - order_indptr[b]
            prefix: T.let[T.int32] = full - tree_len
            node: T.let[T.int32] = order_indptr[b] + t - q_indptr[b] + tree_len - (q_indptr[b + 1] - q_indptr[b])
            path = T.alloc_buffer((MAX_TREE,), "int32", scope="local")  # the node's ancestors and itself
            count = T.alloc_buffer((1,), "int32", scope="local")
            count[0] = 0
            for j in range(tree_len):
                if order[order_indptr[b] + j, 0] <= order[node, 0] and order[node, 0] < order[order_indptr[b] + j, 1]:
                    path[count[0]] = j
                    count[0] = count[0] + 1
            length: T.let[T.int32] = prefix + count[0]
            task(
                q,
                t,
                tk % h_kv * group,
                output,
                lse,
                pages,
                page_values,
                first,
                tk % h_kv,
                0,
                length,
                prefix,
                path,
                nnz_pages * page_size,
                sm_scale,
                T.float32(-3.0e38),
            )

    return tree.with_attr("global_symbol", "edgert_paged_tree_attention")


def use_fast_decode_attention(
    mod: IRModule,
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    rope_theta: float | None = None,
    dtype: str = "float32",
) -> IRModule:
    """``mod`` with TIRPagedKVCache's scalar CPU decode and prefill kernels (over the pages, without a
    sliding window, and among the new tokens) replaced by `paged_decode_attention`,
    `paged_prefill_attention` and `ragged_prefill_attention`; with ``rope_theta`` (the cache applies
    Llama's RoPE, unscaled) also its q/k/v split, by `fused_rope`. ``dtype``: the cache's (of its
    queries, keys, values and outputs; float16 keys and values still sum in float32)."""
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if DECODE_KERNEL not in names:
        return mod  # no CPU paged cache in this module (another target or cache kind)
    mod = IRModule(dict(mod.functions), attrs=mod.attrs)  # a copy; the caller's module stays as it was
    mod[names[DECODE_KERNEL]] = paged_decode_attention(num_kv_heads, num_qo_heads, head_dim, dtype=dtype).with_attr(
        "global_symbol", DECODE_KERNEL
    )
    if PREFILL_KERNEL in names:
        mod[names[PREFILL_KERNEL]] = paged_prefill_attention(
            num_kv_heads, num_qo_heads, head_dim, dtype=dtype
        ).with_attr("global_symbol", PREFILL_KERNEL)
    if RAGGED_KERNEL in names:
        mod[names[RAGGED_KERNEL]] = ragged_prefill_attention(
            num_kv_heads, num_qo_heads, head_dim, dtype=dtype
        ).with_attr("global_symbol", RAGGED_KERNEL)
    if APPEND_KERNEL in names:
        mod[names[APPEND_KERNEL]] = rows_append(num_kv_heads, head_dim, dtype=dtype).with_attr(
            "global_symbol", names[APPEND_KERNEL].name_hint
        )
    if TREE_KERNEL in names:
        mod[names[TREE_KERNEL]] = paged_tree_attention(num_kv_heads, num_qo_heads, head_dim, dtype=dtype).with_attr(
            "global_symbol", names[TREE_KERNEL].name_hint
        )
    if rope_theta is not None and ROPE_KERNEL in names and head_dim % 2 == 0:
        mod[names[ROPE_KERNEL]] = fused_rope(rope_theta, head_dim, num_qo_heads, num_kv_heads, dtype=dtype).with_attr(
            "global_symbol", ROPE_KERNEL
        )
    return mod


# -- caches with a window (Gemma 3's local layers) and further caches of one module -----------------
#
# TVM's paged cache has `_sliding_window` kernels for a cache whose layers attend to a window
# (``mha_sliding``) or whose sequence slides: their length info is ``[3, batch]`` (last page's
# length, the window's start in the first page, the attention-sink length), row r of a sequence
# lives at position ``r`` if ``r < sink`` else ``r - sink + start``, and the prefill kernel masks
# query t of a chunk (causal) to the last ``window - t - 1`` rows: with the chunk's own t + 1
# tokens (the ragged kernel) that is ``window`` positions. A module with several caches names
# their kernels with a suffix (`families.shared.kv_cache`); the kernels below replace them all.

SLIDING = "_sliding_window"  # TIRPagedKVCache's suffix for these kernels


def _window_rows(length_info: Any, b: Any, page_size: int, n_pages: Any) -> Any:
    """Rows of sequence ``b`` in a sliding cache (TVM's ``_get_kv_chunk_len``)."""
    return T.if_then_else(
        n_pages > 0, (n_pages - 1) * page_size + length_info[0, b] - length_info[1, b] + length_info[2, b], 0
    )


def paged_prefill_window_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, window: int, page_size: int = 16
) -> tirx.PrimFunc:
    """`paged_prefill_attention` for TVM's ``batch_prefill_paged_kv_cpu_sliding_window``: its ``[3, b]``
    length info and row positions, and, when ``causal``, each query t of a chunk of n seeing the last
    ``max(window - t - 1, 0)`` rows (TVM's ``_causal_or_sliding_cross_mask``; ``window`` 0: plain causal)."""
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1
    slides = 1 if window > 0 else 0
    task = _head_task(d, lanes, group, _paged_rows(d, lanes, page_size, group))

    @T.prim_func
    def prefill(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (total_len, h_qo, d), "float32")
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), "float32")
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        length_info = T.match_buffer(length_info_handle, (3, batch), "int32", elem_offset=length_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (total_len, h_qo, d), "float32")
        lse = T.match_buffer(lse_handle, (total_len, h_qo), "float32")
        assert rotary_mode == 0, "edgert's window prefill attention expects RoPE applied before the cache"
        for b in range(batch):
            first: T.let[T.int32] = page_indptr[b]
            kv_len: T.let[T.int32] = _window_rows(length_info, b, page_size, page_indptr[b + 1] - first)
            sink: T.let[T.int32] = length_info[2, b]
            start: T.let[T.int32] = length_info[1, b]
            q0: T.let[T.int32] = q_indptr[b]
            qo_len: T.let[T.int32] = q_indptr[b + 1] - q0
            for tk in T.parallel(qo_len * h_kv):  # (token, KV head) pairs: its query heads share the loads
                t: T.let[T.int32] = _zigzag(tk // h_kv, qo_len)
                lo: T.let[T.int32] = T.if_then_else(causal * slides > 0, T.max(kv_len - T.max(window - t - 1, 0), 0), 0)
                hi: T.let[T.int32] = T.if_then_else(
                    causal * (1 - slides) > 0, T.max(T.min(kv_len - qo_len + t + 1, kv_len), 0), kv_len
                )
                # no visible row: zeros, and a log-sum-exp merging to nothing
                task(
                    q,
                    q0 + t,
                    tk % h_kv * group,
                    output,
                    lse,
                    pages,
                    page_values,
                    first,
                    tk % h_kv,
                    lo,
                    hi,
                    sink,
                    start,
                    kv_len,
                    sm_scale,
                    T.float32(-5e4),
                )

    return prefill.with_attr("global_symbol", "edgert_paged_prefill_window_attention")


def paged_decode_window_attention(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, page_size: int = 16
) -> tirx.PrimFunc:
    """`paged_decode_attention` for TVM's ``batch_decode_paged_kv_cpu_sliding_window``: its ``[3, b]``
    length info and row positions (every row it is given: the cache hands it the window's pages)."""
    h_qo, h_kv, d = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    lanes = LANES if d % LANES == 0 else 1
    g = group if h_kv >= TILE_TASKS else 1  # a step is one sequence: enough tasks for the threads
    units = h_qo // g
    task = _head_task(d, lanes, g, _paged_rows(d, lanes, page_size, g))

    @T.prim_func
    def decode(
        q_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (batch, h_qo, d), "float32")
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), "float32")
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        length_info = T.match_buffer(length_info_handle, (3, batch), "int32", elem_offset=length_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(output_handle, (batch, h_qo, d), "float32")
        lse = T.match_buffer(lse_handle, (batch, h_qo), "float32")
        assert rotary_mode == 0, "edgert's window decode attention expects RoPE applied before the cache"
        for b in range(batch):
            first: T.let[T.int32] = page_indptr[b]
            length: T.let[T.int32] = _window_rows(length_info, b, page_size, page_indptr[b + 1] - first)
            sink: T.let[T.int32] = length_info[2, b]
            start: T.let[T.int32] = length_info[1, b]
            for u in T.parallel(units):  # KV heads with their query heads, or with few KV heads single heads
                task(
                    q,
                    b,
                    u * g,
                    output,
                    lse,
                    pages,
                    page_values,
                    first,
                    u * g // group,
                    0,
                    length,
                    sink,
                    start,
                    length,
                    sm_scale,
                    T.float32(-3.0e38),
                )

    return decode.with_attr("global_symbol", "edgert_paged_decode_window_attention")


def use_fast_cache_attention(
    mod: IRModule, num_kv_heads: int, num_qo_heads: int, head_dim: int, windows: dict[str, int]
) -> IRModule:
    """``mod`` with the CPU attention kernels of every cache whose kernel-name suffix is in ``windows``
    (``""``: the unsuffixed cache) replaced by edgert's: decode, prefill and ragged as in
    `use_fast_decode_attention`, and their ``_sliding_window`` variants by `paged_decode_window_attention`
    and `paged_prefill_window_attention` (with that cache's window) (the ``sliding_window`` its
    kernels were made with; 0 for a cache without ``mha_sliding`` layers)."""
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    kernels = {
        DECODE_KERNEL: lambda w: paged_decode_attention(num_kv_heads, num_qo_heads, head_dim),
        PREFILL_KERNEL: lambda w: paged_prefill_attention(num_kv_heads, num_qo_heads, head_dim),
        RAGGED_KERNEL: lambda w: ragged_prefill_attention(num_kv_heads, num_qo_heads, head_dim),
        DECODE_KERNEL + SLIDING: lambda w: paged_decode_window_attention(num_kv_heads, num_qo_heads, head_dim),
        PREFILL_KERNEL + SLIDING: lambda w: paged_prefill_window_attention(num_kv_heads, num_qo_heads, head_dim, w),
    }
    swaps = {
        base + suffix: make(window)
        for suffix, window in windows.items()
        for base, make in kernels.items()
        if base + suffix in names
    }
    if not swaps:
        return mod
    mod = IRModule(dict(mod.functions), attrs=mod.attrs)  # a copy; the caller's module stays as it was
    for name, func in swaps.items():
        mod[names[name]] = func.with_attr("global_symbol", name)
    return mod
