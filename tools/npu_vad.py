#!/usr/bin/env python
"""silero-vad on an NPU target: partition plan, Vela's estimate, speech decisions against float.

    python tools/npu_vad.py [--target ethos-u55-128]

silero-vad (the `silero-vad` package's 16 kHz ONNX graph) takes one 512-sample chunk with 64
samples of context and the LSTM state [2, 1, 128], and returns a speech probability and the next
state. Calibration streams espeak-ng speech and a gated tone in noise; the test streams the
project's speech recording (moonshine's beckett.wav) followed by silence and noise, carrying the
state from chunk to chunk in both builds, and counts the chunks whose decision (probability >
0.5, silero's default) differs between the int8 build (NPU partitions on LiteRT's reference
kernels) and onnxruntime float.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK, CONTEXT, RATE = 512, 64, 16000
THRESHOLD = 0.5


def onnx_path() -> Path:
    from edgert.paths import package_file

    return package_file("silero_vad", "data", "silero_vad_openvino_16k.onnx")


def test_audio() -> np.ndarray:
    """beckett.wav (10 s of speech), then 1 s of silence, 1 s of white noise and 1 s of hum in noise."""
    import importlib.util

    from edgert.runtime.audio import read_wav

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.origin is not None, "pip install --no-deps useful-moonshine-onnx"
    speech = read_wav(Path(spec.origin).parent / "assets" / "beckett.wav").samples
    rng = np.random.default_rng(7)
    t = np.arange(RATE) / RATE
    noise = 0.05 * rng.standard_normal(RATE)
    hum = 0.1 * np.sin(2 * np.pi * 50 * t) + 0.02 * rng.standard_normal(RATE)
    return np.concatenate([speech, np.zeros(RATE), noise, hum]).astype(np.float32)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog, then rests beside the river.",
    "Please call Stella and ask her to bring these things with her from the store.",
]


def calibration_audio(seconds: float = 2.0) -> np.ndarray:
    """espeak-ng speech (not the test audio's speaker) and a gated 220 Hz tone in noise.

    Speech matters: calibrated on the tone alone, the int8 build agrees with float on 65% of the
    test chunks, since speech spectra reach ranges the tone never does."""
    import shutil
    import subprocess
    import tempfile

    from edgert.runtime.audio import read_wav

    espeak = shutil.which("espeak-ng")
    assert espeak, "apt-get install espeak-ng (tools/setup.sh --test does)"
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True, capture_output=True)
            parts += [read_wav(wav).samples, np.zeros(RATE // 2, np.float32)]
    rng = np.random.default_rng(0)
    t = np.arange(int(RATE * seconds)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0) + 0.05 * rng.standard_normal(t.size)
    return np.concatenate([*parts, tone]).astype(np.float32)


def stream(run: Callable[[dict], dict], audio: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Speech probability per chunk, the state carried from chunk to chunk; and the feeds given."""
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)
    probs, feeds = [], []
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[i : i + CHUNK]])[None].astype(np.float32)
        feeds.append({"input": x, "state": state})
        out = run(feeds[-1])
        probs.append(float(np.asarray(out["output"]).ravel()[0]))
        state, context = np.asarray(out["stateN"], np.float32), x[0, -CONTEXT:]
    return np.asarray(probs), feeds


def float_runner(path: Path) -> Callable[[dict], dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds), strict=True))


def calibration(path: Path, every: int = 2) -> dict[str, np.ndarray]:
    """Calibration samples: every ``every``-th chunk of the calibration audio, with its float state."""
    _, feeds = stream(float_runner(path), calibration_audio())
    return {k: np.stack([f[k] for f in feeds[::every]]) for k in feeds[0]}


def agreement(int8: np.ndarray, ref: np.ndarray) -> float:
    """Share of chunks whose speech/non-speech decision is the same."""
    return float(np.mean((int8 > THRESHOLD) == (ref > THRESHOLD)))


def main() -> None:
    from edgert.compiler.npu import compile_npu_graph
    from edgert.families.graph.npu import PlanRunner

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="ethos-u55-128")
    args = parser.parse_args()
    path = onnx_path()
    tflites, _velas, plan, report = compile_npu_graph(path, args.target, calibration(path), show=True)
    audio = test_audio()
    ref, _ = stream(float_runner(path), audio)
    got, _ = stream(PlanRunner(path, plan, tflites), audio)
    share = report["npu_mac_share"] if report else plan["npu_mac_share"]
    print(
        f"NPU share of MACs {share:.1%}; decisions equal to float on {agreement(got, ref):.2%} of {len(ref)} chunks "
        f"(speech in {np.mean(ref > THRESHOLD):.0%} of them); max |Δp| {np.abs(got - ref).max():.3f}"
    )


if __name__ == "__main__":
    main()
