#!/usr/bin/env python3
"""Build Mimi-architecture reference codecs with seeded random weights (PyTorch, `transformers`).

No Mimi weights ship in any package, so the reference is the architecture itself: `transformers`'
MimiModel from a small MimiConfig, its convolution and transformer weights from the library's own
seeded initialisation (layer scales raised from 0.01 so the transformers matter, the last conv
scaled so that the output peaks near 0.5), and codebooks drawn from the quantizers' projected
latents of seeded noise (so that codes are used and the nearest code is well separated).

    tools/make_mimi_reference.py OUT_DIR [--preset tiny|small] [--seed N]

writes OUT_DIR/model.safetensors (the state dict as transformers names it) and OUT_DIR/config.json
(the MimiConfig). Needs torch (test extras: pip install torch==2.13.0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_codec_reference import save  # the same safetensors + config.json writer

_COMMON = dict(
    sampling_rate=24000,
    upsampling_ratios=[8, 6, 5, 4],  # hop 960: 25 Hz SEANet frames, 12.5 Hz codes after downsampling by 2
    num_semantic_quantizers=1,
    layer_scale_initial_scale=0.5,
)
PRESETS = {
    # For tests: compiles in seconds, still every layer kind Mimi has.
    "tiny": dict(
        _COMMON,
        num_filters=4,
        hidden_size=32,
        codebook_size=64,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=8,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        sliding_window=8,
    ),
    # For benchmarks: Mimi's layout at a quarter of its width, 8 codebooks.
    "small": dict(
        _COMMON,
        num_filters=16,
        hidden_size=128,
        codebook_size=256,
        codebook_dim=64,
        vector_quantization_hidden_dimension=64,
        num_quantizers=8,
        upsample_groups=128,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        sliding_window=64,
    ),
}


def build(preset: str = "tiny", seed: int = 0):
    """A seeded MimiModel (eval mode, eager attention) for ``preset``."""
    import torch
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    config = MimiConfig(**PRESETS[preset])
    config._attn_implementation = "eager"
    model = MimiModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Noise only: periodic audio repeats frames, which would make near-duplicate codewords (ties).
        # At least one frame per code, twice over (the codewords are distinct frames).
        frames = max(32, 2 * config.codebook_size)
        audio = 0.3 * torch.randn(frames * config.frame_size, generator=gen)
        latents = model.encoder(audio.view(1, 1, -1)).latents  # (1, hidden, frames)
        for rvq in (
            model.quantizer.semantic_residual_vector_quantizer,
            model.quantizer.acoustic_residual_vector_quantizer,
        ):
            residual = (rvq.input_proj(latents) if rvq.input_proj is not None else latents)[0].T  # (frames, dim)
            for layer in rvq.layers:
                pick = torch.randperm(residual.shape[0], generator=gen)[: config.codebook_size]
                embed = residual[pick] + 0.1 * residual.std() * torch.randn(len(pick), residual.shape[1], generator=gen)
                # A usage other than one, so that the mapping's embed_sum / cluster_usage is exercised.
                usage = 0.5 + torch.rand(config.codebook_size, generator=gen)
                layer.codebook.cluster_usage.copy_(usage)
                layer.codebook.embed_sum.copy_(embed * usage[:, None])
                layer.codebook._embed = None
                codes = layer.codebook.encode(residual[None])[0]
                residual = residual - layer.codebook.embed[codes]
        # Random weights make loud output (peaks of tens); scale the last conv so it peaks near 0.5, as audio.
        head = audio[: 32 * config.frame_size].view(1, 1, -1)
        peak = model.decode(model.encode(head).audio_codes).audio_values.abs().max()
        last = model.decoder.decoder_seanet.layers[-1].conv
        last.weight.mul_(0.5 / peak)
        last.bias.mul_(0.5 / peak)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save(build(args.preset, args.seed), args.out)
    print(f"wrote {args.out}/model.safetensors and config.json")


if __name__ == "__main__":
    main()
