#!/usr/bin/env python3
"""Train edgert's own small speech codec (EnCodec architecture, 16 kHz) on CPU.

    tools/train_codec.py [--out models/codec-speech16k] [--minutes 6] [--threads 1] [--init FOLDER]

Speech: 600 clips synthesized with espeak-ng (14 voices, speeds 110-210 words/min, pitches 20-80;
fixed sentences, template sentences and random word strings) and the first 6 s of the recording
`beckett.wav` that the `useful-moonshine-onnx` package ships. Held out for the report: five
sentences never trained on (other voices too) and the last 4 s of the recording.

The network is `transformers`' EncodecModel from a small EncodecConfig (causal, zero padding so
that it streams from the first sample), trained with multi-resolution STFT losses (log magnitude
and spectral convergence at five window sizes, log-mel at three) and a small L1 waveform loss; no
adversarial loss. Residual vector quantization: codebooks initialised by k-means on encoder
outputs after a plain autoencoder warm-up, then updated by exponential moving averages, with
dead-code restarts, a commitment loss, straight-through gradients and quantizer dropout (so every
bitrate works). ``--minutes`` is CPU time of the process (so a shared machine gives the same
number of steps, only later). It writes OUT/model.safetensors, OUT/config.json and
OUT/metrics.json (bitrate, SI-SNR, mel distance). Needs torch and transformers (test extras) and
espeak-ng (apt).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
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
    num_filters=16,
    hidden_size=64,
    upsampling_ratios=[4, 5, 8],
    num_lstm_layers=1,
    codebook_size=256,
    target_bandwidths=[1.6, 3.2, 6.4],
    pad_mode="constant",
)
LR = 2e-3
SEGMENT, BATCH = 8000, 8  # 0.5 s pieces
WARM_FRACTION = 0.3
WAVE_WEIGHT = 0.5
COMMIT_WEIGHT = 1.0
SUBJECTS = ["the old man", "a small girl", "my brother", "the teacher", "our neighbour", "the pilot", "a farmer"]
VERBS = ["found", "painted", "carried", "opened", "sold", "watched", "cleaned", "lost", "bought", "fixed"]
OBJECTS = ["a red bicycle", "the kitchen door", "seven green apples", "an empty bottle", "the broken clock", "a map"]
PLACES = ["near the river", "after dinner", "in the morning", "at the station", "under the bridge", "last summer"]
TRAIN_VOICES = [
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-us+f2",
    "en+f3",
    "en-gb-scotland",
    "en-us+m3",
    "en+f4",
    "en-gb-x-gbclan",
    "en-us-nyc",
    "en+m2",
    "en-us+f3",
    "en-gb-x-gbcwmd",
    "en+m7",
]
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


SENTENCES = [
    "Seven lazy cats slept on the warm stone wall all afternoon.",
    "Could you please send me the report before Friday evening?",
    "The train to the northern city leaves at half past eight.",
    "She bought three pounds of fresh cherries at the market.",
    "Every child should learn to swim before the age of ten.",
    "The engine made a strange noise and then stopped completely.",
    "We watched the storm roll in across the grey water.",
    "His favourite book is a long story about a lost ship.",
    "Turn left at the bakery and walk two blocks to the church.",
    "The museum opens at nine and closes at five on Sundays.",
    "Heavy snow closed the mountain road for almost a week.",
    "Do not forget to water the plants while I am away.",
    "The scientists measured the temperature of the deep lake.",
    "A young boy kicked the yellow ball over the garden fence.",
    "The orchestra played a quiet piece before the long break.",
    "Why did the phone ring so late last night?",
    "Fifteen students passed the difficult exam with high marks.",
    "The doctor told him to rest and drink plenty of water.",
    "Bright lights flashed above the busy harbour at midnight.",
    "My grandmother baked bread every Saturday morning.",
    "The company hired four new engineers this spring.",
    "Put the knives and forks in the top drawer, please.",
    "A thick fog covered the valley until noon.",
    "They argued about money, politics and the weather.",
    "The pilot checked the fuel before the short flight home.",
    "Wild horses ran along the beach in the cold wind.",
    "How many languages can your sister speak?",
    "The shop on the corner sells cheap shoes and warm jackets.",
    "Our team won the final match by a single goal.",
    "Thin clouds drifted slowly across the pale blue sky.",
]
WORDS = (
    "time people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "big small green quick slow happy dark bright heavy quiet strange early late young old cold warm "
    "run walk speak think bring carry watch find open close sell build drive follow remember answer"
).split()


def training_speech(count: int, seed: int) -> list[np.ndarray]:
    """``count`` clips in random training voices, speeds and pitches, plus the first 6 s of the recording.

    Texts: the fixed sentences above, template sentences, and random word strings (for phoneme variety).
    """
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            text = SENTENCES[(i // 3) % len(SENTENCES)]
        elif kind == 1:
            text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
        jobs.append((text, rng.choice(TRAIN_VOICES), rng.randint(110, 210), rng.randint(20, 80)))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        clips = list(pool.map(lambda job: speak(*job), jobs))
    clips.append(beckett()[: 6 * RATE])
    return clips


def held_out_speech() -> dict[str, np.ndarray]:
    """The held-out clips, by name."""
    clips = {f"espeak-{i}": speak(text, voice) for i, (voice, text) in enumerate(HELD_OUT)}
    clips["beckett-tail"] = beckett()[6 * RATE :]
    return clips


def held_out_texts() -> dict[str, str | None]:
    """What the held-out clips say (None for the recording, whose words nobody typed here)."""
    texts: dict[str, str | None] = {f"espeak-{i}": text for i, (_, text) in enumerate(HELD_OUT)}
    texts["beckett-tail"] = None
    return texts


def mel_filters(n_fft: int, n_mels: int, rate: int = RATE):
    """HTK-style triangular mel filterbank (torch), (n_fft // 2 + 1, n_mels)."""
    import torch

    from edgert.profile.audio_quality import mel_filterbank

    return torch.from_numpy(mel_filterbank(n_fft, n_mels, rate))


class EmaRVQ:
    """Residual vector quantizer whose codebooks follow their assigned residuals by exponential moving
    averages (no gradient), with k-means-style initialisation and dead-code restarts (SoundStream's recipe)."""

    def __init__(self, stages: int, size: int, dim: int, decay: float = 0.95):
        import torch

        self.stages, self.size, self.dim, self.decay = stages, size, dim, decay
        self.embed = torch.zeros(stages, size, dim)
        self.count = torch.ones(stages, size)
        self.total = torch.zeros(stages, size, dim)
        self.ready = False

    def _nearest(self, r, i: int):
        e = self.embed[i]
        return ((r**2).sum(1, keepdim=True) - 2 * r @ e.T + (e**2).sum(1)).argmin(1)

    def init(self, z) -> None:
        """Each stage's codes: random residuals of this batch refined by a few k-means steps."""
        import torch

        with torch.no_grad():
            r = z.transpose(1, 2).reshape(-1, self.dim).clone()
            for i in range(self.stages):
                self.embed[i] = r[torch.randint(len(r), (self.size,))]
                for _ in range(5):
                    idx = self._nearest(r, i)
                    hits = torch.bincount(idx, minlength=self.size).float()
                    sums = torch.zeros(self.size, self.dim).index_add_(0, idx, r)
                    live = hits > 0
                    self.embed[i][live] = sums[live] / hits[live, None]
                self.total[i] = self.embed[i].clone()
                self.count[i] = 1.0
                r = r - self.embed[i][self._nearest(r, i)]
        self.ready = True

    def __call__(self, z, used: int, train: bool):
        """(quantized z with straight-through gradient, commitment loss) using the first ``used`` stages."""
        import torch

        flat = z.transpose(1, 2).reshape(-1, self.dim)
        r = flat.detach()
        q = torch.zeros_like(r)
        for i in range(used):
            idx = self._nearest(r, i)
            e = self.embed[i][idx]
            if train:
                with torch.no_grad():
                    hits = torch.bincount(idx, minlength=self.size).float()
                    sums = torch.zeros(self.size, self.dim).index_add_(0, idx, r)
                    self.count[i].mul_(self.decay).add_(hits, alpha=1 - self.decay)
                    self.total[i].mul_(self.decay).add_(sums, alpha=1 - self.decay)
                    n = self.count[i].sum()
                    smoothed = (self.count[i] + 1e-5) / (n + self.size * 1e-5) * n
                    self.embed[i] = self.total[i] / smoothed[:, None]
                    # Dead codes (rarely chosen) restart at random residuals of this batch.
                    dead = (self.count[i] < 0.05).nonzero().flatten()
                    if len(dead):
                        fresh = r[torch.randint(len(r), (len(dead),))]
                        self.embed[i][dead] = fresh
                        self.total[i][dead] = fresh
                        self.count[i][dead] = 1.0
            q = q + e
            r = r - e
        commit = ((flat - q.detach()) ** 2).mean()
        out = flat + (q - flat).detach()
        return out.reshape(z.shape[0], -1, self.dim).transpose(1, 2), commit


def train(out: Path, minutes: float, threads: int, seed: int, clips_count: int = 600, init: Path | None = None) -> None:
    """Train, evaluate on the held-out clips, and write the codec into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import EncodecConfig, EncodecModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.time()
    clips = training_speech(clips_count, seed)
    corpus = [torch.from_numpy(c / max(1e-3, float(np.abs(c).max())) * 0.7) for c in clips]
    print(f"corpus: {len(corpus)} clips, {sum(len(c) for c in corpus) / RATE:.0f} s ({time.time() - t0:.0f} s)")

    config = EncodecConfig(**CONFIG)
    model = EncodecModel(config)
    nq, size, dim = config.num_quantizers, config.codebook_size, config.codebook_dim
    rvq = EmaRVQ(nq, size, dim)
    if init is not None:  # go on from a codec this script wrote (its quantizer is already trained)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(init / "model.safetensors")))
        rvq.embed = torch.stack([layer.codebook.embed.detach().clone() for layer in model.quantizer.layers])
        rvq.total, rvq.ready = rvq.embed.clone(), True
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=LR, betas=(0.8, 0.99))
    segment, batch = SEGMENT, BATCH
    ffts = [(n, torch.hann_window(n)) for n in (128, 256, 512, 1024, 2048)]
    mels = {n: mel_filters(n, m) for n, m in ((512, 64), (1024, 80), (2048, 80))}

    def sample_batch() -> torch.Tensor:
        rows = []
        for _ in range(batch):
            clip = corpus[np.random.randint(len(corpus))]
            start = np.random.randint(max(1, len(clip) - segment))
            piece = clip[start : start + segment]
            rows.append(torch.nn.functional.pad(piece, (0, segment - len(piece))) * np.random.uniform(0.2, 1.0))
        return torch.stack(rows)[:, None, :]

    def spectral_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Log-magnitude (L1) at five resolutions for the fine structure, spectral convergence for the
        # level, log-mel for the envelope that intelligibility rests on. No adversarial loss: it buys
        # naturalness, not intelligibility, and needs far more steps than a CPU budget allows.
        loss = torch.zeros(())
        for n, window in ffts:
            my = torch.stft(y[:, 0], n, n // 4, window=window, return_complex=True).abs() + 1e-5
            mx = torch.stft(x[:, 0], n, n // 4, window=window, return_complex=True).abs() + 1e-5
            loss = loss + (my.log() - mx.log()).abs().mean() + torch.linalg.norm(my - mx) / torch.linalg.norm(mx)
            if n in mels:
                fb = mels[n]
                mel_y = (my.transpose(1, 2) ** 2 @ fb + 1e-5).log()
                loss = loss + (mel_y - (mx.transpose(1, 2) ** 2 @ fb + 1e-5).log()).abs().mean()
        return loss / len(ffts)

    # The budget is CPU time of this process, not wall time: on a machine shared with other jobs the
    # same recipe then makes the same number of steps (on a quiet machine the two are equal).
    budget = minutes * 60
    # Seconds of plain autoencoder before the quantizer switches on.
    warm = 0.0 if init is not None else WARM_FRACTION * budget
    step = 0
    stop = []  # SIGTERM ends training early but still saves and evaluates what was learnt
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    start, wall = time.process_time(), time.time()
    model.train()
    while (elapsed := time.process_time() - start) < budget and not stop:
        for group in opt.param_groups:  # cosine decay over the time budget
            group["lr"] = LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        x = sample_batch()
        z = model.encoder(x)
        if elapsed < warm:
            q, commit = z, torch.zeros(())
        else:
            if not rvq.ready:
                with torch.no_grad():
                    rvq.init(torch.cat([model.encoder(sample_batch()) for _ in range(8)], 0))
            # Quantizer dropout: half the steps use every stage, the rest a random number, so every bitrate works.
            used = nq if np.random.rand() < 0.5 else int(np.random.randint(1, nq + 1))
            q, commit = rvq(z, used, train=True)
        y = model.decoder(q)[..., : x.shape[-1]]
        loss = spectral_loss(y, x) + WAVE_WEIGHT * (y - x).abs().mean() + COMMIT_WEIGHT * commit
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed:6.0f} s  loss {loss.item():.3f}  commit {commit.item():.4f}", flush=True)
        step += 1

    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model.quantizer.layers):
            layer.codebook.embed.copy_(rvq.embed[i])
            layer.codebook.embed_avg.copy_(rvq.embed[i])
            layer.codebook.cluster_size.fill_(1.0)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    raw = config.to_dict()
    raw["name"] = out.name
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    metrics = evaluate(model, config)
    metrics["training"] = {
        "steps": step,
        "cpu_seconds": round(time.process_time() - start),
        "wall_seconds": round(time.time() - wall),
        "threads": threads,
        "seed": seed,
    }
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
    parser.add_argument("--filters", type=int, default=CONFIG["num_filters"], help="SEANet's first width")
    parser.add_argument("--init", type=Path, default=None, help="go on training this codec folder")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--clips", type=int, default=600, help="espeak-ng clips to synthesize")
    args = parser.parse_args()
    CONFIG["num_filters"] = args.filters
    globals()["LR"] = args.lr
    train(args.out, args.minutes, args.threads, args.seed, args.clips, args.init)


if __name__ == "__main__":
    main()
