"""int8 ONNX operators TVM's importer lacks, rewritten into ones it has (with `onnx.helper`).

QLinearConv, QLinearMatMul, ConvInteger and onnxruntime's contrib DynamicQuantizeMatMul, QGemm
and QLinearGlobalAveragePool become DequantizeLinear -> the float op -> QuantizeLinear (or a cast
to int32 for the *Integer ops). Weight dequantization folds to constants at import. Why this is
within one quantization step of onnxruntime's integer kernels: the products of the dequantized
int8/uint8 values are exact in f32 and their sums are exact while below 2^24 (one rounding of
~6e-8 relative beyond), so the only difference is the final rounding to the output's integer
grid, which can fall on the other side of a half step: at most one step. The *Integer ops'
int32 outputs are exact under the same bound. Other contrib operators stay refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MS = "com.microsoft"
HANDLED = {
    ("", "QLinearConv"),
    ("", "QLinearMatMul"),
    ("", "ConvInteger"),
    (_MS, "DynamicQuantizeMatMul"),
    (_MS, "QGemm"),
    (_MS, "QLinearGlobalAveragePool"),
}


def _key(node: Any) -> tuple[str, str]:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return domain, node.op_type


def needs_expansion(model: Any) -> bool:
    """Whether ``model`` has any operator :func:`expand_quantized` rewrites."""
    return any(_key(n) in HANDLED for n in model.graph.node)


def expand_quantized(model: Any) -> Any:
    """Rewrite the int8 operators of ``HANDLED`` in ``model``'s main graph (in place); return it."""
    from onnx import helper, numpy_helper

    graph = model.graph
    # ConvInteger outputs read only by casts to float (what quantize_dynamic writes) stay float:
    # TVM lowers a float -> int32 cast with finite and range tests that took LLVM ~10 s a kernel.
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    float_only = {
        n.output[0]
        for n in graph.node
        if _key(n) == ("", "ConvInteger")
        and n.output[0] not in outputs
        and all(r.op_type == "Cast" and _cast_to(r) == 1 for r in readers.get(n.output[0], []))
    }
    nodes: list[Any] = []
    inits: list[Any] = []
    for i, node in enumerate(graph.node):
        key = _key(node)
        if node.op_type == "Cast" and node.input and node.input[0] in float_only:
            nodes.append(helper.make_node("Identity", [node.input[0] + "__f32"], list(node.output)))
            continue
        if key not in HANDLED:
            nodes.append(node)
            continue
        p = f"{node.name or node.output[0]}__q{i}_"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [*node.input, *[""] * 9]

        def dq(x: str, scale: str, zp: str, out: str, axis: int | None = None) -> Any:
            kw = {} if axis is None else {"axis": axis}
            return helper.make_node("DequantizeLinear", [x, scale, zp] if zp else [x, scale], [out], **kw)

        def q(x: str, scale: str, zp: str, out: str) -> Any:
            return helper.make_node("QuantizeLinear", [x, scale, zp] if zp else [x, scale], [out])

        def int_operand(x: str, zp: str, out: str) -> list[Any]:
            """``float(x) - float(zp)`` (an integer operand with its zero point removed)."""
            made = [helper.make_node("Cast", [x], [out + "f"], to=1)]
            if not zp:
                return [*made, helper.make_node("Identity", [out + "f"], [out])]
            made += [
                helper.make_node("Cast", [zp], [out + "z"], to=1),
                helper.make_node("Sub", [out + "f", out + "z"], [out]),
            ]
            return made

        def per_channel(w: str, v: str, out: str, on_weight: bool, made: list[Any] = nodes) -> str:
            """``v`` with per-output-channel values ([Co]) reshaped to broadcast over the conv weight
            ``w``'s [Co, Ci, ...] (``on_weight``) or the conv's output [N, Co, ...]; a scalar as it is."""
            if not v or _numel(model, v) <= 1:
                return v
            shape = np.array([-1] + [1] * (_rank_of(model, w) - (1 if on_weight else 2)), np.int64)
            inits.append(numpy_helper.from_array(shape, out + "s"))
            made.append(helper.make_node("Reshape", [v, out + "s"], [out]))
            return out

        def requantize(acc: str, as_: str, bs: str, ys: str, yz: str, out: str, p: str = p) -> list[Any]:
            """``saturate(round(acc * (as * bs / ys)) + yz)``: QuantizeLinear by scale 1."""
            one = p + "one"
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            return [
                helper.make_node("Mul", [as_, bs], [p + "m0"]),
                helper.make_node("Div", [p + "m0", ys], [p + "m"]),
                helper.make_node("Mul", [acc, p + "m"], [p + "yf"]),
                q(p + "yf", one, yz, out),
            ]

        conv_attrs = {
            k: v for k, v in attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
        }
        if key == ("", "QLinearConv"):
            # onnxruntime's QLinearConv: an int32 accumulator (bias included), then
            # float(acc) * (xs * ws / ys) rounded half to even, plus the zero point, saturated.
            # The accumulator is computed in f32 on integer values (exact below 2^24), the
            # multiplier by the same f32 operations: the same output bytes.
            x, xs, xz, w, ws, wz, ys, yz, b = ins[:9]
            nodes += int_operand(x, xz, p + "x")
            nodes += int_operand(w, per_channel(w, wz, p + "wz", True), p + "w")
            conv_in = [p + "x", p + "w"]
            if b:
                nodes.append(helper.make_node("Cast", [b], [p + "b"], to=1))
                conv_in.append(p + "b")
            nodes.append(helper.make_node("Conv", conv_in, [p + "acc"], **conv_attrs))
            nodes += requantize(p + "acc", xs, per_channel(w, ws, p + "ws", False), ys, yz, node.output[0])
        elif key == ("", "QLinearMatMul"):
            # As QLinearConv: MatMulInteger's exact int32 accumulator, requantized as onnxruntime does.
            a, as_, az, b, bs, bz, ys, yz = ins[:8]
            mm_in = [a, b, az, bz] if bz else [a, b, az] if az else [a, b]
            nodes.append(helper.make_node("MatMulInteger", mm_in, [p + "acc"]))
            nodes.append(helper.make_node("Cast", [p + "acc"], [p + "accf"], to=1))
            nodes += requantize(p + "accf", as_, bs, ys, yz, node.output[0])
        elif key == ("", "ConvInteger"):
            x, w, xz, wz = ins[:4]
            nodes += int_operand(x, xz, p + "x")
            wz_name = per_channel(w, wz, p + "wzr", True)
            nodes += int_operand(w, wz_name, p + "w")
            nodes += [
                helper.make_node("Conv", [p + "x", p + "w"], [p + "y"], **conv_attrs),
                # No Round: a sum of integer products is an integer in f32 (exact below 2^24; every f32
                # above is an integer), and Round's lowering made the fused kernel take 13 s in LLVM.
                helper.make_node("Cast", [p + "y"], [node.output[0]], to=6),
            ]
            if node.output[0] in float_only:  # the int32 round trip is the identity: skip its casts
                nodes[-1] = helper.make_node("Identity", [p + "y"], [node.output[0] + "__f32"])
        elif key == (_MS, "DynamicQuantizeMatMul"):
            a, b, bs, bz, bias = ins[:5]
            axis = 1 if _numel(model, bs) > 1 else None
            nodes += [
                helper.make_node("DynamicQuantizeLinear", [a], [p + "aq", p + "as", p + "az"]),
                dq(p + "aq", p + "as", p + "az", p + "a"),
                dq(b, bs, bz, p + "b", axis=axis),
                helper.make_node("MatMul", [p + "a", p + "b"], [p + "y" if bias else node.output[0]]),
            ]
            if bias:
                nodes.append(helper.make_node("Add", [p + "y", bias], [node.output[0]]))
        elif key == (_MS, "QGemm"):
            a, as_, az, b, bs, bz, c, ys, yz = ins[:9]
            axis = (0 if attrs.get("transB", 0) else 1) if _numel(model, bs) > 1 else None
            nodes += [dq(a, as_, az, p + "a"), dq(b, bs, bz, p + "b", axis=axis)]
            gemm_in = [p + "a", p + "b"]
            alpha = float(attrs.get("alpha", 1.0))
            if c:  # int32 bias at the accumulator's scale as * bs
                nodes += [
                    helper.make_node("Mul", [as_, bs], [p + "cs"]),
                    helper.make_node("Cast", [c], [p + "cf"], to=1),
                    helper.make_node("Mul", [p + "cf", p + "cs"], [p + "c"]),
                ]
                gemm_in.append(p + "c")
            gemm_attrs = {"alpha": alpha, "transA": int(attrs.get("transA", 0)), "transB": int(attrs.get("transB", 0))}
            out = p + "y" if ys else node.output[0]
            nodes.append(helper.make_node("Gemm", gemm_in, [out], **gemm_attrs))
            if ys:
                nodes.append(q(out, ys, yz, node.output[0]))
        elif key == (_MS, "QLinearGlobalAveragePool"):
            from edgert.errors import UnsupportedModelError

            if attrs.get("channels_last", 0):
                raise UnsupportedModelError(
                    f"QLinearGlobalAveragePool node {node.name}: channels_last is not supported"
                )
            x, xs, xz, ys, yz = ins[:5]
            nodes += [
                dq(x, xs, xz, p + "x"),
                helper.make_node("GlobalAveragePool", [p + "x"], [p + "y"]),
                q(p + "y", ys, yz, node.output[0]),
            ]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    # The contrib domain may now be unused; onnx's checker does not mind an extra opset import.
    return model


def _cast_to(node: Any) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def _initializer(model: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _numel(model: Any, name: str) -> int:
    """Elements of initializer ``name`` (1 when it is not an initializer: a per-tensor value)."""
    arr = _initializer(model, name)
    return 1 if arr is None else int(arr.size)


def _rank_of(model: Any, name: str) -> int:
    arr = _initializer(model, name)
    return 0 if arr is None else arr.ndim
