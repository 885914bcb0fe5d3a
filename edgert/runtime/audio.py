"""Audio helpers for the codec runtime: WAV in and out, resampling, and quality measures."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from edgert.errors import EdgertError


class AudioFileError(EdgertError):
    """An audio file that cannot be read or written as asked."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file as mono float32 in [-1, 1] (channels averaged) and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        with wave.open(str(path), "rb") as wf:
            rate, channels, width, count = wf.getframerate(), wf.getnchannels(), wf.getsampwidth(), wf.getnframes()
            raw = wf.readframes(count)
    except (wave.Error, EOFError) as exc:
        raise AudioFileError(f"{path} is not a PCM WAV file: {exc}") from exc
    if width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise AudioFileError(f"{path}: {8 * width}-bit samples are not supported (8, 16 or 32-bit PCM)")
    if channels > 1:
        data = data[: len(data) // channels * channels].reshape(-1, channels).mean(axis=1)
    return np.ascontiguousarray(data, dtype=np.float32), rate


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """Write mono float audio as 16-bit PCM (clipped to [-1, 1])."""
    pcm = (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    try:
        with wave.open(str(path), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(int(rate))
            wf.writeframes(pcm.tobytes())
    except OSError as exc:
        raise AudioFileError(f"cannot write {path}: {exc.strerror or exc}") from exc


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` from ``rate`` to ``target`` Hz with libsoxr (the `soxr` package), high quality."""
    if rate == target:
        return np.asarray(audio, np.float32)
    try:
        import soxr
    except ImportError as exc:
        raise AudioFileError(
            f"the audio is at {rate} Hz and the codec takes {target} Hz; resampling needs the `soxr` "
            f"package (pip install soxr), or convert it first (sox in.wav -r {target} out.wav)"
        ) from exc
    return np.asarray(soxr.resample(np.asarray(audio, np.float32), rate, target, quality="HQ"), np.float32)


def si_snr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB (both signals made zero-mean, same length)."""
    n = min(len(estimate), len(reference))
    est = np.asarray(estimate[:n], np.float64) - np.mean(estimate[:n])
    ref = np.asarray(reference[:n], np.float64) - np.mean(reference[:n])
    target = np.dot(est, ref) / max(np.dot(ref, ref), 1e-12) * ref
    noise = est - target
    return float(10 * np.log10(max(np.dot(target, target), 1e-12) / max(np.dot(noise, noise), 1e-12)))


def mel_filterbank(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, ``(n_fft // 2 + 1, n_mels)`` float32.

    Written out (a dozen lines) so that the runtime and the quality measure need no audio library.
    """

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = 700.0 * (10 ** (np.linspace(0.0, to_mel(np.array(rate / 2)), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / np.maximum(center - lower, 1e-9)
    falling = (upper - freqs[None]) / np.maximum(upper - center, 1e-9)
    return np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32)


def log_mel(audio: np.ndarray, rate: int, n_fft: int = 1024, n_mels: int = 80) -> np.ndarray:
    """Natural-log mel spectrogram (Hann window, hop n_fft / 4), frames x mels."""
    x = np.asarray(audio, np.float64)
    hop = n_fft // 4
    x = np.pad(x, (n_fft // 2, n_fft // 2))
    count = 1 + (len(x) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, (count, n_fft), (x.strides[0] * hop, x.strides[0]))
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2
    return np.log(power @ mel_filterbank(n_fft, n_mels, rate) + 1e-5)


def mel_distance(estimate: np.ndarray, reference: np.ndarray, rate: int) -> float:
    """Mean absolute difference of the log-mel spectrograms (nats; 0 is identical)."""
    n = min(len(estimate), len(reference))
    return float(np.mean(np.abs(log_mel(estimate[:n], rate) - log_mel(reference[:n], rate))))
