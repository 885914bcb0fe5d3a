"""Convolution kernels (1-D, 2-D, strided, dilated, grouped, depthwise, transposed, fused epilogues)
and the zoo's small models, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = TensorProto.FLOAT


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _conv_graph(rank: int, cases: list[tuple[str, dict, tuple[int, ...], str]], cin: int, size: list[int]) -> onnx.ModelProto:
    """One input, one output per case: op(x, W, b) then an activation."""
    rng = np.random.default_rng(rank)
    nodes, inits, outputs = [], [], []
    for i, (op, attrs, wshape, act) in enumerate(cases):
        w, b = f"w{i}", f"b{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal(wshape) * 0.3).astype(np.float32), w))
        cout = wshape[1] * attrs.get("group", 1) if op == "ConvTranspose" else wshape[0]
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.3).astype(np.float32), b))
        nodes.append(helper.make_node(op, ["x", w, b], [f"c{i}"], kernel_shape=list(wshape[2:]), **attrs))
        nodes.append(helper.make_node(act, [f"c{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", F32, None))
    x = helper.make_tensor_value_info("x", F32, [1, cin, *size])
    graph = helper.make_graph(nodes, f"conv{rank}", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


CONV1D = [
    ("Conv", {"strides": [3], "pads": [2, 1]}, (12, 8, 5), "Relu"),  # strided, uneven pads
    ("Conv", {"dilations": [2], "pads": [2, 2]}, (9, 8, 3), "Tanh"),  # dilated
    ("Conv", {"group": 4, "strides": [2], "pads": [1, 1]}, (12, 2, 3), "Elu"),  # grouped
    ("Conv", {"group": 8, "pads": [3, 3]}, (8, 1, 7), "Sigmoid"),  # depthwise
    ("Conv", {}, (5, 8, 1), "Relu"),  # pointwise
    ("ConvTranspose", {"strides": [2], "pads": [1, 1]}, (8, 6, 4), "Tanh"),  # transposed
    ("ConvTranspose", {"strides": [3], "pads": [0, 1], "output_padding": [1]}, (8, 3, 5), "Relu"),
]
CONV2D = [
    ("Conv", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (10, 6, 3, 3), "Relu"),
    ("Conv", {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (7, 6, 3, 3), "Tanh"),
    ("Conv", {"group": 6, "pads": [1, 1, 1, 1]}, (6, 1, 3, 3), "Relu"),  # depthwise
    ("Conv", {"group": 2, "strides": [1, 2], "pads": [0, 1, 0, 1]}, (8, 3, 3, 2), "Sigmoid"),  # grouped
    ("ConvTranspose", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (6, 4, 4, 4), "Relu"),
]


@pytest.mark.parametrize("rank", [1, 2])
def test_conv_kernels_match_onnxruntime(tmp_path, rank):
    import edgert

    cases, cin, size = (CONV1D, 8, [67]) if rank == 1 else (CONV2D, 6, [19, 37])
    path = tmp_path / f"conv{rank}.onnx"
    onnx.save(_conv_graph(rank, cases, cin, size), str(path))
    result = edgert.compile(str(path), output=tmp_path / "c.edgert")
    # Every conv took the direct kernel: none is left on TVM's default lowering.
    assert not [k for k in result.manifest.get("kernels", {}).get("fallback", []) if "conv" in k]
    x = np.random.default_rng(5).standard_normal((1, cin, *size)).astype(np.float32)
    got = edgert.load(tmp_path / "c.edgert")(x=x)
    for key, want in _reference(path, {"x": x}).items():
        np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-4, err_msg=key)
