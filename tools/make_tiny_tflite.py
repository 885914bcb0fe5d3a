#!/usr/bin/env python
"""Write a tiny TFLite model with seeded random weights, built with the `tflite` flatbuffer schema.

    python tools/make_tiny_tflite.py tiny.tflite

The graph: ``softmax(fully_connected(relu(fully_connected(x, W1, b1)), W2, b2))`` with x [3, 37],
sizes not multiples of a vector width. TensorFlow is not needed: the flatbuffer is written
field by field with the schema classes the `tflite` package generates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flatbuffers
import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.TensorType import TensorType


def _vector(builder: flatbuffers.Builder, start: object, items: list[int], kind: str = "int32") -> int:
    start(builder, len(items))
    prepend = {"int32": builder.PrependInt32, "uint8": builder.PrependUint8, "offset": builder.PrependUOffsetTRelative}
    for item in reversed(items):
        prepend[kind](item)
    return builder.EndVector()


def build(rows: int = 3, k: int = 37, hidden: int = 29, n: int = 11, seed: int = 0) -> bytes:
    """The model's flatbuffer bytes."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, k)) * 0.2).astype(np.float32)  # TFLite: [out, in]
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((n, hidden)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    b = flatbuffers.Builder(4096)

    # Buffers: 0 is the empty sentinel; activations use it too.
    datas = [None, w1, b1, w2, b2]
    buffers = []
    for data in datas:
        vec = _vector(b, tflite.BufferStartDataVector, list(data.tobytes()), "uint8") if data is not None else None
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffers.append(tflite.BufferEnd(b))

    specs = [  # name, shape, buffer
        ("x", [rows, k], 0),
        ("w1", [hidden, k], 1),
        ("b1", [hidden], 2),
        ("h", [rows, hidden], 0),
        ("w2", [n, hidden], 3),
        ("b2", [n], 4),
        ("logits", [rows, n], 0),
        ("probs", [rows, n], 0),
    ]
    tensors = []
    for name, shape, buf in specs:
        name_off = b.CreateString(name)
        shape_off = _vector(b, tflite.TensorStartShapeVector, shape)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        tflite.TensorAddType(b, TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buf)
        tflite.TensorAddName(b, name_off)
        tensors.append(tflite.TensorEnd(b))

    codes = []
    for op in (BuiltinOperator.FULLY_CONNECTED, BuiltinOperator.SOFTMAX):
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, op)
        tflite.OperatorCodeAddBuiltinCode(b, op)
        tflite.OperatorCodeAddVersion(b, 1)
        codes.append(tflite.OperatorCodeEnd(b))

    def fc_options(activation: int) -> int:
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, activation)
        return tflite.FullyConnectedOptionsEnd(b)

    def softmax_options() -> int:
        tflite.SoftmaxOptionsStart(b)
        tflite.SoftmaxOptionsAddBeta(b, 1.0)
        return tflite.SoftmaxOptionsEnd(b)

    ops = []
    for code, ins, outs, opt_type, opts in (
        (0, [0, 1, 2], [3], BuiltinOptions.FullyConnectedOptions, fc_options(tflite.ActivationFunctionType.RELU)),
        (0, [3, 4, 5], [6], BuiltinOptions.FullyConnectedOptions, fc_options(tflite.ActivationFunctionType.NONE)),
        (1, [6], [7], BuiltinOptions.SoftmaxOptions, softmax_options()),
    ):
        ins_off = _vector(b, tflite.OperatorStartInputsVector, ins)
        outs_off = _vector(b, tflite.OperatorStartOutputsVector, outs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, code)
        tflite.OperatorAddInputs(b, ins_off)
        tflite.OperatorAddOutputs(b, outs_off)
        tflite.OperatorAddBuiltinOptionsType(b, opt_type)
        tflite.OperatorAddBuiltinOptions(b, opts)
        ops.append(tflite.OperatorEnd(b))

    tensors_off = _vector(b, tflite.SubGraphStartTensorsVector, tensors, "offset")
    inputs_off = _vector(b, tflite.SubGraphStartInputsVector, [0])
    outputs_off = _vector(b, tflite.SubGraphStartOutputsVector, [7])
    ops_off = _vector(b, tflite.SubGraphStartOperatorsVector, ops, "offset")
    name_off = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_off)
    tflite.SubGraphAddInputs(b, inputs_off)
    tflite.SubGraphAddOutputs(b, outputs_off)
    tflite.SubGraphAddOperators(b, ops_off)
    tflite.SubGraphAddName(b, name_off)
    subgraph = tflite.SubGraphEnd(b)

    codes_off = _vector(b, tflite.ModelStartOperatorCodesVector, codes, "offset")
    subgraphs_off = _vector(b, tflite.ModelStartSubgraphsVector, [subgraph], "offset")
    buffers_off = _vector(b, tflite.ModelStartBuffersVector, buffers, "offset")
    desc = b.CreateString("edgert tiny model")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes_off)
    tflite.ModelAddSubgraphs(b, subgraphs_off)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_off)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def main() -> None:
    """Command line: write the model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    args.output.write_bytes(build())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
