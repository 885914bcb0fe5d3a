#!/usr/bin/env python3
"""Export an EnCodec-architecture reference codec (tools/make_codec_reference.py) to ONNX.

    tools/export_codec_onnx.py CODEC_DIR OUT.onnx [--samples 8000] [--bandwidth KBPS] [--part encoder]

The graph maps ``audio`` (1, 1, samples) to ``codes`` (1, codebooks, frames) and ``audio_out``
(1, 1, samples): encode, residual quantization and decode, as `transformers` computes them.
``--part encoder`` exports the encoder alone: ``audio`` to ``latents`` (1, dim, frames), the
part an NPU takes (the quantizer's nearest-code search and the decoder stay elsewhere).
torch's TorchScript exporter writes the causal padding as shape arithmetic (Shape, Ceil, Pad);
onnxruntime's basic graph optimisation (standard ONNX operators only) then folds it for the fixed
input length, so that the graph has static shapes that an ahead-of-time compiler can take.
Needs torch, transformers and onnxruntime (test extras).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def export(
    codec_dir: Path, out: Path, samples: int = 8000, bandwidth: float | None = None, part: str = "roundtrip"
) -> Path:
    """Write the folded ONNX graph of the codec in ``codec_dir`` to ``out``."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import load_file
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(**json.loads((codec_dir / "config.json").read_text()))
    model = EncodecModel(config).eval()
    model.load_state_dict(load_file(str(codec_dir / "model.safetensors")))
    bandwidth = bandwidth or max(config.target_bandwidths)

    class Roundtrip(torch.nn.Module):
        def __init__(self, codec: EncodecModel):
            super().__init__()
            self.codec = codec

        def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            codes = self.codec.encode(audio, bandwidth=bandwidth)[0][0]
            return codes, self.codec.decoder(self.codec.quantizer.decode(codes.transpose(0, 1)))

    class Encoder(torch.nn.Module):
        def __init__(self, codec: EncodecModel):
            super().__init__()
            self.encoder = codec.encoder

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            return self.encoder(audio)

    if part not in ("roundtrip", "encoder"):
        raise ValueError(f"part must be 'roundtrip' or 'encoder', not {part!r}")
    module, names = (Roundtrip(model), ["codes", "audio_out"]) if part == "roundtrip" else (Encoder(model), ["latents"])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            module.eval(),
            (torch.zeros(1, 1, samples),),
            str(raw),
            dynamo=False,
            input_names=["audio"],
            output_names=names,
            opset_version=17,
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("codec_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--bandwidth", type=float, default=None)
    parser.add_argument("--part", choices=["roundtrip", "encoder"], default="roundtrip")
    args = parser.parse_args()
    export(args.codec_dir, args.out, args.samples, args.bandwidth, args.part)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
