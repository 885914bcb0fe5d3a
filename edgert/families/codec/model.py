"""Neural audio codecs of the EnCodec (SEANet + RVQ) architecture, compiled for streaming.

    encode:  z = Encoder(audio)                      causal convs, residual units, ELU, LSTM
             codes[:, i] = argmin_c ||r_i - C_i[c]||   r_0 = z, r_{i+1} = r_i - C_i[codes[:, i]]
    decode:  audio = Decoder(sum_i C_i[codes[:, i]])  causal transposed convs, residual units

Tensors are time-major, ``(frames, channels)``, batch 1. Every layer that looks back in time
keeps its look-back as state: a causal convolution the last ``(k - 1) * d + 1 - s`` input rows,
a transposed convolution the ``k - s`` output rows that the next chunk still adds to, an LSTM
its ``h`` and ``c``. Each entry point takes the whole state as one flat float32 vector and
returns the next one, so a runtime streams chunk by chunk and the concatenated output equals
the whole-signal output. Convolutions run as one matmul over their stacked taps, so the
compiler's packed-GEMM layout (`edgert.compiler.layout`) applies to them as to linear layers.

Reflect padding (EnCodec's ``pad_mode="reflect"``): at the start of a stream the left context
is the mirror of the first samples, so the first chunk passes ``first = 1`` and must be longer
than every layer's context; after that the carried state is used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tvm import relax, topi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.codec.kernels import lstm_block, lstm_gpu_kernel, lstm_kernel, pack_recurrent, row_dot_kernel


@dataclass
class CodecConfig:
    """Hyper-parameters of an EnCodec-architecture codec (names follow `transformers`' EncodecConfig)."""

    name: str = "codec"
    sampling_rate: int = 24000
    audio_channels: int = 1
    num_filters: int = 32
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    hidden_size: int = 128
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    num_residual_layers: int = 1
    compress: int = 2
    num_lstm_layers: int = 2
    use_conv_shortcut: bool = True
    pad_mode: str = "reflect"
    codebook_size: int = 1024
    codebook_dim: int = 128
    num_quantizers: int = 32
    # "none": every ELU is the identity, so the codec is a linear filterbank plus RVQ (the
    # project's own closed-form speech codec, tools/fit_codec.py).
    activation: str = "elu"
    # A bare filterbank: the encoder is the strided conv (audio -> 2 * num_filters channels, one
    # stride) and the last conv, the decoder the first conv and a transposed conv that writes the
    # audio; no ELU, residual unit or LSTM. Without it a linear codec would carry num_filters copies
    # of the audio through its strided conv (num_filters times the arithmetic).
    filterbank: bool = False
    # Gain-shape quantization: codebook 0 codes each frame's log norm (``gains``, one level per code),
    # the later codebooks the frame divided by that gain. Plain RVQ spends its bits on the loud
    # frames; with the gain apart, quiet consonants get the same relative precision (the project's
    # codec: Whisper's word error rate on held-out speech 0.43 -> 0.29 at 16 kbit/s).
    gain_shape: bool = False

    @property
    def min_codebooks(self) -> int:
        """Fewest codebooks a frame may carry: the gain and one shape stage for a gain-shape codec."""
        return 2 if self.gain_shape else 1

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame."""
        return int(np.prod(self.upsampling_ratios))

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sampling_rate / self.hop_length

    def bandwidth_kbps(self, num_codebooks: int) -> float:
        """Bitrate of ``num_codebooks`` codebooks, in kbit/s."""
        return num_codebooks * math.log2(self.codebook_size) * self.frame_rate / 1000

    def codebooks_for_bandwidth(self, kbps: float) -> int:
        """Codebooks that fit in ``kbps`` (EnCodec's rule: floor, at least one)."""
        per = math.log2(self.codebook_size) * self.frame_rate / 1000
        return int(min(self.num_quantizers, max(1, math.floor(kbps / per + 1e-9))))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CodecConfig:
        """Read a config written by `to_dict` or a `transformers` EncodecConfig JSON."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("model_type", "encodec") != "encodec" and "model_type" in raw:
            raise UnsupportedModelError(f"codec model type '{raw['model_type']}' is not supported (edgert: encodec)")
        if raw.get("norm_type", "weight_norm") != "weight_norm":
            raise UnsupportedModelError(f"norm_type '{raw['norm_type']}' is not supported (edgert: weight_norm)")
        if not raw.get("use_causal_conv", True):
            raise UnsupportedModelError("non-causal codecs cannot stream; edgert compiles causal ones")
        if "target_bandwidths" in raw and "num_quantizers" not in raw:
            # transformers' rule: frame rate rounded up, whole bits per code.
            cfg = cls(**values)
            per = math.ceil(math.log2(cfg.codebook_size)) * math.ceil(cfg.frame_rate)
            values["num_quantizers"] = int(1000 * max(raw["target_bandwidths"]) // per)
        if values.get("codebook_dim") is None:
            values["codebook_dim"] = values.get("hidden_size", cls.hidden_size)
        if values.get("activation", "elu") not in ("elu", "none"):
            raise UnsupportedModelError(f"activation '{values['activation']}' is not supported (elu, none)")
        if values.get("filterbank") and (
            len(values.get("upsampling_ratios", [])) != 1
            or values.get("num_residual_layers", 1)
            or values.get("num_lstm_layers", 1)
            or values.get("activation") != "none"
        ):
            raise UnsupportedModelError(
                "a filterbank codec has one upsampling ratio, no residual units, no LSTM and activation 'none'"
            )
        if values.get("pad_mode") not in ("reflect", "constant", None):
            raise UnsupportedModelError(f"pad_mode '{values['pad_mode']}' is not supported (reflect, constant)")
        return cls(**values)


class _State:
    """Slices a flat state vector into the layers' states in order and gathers the new ones."""

    def __init__(self, flat: Tensor | None, first: Tensor):
        self.flat, self.first, self.offset, self.new = flat, first, 0, []

    def take(self, rows: int, cols: int) -> Tensor:
        size = rows * cols
        piece = _slice(self.flat, 0, self.offset, self.offset + size)
        self.offset += size
        return op.reshape(piece, (rows, cols))

    def put(self, value: Tensor) -> None:
        self.new.append(op.reshape(value, (-1,)))

    def result(self) -> Tensor:
        return op.concat(self.new, dim=0) if len(self.new) > 1 else self.new[0]


def _slice(x: Tensor, axis: int, begin: Any, end: Any, stride: int = 1) -> Tensor:
    return op.wrap_nested(
        relax.op.strided_slice(x._expr, [axis], [begin], [end], [stride], assume_inbound=True), "slice"
    )


def elu(x: Tensor) -> Tensor:
    """ELU with alpha 1: x where x > 0, exp(x) - 1 elsewhere.

    The exponential is TOPI's ``fast_exp`` (a polynomial with exponent scaling, within a few
    float32 ulps): LLVM leaves ``exp`` a scalar libm call per element, and at the audio rate the
    ELUs were the codec's slowest kernels.
    """
    zero = Tensor.from_scalar(0.0, "float32")
    neg = op.tensor_expr_op(topi.fast_exp, "fast_exp", [op.minimum(x, zero)])
    return op.maximum(x, zero) + neg - 1.0


class ELU(nn.Module):
    """ELU as a layer (it holds no weights; it keeps the layer indices of the source model).

    With ``linear`` (a config's ``activation = "none"``) it passes its input through.
    """

    state_rows = 0

    def __init__(self, linear: bool = False):
        self.linear = linear

    def forward(self, x: Tensor, state: _State) -> Tensor:
        return x if self.linear else elu(x)


class StreamConv(nn.Module):
    """Causal conv1d, time-major: ``y[t] = b + W · [x[t*s - c + j*d] for j < k]`` (c = its context)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, reflect: bool = False):
        self.cin, self.cout, self.kernel, self.stride, self.dilation = cin, cout, kernel, stride, dilation
        self.context = (kernel - 1) * dilation + 1 - stride
        if self.context < 0 or (dilation > 1 and stride > 1) or (stride > 1 and kernel % stride):
            raise UnsupportedModelError(f"conv kernel {kernel}, stride {stride}, dilation {dilation} cannot stream")
        self.reflect = reflect
        self.proj = nn.Linear(kernel * cin, cout, bias=False)  # columns: tap-major, then input channel
        self.bias = nn.Parameter((cout,), "float32")

    @property
    def state_size(self) -> int:
        return self.context * self.cin

    def start_rows(self) -> np.ndarray | None:
        """Rows of the first chunk that form the left context at the start of a signal (None: zeros).

        Reflect padding: the mirror of x[1..c], as torch's reflect pad gives.
        """
        return np.arange(self.context, 0, -1, dtype="int32") if self.reflect else None

    def forward(self, x: Tensor, state: _State) -> Tensor:
        length = x.shape[0]
        if self.context:
            prev = state.take(self.context, self.cin)
            rows = self.start_rows()
            if rows is not None:
                # At the start of the signal the left context is made of the chunk's own rows;
                # "clip": a later, shorter chunk must not read past its end (those rows are unused then).
                idx = Tensor.from_const(rows)
                mirror = op.wrap_nested(relax.op.take(x._expr, idx._expr, axis=0, mode="clip"), "mirror")
                prev = op.where(state.first > 0.0, mirror, prev)
            xp = op.concat([prev, x], dim=0)
            state.put(_slice(xp, 0, length, length + self.context))
        else:
            xp = x
        s, k, d = self.stride, self.kernel, self.dilation
        frames = length // s
        if s == 1 and k == 1:
            taps = xp
        elif s == 1:
            taps = op.concat([_slice(xp, 0, j * d, j * d + length) for j in range(k)], dim=1)
        else:
            # Rows of s samples; frame t covers rows t .. t + k/s - 1.
            rows = op.reshape(xp, (frames + k // s - 1, s * self.cin))
            taps = op.concat([_slice(rows, 0, b, b + frames) for b in range(k // s)], dim=1)
        if self.cout == 1 and isinstance(self.proj, nn.Linear) and not getattr(self, "on_gpu", False):
            # One output channel (the audio): a dot product per row (`row_dot_kernel`).
            k = self.kernel * self.cin
            weight = op.reshape(self.proj.weight, (k,))
            out = Tensor.placeholder((taps.shape[0], 1), "float32")
            return op.tensor_ir_op(row_dot_kernel(k), "codec_row_dot", [taps, weight, self.bias], [out])
        return self.proj(taps) + self.bias


class StreamConvTranspose(nn.Module):
    """Causal transposed conv1d trimmed on the right (EnCodec's ``trim_right_ratio = 1``).

    Each input frame adds a k-row window at stride s; the last ``k - s`` rows of a chunk are
    not final until the next chunk adds to them, so they are the state (without the bias).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        if kernel % stride:
            raise UnsupportedModelError(f"transposed conv kernel {kernel} is not a multiple of its stride {stride}")
        self.cin, self.cout, self.kernel, self.stride = cin, cout, kernel, stride
        self.proj = nn.Linear(cin, kernel * cout, bias=False)  # rows: tap-major, then output channel
        self.bias = nn.Parameter((cout,), "float32")

    @property
    def state_size(self) -> int:
        return (self.kernel - self.stride) * self.cout

    def forward(self, x: Tensor, state: _State) -> Tensor:
        frames = x.shape[0]
        s, m, c = self.stride, self.kernel // self.stride, self.cout
        z = self.proj(x)  # (T, k * cout): window row j of frame t lands on output row t*s + j
        acc = None
        for b in range(m):
            part = _slice(z, 1, b * s * c, (b + 1) * s * c)
            part = op.pad(part, [b, m - 1 - b, 0, 0])
            acc = part if acc is None else acc + part
        y = op.reshape(acc, ((frames + m - 1) * s, c))
        tail = self.kernel - s
        if tail:
            prev = state.take(tail, c)
            head = _slice(y, 0, 0, tail) + prev
            y = op.concat([head, _slice(y, 0, tail, (frames + m - 1) * s)], dim=0)
            state.put(_slice(y, 0, frames * s, frames * s + tail))
        return _slice(y, 0, 0, frames * s) + self.bias


class LSTMLayer(nn.Module):
    """One LSTM layer (PyTorch gate order i, f, g, o); state: h and c."""

    def __init__(self, dim: int):
        self.dim = dim
        self.ih = nn.Linear(dim, 4 * dim, bias=False)
        self.bias = nn.Parameter((4 * dim,), "float32")  # b_ih + b_hh
        block = lstm_block(dim)
        self.hh_t = nn.Parameter((4 * dim // block, dim, block), "float32")  # W_hh, `pack_recurrent`

    def forward(self, x: Tensor, state: _State) -> Tensor:
        hc = state.take(2, self.dim)
        h0 = op.reshape(_slice(hc, 0, 0, 1), (self.dim,))
        c0 = op.reshape(_slice(hc, 0, 1, 2), (self.dim,))
        xw = self.ih(x) + self.bias
        kernel = lstm_gpu_kernel(self.dim) if getattr(self, "on_gpu", False) else lstm_kernel(self.dim)
        y, h1, c1 = op.tensor_ir_op(
            kernel,
            "codec_lstm",
            [xw, self.hh_t, h0, c0],
            [
                Tensor.placeholder((x.shape[0], self.dim), "float32"),
                Tensor.placeholder((self.dim,), "float32"),
                Tensor.placeholder((self.dim,), "float32"),
            ],
        )
        state.put(op.concat([h1, c1], dim=0))
        return y


class SkipLSTM(nn.Module):
    """EnCodec's LSTM block: stacked layers plus the input (``y = LSTM(x) + x``)."""

    def __init__(self, dim: int, layers: int):
        self.lstm = nn.ModuleList([LSTMLayer(dim) for _ in range(layers)])

    def forward(self, x: Tensor, state: _State) -> Tensor:
        y = x
        for layer in self.lstm:
            y = layer(y, state)
        return y + x


class ResidualUnit(nn.Module):
    """SEANet residual unit: ``shortcut(x) + conv1(ELU(conv_k,d(ELU(x))))``."""

    def __init__(self, cfg: CodecConfig, dim: int, dilation: int):
        hidden = dim // cfg.compress
        reflect = cfg.pad_mode == "reflect"
        linear = cfg.activation == "none"
        self.block = nn.ModuleList(
            [
                ELU(linear),
                StreamConv(dim, hidden, cfg.residual_kernel_size, dilation=dilation, reflect=reflect),
                ELU(linear),
                StreamConv(hidden, dim, 1),
            ]
        )
        self.shortcut = StreamConv(dim, dim, 1) if cfg.use_conv_shortcut else None

    def forward(self, x: Tensor, state: _State) -> Tensor:
        y = x
        for layer in self.block:
            y = layer(y, state)
        return (self.shortcut(x, state) if self.shortcut is not None else x) + y


def _encoder_layers(cfg: CodecConfig) -> list[nn.Module]:
    reflect, linear = cfg.pad_mode == "reflect", cfg.activation == "none"
    if cfg.filterbank:
        ratio, width = cfg.upsampling_ratios[0], 2 * cfg.num_filters
        return [
            StreamConv(cfg.audio_channels, width, 2 * ratio, stride=ratio, reflect=reflect),
            StreamConv(width, cfg.hidden_size, cfg.last_kernel_size, reflect=reflect),
        ]
    layers: list[nn.Module] = [StreamConv(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, reflect=reflect)]
    scale = 1
    for ratio in reversed(cfg.upsampling_ratios):
        dim = scale * cfg.num_filters
        layers += [ResidualUnit(cfg, dim, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
        layers += [ELU(linear), StreamConv(dim, 2 * dim, 2 * ratio, stride=ratio, reflect=reflect)]
        scale *= 2
    dim = scale * cfg.num_filters
    if cfg.num_lstm_layers:
        layers.append(SkipLSTM(dim, cfg.num_lstm_layers))
    layers += [ELU(linear), StreamConv(dim, cfg.hidden_size, cfg.last_kernel_size, reflect=reflect)]
    return layers


def _decoder_layers(cfg: CodecConfig) -> list[nn.Module]:
    reflect, linear = cfg.pad_mode == "reflect", cfg.activation == "none"
    if cfg.filterbank:
        ratio, width = cfg.upsampling_ratios[0], 2 * cfg.num_filters
        return [
            StreamConv(cfg.hidden_size, width, cfg.kernel_size, reflect=reflect),
            StreamConvTranspose(width, cfg.audio_channels, 2 * ratio, ratio),
        ]
    scale = 2 ** len(cfg.upsampling_ratios)
    dim = scale * cfg.num_filters
    layers: list[nn.Module] = [StreamConv(cfg.hidden_size, dim, cfg.kernel_size, reflect=reflect)]
    if cfg.num_lstm_layers:
        layers.append(SkipLSTM(dim, cfg.num_lstm_layers))
    for ratio in cfg.upsampling_ratios:
        dim = scale * cfg.num_filters
        layers += [ELU(linear), StreamConvTranspose(dim, dim // 2, 2 * ratio, ratio)]
        layers += [ResidualUnit(cfg, dim // 2, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
        scale //= 2
    layers += [ELU(linear), StreamConv(cfg.num_filters, cfg.audio_channels, cfg.last_kernel_size, reflect=reflect)]
    return layers


def _state_size(module: nn.Module) -> int:
    """Floats of streaming state a layer stack carries (every StreamConv/ConvTranspose/LSTM)."""
    total = 0
    for _, sub in _walk(module):
        if isinstance(sub, StreamConv | StreamConvTranspose):
            total += sub.state_size
        elif isinstance(sub, LSTMLayer):
            total += 2 * sub.dim
    return total


def _walk(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = [(prefix, module)]
    items = enumerate(module) if isinstance(module, nn.ModuleList) else vars(module).items()
    for name, sub in items:
        if isinstance(sub, nn.Module):
            out += _walk(sub, f"{prefix}.{name}" if prefix else str(name))
    return out


class SEANet(nn.Module):
    """A stack of streaming layers, called in order with one shared state."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: _State) -> Tensor:
        for layer in self.layers:
            x = layer(x, state)
        return x


class Codebook(nn.Module):
    """One codebook's scores: its table (codebook_size x dim) as a linear layer, so that the encoder's
    ``r · e`` products run as the compiler's packed GEMM (a plain matmul against the table was
    untuned TVM code and took most of the encoder's time)."""

    def __init__(self, size: int, dim: int):
        self.score = nn.Linear(dim, size, bias=False)


GAIN_FLOOR = 1e-9  # added to a frame's norm before its log (digital silence)


class Quantizer(nn.Module):
    """Residual vector quantization with ``num_quantizers`` stages.

    ``table`` holds every stage's codewords, stage after stage, row-major, for the gathers, and
    ``norms`` their squared lengths; both are computed when the weights are written, because
    concatenating (or slicing) the stages' tables and summing their squares inside the entry
    points copied all of them on every call (most of a streamed chunk's time).
    """

    def __init__(self, cfg: CodecConfig):
        self.cfg = cfg
        self.layers = nn.ModuleList([_VQ(cfg) for _ in range(cfg.num_quantizers)])
        self.table = nn.Parameter((cfg.num_quantizers * cfg.codebook_size, cfg.codebook_dim), "float32")
        self.norms = nn.Parameter((cfg.num_quantizers, cfg.codebook_size), "float32")  # |e|² per codeword
        # Gain-shape: the log-norm level of each code of codebook 0 (whose codewords are zero).
        self.gains = nn.Parameter((1, cfg.codebook_size), "float32") if cfg.gain_shape else None

    def _gain(self, codes: Tensor) -> Tensor:
        """``exp(level)`` of gain codes ``(frames,)``, as ``(frames, 1)``."""
        level = op.wrap_nested(relax.op.take(self.gains._expr, codes._expr, axis=1, mode="clip"), "gain")
        return op.reshape(op.exp(level), (-1, 1))

    def encode(self, z: Tensor) -> Tensor:
        """Codes ``(frames, num_quantizers)`` int32: each stage takes the nearest code to the residual."""
        codes = []
        residual = z
        size = self.cfg.codebook_size
        start = 0
        if self.gains is not None:
            norm = op.sqrt(op.sum(op.square(z), axis=1, keepdims=True)) + GAIN_FLOOR
            dist = op.square(op.log(norm) - self.gains)  # (frames, levels)
            idx = op.astype(op.wrap_nested(relax.op.argmin(dist._expr, axis=1, keepdims=False), "argmin"), "int32")
            residual = z / self._gain(idx)
            codes.append(op.reshape(idx, (-1, 1)))
            start = 1
        for i, layer in list(enumerate(self.layers))[start:]:  # a gain-shape codec's stage 0 is the gain
            # The same expression as EnCodec (|r|² - 2 r·e + |e|²), so ties break the same way.
            dist = (
                op.sum(op.square(residual), axis=1, keepdims=True)
                - 2.0 * layer.codebook.score(residual)
                + _slice(self.norms, 0, i, i + 1)
            )
            idx = op.wrap_nested(relax.op.argmin(dist._expr, axis=1, keepdims=False), "argmin")
            idx = op.astype(idx, "int32")
            rows = (idx + i * size)._expr
            residual = residual - op.wrap_nested(relax.op.take(self.table._expr, rows, axis=0, mode="clip"), "codeword")
            codes.append(op.reshape(idx, (-1, 1)))
        return op.concat(codes, dim=1) if len(codes) > 1 else codes[0]

    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the codewords of the first ``codes.shape[1]`` stages."""
        frames, used = codes.shape
        table = self.table
        base = op.astype(op.arange(0, used, dtype="int32"), "int32") * self.cfg.codebook_size
        flat = op.reshape(codes + op.reshape(base, (1, used)), (-1,))
        rows = op.wrap_nested(relax.op.take(table._expr, flat._expr, axis=0, mode="clip"), "codewords")
        z = op.sum(op.reshape(rows, (frames, used, self.cfg.codebook_dim)), axis=1)
        if self.gains is None:
            return z
        return z * self._gain(op.reshape(_slice(codes, 1, 0, 1), (frames,)))  # codebook 0's codewords are zero


class _VQ(nn.Module):
    def __init__(self, cfg: CodecConfig):
        self.codebook = Codebook(cfg.codebook_size, cfg.codebook_dim)


class ChunkEntries:
    """``encode_chunk`` / ``decode_chunk``: ``encode`` / ``decode`` compiled for one fixed chunk length.

    Why: with every shape known, TVM plans the chunk's memory ahead and drops the per-call shape
    arithmetic and allocations (about 1,200 VM builtin calls per 80 ms chunk of the small EnCodec),
    and edgert's kernel rules can vectorize the audio-rate kernels. The runtime streams through them
    whenever a chunk has that length and through the symbolic entry points otherwise.
    """

    def encode_chunk(self, audio: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """`encode` of exactly ``chunk_frames`` frames."""
        return self.encode(audio, state, first)  # type: ignore[attr-defined]

    def decode_chunk(self, codes: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """`decode` of exactly ``chunk_frames`` frames."""
        return self.decode(codes, state, first)  # type: ignore[attr-defined]


def chunk_frames_for(frame_rate: float, chunk_ms: float) -> int:
    """Code frames in a streaming chunk of ``chunk_ms`` (at least one)."""
    return max(1, round(chunk_ms * frame_rate / 1000))


class CodecModel(ChunkEntries, nn.Module):
    """EnCodec-architecture codec with streaming entry points ``encode`` and ``decode``."""

    def __init__(self, cfg: CodecConfig):
        if cfg.audio_channels != 1:
            raise UnsupportedModelError(f"{cfg.audio_channels}-channel codecs are not supported (edgert: mono)")
        if cfg.codebook_dim != cfg.hidden_size:
            raise UnsupportedModelError("codebook_dim must equal hidden_size (EnCodec has no projection)")
        self.cfg = cfg
        self.encoder = SEANet(_encoder_layers(cfg))
        self.quantizer = Quantizer(cfg)
        self.decoder = SEANet(_decoder_layers(cfg))
        self.encoder_state_size = _state_size(self.encoder)
        self.decoder_state_size = _state_size(self.decoder)

    def encode(self, audio: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """``audio`` (n,) with n a multiple of the hop -> (codes (n/hop, Q) int32, next state)."""
        bag = _State(state, first)
        z = self.encoder(op.reshape(audio, (audio.shape[0], 1)), bag)
        return self.quantizer.encode(z), bag.result()

    def decode(self, codes: Tensor, state: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """``codes`` (frames, q <= Q) int32 -> (audio (frames * hop,), next state)."""
        bag = _State(state, first)
        y = self.decoder(self.quantizer.decode(codes), bag)
        return op.reshape(y, (codes.shape[0] * self.cfg.hop_length,)), bag.result()

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """Entry points with a symbolic chunk length (samples ``n``, frames ``t``, codebooks ``q``)."""
        return streaming_spec(self)


def streaming_spec(net: Any, chunk_frames: int | None = None) -> nn.spec.ModuleSpec:
    """A streaming codec's ``encode``/``decode`` entry points: a chunk of symbolic length.

    Samples ``n``, frames ``t``, codebooks ``q``; then the flat state vector and the first-chunk flag.
    With ``chunk_frames``, also ``encode_chunk``/``decode_chunk`` for chunks of exactly that many
    frames (see `ChunkEntries`).
    """
    spec: dict[str, Any] = {
        "encode": {
            "audio": nn.spec.Tensor(["n"], "float32"),
            "state": nn.spec.Tensor([net.encoder_state_size], "float32"),
            "first": nn.spec.Tensor([1], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        },
        "decode": {
            "codes": nn.spec.Tensor(["t", "q"], "int32"),
            "state": nn.spec.Tensor([net.decoder_state_size], "float32"),
            "first": nn.spec.Tensor([1], "float32"),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        },
    }
    if chunk_frames:
        samples = chunk_frames * net.cfg.hop_length
        spec["encode_chunk"] = {**spec["encode"], "audio": nn.spec.Tensor([samples], "float32")}
        spec["decode_chunk"] = {**spec["decode"], "codes": nn.spec.Tensor([chunk_frames, "q"], "int32")}
    return nn.spec.ModuleSpec.from_raw(spec, net)


# ---------------------------------------------------------------------------------------------
# Weights: `transformers`' EncodecModel state dict -> this module's parameters.


def _weight_norm(tensors: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """A conv's weight: plain, or rebuilt from weight norm (``w = g · v / |v|``, norm over all but dim 0)."""
    if f"{prefix}.weight" in tensors:
        return tensors[f"{prefix}.weight"].astype(np.float32)
    g = tensors.get(f"{prefix}.parametrizations.weight.original0")
    v = tensors.get(f"{prefix}.parametrizations.weight.original1")
    if g is None or v is None:
        g, v = tensors.get(f"{prefix}.weight_g"), tensors.get(f"{prefix}.weight_v")
    if g is None or v is None:
        raise ModelFileError(f"weights for '{prefix}' are missing")
    v64 = v.astype(np.float64)
    norm = np.sqrt((v64**2).reshape(v.shape[0], -1).sum(axis=1)).reshape(-1, *([1] * (v.ndim - 1)))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


def encodec_weights(tensors: dict[str, np.ndarray], model: CodecModel) -> dict[str, np.ndarray]:
    """Map an EncodecModel state dict onto ``model``'s parameter names (nothing left unmapped)."""
    out: dict[str, np.ndarray] = {}
    for path, sub in _walk(model):
        if isinstance(sub, StreamConv):
            w = _weight_norm(tensors, f"{path}.conv")  # (out, in, k)
            if w.shape != (sub.cout, sub.cin, sub.kernel):
                raise ModelFileError(f"'{path}' has shape {w.shape}, expected {(sub.cout, sub.cin, sub.kernel)}")
            out[f"{path}.proj.weight"] = np.ascontiguousarray(w.transpose(0, 2, 1).reshape(sub.cout, -1))
            out[f"{path}.bias"] = _get(tensors, f"{path}.conv.bias")
        elif isinstance(sub, StreamConvTranspose):
            w = _weight_norm(tensors, f"{path}.conv")  # (in, out, k)
            if w.shape != (sub.cin, sub.cout, sub.kernel):
                raise ModelFileError(f"'{path}' has shape {w.shape}, expected {(sub.cin, sub.cout, sub.kernel)}")
            out[f"{path}.proj.weight"] = np.ascontiguousarray(w.transpose(2, 1, 0).reshape(-1, sub.cin))
            out[f"{path}.bias"] = _get(tensors, f"{path}.conv.bias")
        elif isinstance(sub, SkipLSTM):
            for i in range(len(sub.lstm)):
                src, dst = f"{path}.lstm", f"{path}.lstm.{i}"
                out[f"{dst}.ih.weight"] = _get(tensors, f"{src}.weight_ih_l{i}")
                out[f"{dst}.bias"] = _get(tensors, f"{src}.bias_ih_l{i}") + _get(tensors, f"{src}.bias_hh_l{i}")
                out[f"{dst}.hh_t"] = pack_recurrent(_get(tensors, f"{src}.weight_hh_l{i}"))
        elif isinstance(sub, Codebook):
            out[f"{path}.score.weight"] = _get(tensors, f"{path}.embed")
        elif isinstance(sub, Quantizer):
            stages = [f"{path}.layers.{i}.codebook.embed" for i in range(sub.cfg.num_quantizers)]
            out[f"{path}.table"] = np.concatenate([_get(tensors, name) for name in stages])
            out[f"{path}.norms"] = np.square(out[f"{path}.table"]).sum(axis=1).reshape(len(stages), -1)
            if sub.gains is not None:
                out[f"{path}.gains"] = _get(tensors, f"{path}.gains").reshape(1, -1)
    return out


def _get(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise ModelFileError(f"weight '{name}' is missing")
    return np.asarray(tensors[name], dtype=np.float32)


def algorithmic_latency(cfg: CodecConfig) -> int:
    """Samples of look-ahead before the first output sample can be final: one hop (a frame's input)."""
    return cfg.hop_length


def min_first_chunk(model: CodecModel) -> tuple[int, int]:
    """(samples, frames) the first encode / decode chunk needs under reflect padding (else one hop, one frame)."""
    cfg = model.cfg
    if cfg.pad_mode != "reflect":
        return cfg.hop_length, 1
    enc = _longest_context(model.encoder, cfg)
    dec = _longest_context(model.decoder, cfg, decoder=True)
    return math.ceil((enc + 1) / cfg.hop_length) * cfg.hop_length, math.ceil((dec + 1) / cfg.hop_length)


def _longest_context(net: SEANet, cfg: CodecConfig, decoder: bool = False) -> float:
    """The largest reflect context over the stack, in input samples (encoder) or output samples (decoder)."""
    # Rate of each layer relative to audio: encoder layers run at audio rate / cumulative stride.
    rate = cfg.hop_length if decoder else 1
    worst = 0.0
    for layer in net.layers:
        for _, sub in _walk(layer):
            if isinstance(sub, StreamConv) and sub.reflect:
                worst = max(worst, sub.context * rate)
        if isinstance(layer, StreamConv) and layer.stride > 1:
            rate *= layer.stride
        if isinstance(layer, StreamConvTranspose):
            rate //= layer.stride
    return worst


# ---------------------------------------------------------------------------------------------
# Mimi's transformer stage: pre-norm layers with RoPE, sliding-window causal attention, LayerScale
# and a GELU MLP, run over frames with an explicit KV cache (the last ``window`` keys and values
# of every layer), so that it streams like the convolutions.
