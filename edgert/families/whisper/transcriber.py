"""Speech to text with a compiled Whisper artifact: `Transcriber`.

Long audio is cut into encoder windows (30 s, or what the build's ``--audio-ctx`` chose, read
from the manifest); after each window the next one starts at the last
timestamp the model emitted (Whisper's seek-by-timestamp), and the text so far conditions the
next window (``<|startofprev|>`` prompt). Decoding applies Whisper's rules: suppressed
non-speech tokens, no blank or end token first, timestamps in pairs and non-decreasing, the
first timestamp within 1 s, and a timestamp forced when their total probability beats any
text token. These mirror faster-whisper / CTranslate2 with ``temperature=0`` and no VAD filter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact, open_artifact
from edgert.errors import EdgertError
from edgert.runtime.audio import Audio, AudioError, log_mel, prepare, read_wav
from edgert.runtime.seq2seq import Hypothesis, Seq2Seq, log_softmax
from edgert.runtime.seq2seq_speculative import LookupSeq2Seq
from edgert.runtime.tokenizer import TextTokenizer

TIME_PRECISION = 0.02  # seconds per timestamp token
INPUT_STRIDE = 2  # mel frames per encoder position


@dataclass
class Segment:
    """A piece of the transcript between two timestamps."""

    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON output)."""
        return asdict(self)


@dataclass
class TranscriptionStats:
    """Timings of one transcription."""

    audio_seconds: float = 0.0
    windows: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    features_seconds: float = 0.0
    total_seconds: float = 0.0
    decoder_steps: int = 0

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio duration (below 1: faster than real time)."""
        return self.total_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON output)."""
        return {**asdict(self), "real_time_factor": self.real_time_factor}


@dataclass
class Transcript:
    """Segments, their joined text and timings."""

    segments: list[Segment]
    stats: TranscriptionStats = field(default_factory=TranscriptionStats)
    resampled_from: int | None = None

    @property
    def text(self) -> str:
        """The whole transcript."""
        return "".join(s.text for s in self.segments).strip()


class WhisperRules:
    """Whisper's logits rules for one window, in CTranslate2's order (a `LogitsProcessor`)."""

    def __init__(
        self,
        config: dict[str, Any],
        timestamps: bool = True,
        max_initial_timestamp: float = 1.0,
        window_seconds: float | None = None,
    ):
        self.suppress = np.array(config["suppress_tokens"], np.int64)
        self.suppress_blank = np.array(config["suppress_blank"], np.int64)
        self.eot, self.no_timestamps = config["eot"], config["no_timestamps"]
        self.ts_begin = config["timestamp_begin"]
        self.max_initial = self.ts_begin + round(max_initial_timestamp / TIME_PRECISION)
        # A shortened window (--audio-ctx) has no audio past its end: no timestamp may point there.
        # For the full 30 s window this is the last timestamp token, so nothing changes.
        self.max_timestamp = None if window_seconds is None else self.ts_begin + round(window_seconds / TIME_PRECISION)
        self.timestamps = timestamps

    def __call__(self, step: int, logits: np.ndarray, seqs: Sequence[Sequence[int]]) -> None:
        logits[:, self.suppress] = -np.inf
        if step == 0:
            logits[:, self.suppress_blank] = -np.inf
        if not self.timestamps:
            return
        tb = self.ts_begin
        if self.max_timestamp is not None:
            logits[:, self.max_timestamp + 1 :] = -np.inf
        check = []
        for row, seq in enumerate(seqs):
            logits[row, self.no_timestamps] = -np.inf
            if step == 0:
                logits[row, :tb] = -np.inf
                logits[row, self.max_initial + 1 :] = -np.inf
                continue
            last = seq[-1]
            if last >= tb:
                penultimate = seq[-2] if len(seq) >= 2 else last
                if penultimate >= tb:  # a pair is complete: text must follow
                    logits[row, tb:] = -np.inf
                else:  # an opening timestamp: the next is its closing one, or the end
                    logits[row, : self.eot] = -np.inf
                    logits[row, tb:last] = -np.inf
                    check.append(row)
            else:
                check.append(row)
                for t in reversed(seq):  # timestamps never go backwards
                    if t >= tb:
                        logits[row, tb : t + 1] = -np.inf
                        break
        for row in check:
            # Whisper compares log-probabilities, log sum p(timestamps) > max log p(text); both share
            # the softmax's normalizer, so the raw logits give the same answer without a log-softmax
            # over the whole vocabulary (the decoder computes that once per step, after the rules).
            text_max = np.max(logits[row, :tb])
            ts = logits[row, tb:]
            ts_max = np.max(ts)
            ts_total = ts_max + np.log(np.sum(np.exp(ts - ts_max))) if np.isfinite(ts_max) else -np.inf
            if ts_total > text_max:
                logits[row, :tb] = -np.inf


class Transcriber:
    """A Whisper artifact loaded for transcription: ``Transcriber("w.edgert").transcribe("a.wav").text``."""

    def __init__(
        self,
        artifact: str | Path | Artifact,
        threads: int | None = None,
        speculative: str | None = None,
        exit: str | None = None,
    ):
        """``speculative``: ``self:k=4[,skip=...|,exit=N]`` drafts greedy decoding with the decoder's own layers,
        ``lookup[:k=6,ngram=3]`` with the previous window's text and the tokens so far (`LookupSeq2Seq`);
        ``exit``: an early-exit policy (``confidence:0.9``, ``static:3``, ...) for the decoder's greedy steps."""
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        if art.family != "whisper":
            raise AudioError(f"{art.path}: a '{art.family}' model cannot transcribe speech (need a Whisper artifact)")
        self.artifact = art
        self.model = Seq2Seq(art, threads)
        self.config = art.manifest["whisper"]
        audio = art.manifest["audio"]
        self.filters = np.ascontiguousarray(art.weights()[audio["mel_filters"]], dtype=np.float32)
        self.n_frames = int(audio["frames"])  # one encoder window in mel frames (3000 = 30 s unless --audio-ctx)
        self.sample_rate = int(self.config["sample_rate"])
        self.window_seconds = self.n_frames * self.config["hop_length"] / self.sample_rate
        self.tokenizer = TextTokenizer(art.read_text(art.manifest["tokenizer"]["file"]), {})
        self.speculative = None
        if speculative:
            from edgert.runtime.seq2seq_speculative import parse_seq2seq_speculative

            c = self.config
            self.speculative = parse_seq2seq_speculative(speculative, self.model, c["timestamp_begin"], c["eot"])
        self.early_exit = None
        if exit:
            if speculative:
                raise EdgertError("choose --speculative or --exit, not both")
            from edgert.runtime.exits import parse_exit_policy
            from edgert.runtime.seq2seq_speculative import EarlyExitSeq2Seq

            self.early_exit = EarlyExitSeq2Seq(self.model, parse_exit_policy(exit, self.model))

    @property
    def default_beam_size(self) -> int:
        """1 with speculative decoding or early exit (both greedy), else the model's default (5 for Whisper)."""
        if self.speculative is not None or self.early_exit is not None:
            return 1
        return int(self.artifact.manifest.get("defaults", {}).get("beam_size", 1))

    # -- pieces -------------------------------------------------------------------------
    def load_audio(self, audio: str | Path | np.ndarray | Audio, sample_rate: int | None = None) -> Audio:
        """A path, an `Audio`, or samples (at ``sample_rate``, default 16 kHz) -> checked 16 kHz mono."""
        if isinstance(audio, Audio):
            return audio
        if isinstance(audio, (str, Path)):
            return read_wav(audio, self.sample_rate)
        return prepare(np.asarray(audio), sample_rate or self.sample_rate, self.sample_rate)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel frames [n_mels, frames] of 16 kHz samples."""
        return log_mel(samples, self.filters, self.config["n_fft"], self.config["hop_length"])

    def encode(self, window: np.ndarray) -> Any:
        """Mel frames [n_mels, <= n_frames] -> the window's cross-attention K/V (zero-padded to the window)."""
        mel = np.zeros((1, window.shape[0], self.n_frames), np.float32)
        mel[0, :, : min(window.shape[1], self.n_frames)] = window[:, : self.n_frames]
        return self.model.encode(mel)

    def decode_window(
        self,
        cross: Any,
        previous: Sequence[int] = (),
        beam_size: int = 1,
        timestamps: bool = True,
        max_initial_timestamp: float = 1.0,
        reference: Sequence[int] = (),
    ) -> tuple[Hypothesis, float]:
        """Decode one encoded window; returns the hypothesis and the no-speech probability.

        ``reference``: tokens the window probably says again (the previous window's, or an earlier
        hypothesis of the same audio), drafts for ``--speculative lookup``; the output never depends on it.
        """
        c = self.config
        prompt: list[int] = []
        if previous:
            prompt = [c["sot_prev"], *list(previous)[-(self.model.max_length // 2 - 1) :]]
        prompt.append(c["sot"])
        if not timestamps:
            prompt.append(c["no_timestamps"])
        # CTranslate2 bounds the new tokens by half the context, and by what the prompt leaves.
        start = len(prompt) - 1
        max_new = min(self.model.max_length // 2, self.model.max_length - start)
        no_speech = [0.0]

        def first(logits: np.ndarray) -> None:
            no_speech[0] = float(np.exp(log_softmax(logits)[c["no_speech"]]))

        if beam_size > 1 and (self.speculative is not None or self.early_exit is not None):
            raise EdgertError("speculative decoding and early exit are greedy: transcribe with beam size 1")
        rules = [WhisperRules(c, timestamps, max_initial_timestamp, self.window_seconds)]
        if beam_size > 1:
            hyp = self.model.beam(cross, prompt, c["eot"], max_new, beam_size, processors=rules, on_first_logits=first)
        else:
            decoder = self.speculative or self.early_exit or self.model  # one greedy loop, its steps chosen here
            more = {"reference": reference} if isinstance(decoder, LookupSeq2Seq) else {}
            hyp = decoder.greedy(cross, prompt, c["eot"], max_new, processors=rules, on_first_logits=first, **more)
        return hyp, no_speech[0]

    def text_of(self, tokens: Sequence[int]) -> str:
        """Text of the tokens below the special ones (timestamps dropped)."""
        return self.tokenizer.decode([t for t in tokens if t < self.config["eot"]])

    # -- the long-audio loop ------------------------------------------------------------
    def segments(
        self,
        audio: str | Path | np.ndarray | Audio,
        beam_size: int = 1,
        condition_on_previous_text: bool = True,
        no_speech_threshold: float | None = 0.6,
        log_prob_threshold: float | None = -1.0,
        stats: TranscriptionStats | None = None,
    ) -> Iterator[Segment]:
        """Transcribe window by window, yielding segments as they are decoded."""
        if beam_size < 1:
            raise ValueError(f"beam size must be at least 1 (got {beam_size})")
        stats = stats if stats is not None else TranscriptionStats()
        started = time.perf_counter()
        audio = self.load_audio(audio)
        stats.audio_seconds = audio.seconds
        t = time.perf_counter()
        features = self.features(audio.samples)
        stats.features_seconds += time.perf_counter() - t
        content = features.shape[1] - 1
        seek, all_tokens, last_window = 0, [], []
        while seek < content:
            offset = seek * self.config["hop_length"] / self.sample_rate
            size = min(self.n_frames, content - seek)
            t = time.perf_counter()
            cross = self.encode(features[:, seek : seek + size])
            stats.encode_seconds += time.perf_counter() - t
            t = time.perf_counter()
            previous = all_tokens if condition_on_previous_text else []
            # What the previous window heard past this window's start (``--speculative lookup``'s drafts;
            # its finished segments are in the prompt already).
            hyp, no_speech = self.decode_window(cross, previous, beam_size, reference=last_window)
            last_window = []
            stats.decode_seconds += time.perf_counter() - t
            stats.windows += 1
            stats.decoder_steps += len(hyp.tokens) + 1
            avg_logprob = hyp.score / (len(hyp.tokens) + 1)
            if no_speech_threshold is not None and no_speech > no_speech_threshold:
                if log_prob_threshold is None or avg_logprob <= log_prob_threshold:
                    seek += size  # silence: skip the window
                    continue
            pieces, seek = self._split(hyp.tokens, offset, size, seek)
            last_window = self._unfinished(hyp.tokens)
            for start, end, toks in pieces:
                text = self.text_of(toks)
                if start == end or not text.strip():
                    continue
                all_tokens.extend(toks)
                yield Segment(round(start, 3), round(end, 3), text, toks, avg_logprob, no_speech)
        stats.total_seconds = time.perf_counter() - started

    def _unfinished(self, tokens: list[int]) -> list[int]:
        """The tokens after a window's last finished segment (its start timestamp first), which the
        next window, starting at that segment's end, hears again; none when it starts after the window.

        Aligned so, the previous window drafts what the next one says first: the whole previous
        window laid out after the prompt drafted its own beginning there (on the bench's speech,
        a round rejected outright per window); its finished text is in the prompt for n-gram lookup.
        """
        tb = self.config["timestamp_begin"]
        if len(tokens) >= 2 and tokens[-2] < tb <= tokens[-1]:
            return []  # `_split`: the window ended on a finished segment and the next starts after it
        consecutive = [i for i in range(1, len(tokens)) if tokens[i] >= tb and tokens[i - 1] >= tb]
        return list(tokens[consecutive[-1] :]) if consecutive else []

    def _split(
        self, tokens: list[int], offset: float, size: int, seek: int
    ) -> tuple[list[tuple[float, float, list[int]]], int]:
        """Cut a window's tokens at consecutive timestamps; return the pieces and the next seek."""
        tb = self.config["timestamp_begin"]
        single_ending = len(tokens) >= 2 and tokens[-2] < tb <= tokens[-1]
        consecutive = [i for i in range(1, len(tokens)) if tokens[i] >= tb and tokens[i - 1] >= tb]
        pieces = []
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cut in slices:
                part = tokens[last:cut]
                start, end = (offset + (part[i] - tb) * TIME_PRECISION for i in (0, -1))
                pieces.append((start, end, part))
                last = cut
            if single_ending:
                seek += size
            else:
                seek += (tokens[last - 1] - tb) * INPUT_STRIDE
        else:
            duration = size * self.config["hop_length"] / self.sample_rate
            stamps = [t for t in tokens if t >= tb]
            if stamps and stamps[-1] != tb:
                duration = (stamps[-1] - tb) * TIME_PRECISION
            pieces.append((offset, offset + duration, tokens))
            seek += size
        return pieces, seek

    def transcribe(self, audio: str | Path | np.ndarray | Audio, beam_size: int = 1, **options: Any) -> Transcript:
        """The whole transcript of ``audio`` (a WAV path or 16 kHz samples)."""
        loaded = self.load_audio(audio)
        stats = TranscriptionStats()
        segments = list(self.segments(loaded, beam_size=beam_size, stats=stats, **options))
        return Transcript(segments, stats, loaded.source_rate if loaded.resampled else None)
