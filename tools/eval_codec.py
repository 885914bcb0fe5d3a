#!/usr/bin/env python3
"""Quality of a compiled codec on held-out speech, at each bitrate, next to Opus at the same bitrate.

    tools/eval_codec.py ARTIFACT [--whisper WHISPER.edgert] [--json out.json] [--wavs DIR]

Held-out speech: the five held-out espeak-ng sentences of tools/train_codec.py and the last 4 s of the
`beckett.wav` recording (never trained on). For each bitrate the codec offers: SI-SNR (dB, higher
is better) and log-mel distance (lower is better) of edgert's streamed round trip (80 ms chunks),
and of libopus (the `opuslib-next-bundled` package, VoIP mode, 20 ms packets) asked for the same
bitrate; the Opus bitrate reported is the one its packets really used. Each output is aligned to
its input first (Opus delays the signal by its look-ahead; the codec does not).

With ``--whisper WHISPER.edgert`` (``edgert compile whisper-tiny.en``) it also transcribes every
output with edgert's Whisper and reports the word error rate against the sentence espeak-ng was given
(for the recording, against Whisper's transcript of the original), next to the original's own WER.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgert.profile.audio_quality import align, mel_distance, si_snr


def opus_roundtrip(audio: np.ndarray, rate: int, kbps: float) -> tuple[np.ndarray, float] | None:
    """libopus encode + decode at ``kbps`` (20 ms packets): (audio, bitrate really used); None without Opus."""
    try:
        import opuslib_next as opus
    except ImportError:
        return None
    enc = opus.Encoder(rate, 1, opus.APPLICATION_VOIP)
    enc.bitrate = int(kbps * 1000)
    dec = opus.Decoder(rate, 1)
    frame = rate // 50
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % frame, "<i2")])
    out, used = [], 0
    for i in range(0, len(pcm), frame):
        packet = enc.encode(pcm[i : i + frame].tobytes(), frame)
        used += len(packet)
        out.append(np.frombuffer(dec.decode(packet, frame), "<i2"))
    decoded = np.concatenate(out).astype(np.float32) / 32768
    return decoded, 8 * used / (len(pcm) / rate) / 1000


def evaluate(artifact: Path, whisper: Path | None = None, wav_dir: Path | None = None) -> dict:
    """Scores per bitrate: edgert's codec and Opus (and word error rates with a Whisper artifact).

    With ``wav_dir``, every original and output is written there as a wav, to listen to.
    """
    from train_codec import held_out_speech, held_out_texts

    from edgert.families.codec.stream import load_codec
    from edgert.profile.audio_quality import word_error_rate
    from edgert.runtime.audio import write_wav

    codec = load_codec(artifact)
    clips = held_out_speech()
    step = int(0.08 * codec.sample_rate)
    report: dict = {"artifact": str(artifact), "clips": sorted(clips), "rows": []}
    texts: dict[str, str] = {}
    transcriber = None
    if whisper is not None:
        from edgert.families.whisper.transcriber import Transcriber

        transcriber = Transcriber(whisper)

        def heard(audio: np.ndarray) -> str:
            return transcriber.transcribe(audio).text

        for name, audio in clips.items():
            texts[name] = held_out_texts()[name] or heard(audio)
        report["original_wer"] = round(
            float(np.mean([word_error_rate(texts[n], heard(a)) for n, a in clips.items()])), 3
        )
    for books in sorted({max(1, codec.num_codebooks // 4), codec.num_codebooks // 2, codec.num_codebooks}):
        kbps = codec.bandwidth_kbps(books)
        scores: dict[str, list[float]] = {k: [] for k in ("snr", "mel", "wer", "opus_snr", "opus_mel", "opus_wer")}
        scores["opus_kbps"] = []
        for name, audio in clips.items():
            enc, dec = codec.encoder(books), codec.decoder()
            pieces = []
            for i in range(0, len(audio), step):
                last = i + step >= len(audio)
                pieces.append(dec.push(enc.push(audio[i : i + step], final=last), final=last))
            out = align(np.concatenate(pieces)[: len(audio)], audio, 1000)
            if wav_dir is not None:
                wav_dir.mkdir(parents=True, exist_ok=True)
                write_wav(wav_dir / f"{name}.wav", audio, codec.sample_rate)
                write_wav(wav_dir / f"{name}-edgert-{kbps:g}kbps.wav", out, codec.sample_rate)
            scores["snr"].append(si_snr(out, audio))
            scores["mel"].append(mel_distance(out, audio, codec.sample_rate))
            if transcriber is not None:
                scores["wer"].append(word_error_rate(texts[name], heard(out)))
            opus = opus_roundtrip(audio, codec.sample_rate, kbps)
            if opus is not None:
                o = align(opus[0][: len(audio)], audio, 1000)  # Opus delays by its look-ahead
                if wav_dir is not None:
                    write_wav(wav_dir / f"{name}-opus-{kbps:g}kbps.wav", o, codec.sample_rate)
                scores["opus_snr"].append(si_snr(o, audio))
                scores["opus_mel"].append(mel_distance(o, audio, codec.sample_rate))
                scores["opus_kbps"].append(opus[1])
                if transcriber is not None:
                    scores["opus_wer"].append(word_error_rate(texts[name], heard(o)))
        row = {"codebooks": books, "kbps": round(kbps, 3)}
        row.update({k: round(float(np.mean(v)), 3) for k, v in scores.items() if v})
        report["rows"].append(row)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--whisper", type=Path, default=None, help="a Whisper artifact: also report word error rates")
    parser.add_argument("--wavs", type=Path, default=None, help="write every original and output here as wav files")
    args = parser.parse_args()
    report = evaluate(args.artifact, args.whisper, args.wavs)
    if "original_wer" in report:
        print(f"Whisper's WER on the original clips: {report['original_wer']:.3f}")
    print(
        f"{'kbit/s':>7} {'SI-SNR dB':>10} {'mel dist':>9} {'WER':>6} | "
        f"{'Opus kbit/s':>11} {'SI-SNR dB':>10} {'mel dist':>9} {'WER':>6}"
    )
    for r in report["rows"]:
        opus_wer = r.get("opus_wer", float("nan"))
        opus = (
            f"{r['opus_kbps']:>11.2f} {r['opus_snr']:>10.2f} {r['opus_mel']:>9.3f} {opus_wer:>6.3f}"
            if "opus_kbps" in r
            else "  (no Opus)"
        )
        print(f"{r['kbps']:>7.2f} {r['snr']:>10.2f} {r['mel']:>9.3f} {r.get('wer', float('nan')):>6.3f} | {opus}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
