"""TFLite graphs: a model built by tools/make_tiny_tflite.py, compiled and checked against LiteRT."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool, run_cli

litert = pytest.importorskip("ai_edge_litert.interpreter")


def test_tflite_graph_matches_litert(tmp_path):
    import edgert

    path = tmp_path / "tiny.tflite"
    path.write_bytes(load_tool("make_tiny_tflite").build())
    art = tmp_path / "tiny.edgert"
    proc = run_cli("compile", str(path), "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    model = edgert.load(art)
    assert model.input_names == ["x"] and model.output_names == ["probs"]
    assert model.artifact.manifest["source"]["format"] == "tflite"
    interp = litert.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((3, 37)).astype(np.float32)
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        want = interp.get_tensor(interp.get_output_details()[0]["index"])
        np.testing.assert_allclose(model(x=x)["probs"], want, rtol=1e-5, atol=1e-6)


def test_not_a_tflite_file_is_refused(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    proc = run_cli("compile", str(bad), "-o", str(tmp_path / "b.edgert"))
    assert proc.returncode == 2 and "not a TFLite model" in proc.stderr
