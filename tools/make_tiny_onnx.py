#!/usr/bin/env python
"""Write tiny ONNX graphs with seeded random weights, one per kind of kernel edgert schedules.

    python tools/make_tiny_onnx.py OUT_DIR            # every graph
    python tools/make_tiny_onnx.py OUT_DIR --only dense

Sizes are deliberately awkward (not multiples of the vector width, one row) so that tail
handling in the schedule rules is exercised.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
F32 = TensorProto.FLOAT


def _model(nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgert-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def dense(k: int = 37, n: int = 53, seed: int = 0) -> onnx.ModelProto:
    """``gelu(x @ W + b)`` with a symbolic row count: the dense rule with its fused epilogue."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        # GELU written out as exporters do: 0.5 * h * (1 + erf(h / sqrt(2)))
        helper.make_node("Div", ["h", "sqrt2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["he"]),
        helper.make_node("Mul", ["he", "half"], ["y"]),
    ]
    weights = {
        "W": _rand(rng, k, n),
        "b": _rand(rng, n),
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    inputs = [helper.make_tensor_value_info("x", F32, ["batch", "rows", k])]
    outputs = [helper.make_tensor_value_info("y", F32, ["batch", "rows", n])]
    return _model(nodes, inputs, outputs, weights, "dense")


def attention(heads: int = 3, dim: int = 13, seq: int = 7, seed: int = 1) -> onnx.ModelProto:
    """``softmax(q @ k^T * s + mask) @ v`` over [batch, heads, seq, dim]: batch matmul and softmax."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Add", ["ss", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    weights = {"scale": np.array(1 / np.sqrt(dim), np.float32), "mask": _rand(rng, 1, 1, 1, seq, scale=1.0)}
    inputs = [helper.make_tensor_value_info(n, F32, [1, heads, seq, dim]) for n in ("q", "k", "v")]
    outputs = [helper.make_tensor_value_info("y", F32, [1, heads, seq, dim])]
    return _model(nodes, inputs, outputs, weights, "attention")


def layernorm(d: int = 45, seed: int = 2) -> onnx.ModelProto:
    """``LayerNormalization(x + r)`` over the last axis: the residual add fused into the norm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Add", ["x", "r"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    weights = {"gamma": 1 + _rand(rng, d), "beta": _rand(rng, d)}
    inputs = [helper.make_tensor_value_info(n, F32, ["rows", d]) for n in ("x", "r")]
    outputs = [helper.make_tensor_value_info("y", F32, ["rows", d])]
    return _model(nodes, inputs, outputs, weights, "layernorm")


def conv1d(cin: int = 5, cout: int = 11, width: int = 3, length: int = 29, seed: int = 3) -> onnx.ModelProto:
    """``relu(conv1d(x, W, b))`` with padding and stride 2, as in silero-vad's encoder."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1], strides=[2], kernel_shape=[width]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    weights = {"W": _rand(rng, cout, cin, width), "b": _rand(rng, cout)}
    out_len = (length + 2 - width) // 2 + 1
    inputs = [helper.make_tensor_value_info("x", F32, [1, cin, length])]
    outputs = [helper.make_tensor_value_info("y", F32, [1, cout, out_len])]
    return _model(nodes, inputs, outputs, weights, "conv1d")


def unsupported() -> onnx.ModelProto:
    """A graph with operators TVM's importer lacks (for the error test)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        helper.make_node("Celu", ["r"], ["c1"], name="celu_a"),
        helper.make_node("Celu", ["c1"], ["c2"], name="celu_b"),
        helper.make_node("MyCustomOp", ["c2"], ["y"], name="custom1", domain="com.example"),
    ]
    inputs = [helper.make_tensor_value_info("x", F32, [6])]
    outputs = [helper.make_tensor_value_info("y", F32, [6])]
    graph = helper.make_graph(nodes, "unsupported", inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    return model


GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "dense": dense,
    "attention": attention,
    "layernorm": layernorm,
    "conv1d": conv1d,
    "unsupported": unsupported,
}


def write(out_dir: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Write the chosen graphs into ``out_dir``; return their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in only or list(GRAPHS):
        paths[name] = out_dir / f"{name}.onnx"
        onnx.save(GRAPHS[name](), str(paths[name]))
    return paths


def main() -> None:
    """Command line: write the graphs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", action="append", choices=sorted(GRAPHS))
    args = parser.parse_args()
    for name, path in write(args.out_dir, args.only).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
