"""What a Whisper artifact carries besides weights: the mel filter bank and the decoding rules.

Both are computed here, at compile time, so the device runtime needs only numpy to turn audio
into log-mel frames and the token ids below to decode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgert.errors import ModelFileError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30


def mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = 80) -> np.ndarray:
    """Slaney-style mel filter bank [n_mels, n_fft // 2 + 1], the one Whisper was trained with.

    Same construction as librosa's ``filters.mel(htk=False, norm="slaney")`` (and
    faster-whisper's copy of it): linear below 1 kHz, logarithmic above, area-normalized.
    """
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    max_mel = 45.245640471924965  # hz_to_mel(8000) on the Slaney scale
    mels = np.linspace(0.0, max_mel, n_mels + 2)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs.reshape(-1, 1) - fftfreqs.reshape(1, -1)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2 : n_mels + 2] - freqs[:n_mels]))[:, None]
    return weights.astype(np.float32)


_SPECIALS = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "sot_prev": "<|startofprev|>",
    "sot_lm": "<|startoflm|>",
    "transcribe": "<|transcribe|>",
    "translate": "<|translate|>",
    "no_timestamps": "<|notimestamps|>",
}


def decoding_config(tokenizer_json: str, ct2_config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Special token ids and suppression lists, as faster-whisper derives them from the tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    ids: dict[str, Any] = {}
    for key, text in _SPECIALS.items():
        value = tok.token_to_id(text)
        if value is None:
            raise ModelFileError(f"the Whisper tokenizer lacks the special token {text}")
        ids[key] = value
    no_speech = tok.token_to_id("<|nospeech|>") or tok.token_to_id("<|nocaptions|>")
    if no_speech is None:
        raise ModelFileError("the Whisper tokenizer lacks <|nospeech|> / <|nocaptions|>")
    ids["no_speech"] = no_speech
    ids["timestamp_begin"] = ids["no_timestamps"] + 1

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    # Whisper's "non-speech" tokens (suppress_tokens=[-1]): speaker tags and annotations like
    # "[MUSIC]" or "♪", keeping plain punctuation; hyphens and quotes only inside words.
    symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
    symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
    miscellaneous = set("♩♪♫♬♭♮♯")
    suppress = {encode(" -")[0], encode(" '")[0]}
    for symbol in symbols + sorted(miscellaneous):
        for tokens in (encode(symbol), encode(" " + symbol)):
            if len(tokens) == 1 or symbol in miscellaneous:
                suppress.add(tokens[0])
    suppress.update(ids[k] for k in ("transcribe", "translate", "sot", "sot_prev", "sot_lm", "no_speech"))
    return {
        **ids,
        "vocab_size": vocab_size,
        "suppress_tokens": sorted(suppress),
        "suppress_blank": list(ct2_config.get("suppress_ids_begin") or [encode(" ")[0], ids["eot"]]),
        "english_only": tok.token_to_id("<|en|>") is None or vocab_size < 51865,
        "sample_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "chunk_seconds": CHUNK_SECONDS,
    }
