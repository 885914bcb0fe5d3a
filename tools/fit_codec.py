#!/usr/bin/env python3
"""Fit edgert's own speech codec (16 kHz) in closed form: MDCT filterbank, PCA, residual k-means.

    tools/fit_codec.py [--out models/codec-speech16k] [--hop 160] [--dim 120] [--stages 16] [--clips 300]

The codec is linear up to its quantizer, so every part has a closed-form fit instead of training:

    encode  z = P^T W A x      A: MDCT analysis over 2*hop samples (sine window), W: a diagonal
                               perceptual weight per MDCT bin, P: the top ``dim`` principal axes
                               of the weighted coefficients of the training speech
    gain    code 0 = the nearest of evenly spaced levels to log |z| (gain-shape; --plain-rvq: none)
    RVQ     stage i's codebook = k-means of the residual left by stages < i (Lloyd, seeded), on
            z / gain: every frame, loud or quiet, gets the same relative precision
    decode  x = A^T W^-1 P z   overlap-added (time-domain aliasing cancellation: exact without
                               quantization and with every principal axis kept; checked here)

It is stored as an EnCodec-architecture codec with ``filterbank = true`` and ``activation = "none"``
(no ELU, residual unit or LSTM), so the compiler's codec family (`edgert.families.codec.model`) builds and
streams it: encoder = conv 1->dim (k=2*hop, stride hop) then an identity 1x1 conv, decoder = an
identity 1x1 conv then a transposed conv dim->1 (k=2*hop, stride hop). Speech: `training_speech`
(espeak-ng, tools/train_codec.py's recipe); held out: its five held-out sentences and the tail of a
recording. Writes OUT/model.safetensors,
OUT/config.json and OUT/metrics.json. Needs espeak-ng (apt) and numpy only; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_codec import RATE, held_out_speech, training_speech

from edgert.profile.audio_quality import mel_distance, si_snr

GAIN_FLOOR = 1e-9  # added to a frame's norm before its log; the same as the compiled codec's


def mdct_matrix(hop: int) -> np.ndarray:
    """MDCT analysis (hop x 2*hop) with a sine window, scaled so that its transpose overlap-adds back exactly."""
    n = np.arange(2 * hop)
    k = np.arange(hop)
    window = np.sin(np.pi * (n + 0.5) / (2 * hop))
    basis = np.cos(np.pi / hop * (n[None, :] + 0.5 + hop / 2) * (k[:, None] + 0.5))
    return np.sqrt(2.0 / hop) * window[None, :] * basis


def frames_of(audio: np.ndarray, hop: int) -> np.ndarray:
    """Windows of 2*hop samples at stride hop, as the causal strided conv sees them (hop zeros first)."""
    x = np.concatenate([np.zeros(hop, np.float64), audio.astype(np.float64)])
    x = x[: (len(x) - hop) // hop * hop + hop]
    count = (len(x) - hop) // hop
    return np.stack([x[t * hop : t * hop + 2 * hop] for t in range(count)])


def overlap_add(windows: np.ndarray, hop: int) -> np.ndarray:
    """Sum windows of 2*hop samples at stride hop; output sample n is input sample n - hop."""
    out = np.zeros((len(windows) + 1) * hop)
    for t, w in enumerate(windows):
        out[t * hop : t * hop + 2 * hop] += w
    return out[: len(windows) * hop]


def kmeans(data: np.ndarray, size: int, rng: np.random.Generator, iters: int) -> np.ndarray:
    """Lloyd's k-means (seeded start on data points; an empty cluster restarts on the worst-fit point)."""
    centers = data[rng.choice(len(data), size, replace=False)].copy()
    norms = (data**2).sum(1)
    for _ in range(iters):
        dist = norms[:, None] - 2 * data @ centers.T + (centers**2).sum(1)[None, :]
        idx = dist.argmin(1)
        counts = np.bincount(idx, minlength=size)
        sums = np.zeros_like(centers)
        np.add.at(sums, idx, data)
        worst = np.argsort(dist[np.arange(len(data)), idx])[::-1]
        empty = np.flatnonzero(counts == 0)
        centers[counts > 0] = sums[counts > 0] / counts[counts > 0, None]
        centers[empty] = data[worst[: len(empty)]]
    return centers


def nearest(data: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center of every row."""
    dist = -2 * data @ centers.T + (centers**2).sum(1)[None, :]
    return dist.argmin(1)


@dataclass
class FittedCodec:
    """The codec's matrices and codebooks (float64), as `fit` makes them and `save`/`load` store them."""

    encoder: np.ndarray  # dim x 2hop
    decoder: np.ndarray  # 2hop x dim
    books: np.ndarray  # stages x size x dim (gain-shape: stage 0 all zero)
    hop: int
    gains: np.ndarray | None = None  # gain-shape: stage 0's log-norm levels (size,)

    def encode(self, audio: np.ndarray, used: int | None = None) -> np.ndarray:
        """Codes ``(frames, used)`` of ``audio`` (see `codes_of`)."""
        return codes_of(frames_of(audio, self.hop) @ self.encoder.T, self.books, self.gains, used)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Audio of ``codes``, delayed by one hop."""
        return overlap_add(latents_of(codes, self.books, self.gains) @ self.decoder.T, self.hop)

    def roundtrip(self, audio: np.ndarray, used: int | None = None) -> np.ndarray:
        """The codec in numpy (the reference the compiled one is tested against); output delayed by hop."""
        return self.decode(self.encode(audio, used))


def codes_of(z: np.ndarray, books: np.ndarray, gains: np.ndarray | None, used: int | None = None) -> np.ndarray:
    """RVQ codes of latents ``z``: with ``gains``, code 0 is the nearest log-norm level and the later
    stages quantize ``z`` divided by that gain; each stage takes the nearest codeword to the residual."""
    used = used or len(books)
    codes = np.zeros((len(z), used), np.int64)
    residual, start = z.copy(), 0
    if gains is not None:
        level = np.log(np.linalg.norm(z, axis=1) + GAIN_FLOOR)
        codes[:, 0] = np.abs(level[:, None] - gains[None, :]).argmin(1)
        residual, start = z / np.exp(gains[codes[:, 0]])[:, None], 1
    for i in range(start, used):
        codes[:, i] = nearest(residual, books[i])
        residual = residual - books[i][codes[:, i]]
    return codes


def latents_of(codes: np.ndarray, books: np.ndarray, gains: np.ndarray | None) -> np.ndarray:
    """Sum of the codewords of ``codes`` (times the gain of code 0 for a gain-shape codec)."""
    z = books[np.arange(codes.shape[1])[None, :], codes].sum(1)
    return z if gains is None else z * np.exp(gains[codes[:, 0]])[:, None]


def fit(
    clips: list[np.ndarray],
    hop: int,
    dim: int,
    stages: int,
    size: int,
    tilt: float,
    seed: int,
    iters: int,
    gain_shape: bool = True,
) -> FittedCodec:
    """Fit the filterbank, the principal axes and the codebooks on ``clips``."""
    analysis = mdct_matrix(hop)
    # Time-domain aliasing cancellation: analysis then its transpose, overlap-added, is the identity.
    probe = np.random.default_rng(seed).standard_normal(20 * hop)
    back = overlap_add(frames_of(probe, hop) @ analysis.T @ analysis, hop)
    assert np.abs(back[hop:] - probe[: len(back) - hop]).max() < 1e-9, "MDCT does not reconstruct"
    coeffs = np.concatenate([frames_of(c, hop) @ analysis.T for c in clips])
    coeffs = coeffs[np.abs(coeffs).sum(1) > 1e-6]  # silence teaches nothing
    # Perceptual weight: partly whiten the long-term spectrum, so that quantization noise follows it
    # (a weight of energy^-tilt/2 per bin; tilt 0 is plain MSE, 1 full whitening).
    energy = (coeffs**2).mean(0) + 1e-9
    weight = energy ** (-tilt / 2)
    weight /= np.sqrt((weight**2).mean())
    weighted = coeffs * weight
    _, vectors = np.linalg.eigh(weighted.T @ weighted)
    axes = vectors[:, ::-1][:, :dim]  # hop x dim, largest variance first
    z = weighted @ axes
    rng = np.random.default_rng(seed)
    books, gains = [], None
    if gain_shape:
        # Log-norm levels evenly spaced over the training frames' range (with a margin); the shape
        # stages then see every frame at unit norm.
        level = np.log(np.linalg.norm(z, axis=1) + GAIN_FLOOR)
        gains = np.linspace(np.percentile(level, 0.1) - 1, np.percentile(level, 99.9) + 1, size)
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        books.append(np.zeros((size, dim)))
    residual = z.copy()
    for i in range(len(books), stages):
        t = time.perf_counter()
        sample = residual[rng.choice(len(residual), min(len(residual), 40 * size), replace=False)]
        book = kmeans(sample.astype(np.float32), size, rng, iters).astype(np.float64)
        residual = residual - book[nearest(residual, book)]
        books.append(book)
        print(f"stage {i + 1}: residual energy {np.mean(residual**2):.3e} ({time.perf_counter() - t:.1f} s)")
    encoder = axes.T @ (weight[:, None] * analysis)  # dim x 2hop
    decoder = analysis.T @ (axes / weight[:, None])  # 2hop x dim
    return FittedCodec(encoder, decoder, np.stack(books), hop, gains)


def load(folder: Path) -> FittedCodec:
    """The codec back from a folder that `save` wrote."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    hop = config["upsampling_ratios"][0]
    encoder = tensors["encoder.layers.0.conv.weight"][:, 0, :].astype(np.float64)
    decoder = tensors["decoder.layers.1.conv.weight"][:, 0, :].T.astype(np.float64)
    books = np.stack([tensors[f"quantizer.layers.{i}.codebook.embed"] for i in range(config["num_quantizers"])])
    gains = tensors["quantizer.gains"].astype(np.float64) if config.get("gain_shape") else None
    return FittedCodec(encoder, decoder, books.astype(np.float64), hop, gains)


def save(out: Path, codec: FittedCodec, target_kbps: list[float]) -> dict:
    """Write the EnCodec-architecture folder (config.json, model.safetensors)."""
    from safetensors.numpy import save_file

    encoder, decoder, books, hop = codec.encoder, codec.decoder, codec.books, codec.hop
    dim, stages, size = encoder.shape[0], books.shape[0], books.shape[1]
    f32 = np.float32
    eye = np.eye(dim, dtype=f32)[:, :, None]
    tensors = {
        "encoder.layers.0.conv.weight": encoder.astype(f32)[:, None, :],  # (out, in, k): the analysis
        "encoder.layers.0.conv.bias": np.zeros(dim, f32),
        "encoder.layers.1.conv.weight": eye,
        "encoder.layers.1.conv.bias": np.zeros(dim, f32),
        "decoder.layers.0.conv.weight": eye,
        "decoder.layers.0.conv.bias": np.zeros(dim, f32),
        "decoder.layers.1.conv.weight": decoder.T.astype(f32)[:, None, :],  # (in, out, k): the synthesis
        "decoder.layers.1.conv.bias": np.zeros(1, f32),
    }
    for i, book in enumerate(books):
        # float16 on disk halves the shipped file; the compiler widens it to float32 (as `load` does).
        tensors[f"quantizer.layers.{i}.codebook.embed"] = book.astype(np.float16)
    if codec.gains is not None:
        tensors["quantizer.gains"] = codec.gains.astype(f32)  # float32: a level step is ~0.02
    out.mkdir(parents=True, exist_ok=True)
    # C order: safetensors writes an array's buffer as it lies in memory (a transposed view would be garbled).
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = {
        "model_type": "encodec",
        "name": out.name,
        "sampling_rate": RATE,
        "audio_channels": 1,
        "num_filters": dim // 2,
        "filterbank": True,
        "gain_shape": codec.gains is not None,
        "upsampling_ratios": [hop],
        "hidden_size": dim,
        "codebook_dim": dim,
        "kernel_size": 1,
        "last_kernel_size": 1,
        "num_residual_layers": 0,
        "num_lstm_layers": 0,
        "activation": "none",
        "use_causal_conv": True,
        "pad_mode": "constant",
        "norm_type": "weight_norm",
        "codebook_size": size,
        "num_quantizers": stages,
        "target_bandwidths": target_kbps,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=here / "models" / "codec-speech16k")
    parser.add_argument("--hop", type=int, default=160, help="samples per frame (the MDCT has 2*hop taps)")
    parser.add_argument("--dim", type=int, default=120, help="principal axes kept (even)")
    parser.add_argument("--stages", type=int, default=16, help="RVQ stages")
    parser.add_argument("--size", type=int, default=1024, help="codewords per stage")
    parser.add_argument("--tilt", type=float, default=0.8, help="perceptual weight exponent (0: plain MSE)")
    parser.add_argument("--clips", type=int, default=300, help="espeak-ng clips to synthesize")
    parser.add_argument("--iters", type=int, default=8, help="k-means iterations per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-rvq", action="store_true", help="no gain-shape split (codebook 0 codes the gain)")
    args = parser.parse_args()
    t = time.perf_counter()
    clips = training_speech(args.clips, args.seed)
    print(f"{len(clips)} clips, {sum(map(len, clips)) / RATE:.0f} s of speech ({time.perf_counter() - t:.0f} s)")
    codec = fit(clips, args.hop, args.dim, args.stages, args.size, args.tilt, args.seed, args.iters, not args.plain_rvq)
    per_stage = np.log2(args.size) * RATE / args.hop / 1000
    used = [args.stages // 4, args.stages // 2, args.stages]
    config = save(args.out, codec, [u * per_stage for u in used])
    metrics: dict = {"frame_rate": RATE / args.hop, "kbps_per_stage": per_stage, "held_out": {}}
    held = held_out_speech()
    for u in used:
        snr, mel = [], []
        for clip in held.values():
            y = codec.roundtrip(clip, u)[args.hop :]
            x = clip[: len(y)]
            snr.append(si_snr(y.astype(np.float32), x))
            mel.append(mel_distance(y.astype(np.float32), x, RATE))
        row = {"si_snr_db": round(float(np.mean(snr)), 2), "mel_distance": round(float(np.mean(mel)), 3)}
        metrics["held_out"][f"{u * per_stage:g}"] = row
        print(
            f"{u:2d} stages, {u * per_stage:5.2f} kbit/s: SI-SNR {row['si_snr_db']:6.2f} dB, mel {row['mel_distance']}"
        )
    metrics["command"] = "python tools/fit_codec.py " + " ".join(sys.argv[1:])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.out} ({config['num_quantizers']} stages) in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
