#!/usr/bin/env python3
"""Build EnCodec-architecture reference codecs with seeded random weights (PyTorch, `transformers`).

No pretrained codec weights ship in any package, so the reference is the architecture itself:
`transformers`' EncodecModel from a small EncodecConfig, its convolution and LSTM weights from
the library's own seeded initialisation, and codebooks drawn from the encoder's outputs on
seeded noise (so that codes are used and the nearest code is well separated).

    tools/make_codec_reference.py OUT_DIR [--preset tiny|small] [--seed N]

writes OUT_DIR/model.safetensors (the state dict as transformers names it) and
OUT_DIR/config.json (the EncodecConfig). Needs torch (test extras: pip install torch==2.13.0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = {
    # For tests: compiles in seconds, still every layer kind EnCodec has.
    "tiny": dict(
        num_filters=4,
        hidden_size=32,
        upsampling_ratios=[8, 5, 4, 2],
        codebook_size=64,
        target_bandwidths=[0.9, 1.8, 3.6],
    ),
    # For benchmarks: EnCodec 24 kHz's layout at half width.
    "small": dict(
        num_filters=16,
        hidden_size=64,
        upsampling_ratios=[8, 5, 4, 2],
        codebook_size=256,
        target_bandwidths=[1.2, 2.4, 4.8],
    ),
}


def build(preset: str = "tiny", seed: int = 0, pad_mode: str = "reflect"):
    """A seeded EncodecModel (eval mode) for ``preset``."""
    import torch
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    config = EncodecConfig(**PRESETS[preset], pad_mode=pad_mode)
    model = EncodecModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Noise only: periodic audio repeats frames, which would make near-duplicate codewords (ties).
        # At least 2 s, and at least one frame per code (the codewords are distinct frames).
        seconds = max(2, -(-2 * config.codebook_size * config.hop_length // config.sampling_rate))
        audio = 0.3 * torch.randn(seconds * config.sampling_rate, generator=gen)
        residual = model.encoder(audio.view(1, 1, -1))[0].T  # (frames, dim)
        for layer in model.quantizer.layers:
            pick = torch.randperm(residual.shape[0], generator=gen)[: config.codebook_size]
            embed = residual[pick] + 0.1 * residual.std() * torch.randn(len(pick), residual.shape[1], generator=gen)
            layer.codebook.embed.copy_(embed)
            layer.codebook.embed_avg.copy_(embed)
            codes = layer.codebook.encode(residual[None])[0]
            residual = residual - embed[codes]
    return model


def save(model, out: Path) -> None:
    """The state dict as safetensors and the config as JSON, in ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad-mode", choices=["reflect", "constant"], default="reflect")
    args = parser.parse_args()
    save(build(args.preset, args.seed, args.pad_mode), args.out)
    print(f"wrote {args.out}/model.safetensors and config.json")


if __name__ == "__main__":
    main()
