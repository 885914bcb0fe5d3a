#!/usr/bin/env python
"""A codec's encoder on an NPU target: partition plan, Vela's estimate, SI-SNR.

    python tools/npu_codec.py [--target ethos-u55-128] [--codec speech16k | reference]

``speech16k`` (the default): the project's trained codec (models/codec-speech16k), its encoder
written as ONNX from its weights (`edgert.families.codec.npu`), calibrated on espeak-ng training
sentences (train_codec's texts and voices) and compiled for the target. The int8 encoder's
latents (NPU partitions on LiteRT's reference kernels) and the float encoder's (onnxruntime) both
go through the codec's float gain-shape RVQ (all 16 stages, 16 kbit/s) and float decoder
(tools/fit_codec.py's numpy reference); each reconstruction's SI-SNR against the input is
measured on beckett.wav and two held-out espeak-ng sentences, and the codes are compared.

``reference`` (``--preset tiny --samples 8000``): builds the EnCodec-architecture reference codec
(tools/make_codec_reference.py), exports its
encoder alone to ONNX (tools/export_codec_onnx.py ``--part encoder``), calibrates it on seeded
noise and compiles it for the target. On the project's speech recording (moonshine's
beckett.wav at the codec's rate, in windows of ``samples``) the codec's float decoder then
decodes the latents of the int8 encoder (NPU partitions on LiteRT's reference kernels) and of the
float encoder (onnxruntime); the SI-SNR of each reconstruction against the input, and of the
int8 one (and of the int8 latents) against the float one, measure what int8 costs. The codec's
weights are seeded, not trained: its reconstruction is not the input (SI-SNR far below 0 dB for
both builds), so the int8-against-float figures are the informative ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(work: Path, preset: str = "tiny", samples: int = 8000):
    """(torch model, encoder ONNX path) of the reference codec, exported into ``work``."""
    import make_codec_reference
    from export_codec_onnx import export

    model = make_codec_reference.build(preset)
    make_codec_reference.save(model, work / "codec")
    return model, export(work / "codec", work / "encoder.onnx", samples=samples, part="encoder")


def calibration(samples: int, count: int = 12) -> dict[str, np.ndarray]:
    """Seeded noise at several levels, with tone bursts (not the test audio)."""
    rng = np.random.default_rng(1)
    t = np.arange(samples) / 24000
    out = []
    for i in range(count):
        level = 0.3 / (1 + i % 4)
        x = level * rng.standard_normal(samples) + 0.2 * np.sin(2 * np.pi * (110 + 60 * i) * t)
        out.append(x[None, None])
    return {"audio": np.stack(out).astype(np.float32)}


def speech_windows(rate: int, samples: int) -> list[np.ndarray]:
    """beckett.wav at ``rate``, cut into windows of ``samples`` (the last partial one dropped)."""
    import importlib.util

    from edgert.runtime.audio import read_wav

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.origin is not None, "pip install --no-deps useful-moonshine-onnx"
    audio = read_wav(Path(spec.origin).parent / "assets" / "beckett.wav", sample_rate=rate).samples
    return [audio[i : i + samples][None, None].astype(np.float32) for i in range(0, len(audio) - samples + 1, samples)]


def si_snr_figures(model, encoder_onnx: Path, run_int8, windows: list[np.ndarray]) -> dict[str, float]:
    """SI-SNR (dB) over the concatenated windows: float codec vs input, int8 encoder vs input,
    and int8 vs float reconstruction."""
    import onnxruntime as ort
    import torch

    from edgert.profile.audio_quality import si_snr

    sess = ort.InferenceSession(str(encoder_onnx), providers=["CPUExecutionProvider"])
    ref, got, lat_ref, lat_got = [], [], [], []
    with torch.no_grad():
        for x in windows:
            lat_f = sess.run(None, {"audio": x})[0]
            lat_q = run_int8({"audio": x})["latents"]
            lat_ref.append(lat_f.ravel())
            lat_got.append(np.asarray(lat_q, np.float32).ravel())
            ref.append(model.decoder(torch.from_numpy(lat_f)).numpy().ravel()[: x.size])
            got.append(model.decoder(torch.from_numpy(np.asarray(lat_q, np.float32))).numpy().ravel()[: x.size])
    signal = np.concatenate([x.ravel() for x in windows])
    ref_a, got_a = np.concatenate(ref), np.concatenate(got)
    float_snr, int8_snr = si_snr(ref_a, signal), si_snr(got_a, signal)
    return {
        "float_si_snr_db": float_snr,
        "int8_si_snr_db": int8_snr,
        "loss_db": float_snr - int8_snr,
        "int8_vs_float_si_snr_db": si_snr(got_a, ref_a),
        "latents_si_snr_db": si_snr(np.concatenate(lat_got), np.concatenate(lat_ref)),
        "seconds": signal.size / model.config.sampling_rate,
    }


TRAINED = Path(__file__).resolve().parent.parent / "models" / "codec-speech16k"
FRAMES = 100  # frames per encoder call: 1 s at 100 frames/s


def trained_encoder(work: Path, folder: Path = TRAINED, frames: int = FRAMES) -> Path:
    """The trained codec's encoder as ONNX (``frames`` frames per call), written into ``work``."""
    import onnx

    from edgert.families.codec.npu import encoder_onnx

    path = work / "codec-speech16k-encoder.onnx"
    onnx.save(encoder_onnx(folder, frames), str(path))
    return path


def trained_calibration(frames: int = FRAMES, hop: int = 160, count: int = 6) -> dict[str, np.ndarray]:
    """Encoder windows of ``count`` espeak-ng training sentences (train_codec's texts and voices;
    neither the recording nor the held-out sentences)."""
    from train_codec import SENTENCES, TRAIN_VOICES, speak

    from edgert.families.codec.npu import encoder_windows

    windows = []
    for i in range(count):
        audio = speak(SENTENCES[i % len(SENTENCES)], TRAIN_VOICES[i % len(TRAIN_VOICES)])
        windows += encoder_windows(audio, hop, frames)
    return {"audio": np.stack(windows).astype(np.float32)}


def trained_test_clips() -> dict[str, np.ndarray]:
    """beckett.wav (10 s) and two held-out espeak-ng sentences (tools/train_codec.py's HELD_OUT)."""
    from train_codec import HELD_OUT, beckett, speak

    clips = {"beckett": beckett()}
    for i, (voice, text) in enumerate(HELD_OUT[:2]):
        clips[f"espeak-{i}"] = speak(text, voice)
    return clips


def trained_figures(run_int8, encoder: Path, clips: dict[str, np.ndarray], folder: Path = TRAINED,
                    frames: int = FRAMES) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per clip: SI-SNR (dB) against the input of [float encoder -> float RVQ + decoder] and of
    [int8 encoder -> the same], their difference, and the share of RVQ codes the two agree on
    (all stages), and the mean distance between their gain levels (stage 0)."""
    import fit_codec
    import onnxruntime as ort

    from edgert.families.codec.npu import ENCODER_INPUT, ENCODER_OUTPUT, encoder_windows
    from edgert.profile.audio_quality import si_snr

    codec = fit_codec.load(folder)
    hop = codec.hop
    sess = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    out = {}
    for name, audio in clips.items():
        z_f, z_q = [], []
        for w in encoder_windows(audio, hop, frames):
            z_f.append(sess.run([ENCODER_OUTPUT], {ENCODER_INPUT: w})[0][0].T)
            z_q.append(np.asarray(run_int8({ENCODER_INPUT: w})[ENCODER_OUTPUT], np.float32)[0].T)
        count = len(audio) // hop
        figures = {}
        codes = {}
        for kind, z in (("float", z_f), ("int8", z_q)):
            z = np.concatenate(z)[:count].astype(np.float64)
            codes[kind] = fit_codec.codes_of(z, codec.books, codec.gains)
            y = codec.decode(codes[kind])[hop:].astype(np.float32)
            figures[f"{kind}_si_snr_db"] = si_snr(y, audio[: len(y)])
        figures["loss_db"] = figures["float_si_snr_db"] - figures["int8_si_snr_db"]
        figures["codes_equal"] = float(np.mean(codes["float"] == codes["int8"]))
        # The gain's 1024 log-norm levels are ~0.01 apart: int8 noise moves most frames by a level or two.
        figures["gain_level_diff"] = float(np.mean(np.abs(codes["float"][:, 0] - codes["int8"][:, 0])))
        figures["seconds"] = len(audio) / 16000
        out[name] = figures
    return out


def main_trained(target: str) -> None:
    import tempfile

    from edgert.compiler.npu import compile_npu_graph
    from edgert.families.graph.npu import PlanRunner

    work = Path(tempfile.mkdtemp(prefix="edgert-codec-npu-"))
    path = trained_encoder(work)
    tflites, _velas, plan, report = compile_npu_graph(path, target, trained_calibration(), show=True)
    figures = trained_figures(PlanRunner(path, plan, tflites), path, trained_test_clips())
    share = report["npu_mac_share"] if report else plan["npu_mac_share"]
    print(f"codec-speech16k encoder: NPU share of MACs {share:.1%}")
    for name, f in figures.items():
        print(
            f"  {name} ({f['seconds']:.1f} s): SI-SNR vs input float {f['float_si_snr_db']:.2f} dB, int8 encoder "
            f"{f['int8_si_snr_db']:.2f} dB (loss {f['loss_db']:.2f} dB); codes equal {f['codes_equal']:.1%} "
            f"(gain levels {f['gain_level_diff']:.1f} apart on average)"
        )


def main() -> None:
    import tempfile

    from edgert.compiler.npu import compile_npu_graph
    from edgert.families.graph.npu import PlanRunner

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="ethos-u55-128")
    parser.add_argument("--codec", choices=["speech16k", "reference"], default="speech16k")
    parser.add_argument("--preset", default="tiny", help="the reference codec's preset")
    parser.add_argument("--samples", type=int, default=8000, help="the reference codec's window")
    args = parser.parse_args()
    if args.codec == "speech16k":
        main_trained(args.target)
        return
    work = Path(tempfile.mkdtemp(prefix="edgert-codec-npu-"))
    model, path = build(work, args.preset, args.samples)
    tflites, _velas, plan, report = compile_npu_graph(path, args.target, calibration(args.samples), show=True)
    figures = si_snr_figures(model, path, PlanRunner(path, plan, tflites), speech_windows(model.config.sampling_rate,
                                                                                            args.samples))  # fmt: skip
    share = report["npu_mac_share"] if report else plan["npu_mac_share"]
    print(
        f"NPU share of MACs {share:.1%}; SI-SNR vs input over {figures['seconds']:.1f} s: float "
        f"{figures['float_si_snr_db']:.2f} dB, int8 encoder {figures['int8_si_snr_db']:.2f} dB "
        f"(loss {figures['loss_db']:.2f} dB); int8 vs float reconstruction "
        f"{figures['int8_vs_float_si_snr_db']:.2f} dB, "
        f"latents {figures['latents_si_snr_db']:.2f} dB"
    )


if __name__ == "__main__":
    main()
