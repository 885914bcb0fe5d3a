"""Audio in: WAV reading, mixing, resampling, bad files, and the log-mel front end vs faster-whisper's."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from edgert.families.whisper.assets import mel_filters
from edgert.runtime.audio import AudioError, log_mel, read_wav


def _write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    frames = samples if samples.ndim == 2 else samples[:, None]
    scale = {1: 127, 2: 32767, 4: 2147483647}[width]
    ints = np.round(frames * scale).astype({1: np.int16, 2: "<i2", 4: "<i4"}[width])
    if width == 1:
        ints = (ints + 128).astype(np.uint8)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())
    return path


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_pcm_widths_read_back(tmp_path: Path, width: int) -> None:
    tone = _tone(0.5, 16000)
    audio = read_wav(_write_wav(tmp_path / "a.wav", tone, 16000, width))
    assert audio.sample_rate == 16000 and not audio.resampled
    assert np.max(np.abs(audio.samples - tone)) < (2.0 / 127 if width == 1 else 1e-4)


def test_stereo_is_mixed_down_and_other_rates_resampled(tmp_path: Path) -> None:
    left, right = _tone(1.0, 44100, 300.0), _tone(1.0, 44100, 300.0) * 0.5
    audio = read_wav(_write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), 44100))
    assert audio.source_channels == 2 and audio.source_rate == 44100 and audio.resampled
    assert abs(len(audio.samples) - 16000) <= 1
    # The mean of a 0.5 and a 0.25 amplitude 300 Hz tone survives the mix and the resampling.
    spectrum = np.abs(np.fft.rfft(audio.samples[:16000]))
    assert abs(int(np.argmax(spectrum)) - 300) <= 1
    assert 0.37 < np.max(np.abs(audio.samples[1000:-1000])) < 0.38


def test_float_wav(tmp_path: Path) -> None:
    import struct

    tone = _tone(0.25, 16000)
    data = tone.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path = tmp_path / "f.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert np.array_equal(read_wav(path).samples, tone)


def test_bad_audio_gets_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not found"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all")
    with pytest.raises(AudioError, match="not a readable WAV"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(AudioError, match="no samples"):
        read_wav(_write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000))
    with pytest.raises(AudioError, match="silent"):
        read_wav(_write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000))
    nan = np.full(1000, np.nan, "<f4").tobytes()
    import struct

    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(nan)) + nan
    (tmp_path / "nan.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(AudioError, match="NaN"):
        read_wav(tmp_path / "nan.wav")


def test_log_mel_matches_faster_whisper() -> None:
    fw = pytest.importorskip("faster_whisper.feature_extractor")
    extractor = fw.FeatureExtractor()
    assert np.allclose(mel_filters(), extractor.mel_filters, atol=1e-7)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000 * 3) + _tone(3.0, 16000)).astype(np.float32)
    ours = log_mel(audio, mel_filters())
    ref = extractor(audio)
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) < 1e-5
