"""Whisper (OpenAI's speech recognizer) as its equations.

Encoder, once per window of log-mel frames m [n_mels, 2 * audio_ctx] (30 s, 3000 frames, as trained;
a build may take a shorter window, as whisper.cpp's ``--audio-ctx`` does, see `WhisperConfig.with_window`):

    h = GELU(conv1d(GELU(conv1d(m, W1, stride 1)), W2, stride 2)) + P_sin[:audio_ctx]   [audio_ctx, d]
    for each layer:  h = h + Wo · Attn(Wq · n, Wk · n, Wv · n),  n = LN(h)
                     h = h + W2 · GELU(W1 · n),                  n = LN(h)
    e = LN(h);  for each decoder layer l:  (K_l, V_l) = Wkv_l · e      (the cross-attention cache)

Decoder, per token, pre-norm too:

    x = embed(token) + P_learned[position]
    x = x + SelfAttn(LN(x))            keys/values in a paged KV cache (no RoPE)
    x = x + CrossAttn(LN(x); K_l, V_l)
    x = x + FFN(LN(x))
    logits = embed^T · LN(x)           (the head is tied to the token embedding)

The cross-attention keys and values are an explicit tensor [layers, 2, heads, frames, head_dim]
that `encode` returns and every `prefill`/`decode` call takes, so the runtime computes them once
per window. Weight names follow CTranslate2's `WhisperSpec` (the `model.bin` of faster-whisper).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.shared.seq2seq import Attend, EncoderDecoder, HeadsProjection, Projection


@dataclass
class WhisperConfig:
    """Hyper-parameters of a Whisper model."""

    n_mels: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    num_heads: int
    vocab_size: int
    audio_ctx: int  # encoder positions (frames after the stride-2 conv)
    text_ctx: int  # decoder positions
    ffn_dim: int

    @property
    def mel_frames(self) -> int:
        """Log-mel frames (10 ms each) of one encoder window: two per encoder position."""
        return 2 * self.audio_ctx

    def with_window(self, audio_ctx: int | None) -> WhisperConfig:
        """This config with an encoder window of ``audio_ctx`` positions (20 ms each; None keeps it).

        A shorter window costs less to encode (the attention is quadratic in it) but the model was
        trained on 30 s windows only, so accuracy can drop (whisper.cpp says the same of `--audio-ctx`).
        """
        if audio_ctx is None:
            return self
        if not 1 <= audio_ctx <= self.audio_ctx:
            raise UnsupportedModelError(
                f"audio context {audio_ctx} is outside 1..{self.audio_ctx} (the model's encoder positions)"
            )
        return replace(self, audio_ctx=int(audio_ctx))

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to 64 so the head's weight packs into 64-wide column tiles."""
        return -(-self.vocab_size // 64) * 64

    @classmethod
    def from_ct2(cls, model: Any) -> WhisperConfig:
        """Read the config from a CTranslate2 `WhisperSpec` model (shapes of its variables)."""
        if model.spec != "WhisperSpec":
            raise UnsupportedModelError(f"{model.path}: CTranslate2 spec '{model.spec}' is not WhisperSpec")
        for name in ("encoder/conv1/weight", "decoder/embeddings/weight", "encoder/position_encodings/encodings"):
            if name not in model:
                raise ModelFileError(f"{model.path}: variable '{name}' is missing")
        conv1 = model.raw("encoder/conv1/weight").shape
        enc_layers = _count_layers(model, "encoder")
        dec_layers = _count_layers(model, "decoder")
        if enc_layers == 0 or dec_layers == 0:
            raise ModelFileError(f"{model.path}: no encoder or decoder layers found")
        return cls(
            n_mels=int(conv1[1]),
            d_model=int(conv1[0]),
            encoder_layers=enc_layers,
            decoder_layers=dec_layers,
            num_heads=int(model.scalar("encoder/num_heads", 0) or model.scalar("decoder/num_heads")),
            vocab_size=int(model.raw("decoder/embeddings/weight").shape[0]),
            audio_ctx=int(model.raw("encoder/position_encodings/encodings").shape[0]),
            text_ctx=int(model.raw("decoder/position_encodings/encodings").shape[0]),
            ffn_dim=int(model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest (with the generic keys `edgert inspect` shows)."""
        generic = {"num_layers": self.decoder_layers, "hidden_size": self.d_model, "num_kv_heads": self.num_heads}
        return {**asdict(self), **generic}


def _count_layers(model: Any, stack: str) -> int:
    return sum(1 for n in model.variables if n.startswith(f"{stack}/layer_") and n.endswith("ffn/linear_0/weight"))


class Conv1D(nn.Module):
    """Kernel-3, padding-1 convolution as im2col + matmul (a packed GEMM instead of a direct conv).

    Takes and returns time-major activations [T, C]; the weight is CTranslate2's [out, in, 3]
    flattened to [out, in * 3].
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str | None = None):
        self.in_channels, self.stride = in_channels, stride
        self.matmul = Projection(in_channels * 3, out_channels, activation)

    def forward(self, x: Tensor) -> Tensor:
        cols = op.tensor_expr_op(_im2col, "im2col", [x, self.stride])
        return self.matmul(cols)


def _im2col(x: te.Tensor, stride: int) -> te.Tensor:
    """cols[t, c * 3 + j] = x[t * stride + j - 1, c], zero outside (padding 1)."""
    t_in, c = x.shape
    t_out = (t_in - 1) // stride + 1

    def col(t: Any, f: Any) -> Any:
        pos = t * stride + f % 3 - 1
        inside = tirx.all(pos >= 0, pos < t_in)
        return tirx.if_then_else(inside, x[tirx.max(tirx.min(pos, t_in - 1), 0), f // 3], tirx.const(0.0, x.dtype))

    return te.compute((t_out, c * 3), col, name="im2col")


def _heads_first(x: Tensor, rows: int, heads: int, head_dim: int) -> Tensor:
    """[rows, heads * head_dim] -> [heads, rows, head_dim]."""
    return op.permute_dims(op.reshape(x, (rows, heads, head_dim)), [1, 0, 2])


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and GELU feed-forward over all frames."""

    def __init__(self, cfg: WhisperConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.attn_norm = nn.LayerNorm(d, eps=1e-5)
        self.qkv = HeadsProjection(d, cfg.num_heads, cfg.head_dim, parts=3, transposed=1)
        self.out = Projection(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = Projection(d, cfg.ffn_dim, activation="gelu")
        self.fc2 = Projection(cfg.ffn_dim, d)
        self.attend = Attend(cfg.num_heads, cfg.audio_ctx, cfg.head_dim)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.out(self.attend.frames(self.qkv(self.attn_norm(h))))
        return h + self.fc2(self.fc1(self.ffn_norm(h)))


class DecoderLayer(nn.Module):
    """Pre-norm masked self-attention (paged cache), cross-attention, GELU feed-forward."""

    def __init__(self, cfg: WhisperConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.self_norm = nn.LayerNorm(d, eps=1e-5)
        self.self_qkv = Projection(d, 3 * d)
        self.self_out = Projection(d, d)
        self.cross_norm = nn.LayerNorm(d, eps=1e-5)
        self.cross_q = Projection(d, d)
        # Used by `encode`, on the encoder's output: keys [heads, head_dim, frames], values [heads, frames, head_dim].
        self.cross_kv = HeadsProjection(d, cfg.num_heads, cfg.head_dim, parts=2, transposed=0)
        self.cross_out = Projection(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = Projection(d, cfg.ffn_dim, activation="gelu")  # GELU fused into the CPU kernel's write-back
        self.fc2 = Projection(cfg.ffn_dim, d)
        self.attend = Attend(cfg.num_heads, cfg.audio_ctx, cfg.head_dim)

    def self_attention(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        """Masked self-attention over the paged cache (which gets this input's K/V) -> [b, s, heads, head_dim]."""
        cfg = self.cfg
        b, s, _ = x.shape
        qkv = op.reshape(self.self_qkv(self.self_norm(x)), (b, s, 3 * cfg.num_heads, cfg.head_dim))
        return cache.attention_with_fused_qkv(layer_id, qkv, cfg.num_heads, sm_scale=cfg.head_dim**-0.5)

    def forward(self, x: Tensor, cross: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        cfg = self.cfg
        b, s, d = x.shape
        x = x + self.self_out(op.reshape(self.self_attention(x, cache, layer_id), (b, s, d)))
        # Cross-attention: every (sequence, position) row attends to the same window.
        q = _heads_first(self.cross_q(self.cross_norm(x)), b * s, cfg.num_heads, cfg.head_dim)
        a = self.attend.cross(q, cross, layer_id)
        x = x + self.cross_out(op.reshape(op.permute_dims(a, [1, 0, 2]), (b, s, d)))
        return x + self.fc2(self.fc1(self.ffn_norm(x)))


class WhisperModel(EncoderDecoder):
    """The conv stem, encoder, decoder and tied head, with encode / prefill / decode entry points."""

    def __init__(self, cfg: WhisperConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = Conv1D(cfg.n_mels, d, stride=1, activation="gelu")
        self.conv2 = Conv1D(d, d, stride=2, activation="gelu")
        self.encoder_positions = nn.Parameter((cfg.audio_ctx, d), "float32")
        self.encoder_layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.encoder_norm = nn.LayerNorm(d, eps=1e-5)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.text_ctx, d)
        self.decoder_layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.decoder_layers)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, cfg.padded_vocab, bias=False)

    def encode(self, mel: Tensor) -> Tensor:
        """Log-mel frames [1, n_mels, 2 * audio_ctx] -> cross-attention K/V [layers * 2, heads, head_dim * audio_ctx]:
        per layer the keys transposed [heads, head_dim, frames], then the values [heads, frames, head_dim]."""
        cfg = self.cfg
        x = op.permute_dims(op.reshape(mel, (cfg.n_mels, cfg.mel_frames)), [1, 0])
        h = self.conv2(self.conv1(x))
        h = h + self.encoder_positions
        for layer in self.encoder_layers:
            h = layer(h)
        return self._cross_kv(self.encoder_norm(h))

    def _cross_kv(self, e: Tensor) -> Tensor:
        cfg = self.cfg
        kv = [layer.cross_kv(e) for layer in self.decoder_layers]
        return op.reshape(op.concat(kv, dim=0), (2 * cfg.decoder_layers, cfg.num_heads, cfg.audio_ctx * cfg.head_dim))

    def cross_kv(self, encoder_out: Tensor) -> Tensor:
        """The encoder's output [1, audio_ctx, d] (computed elsewhere: an NPU build's int8 partitions)
        -> the cross-attention K/V, as `encode` returns them."""
        return self._cross_kv(op.reshape(encoder_out, (self.cfg.audio_ctx, self.cfg.d_model)))

    def _hidden(self, ids: Tensor, positions: Tensor, cross: Tensor, cache: PagedKVCache) -> Tensor:
        x = self.embed(ids, positions)
        for layer_id, layer in enumerate(self.decoder_layers):
            x = layer(x, cross, cache, layer_id)
        return x

    def _logits(self, h: Tensor) -> Tensor:
        return self.head(h)

    def cache_shape(self) -> tuple[int, int, int]:
        """(decoder layers, heads, head width) of the self-attention cache."""
        return self.cfg.decoder_layers, self.cfg.num_heads, self.cfg.head_dim

    # -- the decoder in pieces (self-speculative drafting, early exit) --------------------
    # As for the Llama family: one Relax function per layer, the sequence length symbolic so
    # one form serves a draft step (1 token) and a verify pass (k + 1 tokens).

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Token + position embeddings [1, s, d] of the decoder input."""
        return self.embed_tokens(input_ids) + self.embed_positions(positions)

    def layer(self, layer_id: int, h: Tensor, cross_kv: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Decoder layer ``layer_id`` on hidden states [1, s, d], writing its self-attention KV entries."""
        return self.decoder_layers[layer_id](h, cross_kv, cache, layer_id), cache

    def verify(
        self, input_ids: Tensor, positions: Tensor, cross_kv: Tensor, cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        """Logits of every token [1, s, vocab] of one sequence: a speculative verify pass in one call
        (``embed``, the ``layer_<i>`` and ``head`` one by one cost a VM call and its allocations each)."""
        return self._logits(self._hidden(input_ids, positions, cross_kv, cache)), cache

    def kv_fill(self, layer_id: int, h: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Copy-forward (CALM): write layer ``layer_id``'s self-attention KV from ``h`` without the rest of it."""
        return self.decoder_layers[layer_id].self_attention(h, cache, layer_id), cache

    def head(self, h: Tensor) -> Tensor:
        """Final norm and tied head on hidden states [b, s, d] -> logits [b, s, vocab] (the padded rows cut off)."""
        logits = self.lm_head(self.decoder_norm(h))
        vocab = self.cfg.vocab_size
        return op.tensor_expr_op(
            lambda y: te.compute((y.shape[0], y.shape[1], vocab), lambda i, j, k: y[i, j, k], name="vocab"),
            "vocab",
            [logits],
        )

    def get_default_spec(self, npu_encoder: bool = False) -> nn.spec.ModuleSpec:
        """Entry points and their shapes, as exported to Relax; with ``npu_encoder`` the encoder runs
        elsewhere and ``cross_kv`` (from its output) replaces ``encode``."""
        cfg = self.cfg
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cross = nn.spec.Tensor([2 * cfg.decoder_layers, cfg.num_heads, cfg.audio_ctx * cfg.head_dim], "float32")
        cache = nn.spec.Object(object_type=PagedKVCache)
        hidden = nn.spec.Tensor([1, "seq_len", cfg.d_model], "float32")
        ids = nn.spec.Tensor([1, "seq_len"], "int32")
        for i in range(cfg.decoder_layers):  # the exporter looks entry points up as attributes
            object.__setattr__(self, f"layer_{i}", functools.partial(self.layer, i))
            object.__setattr__(self, f"kv_fill_{i}", functools.partial(self.kv_fill, i))
        if npu_encoder:
            encoded = nn.spec.Tensor([1, cfg.audio_ctx, cfg.d_model], "float32")
            first = {"cross_kv": {"encoder_out": encoded, "$": packed}}
        else:
            first = {"encode": {"mel": nn.spec.Tensor([1, cfg.n_mels, cfg.mel_frames], "float32"), "$": packed}}
        spec = {
            **first,
            **self.decoder_spec(cross),
            "embed": {"input_ids": ids, "positions": ids, "$": packed},
            "verify": {"input_ids": ids, "positions": ids, "cross_kv": cross, "cache": cache, "$": packed},
            "head": {"h": hidden, "$": packed},
            **{
                f"layer_{i}": {"h": hidden, "cross_kv": cross, "cache": cache, "$": packed}
                for i in range(cfg.decoder_layers)
            },
            **{f"kv_fill_{i}": {"h": hidden, "cache": cache, "$": packed} for i in range(cfg.decoder_layers)},
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def ct2_weights(model: Any, cfg: WhisperConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (parameter name, float32 array) in this module's naming, from CTranslate2 variables."""

    def proj(name: str, src: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{name}.proj.weight", model.tensor(f"{src}/weight")
        yield f"{name}.bias", model.tensor(f"{src}/bias")

    def norm(name: str, src: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{name}.weight", model.tensor(f"{src}/gamma")
        yield f"{name}.bias", model.tensor(f"{src}/beta")

    for i in (1, 2):
        w = model.tensor(f"encoder/conv{i}/weight")
        yield f"conv{i}.matmul.proj.weight", w.reshape(w.shape[0], -1)
        yield f"conv{i}.matmul.bias", model.tensor(f"encoder/conv{i}/bias")
    # A shorter window keeps the first positions of the sinusoidal table (whisper.cpp's --audio-ctx).
    yield "encoder_positions", model.tensor("encoder/position_encodings/encodings")[: cfg.audio_ctx]
    for i in range(cfg.encoder_layers):
        p, s = f"encoder_layers.{i}.", f"encoder/layer_{i}/"
        yield from norm(p + "attn_norm", s + "self_attention/layer_norm")
        yield from proj(p + "qkv", s + "self_attention/linear_0")
        yield from proj(p + "out", s + "self_attention/linear_1")
        yield from norm(p + "ffn_norm", s + "ffn/layer_norm")
        yield from proj(p + "fc1", s + "ffn/linear_0")
        yield from proj(p + "fc2", s + "ffn/linear_1")
    yield from norm("encoder_norm", "encoder/layer_norm")
    embed = model.tensor("decoder/embeddings/weight")
    yield "embed_tokens.weight", embed
    yield "embed_positions.weight", model.tensor("decoder/position_encodings/encodings")
    for i in range(cfg.decoder_layers):
        p, s = f"decoder_layers.{i}.", f"decoder/layer_{i}/"
        yield from norm(p + "self_norm", s + "self_attention/layer_norm")
        yield from proj(p + "self_qkv", s + "self_attention/linear_0")
        yield from proj(p + "self_out", s + "self_attention/linear_1")
        yield from norm(p + "cross_norm", s + "attention/layer_norm")
        yield from proj(p + "cross_q", s + "attention/linear_0")
        yield from proj(p + "cross_kv", s + "attention/linear_1")
        yield from proj(p + "cross_out", s + "attention/linear_2")
        yield from norm(p + "ffn_norm", s + "ffn/layer_norm")
        yield from proj(p + "fc1", s + "ffn/linear_0")
        yield from proj(p + "fc2", s + "ffn/linear_1")
    yield from norm("decoder_norm", "decoder/layer_norm")
    head = model.tensor("decoder/projection/weight") if "decoder/projection/weight" in model else embed
    yield "lm_head.weight", np.pad(head, ((0, cfg.padded_vocab - cfg.vocab_size), (0, 0)))
