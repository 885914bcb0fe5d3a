"""Streaming speech recognition: audio in chunks, voice-activity gated, partial and final text.

Chunks (0.5–1 s, as from a microphone) go through silero-vad (`VoiceActivity`). While speech
lasts, the utterance so far is re-decoded every ``partial_every`` chunks that brought new speech
(a chunk of silence alone does not re-run the encoder); the words two consecutive hypotheses
agree on are committed (the local-agreement policy) and never change again. When the VAD hears
``min_silence`` of silence, or the utterance fills the encoder window (30 s unless built with
`--audio-ctx`), it gets its final text: the last hypothesis when that one already heard all of the
speech and its padding (no encoder run at all), else one more decode of the whole utterance (which may revise
uncommitted and, rarely, committed words). Each final carries the latency from the end of
speech to that text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.families.whisper.transcriber import Transcriber
from edgert.runtime.vad import CHUNK, VoiceActivity


@dataclass
class Event:
    """What the stream says: ``partial`` (may change), ``commit`` (stable words), ``final`` (an utterance)."""

    kind: str
    text: str
    start: float  # seconds into the stream
    end: float
    latency: float | None = None  # final only: seconds from the end of speech to this text

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON lines)."""
        return asdict(self)


@dataclass
class StreamStats:
    """Per-stream figures: utterance latencies and the real-time factor."""

    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    decodes: int = 0  # encoder + decoder runs
    reused_finals: int = 0  # finals taken from the last hypothesis without decoding again
    latencies: list[float] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float:
        """Compute time (VAD and decoding, not waiting for audio) over audio duration."""
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON output)."""
        return {**asdict(self), "real_time_factor": self.real_time_factor}


def _agreed_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class StreamingTranscriber:
    """Feed chunks with `feed`, get `Event`s back; `flush` at the end of the stream."""

    def __init__(
        self,
        transcriber: Transcriber,
        vad: VoiceActivity,
        threshold: float = 0.5,
        min_silence: float = 0.5,
        speech_pad: float = 0.2,
        min_speech: float = 0.25,
        partial_every: int = 1,
    ):
        if partial_every < 1:
            raise ValueError(f"partial_every must be at least 1 (got {partial_every})")
        self.tr, self.vad = transcriber, vad
        self.partial_every = partial_every
        self.rate = transcriber.sample_rate
        self.threshold, self.neg_threshold = threshold, max(threshold - 0.15, 0.01)
        self.min_silence = int(min_silence * self.rate)
        self.pad = int(speech_pad * self.rate)
        self.min_speech = int(min_speech * self.rate)
        self.max_utterance = transcriber.n_frames * transcriber.config["hop_length"] - self.pad
        self.stats = StreamStats()
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self.vad.reset()
        self.audio = np.zeros(0, np.float32)
        self._vad_pos = 0  # samples already seen by the VAD
        self._speech_start: int | None = None
        self._last_speech = 0  # end of the last chunk the VAD called speech (samples)
        self._last_speech_wall = 0.0  # when that chunk was fed (seconds, perf_counter)
        self._previous: list[int] = []
        self._committed: list[int] = []
        self._chunks_since_partial = 0
        self._last: tuple[int, int, list[int]] | None = None  # (start, end, tokens) of the last decode

    def _decode(self, start: int, end: int) -> list[int]:
        if self._last is not None and self._last[:2] == (start, end):
            return self._last[2]  # the audio has not grown: same hypothesis
        samples = self.audio[start:end]
        window = self.tr.features(samples)
        cross = self.tr.encode(window)
        # The last hypothesis of this utterance heard most of this audio: drafts for --speculative lookup.
        earlier = self._last[2] if self._last is not None and self._last[0] == start else ()
        hyp, _ = self.tr.decode_window(cross, (), beam_size=1, timestamps=False, reference=earlier)
        self.stats.decodes += 1
        self._last = (start, end, hyp.tokens)
        return hyp.tokens

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Add 16 kHz samples; return the events they cause."""
        started = time.perf_counter()
        self.audio = np.concatenate([self.audio, np.asarray(samples, np.float32).reshape(-1)])
        self.stats.audio_seconds = len(self.audio) / self.rate
        events: list[Event] = []
        while self._vad_pos + CHUNK <= len(self.audio):
            p = self.vad(self.audio[self._vad_pos : self._vad_pos + CHUNK])
            self._vad_pos += CHUNK
            if p >= self.threshold:
                if self._speech_start is None:
                    self._speech_start = max(0, self._vad_pos - CHUNK - self.pad)
                self._last_speech, self._last_speech_wall = self._vad_pos, started
            elif self._speech_start is not None and p < self.neg_threshold:
                if self._vad_pos - self._last_speech >= self.min_silence:
                    events += self._finish(min(len(self.audio), self._last_speech + self.pad))
            if self._speech_start is not None and self._vad_pos - self._speech_start >= self.max_utterance:
                self._last_speech_wall = started
                events += self._finish(self._vad_pos)
        if self._speech_start is not None and self._vad_pos - self._speech_start >= self.min_speech:
            self._chunks_since_partial += 1
            heard = (
                self._last is not None and self._last[0] == self._speech_start and self._last[1] >= self._last_speech
            )
            # A chunk ending in less silence than the pad may be the end of the utterance: a partial now
            # could not serve as its final (that needs the pad heard), so it would cost one decode more
            # between the end of speech and the final text.
            ending = 0 < self._vad_pos - self._last_speech < self.pad
            if not heard and not ending and self._chunks_since_partial >= self.partial_every:
                events += self._partial()
        self.stats.compute_seconds += time.perf_counter() - started
        return events

    def _partial(self) -> list[Event]:
        self._chunks_since_partial = 0
        tokens = self._decode(self._speech_start or 0, self._vad_pos)
        agreed = _agreed_prefix(self._previous, tokens)
        events = []
        if agreed > len(self._committed):
            new = tokens[len(self._committed) : agreed]
            self._committed = tokens[:agreed]
            events.append(Event("commit", self.tr.text_of(new), *self._span(self._vad_pos)))
        self._previous = tokens
        # Committed tokens stay as they were; only the tail after them follows the new hypothesis.
        shown = self._committed + tokens[len(self._committed) :]
        events.append(Event("partial", self.tr.text_of(shown), *self._span(self._vad_pos)))
        return events

    def _span(self, end: int) -> tuple[float, float]:
        return (self._speech_start or 0) / self.rate, end / self.rate

    def _finish(self, end: int) -> list[Event]:
        start, last = self._speech_start or 0, self._last
        if last is not None and last[0] == start and last[1] >= end:
            # The last hypothesis heard the whole utterance (what followed `end` is silence).
            tokens = last[2]
            self.stats.reused_finals += 1
        else:
            tokens = self._decode(start, end)
        latency = time.perf_counter() - self._last_speech_wall
        self.stats.latencies.append(latency)
        event = Event("final", self.tr.text_of(tokens).strip(), *self._span(end), latency=latency)
        self._speech_start, self._previous, self._committed, self._last = None, [], [], None
        self._chunks_since_partial = 0
        return [event]

    def flush(self) -> list[Event]:
        """End of stream: finish an utterance still open."""
        started = time.perf_counter()
        events = []
        if self._speech_start is not None:
            events = self._finish(len(self.audio))
        self.stats.compute_seconds += time.perf_counter() - started
        return events


def stream_file(
    streamer: StreamingTranscriber, samples: np.ndarray, chunk_seconds: float = 1.0, realtime: bool = False
) -> Iterator[Event]:
    """Feed ``samples`` chunk by chunk (at the audio's own pace when ``realtime``), yielding events."""
    if not 0.1 <= chunk_seconds <= 5.0:
        raise ValueError(f"chunk length must be between 0.1 and 5 s (got {chunk_seconds})")
    step = int(chunk_seconds * streamer.rate)
    t0 = time.perf_counter()
    for i in range(0, len(samples), step):
        if realtime:  # the chunk is only "recorded" once its last sample's time has come
            wait = t0 + min(i + step, len(samples)) / streamer.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        yield from streamer.feed(samples[i : i + step])
    yield from streamer.flush()


def silero_vad_artifact(log: Any = None) -> Path:
    """silero-vad (from the `silero-vad` package) compiled for this host once, into edgert's cache; the
    VAD `edgert transcribe --stream` uses unless given one. ``log`` hears when it compiles."""
    import importlib.util

    from edgert.errors import EdgertError
    from edgert.families.compile import compile_model
    from edgert.paths import cache_dir

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise EdgertError("--stream needs silero-vad: pip install --no-deps silero-vad, or pass --vad ARTIFACT")
    onnx = Path(spec.origin).parent / "data" / "silero_vad_openvino_16k.onnx"
    out = cache_dir() / "vad" / "silero_vad_openvino_16k.edgert"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        if log is not None:
            log("compiling silero-vad for this host (once) ...")
        compile_model(str(onnx), target="host", output=out)
    return out
