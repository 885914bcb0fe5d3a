"""edgert's own schedule rules and layout rewrite for plain graphs, checked kernel by kernel:
the `Pool` rule (window and axis reductions vectorized over channels), the `Matmul` rule's tiles
on widths that are no multiple of a vector, and the channels-last rewrite around convolutions."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402


def _host() -> object:
    from edgert.compiler.target import resolve
    from edgert.targets import load_target

    return resolve(load_target("host"), threads=1)[0]


def _kernel(build: object, *shapes: tuple[int, ...]) -> object:
    """The one PrimFunc Relax legalizes ``build(*vars)`` to."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(*params))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _run(sch: object, target: object, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(sch.mod, target=target)
    args = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32))]
    lib(*args)
    return args[-1].numpy()


def _loops(sch: object) -> str:
    return sch.mod["main"].script()


@pytest.mark.parametrize("kind, shape", [("max", (1, 9, 11, 32)), ("avg", (1, 8, 8, 48)), ("mean", (2, 6, 6, 40))])
def test_pool_rule_vectorizes_channels_and_matches_numpy(kind, shape):
    from edgert.compiler.schedules.rules import Pool

    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    if kind == "max":
        func = _kernel(lambda v: relax.op.nn.max_pool2d(v, (3, 3), (2, 2), (1, 1, 1, 1), layout="NHWC"), shape)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
        oh, ow = (shape[1] - 1) // 2 + 1, (shape[2] - 1) // 2 + 1
        want = np.stack(
            [
                np.stack([padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2)) for j in range(ow)], 1)
                for i in range(oh)
            ],
            1,
        )
    elif kind == "avg":
        func = _kernel(lambda v: relax.op.nn.avg_pool2d(v, (2, 2), (2, 2), layout="NHWC"), shape)
        want = x.reshape(1, 4, 2, 4, 2, 48).mean(axis=(2, 4))
    else:
        func = _kernel(lambda v: relax.op.sum(v, axis=[1, 2], keepdims=True), shape)
        want = x.sum(axis=(1, 2), keepdims=True)
    target = _host()
    sch = Pool().apply(func, target, False)
    if kind == "avg" and sch is None:
        pytest.fail("the Pool rule did not take an NHWC average pool")
    assert sch is not None
    assert "T.vectorized(" in _loops(sch)
    got = _run(sch, target, [x], want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pool_rule_leaves_last_axis_reductions():
    """A reduction along the last axis (a row sum) is not a pool: vectorizing the output's last
    axis would read across rows."""
    from edgert.compiler.schedules.rules import Pool

    func = _kernel(lambda v: relax.op.sum(v, axis=[2]), (2, 8, 64))
    assert Pool().apply(func, _host(), False) is None


@pytest.mark.parametrize("m, k, n", [(100, 100, 36), (100, 36, 100), (30, 20, 37), (64, 16, 48)])
def test_matmul_rule_tiles_any_width_without_predicated_vectors(m, k, n):
    from edgert.compiler.schedules.rules import Matmul, _lanes

    rng = np.random.default_rng(m + n)
    a = rng.standard_normal((2, m, k)).astype(np.float32)
    b = rng.standard_normal((2, k, n)).astype(np.float32)
    target = _host()
    sch = Matmul().apply(_kernel(relax.op.matmul, a.shape, b.shape), target, False)
    assert sch is not None
    script = _loops(sch)
    lanes = _lanes(target)
    # Widths with a divisor of at least 3 within a vector get whole tiles: no T.where on the vector loop.
    if any(n % d == 0 for d in range(3, lanes + 1)) or n % lanes == 0:
        assert "T.where" not in script
    np.testing.assert_allclose(_run(sch, target, [a, b], (2, m, n)), a @ b, rtol=1e-4, atol=1e-4)


def test_channels_last_leaves_transposes_only_at_the_edges():
    """conv -> ReLU6 (ONNX Clip, imported as call_tir) -> depthwise conv -> max pool -> conv: one
    transpose in, one out, and every conv channels-last."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgert.compiler.schedules.layout import channels_last
    from edgert.frontend.onnx_graph import import_onnx

    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(w(8, 3, 3, 3), "w0"),
        numpy_helper.from_array(w(8, 1, 3, 3), "w1"),
        numpy_helper.from_array(w(4, 8, 1, 1), "w2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["b"]),
        helper.make_node("Conv", ["b", "w1"], ["c"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("MaxPool", ["c"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["d", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, str(Path(tmp) / "g.onnx"))
        mod, _, _ = import_onnx(Path(tmp) / "g.onnx", {})
    mod = relax.transform.FoldConstant()(mod)
    text = channels_last(mod)["main"].script()
    assert text.count("R.permute_dims(") == 2
    assert text.count('data_layout="NHWC"') == 3 and 'data_layout="NCHW"' not in text


def test_elementwise_rule_vectorizes_odd_rows_of_a_transpose():
    """Attention's head split, [100, 4, 36] -> [4, 100, 36]: vectors within rows of 36 (reads
    contiguous), not across the flattened output."""
    from edgert.compiler.schedules.rules import Elementwise

    x = np.random.default_rng(3).standard_normal((100, 4, 36)).astype(np.float32)
    func = _kernel(lambda v: relax.op.permute_dims(v, [1, 0, 2]), x.shape)
    target = _host()
    sch = Elementwise(rows=True).apply(func, target, False)
    script = _loops(sch)
    assert "T.vectorized(T.int64(12))" in script or "T.vectorized(T.int64(36))" in script
    want = x.transpose(1, 0, 2)
    np.testing.assert_array_equal(_run(sch, target, [x], want.shape), want)


def _chain(steps: int, shape: tuple[int, ...]) -> object:
    """One fused kernel of ``steps`` multiply-adds then a rounding, over ``shape``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for i in range(steps):
                y = relax.op.add(relax.op.multiply(y, relax.const(1.0 + i / 64)), relax.const(0.25))
            out = bb.emit_output(relax.op.round(y))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps()]
    mod = tvm.transform.Sequential([*passes, relax.transform.FuseTIR()])(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


@pytest.mark.parametrize("steps, shape, wide", [(20, (40, 256), True), (3, (40, 256), False), (20, (40, 144), False)])
def test_elementwise_rule_widens_long_chains_whose_rows_it_divides(steps, shape, wide):
    """A map of many dependent operations runs MAP_VECTORS vectors per iteration (interleaved
    chains); a short map, or rows the wide vector does not divide (a split's), one vector."""
    from edgert.compiler.schedules.rules import MAP_VECTORS, Elementwise, _lanes

    target = _host()
    lanes = _lanes(target)
    sch = Elementwise().apply(_chain(steps, shape), target, False)
    width = lanes * MAP_VECTORS if wide else lanes
    assert f"T.vectorized({width})" in _loops(sch) or f"T.vectorized(T.int64({width}))" in _loops(sch)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    want = x
    for i in range(steps):
        want = want * np.float32(1.0 + i / 64) + np.float32(0.25)
    np.testing.assert_array_equal(_run(sch, target, [x], shape), np.rint(want))


def test_requantization_epilogue_rounds_in_vectors():
    """A matmul whose epilogue requantizes (scale, round half to even, saturate: what follows every
    int8 conv): the rounding vectorized with the tile, no gather or scatter, values as numpy's."""
    from edgert.compiler.schedules import schedule_rules
    from edgert.compiler.schedules.rules import Matmul

    schedule_rules()  # what every graph build calls first
    rng = np.random.default_rng(4)
    x = rng.integers(-20, 20, (576, 27)).astype(np.float32)  # integers: the sums are exact
    w = rng.integers(-20, 20, (27, 16)).astype(np.float32)
    scale = relax.const(np.float32(0.37))

    def requantize(a: object, b: object) -> object:
        r = relax.op.round(relax.op.multiply(relax.op.matmul(a, b), scale))
        return relax.op.clip(r, 0, 255)

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(a.shape, "float32")) for i, a in enumerate((x, w))]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(requantize(*params))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps()]
    mod = tvm.transform.Sequential([*passes, relax.transform.FuseTIR()])(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]  # one fused kernel
    func = func.with_attr("global_symbol", "main")
    target = _host()
    sch = Matmul().apply(func, target, False)
    lib = tvm.tirx.build(sch.mod, target=target)
    asm = lib.inspect_source("asm")
    assert "scatter" not in asm and "gather" not in asm
    want = np.clip(np.rint((x @ w) * np.float32(0.37)), 0, 255)
    np.testing.assert_array_equal(_run(sch, target, [x, w], want.shape), want)


@pytest.mark.parametrize(
    "kind, shape", [("max", (40, 2048)), ("min", (40, 2048)), ("sum", (40, 2048)), ("max", (3, 64))]
)
def test_full_reduction_rule_vectorizes_and_splits_over_threads(kind, shape):
    """A whole tensor reduced to one value (DynamicQuantizeLinear's range) in vector partials,
    in chunks over threads where it is large; min and max exact, a sum reassociated."""
    from edgert.compiler.schedules.rules import MIN_PARALLEL_WORK, FullReduction

    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    func = _kernel(lambda v: getattr(relax.op, kind)(v), shape)
    target = _host()
    sch = FullReduction().apply(func, target, False)
    assert sch is not None
    script = _loops(sch)
    assert "T.vectorized(" in script
    assert ("T.parallel(" in script) == (x.size >= MIN_PARALLEL_WORK)
    got = _run(sch, target, [x], ())
    want = getattr(np, kind)(x)
    if kind == "sum":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    else:
        assert got == want


def test_full_reduction_rule_leaves_row_reductions():
    from edgert.compiler.schedules.rules import FullReduction

    func = _kernel(lambda v: relax.op.max(v, axis=[1]), (40, 2048))
    assert FullReduction().apply(func, _host(), False) is None


def test_matmul_rule_runs_parallel_tiles_in_chunks():
    """Above `MIN_PARALLEL_MACS` the tiles go over threads in at most `MAX_CHUNKS` parallel
    iterations (the accumulators allocated once per chunk, not per tile); results unchanged."""
    import re

    from edgert.compiler.schedules.rules import MAX_CHUNKS, MIN_PARALLEL_MACS, Matmul

    m, k, n = 1024, 288, 64
    assert m * k * n >= MIN_PARALLEL_MACS
    rng = np.random.default_rng(3)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    target = _host()
    sch = Matmul().apply(_kernel(relax.op.matmul, a.shape, b.shape), target, False)
    assert sch is not None
    extents = [int(e) for e in re.findall(r"T\.parallel\(T\.int64\((\d+)\)\)", _loops(sch))]
    assert len(extents) == 1 and 1 < extents[0] <= MAX_CHUNKS
    np.testing.assert_allclose(_run(sch, target, [a, b], (m, n)), a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m, k, n", [(576, 32, 64), (144, 64, 64), (64, 16, 16)])
def test_matmul_rule_splits_small_kernels_in_few_chunks(m, k, n):
    """A kernel of a few microseconds (mobilenet's 1x1 convs as matmuls: 576x32 @ 32x64 is 1.2M
    multiply-adds) goes over threads from `MIN_PARALLEL_MACS`, in chunks of `CHUNK_MACS` or more
    (many small chunks made it slower at two threads than at one); below, one serial loop."""
    import re

    from edgert.compiler.schedules.rules import CHUNK_MACS, MIN_PARALLEL_MACS, Matmul

    rng = np.random.default_rng(5)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    target = _host()
    sch = Matmul().apply(_kernel(relax.op.matmul, a.shape, b.shape), target, False)
    assert sch is not None
    extents = [int(e) for e in re.findall(r"T\.parallel\(T\.int64\((\d+)\)\)", _loops(sch))]
    if m * k * n >= MIN_PARALLEL_MACS:
        assert len(extents) == 1 and 2 <= extents[0] <= max(2, m * k * n // CHUNK_MACS)
    else:
        assert extents == []
    np.testing.assert_allclose(_run(sch, target, [a, b], (m, n)), a @ b, rtol=1e-4, atol=1e-4)
