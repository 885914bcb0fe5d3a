"""Whisper's encoder as int8 NPU partitions (Ethos-U through Vela, phones through a TFLite delegate);
the decoder and the cross-attention K/V projections stay on the CPU (TVM).

The encoder is written as an ONNX graph straight from the CTranslate2 weights (no exporter, no
hub), in the node patterns the NPU planner fuses (MatMul + bias Add = FULLY_CONNECTED, the
exact-erf GELU's five nodes = GELU), and then goes through the project's NPU compiler like any
ONNX graph: calibration on log-mel windows, the partition plan (LayerNormalization stays on the
CPU, see `edgert.compiler.npu.partition`), int8 quantization, TFLite, Vela for Ethos-U.

    mel [1, n_mels, 2A] -> Conv k3 -> GELU -> Conv k3 s2 -> GELU -> Transpose -> + P[:A]
      -> 4 x [LN, Q/K/V FC, per-head BATCH_MATMUL, SOFTMAX, BATCH_MATMUL, FC, + ; LN, FC, GELU, FC, +]
      -> LN -> encoder_out [1, A, d]

The queries carry the attention scale 1/sqrt(head_dim) in their weights (a power of two for
Whisper's 64-wide heads, so the float graph is unchanged).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import EdgertError

ENCODER_INPUT = "mel"
ENCODER_OUTPUT = "encoder_out"
CALIBRATION_SENTENCES = 8


class _Builder:
    """ONNX nodes and initializers, named after the encoder's parts."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
        """MatMul by w^T ([out, in] as CTranslate2 stores it) + bias: one FULLY_CONNECTED on the NPU."""
        y = self.node("MatMul", [x, self.const(f"{name}.weight", np.ascontiguousarray(w.T))], f"{name}.matmul")
        return self.node("Add", [y, self.const(f"{name}.bias", b)], name)

    def gelu(self, x: str, name: str) -> str:
        """The exact (erf) GELU as exporters write it, which the planner fuses into one GELU."""
        d = self.node("Div", [x, self.const(f"{name}.sqrt2", np.array(math.sqrt(2), np.float32))], f"{name}.div")
        e = self.node("Erf", [d], f"{name}.erf")
        a = self.node("Add", [e, self.const(f"{name}.one", np.array(1.0, np.float32))], f"{name}.add")
        m = self.node("Mul", [x, a], f"{name}.mul")
        return self.node("Mul", [m, self.const(f"{name}.half", np.array(0.5, np.float32))], name)

    def layer_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray, name: str) -> str:
        g, b = self.const(f"{name}.gamma", gamma), self.const(f"{name}.beta", beta)
        return self.node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-5)

    def shape(self, name: str, dims: tuple[int, ...]) -> str:
        return self.const(name, np.array(dims, np.int64))


def encoder_onnx(ct2: Any, cfg: Any) -> Any:
    """The encoder of a CTranslate2 Whisper model (window ``cfg.audio_ctx``) as an ONNX model."""
    import onnx
    from onnx import TensorProto, helper

    d, heads, hd, a = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.audio_ctx
    b = _Builder()
    x = ENCODER_INPUT
    for i, stride in ((1, 1), (2, 2)):
        w, bias = ct2.tensor(f"encoder/conv{i}/weight"), ct2.tensor(f"encoder/conv{i}/bias")
        ins = [x, b.const(f"conv{i}.weight", w), b.const(f"conv{i}.bias", bias)]
        x = b.node("Conv", ins, f"conv{i}", kernel_shape=[3], pads=[1, 1], strides=[stride])
        x = b.gelu(x, f"conv{i}.gelu")
    x = b.node("Transpose", [x], "frames", perm=[0, 2, 1])  # [1, A, d]
    pos = ct2.tensor("encoder/position_encodings/encodings")[:a][None]
    h = b.node("Add", [x, b.const("positions", pos)], "embedded")
    split = b.shape("heads.shape", (1, a, heads, hd))
    merge = b.shape("merge.shape", (1, a, d))
    for i in range(cfg.encoder_layers):
        p, s = f"layer{i}", f"encoder/layer_{i}/"
        n = b.layer_norm(h, ct2.tensor(s + "self_attention/layer_norm/gamma"),
                         ct2.tensor(s + "self_attention/layer_norm/beta"), f"{p}.attn_norm")  # fmt: skip
        w, bias = ct2.tensor(s + "self_attention/linear_0/weight"), ct2.tensor(s + "self_attention/linear_0/bias")
        scale = np.float32(hd**-0.5)
        q = b.linear(n, w[:d] * scale, bias[:d] * scale, f"{p}.q")
        k = b.linear(n, w[d : 2 * d], bias[d : 2 * d], f"{p}.k")
        v = b.linear(n, w[2 * d :], bias[2 * d :], f"{p}.v")
        q = b.node("Transpose", [b.node("Reshape", [q, split], f"{p}.q.split")], f"{p}.q.heads", perm=[0, 2, 1, 3])
        k = b.node("Transpose", [b.node("Reshape", [k, split], f"{p}.k.split")], f"{p}.k.heads", perm=[0, 2, 3, 1])
        v = b.node("Transpose", [b.node("Reshape", [v, split], f"{p}.v.split")], f"{p}.v.heads", perm=[0, 2, 1, 3])
        scores = b.node("MatMul", [q, k], f"{p}.scores")  # [1, heads, A, A]
        probs = b.node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = b.node("MatMul", [probs, v], f"{p}.context")  # [1, heads, A, hd]
        ctx = b.node("Transpose", [ctx], f"{p}.context.frames", perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge], f"{p}.context.merged")
        o = b.linear(ctx, ct2.tensor(s + "self_attention/linear_1/weight"),
                     ct2.tensor(s + "self_attention/linear_1/bias"), f"{p}.out")  # fmt: skip
        h = b.node("Add", [h, o], f"{p}.attn_residual")
        n = b.layer_norm(h, ct2.tensor(s + "ffn/layer_norm/gamma"), ct2.tensor(s + "ffn/layer_norm/beta"),
                         f"{p}.ffn_norm")  # fmt: skip
        f = b.linear(n, ct2.tensor(s + "ffn/linear_0/weight"), ct2.tensor(s + "ffn/linear_0/bias"), f"{p}.fc1")
        f = b.gelu(f, f"{p}.gelu")
        f = b.linear(f, ct2.tensor(s + "ffn/linear_1/weight"), ct2.tensor(s + "ffn/linear_1/bias"), f"{p}.fc2")
        h = b.node("Add", [h, f], f"{p}.ffn_residual")
    b.layer_norm(h, ct2.tensor("encoder/layer_norm/gamma"), ct2.tensor("encoder/layer_norm/beta"), ENCODER_OUTPUT)
    graph = helper.make_graph(
        b.nodes,
        "whisper_encoder",
        [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, [1, cfg.n_mels, cfg.mel_frames])],
        [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, [1, a, d])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mel_windows(samples: list[np.ndarray], n_mels: int, frames: int) -> np.ndarray:
    """One encoder window [n_mels, frames] of log-mel features per clip (zero-padded as the runtime pads)."""
    from edgert.families.whisper.assets import HOP_LENGTH, N_FFT, mel_filters
    from edgert.runtime.audio import log_mel

    filters = mel_filters(n_mels=n_mels)
    out = np.zeros((len(samples), n_mels, frames), np.float32)
    for i, s in enumerate(samples):
        mel = log_mel(s, filters, N_FFT, HOP_LENGTH)[:, :frames]
        out[i, :, : mel.shape[1]] = mel
    return out


def calibration_mels(calibration: Any, n_mels: int, frames: int) -> np.ndarray:
    """Log-mel windows [samples, n_mels, frames] to calibrate the encoder's int8 ranges.

    ``calibration``: an ``.npz`` with ``mel`` [samples, n_mels, frames], a WAV file, a folder of
    WAV files, or None for sentences of the project's calibration text spoken by espeak-ng.
    """
    from edgert.runtime.audio import read_wav

    if calibration is None:
        from edgert.families.shared.calibration import CALIBRATION_TEXT, calibration_sentences
        from edgert.families.whisper.calibrate import speak

        with tempfile.TemporaryDirectory() as tmp:
            texts = calibration_sentences(CALIBRATION_TEXT, CALIBRATION_SENTENCES)
            clips = [read_wav(speak(t, Path(tmp) / f"{i}.wav")).samples for i, t in enumerate(texts)]
        return mel_windows(clips, n_mels, frames)
    if isinstance(calibration, dict):
        return np.asarray(calibration[ENCODER_INPUT], np.float32)
    path = Path(calibration)
    if not path.exists():
        raise EdgertError(f"calibration {path} does not exist")
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            if ENCODER_INPUT not in z.files:
                raise EdgertError(
                    f"{path}: a Whisper encoder calibrates on an array '{ENCODER_INPUT}' [samples, {n_mels}, "
                    f"{frames}] (it has: {', '.join(z.files) or 'nothing'})"
                )
            return np.asarray(z[ENCODER_INPUT], np.float32)
    wavs = sorted(path.glob("*.wav")) if path.is_dir() else [path]
    if not wavs:
        raise EdgertError(f"{path}: no .wav files to calibrate on")
    return mel_windows([read_wav(w).samples for w in wavs], n_mels, frames)


def build_encoder_partitions(
    job: Any, ct2: Any, cfg: Any, spec: Any, calibration: Any, stage: Path, progress: Any
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Compile the encoder for the NPU target ``spec`` into ``stage``: its int8 TFLite partitions (and
    Vela's for Ethos-U) and its CPU partitions (TVM, for this host).

    Returns the manifest's ``npu`` section (target, plan, Vela's estimates, and ``encoder``: the
    inputs and outputs the runtime feeds and reads, then the entry point ``cross_kv`` that turns
    the encoder's output into the decoder's cross-attention K/V) and the staged files.
    """
    import onnx
    from rich.console import Console

    from edgert.compiler.npu import calibrate, compile_npu_graph, print_vela
    from edgert.compiler.npu.partition import print_plan
    from edgert.families.graph.npu import stage_cpu_partitions

    progress("calibrating the int8 encoder", None)
    mels = calibration_mels(calibration, cfg.n_mels, cfg.mel_frames)
    if mels.ndim != 3 or mels.shape[1:] != (cfg.n_mels, cfg.mel_frames):
        raise EdgertError(
            f"calibration '{ENCODER_INPUT}' is {list(mels.shape)}; this encoder takes [samples, {cfg.n_mels}, "
            f"{cfg.mel_frames}] (log-mel windows)"
        )
    model = encoder_onnx(ct2, cfg)
    data = {ENCODER_INPUT: mels}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "whisper_encoder.onnx"
        onnx.save(model, str(path))
        progress("partitioning and quantizing the encoder", None)
        with job.timed("npu"):
            tflites, velas, plan, report = compile_npu_graph(path, spec.name, data)
    console = Console(stderr=True)
    print_plan(plan, console)
    if report is not None:
        print_vela(report, console)
    one = calibrate(model, {k: v[:1, None] for k, v in data.items()})  # every tensor's shape and dtype
    staged: dict[str, Path] = {}
    for i, t in enumerate(tflites):
        staged[f"npu_{i}.tflite"] = stage / f"npu_{i}.tflite"
        staged[f"npu_{i}.tflite"].write_bytes(t)
        if velas is not None:
            staged[f"npu_{i}.vela.tflite"] = stage / f"npu_{i}.vela.tflite"
            staged[f"npu_{i}.vela.tflite"].write_bytes(velas[i])
    staged.update(stage_cpu_partitions(job, model, plan, one, stage, Path("whisper encoder"), progress))

    def io(name: str) -> dict[str, Any]:
        return {"name": name, "dtype": "float32", "shape": [int(d) for d in one.shapes[name]]}

    section = {
        "target": {"name": spec.name, "description": spec.description, **spec.npu},
        "calibration_samples": len(mels),
        "calibration": _calibration_label(calibration),
        "plan": plan,
        "vela": report,
        "encoder": {"inputs": [io(ENCODER_INPUT)], "outputs": [io(ENCODER_OUTPUT)], "then": "cross_kv"},
    }
    return section, staged


def _calibration_label(calibration: Any) -> str:
    if calibration is None:
        return "espeak-ng sentences of the calibration text"
    return Path(calibration).name if isinstance(calibration, str | Path) else "arrays given by the caller"
