"""How close restored audio is to the original: SI-SNR and a log-mel distance (numpy only)."""

from __future__ import annotations

import numpy as np


def si_snr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB (both signals made zero-mean, same length)."""
    n = min(len(estimate), len(reference))
    est = np.asarray(estimate[:n], np.float64) - np.mean(estimate[:n])
    ref = np.asarray(reference[:n], np.float64) - np.mean(reference[:n])
    target = np.dot(est, ref) / max(np.dot(ref, ref), 1e-12) * ref
    noise = est - target
    return float(10 * np.log10(max(np.dot(target, target), 1e-12) / max(np.dot(noise, noise), 1e-12)))


def delay_of(estimate: np.ndarray, reference: np.ndarray, max_lag: int) -> int:
    """The lag (0..max_lag samples) by which ``estimate`` best follows ``reference`` (a codec's delay)."""
    n = min(len(estimate) - max_lag, len(reference) - max_lag)
    if n <= 0:
        return 0
    est, ref = np.asarray(estimate, np.float64), np.asarray(reference[:n], np.float64)
    return int(np.argmax([np.dot(est[lag : lag + n], ref) for lag in range(max_lag + 1)]))


def align(estimate: np.ndarray, reference: np.ndarray, max_lag: int) -> np.ndarray:
    """``estimate`` moved earlier by its delay (`delay_of`), zero-padded back to ``reference``'s length."""
    lag = delay_of(estimate, reference, max_lag)
    out = np.concatenate([np.asarray(estimate[lag:], np.float32), np.zeros(lag, np.float32)])
    return out[: len(reference)]


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


def words(text: str) -> list[str]:
    """Lower-case words of a transcript, punctuation dropped (hyphens split words)."""
    import re

    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's word count (0 is identical)."""
    r, h = words(reference), words(hypothesis)
    d = np.arange(len(h) + 1)
    for i in range(1, len(r) + 1):
        prev, d[0] = d.copy(), i
        for j in range(1, len(h) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
    return float(d[len(h)]) / max(len(r), 1)


def against_input(result: np.ndarray, signal: np.ndarray, rate: int) -> dict[str, float | int]:
    """SI-SNR (dB) and mel distance of a codec round trip against its input, after the codec's delay (found
    up to 20 ms; ``lag`` in samples)."""
    lag = delay_of(result, signal, rate // 50)
    out, ref = result[lag:], signal[: len(signal) - lag]
    return {"si_snr": si_snr(out, ref), "mel_distance": mel_distance(out, ref, rate), "lag": lag}
