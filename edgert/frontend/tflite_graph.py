"""Plain TFLite graphs: read the flatbuffer (`tflite` package), check operators, import to Relax.

TVM 0.27 ships a Relax TFLite importer (`tvm.relax.frontend.tflite.from_tflite`); it is used
as is. Before it runs, every operator is checked against its converter table so that an
unsupported model fails with each operator and the operators' positions and output tensors.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ModelFileError, UnsupportedModelError, brief
from edgert.frontend.onnx_graph import GraphIO

_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


def read_tflite(path: str | Path) -> Any:
    """The `tflite.Model` of a .tflite file; ModelFileError if the file is not one."""
    import tflite

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelFileError(f"{path} is not a TFLite model (no TFL3 identifier)")
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() < 1:
            raise ModelFileError(f"{path}: the TFLite model has no subgraph")
        return model
    except ModelFileError:
        raise
    except Exception as exc:  # flatbuffers raises struct/index errors on damaged files
        raise ModelFileError(f"{path} is not a readable TFLite model: {brief(exc)}") from exc


def _tensor_io(subgraph: Any, index: int) -> GraphIO:
    tensor = subgraph.Tensors(index)
    return GraphIO(
        tensor.Name().decode(),
        _TYPES.get(tensor.Type(), f"tflite-type-{tensor.Type()}"),
        [int(d) for d in tensor.ShapeAsNumpy()],
    )


def check_supported(model: Any, source: str) -> None:
    """Raise UnsupportedModelError naming each operator the importer lacks, with where it is used."""
    from tvm import relax
    from tvm.relax.frontend.tflite import tflite_frontend as tf

    subgraph = model.Subgraphs(0)
    converter = tf.OperatorConverter(model, subgraph, tf.ExprTable(), relax.BlockBuilder())
    missing: dict[str, list[str]] = {}
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        name = converter.get_op_code_str(op)
        if name not in converter.convert_map:
            outs = [subgraph.Tensors(int(t)).Name().decode() for t in op.OutputsAsNumpy()]
            missing.setdefault(name, []).append(f"#{i}->{','.join(outs)}")
    if missing:
        parts = [f"{op} (operators: {', '.join(where[:5])})" for op, where in missing.items()]
        raise UnsupportedModelError(f"{source}: operators not supported by the TFLite importer: {'; '.join(parts)}")


# What the flatbuffers accessors raise on a damaged file: they read lazily, so damage surfaces
# wherever a field is first read, not when the file is opened.
DAMAGE = (struct.error, IndexError, TypeError, ValueError, AttributeError, KeyError, UnicodeDecodeError, RecursionError)


def import_tflite(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> tuple[Any, list, list]:
    """.tflite file -> (Relax IRModule with weights as constants, inputs, outputs)."""
    try:
        return _import_tflite(path, input_shapes)
    except NotImplementedError as exc:  # an operator code past the schema the importer knows
        raise UnsupportedModelError(f"{path}: {brief(exc)}") from None
    except DAMAGE as exc:
        raise ModelFileError(f"{path} is a damaged TFLite model ({type(exc).__name__}: {brief(exc, 150)})") from None


def _import_tflite(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> tuple[Any, list, list]:
    from tvm import relax
    from tvm.relax.frontend.tflite import from_tflite

    model = read_tflite(path)
    subgraph = model.Subgraphs(0)
    inputs = [_tensor_io(subgraph, int(i)) for i in subgraph.InputsAsNumpy()]
    for spec in inputs:
        if input_shapes and spec.name in input_shapes:
            spec.shape = list(input_shapes[spec.name])
    unknown = set(input_shapes or {}) - {i.name for i in inputs}
    if unknown:
        names = ", ".join(i.name for i in inputs)
        raise UnsupportedModelError(f"--input-shape names {', '.join(sorted(unknown))}, not an input ({names})")
    check_supported(model, str(path))
    try:
        mod = from_tflite(model, shape_dict={i.name: tuple(i.shape) for i in inputs})
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: the TFLite importer failed: {brief(exc)}") from exc
    func = mod["main"].without_attr("params")
    mod["main"] = func
    ret = func.ret_ty
    infos = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    outputs = []
    for index, info in zip(subgraph.OutputsAsNumpy(), infos, strict=True):
        shape = [int(d.value) if hasattr(d, "value") else str(d) for d in info.shape.values]
        outputs.append(GraphIO(subgraph.Tensors(int(index)).Name().decode(), str(info.dtype), shape))
    for spec in inputs:
        spec.shape = [int(d) for d in np.asarray(spec.shape)]
    return mod, inputs, outputs
