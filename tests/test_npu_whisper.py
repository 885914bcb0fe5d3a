"""Whisper tiny.en's encoder as int8 NPU partitions: the plan, LiteRT vs edgert's integer reference
bit for bit, the reference kernels' SOFTMAX limit, and (slow) a whole artifact for the Ethos-U55
whose transcript equals the float build's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.compiler.npu import reference
from edgert.compiler.npu.ir import Graph, QParams, Tensor

pytest.importorskip("ai_edge_litert")

WINDOW = 50  # encoder positions (1 s): small enough for a quick test and for LiteRT's reference SOFTMAX


def _beckett() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.origin is not None, "pip install --no-deps useful-moonshine-onnx"
    return Path(spec.origin).parent / "assets" / "beckett.wav"


@pytest.fixture(scope="module")
def short_encoder(whisper_model_dir: Path, tmp_path_factory):
    """tiny.en's encoder over a 1 s window as ONNX, and mel windows of beckett.wav to calibrate it."""
    import onnx

    from edgert.families.whisper.ct2 import read_ct2
    from edgert.families.whisper.model import WhisperConfig
    from edgert.families.whisper.npu import encoder_onnx, mel_windows
    from edgert.runtime.audio import read_wav

    ct2 = read_ct2(whisper_model_dir / "model.bin")
    cfg = WhisperConfig.from_ct2(ct2).with_window(WINDOW)
    path = tmp_path_factory.mktemp("whisper_npu") / "encoder.onnx"
    onnx.save(encoder_onnx(ct2, cfg), str(path))
    samples = read_wav(_beckett()).samples
    clips = [samples[i * 16000 : (i + 1) * 16000] for i in range(6)]
    return path, {"mel": mel_windows(clips, cfg.n_mels, cfg.mel_frames)}, cfg


def test_encoder_plan_puts_the_matrix_work_on_the_npu(short_encoder) -> None:
    """Ethos-U: every MAC on the NPU, only the LayerNorms (listed with their reason) on the CPU;
    NNAPI has no GELU: those go to the CPU too, named."""
    import onnx

    from edgert.compiler.npu import calibrate, model_inputs
    from edgert.compiler.npu.partition import GraphInfo, plan, plan_dict
    from edgert.compiler.npu.quantize import load_calibration

    path, cal, cfg = short_encoder
    model = onnx.load(str(path))
    c = calibrate(model, load_calibration({"mel": cal["mel"][:1]}, model_inputs(model)))
    info = GraphInfo(model, c.shapes, c.dtypes)
    u55 = plan_dict(plan(info, "ethos-u"), "ethos-u55-128", "ethos-u")
    assert u55["npu_mac_share"] == 1.0
    assert {o["op"] for o in u55["cpu_ops"]} == {"LayerNormalization"}
    assert len(u55["cpu_ops"]) == 2 * cfg.encoder_layers + 1 and all(o["reason"] for o in u55["cpu_ops"])
    d, f, a = cfg.d_model, cfg.ffn_dim, cfg.audio_ctx
    convs = 2 * a * d * cfg.n_mels * 3 + a * d * d * 3
    layer = 4 * a * d * d + 2 * a * a * d + 2 * a * d * f
    assert u55["devices"]["npu"]["macs"] == convs + cfg.encoder_layers * layer
    kinds = {k for p in u55["partitions"] if p["device"] == "npu" for k in p["op_types"]}
    assert {"Conv", "Gelu", "Linear", "MatMul", "Softmax"} <= kinds
    nnapi = plan_dict(plan(info, "nnapi"), "android-nnapi", "nnapi")
    reasons = {o["node"]: o["reason"] for o in nnapi["cpu_ops"]}
    assert {o["op"] for o in nnapi["cpu_ops"]} == {"LayerNormalization", "Div", "Erf", "Add", "Mul", "Transpose"}
    assert "Gelu is not lowered" in reasons["conv1.gelu.erf"] and "Gelu is not lowered" in reasons["layer0.gelu"]
    assert "no MACs" in reasons["frames"]  # after the stem's CPU GELU, a lone transpose is not worth a partition
    assert nnapi["npu_mac_share"] == 1.0


def test_encoder_partitions_match_the_reference_bit_for_bit(short_encoder) -> None:
    """Each int8 partition of the encoder (convs, GELU, attention, FFN) in LiteRT's reference kernels
    equals edgert's numpy model of TFLite's integer arithmetic on real activations."""
    import onnx

    from edgert.compiler.npu import calibrate, model_inputs
    from edgert.compiler.npu.lower import lower_partition
    from edgert.compiler.npu.partition import GraphInfo, plan
    from edgert.compiler.npu.quantize import load_calibration, quantize_graph
    from edgert.compiler.npu.tflite_writer import write_tflite
    from edgert.runtime.litert import LiteRTPartition

    path, cal, _cfg = short_encoder
    model = onnx.load(str(path))
    c = calibrate(model, load_calibration(cal, model_inputs(model)))
    info = GraphInfo(model, c.shapes, c.dtypes)
    from edgert.compiler.npu import _session

    sess = _session(model, list(c.shapes))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"mel": cal["mel"][2:3]}), strict=True))
    values["mel"] = cal["mel"][2:3]
    kinds: set[str] = set()
    for p in plan(info, "ethos-u")[:5]:  # the stem, then one whole layer (attention and FFN)
        if p.device != "npu":
            continue
        g, stat_of = lower_partition(info, p)
        q = quantize_graph(g, {ir: c.stats[s].range() for ir, s in stat_of.items()})
        assert reference.litert_reference_problem(q) is None
        feeds = {n: reference.quantize(values[n], *q.tensors[n].q.per_tensor) for n in q.inputs}
        expected = reference.run(q, feeds)
        got = LiteRTPartition(write_tflite(q))(*(feeds[n] for n in q.inputs), raw=True)
        for n, y in zip(q.outputs, got, strict=True):
            np.testing.assert_array_equal(y, expected[n])
        kinds |= {op.kind for op in q.ops}
    assert {"CONV_2D", "GELU", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "ADD"} <= kinds


def test_long_softmax_rows_are_left_to_the_builtin_kernels() -> None:
    """LiteRT's reference SOFTMAX aborts on near-uniform rows of 512 or more: the compiler says so."""
    from edgert.compiler.npu import host_kernels

    for row, problem in ((511, False), (512, True)):
        g = Graph()
        x = g.add(Tensor("x", (1, 2, row), "int8", QParams.of(0.3, -4)))
        y = g.add(Tensor("y", (1, 2, row), "int8", QParams.of(1 / 256, -128)))
        g.op("SOFTMAX", [x], [y], beta=1.0)
        g.inputs, g.outputs = [x], [y]
        pd: dict = {}
        host_kernels(g, pd)
        assert bool(reference.litert_reference_problem(g)) is problem
        assert pd.get("host_kernels") == ("builtin" if problem else None)
        if problem:
            assert "512" in pd["host_kernels_reason"]


def test_calibration_for_the_encoder_is_checked(tmp_path: Path) -> None:
    from edgert.errors import EdgertError
    from edgert.families.whisper.npu import calibration_mels

    np.savez(tmp_path / "bad.npz", audio=np.zeros((2, 80, 100), np.float32))
    with pytest.raises(EdgertError, match="array 'mel'"):
        calibration_mels(tmp_path / "bad.npz", 80, 100)
    with pytest.raises(EdgertError, match="does not exist"):
        calibration_mels(tmp_path / "none.npz", 80, 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgertError, match=r"no \.wav files"):
        calibration_mels(tmp_path / "empty", 80, 100)


@pytest.mark.slow
def test_ethos_u55_artifact_transcribes_like_the_float_build(transcriber, tmp_path: Path) -> None:
    """The whole path a user takes: compile for the U55 (int8 encoder through Vela, decoder on the
    CPU), then transcribe beckett.wav with the encoder in LiteRT: the float build's words, beam 5."""
    from conftest import run_cli

    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.audio import read_wav

    out = tmp_path / "whisper-u55.edgert"
    proc = run_cli("compile", "whisper-tiny.en", "--target", "ethos-u55-128", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    npu = Transcriber(out)
    assert npu.artifact.manifest["npu"]["encoder"], "the encoder is not an NPU partition"
    samples = read_wav(_beckett()).samples
    got, want = npu.transcribe(samples, beam_size=5), transcriber.transcribe(samples, beam_size=5)
    assert got.text == want.text
