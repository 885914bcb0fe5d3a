#!/usr/bin/env python3
"""Train edgert's own small speech codec (EnCodec architecture, 16 kHz) on CPU in a few minutes.

    tools/train_codec.py [--out models/codec-speech16k] [--minutes 12] [--threads 1]

Speech: sentences synthesized with espeak-ng (several voices, speeds and pitches) and the first
6 s of the recording `beckett.wav` that the `useful-moonshine-onnx` package ships. Held out for
the report: five sentences never trained on (other voices too) and the last 4 s of the recording.

The network is `transformers`' EncodecModel from a small EncodecConfig (causal, zero padding so
that it streams from the first sample), trained with an L1 multi-resolution log-mel loss, spectral
convergence and an L1 waveform loss; residual vector quantization with straight-through gradients, a commitment
loss, quantizer dropout (so every bitrate works) and dead-code restarts. It writes
OUT/model.safetensors, OUT/config.json and OUT/metrics.json (bitrate, SI-SNR, mel distance).
Needs torch and transformers (test extras) and espeak-ng (apt).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgert.profile.audio_quality import mel_distance, si_snr
from edgert.runtime.audio import load_wav, resample

RATE = 16000
CONFIG = dict(
    sampling_rate=RATE,
    num_filters=8,
    hidden_size=64,
    upsampling_ratios=[4, 5, 8],
    num_lstm_layers=1,
    codebook_size=256,
    target_bandwidths=[1.6, 3.2, 6.4],
    pad_mode="constant",
)
SUBJECTS = ["the old man", "a small girl", "my brother", "the teacher", "our neighbour", "the pilot", "a farmer"]
VERBS = ["found", "painted", "carried", "opened", "sold", "watched", "cleaned", "lost", "bought", "fixed"]
OBJECTS = ["a red bicycle", "the kitchen door", "seven green apples", "an empty bottle", "the broken clock", "a map"]
PLACES = ["near the river", "after dinner", "in the morning", "at the station", "under the bridge", "last summer"]
TRAIN_VOICES = ["en-us", "en", "en-gb-x-rp", "en-us+f2", "en+f3", "en-gb-scotland", "en-us+m3", "en+f4"]
HELD_OUT = [
    ("en-us", "Please call Stella and ask her to bring these things with her from the store."),
    ("en+f2", "The quick brown fox jumps over the lazy dog while the children laugh."),
    ("en-029", "We will meet again tomorrow at noon to finish the report together."),
    ("en-gb", "Numbers like forty two and nine hundred are easy to remember."),
    ("en-us+f4", "Is it going to rain this afternoon, or will the sun come out?"),
]


def speak(text: str, voice: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng's rendering of ``text`` at 16 kHz, float32."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
            check=True,
            capture_output=True,
        )
        audio, rate = load_wav(tmp.name)
    return resample(audio, rate, RATE)


def beckett() -> np.ndarray:
    """The recording shipped by `useful-moonshine-onnx` (16 kHz)."""
    import importlib.util

    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps useful-moonshine-onnx (it ships assets/beckett.wav)")
    audio, rate = load_wav(Path(spec.origin).parent / "assets" / "beckett.wav")
    return resample(audio, rate, RATE)


def training_speech(count: int, seed: int) -> list[np.ndarray]:
    """``count`` random sentences in random training voices, plus the first 6 s of the recording."""
    rng = random.Random(seed)
    clips = []
    for _ in range(count):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        clips.append(speak(text, rng.choice(TRAIN_VOICES), rng.randint(120, 200), rng.randint(25, 75)))
    clips.append(beckett()[: 6 * RATE])
    return clips


def held_out_speech() -> dict[str, np.ndarray]:
    """The held-out clips, by name."""
    clips = {f"espeak-{i}": speak(text, voice) for i, (voice, text) in enumerate(HELD_OUT)}
    clips["beckett-tail"] = beckett()[6 * RATE :]
    return clips


def mel_filters(n_fft: int, n_mels: int, rate: int = RATE):
    """HTK-style triangular mel filterbank (torch), (n_fft // 2 + 1, n_mels)."""
    import torch

    from edgert.profile.audio_quality import mel_filterbank

    return torch.from_numpy(mel_filterbank(n_fft, n_mels, rate))


def train(out: Path, minutes: float, threads: int, seed: int) -> None:
    """Train, evaluate on the held-out clips, and write the codec into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import EncodecConfig, EncodecModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.time()
    clips = training_speech(240, seed)
    corpus = [torch.from_numpy(c / max(1e-3, float(np.abs(c).max())) * 0.7) for c in clips]
    print(f"corpus: {len(corpus)} clips, {sum(len(c) for c in corpus) / RATE:.0f} s ({time.time() - t0:.0f} s)")

    config = EncodecConfig(**CONFIG)
    model = EncodecModel(config)
    nq, size, dim = config.num_quantizers, config.codebook_size, config.codebook_dim
    codebooks = torch.nn.Parameter(torch.zeros(nq, size, dim))
    opt = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters(), codebooks], lr=3e-3)
    segment, batch = 6000, 4
    resolutions = [(n, torch.hann_window(n), mel_filters(n, m)) for n, m in ((256, 40), (512, 64), (1024, 80))]

    def sample_batch() -> torch.Tensor:
        rows = []
        for _ in range(batch):
            clip = corpus[np.random.randint(len(corpus))]
            start = np.random.randint(max(1, len(clip) - segment))
            piece = clip[start : start + segment]
            rows.append(torch.nn.functional.pad(piece, (0, segment - len(piece))) * np.random.uniform(0.3, 1.0))
        return torch.stack(rows)[:, None, :]

    def logmel(a: torch.Tensor, n: int, window: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(a[:, 0], n, n // 4, window=window, return_complex=True).abs() ** 2
        return torch.log(spec.transpose(1, 2) @ fb + 1e-5)

    def spectral_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Log-mel for the envelope; spectral convergence (linear magnitude) for the level, which an
        # L1 waveform loss alone pulls toward silence while the phase is still wrong.
        loss = torch.zeros(())
        for n, window, fb in resolutions:
            loss = loss + (logmel(y, n, window, fb) - logmel(x, n, window, fb)).abs().mean()
            my = torch.stft(y[:, 0], n, n // 4, window=window, return_complex=True).abs()
            mx = torch.stft(x[:, 0], n, n // 4, window=window, return_complex=True).abs()
            loss = loss + torch.linalg.norm(my - mx) / (torch.linalg.norm(mx) + 1e-7)
        return loss / len(resolutions)

    def quantize(z: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = z.transpose(1, 2).reshape(-1, dim)
        q = torch.zeros_like(r)
        commit = torch.zeros(())
        codes = []
        for i in range(used):
            dist = (r.detach() ** 2).sum(1, keepdim=True) - 2 * r.detach() @ codebooks[i].T + (codebooks[i] ** 2).sum(1)
            idx = dist.argmin(1)
            e = codebooks[i][idx]
            commit = commit + ((r.detach() - e) ** 2).mean() + 0.25 * ((r - e.detach()) ** 2).mean()
            q = q + e
            r = r - e.detach()
            codes.append(idx)
        st = z.transpose(1, 2).reshape(-1, dim)
        q = st + (q - st).detach()  # straight-through
        return q.reshape(z.shape[0], -1, dim).transpose(1, 2), commit, torch.stack(codes)

    def restart_codes(z: torch.Tensor, usage: torch.Tensor) -> None:
        """Codes nobody used since the last restart take the value of random current residuals."""
        with torch.no_grad():
            r = z.transpose(1, 2).reshape(-1, dim)
            for i in range(nq):
                dead = (usage[i] == 0).nonzero().flatten()
                if len(dead):
                    codebooks[i][dead] = r[torch.randint(len(r), (len(dead),))]
                dist = (r**2).sum(1, keepdim=True) - 2 * r @ codebooks[i].T + (codebooks[i] ** 2).sum(1)
                r = r - codebooks[i][dist.argmin(1)]

    budget = minutes * 60
    warm = 150  # autoencoder steps before the quantizer switches on
    usage = torch.zeros(nq, size)
    step = 0
    start = time.time()
    model.train()
    while time.time() - start < budget:
        x = sample_batch()
        z = model.encoder(x)
        if step < warm:
            q, commit = z, torch.zeros(())
        else:
            if step == warm:
                restart_codes(z, torch.zeros(nq, size))
            used = int(np.random.randint(1, nq + 1))
            q, commit, codes = quantize(z, used)
            for i in range(used):
                usage[i] += torch.bincount(codes[i], minlength=size).float()
            if step % 100 == 0:
                restart_codes(z, usage)
                usage.zero_()
        y = model.decoder(q)[..., : x.shape[-1]]
        loss = spectral_loss(y, x) + 2.0 * (y - x).abs().mean() + commit
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}  {time.time() - start:6.0f} s  loss {loss.item():.3f}", flush=True)
        step += 1

    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model.quantizer.layers):
            layer.codebook.embed.copy_(codebooks[i])
            layer.codebook.embed_avg.copy_(codebooks[i])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    raw = config.to_dict()
    raw["name"] = out.name
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    metrics = evaluate(model, config)
    metrics["training"] = {"steps": step, "seconds": round(time.time() - start), "threads": threads, "seed": seed}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


def evaluate(model, config) -> dict:
    """SI-SNR (dB) and log-mel distance on the held-out clips at every bandwidth, with PyTorch."""
    import torch

    clips = held_out_speech()
    result: dict = {"sample_rate": RATE, "frame_rate": config.frame_rate, "bandwidths": {}}
    for bw in config.target_bandwidths:
        snrs, mels = [], []
        for clip in clips.values():
            hop = config.hop_length
            x = clip[: len(clip) // hop * hop]
            with torch.no_grad():
                y = model(torch.from_numpy(x).view(1, 1, -1), bandwidth=bw).audio_values[0, 0].numpy()
            snrs.append(si_snr(y, x))
            mels.append(mel_distance(y, x, RATE))
        result["bandwidths"][str(bw)] = {
            "si_snr_db": round(float(np.mean(snrs)), 2),
            "mel_distance": round(float(np.mean(mels)), 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "codec-speech16k"
    )
    parser.add_argument("--minutes", type=float, default=6.0)
    # One thread: on a shared 2-core machine, two OpenMP threads spin-waited each step 50x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.out, args.minutes, args.threads, args.seed)


if __name__ == "__main__":
    main()
