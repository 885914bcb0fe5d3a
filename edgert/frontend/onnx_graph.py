"""Plain ONNX graphs: read, check every operator, expand what TVM's importer lacks, import to Relax.

TVM 0.27's Relax ONNX importer (`tvm.relax.frontend.onnx.from_onnx`) does the conversion. Two
things are done here first: every node is checked against the importer's operator table so that
an unsupported graph fails with the list of operators *and* the nodes that use them (the importer
names only operators, one at a time), and `LSTM`, which the importer lacks but recurrent models
such as silero-vad need, is rewritten into MatMul/Sigmoid/Tanh nodes with `onnx.helper`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ModelFileError, UnsupportedModelError, brief

# Nodes the importer handles itself rather than through its converter table.
_DIRECT = {"If", "Constant"}


@dataclass
class GraphIO:
    """One input or output of a graph: its name, dtype and shape (ints, or names for symbolic dims)."""

    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        """The manifest record."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def read_onnx(path: str | Path) -> Any:
    """Load an ONNX model (external data beside it included); ModelFileError if it is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... for garbage
        raise ModelFileError(f"{path} is not a readable ONNX model: {brief(exc)}") from exc


def _supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    # The importer keeps its table private; reading it is the only way to list what it lacks
    # before it fails on the first one.
    return set(onnx_frontend._get_convert_map()) | _DIRECT


def _walk(graph: Any) -> list[Any]:
    """Every node of ``graph`` and of its subgraphs (If branches, Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                nodes.extend(_walk(attr.g))
            for sub in attr.graphs:
                nodes.extend(_walk(sub))
    return nodes


def check_supported(model: Any, source: str = "model") -> None:
    """Raise UnsupportedModelError naming every operator the importer lacks and the nodes using it."""
    known = _supported_ops()
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(_walk(model.graph)):
        domain = node.domain or "ai.onnx"
        op = node.op_type if domain in ("ai.onnx", "") else f"{domain}.{node.op_type}"
        if domain not in ("ai.onnx", "") or node.op_type not in known:
            missing.setdefault(op, []).append(node.name or f"#{i}")
    if missing:
        parts = [
            f"{op} (nodes: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" for op, names in missing.items()
        ]
        raise UnsupportedModelError(f"{source}: operators not supported by the ONNX importer: {'; '.join(parts)}")


_VARIADIC = {"Concat", "Sum", "Max", "Min", "Mean"}


def check_graph(model: Any, source: str = "model") -> None:
    """Refuse a graph whose nodes read values nothing defines (TVM's importer crashes on some:
    a Concat of a missing input ends in a segmentation fault, not an exception)."""
    graph = model.graph
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for i, node in enumerate(graph.node):
        where = node.name or f"#{i} ({node.op_type})"
        for name in node.input:
            if name and name not in defined:
                raise ModelFileError(
                    f"{source}: node {where} reads '{name}', which no input, weight or earlier node defines"
                )
            if not name and node.op_type in _VARIADIC:
                raise ModelFileError(f"{source}: node {where} has an empty input name")
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            raise ModelFileError(f"{source}: graph output '{out.name}' is not computed by any node")


def _is_lstm(node: Any) -> bool:
    """An ONNX LSTM, or onnxruntime's DynamicQuantizeLSTM (its dynamic quantizer's int8 LSTM)."""
    if node.domain == "com.microsoft":
        return node.op_type == "DynamicQuantizeLSTM"
    return node.op_type == "LSTM"


def expand_lstm(model: Any) -> Any:
    """Rewrite each forward `LSTM` node (default activations, no peepholes) into primitive nodes.

    The recurrence is unrolled over the time steps, so the sequence length must be static; for
    streaming models such as silero-vad it is 1 per call. Gates follow ONNX's order i, o, f, c.

    onnxruntime's ``DynamicQuantizeLSTM`` (int8 W [1, I, 4H] and R [1, H, 4H], already transposed,
    with scales) takes its integer path: the input of every step quantized at once to uint8
    (``DynamicQuantizeLinear``: one scale over the whole sequence, as onnxruntime's one GEMM for
    all steps), each step's hidden state on its own, ``MatMulInteger`` by the int8 weights, then
    ``float(acc) * (x_scale * w_scale)``.
    """
    graph = model.graph
    new_nodes, new_inits = [], []
    for node in graph.node:
        if not _is_lstm(node):
            new_nodes.append(node)
            continue
        nodes, inits = _expand_one_lstm(model, node)
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return model


def _expand_one_lstm(model: Any, node: Any) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    where = node.name or node.output[0]
    if attrs.get("direction", b"forward") not in (b"forward", "forward"):
        raise UnsupportedModelError(f"LSTM node {where}: only direction=forward is supported")
    if attrs.get("activations") or attrs.get("clip") or attrs.get("input_forget"):
        raise UnsupportedModelError(f"LSTM node {where}: custom activations, clip, input_forget are not supported")
    if attrs.get("layout", 0) != 0:
        raise UnsupportedModelError(f"LSTM node {where}: layout=1 is not supported")
    x_name, w_name, r_name, b_name, seq_lens, h0, c0, peep, ws, wz, rs, rz = [*node.input, *[""] * 12][:12]
    quantized = node.op_type == "DynamicQuantizeLSTM"
    if quantized:
        if not (ws and rs):
            raise UnsupportedModelError(f"DynamicQuantizeLSTM node {where}: W_scale and R_scale are required")
        for zp in (wz, rz):  # onnxruntime's kernel reads one zero point; its quantizer writes zeros
            value = _init_array(model, zp) if zp else np.zeros(1)
            if value is None or np.any(value):
                raise UnsupportedModelError(f"DynamicQuantizeLSTM node {where}: nonzero weight zero points")
    if not w_name or not r_name:
        raise UnsupportedModelError(f"LSTM node {where}: weights W and R are required")
    if seq_lens or peep:
        raise UnsupportedModelError(f"LSTM node {where}: sequence_lens and peepholes are not supported")
    opset = _opset(model)
    if opset < 10:
        raise UnsupportedModelError(f"LSTM node {where}: graphs below opset 10 are not supported")
    hidden = int(attrs["hidden_size"])
    steps = _static_steps(model, x_name)
    if steps is None:
        raise UnsupportedModelError(
            f"LSTM node {where}: the sequence length of its input must be static (fix it with --input-shape)"
        )
    p = f"{where}__lstm_"
    nodes: list[Any] = []
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), p + "ax0"),
        numpy_helper.from_array(np.array([1], np.int64), p + "ax1"),
        numpy_helper.from_array(np.array([0], np.int64), p + "b0"),
        numpy_helper.from_array(np.array([4 * hidden], np.int64), p + "b1"),
        numpy_helper.from_array(np.array([8 * hidden], np.int64), p + "b2"),
    ]

    def axis_node(op: str, x: str, out: str, axis: int) -> Any:
        # Squeeze/Unsqueeze take their axes as an input from opset 13, as an attribute before.
        if opset >= 13:
            return helper.make_node(op, [x, p + f"ax{axis}"], [out])
        return helper.make_node(op, [x], [out], axes=[axis])

    # W, R and B may be computed (silero-vad builds them with Concat); they are folded later
    # when constant. W [1, 4H, I] -> [I, 4H]; B [1, 8H] -> Wb + Rb.
    if quantized:  # int8 [1, I, 4H] and [1, H, 4H]; scales [1] or [1, 4H] -> [1] or [4H]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), p + "flat"))
        nodes += [
            axis_node("Squeeze", w_name, p + "Wt", 0),
            axis_node("Squeeze", r_name, p + "Rt", 0),
            helper.make_node("Reshape", [ws, p + "flat"], [p + "ws"]),
            helper.make_node("Reshape", [rs, p + "flat"], [p + "rs"]),
        ]
    else:
        nodes += [
            axis_node("Squeeze", w_name, p + "W", 0),
            helper.make_node("Transpose", [p + "W"], [p + "Wt"], perm=[1, 0]),
            axis_node("Squeeze", r_name, p + "R", 0),
            helper.make_node("Transpose", [p + "R"], [p + "Rt"], perm=[1, 0]),
        ]
    if b_name:
        nodes += [
            axis_node("Squeeze", b_name, p + "Bs", 0),
            helper.make_node("Slice", [p + "Bs", p + "b0", p + "b1"], [p + "Bw"]),
            helper.make_node("Slice", [p + "Bs", p + "b1", p + "b2"], [p + "Br"]),
            helper.make_node("Add", [p + "Bw", p + "Br"], [p + "B"]),
        ]
    else:
        inits.append(numpy_helper.from_array(np.zeros(4 * hidden, np.float32), p + "B"))
    out_y, out_h, out_c = [*node.output, "", "", ""][:3]

    def state(name: str, tag: str) -> str:
        if name:
            nodes.append(axis_node("Squeeze", name, p + tag + "0", 0))
            return p + tag + "0"
        inits.append(numpy_helper.from_array(np.zeros((1, hidden), np.float32), p + tag + "zero"))
        return p + tag + "zero"

    h, c = state(h0, "h"), state(c0, "c")

    def int_matmul(x: str, w: str, w_scale: str, out: str) -> None:
        """``x @ w`` as onnxruntime's quantized LSTM GEMM: x quantized on its own range, w int8."""
        nodes.extend(
            [
                helper.make_node("DynamicQuantizeLinear", [x], [out + "q", out + "qs", out + "qz"]),
                helper.make_node("MatMulInteger", [out + "q", w, out + "qz"], [out + "acc"]),
                helper.make_node("Cast", [out + "acc"], [out + "accf"], to=1),
                helper.make_node("Mul", [out + "qs", w_scale], [out + "sc"]),
                helper.make_node("Mul", [out + "accf", out + "sc"], [out]),
            ]
        )

    if quantized:  # every step's input projection at once: one activation scale, as onnxruntime
        inits.append(numpy_helper.from_array(np.array([-1, _lstm_input_size(model, w_name)], np.int64), p + "rows"))
        inits.append(numpy_helper.from_array(np.array([steps, -1, 4 * hidden], np.int64), p + "xwshape"))
        nodes.append(helper.make_node("Reshape", [x_name, p + "rows"], [p + "x2"]))
        int_matmul(p + "x2", p + "Wt", p + "ws", p + "xw2")
        nodes.append(helper.make_node("Reshape", [p + "xw2", p + "xwshape"], [p + "xw"]))
    gates = ["i", "o", "f", "c"]
    ys = []
    for t in range(steps):
        q = f"{p}t{t}_"
        split = (
            helper.make_node("Split", [q + "g"], [q + g for g in gates], axis=-1, num_outputs=4)
            if opset >= 18
            else helper.make_node("Split", [q + "g"], [q + g for g in gates], axis=-1)
        )
        if quantized:
            nodes.append(helper.make_node("Gather", [p + "xw", q + "idx"], [q + "xw"], axis=0))
            int_matmul(h, p + "Rt", p + "rs", q + "hr")
        else:
            nodes += [
                helper.make_node("Gather", [x_name, q + "idx"], [q + "x"], axis=0),
                helper.make_node("MatMul", [q + "x", p + "Wt"], [q + "xw"]),
                helper.make_node("MatMul", [h, p + "Rt"], [q + "hr"]),
            ]
        nodes += [
            helper.make_node("Add", [q + "xw", q + "hr"], [q + "s"]),
            helper.make_node("Add", [q + "s", p + "B"], [q + "g"]),
            split,
            helper.make_node("Sigmoid", [q + "i"], [q + "si"]),
            helper.make_node("Sigmoid", [q + "o"], [q + "so"]),
            helper.make_node("Sigmoid", [q + "f"], [q + "sf"]),
            helper.make_node("Tanh", [q + "c"], [q + "tc"]),
            helper.make_node("Mul", [q + "sf", c], [q + "fc"]),
            helper.make_node("Mul", [q + "si", q + "tc"], [q + "ic"]),
            helper.make_node("Add", [q + "fc", q + "ic"], [q + "C"]),
            helper.make_node("Tanh", [q + "C"], [q + "tC"]),
            helper.make_node("Mul", [q + "so", q + "tC"], [q + "H"]),
        ]
        inits.append(numpy_helper.from_array(np.array(t, np.int64), q + "idx"))
        h, c = q + "H", q + "C"
        ys.append(h)
    # Y is [steps, 1, batch, hidden]; Y_h and Y_c are [1, batch, hidden].
    if out_y:
        stacked = [f"{p}y{t}" for t in range(steps)]
        nodes += [axis_node("Unsqueeze", y, name, 0) for y, name in zip(ys, stacked, strict=True)]
        nodes.append(helper.make_node("Concat", stacked, [p + "Ycat"], axis=0))
        nodes.append(axis_node("Unsqueeze", p + "Ycat", out_y, 1))
    if out_h:
        nodes.append(axis_node("Unsqueeze", h, out_h, 0))
    if out_c:
        nodes.append(axis_node("Unsqueeze", c, out_c, 0))
    return nodes, inits


# Never folded: their value is not a function of their inputs.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def fold_constants(model: Any) -> Any:
    """Evaluate, with ONNX's reference evaluator, every top-level node whose inputs are all constant.

    Exporters often compute pads, shapes and weights with small subgraphs of constants; TVM's
    importer refuses some of them (dynamic pads) although their values are fixed.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opset = _opset(model)
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept, folded = [], []
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and all(i == "" or i in consts for i in node.input)
            and not any(a.g.node or a.graphs for a in node.attribute)
            and not (set(node.output) & graph_outputs)
        )
        if foldable:
            try:
                feeds = {i: consts[i] for i in node.input if i}
                values = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
            except Exception:  # the reference evaluator lacks a few ops; TVM may still import them
                values = None
            if values is not None:
                for name, value in zip(node.output, values, strict=False):
                    if name:
                        consts[name] = np.asarray(value)
                        folded.append(numpy_helper.from_array(np.asarray(value), name))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    return model


def _opset(model: Any) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def _init_array(model: Any, name: str) -> np.ndarray | None:
    """The value of initializer ``name``, or None."""
    from onnx import numpy_helper

    return next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name), None)


def _lstm_input_size(model: Any, w_name: str) -> int:
    """I of a DynamicQuantizeLSTM's constant W [1, I, 4H]."""
    dims = next((list(i.dims) for i in model.graph.initializer if i.name == w_name), None)
    if dims is None or len(dims) != 3:
        raise UnsupportedModelError(f"DynamicQuantizeLSTM: its weight {w_name} must be a constant [1, I, 4H]")
    return int(dims[1])


def _static_steps(model: Any, name: str) -> int | None:
    """The first dimension of value ``name`` if shape inference finds it static."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference fails on some valid graphs; then the length is unknown
        return None
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                return int(dims[0].dim_value)
    return None


def fix_input_shapes(model: Any, shapes: dict[str, list[int]]) -> None:
    """Set the named graph inputs to static shapes (``--input-shape name=1,128``)."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UnsupportedModelError(f"--input-shape names '{name}', which is not an input ({', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) not in (0, len(dims)) and len(shape.dim):
            raise UnsupportedModelError(f"--input-shape {name}: the input has rank {len(shape.dim)}, not {len(dims)}")
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = int(d)


def graph_io(model: Any, outputs_sinfo: Any) -> tuple[list[GraphIO], list[GraphIO]]:
    """Inputs (from the ONNX graph) and outputs (from the imported function's struct info)."""
    import onnx

    initializers = {i.name for i in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        inputs.append(GraphIO(vi.name, str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    from tvm import relax

    infos = list(outputs_sinfo.fields) if isinstance(outputs_sinfo, relax.TupleType) else [outputs_sinfo]
    outputs = []
    for vi, info in zip(model.graph.output, infos, strict=True):
        shape = [int(d) if isinstance(d, int) or hasattr(d, "value") else str(d) for d in info.shape.values]
        outputs.append(GraphIO(vi.name, str(info.dtype), [int(d.value) if hasattr(d, "value") else d for d in shape]))
    return inputs, outputs


# What onnx's helpers raise on a damaged model (a tensor whose bytes do not fit its dims, an
# unknown data type, an attribute of the wrong kind): they surface wherever a field is first used.
DAMAGE = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    UnicodeDecodeError,
    RecursionError,
    OverflowError,
)


def import_onnx(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> tuple[Any, list, list]:
    """ONNX file -> (Relax IRModule with weights as constants, inputs, outputs)."""
    try:
        return _import_onnx(path, input_shapes)
    except DAMAGE as exc:
        raise ModelFileError(f"{path} is a damaged ONNX model ({type(exc).__name__}: {brief(exc, 150)})") from None


def _import_onnx(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> tuple[Any, list, list]:
    import warnings

    from tvm.relax.frontend.onnx import from_onnx

    model = read_onnx(path)
    if input_shapes:
        fix_input_shapes(model, input_shapes)
    from edgert.frontend.onnx_contrib import expand_contrib, needs_contrib
    from edgert.frontend.onnx_quant import expand_quantized, integer_qdq, needs_expansion

    if needs_contrib(model):  # onnxruntime's fused transformer operators (QAttention: MatMulInteger)
        model = expand_contrib(model)
    # Before folding: folding would turn the int8 weights' DequantizeLinear into float weights.
    model = fold_constants(integer_qdq(model))
    if any(_is_lstm(n) for n in model.graph.node):
        model = fold_constants(expand_lstm(model))
    if needs_expansion(model):
        model = fold_constants(expand_quantized(model))
    check_supported(model, str(path))
    check_graph(model, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # renamed inputs and unknown dims: reported by edgert itself
        try:
            mod = from_onnx(model, keep_params_in_input=False, sanitize_input_names=True)
        except Exception as exc:
            raise UnsupportedModelError(f"{path}: the ONNX importer failed: {brief(exc)}") from exc
    inputs, outputs = graph_io(model, mod["main"].ret_ty)
    return mod, inputs, outputs
