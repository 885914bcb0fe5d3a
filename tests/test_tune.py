"""tools/tune.py: a MetaSchedule database stored per target and model, applied by a later compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_tool, run_cli

ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_tuning_database_is_stored_and_applied(tmp_path):
    onnx_path = load_tool("make_tiny_onnx").write(tmp_path, ["dense"])["dense"]
    env = {**os.environ, "EDGERT_TUNING_DIR": str(tmp_path / "tuning")}
    shape = ["--input-shape", "x=1,4,37"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "tune.py"), str(onnx_path), "--target", "host", "--trials", "2",
         "--strategy", "replay-trace", *shape],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = list((tmp_path / "tuning" / "host").iterdir())
    assert len(folders) == 1
    records = (folders[0] / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(r) for r in records)

    art = tmp_path / "tuned.edgert"
    proc = run_cli(
        "compile", str(onnx_path), "-o", str(art), *shape, env={"EDGERT_TUNING_DIR": env["EDGERT_TUNING_DIR"]}
    )
    assert proc.returncode == 0, proc.stderr
    import edgert

    model = edgert.load(art)
    tuning = model.artifact.manifest["tuning"]
    assert tuning["database"].endswith(folders[0].name)
    assert tuning["tuned_kernels"] >= 1
    x = np.random.default_rng(0).standard_normal((1, 4, 37)).astype(np.float32)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(model(x=x)["y"], want, rtol=1e-5, atol=1e-5)
