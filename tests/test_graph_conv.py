"""Convolution kernels (1-D, 2-D, strided, dilated, grouped, depthwise, transposed, fused epilogues)
and the zoo's small models, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _conv_graph(
    rank: int, cases: list[tuple[str, dict, tuple[int, ...], str]], cin: int, size: list[int]
) -> onnx.ModelProto:
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


def _int8_graph() -> onnx.ModelProto:
    """QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, DynamicQuantizeLinear and
    com.microsoft.DynamicQuantizeMatMul on one float input."""
    rng = np.random.default_rng(11)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    u8 = lambda v: np.array(v, np.uint8)  # noqa: E731
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    inits = [
        init("xs", f32(0.02)),
        init("xz", u8(128)),
        init("w", rng.integers(-127, 128, (6, 4, 3)).astype(np.int8)),
        init("ws", (rng.random(6) * 0.01 + 0.005).astype(np.float32)),
        init("wz", np.zeros(6, np.int8)),
        init("bias", rng.integers(-500, 500, 6).astype(np.int32)),
        init("ys", f32(0.05)),
        init("yz", u8(120)),
        init("m", rng.integers(-127, 128, (19, 7)).astype(np.int8)),
        init("ms", f32(0.01)),
        init("mz", np.array(0, np.int8)),
        init("wi", rng.integers(0, 255, (5, 4, 3)).astype(np.uint8)),
        init("wiz", u8(3)),
        init("mf", rng.standard_normal((19, 7)).astype(np.float32)),
        init("mfs", (rng.random(7) * 0.01 + 0.005).astype(np.float32)),
        init("mfq", rng.integers(-127, 128, (19, 7)).astype(np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["qconv"], pads=[1, 1], strides=[2]
        ),
        helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "m", "ms", "mz", "ys", "yz"], ["qmm"]),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["dq", "dqs", "dqz"]),
        helper.make_node("ConvInteger", ["dq", "wi", "dqz", "wiz"], ["iconv"], pads=[0, 2]),
        helper.make_node("MatMulInteger", ["dq", "m", "dqz"], ["imm"]),
        helper.make_node("DynamicQuantizeMatMul", ["x", "mfq", "mfs"], ["dqmm"], domain="com.microsoft"),
    ]
    shape = [1, 4, 19]
    outs = {"qconv": TensorProto.UINT8, "qmm": TensorProto.UINT8, "iconv": TensorProto.INT32}
    outs |= {"imm": TensorProto.INT32, "dqmm": F32}
    graph = helper.make_graph(
        nodes,
        "int8",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info(k, v, None) for k, v in outs.items()],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_int8_operators_match_onnxruntime(tmp_path):
    import edgert

    path = tmp_path / "int8.onnx"
    onnx.save(_int8_graph(), str(path))
    edgert.compile(str(path), output=tmp_path / "q.edgert")
    x = np.random.default_rng(2).standard_normal((1, 4, 19)).astype(np.float32)
    got = edgert.load(tmp_path / "q.edgert")(x=x)
    want = _reference(path, {"x": x})
    # Integer accumulators (ConvInteger, MatMulInteger) are exact.
    for key in ("iconv", "imm"):
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key])
    # Requantized outputs (QLinearConv, QLinearMatMul): the same bytes, as the requantization
    # repeats onnxruntime's float operations on an exact accumulator (see onnx_quant).
    for key in ("qconv", "qmm"):
        assert got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["dqmm"], want["dqmm"], rtol=1e-5, atol=1e-5)


# (scale, zero point, output type): an int8 step, a uint8 one, a subnormal and a huge scale.
QUANTIZE_CASES = [
    (0.0123, 0, TensorProto.INT8),
    (0.37, 128, TensorProto.UINT8),
    (3e-39, -5, TensorProto.INT8),
    (2.5e30, 7, TensorProto.UINT8),
]


def _boundary_values(scale: float, rng: np.random.Generator) -> np.ndarray:
    """Values at the quantizer's rounding boundaries ``(k + 0.5) * scale`` (float32), one float32
    step either side of them, multiples of ``scale``, wide random values and infinities."""
    s = np.float32(scale)
    k = np.arange(-140, 140, dtype=np.float64)
    edge = ((k + 0.5) * np.float64(s)).astype(np.float32)
    wide = rng.standard_normal(200).astype(np.float32) * s * 300
    steps = [np.nextafter(edge, np.float32(np.inf)), np.nextafter(edge, np.float32(-np.inf))]
    multiples = (k * np.float64(s)).astype(np.float32)
    return np.concatenate([edge, *steps, multiples, wide, [np.inf, -np.inf]]).astype(np.float32)


def test_quantize_linear_matches_onnxruntime_bytes_at_rounding_boundaries(tmp_path):
    """QuantizeLinear inside the graph (its ``x / scale`` computed without a division, see
    layout._divided): onnxruntime's bytes at every rounding boundary, subnormal and huge scales
    included. A float32 multiplication by the reciprocal was one step off on 136 of q0's 1322."""
    import edgert

    nodes, inits, inputs, outputs, feeds = [], [], [], [], {}
    rng = np.random.default_rng(5)
    for i, (scale, zp, kind) in enumerate(QUANTIZE_CASES):
        x = _boundary_values(scale, rng)
        feeds[f"x{i}"] = x[None]
        inputs.append(helper.make_tensor_value_info(f"x{i}", F32, [1, x.size]))
        zp_type = np.int8 if kind == TensorProto.INT8 else np.uint8
        inits += [
            numpy_helper.from_array(np.array(scale, np.float32), f"s{i}"),
            numpy_helper.from_array(np.array(zp, zp_type), f"z{i}"),
        ]
        # Neg: a quantize of a computed value (one of a graph input stays onnx's own lowering).
        nodes += [
            helper.make_node("Neg", [f"x{i}"], [f"n{i}"]),
            helper.make_node("QuantizeLinear", [f"n{i}", f"s{i}", f"z{i}"], [f"q{i}"]),
        ]
        outputs.append(helper.make_tensor_value_info(f"q{i}", kind, None))
    graph = helper.make_graph(nodes, "quantize", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "quantize.onnx"
    onnx.save(model, str(path))
    edgert.compile(str(path), output=tmp_path / "q.edgert")
    got = edgert.load(tmp_path / "q.edgert")(feeds)
    for key, want in _reference(path, feeds).items():
        assert got[key].dtype == want.dtype, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def _assert_onnxruntime_bytes(path: Path, artifact: Path, seed: int) -> None:
    """The integer-layers artifact's outputs equal onnxruntime's on ``path``, byte for byte."""
    import edgert

    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((1, 13, 20)).astype(np.float32),
        "x2": rng.standard_normal((13, 20)).astype(np.float32),
    }
    got = edgert.load(artifact)(feeds)
    for key, want in _reference(path, feeds).items():
        assert got[key].dtype == want.dtype, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def _integer_layers_graph() -> onnx.ModelProto:
    """The integer layers of onnxruntime's quantizers on float inputs [1, 13, 20] and [13, 20]: dynamic
    (DynamicQuantizeLinear + MatMulInteger, 40 columns: a partial column tile), QDQ MatMul
    (per-column weight scales, then QuantizeLinear), QDQ Gemm (transposed weight, int32 bias) and
    QDQ Convs with an int32 bias (3 and 11 taps), then QuantizeLinear."""
    rng = np.random.default_rng(23)

    def init(name: str, value: Any) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    i8 = lambda *shape: rng.integers(-128, 128, shape).astype(np.int8)  # noqa: E731
    cs = (rng.random(8) * 0.004 + 0.001).astype(np.float32)
    inits = [
        init("w", i8(20, 40)),
        init("xs", np.float32(0.013)),
        init("xz", np.uint8(131)),
        init("ws", (rng.random(24) * 0.004 + 0.001).astype(np.float32)),
        init("wz", np.zeros(24, np.int8)),
        init("wm", i8(20, 24)),
        init("ys", np.float32(0.02)),
        init("yz", np.uint8(125)),
        init("wg", i8(12, 20)),
        init("gs", np.float32(0.003)),
        init("bg", rng.integers(-3000, 3000, 12).astype(np.int32)),
        init("bgs", np.float32(0.013 * 0.003)),
        init("wc", i8(8, 13, 3)),
        init("cs", cs),
        init("cz", np.zeros(8, np.int8)),
        init("bc", rng.integers(-3000, 3000, 8).astype(np.int32)),
        init("wc2", i8(8, 13, 11)),
        init("bcs", np.float32(0.013) * cs),  # a bias at the accumulator's scale, as quantizers write it
    ]
    node = helper.make_node
    nodes = [
        node("DynamicQuantizeLinear", ["x"], ["dq", "dqs", "dqz"]),
        node("MatMulInteger", ["dq", "w", "dqz"], ["imm"]),
        node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        node("DequantizeLinear", ["wm", "ws", "wz"], ["wmd"], axis=1),
        node("MatMul", ["xd", "wmd"], ["mm"]),
        node("QuantizeLinear", ["mm", "ys", "yz"], ["qmm"]),
        node("DequantizeLinear", ["wg", "gs"], ["wgd"]),
        node("DequantizeLinear", ["bg", "bgs"], ["bgd"]),
        node("QuantizeLinear", ["x2", "xs", "xz"], ["x2q"]),
        node("DequantizeLinear", ["x2q", "xs", "xz"], ["x2d"]),
        node("Gemm", ["x2d", "wgd", "bgd"], ["gemm"], transB=1),
        node("QuantizeLinear", ["gemm", "ys", "yz"], ["qgemm"]),
        node("DequantizeLinear", ["wc", "cs", "cz"], ["wcd"], axis=0),
        node("DequantizeLinear", ["bc", "bcs"], ["bcd"], axis=0),
        node("Conv", ["xd", "wcd", "bcd"], ["conv"], pads=[1, 1], kernel_shape=[3]),
        node("QuantizeLinear", ["conv", "ys", "yz"], ["qconv"]),
        # 11 taps x 13 channels: the integer conv kernel (channels padded to 16, zero-point border)
        node("DequantizeLinear", ["wc2", "cs"], ["wc2d"], axis=0),
        node("Conv", ["xd", "wc2d", "bcd"], ["conv2"], pads=[5, 4], strides=[2], kernel_shape=[11]),
        node("QuantizeLinear", ["conv2", "ys", "yz"], ["qconv2"]),
    ]
    outs = {"imm": TensorProto.INT32, "qmm": TensorProto.UINT8, "qgemm": TensorProto.UINT8}
    outs["qconv"] = outs["qconv2"] = TensorProto.UINT8
    graph = helper.make_graph(
        nodes,
        "integer_layers",
        [helper.make_tensor_value_info("x", F32, [1, 13, 20]), helper.make_tensor_value_info("x2", F32, [13, 20])],
        [helper.make_tensor_value_info(k, v, None) for k, v in outs.items()],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_integer_layers_match_onnxruntime_exactly(tmp_path):
    """MatMulInteger on the VNNI kernel and the QDQ layers as integer ops: onnxruntime's bytes."""
    import edgert
    from edgert.compiler.schedules.int8_graph import has_vnni
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    path = tmp_path / "layers.onnx"
    onnx.save(_integer_layers_graph(), str(path))
    target, _ = resolve(load_target("host"), threads=2)
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    vnni = has_vnni(target)
    # Integer matmuls by a constant weight: the dynamic one, the QDQ MatMul and the Gemm; the
    # 11-tap conv on the integer conv kernel, the 3-tap one (39 products) on the float conv.
    assert len([n for n in names if "u8s8_gemm" in n]) == (3 if vnni else 0)
    convs = [n for n in names if "u8s8_conv" in n]
    assert len(convs) == (1 if vnni else 0)
    # the conv's requantization (the QuantizeLinear after it) in the conv: uint8 out, no int32 conv left
    assert all(n.endswith("_qu") for n in convs)
    edgert.compile(str(path), output=tmp_path / "l.edgert")
    _assert_onnxruntime_bytes(path, tmp_path / "l.edgert", seed=4)


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="an x86-64 build runs on x86-64 hosts only")
def test_integer_layers_on_avx2_match_onnxruntime_exactly(tmp_path):
    """x86-64-v3 (AVX2, no VNNI): the same integer layers on the vpmaddwd kernels, onnxruntime's bytes
    (13 rows: row tiles of 5 with a remainder; 12, 24 and 40 columns: partial 16-column tiles)."""
    import edgert
    from edgert.compiler.schedules.int8_graph import int8_isa
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    path = tmp_path / "layers.onnx"
    onnx.save(_integer_layers_graph(), str(path))
    target, _ = resolve(load_target("x86-64-v3"), threads=2)
    assert int8_isa(target) == "avx2"
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert len([n for n in names if "u8s8_avx2_gemm" in n]) == 3
    assert len([n for n in names if "u8s8_avx2_conv" in n]) == 1
    edgert.compile(str(path), target="x86-64-v3", output=tmp_path / "l.edgert")
    _assert_onnxruntime_bytes(path, tmp_path / "l.edgert", seed=6)


def test_unsupported_contrib_operator_is_named(tmp_path):
    from edgert.errors import UnsupportedModelError
    from edgert.frontend.onnx_graph import import_onnx

    node = helper.make_node("QLinearLeakyRelu", ["x"], ["y"], name="lrelu0", domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", F32, [1, 2])], [helper.make_tensor_value_info("y", F32, None)]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(tmp_path / "lrelu.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"com\.microsoft\.QLinearLeakyRelu \(nodes: lrelu0\)"):
        import_onnx(tmp_path / "lrelu.onnx")


def test_qdq_conv_chain_fuses_requantization_pad_and_pool(tmp_path):
    """QDQ Conv -> Conv -> MaxPool as onnxruntime's static quantizer writes them: the first conv
    writes the second's zero-point-padded input, the second its requantized bytes, the max pool of
    their dequantized values runs on the bytes; onnxruntime's bytes."""
    import edgert
    from edgert.compiler.schedules.int8_graph import has_vnni
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    rng = np.random.default_rng(31)
    c = 16

    def init(name: str, value: Any) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [init("xs", np.float32(0.02)), init("xz", np.uint8(120)), init("ys", np.float32(0.05))]
    inits += [init("yz", np.uint8(0)), init("zs", np.float32(0.04)), init("zz", np.uint8(0))]
    node = helper.make_node
    nodes = [node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), node("DequantizeLinear", ["xq", "xs", "xz"], ["h0"])]
    for i, (scale, zero) in enumerate((("ys", "yz"), ("zs", "zz"))):
        ws = (rng.random(c) * 0.004 + 0.001).astype(np.float32)
        inits += [init(f"w{i}", rng.integers(-128, 128, (c, c, 3, 3)).astype(np.int8)), init(f"ws{i}", ws)]
        inits += [init(f"wz{i}", np.zeros(c, np.int8)), init(f"b{i}", rng.integers(-2000, 2000, c).astype(np.int32))]
        inits += [init(f"bs{i}", (0.02 if i == 0 else 0.05) * ws)]
        nodes += [
            node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=0),
            node("DequantizeLinear", [f"b{i}", f"bs{i}"], [f"bd{i}"], axis=0),
            node("Conv", [f"h{i}", f"wd{i}", f"bd{i}"], [f"conv{i}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            # no Relu node: the quantizer folds it into the zero point 0 (the clamp at 0)
            node("QuantizeLinear", [f"conv{i}", scale, zero], [f"q{i}"]),
            node("DequantizeLinear", [f"q{i}", scale, zero], [f"h{i + 1}"]),
        ]
    nodes += [
        node("MaxPool", ["h2"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        node("QuantizeLinear", ["pool", "zs", "zz"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_chain",
        [helper.make_tensor_value_info("x", F32, [1, c, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))

    target, _ = resolve(load_target("host"), threads=2)
    if not has_vnni(target):
        pytest.skip("the host has no AVX-512 VNNI: the integer convs are float convs here")
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    convs = sorted(gv.name_hint for gv in mod.get_global_vars() if "u8s8_conv" in gv.name_hint)
    assert convs == ["u8s8_conv_14x14x16_3x3_s1x1_d1x1_n16_qu", "u8s8_conv_14x14x16_3x3_s1x1_d1x1_n16_qu_p1x1x1x1"]
    pools = [line for line in mod["main"].script(show_meta=False).splitlines() if "max_pool2d" in line]
    assert len(pools) == 1 and 'dtype="uint8"' in pools[0]
    edgert.compile(str(path), output=tmp_path / "chain.edgert")
    runner = edgert.load(tmp_path / "chain.edgert")
    for seed in range(3):
        feeds = {"x": np.random.default_rng(seed).standard_normal((1, c, 12, 12)).astype(np.float32)}
        got = runner(feeds)["out"]
        assert len(np.unique(got)) > 10  # not a saturated or all-zero output
        np.testing.assert_array_equal(got, _reference(path, feeds)["out"])


@pytest.mark.parametrize(
    "entry", ["audio_cnn", "convnet.qop", "convnet.qdq", "convnet", "mobilenet", "mobilenet.qdq", "conformer"]
)
def test_zoo_models_match_onnxruntime(tmp_path, entry):
    """Small configs of the zoo: the float models (channels-last convs, pools, depthwise convs, a
    conformer block) and the int8 conv-nets (operator form, QDQ)."""
    import edgert

    zoo = load_tool("make_graph_zoo")
    name = entry.split(".")[0]
    index = zoo.write(tmp_path, only=[name], small=True, int8="." in entry)
    path = tmp_path / index[entry]["file"]
    feeds = zoo.sample_inputs({k: (v["shape"], v["dtype"]) for k, v in index[entry]["inputs"].items()}, 3)
    edgert.compile(str(path), output=tmp_path / "z.edgert")
    got = edgert.load(tmp_path / "z.edgert")(feeds)["output"]
    want = _reference(path, feeds)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_parallel_integer_kernels_match_numpy_exactly():
    """The VNNI GEMM and conv at sizes that run over threads (tiles in chunks, each chunk's
    accumulators allocated once): exact int32 results against numpy's int64 arithmetic."""
    import tvm

    from edgert.compiler.schedules import int8_graph as ig
    from edgert.compiler.target import resolve
    from edgert.targets import load_target

    target, _ = resolve(load_target("host"), threads=2)
    if not ig.has_vnni(target):
        pytest.skip("the host has no AVX-512 VNNI: the integer graph kernels are not built for it")
    rng = np.random.default_rng(9)
    zp = np.array([7], np.int32)

    def run(func: Any, *arrays: np.ndarray) -> np.ndarray:
        assert "T.parallel(" in func.script()
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        args = [tvm.runtime.tensor(a) for a in arrays]
        lib(*args)
        return args[-1].numpy()

    # encoder_512's attention projections (40x512x512, ~20 us on one core) go parallel too.
    for m, k, n in ((48, 512, 768), (40, 512, 512)):
        assert m * k * n >= ig.MIN_PARALLEL_INT8_MACS
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
        colsum = w.astype(np.int64).sum(0).astype(np.int32)
        got = run(ig.u8s8_gemm(m, k, n, 32), x, ig.pack_weight(w, 32), colsum, zp, np.zeros((m, n), np.int32))
        np.testing.assert_array_equal(got, (x.astype(np.int64) - 7) @ w.astype(np.int64))

    # convnet's second conv: 32x32 positions, 3x3 taps over 32 channels (input padded to 34x34), 64 out.
    c, co = 32, 64
    xp = rng.integers(0, 256, (1, 34, 34, c), dtype=np.uint8)
    wc = rng.integers(-128, 128, (9 * c, co), dtype=np.int8)
    colsum = wc.astype(np.int64).sum(0).astype(np.int32)
    func = ig.u8s8_conv((34, 34), (32, 32), (3, 3), (1, 1), (1, 1), c, co, 32)
    got = run(func, xp, ig.pack_weight(wc, 32), colsum, zp, np.zeros((1, 32, 32, co), np.int32))
    want = np.zeros((32, 32, co), np.int64)
    for ty in range(3):
        for tx in range(3):
            tap = wc[(ty * 3 + tx) * c : (ty * 3 + tx + 1) * c].astype(np.int64)
            want += (xp[0, ty : ty + 32, tx : tx + 32].astype(np.int64) - 7) @ tap
    np.testing.assert_array_equal(got[0], want)

    # The same conv with the requantization in its write-back (fuse_requantize), into a padded
    # output: numpy's float32 ops in the graph's order. Scales of 2^-9..2^-12 put many sums on a
    # half (round half to even); the border takes the fill value.
    bias = rng.integers(-300, 300, co).astype(np.float32)
    mult = (2.0 ** -rng.integers(9, 13, co)).astype(np.float32)
    scaled = np.round((want.astype(np.int32).astype(np.float32) + bias) * mult)
    for zpo, low, high, dtype, border in (
        (128.0, 0.0, 255.0, "uint8", (1, 2, 0, 1, 9)),
        (-3.0, -128.0, 127.0, "int8", None),
    ):
        func = ig.u8s8_conv(
            (34, 34),
            (32, 32),
            (3, 3),
            (1, 1),
            (1, 1),
            c,
            co,
            32,
            requant=(zpo, low, high, dtype),
            border=border or (0, 0, 0, 0, 0),
        )
        top, bottom, left, right, fill = border or (0, 0, 0, 0, 0)
        out = np.zeros((1, 32 + top + bottom, 32 + left + right, co), dtype)
        got = run(func, xp, ig.pack_weight(wc, 32), colsum, zp, bias, mult, out)[0]
        q = np.maximum(np.minimum(scaled + np.float32(zpo), np.float32(high)), np.float32(low)).astype(dtype)
        np.testing.assert_array_equal(got[top : top + 32, left : left + 32], q)
        inner = np.zeros(got.shape[:2], bool)
        inner[top : top + 32, left : left + 32] = True
        assert np.all(got[~inner] == fill)
    ties = (want.astype(np.float32) + bias) * mult
    assert np.count_nonzero(ties == np.floor(ties) + 0.5) > 20  # half-way cases were among them (68)


def test_winograd_convs_match_onnxruntime(tmp_path):
    """3x3 stride-1 convs (plain and dilated) take Winograd F(4x4, 3x3): the input transform, 36
    matmuls and the output transform; outputs within 1e-4 of onnxruntime's direct convs."""
    import edgert
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    cases = [
        ("Conv", {"pads": [1, 1, 1, 1]}, (32, 16, 3, 3), "Relu"),
        ("Conv", {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (16, 16, 3, 3), "Tanh"),
    ]
    path = tmp_path / "wino.onnx"
    onnx.save(_conv_graph(2, cases, 16, [32, 32]), str(path))
    target, _ = resolve(load_target("host"), threads=2)
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sorted(n for n in names if n.startswith("wino_in")) == ["wino_in_34x34x16_d1", "wino_in_36x36x16_d2"]
    assert len([n for n in names if n.startswith("wino_out")]) == 2
    edgert.compile(str(path), output=tmp_path / "w.edgert")
    x = np.random.default_rng(6).standard_normal((1, 16, 32, 32)).astype(np.float32)
    got = edgert.load(tmp_path / "w.edgert")(x=x)
    for key, want in _reference(path, {"x": x}).items():
        np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), err_msg=key)


def _dwpw_graph(c: int, size: list[int]) -> onnx.ModelProto:
    """Three MobileNet-style blocks on one input: depthwise 3x3 (stride 1, then 2) -> bias ->
    activation -> 1x1 conv (64 outputs; then 24: no whole column tile), and a third whose
    depthwise output is also a graph output (two uses: it stays two kernels)."""
    rng = np.random.default_rng(11)
    nodes, inits, outputs = [], [], []

    def const(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    lo, hi = const("lo", ()), const("hi", ())
    blocks = [(1, 64, "Clip", "Relu"), (2, 24, "Relu", None), (1, 24, "Relu", None)]
    for i, (stride, cout, act, last) in enumerate(blocks):
        dw = [f"d{i}", const(f"wd{i}", (c, 1, 3, 3)), const(f"bd{i}", (c,))]
        pads = {"pads": [1, 1, 1, 1], "strides": [stride, stride], "group": c, "kernel_shape": [3, 3]}
        nodes.append(helper.make_node("Conv", ["x", *dw[1:]], [dw[0]], **pads))
        nodes.append(helper.make_node(act, [dw[0], lo, hi] if act == "Clip" else [dw[0]], [f"a{i}"]))
        pw = [const(f"wp{i}", (cout, c, 1, 1)), const(f"bp{i}", (cout,))]
        nodes.append(helper.make_node("Conv", [f"a{i}", *pw], [f"p{i}" if last else f"y{i}"], kernel_shape=[1, 1]))
        if last:
            nodes.append(helper.make_node(last, [f"p{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", F32, None))
    outputs.append(helper.make_tensor_value_info("a2", F32, None))
    inits[0] = numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    inits[1] = numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    x = helper.make_tensor_value_info("x", F32, [1, c, *size])
    model = helper.make_model(
        helper.make_graph(nodes, "dwpw", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_depthwise_pointwise_fused_matches_onnxruntime(tmp_path):
    """A depthwise conv, its bias and activation and the 1x1 conv after it are one kernel
    (`schedules.dwpw`), where the depthwise result has no other use; the first block (1.1M
    multiply-adds) goes over threads in an even number of chunks, the strided one (157K, under
    `MIN_PARALLEL_MACS`) stays serial; outputs within 1e-4 of onnxruntime's at 1 and 2 threads, odd
    feature-map sizes included."""
    import re

    from tvm import relax

    import edgert
    from edgert.compiler.schedules.dwpw import DepthwisePointwise
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    c, size = 32, [24, 19]
    path = tmp_path / "dwpw.onnx"
    onnx.save(_dwpw_graph(c, size), str(path))
    target, _ = resolve(load_target("host"), threads=2)
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert len([n for n in names if n.startswith("conv_dwpw")]) == 2  # the third block keeps its two kernels
    with target:
        fused = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.LegalizeOps()(mod)))
    chunks = []
    for gv, func in fused.functions_items():
        if "conv_dwpw" in gv.name_hint:
            script = DepthwisePointwise().apply(func, target, False).mod["main"].script()
            chunks += [int(n) for n in re.findall(r"T\.parallel\(T\.int64\((\d+)\)\)", script)] or [1]
    assert sorted(chunks)[0] == 1 and sorted(chunks)[1] % 2 == 0  # the strided block serial, the other even
    result = edgert.compile(str(path), output=tmp_path / "d.edgert")
    assert not [k for k in result.manifest.get("kernels", {}).get("fallback", []) if "conv" in k]
    x = np.random.default_rng(4).standard_normal((1, c, *size)).astype(np.float32)
    want = _reference(path, {"x": x})
    for threads in (1, 2):
        got = edgert.load(tmp_path / "d.edgert", threads=threads)(x=x)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-4, err_msg=f"{key} t{threads}")


# -- AMX-INT8 tiles (int8_graph.u8s8_amx_gemm) ------------------------------------------------------
# (rows, K, columns): the fewest rows the tiles take; a partial row and column tile; two full blocks
# of 48 rows and a 4-row tail over an odd number of K steps; one full block; a GEMM over threads.
AMX_GEMMS = [(2, 64, 16), (37, 128, 40), (100, 192, 200), (48, 64, 24), (40, 512, 1024)]


@pytest.fixture(scope="module")
def amx_gemms():
    """AMX and VNNI builds of AMX_GEMMS for a CPU with AMX-INT8 (sapphirerapids), and whether this host runs them."""
    import tvm

    from edgert.compiler.schedules import int8_graph as ig
    from edgert.targets import AMX_FLAGS, enable_amx, host_arch, host_cpu_flags

    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "num-cores": 2}
    )
    funcs = {}
    for m, k, n in AMX_GEMMS:
        funcs[f"amx_{m}_{k}_{n}"] = ig.u8s8_amx_gemm(m, k, n).with_attr("global_symbol", f"amx_{m}_{k}_{n}")
        funcs[f"vnni_{m}_{k}_{n}"] = ig.u8s8_gemm(m, k, n, 32).with_attr("global_symbol", f"vnni_{m}_{k}_{n}")
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    runs_here = host_arch() == "x86_64" and {"avx512vnni", "avx512bw", *AMX_FLAGS} <= host_cpu_flags()
    if runs_here:
        enable_amx()
    return lib, runs_here


@pytest.mark.parametrize(("m", "k", "n"), AMX_GEMMS)
def test_amx_gemm_matches_numpy_exactly(amx_gemms, m: int, k: int, n: int) -> None:
    """The tiles' int32 results equal numpy's int64 arithmetic (and the VNNI kernel's) on shapes that
    leave partial row and column tiles, with the zero point through the column sums."""
    import tvm

    from edgert.compiler.schedules import int8_graph as ig

    lib, runs_here = amx_gemms
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    assert "tdpbusd" in asm and "ldtilecfg" in asm and "tilerelease" in asm
    assert ("T.parallel(" in ig.u8s8_amx_gemm(m, k, n).script()) == (m * k * n >= ig.MIN_PARALLEL_AMX_MACS)
    if not runs_here:
        pytest.skip("this host has no AMX-INT8 to run the tiles on (compiled and checked only)")
    rng = np.random.default_rng(m * k + n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    x[0], w[:, 0] = 255, -128  # the largest sums
    zp = np.array([rng.integers(0, 256)], np.int32)
    want = (x.astype(np.int64) - zp[0]) @ w.astype(np.int64)
    out = {}
    for kind, block in (("amx", 16), ("vnni", 32)):
        packed = ig.pack_weight(w, block)
        colsum = np.zeros(packed.shape[0] * block, np.int32)
        colsum[:n] = w.astype(np.int64).sum(0)
        args = [tvm.runtime.tensor(a) for a in (x, packed, colsum, zp, np.full((m, n), -7, np.int32))]
        lib[f"{kind}_{m}_{k}_{n}"](*args)
        out[kind] = args[-1].numpy()
    np.testing.assert_array_equal(out["amx"], want)
    np.testing.assert_array_equal(out["vnni"], want)


def test_amx_gemm_refuses_a_partial_k_step() -> None:
    from edgert.compiler.schedules import int8_graph as ig

    with pytest.raises(ValueError, match="K divisible by 64"):
        ig.u8s8_amx_gemm(16, 96, 16)


def test_integer_gemms_on_tiles_match_onnxruntime_exactly(tmp_path):
    """MatMulInteger (37 rows x 128 -> 40: partial row and column tiles) and a QDQ MatMul (1 row x
    192 -> 24, below the tiles' rows; 37 x 192 -> 24 on them): on AMX tiles where the host has
    AMX-INT8 and the VNNI kernel otherwise, onnxruntime's bytes either way."""
    import edgert
    from edgert.compiler.schedules.int8_graph import AMX_GRAPH_ROWS, int8_isa
    from edgert.compiler.target import resolve
    from edgert.families.graph.lower import optimize
    from edgert.frontend.onnx_graph import import_onnx
    from edgert.targets import load_target

    rng = np.random.default_rng(31)
    i8 = lambda *shape: numpy_helper.from_array(rng.integers(-128, 128, shape).astype(np.int8))  # noqa: E731
    inits = [i8(128, 40), i8(192, 24)]
    inits[0].name, inits[1].name = "w", "wm"
    inits += [
        numpy_helper.from_array(np.float32(0.011), "xs"),
        numpy_helper.from_array(np.uint8(140), "xz"),
        numpy_helper.from_array((rng.random(24) * 0.004 + 0.001).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(24, np.int8), "wz"),
        numpy_helper.from_array(np.float32(0.05), "ys"),
        numpy_helper.from_array(np.uint8(120), "yz"),
    ]
    node = helper.make_node
    nodes = [
        node("DynamicQuantizeLinear", ["x"], ["dq", "dqs", "dqz"]),
        node("MatMulInteger", ["dq", "w", "dqz"], ["imm"]),
        node("DequantizeLinear", ["wm", "ws", "wz"], ["wmd"], axis=1),
    ]
    for name in "ab":
        nodes += [
            node("QuantizeLinear", [f"x{name}", "xs", "xz"], [f"xq{name}"]),
            node("DequantizeLinear", [f"xq{name}", "xs", "xz"], [f"xd{name}"]),
            node("MatMul", [f"xd{name}", "wmd"], [f"mm{name}"]),
            node("QuantizeLinear", [f"mm{name}", "ys", "yz"], [f"q{name}"]),
        ]
    graph = helper.make_graph(
        nodes,
        "integer_gemms",
        [
            helper.make_tensor_value_info("x", F32, [1, 37, 128]),
            helper.make_tensor_value_info("xa", F32, [37, 192]),
            helper.make_tensor_value_info("xb", F32, [1, 192]),
        ],
        [helper.make_tensor_value_info("imm", TensorProto.INT32, None)]
        + [helper.make_tensor_value_info(f"q{n}", TensorProto.UINT8, None) for n in "ab"],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "gemms.onnx"
    onnx.save(model, str(path))
    target, _ = resolve(load_target("host"), threads=2)
    isa = int8_isa(target)
    if isa not in ("amx", "avx512vnni"):
        pytest.skip(f"the host's integer kernels are {isa}, not AVX-512 VNNI or AMX")
    mod, _, _ = optimize(import_onnx(path)[0], target, "f32")
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert 1 < AMX_GRAPH_ROWS <= 37
    assert len([n for n in names if "u8s8_amx_gemm" in n]) == (2 if isa == "amx" else 0)
    assert len([n for n in names if "u8s8_gemm" in n]) == (1 if isa == "amx" else 3)
    edgert.compile(str(path), output=tmp_path / "g.edgert")
    feeds = {
        "x": rng.standard_normal((1, 37, 128)).astype(np.float32),
        "xa": rng.standard_normal((37, 192)).astype(np.float32),
        "xb": rng.standard_normal((1, 192)).astype(np.float32),
    }
    got = edgert.load(tmp_path / "g.edgert")(feeds)
    for key, want in _reference(path, feeds).items():
        assert got[key].dtype == want.dtype, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.mark.parametrize("entry", ["encoder_512.qdq", "audio_cnn.qdq"])
def test_int8_zoo_models_within_one_step_of_the_files_arithmetic(tmp_path, entry):
    """QDQ models with float operators between their quantizations (GELU, softmax, residual adds):
    edgert runs the file's own operators, so it gives onnxruntime's result with the graph
    optimizations off to one step of the output's scale (a float rounded next to a rounding
    boundary may go either way). onnxruntime's default fusions (QLinearAdd, QLinearMul,
    QLinearSoftmax) compute those operators by another formula; measured on the full-size zoo:
    3 steps (audio_cnn.qdq) and 4 (encoder_512.qdq) from the fused result, 1 from the unfused."""
    import edgert

    zoo = load_tool("make_graph_zoo")
    index = zoo.write(tmp_path, only=[entry.split(".")[0]], small=True, int8=True)
    path = tmp_path / index[entry]["file"]
    model = onnx.load(str(path))
    last = next(node for node in model.graph.node if model.graph.output[0].name in node.output)
    assert last.op_type == "DequantizeLinear", last.op_type
    scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == last.input[1])))
    feeds = zoo.sample_inputs({k: (v["shape"], v["dtype"]) for k, v in index[entry]["inputs"].items()}, 3)
    edgert.compile(str(path), output=tmp_path / "z.edgert")
    got = np.asarray(edgert.load(tmp_path / "z.edgert")(feeds)["output"], np.float64)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    steps = np.abs(got - want) / scale
    assert steps.max() <= 1.0 + 1e-3, f"{entry}: {steps.max():.2f} steps of {scale:.4g} from onnxruntime unfused"
    assert (steps > 1e-3).mean() < 0.01, f"{entry}: {(steps > 1e-3).sum()} of {steps.size} outputs differ"
