#!/usr/bin/env python
"""Write the graph zoo: small models of the kinds users ship, in float ONNX and int8, seeded weights.

    python tools/make_graph_zoo.py OUT_DIR                 # every model, full size
    python tools/make_graph_zoo.py OUT_DIR --small         # small configs (for tests)
    python tools/make_graph_zoo.py OUT_DIR --only convnet

Models (torch modules and `transformers` configs, exported with torch's TorchScript exporter):
a 1-D convolutional audio front end (strided, grouped, dilated and transposed convolutions with
ELU, GELU and tanh), a small 2-D conv-net classifier, a MobileNet-style depthwise-separable net,
a conformer block, and BERT-shaped encoders of two widths. Each is written as ``NAME.onnx``
(float), ``NAME.qdq.onnx`` (onnxruntime's ``quantize_static``, QDQ form, calibrated on seeded
random inputs), ``NAME.qop.onnx`` (the same in operator form: QLinearConv, QGemm) and
``NAME.dyn.onnx`` (``quantize_dynamic``) where the quantizer applies.
``zoo.json`` lists every file with its input shapes and dtypes.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17


def _torch() -> Any:
    import torch

    return torch


def audio_cnn(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """A 1-D conv audio front end: strided, grouped, dilated and transposed convolutions."""
    nn = _torch().nn
    c = 16 if small else 64
    samples = 1600 if small else 16000

    class AudioFrontEnd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(1, c // 2, 10, stride=5, padding=3)
            self.c2 = nn.Conv1d(c // 2, c, 3, stride=2, padding=1, groups=4)
            self.c3 = nn.Conv1d(c, c, 3, padding=2, dilation=2)
            self.c4 = nn.Conv1d(c, c, 5, stride=2, padding=2, groups=c)  # depthwise
            self.up = nn.ConvTranspose1d(c, c // 2, 4, stride=2, padding=1)
            self.out = nn.Conv1d(c // 2, 16, 1)

        def forward(self, x: Any) -> Any:
            f = nn.functional
            x = f.elu(self.c1(x))
            x = f.gelu(self.c2(x))
            x = f.gelu(self.c3(x)) + x
            x = f.elu(self.c4(x))
            x = _torch().tanh(self.up(x))
            return self.out(x)

    return AudioFrontEnd(), {"audio": ([1, 1, samples], "float32")}


def convnet(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """A small 2-D conv-net image classifier (3x3 convolutions, strides, a dilated one, pooling)."""
    nn = _torch().nn
    side = 32 if small else 64
    w = 8 if small else 32
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, 10),
    )
    return model, {"image": ([1, 3, side, side], "float32")}


def mobilenet(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """MobileNet-style: depthwise 3x3 + pointwise 1x1 blocks with ReLU6, strided stages."""
    nn = _torch().nn
    side = 32 if small else 96
    widths = [8, 16, 16, 32] if small else [16, 32, 64, 64, 128, 128]

    def block(cin: int, cout: int, stride: int) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
            nn.ReLU6(),
            nn.Conv2d(cin, cout, 1),
            nn.ReLU6(),
        )

    layers = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), nn.ReLU6()]
    for i in range(1, len(widths)):
        layers.append(block(widths[i - 1], widths[i], 2 if i % 2 else 1))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10)]
    return nn.Sequential(*layers), {"image": ([1, 3, side, side], "float32")}


def conformer(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """One conformer block: half FFN, self-attention, convolution module (GLU, depthwise, SiLU), half FFN."""
    torch = _torch()
    nn = torch.nn
    d, frames, heads = (32, 20, 2) if small else (144, 100, 4)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ff1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
            self.norm_att = nn.LayerNorm(d)
            self.att = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm_conv = nn.LayerNorm(d)
            self.pw1 = nn.Conv1d(d, 2 * d, 1)
            self.dw = nn.Conv1d(d, d, 15, padding=7, groups=d)
            self.bn = nn.BatchNorm1d(d)
            self.pw2 = nn.Conv1d(d, d, 1)
            self.ff2 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
            self.norm_out = nn.LayerNorm(d)

        def forward(self, x: Any) -> Any:
            x = x + 0.5 * self.ff1(x)
            h = self.norm_att(x)
            x = x + self.att(h, h, h, need_weights=False)[0]
            h = self.norm_conv(x).transpose(1, 2)
            h = nn.functional.glu(self.pw1(h), dim=1)
            h = self.pw2(nn.functional.silu(self.bn(self.dw(h))))
            x = x + h.transpose(1, 2)
            x = x + 0.5 * self.ff2(x)
            return self.norm_out(x)

    block = Block()
    with torch.no_grad():  # running statistics that are not the identity
        block.bn.running_mean.uniform_(-0.1, 0.1)
        block.bn.running_var.uniform_(0.8, 1.2)
    return block, {"features": ([1, frames, d], "float32")}


def _encoder(width: int, layers: int, tokens: int) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    model = BertModel(config, add_pooling_layer=False)

    class Wrapped(_torch().nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Wrapped(), {"input_ids": ([1, tokens], "int64"), "attention_mask": ([1, tokens], "int64")}


def encoder_320(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """A 5-layer BERT-shaped encoder, d=320 (2 layers, d=64 small), 40 tokens."""
    return _encoder(64, 2, 16) if small else _encoder(320, 5, 40)


def encoder_512(small: bool) -> tuple[Any, dict[str, tuple[list[int], str]]]:
    """A 3-layer DistilBERT-shaped encoder, d=512 (1 layer, d=128 small), 40 tokens."""
    return _encoder(128, 1, 16) if small else _encoder(512, 3, 40)


# name -> (builder, int8 forms written)
MODELS: dict[str, tuple[Callable[[bool], Any], tuple[str, ...]]] = {
    "audio_cnn": (audio_cnn, ("qdq", "dyn")),
    "convnet": (convnet, ("qdq", "qop", "dyn")),
    "mobilenet": (mobilenet, ("qdq",)),
    "conformer": (conformer, ("dyn",)),
    "encoder_320": (encoder_320, ("dyn",)),
    "encoder_512": (encoder_512, ("dyn", "qdq")),
}


def sample_inputs(inputs: dict[str, tuple[list[int], str]], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: normal floats, token ids below 1000, an all-ones mask with a padded tail."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in inputs.items():
        if name == "attention_mask":
            mask = np.ones(shape, np.int64)
            mask[..., -2:] = 0
            feeds[name] = mask
        elif dtype == "int64":
            feeds[name] = rng.integers(1, 1000, shape).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _export(model: Any, inputs: dict[str, tuple[list[int], str]], path: Path, seed: int) -> None:
    torch = _torch()
    torch.manual_seed(seed)
    for p in model.parameters():  # re-seeded after construction: the same weights on every machine
        torch.nn.init.normal_(p, 0.0, 0.02 if p.dim() > 1 and p.shape[-1] >= 64 else 0.2)
    model.eval()
    args = tuple(torch.from_numpy(v) for v in sample_inputs(inputs, seed).values())
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, args, buf, input_names=list(inputs), output_names=["output"], opset_version=OPSET, dynamo=False
        )
    path.write_bytes(buf.getvalue())


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a few seeded inputs."""

    def __init__(self, inputs: dict[str, tuple[list[int], str]], count: int = 4) -> None:
        self.batches = iter([sample_inputs(inputs, 100 + i) for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _quiet_quantizer() -> None:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per 1-D weight through the root logger


def _quantize(src: Path, form: str, inputs: dict[str, tuple[list[int], str]], out: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet_quantizer()
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    try:
        if form == "dyn":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
        elif form == "qop":  # the operator form: QLinearConv, QLinearMatMul
            quantize_static(
                str(pre),
                str(out),
                _Calibration(inputs),
                quant_format=QuantFormat.QOperator,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_static(
                str(pre),
                str(out),
                _Calibration(inputs),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
    finally:
        pre.unlink(missing_ok=True)


def write(out_dir: Path, only: list[str] | None = None, small: bool = False, int8: bool = True) -> dict[str, Any]:
    """Write the chosen models (and their int8 forms) into ``out_dir``; return the index written to zoo.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for seed, name in enumerate(only or list(MODELS)):
        builder, forms = MODELS[name]
        model, inputs = builder(small)
        path = out_dir / f"{name}.onnx"
        _export(model, inputs, path, seed)
        shapes = {k: {"shape": s, "dtype": d} for k, (s, d) in inputs.items()}
        index[name] = {"file": path.name, "inputs": shapes, "seed": seed}
        for form in forms if int8 else ():
            qpath = out_dir / f"{name}.{form}.onnx"
            _quantize(path, form, inputs, qpath)
            index[f"{name}.{form}"] = {"file": qpath.name, "inputs": shapes, "seed": seed}
    (out_dir / "zoo.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main() -> None:
    """Command line: write the zoo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", action="append", choices=sorted(MODELS))
    parser.add_argument("--small", action="store_true", help="small configs (tests)")
    parser.add_argument("--no-int8", action="store_true", help="float models only")
    args = parser.parse_args()
    for name, entry in write(args.out_dir, args.only, args.small, not args.no_int8).items():
        print(f"{name}: {args.out_dir / entry['file']}")


if __name__ == "__main__":
    main()
