"""NPU partitions: int8 TFLite written by edgert, LiteRT vs edgert's integer reference, quantization
accuracy, the partition plan, calibration checks and Vela (Arm Ethos-U) compiles."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.compiler.npu import reference
from edgert.compiler.npu.ir import Graph, QParams, Tensor
from edgert.compiler.npu.tflite_writer import write_tflite

pytest.importorskip("ai_edge_litert")


def _act(g: Graph, name: str, shape, scale: float, zp: int) -> str:
    return g.add(Tensor(name, tuple(shape), "int8", QParams.of(scale, zp)))


def _weights(rng, shape, axis: int) -> tuple[np.ndarray, np.ndarray]:
    w = rng.integers(-127, 128, shape).astype(np.int8)
    scales = rng.uniform(0.002, 0.02, shape[axis]).astype(np.float32)
    return w, scales


def _op_graph(kind: str, rng: np.random.Generator) -> Graph:
    """One op with random quantization (awkward sizes) between int8 inputs and outputs."""
    g = Graph()
    s_in, z_in = float(rng.uniform(0.01, 0.1)), int(rng.integers(-20, 20))
    s_out, z_out = float(rng.uniform(0.02, 0.2)), int(rng.integers(-20, 20))
    x = _act(g, "x", (1, 5, 7, 6) if kind not in ("FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX") else (1, 3, 37),
             s_in, z_in)
    g.inputs = [x]
    shape = g.tensors[x].shape
    if kind == "FULLY_CONNECTED":
        w, ws = _weights(rng, (19, 37), 0)
        wn = g.const("w", w, QParams.of(ws, 0, 0))
        b = g.const("b", rng.integers(-3000, 3000, 19).astype(np.int32), QParams.of(s_in * ws, 0, 0))
        y = _act(g, "y", (1, 3, 19), s_in * 3, z_out)
        g.op(kind, [x, wn, b], [y], keep_num_dims=True, fused_activation="RELU")
    elif kind == "BATCH_MATMUL":
        x2 = _act(g, "x2", (1, 37, 11), 0.05, 3)
        g.inputs.append(x2)
        y = _act(g, "y", (1, 3, 11), 1.5, z_out)
        g.op(kind, [x, x2], [y])
    elif kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        if kind == "CONV_2D":
            w, ws = _weights(rng, (8, 3, 3, 6), 0)
            wn = g.const("w", w, QParams.of(ws, 0, 0))
            oshape = (1, 3, 4, 8)
        else:
            w, ws = _weights(rng, (1, 3, 3, 6), 3)
            wn = g.const("w", w, QParams.of(ws, 0, 3))
            oshape = (1, 3, 4, 6)
        b = g.const("b", rng.integers(-3000, 3000, len(ws)).astype(np.int32), QParams.of(s_in * ws, 0, 0))
        y = _act(g, "y", oshape, s_in * 0.7, z_out)
        g.op(kind, [x, wn, b], [y], padding="SAME", stride=(2, 2), fused_activation="RELU6")
    elif kind in ("ADD", "SUB", "MUL"):
        x2 = _act(g, "x2", (1, 1, 7, 6), float(rng.uniform(0.01, 0.1)), int(rng.integers(-20, 20)))
        g.inputs.append(x2)
        s2 = g.tensors[x2].q.per_tensor[0]
        s_y = s_in * s2 * 60 if kind == "MUL" else max(s_in, s2) * 2.2
        y = _act(g, "y", shape, s_y, z_out)
        g.op(kind, [x, x2], [y])
    elif kind in ("LOGISTIC", "SOFTMAX"):
        y = _act(g, "y", shape, 1 / 256, -128)
        g.op(kind, [x], [y], beta=1.0)
    elif kind == "TANH":
        y = _act(g, "y", shape, 1 / 128, 0)
        g.op(kind, [x], [y])
    elif kind in ("GELU", "RELU", "RELU6"):
        y = _act(g, "y", shape, s_out / 3, z_out)
        g.op(kind, [x], [y])
    elif kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        y = _act(g, "y", (1, 3, 4, 6), s_in, z_in)
        g.op(kind, [x], [y], kernel=(3, 3), stride=(2, 2), padding="SAME")
    elif kind == "RESHAPE":
        y = _act(g, "y", (1, 35, 6), s_in, z_in)
        shp = g.const("shape", np.array([1, 35, 6], np.int32))
        g.op(kind, [x, shp], [y], new_shape=(1, 35, 6))
    elif kind == "TRANSPOSE":
        y = _act(g, "y", (1, 6, 5, 7), s_in, z_in)
        perm = g.const("perm", np.array([0, 3, 1, 2], np.int32))
        g.op(kind, [x, perm], [y])
    elif kind == "CONCATENATION":
        x2 = _act(g, "x2", (1, 5, 7, 2), s_in, z_in)
        g.inputs.append(x2)
        y = _act(g, "y", (1, 5, 7, 8), s_in, z_in)
        g.op(kind, [x, x2], [y], axis=3)
    elif kind == "PAD":
        y = _act(g, "y", (1, 6, 9, 6), s_in, z_in)
        pads = g.const("pads", np.array([[0, 0], [0, 1], [1, 1], [0, 0]], np.int32))
        g.op(kind, [x, pads], [y])
    else:
        raise AssertionError(kind)
    g.outputs = [g.ops[-1].outputs[0]]
    return g


OPS = ["FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "SOFTMAX",
       "LOGISTIC", "TANH", "GELU", "RELU", "RELU6", "AVERAGE_POOL_2D", "MAX_POOL_2D", "RESHAPE", "TRANSPOSE",
       "CONCATENATION", "PAD"]


@pytest.mark.parametrize("kind", OPS)
def test_litert_matches_the_integer_reference_bit_for_bit(kind: str) -> None:
    from edgert.runtime.litert import LiteRTPartition

    for seed in range(4):
        rng = np.random.default_rng(seed)
        g = _op_graph(kind, rng)
        feeds = {n: rng.integers(-128, 128, g.tensors[n].shape).astype(np.int8) for n in g.inputs}
        expected = reference.run(g, feeds)[g.outputs[0]]
        got = LiteRTPartition(write_tflite(g))(*(feeds[n] for n in g.inputs), raw=True)[0]
        assert got.dtype == np.int8 and got.shape == expected.shape
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() == 0, f"{kind} seed {seed}: {np.count_nonzero(diff)} of {diff.size} differ, max {diff.max()}"


@pytest.mark.parametrize("kind", ["QUANTIZE", "DEQUANTIZE"])
def test_float_boundary_ops_match_the_reference(kind: str) -> None:
    from edgert.runtime.litert import LiteRTPartition

    rng = np.random.default_rng(0)
    g = Graph()
    x = _act(g, "x", (4, 33), 0.037, -7)
    y = _act(g, "y", (4, 33), 0.037, -7)
    g.op("RESHAPE", [x, g.const("s", np.array([4, 33], np.int32))], [y], new_shape=(4, 33))
    g.inputs, g.outputs = [x], [y]
    fg = __import__("edgert.compiler.npu.tflite_writer", fromlist=["with_float_io"]).with_float_io(g)
    xf = (rng.standard_normal((4, 33)) * 3).astype(np.float32)
    xf[0, :4] = [0.0185, -0.0185, 0.037 * 2.5, 100.0]  # ties and saturation
    expected = reference.run(fg, {fg.inputs[0]: xf})
    interp = LiteRTPartition(write_tflite(g, float_io=True))
    got = interp(xf)[0]
    if kind == "QUANTIZE":
        q = reference.quantize(xf, 0.037, -7)
        assert np.array_equal(expected[y], q)
    np.testing.assert_array_equal(got, expected[fg.outputs[0]])
