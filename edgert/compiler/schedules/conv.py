"""Convolutions by constant weights as matmul-shaped kernels the `Matmul` rule schedules.

TVM's conv lowering on CPU is one scalar loop nest (a 1-D audio front end ran 10x slower than
onnxruntime). Here every 1-D/2-D convolution (strided, dilated, grouped, depthwise) becomes

    y[n, (oh,) co, ow] = sum_r W[co, r] * xp[n, g(co) * cig + r // taps, (oh*sh + kh*dh,) ow*sw + kw*dw]

with ``r`` running over one group's input channels times the kernel taps: one reduction axis,
output positions ``ow`` as the vectorized columns, output channels as the register-tiled rows
(the weight is the broadcast operand, read once per tap for a tile of ``ROWS`` channels), and
the input read in place (no im2col buffer; ``xp`` is the input zero-padded by a separate copy so
the inner loop has no bounds test). The bias and activation that follow fuse into the tile's
write-back as any matmul epilogue. 2-D outputs come out as [n, oh, co, ow] and are permuted back.

Transposed convolutions (groups 1) are the same kernel over the input with ``stride - 1`` zeros
inserted between samples and the weight flipped; where few output positions make columns too
short for vectors (silero-vad's STFT: 4 frames), im2col + the packed dense wins and is kept.

That NC(H)W path is now the fallback: graphs whose convs `layout.channels_last` converted take
the channels-last kernels below (positions as rows, output channels as vector columns), which
need no minimum output width and no permute after the conv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, te, tirx
from tvm.ir import GenericConst

from edgert.compiler.schedules import winograd


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _pad_input(bb: Any, x: relax.Expr, pads: list[tuple[int, int]], first: int = 2) -> relax.Expr:
    """``x`` zero-padded by (before, after) on the spatial axes from ``first`` on, as its own kernel
    (``first`` 2 for NC(H)W, 1 for channels-last)."""
    if not any(a or b for a, b in pads):
        return x
    rank = len(x.ty.shape.values) if x.ty.shape is not None else 0
    if first == 1 and rank == len(pads) + 2:
        # Relax's own pad: FuseOps fuses the elementwise producers (a bias and ReLU after a
        # Winograd conv) into it, where the call_tir of a TE pad stayed a kernel of its own.
        widths = [0, 0] + [v for pair in pads for v in pair] + [0, 0]
        return bb.emit(relax.op.nn.pad(x, widths))

    def pad(data: te.Tensor) -> te.Tensor:
        shape = list(data.shape)
        out = list(shape)
        for i, (a, b) in enumerate(pads):
            out[first + i] = shape[first + i] + a + b

        def value(*idx: Any) -> Any:
            src, conds = list(idx), []
            for i, (a, _) in enumerate(pads):
                pos = idx[first + i] - a
                conds += [pos >= 0, pos < shape[first + i]]
                src[first + i] = tirx.max(tirx.min(pos, shape[first + i] - 1), 0)
            return tirx.if_then_else(tirx.all(*conds), data[tuple(src)], tirx.const(0.0, "float32"))

        return te.compute(out, value, name="conv_pad")

    return bb.emit(bb.call_te(pad, x))


def _upsample_input(
    bb: Any, x: relax.Expr, strides: list[int], pads: list[tuple[int, int]], first: int = 2
) -> relax.Expr:
    """``x`` with ``stride - 1`` zeros between samples, then zero-padded (a transposed conv's input),
    on the spatial axes from ``first`` on."""

    def upsample(data: te.Tensor) -> te.Tensor:
        shape = list(data.shape)
        out = list(shape)
        for i, (s, (a, b)) in enumerate(zip(strides, pads, strict=True)):
            out[first + i] = (shape[first + i] - 1) * s + 1 + a + b

        def value(*idx: Any) -> Any:
            src, conds = list(idx), []
            for i, (s, (a, _)) in enumerate(zip(strides, pads, strict=True)):
                pos = idx[first + i] - a
                conds += [pos >= 0, pos % s == 0, pos // s < shape[first + i]]
                src[first + i] = tirx.max(tirx.min(pos // s, shape[first + i] - 1), 0)
            return tirx.if_then_else(tirx.all(*conds), data[tuple(src)], tirx.const(0.0, "float32"))

        return te.compute(out, value, name="conv_upsample")

    return bb.emit(bb.call_te(upsample, x))


def _direct(
    bb: Any, xp: relax.Expr, weight: np.ndarray, strides: list[int], dilation: list[int], groups: int, out_sp: list[int]
) -> relax.Expr:
    """The conv kernel over the padded input ``xp``: [n, co, ow] (1-D) or [n, oh, co, ow] (2-D)."""
    co, cig, *taps = weight.shape
    cog = co // groups
    ntaps = int(np.prod(taps))
    w2 = relax.const(np.ascontiguousarray(weight.reshape(co, cig * ntaps)))

    def conv(data: te.Tensor, w: te.Tensor) -> te.Tensor:
        n = data.shape[0]
        r = te.reduce_axis((0, cig * ntaps), "r")
        c = r // ntaps
        if len(taps) == 1:
            return te.compute(
                [n, co, out_sp[0]],
                lambda b, o, p: te.sum(
                    w[o, r] * data[b, o // cog * cig + c, p * strides[0] + r % ntaps * dilation[0]], axis=r
                ),
                name="conv_direct",
            )
        kw = taps[1]

        def value(b: Any, oh: Any, o: Any, ow: Any) -> Any:
            tap = r % ntaps
            ih = oh * strides[0] + tap // kw * dilation[0]
            iw = ow * strides[1] + tap % kw * dilation[1]
            return te.sum(w[o, r] * data[b, o // cog * cig + c, ih, iw], axis=r)

        return te.compute([n, out_sp[0], co, out_sp[1]], value, name="conv_direct")

    y = bb.call_te(conv, xp, w2)
    if len(taps) == 1:
        return y
    return relax.op.permute_dims(bb.emit(y), [0, 2, 1, 3])


def _direct_channels_last(
    bb: Any,
    xp: relax.Expr,
    weight: np.ndarray,
    strides: list[int],
    dilation: list[int],
    out_sp: list[int],
    groups: int,
    lanes: int,
    first_input: bool = False,
    pads: list[tuple[int, int]] | None = None,
) -> relax.Expr:
    """The conv kernel over the channels-last input ``xp``: [n, *out_sp, co].

    Groups 1: ``y[n, p, j] = sum_r xp[n, pos(p, r // cig), r % cig] * Wp[j // B, r, j % B]``, a GEMM
    whose B operand is the weight packed as a dense one (`packing.pack`) and whose A operand is
    the input read in place (input channels innermost in ``r``: contiguous reads along the
    reduction). Grouped: the same with input channel ``g(j) * cig + r % cig``, in column tiles
    that never straddle two groups (the group is then one per tile, a scalar read); the tile
    width is in the kernel's name for the `Matmul` rule (``conv_cl_colsN``). Depthwise:
    ``y[n, p, c] = sum_t xp[n, pos(p, t), c] * W[t, c]``, vectorized over channels. The
    `Matmul` rule tiles them all (positions as rows, channels as vector columns).
    ``first_input``: ``xp`` is channels-first (a graph input with a few channels, read in place
    rather than transposed by a kernel of its own). With ``pads``, ``xp`` is unpadded and read as
    zero outside.
    """
    from edgert.compiler.schedules.packing import pack

    co, *taps, cig = weight.shape
    cog = co // groups
    ntaps = int(np.prod(taps))
    nsp = len(taps)

    def position(idx: list[Any], tap: list[Any]) -> list[Any]:
        """Input coordinates of output position ``idx`` for kernel tap ``tap``."""
        return [idx[i] * strides[i] + tap[i] * dilation[i] for i in range(nsp)]

    def flat(tap: list[Any]) -> Any:
        index = tap[0]
        for i in range(1, nsp):
            index = index * taps[i] + tap[i]
        return index

    # One reduction loop per tap axis and one over channels (the `Matmul` rule keeps them as
    # loops: flattened, every step divided its index back into tap and channel).

    def read(data: te.Tensor, b: Any, coords: list[Any], c: Any) -> Any:
        def at(where: list[Any]) -> Any:
            return data[(b, c, *where)] if first_input else data[(b, *where, c)]

        if pads is None or not any(a or z for a, z in pads):
            return at(coords)
        # Unpadded input: the border test is on the read, per position and tap, outside the
        # vector of channels (a scalar read for a dense conv, a whole vector for a depthwise one).
        sizes = list(data.shape[2:] if first_input else data.shape[1:-1])
        conds, src = [], []
        for i, pos in enumerate(coords):
            pos = pos - pads[i][0]
            conds += [pos >= 0, pos < sizes[i]]
            src.append(tirx.max(tirx.min(pos, sizes[i] - 1), 0))
        return tirx.if_then_else(tirx.all(*conds), at(src), tirx.const(0.0, "float32"))

    if groups > 1 and cig == 1 and cog == 1:
        wt = relax.const(np.ascontiguousarray(weight.reshape(co, ntaps).T))

        def conv_dw(data: te.Tensor, w: te.Tensor) -> te.Tensor:
            tap = [te.reduce_axis((0, t), f"k{i}") for i, t in enumerate(taps)]
            return te.compute(
                [data.shape[0], *out_sp, co],
                lambda b, *rest: te.sum(
                    read(data, b, position(list(rest[:-1]), tap), rest[-1]) * w[flat(tap), rest[-1]], axis=tap
                ),
                name="conv_cl_depthwise",
            )

        return bb.call_te(conv_dw, xp, wt)
    if groups == 1:
        block, name = _conv_block(co, lanes), "conv_cl"
    else:
        from edgert.compiler.schedules.rules import _column_tile

        block = _column_tile(cog, lanes)
        block = block if cog % block == 0 else cog
        name = f"conv_cl_cols{block}"
    k_len = ntaps * cig
    packed = pack(np.ascontiguousarray(weight.reshape(co, k_len).T), block)
    width = packed.shape[0] * block

    def channel(j: Any, c: Any) -> Any:
        return c if groups == 1 else j // cog * cig + c

    def conv_cl(data: te.Tensor, w: te.Tensor) -> te.Tensor:
        tap = [te.reduce_axis((0, t), f"k{i}") for i, t in enumerate(taps)]
        c = te.reduce_axis((0, cig), "c")
        return te.compute(
            [data.shape[0], *out_sp, width],
            lambda b, *rest: te.sum(
                read(data, b, position(list(rest[:-1]), tap), channel(rest[-1], c))
                * w[rest[-1] // block, flat(tap) * cig + c, rest[-1] % block],
                axis=[*tap, c],
            ),
            name=name,
        )

    y = bb.call_te(conv_cl, xp, relax.const(packed))
    if width == co:
        return y
    # Zero-padded columns keep every column tile whole (as for dense weights); the slice fuses
    # into the consumer.
    y = bb.emit(y)
    return relax.op.strided_slice(y, axes=[nsp + 1], begin=[0], end=[co], assume_inbound=True)


def _conv_block(co: int, lanes: int) -> int:
    """Columns per packed weight tile: two vectors, one where only that divides ``co``."""
    return lanes if co % (2 * lanes) and co % lanes == 0 else 2 * lanes


def _f32_conv(x_ty: Any, w: Any, a: Any, rank: int) -> bool:
    """Whether a conv of ``rank`` takes a float32 input by a constant float32 weight into float32."""
    return (
        isinstance(w, GenericConst)
        and w.value.dtype == "float32"
        and isinstance(x_ty, relax.TensorType)
        and x_ty.dtype == "float32"
        and x_ty.ndim == rank
        and not (a.out_dtype and str(a.out_dtype) not in ("float32", ""))
    )


def _channels_last(bb: Any, call: relax.Call, lanes: int, lookup: Any = None) -> relax.Expr | None:
    """The channels-last kernel for a NWC/NHWC conv1d/conv2d/conv1d_transpose/conv2d_transpose ``call``."""
    x, w = call.args
    a = call.attrs
    name = call.op.name
    rank = 3 if "1d" in name else 4
    x_ty = x.ty
    if (
        not _f32_conv(x_ty, w, a, rank)
        or a.out_layout != a.data_layout
        or x_ty.shape is None
        or not all(isinstance(d, tirx.IntImm) for d in x_ty.shape.values)
    ):
        return None
    weight = w.value.numpy()
    groups, nsp = int(a.groups), rank - 2
    spatial = [int(d) for d in x_ty.shape.values[1:-1]]
    strides, dilation = _ints(a.strides), _ints(a.dilation)
    padding = _ints(a.padding)
    before, after = padding[:nsp], padding[nsp:] if len(padding) == 2 * nsp else padding[:nsp]
    if "transpose" in name:
        if groups != 1 or a.kernel_layout not in ("IOW", "IOHW"):
            return _via_channels_first(bb, call, lanes)
        # conv_transpose(x) == conv(x upsampled by the stride, padded by d*(k-1) - pad, W flipped, I<->O)
        taps = list(weight.shape[2:])
        out_pad = _ints(a.output_padding)
        pads = []
        for i in range(nsp):
            edge = dilation[i] * (taps[i] - 1)
            pads.append((edge - before[i], edge - after[i] + out_pad[i]))
        if any(p < 0 for pair in pads for p in pair):
            return _via_channels_first(bb, call, lanes)
        flipped = np.flip(weight, axis=tuple(range(2, rank))).transpose(1, *range(2, rank), 0)  # [co, *taps, ci]
        sizes = [(spatial[i] - 1) * strides[i] + 1 + sum(pads[i]) for i in range(nsp)]
        out_sp = [sizes[i] - dilation[i] * (taps[i] - 1) for i in range(nsp)]
        xp = _upsample_input(bb, x, strides, pads, first=1)
        return _direct_channels_last(bb, xp, np.ascontiguousarray(flipped), [1] * nsp, dilation, out_sp, 1, lanes)
    if a.kernel_layout not in ("OWI", "OHWI"):
        return _via_channels_first(bb, call, lanes)
    taps = list(weight.shape[1:-1])
    out_sp = [
        (spatial[i] + before[i] + after[i] - dilation[i] * (taps[i] - 1) - 1) // strides[i] + 1 for i in range(nsp)
    ]
    source = _transposed_from(x, lookup, rank)
    pads = list(zip(before, after, strict=True))
    if source is not None and weight.shape[-1] * groups <= FIRST_INPUT_CHANNELS:
        return _direct_channels_last(bb, source, weight, strides, dilation, out_sp, groups, lanes, True, pads)
    if groups > 1 and weight.shape[-1] == 1 and groups == weight.shape[0]:
        # A depthwise conv does a few multiply-adds per input read: a padding kernel of its own
        # (and its call and buffer) cost more than the border test.
        return _direct_channels_last(bb, x, weight, strides, dilation, out_sp, groups, lanes, False, pads)
    xp = _pad_input(bb, x, pads, first=1)
    if (
        nsp == 2
        and groups == 1
        and int(x_ty.shape.values[0]) == 1
        and winograd.fits(weight.shape, strides, dilation, out_sp, lanes)
    ):
        return winograd.conv(bb, xp, weight, dilation[0], out_sp, lanes)
    return _direct_channels_last(bb, xp, weight, strides, dilation, out_sp, groups, lanes)


# Up to this many input channels a conv reads a channels-first tensor in place (an image's 3)
# instead of after a transpose: the transpose of a 3x96x96 image took 40% of a small MobileNet.
FIRST_INPUT_CHANNELS = 4


def _transposed_from(x: relax.Expr, lookup: Any, rank: int) -> relax.Expr | None:
    """The channels-first tensor ``x`` is the channels-last transpose of, if it is one."""
    if lookup is None or not isinstance(x, relax.Var):
        return None
    bound = lookup(x)
    if not isinstance(bound, relax.Call) or getattr(bound.op, "name", "") != "relax.permute_dims":
        return None
    axes = bound.attrs.axes
    if axes is None or [int(a) for a in axes] != [0, *range(2, rank), 1]:
        return None
    return bound.args[0]


def _via_channels_first(bb: Any, call: relax.Call, lanes: int) -> relax.Expr | None:
    """A channels-last conv the channels-last kernel does not cover (grouped, transposed) as the
    channels-first kernel between two transposes; None for a weight layout it does not know."""
    x, w = call.args
    a = call.attrs
    name = call.op.name
    rank = 3 if "1d" in name else 4
    nsp = rank - 2
    to_first, to_last = [0, rank - 1, *range(1, rank - 1)], [0, *range(2, rank), 1]
    weight = w.value.numpy()
    layout = str(a.kernel_layout)
    if layout in ("OWI", "OHWI"):
        weight, layout = np.ascontiguousarray(weight.transpose(to_first)), "OIW" if nsp == 1 else "OIHW"
    elif layout not in ("OIW", "OIHW", "IOW", "IOHW"):
        return None
    data = "NCW" if nsp == 1 else "NCHW"
    xf = bb.emit(relax.op.permute_dims(x, to_first))
    kw = {
        "strides": _ints(a.strides),
        "padding": _ints(a.padding),
        "dilation": _ints(a.dilation),
        "groups": int(a.groups),
        "data_layout": data,
        "kernel_layout": layout,
        "out_layout": data,
    }
    op = getattr(relax.op.nn, name.split(".")[-1])
    if "transpose" in name:
        kw["output_padding"] = _ints(a.output_padding)
    first = op(xf, relax.const(weight), **kw)
    y = rewrite_conv(bb, first, lanes)
    return relax.op.permute_dims(bb.emit(first if y is None else y), to_last)


def rewrite_conv(bb: Any, call: relax.Call, min_columns: int, lookup: Any = None) -> relax.Expr | None:
    """The direct kernel for a conv1d/conv2d/conv1d_transpose/conv2d_transpose ``call`` by a constant
    f32 weight; None where it does not apply. Channels-last convs (`layout.channels_last`) take the
    channels-last kernel (``min_columns`` is then the target's f32 lanes). In NC(H)W, None also
    where the output has fewer than ``min_columns`` positions along its last axis (then the
    caller's im2col path, or TVM's). ``lookup`` (a mutator's ``lookup_binding``) lets a conv see
    that its input is a transpose it can read through."""
    name = call.op.name
    if name not in ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv1d_transpose", "relax.nn.conv2d_transpose"):
        return None
    x, w = call.args
    a = call.attrs
    if a.data_layout in ("NWC", "NHWC"):
        return _channels_last(bb, call, min_columns, lookup)
    x_ty = x.ty
    rank = 3 if "1d" in name else 4
    if not _f32_conv(x_ty, w, a, rank) or a.data_layout not in ("NCW", "NCHW") or a.out_layout not in ("NCW", "NCHW"):
        return None
    shape = x_ty.shape
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape.values):
        return None
    spatial = [int(d) for d in shape.values[2:]]
    weight = w.value.numpy()
    strides, dilation, groups = _ints(a.strides), _ints(a.dilation), int(a.groups)
    nsp = rank - 2
    padding = _ints(a.padding)
    before, after = padding[:nsp], padding[nsp:] if len(padding) == 2 * nsp else padding[:nsp]
    if "transpose" in name:
        if groups != 1 or a.kernel_layout not in ("IOW", "IOHW"):
            return None
        out_pad = _ints(a.output_padding)
        taps = list(weight.shape[2:])
        # conv_transpose(x) == conv(x upsampled by the stride, padded by d*(k-1) - pad, W flipped, I<->O)
        pads = []
        for i in range(nsp):
            edge = dilation[i] * (taps[i] - 1)
            pads.append((edge - before[i], edge - after[i] + out_pad[i]))
        if any(p < 0 for pair in pads for p in pair):
            return None
        flipped = np.ascontiguousarray(np.flip(weight, axis=tuple(range(2, rank))).transpose(1, 0, *range(2, rank)))
        sizes = [(spatial[i] - 1) * strides[i] + 1 + sum(pads[i]) for i in range(nsp)]
        out_sp = [sizes[i] - dilation[i] * (taps[i] - 1) for i in range(nsp)]
        if out_sp[-1] < min_columns:
            return None
        xp = _upsample_input(bb, x, strides, pads)
        return _direct(bb, xp, flipped, [1] * nsp, dilation, 1, out_sp)
    if a.kernel_layout not in ("OIW", "OIHW"):
        return None
    taps = list(weight.shape[2:])
    out_sp = [
        (spatial[i] + before[i] + after[i] - dilation[i] * (taps[i] - 1) - 1) // strides[i] + 1 for i in range(nsp)
    ]
    if out_sp[-1] < min_columns:
        return None
    xp = _pad_input(bb, x, list(zip(before, after, strict=True)))
    return _direct(bb, xp, weight, strides, dilation, groups, out_sp)
