#!/usr/bin/env python3
"""Fit edgert's own speech codec (16 kHz) in closed form: MDCT filterbank, PCA, residual k-means.

    tools/fit_codec.py [--out models/codec-speech16k] [--hop 160] [--dim 48] [--stages 16] [--clips 300]

The codec is linear up to its quantizer, so every part has a closed-form fit instead of training:

    encode  z = P^T W A x      A: MDCT analysis over 2*hop samples (sine window), W: a diagonal
                               perceptual weight per MDCT bin, P: the top ``dim`` principal axes
                               of the weighted coefficients of the training speech
    RVQ     stage i's codebook = k-means of the residual left by stages < i (Lloyd, seeded)
    decode  x = A^T W^-1 P z   overlap-added (time-domain aliasing cancellation: exact without
                               quantization and with every principal axis kept; checked here)

It is stored as an EnCodec-architecture codec with ``filterbank = true`` and ``activation = "none"``
(no ELU, residual unit or LSTM), so the compiler's codec family (`edgert.families.codec`) builds and
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_codec import RATE, held_out_speech, training_speech

from edgert.profile.audio_quality import mel_distance, si_snr


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


def fit(clips: list[np.ndarray], hop: int, dim: int, stages: int, size: int, tilt: float, seed: int, iters: int):
    """(encoder matrix dim x 2hop, decoder matrix 2hop x dim, codebooks stages x size x dim)."""
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
    books, residual = [], z.copy()
    for i in range(stages):
        t = time.perf_counter()
        sample = residual[rng.choice(len(residual), min(len(residual), 40 * size), replace=False)]
        book = kmeans(sample.astype(np.float32), size, rng, iters).astype(np.float64)
        residual = residual - book[nearest(residual, book)]
        books.append(book)
        print(f"stage {i + 1}: residual energy {np.mean(residual**2):.3e} ({time.perf_counter() - t:.1f} s)")
    encoder = axes.T @ (weight[:, None] * analysis)  # dim x 2hop
    decoder = analysis.T @ (axes / weight[:, None])  # 2hop x dim
    return encoder, decoder, np.stack(books)


def roundtrip(audio: np.ndarray, encoder, decoder, books, used: int, hop: int) -> np.ndarray:
    """The codec in numpy (the reference the compiled one is tested against); output delayed by hop."""
    z = frames_of(audio, hop) @ encoder.T
    q = np.zeros_like(z)
    for book in books[:used]:
        code = book[nearest(z - q, book)]
        q += code
    return overlap_add(q @ decoder.T, hop)


def load(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(encoder, decoder, codebooks, hop) back from a folder that `save` wrote."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    hop = config["upsampling_ratios"][0]
    encoder = tensors["encoder.layers.0.conv.weight"][:, 0, :].astype(np.float64)
    decoder = tensors["decoder.layers.1.conv.weight"][:, 0, :].T.astype(np.float64)
    books = np.stack([tensors[f"quantizer.layers.{i}.codebook.embed"] for i in range(config["num_quantizers"])])
    return encoder, decoder, books.astype(np.float64), hop


def save(out: Path, encoder, decoder, books, hop: int, target_kbps: list[float]) -> dict:
    """Write the EnCodec-architecture folder (config.json, model.safetensors)."""
    from safetensors.numpy import save_file

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
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config = {
        "model_type": "encodec",
        "name": out.name,
        "sampling_rate": RATE,
        "audio_channels": 1,
        "num_filters": dim // 2,
        "filterbank": True,
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
    parser.add_argument("--tilt", type=float, default=0.6, help="perceptual weight exponent (0: plain MSE)")
    parser.add_argument("--clips", type=int, default=300, help="espeak-ng clips to synthesize")
    parser.add_argument("--iters", type=int, default=8, help="k-means iterations per stage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t = time.perf_counter()
    clips = training_speech(args.clips, args.seed)
    print(f"{len(clips)} clips, {sum(map(len, clips)) / RATE:.0f} s of speech ({time.perf_counter() - t:.0f} s)")
    encoder, decoder, books = fit(clips, args.hop, args.dim, args.stages, args.size, args.tilt, args.seed, args.iters)
    per_stage = np.log2(args.size) * RATE / args.hop / 1000
    used = [args.stages // 4, args.stages // 2, args.stages]
    config = save(args.out, encoder, decoder, books, args.hop, [u * per_stage for u in used])
    metrics: dict = {"frame_rate": RATE / args.hop, "kbps_per_stage": per_stage, "held_out": {}}
    held = held_out_speech()
    for u in used:
        snr, mel = [], []
        for clip in held.values():
            y = roundtrip(clip, encoder, decoder, books, u, args.hop)[args.hop :]
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
