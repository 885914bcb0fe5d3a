"""int8 ONNX operators TVM's importer lacks, rewritten into ones it has (with `onnx.helper`).

QLinearConv and QLinearMatMul become an integer accumulator (a float conv of integer values, or
MatMulInteger) and onnxruntime's requantization, ``saturate(round(float(acc) * (xs * ws / ys)) +
yz)`` by the same f32 operations: the same output bytes, as long as the conv's sums stay below
2^24 (exact in f32). ConvInteger becomes a float conv of integer values (exact under the same
bound); onnxruntime's contrib DynamicQuantizeMatMul, QGemm and QLinearGlobalAveragePool become
DequantizeLinear -> the float op (-> QuantizeLinear), within one quantization step (a final
rounding on the other side of a half step). `integer_qdq` rewrites QDQ-form layers by constant
int8 weights into these operators first. Other contrib operators stay refused by name.
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
            # The output's full rank [1, Co, 1...]: TVM's layout conversion passes a binary op only
            # where both operands have the same rank.
            rank = _rank_of(model, w)
            shape = np.array([-1] + [1] * (rank - 1) if on_weight else [1, -1] + [1] * (rank - 2), np.int64)
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


def _scalar_init(model: Any, name: str) -> bool:
    arr = _initializer(model, name) if name else None
    return arr is not None and arr.size == 1


def integer_qdq(model: Any) -> Any:
    """QDQ-form layers by a constant int8 weight (onnxruntime's ``quantize_static``) as integer ops
    (in place; returns ``model``).

    ``DequantizeLinear(xq) . DequantizeLinear(W int8) -> MatMul | Gemm`` becomes MatMulInteger
    (the VNNI kernel where the target has it) then ``float(acc) * (xs * ws)``, the float form of
    onnxruntime's MatMulIntegerToFloat; where a QuantizeLinear alone reads the result, the pair
    requantizes as QLinearMatMul does. ``... -> Conv -> QuantizeLinear`` becomes QLinearConv,
    as onnxruntime's own QDQ fusion makes it. Everything else stays as it is.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    def dq_of(name: str) -> Any:
        n = producer.get(name)
        return n if n is not None and _key(n) == ("", "DequantizeLinear") else None

    def activation(name: str) -> Any:  # DequantizeLinear of a uint8 tensor, per-tensor scale
        n = dq_of(name)
        if n is None or len(n.input) < 3 or not _scalar_init(model, n.input[1]):
            return None
        zp = _initializer(model, n.input[2])
        return n if zp is not None and zp.size == 1 and zp.dtype == np.uint8 else None

    def weight(name: str) -> tuple[Any, np.ndarray] | None:  # DequantizeLinear of a constant int8, zero point 0
        n = dq_of(name)
        if n is None or _initializer(model, n.input[1]) is None:
            return None
        w = _initializer(model, n.input[0])
        zp = _initializer(model, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if w is None or w.dtype != np.int8 or (zp is not None and np.any(zp)):
            return None
        return n, w

    def only_quantize(name: str) -> Any:  # the QuantizeLinear that alone reads ``name``, per-tensor
        rs = readers.get(name, [])
        if name in outputs or len(rs) != 1 or _key(rs[0]) != ("", "QuantizeLinear"):
            return None
        qn = rs[0]
        ok = len(qn.input) > 2 and _scalar_init(model, qn.input[1]) and _scalar_init(model, qn.input[2])
        return qn if ok else None

    def int_bias(name: str, xs: str, ws: str) -> np.ndarray | None:  # an int32 bias at scale xs * ws
        bn = dq_of(name)
        b = _initializer(model, bn.input[0]) if bn is not None else None
        if b is None or b.dtype != np.int32:
            return None
        scale = np.asarray(_initializer(model, bn.input[1]), np.float32)
        acc_scale = np.float32(_initializer(model, xs)) * np.asarray(_initializer(model, ws), np.float32)
        return b if np.allclose(scale, acc_scale, rtol=1e-6, atol=0) else None

    replaced: dict[int, list[Any]] = {}
    dropped: set[str] = set()  # outputs of the QuantizeLinear nodes a replacement took over
    inits: list[Any] = []
    for i, node in enumerate(graph.node):
        key, p = _key(node), f"{node.name or node.output[0]}__i{i}_"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if key not in (("", "MatMul"), ("", "Gemm"), ("", "Conv")) or len(node.input) < 2:
            continue
        a, wt = activation(node.input[0]), weight(node.input[1])
        if a is None or wt is None:
            continue
        wn, w = wt
        bias = node.input[2] if len(node.input) > 2 else ""
        qn = only_quantize(node.output[0])
        if key == ("", "Conv"):
            if qn is None or (bias and int_bias(bias, a.input[1], wn.input[1]) is None):
                continue
            bn = dq_of(bias) if bias else None
            made = helper.make_node(
                "QLinearConv",
                [*a.input[:3], *wn.input[:2], wn.input[2] if len(wn.input) > 2 else "", *qn.input[1:3]]
                + ([bn.input[0]] if bias else []),
                [qn.output[0]],
                name=p + "qconv",
                **attrs,
            )
            if not made.input[5]:  # QLinearConv needs the weight's zero point: zeros
                zname = p + "wz"
                inits.append(numpy_helper.from_array(np.zeros(w.shape[0], np.int8), zname))
                made.input[5] = zname
            replaced[i] = [made]
            dropped.add(qn.output[0])
            continue
        if w.ndim != 2:
            continue
        if key == ("", "Gemm"):
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
        made, wname = [], p + "w"
        inits.append(numpy_helper.from_array(w, wname))
        made.append(helper.make_node("MatMulInteger", [a.input[0], wname, a.input[2]], [p + "acc"]))
        made.append(helper.make_node("Cast", [p + "acc"], [p + "accf"], to=1))
        scale = [a.input[1], wn.input[1]]
        made.append(helper.make_node("Mul", scale, [p + "s"]))
        acc = p + "accf"
        b_int = int_bias(bias, a.input[1], wn.input[1]) if bias else None
        if b_int is not None:  # exact in the accumulator
            inits.append(numpy_helper.from_array(b_int.astype(np.float32), p + "b"))
            made.append(helper.make_node("Add", [acc, p + "b"], [p + "accb"]))
            acc, bias = p + "accb", ""
        if qn is not None and not bias:  # QLinearMatMul's requantization: float(acc) * (xs * ws / ys)
            one = p + "one"
            inits.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            made += [
                helper.make_node("Div", [p + "s", qn.input[1]], [p + "m"]),
                helper.make_node("Mul", [acc, p + "m"], [p + "yf"]),
                helper.make_node("QuantizeLinear", [p + "yf", one, qn.input[2]], [qn.output[0]]),
            ]
            dropped.add(qn.output[0])
        else:
            out = p + "y" if bias else node.output[0]
            made.append(helper.make_node("Mul", [acc, p + "s"], [out]))
            if bias:
                made.append(helper.make_node("Add", [out, bias], [node.output[0]]))
        replaced[i] = made
    if not replaced:
        return model
    nodes = []
    for i, node in enumerate(graph.node):
        if _key(node) == ("", "QuantizeLinear") and node.output[0] in dropped:
            continue
        nodes.extend(replaced.get(i, [node]))
    del graph.node[:]
    graph.node.extend(_live(nodes, outputs))
    graph.initializer.extend(inits)
    return model


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` less those whose outputs nothing reads (the weights' DequantizeLinear left behind)."""
    while True:
        read = {name for n in nodes for name in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
