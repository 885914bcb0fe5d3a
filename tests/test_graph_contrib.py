"""onnxruntime's transformer operators (com.microsoft Attention, QAttention, SkipLayerNormalization,
BiasGelu, FastGelu, Gelu) as standard ONNX operators (`edgert.frontend.onnx_contrib`), against
onnxruntime: a graph of each with the mask forms, and a BERT-shaped encoder of the zoo fused by
onnxruntime's transformer optimizer and quantized by its dynamic quantizer (QAttention)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

MS = "com.microsoft"


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _model(nodes: list, inputs: list, outputs: list[str], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "contrib",
        inputs,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _contrib_graph() -> onnx.ModelProto:
    """Attention with a raw 2-D mask; Attention with 1-D end positions, a narrower V and its own
    scale; SkipLayerNormalization with a bias and its sum output; FastGelu, Gelu, BiasGelu.
    (QAttention: the zoo's encoder below.)"""
    rng = np.random.default_rng(1)

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    inits = {"w": f(32, 96), "b": f(96), "w2": f(32, 80), "b2": f(80), "g": 1 + f(32), "be": f(32), "sb": f(32)}
    inits |= {"fb": f(32), "fb16": f(16)}
    node = helper.make_node
    nodes = [
        node("Attention", ["x", "w", "b", "mask2"], ["a1"], domain=MS, num_heads=2),
        node(
            "Attention",
            ["x", "w2", "b2", "mask1"],
            ["a2"],
            domain=MS,
            num_heads=2,
            qkv_hidden_sizes=[32, 32, 16],
            scale=0.3,
        ),
        node("SkipLayerNormalization", ["a1", "x", "g", "be", "sb"], ["ln", "", "", "sum"], domain=MS, epsilon=1e-5),
        node("FastGelu", ["ln", "fb"], ["fg"], domain=MS),
        node("Gelu", ["sum"], ["ge"], domain=MS),
        node("BiasGelu", ["a2", "fb16"], ["bg"], domain=MS),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32]),
        helper.make_tensor_value_info("mask2", TensorProto.INT32, [1, 6]),
        helper.make_tensor_value_info("mask1", TensorProto.INT32, [1]),
    ]
    return _model(nodes, inputs, ["fg", "ge", "bg", "sum"], inits)


def test_contrib_operators_match_onnxruntime(tmp_path: Path) -> None:
    import edgert

    path = tmp_path / "contrib.onnx"
    onnx.save(_contrib_graph(), str(path))
    edgert.compile(str(path), output=tmp_path / "c.edgert")
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((1, 6, 32)).astype(np.float32),
        "mask2": np.array([[1, 1, 0, 1, 1, 0]], np.int32),  # keys 2 and 5 masked
        "mask1": np.array([4], np.int32),  # keys 4 and 5 masked
    }
    got = edgert.load(tmp_path / "c.edgert")(feeds)
    for key, want in _reference(path, feeds).items():
        # The same float operations in another summation order.
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()), err_msg=key)


def test_unsupported_attention_variant_is_named(tmp_path: Path) -> None:
    from edgert.errors import UnsupportedModelError
    from edgert.frontend.onnx_graph import import_onnx

    node = helper.make_node("Attention", ["x", "w"], ["y"], name="att0", domain=MS, num_heads=2, unidirectional=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    onnx.save(_model([node], [x], ["y"], {"w": np.zeros((8, 24), np.float32)}), str(tmp_path / "a.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"com\.microsoft\.Attention node att0: attribute unidirectional"):
        import_onnx(tmp_path / "a.onnx")


def test_quantized_bert_of_the_zoo_with_qattention_matches_onnxruntime(tmp_path: Path) -> None:
    """The zoo's small BERT-shaped encoder through onnxruntime's transformer optimizer (Attention,
    SkipLayerNormalization, BiasGelu) and dynamic quantizer (QAttention, MatMulInteger), with a
    padded mask (the optimizer's 1-D mask_index): onnxruntime's output within 1e-5 (the integer
    accumulators are exact; float attention and layer norms differ by summation order, measured
    2.4e-7), QAttention's QKV GEMM on the integer kernel where the CPU has one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    import edgert
    from edgert.compiler.schedules.int8_graph import int8_isa
    from edgert.compiler.target import resolve
    from edgert.profile.measure import graph_operator_times
    from edgert.targets import load_target

    zoo = load_tool("make_graph_zoo")
    index = zoo.write(tmp_path, only=["encoder_512"], small=True, int8=False)["encoder_512"]
    fused = optimizer.optimize_model(
        str(tmp_path / index["file"]), model_type="bert", num_heads=2, hidden_size=128, opt_level=0
    )
    fused.save_model_to_file(str(tmp_path / "fused.onnx"))
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's per-tensor chatter
    path = tmp_path / "bert.qattention.onnx"
    quantize_dynamic(
        str(tmp_path / "fused.onnx"),
        str(path),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},  # the contrib ops' outputs have no inferred type
    )
    ops = {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
    assert {(MS, "QAttention"), (MS, "SkipLayerNormalization"), (MS, "BiasGelu")} <= ops
    edgert.compile(str(path), output=tmp_path / "q.edgert")
    model = edgert.load(tmp_path / "q.edgert")
    shapes = {k: (v["shape"], v["dtype"]) for k, v in index["inputs"].items()}
    for seed in (3, 4):
        feeds = zoo.sample_inputs(shapes, seed)
        assert not feeds["attention_mask"].all()  # a padded tail: the mask is in play
        want = _reference(path, feeds)["output"]
        np.testing.assert_allclose(
            model(feeds)["output"], want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max()))
        )
    target, _ = resolve(load_target("host"), threads=2)
    if int8_isa(target):  # Q, K and V in one integer GEMM: a kernel the VM calls
        called = [op["operator"] for op in graph_operator_times(model, feeds, calls=1)]
        assert [n for n in called if n.startswith("u8s8") and "_k128_n384" in n], called


def _lstm_graph(steps: int, inputs: int, hidden: int) -> onnx.ModelProto:
    """A forward LSTM (bias, initial states as inputs) and a linear layer on its last hidden state."""
    rng = np.random.default_rng(0)

    def f(*shape: int, s: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    inits = {"W": f(1, 4 * hidden, inputs), "R": f(1, 4 * hidden, hidden), "B": f(1, 8 * hidden, s=0.1)}
    inits["P"] = f(hidden, 8)
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "yh", "yc"], hidden_size=hidden),
        helper.make_node("MatMul", ["yh", "P"], ["out"]),
    ]
    shapes = {"x": [steps, 1, inputs], "h0": [1, 1, hidden], "c0": [1, 1, hidden]}
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()]
    model = _model(nodes, ins, ["y", "yh", "yc", "out"], inits)
    del model.opset_import[1:]  # the float model uses the standard domain only
    return model


def test_dynamic_quantize_lstm_takes_onnxruntimes_integer_path(tmp_path: Path) -> None:
    """onnxruntime's DynamicQuantizeLSTM (its dynamic quantizer's int8 LSTM) on the same integer path:
    the inputs quantized once for all steps, each hidden state per step, exact integer products. Its
    outputs within 1e-5 of onnxruntime's (float gate arithmetic in another order; measured 1.3e-7),
    where the int8 model itself is ~1e-2 from the float one: the activations' rounding is reproduced."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import edgert

    steps, hidden = 4, 32
    onnx.save(_lstm_graph(steps, 24, hidden), str(tmp_path / "f.onnx"))
    logging.getLogger().setLevel(logging.ERROR)
    path = tmp_path / "lstm.int8.onnx"
    quantize_dynamic(str(tmp_path / "f.onnx"), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
    assert (MS, "DynamicQuantizeLSTM") in {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
    edgert.compile(str(path), output=tmp_path / "l.edgert")
    model = edgert.load(tmp_path / "l.edgert")
    rng = np.random.default_rng(1)
    for h0 in (np.zeros((1, 1, hidden), np.float32), rng.standard_normal((1, 1, hidden)).astype(np.float32) * 0.5):
        feeds = {"x": rng.standard_normal((steps, 1, 24)).astype(np.float32), "h0": h0}
        feeds["c0"] = rng.standard_normal((1, 1, hidden)).astype(np.float32) * 0.5
        got, floats = model(feeds), _reference(tmp_path / "f.onnx", feeds)
        for key, want in _reference(path, feeds).items():
            np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-5, err_msg=key)
            assert np.abs(floats[key] - want).max() > 1e-3, key
