"""Mimi (Kyutai's streaming speech codec), the whole `transformers` MimiModel path, compiled for streaming.

    encode:  h = SEANetEncoder(audio)                      causal convs, residual units, ELU (25 Hz at 24 kHz)
             h = Transformer_enc(h)                        causal, RoPE, LayerScale, sliding window, KV cache
             z = Downsample(h)                             conv, kernel 2s, stride s, replicate start (12.5 Hz)
             codes = [RVQ_sem(P_sem z), RVQ_ac(P_ac z)]    split RVQ: both stages quantize z through their
                                                           own input projection (not each other's residual)
    decode:  z = O_sem Σ C_sem[codes] + O_ac Σ C_ac[codes]
             h = Upsample(z)                               depthwise transposed conv, kernel 2s, stride s
             audio = SEANetDecoder(Transformer_dec(h))

Tensors are time-major, batch 1, as in `edgert.families.codec.model`, whose streaming layers (causal convs,
transposed convs, the SEANet stacks and the Mimi transformer) this module reuses. The state of a
chunk is one flat float32 vector: every conv's look-back, then the transformer's keys and values of
its last ``sliding_window`` frames and the stream position (a float, exact below 2**24 frames).
A chunk is a whole number of code frames (``hop_length`` samples, 1920 at 24 kHz).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.codec.model import (
    ChunkEntries,
    SEANet,
    StreamConv,
    StreamConvTranspose,
    _decoder_layers,
    _encoder_layers,
    _get,
    _State,
    _state_size,
    _walk,
    encodec_weights,
    streaming_spec,
)
from edgert.families.codec.transformer import StreamingTransformer, TransformerConfig, mimi_transformer_weights


@dataclass
class MimiCodecConfig:
    """Hyper-parameters of a Mimi-architecture codec (names follow `transformers`' MimiConfig)."""

    name: str = "mimi"
    sampling_rate: int = 24000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    pad_mode: str = "constant"
    compress: int = 2
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    latent_stride: int = 2
    transformer: dict[str, Any] = field(default_factory=dict)
    num_lstm_layers: int = 0  # SEANet without LSTM (the shared layer builders read it)
    activation: str = "elu"  # the shared SEANet builders read these two; Mimi is always ELU SEANet
    filterbank: bool = False

    @property
    def min_codebooks(self) -> int:
        """Fewest codebooks a frame may carry: the semantic ones."""
        return self.num_semantic_quantizers

    @property
    def seanet_hop(self) -> int:
        """Audio samples per SEANet frame (the transformers' rate)."""
        return int(np.prod(self.upsampling_ratios))

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame."""
        return self.seanet_hop * self.latent_stride

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sampling_rate / self.hop_length

    @property
    def transformer_config(self) -> TransformerConfig:
        """The encoder's and decoder's transformer (they share one shape)."""
        return TransformerConfig(**self.transformer)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MimiCodecConfig:
        """Read a `transformers` MimiConfig JSON (or a dict written by `to_dict`); refuse what cannot stream."""
        if "transformer" in raw:  # written by to_dict
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in raw.items() if k in known})
        if raw.get("model_type") != "mimi":
            raise UnsupportedModelError(f"model type '{raw.get('model_type')}' is not a Mimi codec")
        if not raw.get("use_causal_conv", True):
            raise UnsupportedModelError("non-causal codecs cannot stream; edgert compiles causal ones")
        if raw.get("pad_mode", "constant") != "constant":
            raise UnsupportedModelError(f"Mimi pad_mode '{raw['pad_mode']}' is not supported (edgert: constant)")
        if float(raw.get("trim_right_ratio", 1.0)) != 1.0:
            raise UnsupportedModelError("Mimi trim_right_ratio must be 1.0 (all of the transposed convs' tail trimmed)")
        known = {f for f in cls.__dataclass_fields__ if f not in ("transformer", "latent_stride", "name")}
        values = {k: raw[k] for k in known if raw.get(k) is not None}
        cfg = cls(**values)
        hop = cfg.seanet_hop
        if cfg.sampling_rate % hop:
            raise UnsupportedModelError(f"sampling rate {cfg.sampling_rate} is not a whole number of hops of {hop}")
        # MimiConfig: the SEANet rate rounded up, the frame rate given or one downsampling by 2.
        seanet_rate = math.ceil(cfg.sampling_rate / hop)
        frame_rate = raw.get("frame_rate") or raw.get("_frame_rate") or cfg.sampling_rate / (2 * hop)
        cfg.latent_stride = int(seanet_rate / frame_rate)
        if cfg.latent_stride < 1:
            raise UnsupportedModelError(f"frame rate {frame_rate} is above the SEANet rate {seanet_rate}")
        if cfg.codebook_dim != cfg.vector_quantization_hidden_dimension:
            raise UnsupportedModelError("codebook_dim must equal vector_quantization_hidden_dimension")
        if not 1 <= cfg.num_semantic_quantizers < cfg.num_quantizers:
            raise UnsupportedModelError("Mimi needs 1 <= num_semantic_quantizers < num_quantizers")
        if cfg.hidden_size % cfg.upsample_groups:
            raise UnsupportedModelError(f"upsample_groups {cfg.upsample_groups} does not divide {cfg.hidden_size}")
        cfg.transformer = asdict(TransformerConfig.from_mimi(raw))
        return cfg


class ReplicateConv(StreamConv):
    """Causal conv whose left context at the start of a signal repeats the first row (``pad_mode="replicate"``)."""

    def start_rows(self) -> np.ndarray:
        return np.zeros(self.context, dtype="int32")


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        self.embed = nn.Parameter((size, dim), "float32")  # embed_sum / cluster_usage of the source


class _VQ(nn.Module):
    def __init__(self, size: int, dim: int):
        self.codebook = _Codebook(size, dim)


class ResidualQuantizer(nn.Module):
    """One RVQ of Mimi's split quantizer, with its 1x1 input and output projections (absent when
    the quantizer's dimension equals the model's)."""

    def __init__(self, cfg: MimiCodecConfig, stages: int):
        self.size = cfg.codebook_size
        dim = cfg.vector_quantization_hidden_dimension
        projected = dim != cfg.hidden_size
        self.input_proj = nn.Linear(cfg.hidden_size, dim, bias=False) if projected else None
        self.output_proj = nn.Linear(dim, cfg.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleList([_VQ(cfg.codebook_size, cfg.codebook_dim) for _ in range(stages)])

    def encode(self, z: Tensor) -> Tensor:
        """Codes ``(frames, stages)``: each stage takes the nearest code to the residual."""
        residual = self.input_proj(z) if self.input_proj is not None else z
        codes = []
        for layer in self.layers:
            embed = layer.codebook.embed
            # |r|² - 2 r·e + |e|², as torch.cdist computes it for codebooks over 25 entries.
            dist = (
                op.sum(op.square(residual), axis=1, keepdims=True)
                - 2.0 * op.matmul(residual, op.permute_dims(embed))
                + op.reshape(op.sum(op.square(embed), axis=1), (1, self.size))
            )
            idx = op.astype(op.wrap_nested(relax.op.argmin(dist._expr, axis=1, keepdims=False), "argmin"), "int32")
            residual = residual - op.wrap_nested(relax.op.take(embed._expr, idx._expr, axis=0, mode="clip"), "codeword")
            codes.append(op.reshape(idx, (-1, 1)))
        return op.concat(codes, dim=1) if len(codes) > 1 else codes[0]

    def project_out(self, summed: Tensor) -> Tensor:
        """The output projection of a sum of codewords."""
        return self.output_proj(summed) if self.output_proj is not None else summed


class SplitQuantizer(nn.Module):
    """Mimi's split RVQ: the first ``num_semantic_quantizers`` codebooks in one RVQ, the rest in another."""

    def __init__(self, cfg: MimiCodecConfig):
        self.cfg = cfg
        self.semantic_residual_vector_quantizer = ResidualQuantizer(cfg, cfg.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualQuantizer(
            cfg, cfg.num_quantizers - cfg.num_semantic_quantizers
        )

    def encode(self, z: Tensor) -> Tensor:
        """Codes ``(frames, num_quantizers)`` int32 of latents ``z`` (frames, hidden)."""
        sem = self.semantic_residual_vector_quantizer.encode(z)
        acoustic = self.acoustic_residual_vector_quantizer.encode(z)
        return op.concat([sem, acoustic], dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """Latents of the first ``codes.shape[1]`` codebooks (at least the semantic ones)."""
        cfg = self.cfg
        frames, used = codes.shape
        books = [
            layer.codebook.embed
            for rvq in (self.semantic_residual_vector_quantizer, self.acoustic_residual_vector_quantizer)
            for layer in rvq.layers
        ]
        table = op.reshape(
            op.concat([op.reshape(e, (1, -1)) for e in books], dim=0),
            (cfg.num_quantizers * cfg.codebook_size, cfg.codebook_dim),
        )
        index = op.arange(0, used, dtype="int32")
        flat = op.reshape(codes + op.reshape(index * cfg.codebook_size, (1, used)), (-1,))
        rows = op.reshape(
            op.wrap_nested(relax.op.take(table._expr, flat._expr, axis=0, mode="clip"), "codewords"),
            (frames, used, cfg.codebook_dim),
        )
        # The number of codebooks is symbolic, so the split is a 0/1 weight per codebook (exact) rather
        # than two slices, one of which may be empty.
        semantic = op.astype(
            op.wrap_nested(relax.op.less(index._expr, relax.const(cfg.num_semantic_quantizers, "int32")), "sem"),
            "float32",
        )
        semantic = op.reshape(semantic, (1, used, 1))
        sem_sum = op.sum(rows * semantic, axis=1)
        acoustic_sum = op.sum(rows * (1.0 - semantic), axis=1)
        return self.semantic_residual_vector_quantizer.project_out(
            sem_sum
        ) + self.acoustic_residual_vector_quantizer.project_out(acoustic_sum)


def _transformer_step(net: StreamingTransformer, x: Tensor, state: _State) -> Tensor:
    """Run the transformer over a chunk with its KV cache and position taken from (and put back into) the state."""
    cfg = net.cfg
    layers, heads, hd, window = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    k_cache = op.reshape(state.take(layers * heads * hd, window), (layers, heads, hd, window))
    v_cache = op.reshape(state.take(layers * heads * window, hd), (layers, heads, window, hd))
    position = op.reshape(state.take(1, 1), (1,))
    y, k_next, v_next = net(x, k_cache, v_cache, position)
    state.put(k_next)
    state.put(v_next)
    # The chunk's frame count as a one-element arange (exact as float32 below 2**24): a sum of ones
    # is a reduction that reads no buffer, on which dlight's GPU Reduction rule asserts.
    frames = op.astype(op.arange(x.shape[0], x.shape[0] + 1, dtype="int32"), "float32")
    state.put(position + frames)
    return y


def _transformer_state_size(cfg: TransformerConfig) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * cfg.sliding_window + 1


class MimiCodec(ChunkEntries, nn.Module):
    """Mimi-architecture codec with streaming entry points ``encode`` and ``decode`` (as `CodecModel`)."""

    def __init__(self, cfg: MimiCodecConfig):
        if cfg.audio_channels != 1:
            raise UnsupportedModelError(f"{cfg.audio_channels}-channel codecs are not supported (edgert: mono)")
        self.cfg = cfg
        tcfg = cfg.transformer_config
        if tcfg.hidden_size != cfg.hidden_size:
            raise UnsupportedModelError("the transformer's width must equal the codec's hidden_size")
        s, d = cfg.latent_stride, cfg.hidden_size
        self.encoder_seanet = SEANet(_encoder_layers(cfg))  # type: ignore[arg-type]
        self.encoder_transformer = StreamingTransformer(tcfg)
        self.downsample = ReplicateConv(d, d, 2 * s, stride=s) if s > 1 else None
        self.quantizer = SplitQuantizer(cfg)
        self.upsample = StreamConvTranspose(d, d, 2 * s, s) if s > 1 else None
        self.decoder_transformer = StreamingTransformer(tcfg)
        self.decoder_seanet = SEANet(_decoder_layers(cfg))  # type: ignore[arg-type]
        self.encoder_state_size = (
            _state_size(self.encoder_seanet)
            + _transformer_state_size(tcfg)
            + (self.downsample.state_size if self.downsample is not None else 0)
        )
        self.decoder_state_size = (
            (self.upsample.state_size if self.upsample is not None else 0)
            + _transformer_state_size(tcfg)
            + _state_size(self.decoder_seanet)
        )

    def encode(self, audio: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """``audio`` (n,) with n a multiple of the hop -> (codes (n/hop, Q) int32, next state)."""
        bag = _State(state, first)
        h = self.encoder_seanet(op.reshape(audio, (audio.shape[0], 1)), bag)
        h = _transformer_step(self.encoder_transformer, h, bag)
        z = self.downsample(h, bag) if self.downsample is not None else h
        return self.quantizer.encode(z), bag.result()

    def decode(self, codes: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """``codes`` (frames, q <= Q) int32 -> (audio (frames * hop,), next state)."""
        bag = _State(state, first)
        z = self.quantizer.decode(codes)
        h = self.upsample(z, bag) if self.upsample is not None else z
        h = _transformer_step(self.decoder_transformer, h, bag)
        y = self.decoder_seanet(h, bag)
        return op.reshape(y, (codes.shape[0] * self.cfg.hop_length,)), bag.result()

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """The same streaming entry points as the EnCodec family's."""
        return streaming_spec(self)


# ---------------------------------------------------------------------------------------------
# Weights: `transformers`' MimiModel state dict -> this module's parameters.

# This module's top-level names -> the MimiModel's (the split encoder/decoder layout of transformers 5,
# then the flat one of earlier checkpoints).
_SOURCES = {
    "encoder_seanet": ("encoder.encoder_seanet", "encoder"),
    "encoder_transformer": ("encoder.encoder_transformer", "encoder_transformer"),
    "downsample": ("encoder.downsample", "downsample"),
    "upsample": ("decoder.upsample", "upsample"),
    "decoder_transformer": ("decoder.decoder_transformer", "decoder_transformer"),
    "decoder_seanet": ("decoder.decoder_seanet", "decoder"),
    "quantizer": ("quantizer", "quantizer"),
}


def _layout(tensors: dict[str, np.ndarray]) -> int:
    """0: the split layout of transformers 5, 1: the flat one of earlier checkpoints."""
    return 0 if any(k.startswith("encoder.encoder_seanet.") for k in tensors) else 1


def _renamed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict under this module's names (either source layout)."""
    layout = _layout(tensors)
    out = {}
    for mine, sources in _SOURCES.items():
        prefix = sources[layout] + "."
        for key, value in tensors.items():
            if key.startswith(prefix):
                out[f"{mine}.{key[len(prefix) :]}"] = value
    return out


def _dense_groups(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped transposed-conv weight ``(in, out/groups, k)`` as the dense ``(in, out, k)`` one.

    The zeros add exactly nothing, so the dense transposed conv equals the grouped one; it lets the
    shared transposed-conv layer (one matmul over its taps) serve Mimi's depthwise upsampling.
    """
    cin, per_out, k = weight.shape
    per_in = cin // groups
    dense = np.zeros((cin, per_out * groups, k), np.float32)
    for g in range(groups):
        dense[g * per_in : (g + 1) * per_in, g * per_out : (g + 1) * per_out] = weight[g * per_in : (g + 1) * per_in]
    return dense


def mimi_weights(tensors: dict[str, np.ndarray], model: MimiCodec) -> dict[str, np.ndarray]:
    """Map a MimiModel state dict onto ``model``'s parameter names (nothing left unmapped)."""
    try:
        return _mimi_weights(tensors, model)
    except ModelFileError as exc:  # name the weight as the checkpoint does
        message, layout = str(exc), _layout(tensors)
        for mine, sources in _SOURCES.items():
            message = message.replace(f"'{mine}.", f"'{sources[layout]}.")
        raise ModelFileError(message) from exc


def _mimi_weights(tensors: dict[str, np.ndarray], model: MimiCodec) -> dict[str, np.ndarray]:
    cfg = model.cfg
    src = _renamed(tensors)
    d = cfg.hidden_size
    # Mimi's down/upsampling convs have no bias; the shared layers have one: zero.
    if model.downsample is not None:
        src["downsample.conv.bias"] = np.zeros(d, np.float32)
    if model.upsample is not None:
        w = _get(src, "upsample.conv.weight")
        if w.shape != (d, d // cfg.upsample_groups, 2 * cfg.latent_stride):
            raise ModelFileError(
                f"'upsample' has shape {w.shape}, expected {(d, d // cfg.upsample_groups, 2 * cfg.latent_stride)}"
            )
        src["upsample.conv.weight"] = _dense_groups(w, cfg.upsample_groups)
        src["upsample.conv.bias"] = np.zeros(d, np.float32)
    out = encodec_weights(src, model)  # type: ignore[arg-type]  # the convs and transposed convs
    for path, sub in _walk(model):
        if isinstance(sub, _Codebook):
            usage = _get(src, f"{path}.cluster_usage")
            out[f"{path}.embed"] = _get(src, f"{path}.embed_sum") / np.maximum(usage, np.float32(1e-5))[:, None]
    for name in ("encoder_transformer", "decoder_transformer"):
        for key, value in mimi_transformer_weights(src, name, cfg.transformer_config).items():
            out[f"{name}.{key}"] = value
    for rvq in ("semantic", "acoustic"):
        for proj in ("input_proj", "output_proj"):
            key = f"quantizer.{rvq}_residual_vector_quantizer.{proj}.weight"
            if getattr(getattr(model.quantizer, f"{rvq}_residual_vector_quantizer"), proj) is not None:
                w = _get(src, key)
                out[key] = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]))
    return out


def first_chunk(cfg: MimiCodecConfig) -> tuple[int, int]:
    """(samples, frames) of the first encode / decode chunk: one frame (zero and replicate padding need no more)."""
    return cfg.hop_length, 1
