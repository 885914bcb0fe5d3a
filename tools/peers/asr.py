"""Speech recognition: edgert vs faster-whisper (CTranslate2) on the same Whisper tiny.en model.bin.

Both transcribe the same 16 kHz samples (beckett.wav from `useful-moonshine-onnx`, repeated
to 10 s and 30 s), greedy by default, temperature 0, no VAD filter, same thread count, each in
its own child process. The figure is the median end-to-end latency (features, encoder, decoder)
of ``--repeats`` runs after one warm-up; the ratio is faster-whisper's latency over edgert's
(above 1: edgert faster; the goal is edgert <= 0.8x faster-whisper's latency, a ratio >= 1.25).

With ``--background N`` both engines transcribe again beside N busy processes: edgert with its
default thread count (the cores it finds free), faster-whisper with ``--threads`` as before.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from peers import Row

NAME = "asr"
HELP = "Whisper tiny.en transcription against faster-whisper (CTranslate2)"
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: Any) -> None:
    """This section's options."""
    parser.add_argument("--asr-seconds", type=float, nargs="+", default=[10.0, 30.0], help="audio lengths")
    parser.add_argument("--asr-beam", type=int, default=1, help="beam size for both engines")
    parser.add_argument("--asr-artifact", type=Path, default=None, help="a compiled whisper-tiny.en (default: compile)")


def _audio(seconds: float) -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from edgert.runtime.audio import read_wav

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.origin is not None, "pip install --no-deps useful-moonshine-onnx"
    speech = read_wav(Path(spec.origin).parent / "assets" / "beckett.wav").samples
    reps = int(np.ceil(seconds * 16000 / len(speech)))
    return np.tile(speech, reps)[: int(seconds * 16000)]


def _worker(kind: str, path: str, threads: int, seconds: float, beam: int, repeats: int, out: Any) -> None:
    sys.path.insert(0, str(ROOT))
    samples = _audio(seconds)
    if kind == "edgert":
        from edgert.families.whisper.transcriber import Transcriber

        tr = Transcriber(path, threads=threads or None)  # 0: the runtime's default, the free cores

        def run() -> str:
            return tr.transcribe(samples, beam_size=beam).text
    else:
        from faster_whisper import WhisperModel

        model = WhisperModel(path, device="cpu", compute_type="float32", cpu_threads=threads)

        def run() -> str:
            segments, _ = model.transcribe(samples, beam_size=beam, temperature=0.0, vad_filter=False, language="en")
            return "".join(s.text for s in segments).strip()

    text = run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    out.put({"median": statistics.median(times), "text": text})


def _measure(kind: str, path: str, args: Any, seconds: float, threads: int | None = None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    threads = args.threads if threads is None else threads
    proc = ctx.Process(target=_worker, args=(kind, path, threads, seconds, args.asr_beam, args.repeats, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception as exc:  # queue.Empty: still working, unless the child died
            if not proc.is_alive():
                raise RuntimeError(f"{kind} worker exited with code {proc.exitcode}") from exc
    proc.join()
    return result


def run(args: Any) -> list[Row]:
    """Median end-to-end transcription latency of both engines for each audio length."""
    sys.path.insert(0, str(ROOT))
    from edgert.families.compile import compile_model
    from edgert.recipes import load_recipe

    model_dir = load_recipe("whisper-tiny.en").source_path().parent
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.asr_artifact
        if artifact is None:
            artifact = Path(tmp) / "whisper-tiny.en.edgert"
            compile_model("whisper-tiny.en", target="host", output=artifact)
        rows = []
        for seconds in args.asr_seconds:
            ours = _measure("edgert", str(artifact), args, seconds)
            ref = _measure("faster-whisper", str(model_dir), args, seconds)
            rows.append(
                Row(
                    section=NAME,
                    case=f"tiny.en {seconds:g} s, beam {args.asr_beam}",
                    metric="end-to-end latency",
                    unit="s",
                    edgert=ours["median"],
                    peer=ref["median"],
                    peer_name="faster-whisper",
                    higher_is_better=False,
                    extra={"same_text": ours["text"] == ref["text"], "threads": args.threads},
                )
            )
            if getattr(args, "background", 0):
                rows.append(_contended(args, str(artifact), str(model_dir), seconds, ours, ref))
    return rows


def _contended(args: Any, artifact: str, model_dir: str, seconds: float, ours: dict, ref: dict) -> Row:
    """Both engines again beside ``--background`` busy processes (a phone is never idle)."""
    from edgert.profile.background import busy_processes

    with busy_processes(args.background):
        ours_b = _measure("edgert", artifact, args, seconds, threads=0)
    with busy_processes(args.background):
        ref_b = _measure("faster-whisper", model_dir, args, seconds)
    return Row(
        section=NAME,
        case=f"tiny.en {seconds:g} s, beam {args.asr_beam}",
        metric=f"end-to-end latency beside {args.background} busy processes",
        unit="s",
        edgert=ours_b["median"],
        peer=ref_b["median"],
        peer_name="faster-whisper",
        higher_is_better=False,
        extra={
            "edgert_threads": "default (the free cores)",
            "peer_threads": args.threads,
            "edgert_vs_quiet": round(ours["median"] / ours_b["median"], 2),  # speed, as the llm rows give it
            "peer_vs_quiet": round(ref["median"] / ref_b["median"], 2),
            "same_text": ours_b["text"] == ours["text"],
        },
    )
