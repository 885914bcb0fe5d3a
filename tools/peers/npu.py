"""NPU section: how much of each graph an Arm Ethos-U55-128 takes, and Vela's estimate of its latency.

Each graph is compiled by ``edgert compile --target ethos-u55-128 --calibrate`` (int8 partitions
for the NPU through Vela, the rest for the CPU): the all-MiniLM-L6-v2 encoder at 32 tokens,
silero-vad on one 512-sample chunk (state carried through a synthetic recording for calibration),
the trained codec's encoder (codec-speech16k, written as ONNX from its weights; 1 s per call;
its int8 latents through the float RVQ and decoder: the SI-SNR lost against the float encoder's on
beckett.wav and two held-out espeak-ng sentences, worst clip), the EnCodec-architecture reference
codec (tools/make_codec_reference.py ``tiny``, exported
by tools/export_codec_onnx.py) when torch and transformers are installed, and Whisper tiny.en
(`edgert compile whisper-tiny.en --target ethos-u55-128`: the encoder int8 on the NPU, the decoder
on the CPU; its transcript of beckett.wav against the float host build's). The numbers are Vela's
estimates at the target's clock, not measurements; the int8 accuracy is the artifact run here
(LiteRT's reference kernels for the NPU parts, TVM for the CPU parts) against onnxruntime float.
There is no peer: ExecuTorch's Arm backend needs Arm's FVP simulators to run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from peers import Row

NAME = "npu"
HELP = "ONNX graphs on an Ethos-U55-128: share of MACs on the NPU and Vela's estimated latency"
ROOT = Path(__file__).resolve().parents[2]
TARGET = "ethos-u55-128"


def add_arguments(parser: Any) -> None:
    """This section's options."""
    parser.add_argument("--npu-target", default=TARGET, help="the NPU target (an Ethos-U one for Vela's estimate)")


def _float(onnx_path: Path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds), strict=True))


def _case(
    case: str, onnx_path: Path, cal: dict, tests: list[dict], target: str, work: Path, metric, higher: bool = True
) -> list[Row]:
    import time

    from edgert.families.compile import compile_model
    from edgert.families.registry import load

    np.savez(work / f"{case}.npz", **cal)
    t = time.perf_counter()
    result = compile_model(onnx_path, target, work / f"{case}.edgert", calibrate=work / f"{case}.npz")
    compile_s = time.perf_counter() - t
    npu, size = result.manifest["npu"], sum(f["size"] for f in result.manifest["files"].values())
    vela, plan = npu["vela"] or {}, npu["plan"]
    model, ref = load(result.path), _float(onnx_path)
    name, value = metric(model, ref, tests)
    share = vela.get("npu_mac_share", plan["npu_mac_share"])
    extra = {"target": target, "macs": plan["devices"], "source": vela.get("source")}
    return [
        Row(NAME, case, "MACs on the NPU (Vela)", "%", 100 * share, None, "-", True, extra),
        Row(NAME, case, "latency, Vela's estimate", "ms", vela.get("latency_ms"), None, "-", False,
            {"cycles": vela.get("cycles_total"), "clock_hz": vela.get("clock_hz")}),
        Row(NAME, case, "SRAM peak, Vela's estimate", "KiB", vela.get("sram_bytes_peak", 0) / 1024, None, "-", False),
        Row(NAME, case, "flash, Vela's estimate", "KiB", vela.get("flash_bytes", 0) / 1024, None, "-", False),
        Row(NAME, case, name, "", value, None, "onnxruntime float", higher),
        Row(NAME, case, "compile", "s", compile_s, None, "-", False),
        Row(NAME, case, "artifact", "MB", size / 1e6, None, "-", False),
    ]  # fmt: skip


def _cosine(output: str):
    def metric(model, ref, tests):
        cos = []
        for feed in tests:
            a, b = model(feed)[output].ravel(), ref(feed)[output].ravel()
            cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        return f"min cosine of {output} to float", min(cos)

    return metric


def _max_abs(output: str):
    def metric(model, ref, tests):
        return f"max |Δ{output}| to float", max(float(np.abs(model(f)[output] - ref(f)[output]).max()) for f in tests)

    return metric


def _vad_agreement(onnx_path: Path):
    """Share of beckett.wav's chunks (then silence, noise, hum) whose speech decision equals float's."""

    def metric(model, ref, tests):
        import npu_vad

        audio = npu_vad.test_audio()
        want, _ = npu_vad.stream(npu_vad.float_runner(onnx_path), audio)
        got, _ = npu_vad.stream(model, audio)
        return f"decisions equal to float, {len(want)} chunks (%)", 100 * npu_vad.agreement(got, want)

    return metric


def _vad_chunks(onnx_path: Path, seconds: float = 4.0) -> list[dict]:
    """Chunks of a synthetic recording (a gated tone in noise) with the state silero-vad carries."""
    run = _float(onnx_path)
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0) + 0.05 * rng.standard_normal(t.size)
    audio = audio.astype(np.float32)
    state, context, chunks = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32), []
    for i in range(0, len(audio) - 511, 512):
        x = np.concatenate([context, audio[i : i + 512]])[None]
        chunks.append({"input": x, "state": state})
        res = run(chunks[-1])
        state, context = res["stateN"], x[0, -64:]
    return chunks


def _whisper(target: str, work: Path) -> list[Row]:
    """Whisper tiny.en with its encoder as int8 NPU partitions (calibrated on the recipe's default: espeak-ng
    sentences) against the float host build: the transcript of the Whisper tests' audio (beckett.wav)."""
    import importlib.util
    import time

    from edgert.families.compile import compile_model
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.profile.audio_quality import word_error_rate

    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is None or spec.origin is None:
        print("npu: whisper skipped (pip install --no-deps useful-moonshine-onnx for beckett.wav)", file=sys.stderr)
        return []
    wav = Path(spec.origin).parent / "assets" / "beckett.wav"
    t = time.perf_counter()
    result = compile_model("whisper-tiny.en", target, work / "whisper-npu.edgert")
    compile_s = time.perf_counter() - t
    compile_model("whisper-tiny.en", "host", work / "whisper-host.edgert")
    got = Transcriber(result.path).transcribe(wav).text
    want = Transcriber(work / "whisper-host.edgert").transcribe(wav).text
    npu, size = result.manifest["npu"], sum(f["size"] for f in result.manifest["files"].values())
    vela, plan = npu["vela"] or {}, npu["plan"]
    case = "whisper tiny.en encoder, 30 s window (decoder on the CPU)"
    share = vela.get("npu_mac_share", plan["npu_mac_share"])
    extra = {"target": target, "macs": plan["devices"], "source": vela.get("source"), "int8": got, "float": want}
    return [
        Row(NAME, case, "MACs on the NPU (Vela)", "%", 100 * share, None, "-", True, extra),
        Row(NAME, case, "latency, Vela's estimate", "ms", vela.get("latency_ms"), None, "-", False,
            {"cycles": vela.get("cycles_total"), "clock_hz": vela.get("clock_hz")}),
        Row(NAME, case, "SRAM peak, Vela's estimate", "KiB", vela.get("sram_bytes_peak", 0) / 1024, None, "-", False),
        Row(NAME, case, "flash, Vela's estimate", "KiB", vela.get("flash_bytes", 0) / 1024, None, "-", False),
        Row(NAME, case, "WER of the transcript to the float build's", "", word_error_rate(want, got), None,
            "edgert float (host)", True, extra),
        Row(NAME, case, "compile", "s", compile_s, None, "-", False),
        Row(NAME, case, "artifact", "MB", size / 1e6, None, "-", False),
    ]  # fmt: skip


def run(args: Any) -> list[Row]:
    """Compile each graph for the NPU target and report Vela's estimates and int8 accuracy."""
    sys.path.insert(0, str(ROOT / "tools"))
    from export_minilm_onnx import export, tokenize
    from npu_minilm import CALIBRATION, HELD_OUT

    target, rows = args.npu_target, []
    with tempfile.TemporaryDirectory(prefix="edgert-peers-npu-") as tmp:
        work = Path(tmp)
        minilm = export(work / "minilm.onnx")
        held = tokenize(HELD_OUT, 32)
        tests = [{k: v[i : i + 1] for k, v in held.items()} for i in range(len(HELD_OUT))]
        rows += _case("MiniLM-L6 32 tokens", minilm, tokenize(CALIBRATION, 32), tests, target, work,
                      _cosine("sentence_embedding"))  # fmt: skip
        import npu_vad
        from npu_codec import build as build_codec
        from npu_codec import calibration as codec_calibration
        from npu_codec import si_snr_figures, speech_windows

        vad = npu_vad.onnx_path()
        rows += _case("silero-vad 512 samples", vad, npu_vad.calibration(vad), [], target, work, _vad_agreement(vad))
        from npu_codec import FRAMES, trained_calibration, trained_encoder, trained_figures, trained_test_clips

        speech16k = trained_encoder(work)
        clips = trained_test_clips()

        def si_snr_loss(model, ref, tests):
            figures = trained_figures(model, speech16k, clips)
            return "SI-SNR lost to the float encoder, worst clip (dB)", max(f["loss_db"] for f in figures.values())

        rows += _case(f"codec-speech16k encoder {FRAMES} frames (1 s)", speech16k, trained_calibration(), [], target,
                      work, si_snr_loss, higher=False)  # fmt: skip
        try:
            codec_model, encoder = build_codec(work / "codec-encoder", "tiny", 8000)
        except Exception as exc:  # torch/transformers missing: the table says so
            print(f"npu: codec encoder skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        else:
            windows = speech_windows(codec_model.config.sampling_rate, 8000)

            def latents_snr(model, ref, tests):
                fig = si_snr_figures(codec_model, encoder, model, windows)
                return "SI-SNR int8 vs float latents (dB)", fig["latents_si_snr_db"]

            rows += _case("codec tiny encoder 8000 samples", encoder, codec_calibration(8000), [], target, work,
                          latents_snr)  # fmt: skip
        try:
            import make_codec_reference
            from export_codec_onnx import export as export_codec

            make_codec_reference.save(make_codec_reference.build("tiny"), work / "codec")
            codec = export_codec(work / "codec", work / "codec.onnx", samples=8000)
        except Exception as exc:  # torch/transformers missing, or the export failing: the table says so
            print(f"npu: codec skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        else:
            rng = np.random.default_rng(1)
            audio = (0.1 * rng.standard_normal((24, 1, 1, 8000))).astype(np.float32)
            tests = [{"audio": audio[i]} for i in range(20, 24)]
            rows += _case("codec tiny 8000 samples (encode+RVQ+decode)", codec, {"audio": audio[:20]}, tests,
                          target, work, _max_abs("audio_out"))  # fmt: skip
        rows += _whisper(target, work)
    return rows
