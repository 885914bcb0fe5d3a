"""Audio in: WAV files to 16 kHz mono float32, and Whisper's log-mel spectrogram, with numpy.

Reading uses the standard library's `wave` for PCM and a small RIFF walk for IEEE-float WAV
(which `wave` refuses). Other sample rates are resampled with `soxr` (a maintained binding
of the SoX resampler), and the caller is told so.
"""

from __future__ import annotations

import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgert.errors import EdgertError, brief


class AudioError(EdgertError):
    """An audio input is missing, unreadable, empty, silent or not finite."""


# Rates real recordings use; outside them a header is garbled or hostile (a 32 KB file declaring
# 1 Hz would resample into gigabytes).
MIN_RATE, MAX_RATE = 1_000, 384_000
MAX_SECONDS = 2 * 3600  # of decoded audio: 460 MB of float32 at Whisper's 16 kHz
MAX_CHANNELS = 64


def check_rate(rate: int, frames: int, what: str) -> None:
    """Refuse a sample rate outside `MIN_RATE`..`MAX_RATE` and audio longer than `MAX_SECONDS`."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{what} declares a sample rate of {rate} Hz, outside {MIN_RATE}..{MAX_RATE} Hz")
    if frames / rate > MAX_SECONDS:
        raise AudioError(f"{what} lasts {frames / rate:.0f} s, more than the {MAX_SECONDS} s edgert decodes")


@dataclass
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate``, and what was done to get them."""

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return len(self.samples) / self.sample_rate

    @property
    def resampled(self) -> bool:
        """True if the file's rate differed and the samples were resampled."""
        return self.source_rate != self.sample_rate


def _read_float_wav(path: Path) -> tuple[np.ndarray, int, int]:
    """IEEE-float (format 3) or extensible-float WAV: returns (frames x channels, rate, channels)."""
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path} is not a WAV file (no RIFF/WAVE header)")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunk = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise AudioError(f"{path}: WAV file without a fmt or data chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if tag != 3 or bits not in (32, 64) or not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits, {channels} channels)")
    dtype = "<f4" if bits == 32 else "<f8"
    usable = len(body) - len(body) % (channels * bits // 8)
    check_rate(rate, usable // (channels * bits // 8), str(path))
    return np.frombuffer(body[:usable], dtype=dtype).reshape(-1, channels).astype(np.float32), rate, channels


def read_wav(path: str | Path, sample_rate: int = 16000) -> Audio:
    """Read a WAV file as mono float32 at ``sample_rate`` (mixing down, resampling as needed).

    Empty, silent and non-finite audio is refused: there is nothing to recognize in it.
    """
    frames, rate = read_frames(path)
    return prepare(frames, rate, sample_rate, str(path))


def load_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A WAV file as mono float32 at its own rate, and that rate, without further checks."""
    frames, rate = read_frames(path)
    mono = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def read_frames(path: str | Path) -> tuple[np.ndarray, int]:
    """The samples of a PCM or float WAV file as float32 [frames, channels], and the sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if not 1 <= channels <= MAX_CHANNELS:
                raise AudioError(f"{path}: a WAV file of {channels} channels")
            if not 1 <= width <= 4:
                raise AudioError(f"{path}: unsupported sample width {width} bytes")
            check_rate(rate, 0, str(path))
            raw = w.readframes(min(n, MAX_SECONDS * rate + 1))
        raw = raw[: len(raw) - len(raw) % (width * channels)]  # a last frame cut short
        check_rate(rate, len(raw) // (width * channels), str(path))
        if width == 1:
            frames = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 2:
            frames = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        elif width == 3:
            b = np.frombuffer(raw[: len(raw) - len(raw) % 3], np.uint8).reshape(-1, 3).astype(np.int32)
            frames = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
        elif width == 4:
            frames = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
        else:
            raise AudioError(f"{path}: unsupported sample width {width} bytes")
        frames = frames[: len(frames) - len(frames) % channels].reshape(-1, channels)
    except wave.Error as exc:
        if "unknown format: 3" in str(exc) or "unknown format: 65534" in str(exc):
            frames, rate, channels = _read_float_wav(path)
        else:
            raise AudioError(f"{path} is not a readable WAV file ({brief(exc)})") from exc
    except EOFError as exc:
        raise AudioError(f"{path} is not a readable WAV file (truncated header)") from exc
    except (RuntimeError, struct.error, ValueError, OverflowError) as exc:
        # `wave` raises a bare RuntimeError for a chunk size past the end of the file.
        detail = str(exc) or "a chunk runs past the end of the file"
        raise AudioError(f"{path} is not a readable WAV file ({detail})") from None
    return frames, rate


def prepare(frames: np.ndarray, rate: int, sample_rate: int = 16000, what: str = "audio") -> Audio:
    """Samples [n] or [n, channels] at ``rate`` -> checked mono float32 at ``sample_rate``."""
    frames = np.asarray(frames, dtype=np.float32)
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    mono = frames if frames.ndim == 1 else frames.mean(axis=1)
    if mono.size == 0:
        raise AudioError(f"{what} holds no samples")
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{what} holds NaN or infinite samples")
    check_rate(rate, len(mono), what)
    if float(np.max(np.abs(mono))) < 1e-6:
        raise AudioError(f"{what} is silent (every sample is zero)")
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), sample_rate, rate, channels)


def log_mel(samples: np.ndarray, filters: np.ndarray, n_fft: int = 400, hop: int = 160, pad: int = 160) -> np.ndarray:
    """Whisper's log-mel spectrogram [n_mels, frames]: |STFT|² of a Hann window, mel, log10,
    clamped to 8 decades below the peak, scaled to about [-1, 1].

    Same arithmetic as OpenAI's and faster-whisper's front ends (centered frames with reflect
    padding, the last STFT frame dropped) so the encoder sees the features it was trained on.
    """
    x = np.pad(samples.astype(np.float32), (0, pad)) if pad else samples.astype(np.float32)
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + (len(x) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, (n_frames, n_fft), (hop * x.strides[0], x.strides[0]))
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    spec = np.fft.rfft(frames * window, n=n_fft, axis=-1).astype(np.complex64)
    power = np.abs(spec[:-1].T) ** 2
    mel = filters @ power
    log_spec = np.log10(np.clip(mel, 1e-10, None))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


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
        raise AudioError(f"cannot write {path}: {exc.strerror or exc}") from exc


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` from ``rate`` to ``target`` Hz with libsoxr (the `soxr` package), high quality."""
    if rate == target:
        return np.asarray(audio, np.float32)
    try:
        import soxr
    except ImportError as exc:
        raise AudioError(
            f"the audio is at {rate} Hz and the model takes {target} Hz; resampling needs the `soxr` "
            f"package (pip install soxr), or convert it first (sox in.wav -r {target} out.wav)"
        ) from exc
    return np.asarray(soxr.resample(np.asarray(audio, np.float32), rate, target, quality="HQ"), np.float32)
