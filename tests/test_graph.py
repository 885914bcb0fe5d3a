"""Plain ONNX graphs: compile, load as a callable, run from the shell; checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_cli

ort = pytest.importorskip("onnxruntime")
tiny = load_tool("make_tiny_onnx")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The project's tiny ONNX graphs (awkward sizes, seeded weights)."""
    return tiny.write(tmp_path_factory.mktemp("onnx"))


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _compile(path: Path, out: Path, **options) -> Path:
    import edgert

    result = edgert.compile(str(path), output=out, **options)
    assert result.manifest["family"] == "graph"
    return out


def test_dense_graph_symbolic_dims_match_onnxruntime(graphs, tmp_path):
    import edgert

    art = _compile(graphs["dense"], tmp_path / "dense.edgert")
    model = edgert.load(art)
    assert model.input_names == ["x"] and model.output_names == ["y"]
    assert model.inputs[0]["shape"] == ["batch", "rows", 37]
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 37), (2, 5, 37), (3, 17, 37)]:  # one row; rows not a multiple of the tile
        x = rng.standard_normal(shape).astype(np.float32)
        got = model(x=x)["y"]
        want = _reference(graphs["dense"], {"x": x})["y"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fixed_input_shape_is_recorded_and_enforced(graphs, tmp_path):
    import edgert
    from edgert.errors import EdgertError

    art = _compile(graphs["dense"], tmp_path / "fixed.edgert", input_shapes={"x": [1, 4, 37]})
    model = edgert.load(art)
    assert model.inputs[0]["shape"] == [1, 4, 37]
    assert model.outputs[0]["shape"] == [1, 4, 53]
    with pytest.raises(EdgertError, match=r"input 'x' has shape \[1, 5, 37\]"):
        model(x=np.zeros((1, 5, 37), np.float32))
    with pytest.raises(EdgertError, match="missing input"):
        model()
    with pytest.raises(EdgertError, match="unknown input"):
        model(x=np.zeros((1, 4, 37), np.float32), bogus=np.zeros(1))


@pytest.mark.parametrize("name", ["attention", "layernorm", "conv1d"])
def test_kernel_graphs_match_onnxruntime(graphs, tmp_path, name):
    import edgert

    rng = np.random.default_rng(1)
    sess = ort.InferenceSession(str(graphs[name]), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]  # one row for symbolic dims
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    model = edgert.load(_compile(graphs[name], tmp_path / f"{name}.edgert"))
    got = model(feeds)
    for key, want in _reference(graphs[name], feeds).items():
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5)


def test_unsupported_operators_are_named_with_their_nodes(graphs, tmp_path):
    proc = run_cli("compile", str(graphs["unsupported"]), "-o", str(tmp_path / "u.edgert"))
    assert proc.returncode == 2
    msg = " ".join(proc.stderr.split())
    assert "Celu (nodes: celu_a, celu_b)" in msg
    assert "com.example.MyCustomOp (nodes: custom1)" in msg
    assert "Relu" not in msg
    assert not (tmp_path / "u.edgert").exists()


def test_cli_compile_and_run_with_npz(graphs, tmp_path):
    art, inputs, outputs = tmp_path / "d.edgert", tmp_path / "in.npz", tmp_path / "out.bin"
    proc = run_cli("compile", str(graphs["dense"]), "--target", "host", "-o", str(art), "--input-shape", "x=2,3,37")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(2).standard_normal((2, 3, 37)).astype(np.float32)
    np.savez(inputs, x=x)
    proc = run_cli("run", str(art), "--inputs", str(inputs), "-o", str(outputs))
    assert proc.returncode == 0, proc.stderr
    with np.load(outputs) as got:
        np.testing.assert_allclose(got["y"], _reference(graphs["dense"], {"x": x})["y"], rtol=1e-5, atol=1e-5)
    proc = run_cli("inspect", str(art))
    assert proc.returncode == 0 and "x float32[2, 3, 37]" in proc.stdout
    np.savez(inputs, x=np.zeros((2, 3, 36), np.float32))
    proc = run_cli("run", str(art), "--inputs", str(inputs), "-o", str(outputs))
    assert proc.returncode == 2 and "input 'x' has shape [2, 3, 36]" in proc.stderr
    proc = run_cli("run", str(art), "--prompt", "hi")
    assert proc.returncode == 2 and "is a graph: run it with --inputs" in " ".join(proc.stderr.split())
    proc = run_cli("compile", str(graphs["dense"]), "-o", str(art), "--input-shape", "nope=1,2")
    assert proc.returncode == 2 and "'nope', which is not an input" in proc.stderr


def test_cli_profile_of_a_graph_gives_its_kernel_table(graphs, tmp_path):
    import json

    art = _compile(graphs["dense"], tmp_path / "dense.edgert")
    report = tmp_path / "dense.x2.html"  # a name with two dots keeps both in its JSON and CSV
    proc = run_cli("profile", str(art), "--input-shape", "x=2,5,37", "--runs", "4", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dense.x2.csv").exists()
    result = json.loads((tmp_path / "dense.x2.json").read_text())
    assert result["kind"] == "graph" and result["inputs"] == {"x": {"shape": [2, 5, 37], "dtype": "float32"}}
    assert len(result["call_run_ms"]) == 4 and result["call_ms"]["min"] > 0
    kernels = [op for op in result["operators"] if not op["operator"].startswith("vm.builtin")]
    assert kernels, result["operators"]  # the graph's compiled kernels, each timed
    assert abs(sum(op["share"] for op in result["operators"]) - 1) < 0.01
    assert kernels[0]["operator"][:56] in proc.stderr and "ms/run" in proc.stderr  # the table, names cut to 56
    assert "Kernels (per call)" in report.read_text()
    proc = run_cli("profile", str(art), "--input-shape", "y=2,5,37", "--report", str(report))
    assert proc.returncode == 2 and "--input-shape names y, which the graph does not take" in proc.stderr


def silero_model(name: str = "silero_vad_openvino_16k.onnx") -> Path:
    """An ONNX model file shipped by the `silero-vad` package."""
    from edgert.paths import package_file

    return package_file("silero_vad", "data", name)


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise with voiced bursts (harmonics of a wandering pitch), so the probability moves."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / 16000) / k for k in range(1, 8))
    gate = (np.sin(2 * np.pi * 0.5 * t) > 0).astype(np.float32)
    return (0.3 * gate * voiced + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def test_silero_vad_streams_state_like_onnxruntime(tmp_path):
    import edgert
    from edgert.runtime.vad import CHUNK, CONTEXT, VoiceActivity

    onnx_path = silero_model()
    model = edgert.load(_compile(onnx_path, tmp_path / "vad.edgert"))
    assert model.input_names == ["input", "state"] and model.output_names == ["output", "stateN"]
    vad = VoiceActivity(model)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    audio = _speechlike(4.0, seed=0)
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)
    want = []
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[i : i + CHUNK]])[None, :]
        prob, state = sess.run(None, {"input": x, "state": state})
        want.append(float(prob[0, 0]))
        context = x[0, -CONTEXT:]
    got = vad.probabilities(audio[: len(want) * CHUNK])
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(vad.state, state, atol=1e-4)
    assert max(want) - min(want) > 0.1  # the state actually carried something
    vad.reset()
    assert vad(audio[:CHUNK]) == pytest.approx(want[0], abs=1e-4)


def test_outputs_never_alias_inputs_or_weights(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import edgert

    w = np.arange(300, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["W"], ["w"])],
        "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [300]),
        ],
        [numpy_helper.from_array(w, "W")],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, str(tmp_path / "p.onnx"))
    model = edgert.load(_compile(tmp_path / "p.onnx", tmp_path / "p.edgert"))
    first = model(x=np.ones(3, np.float32))
    second = model(x=np.zeros(3, np.float32))
    assert first["y"].tolist() == [1, 1, 1] and second["y"].tolist() == [0, 0, 0]
    first["w"][0] = 99.0
    assert model(x=np.zeros(3, np.float32))["w"][0] == 0.0


@pytest.mark.parametrize(
    ("quant", "tol", "dtype"), [("f16", 2e-3, np.float16), ("q8", 2e-2, np.int8), ("q4", 0.2, np.uint8)]
)
def test_weight_quantization_error_is_bounded(graphs, tmp_path, quant, tol, dtype):
    import edgert

    art = _compile(graphs["dense"], tmp_path / f"{quant}.edgert", quant=quant)
    model = edgert.load(art)
    weights = model.artifact.manifest["weights"]
    assert weights["quant"] == quant and 0 < weights["weight_rel_rms_error"] < tol
    assert any(w.dtype == dtype for w in model.artifact.weights().values())
    x = np.random.default_rng(3).standard_normal((2, 9, 37)).astype(np.float32)
    got, want = model(x=x)["y"], _reference(graphs["dense"], {"x": x})["y"]
    rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
    assert rel < tol


def test_graph_runs_with_the_runtime_library_only(graphs, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    art = _compile(graphs["dense"], tmp_path / "rt.edgert")
    x = np.random.default_rng(4).standard_normal((1, 2, 37)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import json, sys, numpy as np, edgert, tvm.base\n"
        f"m = edgert.load({str(art)!r})\n"
        f"y = m(x=np.load({str(tmp_path / 'x.npy')!r}))['y']\n"
        "bad = [n for n in sys.modules if n.startswith(('edgert.compiler', 'edgert.frontend', 'tvm.relax'))]\n"
        "print(json.dumps({'y': y.tolist(), 'bad': bad, 'runtime_only': tvm.base._RUNTIME_ONLY}))\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime_only"] is True and result["bad"] == []
    np.testing.assert_allclose(np.array(result["y"]), _reference(graphs["dense"], {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_gather_with_out_of_range_ids_stays_inside_the_table(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import edgert

    table = np.arange(50 * 8, dtype=np.float32).reshape(50, 8)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, 8])],
        [numpy_helper.from_array(table, "table")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "g.onnx"))
    model = edgert.load(_compile(tmp_path / "g.onnx", tmp_path / "g.edgert"))
    np.testing.assert_array_equal(model(ids=np.array([3, -1, 7]))["rows"], table[[3, 49, 7]])
    # A bad id (ONNX leaves it undefined, onnxruntime refuses it) reads the nearest row, never past the table.
    np.testing.assert_array_equal(model(ids=np.array([10**9, 0, 2]))["rows"], table[[49, 0, 2]])
