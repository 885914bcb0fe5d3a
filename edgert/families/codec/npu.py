"""The trained filterbank codec's encoder as an ONNX graph for the NPU path (Ethos-U through Vela,
phones through a TFLite delegate); its gain-shape RVQ and its decoder stay on the CPU in float.

`codec-speech16k` (tools/fit_codec.py) encodes with one strided analysis conv (1 -> 2*filters,
kernel 2*hop, stride hop, causal: hop zeros first) and a 1x1 conv; both are linear, so the graph
folds them into one product. A stride of ``hop`` (160) is far beyond what Ethos-U convolutions take
(Vela: stride <= 3), so the graph cuts the audio into blocks of ``hop`` samples instead and runs a
kernel-2, stride-1 conv over the blocks (frame t = blocks t and t+1): the same sums, all on the NPU.

    audio [1, 1, (frames + 1) * hop]   the first hop samples are the previous call's last block
      -> Reshape [1, frames + 1, hop] -> Transpose [1, hop, frames + 1]
      -> Conv (k 2, weight = W1 . W0 regrouped as [dim, hop, 2]) -> latents [1, dim, frames]

Feeding the previous block (zeros at the start) makes consecutive calls equal to one long causal
encode, as the family's streaming encoder computes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ModelFileError

ENCODER_INPUT = "audio"
ENCODER_OUTPUT = "latents"


def encoder_weights(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(weight [dim, 2*hop], bias [dim], hop) of a filterbank codec's encoder, its two convs folded."""
    from safetensors.numpy import load_file

    from edgert.families.codec.model import CodecConfig, _get, _weight_norm

    folder = Path(folder)
    cfg = CodecConfig.from_dict(json.loads((folder / "config.json").read_text()))
    linear = cfg.filterbank and cfg.activation == "none" and len(cfg.upsampling_ratios) == 1
    if not linear or cfg.audio_channels != 1 or cfg.pad_mode != "constant":
        raise ModelFileError(f"{folder.name}: not a mono zero-padded filterbank codec (its encoder is not one conv)")
    tensors = load_file(str(folder / "model.safetensors"))
    w0 = _weight_norm(tensors, "encoder.layers.0.conv").astype(np.float64)  # [width, 1, 2*hop]
    w1 = _weight_norm(tensors, "encoder.layers.1.conv").astype(np.float64)  # [dim, width, k]
    if w1.shape[2] != 1:
        raise ModelFileError(f"{folder.name}: the encoder's second conv has kernel {w1.shape[2]}, expected 1")
    b0 = _get(tensors, "encoder.layers.0.conv.bias").astype(np.float64)
    b1 = _get(tensors, "encoder.layers.1.conv.bias").astype(np.float64)
    weight = w1[:, :, 0] @ w0[:, 0, :]
    bias = w1[:, :, 0] @ b0 + b1
    return weight.astype(np.float32), bias.astype(np.float32), int(cfg.upsampling_ratios[0])


def encoder_onnx(folder: Path, frames: int) -> Any:
    """The encoder of the filterbank codec in ``folder`` for ``frames`` frames per call, as ONNX."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias, hop = encoder_weights(folder)
    dim = weight.shape[0]
    # weight[o, k * hop + j] multiplies sample j of block t + k: a conv over blocks with kernel 2.
    kernel = np.ascontiguousarray(weight.reshape(dim, 2, hop).transpose(0, 2, 1))
    inits = [
        numpy_helper.from_array(np.array([1, frames + 1, hop], np.int64), "blocks.shape"),
        numpy_helper.from_array(kernel, "analysis.weight"),
        numpy_helper.from_array(bias, "analysis.bias"),
    ]
    nodes = [
        helper.make_node("Reshape", [ENCODER_INPUT, "blocks.shape"], ["blocks"], name="blocks"),
        helper.make_node("Transpose", ["blocks"], ["blocks.t"], name="blocks.t", perm=[0, 2, 1]),
        helper.make_node(
            "Conv",
            ["blocks.t", "analysis.weight", "analysis.bias"],
            [ENCODER_OUTPUT],
            name="analysis",
            kernel_shape=[2],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "codec_encoder",
        [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.FLOAT, [1, 1, (frames + 1) * hop])],
        [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, [1, dim, frames])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def encoder_windows(audio: np.ndarray, hop: int, frames: int) -> list[np.ndarray]:
    """The encoder graph's inputs covering ``audio`` (zero-padded to whole calls): each window is the
    previous block (zeros first) and ``frames`` new blocks."""
    step = frames * hop
    padded = np.zeros(hop + -(-len(audio) // step) * step, np.float32)
    padded[hop : hop + len(audio)] = audio
    return [padded[i : i + step + hop][None, None] for i in range(0, len(padded) - hop, step)]
