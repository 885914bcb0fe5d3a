"""Lower an NPU partition of an ONNX graph to the float op graph (`ir.Graph`) in TFLite terms.

Layouts: ONNX is NCHW, TFLite convolutions and pools are NHWC. Each value is kept in the
layout its producer gives; an op that needs the other inserts a TRANSPOSE (int8, on the NPU),
so a chain of convolutions, pools and element-wise ops stays NHWC and the partition's inputs
and outputs stay in ONNX's layout. Tensor names are the ONNX names (``name/nhwc`` for the NHWC
copy); ``stat_of`` maps each IR activation to the ONNX tensor whose calibration range it takes.
"""

from __future__ import annotations

import numpy as np

from edgert.compiler.npu.graph import GraphInfo, Partition, Unit, Unlowerable, attr
from edgert.compiler.npu.ir import Graph, Tensor
from edgert.compiler.npu.reference import conv_padding

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
# A Concat whose inputs' calibrated ranges differ more than this stays on the CPU: int8
# CONCATENATION requantizes nothing, so the narrow inputs would lose most of their resolution
# (silero-vad's state packs the LSTM's h, within ±1, with its cell state c, within ±47).
CONCAT_SPREAD = 4.0


class Lowerer:
    def __init__(self, info: GraphInfo) -> None:
        self.info = info
        self.g = Graph()
        self.stat_of: dict[str, str] = {}
        self.layout: dict[str, set[str]] = {}  # onnx name -> layouts available ("nchw", "nhwc")
        self.n = 0

    # -- tensors --------------------------------------------------------------------------
    def act(self, ir_name: str, shape, onnx_name: str) -> str:
        self.g.add(Tensor(ir_name, tuple(int(d) for d in shape), "float32"))
        self.stat_of[ir_name] = onnx_name
        return ir_name

    def define(self, onnx_name: str, layout: str) -> str:
        """The IR tensor for a unit output ``onnx_name`` produced in ``layout``."""
        shape = self.info.shapes[onnx_name]
        name = onnx_name if layout == "nchw" else onnx_name + "/nhwc"
        if layout == "nhwc":
            shape = tuple(shape[i] for i in TO_NHWC)
        self.layout.setdefault(onnx_name, set()).add(layout)
        return self.act(name, shape, onnx_name)

    def input(self, onnx_name: str) -> str:
        self.g.inputs.append(self.define(onnx_name, "nchw"))
        return onnx_name

    def has(self, onnx_name: str, layout: str) -> bool:
        return layout in self.layout.get(onnx_name, set())

    def get(self, onnx_name: str, layout: str = "nchw") -> str:
        """``onnx_name`` in ``layout``, transposing (once) if it is only in the other."""
        if onnx_name not in self.layout:
            raise Unlowerable(f"'{onnx_name}' is not an activation of this partition")
        if self.has(onnx_name, layout):
            return onnx_name if layout == "nchw" else onnx_name + "/nhwc"
        if len(self.info.shapes[onnx_name]) != 4:
            raise Unlowerable(f"'{onnx_name}' is not 4-D")
        src = self.get(onnx_name, "nhwc" if layout == "nchw" else "nchw")
        dst = self.define(onnx_name, layout)
        perm = TO_NHWC if layout == "nhwc" else TO_NCHW
        self.g.op("TRANSPOSE", [src, self.i32(perm)], [dst], origin="layout")
        return dst

    def const(self, data: np.ndarray, hint: str = "c") -> str:
        self.n += 1
        return self.g.const(f"{hint}/{self.n}", np.asarray(data, np.float32))

    def i32(self, values) -> str:
        self.n += 1
        return self.g.const(f"i32/{self.n}", np.asarray(values, np.int32))

    # -- units ----------------------------------------------------------------------------
    def unit(self, u: Unit) -> None:
        n = u.nodes[0]
        k = u.kind
        info = self.info
        fn = getattr(self, f"_{k.lower()}", None)
        if fn is None:
            raise Unlowerable(f"{k} has no lowering")
        fn(u, n, info)

    def _fc(self, x: str, w: np.ndarray, b: np.ndarray | None, out: str, origin: str) -> None:
        xs = self.info.shapes[x]
        if w.shape[1] != xs[-1]:
            raise Unlowerable("weight and input sizes differ")
        b = np.zeros(w.shape[0], np.float32) if b is None else np.broadcast_to(b, (w.shape[0],))
        y = self.define(out, "nchw")
        self.g.op(
            "FULLY_CONNECTED",
            [self.get(x), self.const(w, "w"), self.const(b, "b")],
            [y],
            origin=origin,
            keep_num_dims=len(xs) > 2,
        )

    def _linear(self, u, n, info):
        add = u.nodes[1]
        bias = info.const(add.input[1] if add.input[0] == n.output[0] else add.input[0])
        self._fc(n.input[0], np.ascontiguousarray(info.const(n.input[1]).T), bias, add.output[0], u.name)

    def _matmul(self, u, n, info):
        w = info.const(n.input[1])
        if w is not None:
            if w.ndim != 2:
                raise Unlowerable("constant MatMul operand of rank other than 2")
            return self._fc(n.input[0], np.ascontiguousarray(w.T), None, n.output[0], u.name)
        if info.const(n.input[0]) is not None:
            raise Unlowerable("constant left MatMul operand")
        a, b = info.shapes[n.input[0]], info.shapes[n.input[1]]
        if len(a) != len(b) or len(a) < 3 or a[:-2] != b[:-2]:
            raise Unlowerable("BATCH_MATMUL operands need equal batch dimensions")
        y = self.define(n.output[0], "nchw")
        self.g.op("BATCH_MATMUL", [self.get(n.input[0]), self.get(n.input[1])], [y], origin=u.name)

    def _gemm(self, u, n, info):
        if attr(n, "transA", 0):
            raise Unlowerable("Gemm with transA")
        w = info.const(n.input[1])
        if w is None:
            raise Unlowerable("Gemm with a non-constant B")
        w = w if attr(n, "transB", 0) else w.T
        w = np.ascontiguousarray(w * attr(n, "alpha", 1.0))
        c = info.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if len(n.input) > 2 and n.input[2] and c is None:
            raise Unlowerable("Gemm with a non-constant C")
        b = None if c is None else np.broadcast_to(c.reshape(-1) * attr(n, "beta", 1.0), (w.shape[0],))
        self._fc(n.input[0], w, b, n.output[0], u.name)

    def _padding(self, n, shape_hw, kernel, strides, dilations) -> tuple[str, list[tuple[int, int]] | None]:
        auto = attr(n, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER",):
            return "SAME", None
        if auto == "VALID":
            return "VALID", None
        if auto != "NOTSET":
            raise Unlowerable(f"auto_pad {auto}")
        pads = list(attr(n, "pads", [0, 0, 0, 0]))
        pairs = [(pads[0], pads[2]), (pads[1], pads[3])]
        if all(p == (0, 0) for p in pairs):
            return "VALID", None
        same = [
            conv_padding(s, k, st, d, "SAME")[1:]
            for s, k, st, d in zip(shape_hw, kernel, strides, dilations, strict=True)
        ]
        if same == pairs:
            return "SAME", None
        return "VALID", pairs

    def _conv1d(self, u, n, info):
        """A 1-D Conv [N, C, L] as a 2-D one of height 1: NLC rows reshaped to NHWC, and back."""
        w = info.const(n.input[1])
        xs, ys = info.shapes[n.input[0]], info.shapes[n.output[0]]
        group = attr(n, "group", 1)
        if group != 1:
            raise Unlowerable("grouped 1-D convolution")
        stride, dil = attr(n, "strides", [1])[0], attr(n, "dilations", [1])[0]
        auto = attr(n, "auto_pad", b"NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
            raise Unlowerable("1-D Conv with auto_pad")
        pads = list(attr(n, "pads", [0, 0]))
        b = info.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0], np.float32)
        if b is None:
            raise Unlowerable("Conv with a non-constant bias")
        self.n += 1
        tag = f"{n.output[0]}/conv1d{self.n}"
        nlc = self.act(f"{tag}/nlc", (xs[0], xs[2], xs[1]), n.input[0])
        self.g.op("TRANSPOSE", [self.get(n.input[0]), self.i32((0, 2, 1))], [nlc], origin=u.name)
        x4 = self.act(f"{tag}/nhwc_in", (xs[0], 1, xs[2], xs[1]), n.input[0])
        self.g.op(
            "RESHAPE",
            [nlc, self.i32(self.g.tensors[x4].shape)],
            [x4],
            origin=u.name,
            new_shape=self.g.tensors[x4].shape,
        )
        padding, pairs = "VALID", None
        if any(pads):
            same = conv_padding(xs[2], w.shape[2], stride, dil, "SAME")[1:]
            padding, pairs = ("SAME", None) if tuple(pads) == same else ("VALID", [(0, 0), tuple(pads)])
        if pairs is not None:
            shp = self.g.tensors[x4].shape
            padded = self.act(f"{tag}/pad", (shp[0], 1, shp[2] + sum(pairs[1]), shp[3]), n.input[0])
            self.g.op("PAD", [x4, self.i32([[0, 0], [0, 0], list(pairs[1]), [0, 0]])], [padded], origin=u.name)
            x4 = padded
        y4 = self.act(f"{tag}/nhwc_out", (ys[0], 1, ys[2], ys[1]), n.output[0])
        wt = np.ascontiguousarray(w.transpose(0, 2, 1)[:, None])  # [O, 1, k, I]
        self.g.op(
            "CONV_2D",
            [x4, self.const(wt, "w"), self.const(b, "b")],
            [y4],
            origin=u.name,
            padding=padding,
            stride=(1, stride),
            dilation=(1, dil),
        )
        ylc = self.act(f"{tag}/nlc_out", (ys[0], ys[2], ys[1]), n.output[0])
        self.g.op(
            "RESHAPE",
            [y4, self.i32(self.g.tensors[ylc].shape)],
            [ylc],
            origin=u.name,
            new_shape=self.g.tensors[ylc].shape,
        )
        y = self.define(n.output[0], "nchw")
        self.g.op("TRANSPOSE", [ylc, self.i32((0, 2, 1))], [y], origin=u.name)

    def _conv(self, u, n, info):
        w = info.const(n.input[1])
        xs = info.shapes[n.input[0]]
        if w is not None and w.ndim == 3 and len(xs) == 3:
            return self._conv1d(u, n, info)
        if w is None or w.ndim != 4 or len(xs) != 4:
            raise Unlowerable("Conv other than 1-D or 2-D with constant weights")
        group = attr(n, "group", 1)
        strides = tuple(attr(n, "strides", [1, 1]))
        dil = tuple(attr(n, "dilations", [1, 1]))
        padding, pads = self._padding(n, xs[2:], w.shape[2:], strides, dil)
        b = info.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0], np.float32)
        if b is None:
            raise Unlowerable("Conv with a non-constant bias")
        x = self.get(n.input[0], "nhwc")
        if pads is not None:
            self.n += 1
            shp = self.g.tensors[x].shape
            padded = self.act(
                f"{x}/pad{self.n}", (shp[0], shp[1] + sum(pads[0]), shp[2] + sum(pads[1]), shp[3]), n.input[0]
            )
            self.g.op("PAD", [x, self.i32([[0, 0], list(pads[0]), list(pads[1]), [0, 0]])], [padded], origin=u.name)
            x = padded
        y = self.define(n.output[0], "nhwc")
        opts = {"padding": padding, "stride": strides, "dilation": dil}
        if group == 1:
            wt = np.ascontiguousarray(w.transpose(0, 2, 3, 1))
            self.g.op("CONV_2D", [x, self.const(wt, "w"), self.const(b, "b")], [y], origin=u.name, **opts)
        elif group == xs[1] and w.shape[1] == 1 and w.shape[0] % group == 0:
            wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))  # [1, kh, kw, C*mult]
            self.g.op(
                "DEPTHWISE_CONV_2D",
                [x, self.const(wt, "w"), self.const(b, "b")],
                [y],
                origin=u.name,
                depth_multiplier=w.shape[0] // group,
                **opts,
            )
        else:
            raise Unlowerable("grouped convolution other than depthwise")

    def _binary(self, u, n, info, kind: str):
        out_shape = info.shapes[n.output[0]]
        acts = [i for i in n.input if info.const(i) is None]
        if not acts:
            raise Unlowerable("only constant inputs")
        nhwc = len(out_shape) == 4 and all(self.has(a, "nhwc") for a in acts)
        layout = "nhwc" if nhwc else "nchw"
        ins = []
        for i in n.input:
            c = info.const(i)
            if c is None:
                if len(info.shapes[i]) != len(out_shape):
                    raise Unlowerable("element-wise operands of different ranks")
                ins.append(self.get(i, layout))
                continue
            c = np.asarray(c, np.float32)
            if kind == "DIV":
                c = 1.0 / c
            c = c.reshape((1,) * (len(out_shape) - c.ndim) + c.shape)
            if nhwc:
                c = c.transpose(TO_NHWC)
            ins.append(self.const(c))
        if kind == "DIV":
            if info.const(n.input[1]) is None:
                raise Unlowerable("division by a non-constant")
            kind = "MUL"
        y = self.define(n.output[0], layout)
        self.g.op(kind, ins, [y], origin=u.name)

    def _add(self, u, n, info):
        self._binary(u, n, info, "ADD")

    def _sub(self, u, n, info):
        self._binary(u, n, info, "SUB")

    def _mul(self, u, n, info):
        self._binary(u, n, info, "MUL")

    def _div(self, u, n, info):
        self._binary(u, n, info, "DIV")

    def _unary(self, u, x: str, out: str, kind: str, **opts):
        layout = "nhwc" if self.has(x, "nhwc") else "nchw"
        xi = self.get(x, layout)
        y = self.define(out, layout)
        self.g.op(kind, [xi], [y], origin=u.name, **opts)

    def _relu(self, u, n, info):
        self._unary(u, n.input[0], n.output[0], "RELU")

    def _clip(self, u, n, info):
        lo = info.const(n.input[1]) if len(n.input) > 1 and n.input[1] else attr(n, "min", None)
        hi = info.const(n.input[2]) if len(n.input) > 2 and n.input[2] else attr(n, "max", None)
        if lo is None or hi is None or float(np.asarray(lo)) != 0.0 or float(np.asarray(hi)) != 6.0:
            raise Unlowerable("Clip other than [0, 6]")
        self._unary(u, n.input[0], n.output[0], "RELU6")

    def _sigmoid(self, u, n, info):
        self._unary(u, n.input[0], n.output[0], "LOGISTIC")

    def _tanh(self, u, n, info):
        self._unary(u, n.input[0], n.output[0], "TANH")

    def _gelu(self, u, n, info):
        self._unary(u, n.input[0], u.nodes[-1].output[0], "GELU")

    def _softmax(self, u, n, info):
        rank = len(info.shapes[n.input[0]])
        if attr(n, "axis", -1) not in (-1, rank - 1):
            raise Unlowerable("Softmax over an axis other than the last")
        y = self.define(n.output[0], "nchw")
        self.g.op("SOFTMAX", [self.get(n.input[0])], [y], origin=u.name, beta=1.0)

    def _reshape(self, u, n, info):
        shape = info.shapes[n.output[0]]
        y = self.define(n.output[0], "nchw")
        self.g.op("RESHAPE", [self.get(n.input[0]), self.i32(shape)], [y], origin=u.name, new_shape=shape)

    _flatten = _squeeze = _unsqueeze = _reshape

    def _cast(self, u, n, info):
        """A float-to-float Cast (exporters leave them around dtype-generic code) is a no-op."""
        if info.dtypes.get(n.input[0]) != info.dtypes.get(n.output[0]):
            raise Unlowerable("Cast between types")
        self._reshape(u, n, info)

    def _pad(self, u, n, info):
        """Constant pads: none (an alias), zeros (PAD) or reflection of a 3-D [N, C, L] tensor's last
        axis (MIRROR_PAD on a [N, C, L, 1] view: Vela mirrors only height and width)."""
        pads = info.const(n.input[1]) if len(n.input) > 1 and n.input[1] else attr(n, "pads", None)
        if pads is None:
            raise Unlowerable("Pad with computed pads")
        if len(n.input) > 3 and n.input[3]:
            raise Unlowerable("Pad with axes")
        pads = [int(p) for p in np.asarray(pads).ravel()]
        mode = attr(n, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        xs, ys = info.shapes[n.input[0]], info.shapes[n.output[0]]
        rank = len(xs)
        pairs = [(pads[i], pads[i + rank]) for i in range(rank)]
        if any(p < 0 for pair in pairs for p in pair):
            raise Unlowerable("Pad with negative pads")
        if not any(pads):
            return self._reshape(u, n, info)
        if mode == "constant":
            value = info.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if value is not None and float(np.asarray(value).ravel()[0]) != 0.0:
                raise Unlowerable("Pad with a non-zero constant")
            y = self.define(n.output[0], "nchw")
            self.g.op("PAD", [self.get(n.input[0]), self.i32(pairs)], [y], origin=u.name)
            return
        if mode != "reflect" or rank != 3 or any(p for pair in pairs[:2] for p in pair):
            raise Unlowerable(f"Pad mode {mode} other than reflecting the last axis of a 3-D tensor")
        self.n += 1
        tag = f"{n.output[0]}/mirror{self.n}"
        x4 = self.act(f"{tag}/in", (*xs, 1), n.input[0])
        self.g.op("RESHAPE", [self.get(n.input[0]), self.i32((*xs, 1))], [x4], origin=u.name, new_shape=(*xs, 1))
        y4 = self.act(f"{tag}/out", (*ys, 1), n.output[0])
        self.g.op("MIRROR_PAD", [x4, self.i32([*pairs, (0, 0)])], [y4], origin=u.name, mode="REFLECT")
        y = self.define(n.output[0], "nchw")
        self.g.op("RESHAPE", [y4, self.i32(ys)], [y], origin=u.name, new_shape=ys)

    def _slice(self, u, n, info):
        """A Slice with constant starts, ends and axes, steps of 1: SLICE (an alias when it keeps all)."""
        xs, ys = info.shapes[n.input[0]], info.shapes[n.output[0]]
        args = [info.const(i) if i else None for i in list(n.input[1:]) + [""] * (5 - len(n.input))]
        starts, ends, axes, steps = args[:4]
        if starts is None or ends is None or (len(n.input) > 3 and n.input[3] and axes is None):
            raise Unlowerable("Slice with computed bounds")
        if steps is not None and np.any(np.asarray(steps) != 1):
            raise Unlowerable("Slice with steps other than 1")
        axes = range(len(starts)) if axes is None else [int(a) % len(xs) for a in np.asarray(axes).ravel()]
        begin = [0] * len(xs)
        for a, st in zip(axes, np.asarray(starts).ravel(), strict=True):
            begin[a] = int(np.clip(st + xs[a] if st < 0 else st, 0, xs[a]))
        if tuple(ys) == tuple(xs):
            return self._reshape(u, n, info)
        y = self.define(n.output[0], "nchw")
        self.g.op("SLICE", [self.get(n.input[0]), self.i32(begin), self.i32(ys)], [y], origin=u.name)

    def _elu(self, u, n, info):
        """ELU(x) = RELU(x) + (EXP(x) - 1), EXP's int8 output saturating at 1 (Vela has no ELU; its
        EXP is a lookup table): for x > 0 the second term is 0, for x <= 0 the first."""
        if float(attr(n, "alpha", 1.0)) != 1.0:
            raise Unlowerable("ELU with alpha other than 1")
        x, out = n.input[0], n.output[0]
        layout = "nhwc" if self.has(x, "nhwc") else "nchw"
        xi = self.get(x, layout)
        shape = self.g.tensors[xi].shape
        self.n += 1
        tag = f"{out}/elu{self.n}"
        r = self.act(f"{tag}/relu", shape, out)
        self.g.op("RELU", [xi], [r], origin=u.name)
        e = self.act(f"{tag}/exp", shape, out)
        self.g.op("EXP", [xi], [e], origin=u.name, out_range=(0.0, 1.0))
        em1 = self.act(f"{tag}/exp_minus_1", shape, out)
        self.g.op("ADD", [e, self.const(np.full((1,) * len(shape), -1.0, np.float32))], [em1], origin=u.name,
                  out_range=(-1.0, 0.0))  # fmt: skip
        y = self.define(out, layout)
        self.g.op("ADD", [r, em1], [y], origin=u.name)

    def _lstm(self, u, n, info):
        from edgert.compiler.npu.lstm import lower_lstm

        lower_lstm(self, u)

    def _transpose(self, u, n, info):
        perm = tuple(attr(n, "perm", None) or range(len(info.shapes[n.input[0]]))[::-1])
        if perm == TO_NHWC and self.has(n.input[0], "nhwc"):  # already there: an alias
            y = self.define(n.output[0], "nchw")
            self.g.op(
                "RESHAPE",
                [self.get(n.input[0], "nhwc"), self.i32(info.shapes[n.output[0]])],
                [y],
                origin=u.name,
                new_shape=info.shapes[n.output[0]],
            )
            return
        y = self.define(n.output[0], "nchw")
        self.g.op("TRANSPOSE", [self.get(n.input[0]), self.i32(perm)], [y], origin=u.name)

    def _concat(self, u, n, info):
        rank = len(info.shapes[n.output[0]])
        axis = attr(n, "axis", 0) % rank
        if any(info.const(i) is not None for i in n.input):
            raise Unlowerable("Concat of a constant")
        spans = [max(abs(v) for v in info.ranges[i]) for i in n.input if i in info.ranges]
        if spans and min(spans) > 0 and max(spans) > CONCAT_SPREAD * min(spans):
            raise Unlowerable(
                f"Concat of inputs whose ranges differ {max(spans) / min(spans):.0f}-fold "
                "(int8 CONCATENATION gives all inputs one scale)"
            )
        nhwc = rank == 4 and all(self.has(i, "nhwc") for i in n.input)
        if nhwc:
            axis = TO_NHWC.index(axis)
        layout = "nhwc" if nhwc else "nchw"
        y = self.define(n.output[0], layout)
        self.g.op("CONCATENATION", [self.get(i, layout) for i in n.input], [y], origin=u.name, axis=axis)

    def _pool(self, u, n, info, kind: str):
        xs = info.shapes[n.input[0]]
        if len(xs) != 4 or attr(n, "ceil_mode", 0) or any(d != 1 for d in attr(n, "dilations", [1, 1])):
            raise Unlowerable("pooling other than 2-D, floor mode, no dilation")
        if kind == "AVERAGE_POOL_2D" and attr(n, "count_include_pad", 0):
            raise Unlowerable("average pooling that counts padding")
        kernel = tuple(attr(n, "kernel_shape"))
        strides = tuple(attr(n, "strides", [1, 1]))
        padding, pads = self._padding(n, xs[2:], kernel, strides, (1, 1))
        if pads is not None:
            raise Unlowerable("pooling padding other than SAME/VALID")
        x = self.get(n.input[0], "nhwc")
        y = self.define(n.output[0], "nhwc")
        self.g.op(kind, [x], [y], origin=u.name, kernel=kernel, stride=strides, padding=padding)

    def _maxpool(self, u, n, info):
        self._pool(u, n, info, "MAX_POOL_2D")

    def _averagepool(self, u, n, info):
        self._pool(u, n, info, "AVERAGE_POOL_2D")

    def _globalaveragepool(self, u, n, info):
        xs = info.shapes[n.input[0]]
        if len(xs) != 4:
            raise Unlowerable("GlobalAveragePool other than 2-D")
        x = self.get(n.input[0], "nhwc")
        y = self.define(n.output[0], "nhwc")
        self.g.op("AVERAGE_POOL_2D", [x], [y], origin=u.name, kernel=tuple(xs[2:]), stride=(1, 1), padding="VALID")


def fuse_activations(g: Graph) -> Graph:
    """Fold a RELU/RELU6 into the FULLY_CONNECTED/CONV/ADD before it when nothing else reads between."""
    readers: dict[str, int] = {}
    for op in g.ops:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    producer = {op.outputs[0]: op for op in g.ops}
    fused = []
    for op in g.ops:
        src = producer.get(op.inputs[0]) if op.kind in ("RELU", "RELU6") else None
        if (
            src is not None
            and src.kind in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL")
            and not src.options.get("fused_activation")
            and readers.get(op.inputs[0], 0) == 1
            and op.inputs[0] not in g.outputs
        ):
            dead = src.outputs[0]
            src.outputs = [op.outputs[0]]
            src.options["fused_activation"] = op.kind
            del g.tensors[dead]
            continue
        fused.append(op)
    g.ops = fused
    return g


def follow_scaled_outputs(g: Graph) -> None:
    """Carry a rescaled tensor's factors (``g.scaled_outputs``, per channel of the last axis)
    through the RESHAPEs that keep that axis, to the partition outputs the host multiplies back."""
    pending, final = dict(g.scaled_outputs), {}
    while pending:
        t, k = pending.popitem()
        if t in g.outputs:
            final[t] = k
        for op in g.ops:
            if t not in op.inputs:
                continue
            y = op.outputs[0]
            if op.kind != "RESHAPE" or g.tensors[y].shape[-1] != len(k):
                raise ValueError(f"rescaled tensor '{t}' is read by {op.kind}, which does not keep its channels")
            g.ranges[y] = g.ranges[t]
            pending[y] = k
    g.scaled_outputs = final


def lower_partition(info: GraphInfo, part: Partition) -> tuple[Graph, dict[str, str]]:
    """The float op graph of an NPU partition and the calibration source of each activation."""
    L = Lowerer(info)
    for t in part.inputs:
        L.input(t)
    for u in part.units:
        L.unit(u)
    L.g.outputs = [L.get(t, "nchw") for t in part.outputs]
    g = fuse_activations(L.g)
    read = {i for op in g.ops for i in op.inputs}
    replaced = {src for src, _k in g.scaled_inputs.values()}
    g.inputs = [i for i in g.inputs if i in read or i not in replaced]  # fed rescaled instead
    follow_scaled_outputs(g)
    used = read | set(g.outputs) | set(g.inputs)
    g.tensors = {k: v for k, v in g.tensors.items() if k in used or any(k in op.outputs for op in g.ops)}
    return g, L.stat_of


def lowering_problem(info: GraphInfo, u: Unit) -> str | None:
    """Why ``u`` cannot be lowered (None when it can): a dry run on a scratch graph."""
    L = Lowerer(info)
    for t in u.inputs:
        L.input(t)
    try:
        L.unit(u)
    except Unlowerable as e:
        return str(e)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        return f"cannot lower: {type(e).__name__}: {e}"
    return None
