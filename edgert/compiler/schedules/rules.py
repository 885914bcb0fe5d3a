"""edgert's CPU schedule rules for plain graphs, in the style of `tvm.s_tir.dlight` rules.

TVM leaves an unscheduled PrimFunc as one serial scalar loop nest on CPU; that is why an
untuned encoder ran ~200x slower than onnxruntime (DESIGN.md). dlight's CPU rules cover GEMV
and row reductions only. These rules give every kernel of an encoder an explicit schedule:

- `Matmul`: any matmul-shaped block (dense, batch matmul of attention) with its fused
  epilogue (bias, GELU, scale, mask): register tile of ``ROWS x 2 vectors`` kept in a local
  accumulator, tiles spread over threads, columns vectorized, epilogue applied on the
  write-back of each tile while it is in cache.
- `RowWise`: softmax, layer norm and other "reduce a row, then map it" kernels: rows
  spread over threads, every block of the row computed under the row loop, maps vectorized.
- `Elementwise`: injective kernels (adds, casts, gathers, transposes): flattened,
  vectorized and spread over threads.
- `Fallback`: anything else (convolutions, odd reductions): the outermost spatial loops
  spread over threads, the innermost spatial loop vectorized where it can be.

Each rule returns None when a kernel is not its shape, and any kernel a rule fails on keeps
TVM's default lowering (correct, slower), so no graph fails to build for a schedule.
"""

from __future__ import annotations

import math
import re
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_cpu_features

# The register tile: ROWS rows x (up to) 3 vectors of columns = 12 accumulators, plus the 3
# vectors of weights and one broadcast input: AVX2's and NEON's 16 (or more) registers.
ROWS = 4
# Below these a parallel loop costs more than it saves. A parallel region of TVM's pool costs
# ~2.4 us with its workers spinning (2 threads, znver5: 64 KiB add, 1.4 us serial, 3.8 parallel),
# so a kernel of ~5 us or more gains from a second thread that has a core of its own. At 1 << 22
# multiply-adds (and 1 << 16 elements for row-wise kernels) every kernel of a small graph ran on
# one thread (mobilenet 96x96: its largest conv is 1.2M multiply-adds, 9 us), onnxruntime 1.2-1.3x
# ahead at 2 threads. Where the second core is busy and 2 threads are forced, these small regions
# wait for the worker and the graph is slower than serial (docs/graph-zoo.md); the runtime's
# default thread count runs one thread there.
# Maps stay at 65,536 elements: a parallel pad (34x34x32, convnet.qdq) ran 2x slower on one thread
# than the serial loop (1.9 -> 3.7 us: the split loop's index arithmetic), a loss a second thread
# barely wins back.
MIN_PARALLEL_WORK = 1 << 16  # elements of a map or a whole-tensor reduction
# Vectors per iteration of a map's loop whose value takes at least MAP_CHAIN operations: a long
# elementwise chain (a GELU between quantize pairs, ~100 dependent vector operations per value) is
# bound by the chain's latency, not by issue; four independent vectors per iteration interleave
# four chains. encoder_512.qdq's GELU kernel (40 x 2048) took 0.26 -> 0.18 ms at one thread
# (2-core Intel Xeon, `edgert profile`, loaded). Short maps keep one vector: MobileNet's input
# quantize with its transpose (a gather) took 0.009 -> 0.041 ms at four.
MAP_VECTORS = 4
MAP_CHAIN = 32
MIN_PARALLEL_ROWS = 1 << 12  # elements of a row-wise kernel (softmax, layer norm: exp and divides)
MIN_PARALLEL_MACS = 1 << 19  # multiply-adds of a matmul or convolution (~4 us on one core)
# Each parallel chunk of a matmul gets at least this many multiply-adds: a chunk's tile loop costs
# an accumulator allocation and a trip through the pool's task split, which at 1.2M MACs in 48
# chunks made the kernel slower at two threads than at one (9.2 -> 12.6 us).
CHUNK_MACS = 1 << 17


# At most this many parallel iterations per kernel, each a serial run of register tiles. A tile
# of 1 KiB or more (8 rows x 2 AVX-512 vectors) is no stack array in TVM's lowering but a
# workspace allocation, which StorageRewrite hoists out of serial loops but not out of a
# parallel loop's body: one allocate/free call per tile. Integer conv 34x34x32 -> 64, one
# thread: 64.6 us a tile per iteration, 40.7 in 16 chunks, 36 serial (37.4 once its scalars
# were `T.let` bindings, not local buffers: see `winograd._kernel`). The chunks are the largest
# divisor of the tiles up to this bound: at 16, a layer of 17 or 34 tiles got 1 or 2 chunks and a
# second thread nothing to do (encoder_320 at 2 threads 2.14 ms, as at one; 64: 1.51 ms).
MAX_CHUNKS = 64


def chunks(tiles: int, parallel: bool, most: int = MAX_CHUNKS) -> int:
    """Parallel iterations for ``tiles`` register tiles: 1 on one thread, else the largest divisor
    of ``tiles`` up to ``most`` (the accumulators are allocated once per iteration)."""
    if not parallel:
        return 1
    return max(d for d in range(1, min(tiles, most) + 1) if tiles % d == 0)


def even_chunks(tiles: int, most: int) -> int:
    """`chunks` for a kernel of a few microseconds: the largest even divisor of ``tiles`` up to
    ``most`` where there is one at least half the largest divisor. TVM splits a parallel loop
    evenly over the workers, so 9 chunks on 2 threads keep one busy for 5 and the other for 4."""
    best = chunks(tiles, True, most)
    even = [d for d in range(2, min(tiles, most) + 1, 2) if tiles % d == 0]
    return even[-1] if even and 2 * even[-1] >= best else best


def _work(sch: s_tir.Schedule, block: Any) -> int:
    """Iterations of the loops around ``block`` (symbolic extents count as large)."""
    total = 1
    for loop in sch.get_loops(block):
        ext = _extent(sch, loop)
        total *= ext if ext is not None else 1 << 10
    return total


def _operations(sch: s_tir.Schedule, block: Any) -> int:
    """Arithmetic operations and calls in ``block``'s body (after its producers were inlined)."""
    count = [0]
    kinds = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Min, tirx.Max, tirx.Select, tvm.ir.Call)

    def visit(_node: Any) -> None:
        count[0] += 1

    tvm_ffi.structural_walk(sch.get(block).body, [(kinds, visit)])
    return count[0]


def _lanes(target: Target, bits: int = 32) -> int:
    """Vector lanes for ``bits``-wide elements, from the CPU features LLVM reports for the target.

    (`llvm_get_vector_width` answers 512 for AVX2-only CPUs, which made tiles spill.)
    """
    features = set(llvm_get_cpu_features(target))
    if "avx512f" in features:
        width = 512
    elif "avx" in features or "avx2" in features:
        width = 256
    else:
        width = 128  # SSE, NEON
    return max(width // bits, 2)


def _extent(sch: s_tir.Schedule, loop: Any) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vectorize_inner(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    """Vectorize the innermost loop of ``block``: split by ``lanes`` when it divides, else whole if short."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = _extent(sch, inner)
    if ext is None or ext < 2:
        return
    if ext <= lanes * 2:
        sch.vectorize(inner)
    elif ext % lanes == 0:
        _, vec = sch.split(inner, factors=[None, lanes])
        sch.vectorize(vec)


def _is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def _one_reduction(func: Any, target: Target) -> tuple[s_tir.Schedule, list[Any], Any] | None:
    """A CPU kernel's schedule, its normalized blocks and its one reduction block; None otherwise."""
    if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    return (sch, infos, reductions[0]) if len(reductions) == 1 else None


class Matmul(ScheduleRule):
    """Tiled, vectorized, parallel matmul with the epilogue fused into each tile's write-back."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if its one reduction block is a matmul; None otherwise."""
        found = _one_reduction(func, target)
        if found is None:
            return None
        sch, infos, mm = found
        kinds = mm.dom_kind()
        spatial = kinds.rstrip("R")
        # Several reduction axes only for convs (taps and channels as loops of their own: no
        # division per step to recover them from one flattened axis).
        nred = len(kinds) - len(spatial)
        if (
            not spatial.endswith("S")
            or "R" in spatial
            or nred == 0
            or (nred > 1 and not sch.get(mm.block_rv).name_hint.startswith("conv_cl"))
            or not _is_multiply_add(sch, mm.block_rv)
        ):
            return None
        pos = infos.index(mm)
        # Injective producers (transposes, reshapes, casts fused in front) are read in place.
        for b in infos[:pos]:
            try:
                sch.compute_inline(b.block_rv)
            except s_tir.ScheduleError:  # a producer that cannot be inlined stays a separate loop nest
                pass
        # Epilogue chains (bias, GELU, scale, mask) are folded into one block reading the matmul.
        epilogue = [b.block_rv for b in infos[pos + 1 :]]
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b)
            except s_tir.ScheduleError:
                pass
        lanes = _lanes(target)
        loops = sch.get_loops(mm.block_rv)
        if len(loops) == 1 + nred:  # one output row (unit loops were normalized away): a GEMV
            loops = [sch.add_unit_loop(mm.block_rv), *loops]
        *batch, i, j = loops[: len(loops) - nred]
        ks = loops[len(loops) - nred :]
        name = sch.get(mm.block_rv).name_hint
        if len(batch) > 1 and name.startswith("conv_cl"):
            # A channels-last 2-D conv: its output positions (oh, ow) are one row axis, so a
            # small feature map (6x6) still fills whole row tiles.
            i = sch.fuse(*batch[1:], i)
            batch = batch[:1]
        n = _extent(sch, j)
        # A grouped conv names the tile width that keeps each tile inside one group.
        fixed = re.fullmatch(r"conv_cl_cols(\d+)", name)
        cols = int(fixed.group(1)) if fixed else _column_tile(n, lanes)
        rows = _row_tile(_extent(sch, i), cols, lanes)
        io, ii = sch.split(i, factors=[None, rows])
        jo, ji = sch.split(j, factors=[None, cols])
        # Column tiles outside row tiles: one tile's weights (K x cols) stay in L1 across the rows.
        sch.reorder(*batch, jo, io, *ks, ii, ji)
        outer = sch.fuse(*batch, jo, io)
        if _work(sch, mm.block_rv) >= MIN_PARALLEL_MACS:
            tiles = _extent(sch, outer)
            most = max(2, min(MAX_CHUNKS, _work(sch, mm.block_rv) // CHUNK_MACS))
            nc = chunks(tiles, True, most) if tiles is not None else None
            if nc is not None and nc < tiles:
                # Chunks of tiles over threads: the accumulators are allocated once per chunk.
                chunk, outer = sch.split(outer, factors=[nc, None])
                sch.parallel(chunk)
            else:
                sch.parallel(outer)
        acc = sch.cache_write(mm.block_rv, 0, "local")
        sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
        last = epilogue[-1] if epilogue else None
        if last is not None:
            # Inlined, the epilogue writes wherever the matmul does; an epilogue that keeps only
            # some columns (a slice of zero-padded ones) must run per tile instead, in its bounds.
            inlined = False
            if _written_shape(sch, last) == _written_shape(sch, mm.block_rv):
                try:
                    sch.reverse_compute_inline(last)
                    inlined = True
                except s_tir.ScheduleError:
                    pass
            if not inlined:
                try:
                    sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
                    _vectorize_inner(sch, last, lanes)
                except s_tir.ScheduleError:
                    pass
        sch.unroll(ii)
        sch.vectorize(ji)
        _vectorize_inner(sch, acc, lanes)
        sch.decompose_reduction(mm.block_rv, ks[0])
        return sch


def _column_tile(n: int | None, lanes: int) -> int:
    """Columns per register tile: two vectors (the packed weight's tile; 3 was measured far
    slower), one if that divides ``n`` and two do not.

    Otherwise (attention's 100 keys or 36 head dims) the largest divisor of ``n`` that fits one
    vector: a split that does not divide leaves a predicate on the vector loop, which TVM emits
    scalar, and LLVM vectors longer than a register but not a multiple of it (36, 20) were as
    slow (4x100x100 @ 100x36, one thread: 18 GFLOP/s with tiles of 36, 73 with tiles of 12).
    """
    if n is None or n % (2 * lanes) == 0:
        return 2 * lanes
    if n % lanes == 0:
        return lanes
    return next((d for d in range(lanes, 1, -1) if n % d == 0 and d > 2), 2 * lanes)


def _row_tile(m: int | None, cols: int, lanes: int) -> int:
    """Rows per register tile: the first of a few counts that divides ``m`` (a split that does
    not divide costs a predicate per row: 1024 rows in tiles of 5 ran at half speed), else ``ROWS``.

    One vector wide, 8-10 rows keep both FMA units busy (attention's 4x100x100 @ 100x36: 73 ->
    104 GFLOP/s). Two vectors wide with AVX-512's 32 registers, 8 rows (16 accumulators) beat
    4 (960x288 @ 288x64, one thread, loaded: 203 -> 250 GFLOP/s); with 16 registers (AVX2) the
    tile stays at ``ROWS``.
    """
    if m is None:
        return ROWS
    if m < ROWS:
        return max(m, 1)
    if cols <= lanes:
        counts: tuple[int, ...] = (8, 10, 6, 5)
    elif lanes >= 16:
        counts = (8, 6, 5)
    else:
        counts = ()
    return next((r for r in counts if m % r == 0), ROWS)


def _written_shape(sch: s_tir.Schedule, block: Any) -> list[int | None]:
    """Shape of the buffer ``block`` writes (None for a symbolic dimension)."""
    shape = sch.get(block).writes[0].source.shape
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in shape]


def _is_multiply_add(sch: s_tir.Schedule, block: Any) -> bool:
    """True if the block's update is ``C = C + A * B`` (casts allowed)."""
    body = sch.get(block).body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    for term in (body.value.a, body.value.b):
        while isinstance(term, tirx.Cast):
            term = term.value
        if isinstance(term, tirx.Mul):
            return True
    return False


class RowWise(ScheduleRule):
    """Softmax / layer norm: rows over threads, each row's blocks under the row loop, maps vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if all its blocks share leading spatial axes and one of them reduces."""
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or all(b.is_injective() for b in infos) or not infos[-1].is_injective():
            return None
        leading = None
        for b in infos:
            kinds = b.dom_kind()
            n = len(kinds) - len(kinds.lstrip("S"))
            leading = n if leading is None else min(leading, n)
        if not leading or any(b.dom_kind()[:leading] != "S" * leading for b in infos):
            return None
        if len(infos[-1].dom_kind()) <= leading:
            leading = len(infos[-1].dom_kind()) - 1
            if leading < 1:
                return None
        # Producers that are plain maps read by one block (a residual add before a norm) are read
        # in place; one read by several (softmax's exp, read by the sum and the normalization)
        # is computed once per row instead: inlined, it ran twice, once in a scalar reduction loop.
        for b in infos[:-1]:
            if b.is_injective() and len(sch.get_consumers(b.block_rv)) == 1:
                try:
                    sch.compute_inline(b.block_rv)
                except s_tir.ScheduleError:
                    pass
        lanes = _lanes(target)
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
        if _work(sch, last) >= MIN_PARALLEL_ROWS:
            sch.parallel(rows)
        _vectorize_inner(sch, last, lanes)
        remaining = []
        for b in infos[:-1]:
            if not _exists(sch, b.block_rv):
                continue
            if not b.is_injective():
                partial = _partial_reduction(sch, b.block_rv, lanes)
                if partial is not None:
                    remaining.append(partial)
            remaining.append(b.block_rv)
        for block in reversed(remaining):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block in remaining:
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                _vectorize_inner(sch, block, lanes)
            elif _is_partial(sch, block):
                # compute_at put the partial results' axis (the rfactor block's first iterator)
                # right under the row loop; it goes innermost, over contiguous elements.
                lane_loop, *others = sch.get_loops(block)[1:]
                sch.reorder(*others, lane_loop)
                sch.vectorize(lane_loop)
        return sch


def _partial_reduction(sch: s_tir.Schedule, block: Any, lanes: int) -> Any:
    """Split a row reduction into ``lanes`` partial results (a block to vectorize), or None.

    LLVM keeps a float sum or max over a row serial (reassociating it would change rounding),
    so a row reduction ran one element per instruction; ``rfactor`` makes the reassociation
    explicit: a vector of ``lanes`` partial results, then one reduction of those.
    """
    loops = sch.get_loops(block)
    ext = _extent(sch, loops[-1]) if loops else None
    if ext is None or ext % lanes or ext < 2 * lanes:
        return None
    try:
        probe = sch.copy()
        _, inner = probe.split(probe.get_loops(block)[-1], factors=[None, lanes])
        probe.rfactor(inner, factor_axis=len(probe.get(block).writes[0].region))
    except s_tir.ScheduleError:  # a reduction rfactor does not recognize keeps its serial loop
        return None
    _, inner = sch.split(loops[-1], factors=[None, lanes])
    return sch.rfactor(inner, factor_axis=len(sch.get(block).writes[0].region))


def _is_partial(sch: s_tir.Schedule, block: Any) -> bool:
    return sch.get(block).name_hint.endswith("_rf")


def _exists(sch: s_tir.Schedule, block: Any) -> bool:
    try:
        sch.get(block)
        return True
    except ValueError:  # inlined blocks are gone from the schedule ("The block no longer exists")
        return False


class Elementwise(ScheduleRule):
    """Injective kernels: producers inlined, loops flattened, vectorized and spread over threads.

    ``rows``: a kernel that reads a buffer of another shape (transpose, slice) along its last
    axis, with rows that are no multiple of a vector, is vectorized within rows instead.
    """

    def __init__(self, rows: bool = False):
        self.rows = rows

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if every block is injective."""
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        for b in infos[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except s_tir.ScheduleError:
                pass
        lanes = _lanes(target)
        for b in infos:
            if not _exists(sch, b.block_rv):
                continue
            loops = sch.get_loops(b.block_rv)
            if not loops:
                continue
            if self.rows and (
                _odd_rows(sch, b.block_rv, loops, lanes) or _channel_params(sch, b.block_rv, loops, lanes)
            ):
                # A transpose or slice with rows that are no multiple of a vector (attention's
                # 36-wide heads): flattened, each vector straddled two rows and was gathered;
                # vectors within a row read contiguous elements.
                outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                _vectorize_channels(sch, b.block_rv, lanes)
                if _work(sch, b.block_rv) >= MIN_PARALLEL_WORK:
                    sch.parallel(outer)
                continue
            last = _extent(sch, loops[-1])
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            total = _extent(sch, fused)
            # The widest of MAP_VECTORS vectors (long chains whose rows they divide: a wide vector
            # across the rows of a split, 0.010 -> 0.027 ms in the conformer's GLU, gathers) or
            # one that divides the loop, twice over at least.
            long_chain = _operations(sch, b.block_rv) >= MAP_CHAIN
            rows_fit = last is not None and last % (lanes * MAP_VECTORS) == 0
            counts = (MAP_VECTORS, 1) if long_chain and rows_fit else (1,)
            wide = next(
                (
                    lanes * v
                    for v in counts
                    if total is not None and total % (lanes * v) == 0 and total >= 2 * lanes * v
                ),
                None,
            )
            if wide is not None:
                outer, vec = sch.split(fused, factors=[None, wide])
                sch.vectorize(vec)
            else:
                outer = fused
            if total is None or total >= MIN_PARALLEL_WORK:
                sch.parallel(outer)
        return sch


class Pool(ScheduleRule):
    """A reduction over a window or a whole axis, not along the output's last axis (max / average
    pooling in channels-last layout): reduction loops moved outside the last output axis, which
    is vectorized (channels), the other output axes over threads; a map after it (an average's
    division) runs per output position, in cache."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if it is one such reduction with injective producers (a padding) and
        consumers (a division)."""
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        reductions = [b for b in infos or [] if not b.is_injective()]
        if len(reductions) != 1:
            return None
        block = reductions[0]
        pos = infos.index(block)
        kinds = block.dom_kind()
        spatial = len(kinds) - len(kinds.lstrip("S"))
        if spatial < 2 or spatial == len(kinds) or kinds[spatial:] != "R" * (len(kinds) - spatial):
            return None
        if _is_multiply_add(sch, block.block_rv) or not _reads_along(sch, block.block_rv, spatial - 1):
            return None
        if any(_written_shape(sch, b.block_rv) != _written_shape(sch, block.block_rv) for b in infos[pos + 1 :]):
            return None
        for b in infos[:pos]:
            sch.compute_inline(b.block_rv)
        for b in infos[pos + 1 : -1]:
            sch.compute_inline(b.block_rv)
        lanes = _lanes(target)
        loops = sch.get_loops(block.block_rv)
        if len(loops) != len(kinds):
            return None
        *outer, inner = loops[:spatial]
        sch.reorder(*outer, *loops[spatial:], inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if _work(sch, block.block_rv) >= MIN_PARALLEL_WORK:
            sch.parallel(fused)
        _vectorize_channels(sch, block.block_rv, lanes)
        init = sch.decompose_reduction(block.block_rv, sch.get_loops(block.block_rv)[1])
        _vectorize_channels(sch, init, lanes)
        if pos + 1 < len(infos):
            last = infos[-1].block_rv
            sch.reverse_compute_at(last, fused, preserve_unit_loops=True)
            _vectorize_channels(sch, last, lanes)
        return sch


def _vectorize_channels(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    """Vectorize ``block``'s innermost loop in tiles that divide it (40 channels: tiles of 10)."""
    inner = sch.get_loops(block)[-1]
    ext = _extent(sch, inner)
    if ext is None or ext < 2:
        return
    tile = _column_tile(ext, lanes)
    if ext % tile:
        return
    if tile < ext:
        inner = sch.split(inner, factors=[None, tile])[1]
    sch.vectorize(inner)


def _reads_along(sch: s_tir.Schedule, block: Any, axis: int) -> bool:
    """True if every buffer ``block`` reads is indexed along its last axis by iterator ``axis`` alone
    (so vectorizing that iterator reads contiguous elements)."""
    stmt = sch.get(block)
    var = stmt.iter_vars[axis].var
    for region in stmt.reads:
        if not region.region:
            continue
        last = region.region[-1]
        if not (isinstance(last.min, tirx.Var) and last.min.same_as(var)) or not _is_one(last.extent):
            return False
    return True


def _is_one(value: Any) -> bool:
    return isinstance(value, tirx.IntImm) and int(value) == 1


def _channel_params(sch: s_tir.Schedule, block: Any, loops: list[Any], lanes: int) -> bool:
    """True if ``block`` writes whole vectors along its last axis and reads some buffer of another
    shape with the same last axis: a per-channel parameter ([1, 1, 1, C]) of a channels-last
    tensor. Flattened, each lane's channel was ``index % C`` and the parameter was gathered (the
    requantization after an int8 conv: 0.054 ms for 32x32x64); within rows it is one vector load."""
    ext = _extent(sch, loops[-1])
    if len(loops) < 2 or ext is None or ext % lanes:
        return False
    written = _written_shape(sch, block)
    for region in sch.get(block).reads:
        shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in region.source.shape]
        if shape != written and len(shape) == len(written) and shape[-1] == written[-1]:
            if all(d == 1 for d in shape[:-1]):
                return True
    return False


def _odd_rows(sch: s_tir.Schedule, block: Any, loops: list[Any], lanes: int) -> bool:
    """True if ``block``'s innermost loop (rows no multiple of ``lanes``) reads every buffer along
    its last axis, and some read buffer has another shape than the one written (flattening
    would not be contiguous)."""
    ext = _extent(sch, loops[-1])
    if len(loops) < 2 or ext is None or ext % lanes == 0 or ext < 4:
        return False
    stmt = sch.get(block)
    if not stmt.iter_vars:
        return False
    var = stmt.iter_vars[-1].var
    for region in stmt.reads:
        if not region.region:
            continue
        last = region.region[-1]
        linear = sym.detect_linear_equation(last.min, [var])
        if not _is_one(last.extent) or len(linear) != 2 or not isinstance(linear[0], tirx.IntImm):
            return False
        if int(linear[0]) not in (0, 1):  # contiguous along the row, or one value broadcast
            return False
    written = _written_shape(sch, block)
    return any([int(d) if isinstance(d, tirx.IntImm) else None for d in r.source.shape] != written for r in stmt.reads)


# Chunks a whole-tensor reduction is split into when it is worth threads: a few per worker, so
# a worker that starts late leaves less behind.
REDUCTION_CHUNKS = 8


class FullReduction(ScheduleRule):
    """A tensor reduced to one value (DynamicQuantizeLinear's min and max): ``lanes`` partial
    results per chunk of the flattened input, vectorized, chunks over threads, then one short
    reduction of the partials.

    Without it the reduction was one scalar loop on one thread (encoder_512.dyn: its six min/max
    over the 40x2048 and 40x512 activations took 0.34 of 1.46 ms); min and max are exact in any
    order, a sum is reassociated as the row reductions' `_partial_reduction` is.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if its one reduction block reduces every axis of a static input."""
        found = _one_reduction(func, target)
        if found is None:
            return None
        sch, infos, red = found
        kinds = red.dom_kind()
        spatial = len(kinds) - len(kinds.lstrip("S"))
        loops = sch.get_loops(red.block_rv)
        if "S" in kinds[spatial:] or spatial == len(kinds) or len(loops) != len(kinds):
            return None
        if any(_extent(sch, loop) != 1 for loop in loops[:spatial]):
            return None
        extents = [_extent(sch, loop) for loop in loops[spatial:]]
        if any(e is None for e in extents):
            return None
        total = math.prod(extents)
        lanes = _lanes(target)
        if total % lanes or total < 4 * lanes:
            return None
        for b in infos[: infos.index(red)]:
            try:
                sch.compute_inline(b.block_rv)
            except s_tir.ScheduleError:
                pass
        loops = sch.get_loops(red.block_rv)
        r = sch.fuse(*loops[spatial:]) if len(loops) - spatial > 1 else loops[spatial]
        chunks = REDUCTION_CHUNKS if total >= MIN_PARALLEL_WORK and total % (REDUCTION_CHUNKS * lanes) == 0 else 1
        c, m, v = sch.split(r, factors=[chunks, None, lanes])
        sch.reorder(c, v, m)
        partial = sch.rfactor(sch.fuse(c, v), factor_axis=0)
        loops = sch.get_loops(partial)
        c, v = sch.split(loops[-2], factors=[chunks, lanes])
        sch.reorder(c, loops[-1], v)
        sch.vectorize(v)
        if chunks > 1:
            sch.parallel(c)
        return sch


class Fallback(ScheduleRule):
    """Any other kernel: its outer spatial loops over threads, innermost spatial loop vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Parallelize what is safe to parallelize."""
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for b in infos:
            kinds = b.dom_kind()
            n = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(b.block_rv)
            if n == 0 or len(loops) < len(kinds):
                continue
            outer = sch.fuse(*loops[: max(1, min(n, len(kinds) - 1))]) if min(n, len(kinds) - 1) > 1 else loops[0]
            if _work(sch, b.block_rv) >= MIN_PARALLEL_MACS:
                sch.parallel(outer)
        return sch
