"""Graph rewrite: convolutions in channels-last layout (NWC / NHWC), consistently through the graph.

In NC(H)W a conv's output positions are the vectorized columns; a small feature map (8x8, 6x6:
the late layers of an image net) gives rows too short for a vector, and a depthwise conv has
no channel reduction to tile at all. Channels-last makes every conv a GEMM over positions x
output channels (`edgert.compiler.schedules.conv`), a depthwise conv a per-channel multiply-add
vectorized over channels, and pooling a reduction vectorized over channels. TVM's
``ConvertLayout`` carries the layout through the elementwise ops and pools between convs, so
the only transposes left are at the graph's edges (and around ops it does not know).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst

log = logging.getLogger(__name__)

DESIRED = {"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv1d": ["NWC", "OWI"]}


@relax.expr_functor.mutator
class _ScalarClamps(relax.PyExprMutator):
    """``call_tir(maximum|minimum, (x, scalar))`` (ONNX Clip as the importer emits it) as Relax ops.

    A ``call_tir`` is opaque to ConvertLayout: every ReLU6 between two convs became a
    transpose pair. As ``R.maximum``/``R.minimum`` the layout passes through.
    """

    def __init__(self, mod: Any):
        super().__init__(mod)
        self.mod_ = mod
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self.call_tir or not isinstance(call.args[0], tvm.ir.GlobalVar):
            return call
        name = call.args[0].name_hint.rstrip("0123456789_")
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        if name not in ("maximum", "minimum") or len(args) != 2:
            return call
        x, bound = args
        if not isinstance(bound, GenericConst) or bound.value.numpy().ndim != 0:
            return call
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.dtype != bound.value.dtype or ty.dtype != call.ty.dtype:
            return call
        op = relax.op.maximum if name == "maximum" else relax.op.minimum
        return op(x, bound)

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def _scalar(expr: Any) -> np.ndarray | None:
    """The value of a constant with one element, else None."""
    if not isinstance(expr, GenericConst):
        return None
    value = expr.value.numpy()
    return value.reshape(()) if value.size == 1 else None


@relax.expr_functor.mutator
class _ScalarQDQ(relax.PyExprMutator):
    """``quantize``/``dequantize`` by a constant scalar scale and zero point as the elementwise ops
    of their legalization (`tvm.relax.transform.legalize_ops.qdq`), the same arithmetic.

    ConvertLayout knows no layout rule for them: in an int8 QDQ graph every conv sat between
    transposes to NCHW and back (the float32 copies cost more than the int8 convs' gain).
    Elementwise, the channels-last layout passes through.
    """

    def __init__(self, mod: Any):
        super().__init__(mod)
        self.mod_ = mod
        self.quantize = tvm.ir.Op.get("relax.quantize")
        self.dequantize = tvm.ir.Op.get("relax.dequantize")
        self.astype = tvm.ir.Op.get("relax.astype")
        self.params: set[Any] = set()
        self.clamped: set[Any] = set()  # the rounded, clamped floats of the quantizes rewritten

    def _integral(self, x: relax.Expr) -> relax.Expr | None:
        """For ``x = astype(clamped, int8|uint8)`` with ``clamped`` a quantize's rounded and
        clamped float (below): ``clamped``, which holds the same values as float32."""
        inner = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if not (isinstance(inner, relax.Call) and inner.op == self.astype):
            return None
        clamped = inner.args[0]
        return clamped if clamped in self.clamped else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op == self.astype and str(call.attrs.dtype) == "float32":
            # The quantized value back in float32 (the next layer's input): no int8 round trip.
            clamped = self._integral(call.args[0])
            # An identity cast, not the variable itself: ConvertLayout sends a variable bound to
            # another variable back to the initial layout (a transpose pair around it).
            return call if clamped is None else relax.op.astype(clamped, "float32")
        if call.op not in (self.quantize, self.dequantize):
            return call
        scale, zp = _scalar(call.args[1]), _scalar(call.args[2])
        x, out = call.args[0], str(call.attrs.out_dtype)
        ty = x.ty
        if scale is None or zp is None or scale.dtype != np.float32 or not isinstance(ty, relax.TensorType):
            return call
        if call.op == self.quantize:
            # A graph input's quantize stays: fused with the transpose at the graph's edge it took
            # 2 us on MobileNet's 96x96 image, as elementwise ops in NCHW 16 us.
            if ty.dtype != "float32" or out not in ("uint8", "int8") or x in self.params:
                return call
            info = np.iinfo(out)
            # x / 1 is x (the requantization's QuantizeLinear by 1): no division per element.
            scaled = x if scale == 1.0 else relax.op.divide(x, relax.const(scale))
            v = relax.op.add(relax.op.round(scaled), relax.const(zp.astype(np.float32)))
            v = relax.op.minimum(v, relax.const(np.float32(info.max)))
            clamped = self.builder_.emit(relax.op.maximum(v, relax.const(np.float32(info.min))))
            self.clamped.add(clamped)
            return relax.op.astype(clamped, out)
        if ty.dtype not in ("uint8", "int8") or out != "float32":
            return call
        clamped = self._integral(x)
        if clamped is not None:
            return relax.op.multiply(relax.op.subtract(clamped, relax.const(zp.astype(np.float32))), relax.const(scale))
        sub = relax.op.subtract(relax.op.astype(x, "int32"), relax.const(zp.astype(np.int32)))
        return relax.op.multiply(relax.op.astype(sub, "float32"), relax.const(scale))

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.params = set(func.params)
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@relax.expr_functor.mutator
class _FoldPermutes(relax.PyExprMutator):
    """``permute_dims(permute_dims(x, a), b)`` as one permute, and identity permutes dropped.

    ConvertLayout leaves such pairs where the graph's own transpose (a conformer's [0, 2, 1]
    around its conv module) meets the one it inserts; each is a full copy of the tensor.
    """

    def __init__(self, mod: Any):
        super().__init__(mod)
        self.mod_ = mod
        self.permute = tvm.ir.Op.get("relax.permute_dims")

    def _axes(self, call: relax.Call) -> list[int] | None:
        ty = call.args[0].ty
        if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
            return None
        if call.attrs.axes is None:
            return list(range(ty.ndim))[::-1]
        return [int(a) for a in call.attrs.axes]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self.permute:
            return call
        axes = self._axes(call)
        if axes is None:
            return call
        x = call.args[0]
        inner = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if isinstance(inner, relax.Call) and inner.op == self.permute:
            first = self._axes(inner)
            if first is not None:
                x = inner.args[0]
                axes = [first[a] for a in axes]
        if axes == list(range(len(axes))):
            return x
        if x is call.args[0]:
            return call
        return relax.op.permute_dims(x, axes)

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def _static_convs(mod: Any) -> bool:
    """True if ``mod`` has convolutions and every one has a fully known input shape."""
    found, static = [False], [True]

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in DESIRED:
            found[0] = True
            ty = expr.args[0].ty
            shape = ty.shape if isinstance(ty, relax.TensorType) else None
            if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
                static[0] = False

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found[0] and static[0]


def scalar_qdq(mod: Any) -> Any:
    """``mod`` with its scalar-parameter quantize/dequantize as elementwise ops (`_ScalarQDQ`)."""
    return _ScalarQDQ(mod).transform()


def channels_last(mod: Any) -> Any:
    """``mod`` with its 1-D/2-D convolutions (and what lies between them) in channels-last layout.

    Only where every conv's input shape is known: on a symbolic length (silero-vad's audio chunk)
    TVM's ConvertLayout ran out of memory, and those convs keep their NC(H)W kernels.
    """
    if not _static_convs(mod):
        return scalar_qdq(mod)
    mod = scalar_qdq(_ScalarClamps(mod).transform())
    try:
        converted = relax.transform.ConvertLayout(DESIRED)(mod)
    except tvm.error.InternalError as exc:
        # TVM's layout inference fails on some graphs (silero-vad: std::bad_alloc); their convs
        # keep the NC(H)W kernels.
        log.info("convolutions stay channels-first: ConvertLayout failed (%s)", str(exc).splitlines()[0])
        return mod
    mod = converted
    # The transposed weights are constants again, as the conv rewrite expects.
    mod = relax.transform.FoldConstant()(mod)
    mod = _FoldPermutes(mod).transform()
    return relax.transform.DeadCodeElimination()(mod)
