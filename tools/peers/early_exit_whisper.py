"""The Whisper tiny.en half of the early-exit section: plain greedy decoding vs self-speculative and early exit.

Each case transcribes the same speech (``beckett.wav`` from ``useful-moonshine-onnx`` and
sentences spoken by espeak-ng) with greedy decoding. Speed is the decoder's alone: decoder
steps (emitted tokens and the end token) over the time spent in ``Transcriber.decode_window``
(`TranscriptionStats.decode_seconds`: the prompt's prefill and the decode loop, not the mel
features nor the encoder), median over ``--repeats``. Agreement is with the plain greedy
transcript: identical tokens (yes/no) and, for early exit, the fraction of the full decoder's
tokens matched at the same position.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peers import Row

NAME = "early_exit"
BASE = "full decoder"
SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "Speech recognition runs on small devices without a network connection.",
]
EXIT_POINT = "confidence:0.9"  # 1.0 agreement on espeak-ng speech (README, early-exit section)


def add_arguments(group: Any) -> None:
    """Options of the Whisper cases (added to the early-exit section's group)."""
    group.add_argument("--ee-whisper-artifact", type=Path, help="a whisper-tiny.en artifact (else compiled here once)")
    group.add_argument("--ee-sentences", type=int, default=2, help="espeak-ng sentences besides beckett.wav")


def speech(folder: Path, sentences: int) -> list[Path]:
    """WAV files to transcribe: beckett.wav where useful-moonshine-onnx is installed, and espeak-ng sentences."""
    files = []
    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is not None and spec.origin is not None:
        files.append(Path(spec.origin).parent / "assets" / "beckett.wav")
    espeak = shutil.which("espeak-ng")
    for i, text in enumerate(SENTENCES[:sentences] if espeak else []):
        path = folder / f"sentence{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), text], check=True, capture_output=True)
        files.append(path)
    if not files:
        raise SystemExit("no test speech: pip install --no-deps useful-moonshine-onnx, or apt-get install espeak-ng")
    return files


def _transcribe(transcriber: Any, audio: list[Any]) -> tuple[list[list[int]], float]:
    """Tokens of each transcript and the decoder's steps per second over all of them."""
    outputs, seconds, steps = [], 0.0, 0
    for samples in audio:
        result = transcriber.transcribe(samples)
        outputs.append([t for s in result.segments for t in s.tokens])
        seconds += result.stats.decode_seconds
        steps += result.stats.decoder_steps
    return outputs, steps / seconds if seconds else 0.0


def _agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of the reference tokens that the outputs match at the same position."""
    same = sum(sum(a == b for a, b in zip(o, r, strict=False)) for o, r in zip(outputs, reference, strict=True))
    return same / max(sum(len(r) for r in reference), 1)


def whisper_rows(args: Any) -> list[Row]:
    """Full greedy decoder, self-speculative ``self:k=<ee-k>`` and early exit at `EXIT_POINT` on Whisper tiny.en."""
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.audio import read_wav

    folder = Path(tempfile.mkdtemp(prefix="edgert-ee-whisper-"))
    try:
        art = args.ee_whisper_artifact
        if art is None:
            from edgert.families.compile import compile_model

            print("compiling whisper-tiny.en (minutes)", file=sys.stderr, flush=True)
            art = compile_model("whisper-tiny.en", output=folder / "whisper.edgert", threads=args.threads).path
        audio = [read_wav(p).samples for p in speech(folder, args.ee_sentences)]
        full = Transcriber(art, threads=args.threads)
        full_runs = [_transcribe(full, audio) for _ in range(args.repeats)]
        reference, base = full_runs[0][0], statistics.median(r[1] for r in full_runs)
        rows = []
        spec = f"self:k={args.ee_k}"
        spec_t = Transcriber(full.artifact, threads=args.threads, speculative=spec)
        runs = [_transcribe(spec_t, audio) for _ in range(args.repeats)]
        rows.append(
            Row(
                NAME,
                f"whisper speculative {spec}",
                "decode",
                "tok/s",
                statistics.median(r[1] for r in runs),
                base,
                BASE,
                extra={
                    "identical": all(r[0] == reference for r in runs),
                    "acceptance": round(spec_t.speculative.stats.acceptance_rate, 3),
                },
            )
        )
        exit_t = Transcriber(full.artifact, threads=args.threads, exit=EXIT_POINT)
        runs = [_transcribe(exit_t, audio) for _ in range(args.repeats)]
        rows.append(
            Row(
                NAME,
                f"whisper exit {EXIT_POINT}",
                "decode",
                "tok/s",
                statistics.median(r[1] for r in runs),
                base,
                BASE,
                extra={
                    "identical": runs[0][0] == reference,
                    "agreement": round(_agreement(runs[0][0], reference), 3),
                    "mean_layers": round(exit_t.early_exit.mean_layers, 2),
                },
            )
        )
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)
