#!/usr/bin/env python
"""Write a tiny Marian (MarianMT) model with seeded random weights: config.json + model.safetensors.

    python tools/make_tiny_marian.py OUT_DIR [--seed 0]

No Marian weights ship in any package here, so the encoder-decoder path is checked for
correctness against transformers' own MarianMTModel on these random weights (not for quality).
Needs torch and transformers (the test extras).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG = {
    "vocab_size": 96,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 128,
    "activation_function": "swish",
    "scale_embedding": True,
    "pad_token_id": 95,
    "eos_token_id": 0,
    "decoder_start_token_id": 95,
    "forced_eos_token_id": 0,
}
# transformers' own init (std 0.02, unit layer norms) gives nearly flat logits and the same
# token at every step; wider weights and jittered layer norms make outputs depend on the
# source, greedy and beam search differ, and near-ties (where rounding could flip a choice) rare.
WEIGHT_STD = 0.2
NORM_JITTER = 0.3


def make(out: Path, seed: int = 0, eos_bias: float = 0.0) -> Path:
    """Build the model from a MarianConfig with ``seed`` and save it in ``out``.

    ``eos_bias`` raises the end token's logit, so sequences end early (tests of finished beams).
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    config = MarianConfig(**CONFIG)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + NORM_JITTER * torch.randn_like(param))
            else:
                param.normal_(0.0, WEIGHT_STD)
        model.final_logits_bias.normal_(0.0, WEIGHT_STD)  # a buffer, not a parameter
        model.final_logits_bias[0, config.eos_token_id] += eos_bias
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    config_path = out / "config.json"
    raw = json.loads(config_path.read_text())
    raw.setdefault("model_type", "marian")
    config_path.write_text(json.dumps(raw, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-bias", type=float, default=0.0, help="added to the end token's logit bias")
    args = parser.parse_args()
    print(make(args.out, args.seed, args.eos_bias))


if __name__ == "__main__":
    main()
