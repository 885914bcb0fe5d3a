"""A depthwise conv and the pointwise (1x1) conv that reads it as one kernel (MobileNet's block).

A 96x96 MobileNet runs in ~50 us: its five depthwise convs were serial kernels of 2-3 us (too
small for a parallel region of TVM's pool, ~2.4 us), and their outputs made a round trip through memory
between two kernels. Here ``dw -> elementwise chain (bias, ReLU6, requantization) -> 1x1 conv``
becomes one `call_te`:

    a[r, q, c] = chain(sum_t x[pos(r, q, t), c] * Wd[t, c])    (an injective block: taps unrolled)
    y[r, q, j] = sum_c a[r, q, c] * Wp[j // B, c, j % B]        (the packed 1x1 conv)

which `DepthwisePointwise` schedules as the `Matmul` rule does the conv (positions as rows,
channels as vector columns) with the depthwise values of each row tile computed under the tile's
loop, before its column tiles: no intermediate tensor, one kernel, and the depthwise part goes
over threads with the pointwise one (one parallel region for both).

The rewrite runs on the channels-last graph (`layout.channels_last`) before the conv rewrite, and
only where each intermediate value has the one use; the pointwise conv's own epilogue (bias,
activation) stays after it for FuseOps to fuse, as for any conv.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.ir import GenericConst
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

# Elementwise ops the chain between the two convs may hold: with a constant (a scalar or one value
# per channel) or alone.
_BINARY = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.divide": lambda a, b: a / b,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}
_UNARY = {
    "relax.round": tirx.round,
    "relax.nn.relu": lambda a: tirx.max(a, tirx.const(0.0, "float32")),
}
NAME = "conv_dwpw"
# Taps a depthwise conv is counted with in the kernel's work (3x3: the schedule does not see them).
DW_TAPS = 9
# A fused kernel goes over threads from this many multiply-adds (~2 us on one core). With TVM's pool
# (a parallel region ~2.4 us where the second core is free) the threshold was 2^20: MobileNet 96x96's
# kernels of 5-7 us gained less than the region cost. Graphs now launch through their own claimed
# launch (claimed_launch.c), whose region costs less, and at 2^18 all five of MobileNet's fused
# kernels go parallel: alternated in one process at 2 threads (docs/graph-zoo.md, zoo12) the call
# took 0.96x the time it took with the 2^20 threshold.
MIN_PARALLEL_MACS = 1 << 18


def _static(expr: Any) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None:
        return None
    values = ty.shape.values
    return [int(v) for v in values] if all(isinstance(v, tirx.IntImm) for v in values) else None


def _channel_const(expr: Any, channels: int) -> np.ndarray | None:
    """A constant as a float32 scalar (shape ()) or one value per channel ([C]); None otherwise."""
    if not isinstance(expr, GenericConst) or str(expr.value.dtype) != "float32":
        return None
    value = expr.value.numpy()
    if value.size == 1:
        return value.reshape(())
    if value.size == channels and value.shape[-1] == channels:
        return value.reshape(channels)
    return None


def _conv_attrs(call: Any) -> dict[str, Any] | None:
    """A channels-last conv2d by a constant float32 weight: its attributes; None otherwise."""
    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.nn.conv2d":
        return None
    a = call.attrs
    w = call.args[1]
    if (
        a.data_layout != "NHWC"
        or a.kernel_layout != "OHWI"
        or a.out_layout != "NHWC"
        or (a.out_dtype and str(a.out_dtype) not in ("float32", ""))
        or not isinstance(w, GenericConst)
        or str(w.value.dtype) != "float32"
    ):
        return None
    padding = [int(p) for p in a.padding]
    return {
        "weight": w.value.numpy(),
        "strides": [int(s) for s in a.strides],
        "dilation": [int(d) for d in a.dilation],
        "groups": int(a.groups),
        "pads": padding if len(padding) == 4 else padding * 2,
    }


@relax.expr_functor.visitor
class _Uses(relax.PyExprVisitor):
    """How many times each variable is read."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def visit_var_(self, var: Any) -> None:
        self.count[var] += 1

    def visit_dataflow_var_(self, var: Any) -> None:
        self.count[var] += 1


@relax.expr_functor.mutator
class _Fuse(relax.PyExprMutator):
    def __init__(self, mod: Any, lanes: int, skip: Any):
        super().__init__(mod)
        self.mod_, self.lanes, self.skip = mod, lanes, skip
        self.bound: dict[Any, Any] = {}
        self.uses: collections.Counter = collections.Counter()

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.bound = dict(relax.analysis.get_var2val(func))
                counter = _Uses()
                counter.visit_expr(func)
                self.uses = counter.count
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def _match(self, call: Any) -> tuple[Any, dict[str, Any], list[tuple[str, Any, bool]], dict[str, Any]] | None:
        """(dw input, dw attrs, chain, pw attrs) where ``call`` is a 1x1 conv of a depthwise conv."""
        pw = _conv_attrs(call)
        if pw is None or pw["groups"] != 1 or pw["weight"].shape[1:3] != (1, 1):
            return None
        if pw["strides"] != [1, 1] or any(pw["pads"]) or _static(call.args[0]) is None:
            return None
        if self.skip(pw["weight"]):
            return None
        chain: list[tuple[str, Any, bool]] = []
        expr = call.args[0]
        channels = pw["weight"].shape[-1]
        while True:
            if not isinstance(expr, relax.Var) or self.uses[expr] != 1 or expr not in self.bound:
                return None
            value = self.bound[expr]
            if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
                return None
            op = value.op.name
            dw = _conv_attrs(value)
            if dw is not None:
                cout, *_, cig = dw["weight"].shape
                if dw["groups"] != cout or cig != 1 or cout != channels or _static(value.args[0]) is None:
                    return None
                return value.args[0], dw, chain[::-1], pw
            if op in _UNARY or (op == "relax.astype" and str(value.attrs.dtype) == "float32"):
                chain.append((op, None, False))
                expr = value.args[0]
            elif op in _BINARY:
                lhs, rhs = value.args
                const = _channel_const(rhs, channels)
                if const is not None:
                    chain.append((op, const, False))
                    expr = lhs
                    continue
                const = _channel_const(lhs, channels)
                if const is None:
                    return None
                chain.append((op, const, True))  # the constant on the left (subtract, divide)
                expr = rhs
            else:
                return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        found = self._match(call)
        if found is None:
            return super().visit_call_(call)
        x, dw, chain, pw = found
        return fused_call(self.builder_, self.visit_expr(x), dw, chain, pw, self.lanes)


def fused_call(bb: Any, x: Any, dw: dict, chain: list, pw: dict, lanes: int) -> relax.Expr:
    """The `call_te` of one fused kernel: [1, oh, ow, cout] before the pointwise conv's epilogue."""
    from edgert.compiler.schedules.conv import _conv_block
    from edgert.compiler.schedules.packing import pack

    n, h, w, c = _static(x)
    wd = dw["weight"]  # [c, kh, kw, 1]
    _, kh, kw, _ = wd.shape
    (sh, sw), (dh, dwl) = dw["strides"], dw["dilation"]
    top, left, bottom, right = dw["pads"]
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dwl * (kw - 1) - 1) // sw + 1
    taps = np.ascontiguousarray(wd.reshape(c, kh * kw).T)  # [taps, c]
    wpw = pw["weight"]  # [cout, 1, 1, c]
    cout = wpw.shape[0]
    block = _conv_block(cout, lanes)
    packed = pack(np.ascontiguousarray(wpw.reshape(cout, c).T), block)
    width = packed.shape[0] * block
    tensors = [relax.const(np.ascontiguousarray(v, np.float32)) for _, v, _ in chain if v is not None and v.ndim]

    def conv_dwpw(data: te.Tensor, wt: te.Tensor, wp: te.Tensor, *per_channel: te.Tensor) -> te.Tensor:
        def dw_value(b: Any, r: Any, q: Any, ch: Any) -> Any:
            total = None
            for i in range(kh):
                for j in range(kw):
                    y, z = r * sh + i * dh - top, q * sw + j * dwl - left
                    inside = tirx.all(y >= 0, y < h, z >= 0, z < w)
                    read = data[b, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(z, w - 1), 0), ch]
                    term = tirx.if_then_else(inside, read, tirx.const(0.0, "float32")) * wt[i * kw + j, ch]
                    total = term if total is None else total + term
            vectors = iter(per_channel)
            for op, value, const_left in chain:
                if value is None:
                    total = _UNARY[op](total) if op in _UNARY else total
                    continue
                other = next(vectors)[ch] if value.ndim else tirx.const(float(value), "float32")
                total = _BINARY[op](other, total) if const_left else _BINARY[op](total, other)
            return total

        act = te.compute([n, oh, ow, c], dw_value, name="dwpw_depthwise")
        k = te.reduce_axis((0, c), "c")
        return te.compute(
            [n, oh, ow, width],
            lambda b, r, q, j: te.sum(act[b, r, q, k] * wp[j // block, k, j % block], axis=k),
            name=NAME,
        )

    y = bb.call_te(conv_dwpw, x, relax.const(taps), relax.const(packed), *tensors)
    if width == cout:
        return y
    return relax.op.strided_slice(bb.emit(y), axes=[3], begin=[0], end=[cout], assume_inbound=True)


def fuse_depthwise_pointwise(mod: Any, target: Any) -> Any:
    """``mod`` with each depthwise conv -> elementwise chain -> 1x1 conv as one kernel (CPU targets)."""
    from edgert.compiler.schedules.int8_graph import MIN_CONV_REDUCTION, int8_isa
    from edgert.compiler.schedules.rules import _lanes

    integer = int8_isa(target) is not None

    def skip(weight: np.ndarray) -> bool:
        # A 1x1 conv the integer path takes (int8 values, enough products per output) stays alone.
        return bool(
            integer
            and weight.shape[-1] >= MIN_CONV_REDUCTION
            and np.all(weight == np.round(weight))
            and weight.min() >= -128
            and weight.max() <= 127
        )

    rewritten = _Fuse(mod, _lanes(target), skip).transform()
    return relax.transform.DeadCodeElimination()(rewritten)


class DepthwisePointwise(ScheduleRule):
    """The fused kernel's schedule: the 1x1 conv tiled as `Matmul` tiles it (row tiles of output
    positions outside column tiles of output channels), each row tile's depthwise values computed
    first under the row-tile loop, vectorized over channels; row tiles in chunks over threads."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        """Schedule ``func`` if it holds the fused kernel's two blocks; None otherwise."""
        from edgert.compiler.schedules import rules

        if not isinstance(func, tirx.PrimFunc) or not rules._is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        if NAME not in names or "dwpw_depthwise" not in names:
            return None
        mm = blocks[names.index(NAME)]
        dw = blocks[names.index("dwpw_depthwise")]
        epilogue = blocks[names.index(NAME) + 1 :]
        for b in blocks:
            if b not in (mm, dw, *epilogue):  # anything else in front (a cast): read in place
                sch.compute_inline(b)
        for b in epilogue[:-1]:
            sch.compute_inline(b)
        lanes = rules._lanes(target)
        b0, r, q, j, k = sch.get_loops(mm)
        height, width = rules._extent(sch, r), rules._extent(sch, q)
        cols, channels = rules._extent(sch, j), rules._extent(sch, k)
        col_tile = rules._column_tile(cols, lanes)
        # Row tiles inside one output row: the depthwise values a tile reads are then a box TVM
        # computes exactly (a tile across two rows made it compute whole rows).
        rows = rules._row_tile(width, col_tile, lanes)
        qo, qi = sch.split(q, factors=[None, rows])
        jo, ji = sch.split(j, factors=[None, col_tile])
        io = sch.fuse(b0, r, qo)
        sch.reorder(io, jo, k, qi, ji)
        macs = height * width * channels * (cols + DW_TAPS)
        tiles = height * -(-width // rows)
        if macs >= MIN_PARALLEL_MACS and tiles > 1:
            most = max(2, min(rules.MAX_CHUNKS, macs // rules.CHUNK_MACS))
            nc = rules.even_chunks(tiles, most)
            chunk, io = sch.split(io, factors=[nc, None])
            sch.parallel(chunk)
        acc = sch.cache_write(mm, 0, "local")
        sch.reverse_compute_at(acc, jo, preserve_unit_loops=True)
        if epilogue:
            try:
                sch.reverse_compute_inline(epilogue[-1])
            except s_tir.ScheduleError:  # an epilogue that keeps some columns (a slice): per tile
                sch.reverse_compute_at(epilogue[-1], jo, preserve_unit_loops=True)
                rules._vectorize_inner(sch, epilogue[-1], lanes)
        sch.compute_at(dw, io, preserve_unit_loops=True)
        rules._vectorize_inner(sch, dw, lanes)
        sch.unroll(qi)
        sch.vectorize(ji)
        rules._vectorize_inner(sch, acc, lanes)
        sch.decompose_reduction(mm, k)
        return sch
