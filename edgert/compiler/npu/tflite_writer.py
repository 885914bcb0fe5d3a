"""Serialize an `ir.Graph` to a TFLite flatbuffer with the schema LiteRT bundles.

The writer uses the generated object API of ``ai_edge_litert.schema_py_generated`` (its
``Pack`` methods call the ``flatbuffers`` builder); no converter, no TensorFlow.

Boundary: partitions take and give int8 tensors (``float_io=False``, the default). Their scales
and zero points sit in the model's input/output tensors, where LiteRT's
``get_input_details()['quantization']`` and Vela read them; the host quantizes and dequantizes
around the call. That keeps Vela's output a single ``ethos-u`` custom op with nothing left on the
Cortex-M (a float QUANTIZE/DEQUANTIZE pair would stay on the CPU). ``float_io=True`` adds
QUANTIZE/DEQUANTIZE ops at the edges instead (float32 in and out), for delegates that want it.
"""

from __future__ import annotations

import numpy as np

from edgert.compiler.npu.ir import Graph, Op, QParams, Tensor

# Operator versions written (the lowest version that covers int8 for each).
OP_VERSIONS = {
    "FULLY_CONNECTED": 4,
    "BATCH_MATMUL": 2,
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "ADD": 2,
    "SUB": 2,
    "MUL": 2,
    "SOFTMAX": 2,
    "LOGISTIC": 2,
    "TANH": 2,
    "RELU": 2,
    "RELU6": 2,
    "GELU": 2,
    "MEAN": 2,
    "RESHAPE": 1,
    "TRANSPOSE": 2,
    "AVERAGE_POOL_2D": 2,
    "MAX_POOL_2D": 2,
    "CONCATENATION": 2,
    "QUANTIZE": 2,
    "DEQUANTIZE": 2,
    "PAD": 2,
    "RSQRT": 2,
    "SLICE": 2,
    "MIRROR_PAD": 2,
    "EXP": 2,
}
SUPPORTED_OPS = tuple(OP_VERSIONS)
_ACT = {None: 0, "": 0, "RELU": 1, "RELU6": 3}
_TYPES = {"float32": 0, "int32": 2, "int8": 9, "int64": 4, "int16": 7, "uint8": 3}


def _schema():
    from ai_edge_litert import schema_py_generated as s

    return s


def _options(s, op: Op):
    """(BuiltinOptions type, options object) for ``op``."""
    o, kind = op.options, op.kind
    act = _ACT[o.get("fused_activation")]
    B = s.BuiltinOptions
    if kind == "FULLY_CONNECTED":
        x = s.FullyConnectedOptionsT()
        x.fusedActivationFunction, x.keepNumDims = act, bool(o.get("keep_num_dims", False))
        return B.FullyConnectedOptions, x
    if kind == "BATCH_MATMUL":
        x = s.BatchMatMulOptionsT()
        x.adjX, x.adjY = bool(o.get("adj_x", False)), bool(o.get("adj_y", False))
        return B.BatchMatMulOptions, x
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        x = s.Conv2DOptionsT() if kind == "CONV_2D" else s.DepthwiseConv2DOptionsT()
        x.padding = 0 if o.get("padding", "SAME") == "SAME" else 1
        x.strideH, x.strideW = o.get("stride", (1, 1))
        x.dilationHFactor, x.dilationWFactor = o.get("dilation", (1, 1))
        x.fusedActivationFunction = act
        if kind == "DEPTHWISE_CONV_2D":
            x.depthMultiplier = int(o.get("depth_multiplier", 1))
            return B.DepthwiseConv2DOptions, x
        return B.Conv2DOptions, x
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        x = s.Pool2DOptionsT()
        x.padding = 0 if o.get("padding", "VALID") == "SAME" else 1
        x.strideH, x.strideW = o["stride"]
        x.filterHeight, x.filterWidth = o["kernel"]
        x.fusedActivationFunction = act
        return B.Pool2DOptions, x
    if kind in ("ADD", "SUB", "MUL"):
        x = {"ADD": s.AddOptionsT, "SUB": s.SubOptionsT, "MUL": s.MulOptionsT}[kind]()
        x.fusedActivationFunction = act
        return getattr(B, kind.capitalize() + "Options"), x
    if kind == "SOFTMAX":
        x = s.SoftmaxOptionsT()
        x.beta = float(o.get("beta", 1.0))
        return B.SoftmaxOptions, x
    if kind == "GELU":
        x = s.GeluOptionsT()
        x.approximate = bool(o.get("approximate", False))
        return B.GeluOptions, x
    if kind == "MEAN":
        x = s.ReducerOptionsT()
        x.keepDims = bool(o.get("keep_dims", True))
        return B.ReducerOptions, x
    if kind == "RESHAPE":
        x = s.ReshapeOptionsT()
        x.newShape = [int(d) for d in o["new_shape"]]
        return B.ReshapeOptions, x
    if kind == "TRANSPOSE":
        return B.TransposeOptions, s.TransposeOptionsT()
    if kind == "CONCATENATION":
        x = s.ConcatenationOptionsT()
        x.axis, x.fusedActivationFunction = int(o["axis"]), act
        return B.ConcatenationOptions, x
    if kind == "PAD":
        return B.PadOptions, s.PadOptionsT()
    if kind == "SLICE":
        return B.SliceOptions, s.SliceOptionsT()
    if kind == "MIRROR_PAD":
        x = s.MirrorPadOptionsT()
        x.mode = 0 if o.get("mode", "REFLECT") == "REFLECT" else 1
        return B.MirrorPadOptions, x
    if kind == "EXP":
        return B.ExpOptions, s.ExpOptionsT()
    return B.NONE, None


def with_float_io(g: Graph) -> Graph:
    """A copy of ``g`` whose int8 inputs/outputs are fed through QUANTIZE/DEQUANTIZE from float32."""
    out = Graph(dict(g.tensors), [], [], [])
    for name in g.inputs:
        t = g.tensors[name]
        fname = out.add(Tensor(name + "/float", t.shape, "float32"))
        out.op("QUANTIZE", [fname], [name])
        out.inputs.append(fname)
    out.ops += g.ops
    for name in g.outputs:
        t = g.tensors[name]
        fname = out.add(Tensor(name + "/float", t.shape, "float32"))
        out.op("DEQUANTIZE", [name], [fname])
        out.outputs.append(fname)
    return out


def write_tflite(g: Graph, float_io: bool = False, description: str = "edgert npu partition") -> bytes:
    """The TFLite flatbuffer of ``g``."""
    import flatbuffers

    s = _schema()
    if float_io:
        g = with_float_io(g)
    names = list(g.tensors)
    index = {n: i for i, n in enumerate(names)}
    buffers = [s.BufferT()]
    tensors = []
    for n in names:
        t = g.tensors[n]
        tt = s.TensorT()
        tt.name, tt.shape, tt.type = n, [int(d) for d in t.shape], _TYPES[t.dtype]
        tt.buffer = 0
        if t.data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(t.data.astype(t.dtype)).tobytes(), np.uint8)
            tt.buffer = len(buffers)
            buffers.append(b)
        if t.q is not None:
            qp = s.QuantizationParametersT()
            qp.scale = [float(v) for v in t.q.scale]
            qp.zeroPoint = [int(v) for v in t.q.zero_point]
            qp.quantizedDimension = int(t.q.axis)
            tt.quantization = qp
        tensors.append(tt)

    codes: list[str] = []
    ops = []
    for op in g.ops:
        if op.kind not in OP_VERSIONS:
            raise ValueError(f"the TFLite writer does not emit {op.kind}")
        if op.kind not in codes:
            codes.append(op.kind)
        ot = s.OperatorT()
        ot.opcodeIndex = codes.index(op.kind)
        ot.inputs = [index[i] if i else -1 for i in op.inputs]
        ot.outputs = [index[o] for o in op.outputs]
        ot.builtinOptionsType, ot.builtinOptions = _options(s, op)
        ops.append(ot)

    opcodes = []
    for kind in codes:
        c = s.OperatorCodeT()
        code = getattr(s.BuiltinOperator, kind)
        c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), OP_VERSIONS[kind]
        opcodes.append(c)

    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.name = tensors, ops, "main"
    sg.inputs = [index[n] for n in g.inputs]
    sg.outputs = [index[n] for n in g.outputs]
    m = s.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers, m.description = 3, opcodes, [sg], buffers, description
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def qparams_of(model: bytes) -> dict[str, QParams]:
    """Quantization of every tensor of a TFLite model (read back, for tests and reports)."""
    s = _schema()
    m = s.ModelT.InitFromPackedBuf(bytearray(model), 0)
    out = {}
    for t in m.subgraphs[0].tensors:
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale):
            out[t.name.decode() if isinstance(t.name, bytes) else t.name] = QParams.of(
                np.asarray(q.scale), np.asarray(q.zeroPoint), int(q.quantizedDimension)
            )
    return out
