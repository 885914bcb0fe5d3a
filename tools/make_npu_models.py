#!/usr/bin/env python
"""Small ONNX graphs (seeded weights) and calibration files for the NPU partitioner's tests.

    python tools/make_npu_models.py OUT_DIR      # mlp.onnx, convnet.onnx and their inputs.npz

``mlp``: Gemm → Relu → MatMul+Add → Tanh → MatMul+Add → Softmax, and a Cos the NPU cannot run.
``convnet``: Conv → Relu → depthwise Conv (stride 2) → Clip(0, 6) → 1x1 Conv → MaxPool →
Sigmoid gate → GlobalAveragePool → Flatten → Gemm → Softmax.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, weights, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgert-npu-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _w(rng, *shape, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def mlp(seed: int = 0, with_cpu_op: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = {
        "W1": _w(rng, 64, 32, fan_in=32),
        "b1": _w(rng, 64, fan_in=8),
        "W2": _w(rng, 64, 48, fan_in=64),
        "b2": _w(rng, 48, fan_in=8),
        "W3": _w(rng, 48, 10, fan_in=48),
        "b3": _w(rng, 10, fan_in=8),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["h2"], name="fc2_bias"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="tanh2"),
    ]
    last = "a2"
    if with_cpu_op:
        nodes.append(helper.make_node("Cos", ["a2"], ["c2"], name="cos"))
        last = "c2"
    nodes += [
        helper.make_node("MatMul", [last, "W3"], ["m3"], name="fc3"),
        helper.make_node("Add", ["m3", "b3"], ["logits"], name="fc3_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["batch", 32])],
        [helper.make_tensor_value_info("probs", F32, ["batch", 10])],
        w,
        "mlp",
    )


def convnet(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = {
        "C1": _w(rng, 8, 3, 3, 3, fan_in=27),
        "c1": _w(rng, 8, fan_in=8),
        "D2": _w(rng, 8, 1, 3, 3, fan_in=9),
        "d2": _w(rng, 8, fan_in=8),
        "C3": _w(rng, 16, 8, 1, 1, fan_in=8),
        "c3": _w(rng, 16, fan_in=8),
        "G": _w(rng, 10, 16, fan_in=16),
        "g": _w(rng, 10, fan_in=8),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "C1", "c1"], ["h1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node(
            "Conv",
            ["a1", "D2", "d2"],
            ["h2"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            group=8,
            auto_pad="SAME_UPPER",
            name="dw2",
        ),
        helper.make_node("Clip", ["h2", "zero", "six"], ["a2"], name="relu6"),
        helper.make_node("Conv", ["a2", "C3", "c3"], ["h3"], kernel_shape=[1, 1], name="pw3"),
        helper.make_node("MaxPool", ["h3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2], name="pool3"),
        helper.make_node("Sigmoid", ["p3"], ["s3"], name="gate"),
        helper.make_node("Mul", ["p3", "s3"], ["g3"], name="swish"),
        helper.make_node("GlobalAveragePool", ["g3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "G", "g"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("probs", F32, ["batch", 10])],
        w,
        "convnet",
    )


def inputs(model: onnx.ModelProto, samples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random calibration samples for a model's single float input (axis 0 = samples)."""
    rng = np.random.default_rng(seed)
    i = model.graph.input[0]
    shape = [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
    return {i.name: rng.standard_normal((samples, *shape)).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, m in (("mlp", mlp()), ("convnet", convnet())):
        onnx.save(m, str(args.out / f"{name}.onnx"))
        np.savez(args.out / f"{name}_inputs.npz", **inputs(m, args.samples))
        print(f"wrote {args.out / name}.onnx and {name}_inputs.npz")


if __name__ == "__main__":
    main()
