"""Whisper tiny.en compiled by edgert vs faster-whisper (CTranslate2) on the same model.bin.

Both engines get the same 16 kHz samples, greedy or beam 5, temperature 0, no VAD filter;
their transcripts must be identical, token for token. Speech: `assets/beckett.wav` from the
`useful-moonshine-onnx` package and sentences synthesized with espeak-ng.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from edgert.profile.audio_quality import word_error_rate, words
from edgert.runtime.audio import read_wav

pytestmark = [pytest.mark.slow, pytest.mark.reference]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Speech recognition runs on small devices without a network connection.",
    "The weather today is sunny with a light breeze from the west.",
]


def beckett_wav() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.origin is not None, "pip install --no-deps useful-moonshine-onnx"
    return Path(spec.origin).parent / "assets" / "beckett.wav"


def synthesize(text: str, path: Path) -> np.ndarray:
    """espeak-ng speech as 16 kHz float32 (resampled from espeak's 22.05 kHz by edgert's reader)."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "apt-get install espeak-ng (tools/setup.sh --test does)"
    subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), text], check=True, capture_output=True)
    return read_wav(path).samples


@pytest.fixture(scope="module")
def reference(whisper_model_dir: Path):
    faster_whisper = pytest.importorskip("faster_whisper")
    return faster_whisper.WhisperModel(str(whisper_model_dir), device="cpu", compute_type="float32", cpu_threads=2)


def reference_segments(model, samples: np.ndarray, beam: int) -> list:
    segments, _ = model.transcribe(samples, beam_size=beam, temperature=0.0, vad_filter=False, language="en")
    return list(segments)


@pytest.mark.parametrize("beam", [1, 5])
def test_beckett_identical_to_faster_whisper(transcriber, reference, beam: int) -> None:
    samples = read_wav(beckett_wav()).samples
    ours = transcriber.transcribe(samples, beam_size=beam)
    ref = reference_segments(reference, samples, beam)
    assert [s.tokens for s in ours.segments] == [s.tokens for s in ref]
    assert [(s.start, s.end) for s in ours.segments] == [(round(s.start, 3), round(s.end, 3)) for s in ref]
    assert words(ours.text) == words("Ever tried, ever failed. No matter, try again. Fail again. Fail better.")


def test_espeak_sentences_identical_to_faster_whisper(transcriber, reference, tmp_path: Path) -> None:
    print()
    total_ours, total_ref = [], []
    for i, sentence in enumerate(SENTENCES):
        samples = synthesize(sentence, tmp_path / f"s{i}.wav")
        ours = transcriber.transcribe(samples, beam_size=1)
        ref = reference_segments(reference, samples, 1)
        ref_text = "".join(s.text for s in ref).strip()
        ours_wer, ref_wer = word_error_rate(sentence, ours.text), word_error_rate(sentence, ref_text)
        print(f"  WER edgert {ours_wer:.3f}  faster-whisper {ref_wer:.3f}  | {ours.text}")
        assert [s.tokens for s in ours.segments] == [s.tokens for s in ref]
        total_ours.append(ours_wer)
        total_ref.append(ref_wer)
    print(f"  mean WER edgert {np.mean(total_ours):.3f}, faster-whisper {np.mean(total_ref):.3f}")
    assert np.mean(total_ours) == np.mean(total_ref) < 0.5  # robotic voice: tiny.en gets most words


def test_long_audio_seeks_window_by_window(transcriber, reference, tmp_path: Path) -> None:
    """Over 30 s: several windows, each starting at the last timestamp of the one before."""
    pause = np.zeros(8000, np.float32)
    parts = [np.concatenate([synthesize(s, tmp_path / f"l{i}.wav"), pause]) for i, s in enumerate(SENTENCES * 2)]
    samples = np.concatenate(parts)
    assert len(samples) / 16000 > 35
    ours = transcriber.transcribe(samples, beam_size=1)
    ref = reference_segments(reference, samples, 1)
    assert ours.stats.windows >= 2
    assert [s.tokens for s in ours.segments] == [s.tokens for s in ref]
    assert [(s.start, s.end) for s in ours.segments] == [(round(s.start, 3), round(s.end, 3)) for s in ref]
    assert word_error_rate(" ".join(SENTENCES * 2), ours.text) < 0.5


def test_short_window_build_gives_the_full_builds_words(
    whisper_short_artifact: Path, transcriber, tmp_path: Path
) -> None:
    """`--audio-ctx 300`: a 6 s encoder window recorded in the manifest; a 5.4 s sentence gets the full
    30 s build's words, and longer audio is cut and sought by the 6 s window."""
    from edgert.families.whisper.transcriber import Transcriber

    short = Transcriber(whisper_short_artifact)
    manifest = short.artifact.manifest
    assert manifest["audio"]["audio_ctx"] == 300 and manifest["audio"]["trained_audio_ctx"] == 1500
    assert manifest["audio"]["frames"] == 600 and short.window_seconds == 6.0
    assert manifest["entry_points"]["encode"]["inputs"][0]["shape"] == [1, 80, 600]
    assert manifest["kv_cache"]["cross"]["shape"][2] == 300 * 64
    assert transcriber.artifact.manifest["audio"]["frames"] == 3000  # the default build keeps 30 s
    samples = synthesize(SENTENCES[1], tmp_path / "stella.wav")
    assert 4.0 < len(samples) / 16000 < 6.0
    got, want = short.transcribe(samples), transcriber.transcribe(samples)
    assert got.stats.windows == want.stats.windows == 1
    assert words(got.text) == words(want.text) and "stella" in words(got.text)
    beckett = short.transcribe(read_wav(beckett_wav()))  # 10 s: two 6 s windows
    assert beckett.stats.windows == 2
    assert [s.start >= 6.0 for s in beckett.segments] == sorted(s.start >= 6.0 for s in beckett.segments)
    assert all(s.end <= 6.0 for s in beckett.segments if s.start < 6.0)  # no timestamp past the window
    assert beckett.segments[-1].start >= 6.0 and "fail better" in " ".join(words(beckett.text))


def test_audio_ctx_out_of_range_is_refused() -> None:
    from edgert.errors import UnsupportedModelError
    from edgert.families.whisper.model import WhisperConfig

    full = WhisperConfig(80, 384, 4, 4, 6, 51864, audio_ctx=1500, text_ctx=448, ffn_dim=1536)  # tiny.en
    assert full.with_window(None) is full and full.with_window(1500).mel_frames == 3000
    for bad in (0, 1501):
        with pytest.raises(UnsupportedModelError, match=f"audio context {bad} is outside 1..1500"):
            full.with_window(bad)


def test_cli_transcribe_text_and_json(whisper_artifact: Path, tmp_path: Path) -> None:
    proc = run_cli("transcribe", str(whisper_artifact), str(beckett_wav()), "--beam", "1")
    assert proc.returncode == 0, proc.stderr
    assert "[   0.00 ->" in proc.stdout and "Fail better." in proc.stdout
    assert "real-time factor" in " ".join(proc.stderr.split())
    # A stereo 44.1 kHz copy: resampled with soxr (and said so), same words.
    samples = read_wav(beckett_wav()).samples
    import soxr

    hi = soxr.resample(samples, 16000, 44100)
    stereo = np.stack([hi, hi], axis=1)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.round(np.clip(stereo, -1, 1) * 32767).astype("<i2").tobytes())
    proc = run_cli("transcribe", str(whisper_artifact), str(path), "--json", "--beam", "1")
    assert proc.returncode == 0, proc.stderr
    assert "resampled 44100 Hz -> 16000 Hz with soxr" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["resampled_from"] == 44100
    assert words(result["text"]) == words("Ever tried, ever failed. No matter, try again. Fail again. Fail better.")
    assert result["segments"][0]["start"] == 0.0 and result["stats"]["windows"] == 1


def test_cli_transcribe_refuses_bad_audio(whisper_artifact: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(32000))
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not really")
    cases = ((silent, "silent"), (tmp_path / "junk.wav", "not a readable WAV"), (tmp_path / "no.wav", "not found"))
    for path, message in cases:
        proc = run_cli("transcribe", str(whisper_artifact), str(path))
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def vad_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    assert spec is not None and spec.origin is not None, "pip install --no-deps silero-vad"
    onnx = Path(spec.origin).parent / "data" / "silero_vad_openvino_16k.onnx"
    out = tmp_path_factory.mktemp("artifacts") / "vad.edgert"
    proc = run_cli("compile", str(onnx), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_streaming_commits_and_finals(transcriber, vad_artifact: Path) -> None:
    """beckett.wav in 1 s chunks: VAD splits the pauses into utterances whose final texts give the words."""
    import edgert
    from edgert.families.whisper.streaming import StreamingTranscriber, stream_file
    from edgert.runtime.vad import VoiceActivity

    streamer = StreamingTranscriber(transcriber, VoiceActivity(edgert.load(vad_artifact)))
    events = list(stream_file(streamer, read_wav(beckett_wav()).samples, chunk_seconds=1.0))
    finals = [e for e in events if e.kind == "final"]
    assert len(finals) >= 3  # the speaker pauses between the short sentences
    spoken = " ".join(e.text for e in finals)
    assert words(spoken) == words("Ever tried, ever failed. No matter, try again. Fail again. Fail better.")
    assert all(e.latency is not None and e.latency > 0 for e in finals)
    assert streamer.stats.latencies == [e.latency for e in finals]
    assert streamer.stats.real_time_factor > 0 and streamer.stats.audio_seconds == pytest.approx(9.96, abs=0.01)
    # Utterances are in order, inside the audio, and separated by the silences the VAD heard.
    assert all(a.end <= b.start for a, b in itertools.pairwise(finals))
    assert all(0 <= e.start < e.end <= 9.97 for e in finals)
    # Committed words never change: every later partial of the utterance starts with them.
    committed = ""
    for e in events:
        if e.kind == "commit":
            committed += e.text
        elif e.kind == "partial":
            assert e.text.startswith(committed)
        else:
            committed = ""
    assert any(e.kind == "partial" for e in events) and any(e.kind == "commit" for e in events)
    # The encoder runs at most once per chunk that brought speech, plus once per final that the
    # last hypothesis had not already heard in full.
    partials = sum(e.kind == "partial" for e in events)
    assert streamer.stats.decodes == partials + len(finals) - streamer.stats.reused_finals
    # Partial hypotheses every third chunk: fewer encoder runs, the same final words.
    sparse = StreamingTranscriber(transcriber, VoiceActivity(edgert.load(vad_artifact)), partial_every=3)
    sparse_finals = [e for e in stream_file(sparse, read_wav(beckett_wav()).samples, 1.0) if e.kind == "final"]
    assert words(" ".join(e.text for e in sparse_finals)) == words(spoken)
    assert sparse.stats.decodes < streamer.stats.decodes
    with pytest.raises(ValueError, match="chunk length"):
        list(stream_file(streamer, np.zeros(16000, np.float32), chunk_seconds=10.0))
