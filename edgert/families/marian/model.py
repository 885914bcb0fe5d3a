"""Marian (MarianMT, the Opus-MT translation models) as its equations.

Post-norm transformer, shared token embedding scaled by sqrt(d), sinusoidal positions:

    encoder:  h = E[src] · sqrt(d) + P[0..n)
              h = LN(h + SelfAttn(h));  h = LN(h + W2 · act(W1 · h))           (per layer)
    decoder:  x = E[tok] · sqrt(d) + P[pos]
              x = LN(x + SelfAttn(x))        keys/values in a paged KV cache
              x = LN(x + CrossAttn(x; K_l, V_l))
              x = LN(x + W2 · act(W1 · x))
    logits = Eᵀ · x + final_logits_bias

`encode` returns every decoder layer's cross-attention keys and values [layers * 2, heads,
src_len, head_dim], computed once per source sentence. Weight names follow Hugging Face's
`MarianMTModel` state dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.shared.seq2seq import Attend, EncoderDecoder, Projection


@dataclass
class MarianConfig:
    """Hyper-parameters of a Marian model (the fields of a transformers `MarianConfig`)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str
    scale_embedding: bool
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int
    forced_eos_token_id: int | None

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> MarianConfig:
        """Read a transformers `config.json` of model_type "marian"."""
        if raw.get("model_type") != "marian":
            raise UnsupportedModelError(f"model_type '{raw.get('model_type')}' is not marian")
        if raw.get("encoder_attention_heads") != raw.get("decoder_attention_heads"):
            raise UnsupportedModelError("edgert's Marian needs as many encoder as decoder attention heads")
        if raw.get("activation_function", "gelu") not in ("gelu", "swish", "silu", "relu"):
            raise UnsupportedModelError(f"activation '{raw.get('activation_function')}' is not supported")
        names = [f for f in cls.__dataclass_fields__ if f != "forced_eos_token_id"]
        missing = [f for f in names if f not in raw and f not in ("activation_function", "scale_embedding")]
        if missing:
            raise ModelFileError(f"config.json lacks {', '.join(missing)}")
        return cls(
            **{f: raw[f] for f in names if f in raw},
            **{k: v for k, v in (("activation_function", "gelu"), ("scale_embedding", False)) if k not in raw},
            forced_eos_token_id=raw.get("forced_eos_token_id"),
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.encoder_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest (with the generic keys `edgert inspect` shows)."""
        heads = self.decoder_attention_heads
        generic = {"num_layers": self.decoder_layers, "hidden_size": self.d_model, "num_heads": heads}
        return {**asdict(self), **generic, "num_kv_heads": heads}


def _act(x: Tensor, name: str) -> Tensor:
    if name == "gelu":
        return op.gelu(x)
    if name == "relu":
        return op.relu(x)
    return op.silu(x)


def _heads_first(x: Tensor, rows: Any, heads: int, head_dim: int) -> Tensor:
    return op.permute_dims(op.reshape(x, (rows, heads, head_dim)), [1, 0, 2])


class EncoderLayer(nn.Module):
    """Post-norm self-attention and feed-forward."""

    def __init__(self, cfg: MarianConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Projection(d, d) for _ in range(4))
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = Projection(d, cfg.encoder_ffn_dim)
        self.fc2 = Projection(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.attend = Attend(cfg.encoder_attention_heads, 0, cfg.head_dim)  # 0 keys: symbolic, plain ops

    def forward(self, h: Tensor) -> Tensor:
        cfg, n = self.cfg, h.shape[0]
        q, k, v = (
            _heads_first(p(h), n, cfg.encoder_attention_heads, cfg.head_dim)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = self.attend(q, op.permute_dims(k, [0, 2, 1]), v)
        h = self.self_attn_layer_norm(h + self.out_proj(op.reshape(op.permute_dims(a, [1, 0, 2]), (n, cfg.d_model))))
        return self.final_layer_norm(h + self.fc2(_act(self.fc1(h), cfg.activation_function)))


class DecoderLayer(nn.Module):
    """Post-norm masked self-attention (paged cache), cross-attention, feed-forward."""

    def __init__(self, cfg: MarianConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.self_qkv = Projection(d, 3 * d)
        self.self_out = Projection(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.cross_q = Projection(d, d)
        self.cross_k = Projection(d, d)  # used by `encode`
        self.cross_v = Projection(d, d)  # used by `encode`
        self.cross_out = Projection(d, d)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fc1 = Projection(d, cfg.decoder_ffn_dim)
        self.fc2 = Projection(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.attend = Attend(cfg.decoder_attention_heads, 0, cfg.head_dim)

    def forward(self, x: Tensor, cross: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        cfg = self.cfg
        heads, hd = cfg.decoder_attention_heads, cfg.head_dim
        b, s, d = x.shape
        qkv = op.reshape(self.self_qkv(x), (b, s, 3 * heads, hd))
        a = cache.attention_with_fused_qkv(layer_id, qkv, heads, sm_scale=hd**-0.5)
        x = self.self_attn_layer_norm(x + self.self_out(op.reshape(a, (b, s, d))))
        q = _heads_first(self.cross_q(x), b * s, heads, hd)
        k, v = _layer(cross, 2 * layer_id), _layer(cross, 2 * layer_id + 1)
        a = self.attend(q, op.permute_dims(k, [0, 2, 1]), v)
        x = self.encoder_attn_layer_norm(x + self.cross_out(op.reshape(op.permute_dims(a, [1, 0, 2]), (b, s, d))))
        return self.final_layer_norm(x + self.fc2(_act(self.fc1(x), cfg.activation_function)))


def _layer(cross: Tensor, index: int) -> Tensor:
    """cross[index] [heads, src_len, head_dim]."""
    return op.tensor_expr_op(
        lambda c: te.compute(tuple(c.shape[1:]), lambda h, t, k: c[index, h, t, k], name="cross_layer"),
        "cross_layer",
        [cross],
    )


class MarianModel(EncoderDecoder):
    """Encoder, decoder and tied head, with encode / prefill / decode entry points."""

    def __init__(self, cfg: MarianConfig):
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.positions = nn.Parameter((cfg.max_position_embeddings, d), "float32")
        self.encoder_layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.decoder_layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.decoder_layers)])
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.final_logits_bias = nn.Parameter((cfg.vocab_size,), "float32")
        self.scale = math.sqrt(d) if cfg.scale_embedding else 1.0

    def _embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(ids) * self.scale
        # "clip": a position past the table reads its last row instead of out of bounds (the
        # runtime bounds lengths by the table size anyway).
        rows = relax.op.take(self.positions._expr, op.reshape(positions, (-1,))._expr, axis=0, mode="clip")
        return x + op.reshape(op.wrap_nested(rows, "positions"), x.shape)

    def encode(self, input_ids: Tensor) -> Tensor:
        """Source ids [1, n] -> cross-attention K/V [layers * 2, heads, n, head_dim]."""
        cfg = self.cfg
        n = input_ids.shape[1]
        pos = op.reshape(op.arange(0, n, dtype="int32"), (1, n))
        h = op.reshape(self._embed(input_ids, pos), (n, cfg.d_model))
        for layer in self.encoder_layers:
            h = layer(h)
        kv = []
        for layer in self.decoder_layers:
            for proj in (layer.cross_k, layer.cross_v):
                kv.append(op.unsqueeze(_heads_first(proj(h), n, cfg.decoder_attention_heads, cfg.head_dim), 0))
        return op.concat(kv, dim=0)

    def _hidden(self, ids: Tensor, positions: Tensor, cross: Tensor, cache: PagedKVCache) -> Tensor:
        x = self._embed(ids, positions)
        for layer_id, layer in enumerate(self.decoder_layers):
            x = layer(x, cross, cache, layer_id)
        return x

    def _logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h) + self.final_logits_bias

    def cache_shape(self) -> tuple[int, int, int]:
        """(decoder layers, heads, head width) of the self-attention cache."""
        return self.cfg.decoder_layers, self.cfg.decoder_attention_heads, self.cfg.head_dim

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """Entry points and their shapes, as exported to Relax."""
        cfg = self.cfg
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cross = nn.spec.Tensor(
            [2 * cfg.decoder_layers, cfg.decoder_attention_heads, "src_len", cfg.head_dim], "float32"
        )
        spec = {
            "encode": {"input_ids": nn.spec.Tensor([1, "src_len"], "int32"), "$": packed},
            **self.decoder_spec(cross),
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def sinusoids(cfg: MarianConfig) -> np.ndarray:
    """Marian's position table [max_positions, d]: sin of the even angles, then cos of the odd ones."""
    n, d = cfg.max_position_embeddings, cfg.d_model
    angle = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)[None, :]
    half = d // 2 + d % 2
    out = np.empty((n, d), np.float32)
    out[:, :half] = np.sin(angle[:, 0::2])
    out[:, half:] = np.cos(angle[:, 1::2])
    return out


def hf_weights(state: dict[str, np.ndarray], cfg: MarianConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (parameter name, float32 array) from a `MarianMTModel` state dict (safetensors)."""

    def get(name: str) -> np.ndarray:
        for key in (name, f"model.{name}"):
            if key in state:
                return np.asarray(state[key], dtype=np.float32)
        raise ModelFileError(f"weight '{name}' is missing")

    def proj(name: str, src: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{name}.proj.weight", get(f"{src}.weight")
        yield f"{name}.bias", get(f"{src}.bias")

    def norm(name: str, src: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{name}.weight", get(f"{src}.weight")
        yield f"{name}.bias", get(f"{src}.bias")

    embed = get("shared.weight")
    yield "embed_tokens.weight", embed
    # The sinusoidal tables are usually not saved (transformers rebuilds them at load).
    key = "model.encoder.embed_positions.weight"
    yield "positions", get(key[6:]) if key in state or key[6:] in state else sinusoids(cfg)
    for i in range(cfg.encoder_layers):
        p, s = f"encoder_layers.{i}.", f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from proj(p + n, s + "self_attn." + n)
        yield from norm(p + "self_attn_layer_norm", s + "self_attn_layer_norm")
        yield from proj(p + "fc1", s + "fc1")
        yield from proj(p + "fc2", s + "fc2")
        yield from norm(p + "final_layer_norm", s + "final_layer_norm")
    for i in range(cfg.decoder_layers):
        p, s = f"decoder_layers.{i}.", f"decoder.layers.{i}."
        sa = s + "self_attn."
        yield p + "self_qkv.proj.weight", np.concatenate([get(sa + f"{n}_proj.weight") for n in "qkv"], axis=0)
        yield p + "self_qkv.bias", np.concatenate([get(sa + f"{n}_proj.bias") for n in "qkv"], axis=0)
        yield from proj(p + "self_out", sa + "out_proj")
        yield from norm(p + "self_attn_layer_norm", s + "self_attn_layer_norm")
        for ours, theirs in (
            ("cross_q", "q_proj"),
            ("cross_k", "k_proj"),
            ("cross_v", "v_proj"),
            ("cross_out", "out_proj"),
        ):
            yield from proj(p + ours, f"{s}encoder_attn.{theirs}")
        yield from norm(p + "encoder_attn_layer_norm", s + "encoder_attn_layer_norm")
        yield from proj(p + "fc1", s + "fc1")
        yield from proj(p + "fc2", s + "fc2")
        yield from norm(p + "final_layer_norm", s + "final_layer_norm")
    head = state.get("lm_head.weight")
    yield "lm_head.weight", embed if head is None else np.asarray(head, dtype=np.float32)
    bias = state.get("final_logits_bias")
    yield (
        "final_logits_bias",
        np.zeros(cfg.vocab_size, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1),
    )
