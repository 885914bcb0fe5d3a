"""Graph rewrite: matmuls by a constant weight read a weight packed at compile time.

``x[..., K] @ W[K, N]`` becomes ``y[..., n] = sum_k x[..., k] * Wp[n // B, k, n % B]`` with
``Wp = W`` reshaped to ``[ceil(N/B), K, B]`` (zero-padded): the B columns of one output tile are
contiguous for every k, so the `Matmul` rule's tiles stream their weights linearly instead of
striding across rows of W (measured on a 128x384 @ 384x1536 f32 matmul, one thread, loaded
machine: 21 -> 32 GFLOP/s, numpy 27-39). B is two vectors of the target.

With ``quant`` the packed weight is stored as f16, or group-wise int8 / int4 with one f32
scale per group of `GROUP` values along K per column, and dequantized inside the matmul.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.ir import GenericConst

from edgert.compiler.schedules.packing import pack

GROUP = 32


def block_for(target: Any) -> int:
    """Columns per packed tile: two vectors of f32 for ``target``."""
    from edgert.compiler.schedules.rules import _lanes

    return 2 * _lanes(target)


def quantize(wp: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group-wise quantization of a packed weight along K.

    Returns (codes, scales): int8 codes in [-127, 127] (8 bits) or [-8, 7] (4 bits, two per
    byte along K, low nibble first, stored as uint8), scales [N/B, ceil(K/G), B] f32.
    """
    nb, k, b = wp.shape
    pad = -k % GROUP
    w = np.pad(wp, ((0, 0), (0, pad), (0, 0))) if pad else wp
    groups = w.reshape(nb, -1, GROUP, b)
    top = 127 if bits == 8 else 7
    scale = np.abs(groups).max(axis=2) / top
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(groups / scale[:, :, None, :]), -top - (bits == 4), top).astype(np.int8)
    codes = codes.reshape(nb, -1, b)[:, :k, :]
    if bits == 4:
        if k % 2:
            codes = np.pad(codes, ((0, 0), (0, 1), (0, 0)))
        u = (codes + 8).astype(np.uint8)
        codes = (u[:, 0::2, :] | (u[:, 1::2, :] << 4)).astype(np.uint8)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scale.astype(np.float32))


def dequantize(codes: np.ndarray, scale: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The f32 packed weight that (codes, scales) stand for (for measuring the accuracy cost)."""
    if bits == 4:
        lo = (codes & 15).astype(np.int8) - 8
        hi = (codes >> 4).astype(np.int8) - 8
        codes = np.stack([lo, hi], axis=2).reshape(codes.shape[0], -1, codes.shape[2])[:, :k, :]
    g = np.repeat(scale, GROUP, axis=1)[:, :k, :]
    return codes.astype(np.float32) * g


def _packed_te(n: int, block: int, quant: str, k_len: int) -> Any:
    def compute(x: te.Tensor, *weights: te.Tensor) -> te.Tensor:
        lead = list(x.shape[:-1])
        k = te.reduce_axis((0, k_len), "k")

        def weight(j: Any, kk: Any) -> Any:
            jo, ji = j // block, j % block
            if quant in ("f32", "f16"):
                return weights[0][jo, kk, ji].astype("float32")
            scale = weights[1][jo, kk // GROUP, ji]
            if quant == "q8":
                return weights[0][jo, kk, ji].astype("float32") * scale
            byte = weights[0][jo, kk // 2, ji]
            nibble = tirx.bitwise_and(tirx.shift_right(byte, (kk % 2 * 4).astype("uint8")), tirx.const(15, "uint8"))
            return (nibble.astype("float32") - 8.0) * scale

        return te.compute(
            [*lead, n],
            lambda *idx: te.sum(x[(*idx[:-1], k)] * weight(idx[-1], k), axis=k),
            name="packed_matmul",
        )

    return compute


@relax.expr_functor.mutator
class _PackDense(relax.PyExprMutator):
    def __init__(self, mod: Any, block: int, quant: str, int8_isa: str | None = None):
        super().__init__(mod)
        self.mod_, self.block, self.quant, self.int8_isa = mod, block, quant, int8_isa
        self.matmul = tvm_op("relax.matmul")
        self.conv1d = tvm_op("relax.nn.conv1d")
        self.take = tvm_op("relax.take")
        self.errors: list[tuple[np.ndarray, np.ndarray]] = []
        self.int_convs: dict = {}  # VNNI convs' outputs (int32, or fused bytes): what follows them fuses

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op == self.take and call.attrs.mode == "fast":
            # Gathers index with the caller's data (token ids): "fast" reads out of bounds on a bad
            # id; "clip" stays inside the table, as the LLM runtime's embedding does.
            axis = None if call.attrs.axis is None else int(call.attrs.axis)
            return relax.op.take(call.args[0], call.args[1], axis, mode="clip")
        if self.int_convs and isinstance(call.op, tvm.ir.Op):
            from edgert.compiler.schedules.int8_graph import fuse_requantize, narrowed, pool_quantized

            # An integer conv's requantization into the conv's write-back, the bytes' cast back, and
            # a max pool of their dequantized values on the bytes.
            fused = fuse_requantize(self.builder_, call, self.lookup_binding, self.int_convs)
            if fused is None:
                fused = narrowed(call, self.lookup_binding)
            if fused is None:
                fused = pool_quantized(self.builder_, call, self.lookup_binding)
            if fused is not None:
                return fused
        if isinstance(call.op, tvm.ir.Op) and call.op.name.startswith("relax.nn.conv"):
            from edgert.compiler.schedules.conv import rewrite_conv

            if self.int8_isa:
                from edgert.compiler.schedules.int8_graph import rewrite_int_conv

                # A conv of int8 values (QLinearConv, QDQ Conv) by int8 weights: integer dot products.
                integer = rewrite_int_conv(self.builder_, call, self.lookup_binding, self.int8_isa, self.int_convs)
                if integer is not None:
                    return integer

            # Direct kernels where output rows are long enough for whole vectors; im2col otherwise.
            direct = rewrite_conv(self.builder_, call, self.block // 2, self.lookup_binding)
            if direct is not None:
                return direct
        if call.op == self.conv1d:
            return self._conv1d(call)
        if call.op != self.matmul or len(call.args) != 2:
            return call
        if self.int8_isa and str(call.attrs.out_dtype) == "int32":
            from edgert.compiler.schedules.int8_graph import rewrite_int_matmul

            # MatMulInteger by an int8 weight (onnxruntime's dynamic quantizer): integer dot products.
            integer = rewrite_int_matmul(self.builder_, call, self.lookup_binding, self.int8_isa)
            if integer is not None:
                return integer
        x, w = call.args
        if not isinstance(w, GenericConst) or len(w.value.shape) != 2 or w.value.dtype != "float32":
            return call
        x_ty = x.ty
        if not isinstance(x_ty, relax.TensorType) or x_ty.dtype != "float32" or x_ty.ndim < 2:
            return call
        return self._dense(x, w.value.numpy())

    def _conv1d(self, call: relax.Call) -> relax.Expr:
        """conv1d by a constant weight as unfold (im2col) + packed matmul + transpose.

        TVM's conv1d lowering has no CPU schedule that vectorizes well; as a matmul it takes the
        `Matmul` rule (silero-vad's STFT convolution: 2.8 ms -> see tools/peers/graph.py).
        """
        x, w = call.args
        a = call.attrs
        x_ty = x.ty
        if (
            not isinstance(w, GenericConst)
            or w.value.dtype != "float32"
            or a.groups != 1
            or a.data_layout != "NCW"
            or a.kernel_layout != "OIW"
            or a.out_layout != "NCW"
            or not isinstance(x_ty, relax.TensorType)
            or x_ty.ndim != 3
            or x_ty.dtype != "float32"
        ):
            return call
        weight = w.value.numpy()  # [Co, Ci, Kw]
        co, ci, kw = weight.shape
        stride, dilation = int(a.strides[0]), int(a.dilation[0])
        pad_l, pad_r = int(a.padding[0]), int(a.padding[1])

        def unfold(data: te.Tensor) -> te.Tensor:
            n, _, length = data.shape
            out_w = (length + pad_l + pad_r - dilation * (kw - 1) - 1) // stride + 1

            def value(b: Any, p: Any, r: Any) -> Any:
                c, tap = r // kw, r % kw
                pos = p * stride + tap * dilation - pad_l
                inside = tirx.all(pos >= 0, pos < length)
                return tirx.if_then_else(inside, data[b, c, tirx.max(tirx.min(pos, length - 1), 0)], 0.0)

            return te.compute([n, out_w, ci * kw], value, name="unfold")

        cols = self.builder_.emit(self.builder_.call_te(unfold, x))
        y = self.builder_.emit(self._dense(cols, np.ascontiguousarray(weight.reshape(co, ci * kw).T)))
        return relax.op.permute_dims(y, [0, 2, 1])

    def _dense(self, x: relax.Expr, weight: np.ndarray) -> relax.Expr:
        k, n = weight.shape
        # One vector per tile where only that divides N (144 columns: 160 padded took 11% more).
        block = self.block // 2 if n % self.block and n % (self.block // 2) == 0 else self.block
        packed = pack(weight, block)
        if self.quant == "f32":
            consts = [relax.const(packed)]
        elif self.quant == "f16":
            consts = [relax.const(packed.astype(np.float16))]
            self.errors.append((packed, packed.astype(np.float16).astype(np.float32)))
        else:
            bits = 8 if self.quant == "q8" else 4
            codes, scale = quantize(packed, bits)
            consts = [relax.const(codes), relax.const(scale)]
            self.errors.append((packed, dequantize(codes, scale, k, bits)))
        width = packed.shape[0] * block
        y = self.builder_.call_te(_packed_te(width, block, self.quant, k), x, *consts)
        if width == n:
            return y
        # Columns past N are the packing's zero padding. Computing them keeps every column tile whole,
        # so the `Matmul` rule's vector tiles apply (silero-vad's STFT, 258 columns: 66 -> 5 us per call); the
        # slice fuses into the consumer.
        y = self.builder_.emit(y)
        return relax.op.strided_slice(y, axes=[x.ty.ndim - 1], begin=[0], end=[n], assume_inbound=True)

    def transform(self) -> Any:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def tvm_op(name: str) -> Any:
    """The Relax operator registered as ``name``."""
    import tvm

    return tvm.ir.Op.get(name)


def pack_dense_weights(mod: Any, target: Any, quant: str = "f32") -> tuple[Any, float | None]:
    """Rewrite matmuls by constant f32 weights to packed (and quantized) weights.

    Returns the module and, when weights were rounded, the largest relative RMS error over
    the rewritten weights (the weight-side accuracy cost).
    """
    from edgert.compiler.schedules.int8_graph import int8_isa

    rewriter = _PackDense(mod, block_for(target), quant, int8_isa(target))
    # Transposes a conv now reads through are left unused.
    mod = relax.transform.DeadCodeElimination()(rewriter.transform())
    if rewriter.int_convs:
        # So are the int32 convs whose requantization took their place (DCE keeps any PrimFunc: each
        # carries a global symbol).
        called = {
            gv.name_hint
            for f in mod.functions.values()
            if isinstance(f, relax.Function)
            for gv in relax.analysis.all_global_vars(f)
        }
        mod = mod.clone()
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("u8s8_conv") and gv.name_hint not in called:
                del mod[gv]
    if not rewriter.errors:
        return mod, None
    rel = [float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(a**2)) or 1.0)) for a, b in rewriter.errors]
    return mod, max(rel)
