"""onnxruntime's transformer operators (com.microsoft) rewritten into standard ONNX operators.

onnxruntime's transformer optimizer fuses BERT-style encoders into ``Attention``,
``SkipLayerNormalization``, ``BiasGelu`` and ``FastGelu``; its dynamic quantizer then turns each
``Attention`` into ``QAttention`` (uint8 input, int8 QKV weight). TVM's importer refuses the domain
(and its own ``Attention`` converter lacks the 1-D ``mask_index`` the optimizer writes), so these
nodes become the standard operators they stand for, with onnxruntime's CPU semantics:

- ``QAttention``: ``MatMulInteger`` (the integer GEMM kernels of `schedules.int8_graph`) then
  ``float(acc) * (input_scale * weight_scale) + bias``, then the attention below.
- ``Attention``: ``input @ W + bias`` split into Q, K, V; per head ``softmax(scale * Q K^T + mask) V``
  with ``scale = 1/sqrt(head size)`` unless given, and the mask onnxruntime builds: a 1-D
  ``mask_index`` [B] holds each batch's end position (keys at or past it get ``mask_filter_value``,
  default -10000); a 2-D [B, T] or 3-D [B, S, T] raw mask gives ``mask_filter_value`` where it is 0.
- ``SkipLayerNormalization``: ``LayerNormalization(input + skip (+ bias))`` (epsilon default 1e-12).
- ``BiasGelu`` / ``Gelu``: the exact (erf) GELU of ``A + B`` / ``X``; ``FastGelu``: the tanh form.

What these rewrites do not cover (past state, rotary embeddings, unidirectional attention, 4-D or
start-and-end masks) is refused naming the node.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgert.errors import UnsupportedModelError

_MS = "com.microsoft"
HANDLED = {"Attention", "QAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu"}
SKIP_LAYER_NORM_EPSILON = 1e-12  # onnxruntime's default for SkipLayerNormalization


def needs_contrib(model: Any) -> bool:
    """Whether ``model``'s main graph has a com.microsoft operator `expand_contrib` rewrites."""
    return any(n.domain == _MS and n.op_type in HANDLED for n in model.graph.node)


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _value_info(model: Any) -> dict[str, tuple[int, int, list[int | None]]]:
    """(rank, element type, dims) of every value onnx's shape inference knows, and of the
    initializers: a mask's rank decides its meaning, the QKV weight's width the head size."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference fails on some graphs; the values it misses are refused where needed
        inferred = model
    info: dict[str, tuple[int, int, list[int | None]]] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            info[v.name] = (len(dims), t.elem_type, dims)
    for init in g.initializer:
        info[init.name] = (len(init.dims), init.data_type, list(init.dims))
    return info


def expand_contrib(model: Any) -> Any:
    """Rewrite the com.microsoft operators of ``HANDLED`` in ``model``'s main graph (in place); return it."""
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = _opset(model)
    info = _value_info(model)
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, ins: list[str], outs: list[str], **attrs: Any) -> None:
        nodes.append(helper.make_node(op, ins, outs, **attrs))

    def unsqueeze(x: str, axes: list[int], out: str, p: str) -> None:
        if opset >= 13:
            node("Unsqueeze", [x, const(out + "_axes", np.array(axes, np.int64))], [out])
        else:
            node("Unsqueeze", [x], [out], axes=axes)

    def gelu_erf(x: str, out: str, p: str) -> None:
        node("Div", [x, const(p + "sqrt2", np.float32(math.sqrt(2.0)))], [p + "gd"])
        node("Erf", [p + "gd"], [p + "ge"])
        node("Add", [p + "ge", const(p + "one", np.float32(1.0))], [p + "g1"])
        node("Mul", [x, p + "g1"], [p + "gm"])
        node("Mul", [p + "gm", const(p + "half", np.float32(0.5))], [out])

    for i, n in enumerate(graph.node):
        if n.domain != _MS or n.op_type not in HANDLED:
            nodes.append(n)
            continue
        where = f"{_MS}.{n.op_type} node {n.name or f'#{i}'}"
        p = f"{n.name or n.output[0]}__ms{i}_"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = [*n.input, *[""] * 10]
        if n.op_type in ("Attention", "QAttention"):
            _attention(n, attrs, ins, where, p, info, node, const, unsqueeze)
        elif n.op_type == "SkipLayerNormalization":
            x, skip, gamma, beta, bias = ins[:5]
            node("Add", [x, skip], [p + "s"])
            total = p + "s"
            if bias:
                node("Add", [p + "s", bias], [p + "sb"])
                total = p + "sb"
            outs = [*n.output, "", "", ""]
            if outs[3]:  # input + skip + bias, as the fourth output
                node("Identity", [total], [outs[3]])
            ln_in = [total, gamma] + ([beta] if beta else [])
            eps = float(attrs.get("epsilon", SKIP_LAYER_NORM_EPSILON))
            node("LayerNormalization", ln_in, [o for o in outs[:3]], axis=-1, epsilon=eps)
            while nodes[-1].output and not nodes[-1].output[-1]:  # trailing unused outputs
                del nodes[-1].output[-1]
        elif n.op_type in ("BiasGelu", "Gelu"):
            x = ins[0]
            if n.op_type == "BiasGelu":
                node("Add", [ins[0], ins[1]], [p + "x"])
                x = p + "x"
            gelu_erf(x, n.output[0], p)
        elif n.op_type == "FastGelu":
            x = ins[0]
            if ins[1]:
                node("Add", [ins[0], ins[1]], [p + "x"])
                x = p + "x"
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            node("Mul", [x, x], [p + "x2"])
            node("Mul", [p + "x2", const(p + "c", np.float32(0.044715))], [p + "cx2"])
            node("Add", [p + "cx2", const(p + "one", np.float32(1.0))], [p + "in"])
            node("Mul", [x, p + "in"], [p + "poly"])
            node("Mul", [p + "poly", const(p + "k", np.float32(math.sqrt(2.0 / math.pi)))], [p + "arg"])
            node("Tanh", [p + "arg"], [p + "t"])
            node("Add", [p + "t", const(p + "one2", np.float32(1.0))], [p + "t1"])
            node("Mul", [x, p + "t1"], [p + "xm"])
            node("Mul", [p + "xm", const(p + "half", np.float32(0.5))], [n.output[0]])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    return model


def _attention(
    n: Any, attrs: dict[str, Any], ins: list[str], where: str, p: str, info: dict, node: Any, const: Any, unsqueeze: Any
) -> None:
    """Attention / QAttention as standard nodes (see the module's docstring)."""
    from onnx import helper

    for attr in ("do_rotary", "past_present_share_buffer", "unidirectional"):
        if attrs.get(attr, 0):
            raise UnsupportedModelError(f"{where}: attribute {attr} is not supported")
    if len([o for o in n.output if o]) > 1:
        raise UnsupportedModelError(f"{where}: the present (past state) output is not supported")
    heads = int(attrs["num_heads"])
    if n.op_type == "QAttention":
        x, w, bias, xs, ws, mask, xz, wz, past = ins[:9]
        extra = ""  # QAttention has no attention bias input
        mm_in = [x, w] + ([xz] if xz or wz else []) + ([wz] if wz else [])
        node("MatMulInteger", mm_in, [p + "acc"])
        node("Cast", [p + "acc"], [p + "accf"], to=1)
        node("Mul", [xs, ws], [p + "sc"])
        node("Mul", [p + "accf", p + "sc"], [p + "qkv0"])
    else:
        x, w, bias, mask, past, extra = ins[:6]
        if ins[6]:
            raise UnsupportedModelError(f"{where}: past_sequence_length is not supported")
        node("MatMul", [x, w], [p + "qkv0"])
    if past:
        raise UnsupportedModelError(f"{where}: past state is not supported")
    qkv = p + "qkv0"
    if bias:
        node("Add", [qkv, bias], [p + "qkv"])
        qkv = p + "qkv"
    sizes = [int(s) for s in attrs.get("qkv_hidden_sizes", [])]
    if not sizes:
        dims = info.get(w, (0, 0, []))[2]
        if len(dims) != 2 or dims[1] is None:
            raise UnsupportedModelError(f"{where}: the QKV weight's shape is unknown (its width sets the head size)")
        sizes = [dims[1] // 3] * 3
    if sizes[0] != sizes[1] or sizes[0] % heads or sizes[2] % heads:
        raise UnsupportedModelError(f"{where}: Q, K and V hidden sizes {sizes} do not suit {heads} heads")
    head, head_v = sizes[0] // heads, sizes[2] // heads
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    parts = []
    for j, (name, size, hd) in enumerate(zip("qkv", sizes, (head, head, head_v), strict=True)):
        node(
            "Slice",
            [
                qkv,
                const(p + f"{name}b", np.array([starts[j]], np.int64)),
                const(p + f"{name}e", np.array([starts[j] + size], np.int64)),
                const(p + f"{name}a", np.array([-1], np.int64)),
            ],
            [p + name],
        )
        node("Reshape", [p + name, const(p + f"{name}s", np.array([0, 0, heads, hd], np.int64))], [p + name + "h"])
        parts.append(p + name + "h")
    q, k, v = parts
    node("Transpose", [q], [p + "qt"], perm=[0, 2, 1, 3])  # [B, H, S, d]
    node("Transpose", [k], [p + "kt"], perm=[0, 2, 3, 1])  # [B, H, d, T]
    node("Transpose", [v], [p + "vt"], perm=[0, 2, 1, 3])  # [B, H, T, dv]
    node("MatMul", [p + "qt", p + "kt"], [p + "qk"])
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(head)
    node("Mul", [p + "qk", const(p + "scale", np.float32(scale))], [p + "sc0"])
    scores = p + "sc0"
    fill = np.float32(attrs.get("mask_filter_value", -10000.0))
    if mask:
        rank, elem, _ = info.get(mask, (None, 0, []))
        zero, filt = const(p + "mz", np.float32(0.0)), const(p + "mf", fill)
        if rank == 1:  # end positions: keys j >= mask_index[b] are masked
            dims = info.get(x, (0, 0, []))[2]
            if len(dims) == 3 and dims[1] is not None:  # static: TVM's importer keeps the shapes known
                const(p + "pos", np.arange(dims[1], dtype=np.int64))
            else:
                node("Shape", [x], [p + "xshape"])
                node("Gather", [p + "xshape", const(p + "i1", np.int64(1))], [p + "slen"])
                node("Range", [const(p + "r0", np.int64(0)), p + "slen", const(p + "r1", np.int64(1))], [p + "pos"])
            node("Cast", [mask], [p + "end"], to=7)
            unsqueeze(p + "end", [1], p + "end2", p)
            node("Less", [p + "pos", p + "end2"], [p + "keep"])  # [B, T]
            unsqueeze(p + "keep", [1, 2], p + "keep4", p)
        elif rank in (2, 3):  # raw masks: 0 masks a key
            node("Greater", [mask, const(p + "m0", np.zeros((), helper.tensor_dtype_to_np_dtype(elem)))], [p + "keep"])
            unsqueeze(p + "keep", [1, 2] if rank == 2 else [1], p + "keep4", p)
        else:
            what = "unknown" if rank is None else f"{rank}-D"
            raise UnsupportedModelError(
                f"{where}: a {what} mask_index is not supported (1-D end positions, 2-D or 3-D)"
            )
        node("Where", [p + "keep4", zero, filt], [p + "bias"])
        node("Add", [scores, p + "bias"], [p + "sc1"])
        scores = p + "sc1"
    if extra:  # attention_bias [B or 1, H, S, T]
        node("Add", [scores, extra], [p + "sc2"])
        scores = p + "sc2"
    node("Softmax", [scores], [p + "prob"], axis=-1)
    node("MatMul", [p + "prob", p + "vt"], [p + "ctx"])
    node("Transpose", [p + "ctx"], [p + "ctxt"], perm=[0, 2, 1, 3])
    node("Reshape", [p + "ctxt", const(p + "os", np.array([0, 0, heads * head_v], np.int64))], [n.output[0]])
