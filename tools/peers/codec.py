"""Codec section: edgert's streamed EnCodec-architecture codec vs PyTorch and onnxruntime.

The model is tools/make_codec_reference.py's ``small`` preset (EnCodec 24 kHz's layout at half
width, seeded weights). The audio is 10 s of 24 kHz speech-like signal, fed in 80 ms frames.

- edgert streams: each frame is encoded and decoded with the carried state (the real streaming
  cost); frame latency = encode + decode of one frame.
- PyTorch (`transformers` EncodecModel) has no streaming state, so its frame latency is the
  encode + decode of one 80 ms frame on its own (the same arithmetic a streamer would do per
  frame, without the state bookkeeping), and its real-time factor is one whole-signal call.
- onnxruntime runs the ONNX export (tools/export_codec_onnx.py) of one 80 ms frame.

With ``--background N``, edgert's stream (at its default thread count: the free cores) and
onnxruntime's frame (at ``--threads``) run again beside N busy processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from peers import Row

NAME = "codec"
HELP = "EnCodec-architecture codec, 10 s of 24 kHz audio streamed in 80 ms frames"
TOOLS = Path(__file__).resolve().parent.parent


def add_arguments(parser: Any) -> None:
    """Options of this section."""
    parser.add_argument("--codec-preset", default="small", help="make_codec_reference preset")
    parser.add_argument("--codec-seconds", type=float, default=10.0, help="audio length")
    parser.add_argument("--codec-frame-ms", type=float, default=80.0, help="streaming frame length")


def _signal(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 3 * t)
    voiced = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t))
    return (voiced + 0.03 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)


def _edgert_stream(artifact: Path, audio: np.ndarray, frame: int, threads: int | None) -> tuple[list[float], float]:
    from edgert.families.codec.stream import load_codec

    codec = load_codec(artifact, threads)
    enc, dec = codec.encoder(), codec.decoder()
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(audio), frame):
        t = time.perf_counter()
        last = i + frame >= len(audio)
        dec.push(enc.push(audio[i : i + frame], final=last), final=last)
        latencies.append(time.perf_counter() - t)
    dec.flush()
    total = time.perf_counter() - start
    return latencies, total / (len(audio) / codec.sample_rate)


def _own_codec(args: argparse.Namespace) -> list[Row]:
    """models/codec-speech16k (16 kHz, closed-form MDCT + PCA + RVQ) streamed, vs its numpy reference."""
    import fit_codec

    from edgert.families.compile import compile_model

    folder = TOOLS.parent / "models" / "codec-speech16k"
    reference = fit_codec.load(folder)
    rate = 16000
    audio = _signal(args.codec_seconds, rate)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "speech.edgert"
        compile_model(str(folder), output=artifact, threads=args.threads)
        runs = [
            _edgert_stream(artifact, audio, int(args.codec_frame_ms * rate / 1000), args.threads)
            for _ in range(args.repeats)
        ]
    e_rtf = statistics.median(rtf for _, rtf in runs)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        reference.roundtrip(audio)
        times.append(time.perf_counter() - t)
    case = f"codec-speech16k, {args.codec_seconds:g} s at 16 kHz, {args.codec_frame_ms:g} ms frames, all codebooks"
    row = Row(
        NAME,
        case,
        "real-time factor",
        "x",
        e_rtf,
        statistics.median(times) / args.codec_seconds,
        "numpy reference (whole signal)",
        False,
    )
    row.extra["edgert"] = "streamed"
    return [row]


def _timed(fn: Any, feed: dict) -> float:
    t = time.perf_counter()
    fn(None, feed)
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> list[Row]:
    """Measure and compare."""
    sys.path.insert(0, str(TOOLS))
    import export_codec_onnx
    import make_codec_reference
    import torch

    from edgert.families.compile import compile_model

    torch.set_num_threads(args.threads)
    rate = 24000
    frame = int(args.codec_frame_ms * rate / 1000)
    audio = _signal(args.codec_seconds, rate)
    rows: list[Row] = _own_codec(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"encodec-{args.codec_preset}"
        model = make_codec_reference.build(args.codec_preset, seed=0)
        make_codec_reference.save(model, folder)
        artifact = Path(tmp) / "codec.edgert"
        compile_model(str(folder), output=artifact, threads=args.threads)

        runs = [_edgert_stream(artifact, audio, frame, args.threads) for _ in range(args.repeats)]
        e_lat = statistics.median(statistics.median(lat[1:]) for lat, _ in runs)  # first call holds back
        e_rtf = statistics.median(rtf for _, rtf in runs)

        bandwidth = max(model.config.target_bandwidths)
        x = torch.from_numpy(audio[: frame // 320 * 320]).view(1, 1, -1)
        whole = torch.from_numpy(audio[: len(audio) // 320 * 320]).view(1, 1, -1)

        def torch_call(signal: torch.Tensor) -> float:
            with torch.no_grad():
                t = time.perf_counter()
                enc = model.encode(signal, bandwidth=bandwidth)
                model.decode(enc.audio_codes, enc.audio_scales)
                return time.perf_counter() - t

        torch_call(x)
        t_lat = statistics.median(torch_call(x) for _ in range(max(20, args.repeats)))
        t_rtf = statistics.median(torch_call(whole) for _ in range(args.repeats)) / (whole.shape[-1] / rate)

        case = f"{args.codec_preset}, {args.codec_seconds:g} s, {args.codec_frame_ms:g} ms frames"
        rows.append(Row(NAME, case, "frame latency (enc+dec)", "ms", 1000 * e_lat, 1000 * t_lat, "pytorch", False))
        rows.append(Row(NAME, case, "real-time factor", "x", e_rtf, t_rtf, "pytorch (whole signal)", False))
        rows[-1].extra["edgert"] = "streamed"
        try:
            import onnxruntime as ort
        except ImportError:
            return rows
        onnx_path = export_codec_onnx.export(folder, Path(tmp) / "frame.onnx", samples=x.shape[-1])
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {"audio": x.numpy()}
        session.run(None, feed)
        times = []
        for _ in range(max(20, args.repeats)):
            t = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t)
        o_lat = statistics.median(times)
        if getattr(args, "background", 0):
            from edgert.profile.background import busy_processes

            with busy_processes(args.background):
                busy_runs = [_edgert_stream(artifact, audio, frame, None) for _ in range(args.repeats)]
            with busy_processes(args.background):
                busy_times = [_timed(session.run, feed) for _ in range(max(20, args.repeats))]
            b_lat = statistics.median(statistics.median(lat[1:]) for lat, _ in busy_runs)
            rows.append(
                Row(
                    NAME,
                    case,
                    f"frame latency beside {args.background} busy processes",
                    "ms",
                    1000 * b_lat,
                    1000 * statistics.median(busy_times),
                    "onnxruntime",
                    False,
                    {
                        "edgert_threads": "default (the free cores)",
                        "peer_threads": args.threads,
                        "edgert_vs_quiet": round(e_lat / b_lat, 2),  # speed, as the llm rows give it
                        "peer_vs_quiet": round(o_lat / statistics.median(busy_times), 2),
                        "edgert_rtf": round(statistics.median(rtf for _, rtf in busy_runs), 4),
                    },
                )
            )
        rows.append(Row(NAME, case, "frame latency (enc+dec)", "ms", 1000 * e_lat, 1000 * o_lat, "onnxruntime", False))
        rows.append(
            Row(
                NAME,
                case,
                "real-time factor",
                "x",
                e_rtf,
                o_lat / (x.shape[-1] / rate),
                "onnxruntime (per frame)",
                False,
            )
        )
    return rows
