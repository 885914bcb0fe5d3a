"""Mimi's streaming transformer (between its SEANet and its quantizer): causal self-attention with
RoPE over a window, layer scales, and its weights from the transformers layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgert.errors import UnsupportedModelError
from edgert.families.codec.model import _get, _slice


@dataclass
class TransformerConfig:
    """Hyper-parameters of Mimi's transformer stage (names follow `transformers`' MimiConfig)."""

    hidden_size: int = 512
    num_attention_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    sliding_window: int = 250
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @classmethod
    def from_mimi(cls, raw: dict[str, Any]) -> TransformerConfig:
        """From a MimiConfig dict; refuses grouped KV heads and attention biases (Mimi has neither)."""
        if raw.get("num_key_value_heads", raw["num_attention_heads"]) != raw["num_attention_heads"]:
            raise UnsupportedModelError("Mimi transformer with grouped KV heads is not supported")
        if raw.get("attention_bias") or raw.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedModelError("Mimi transformer: only bias-free attention and GELU are supported")
        rope = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0)}
        return cls(
            hidden_size=raw["hidden_size"],
            num_attention_heads=raw["num_attention_heads"],
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            sliding_window=raw["sliding_window"],
            norm_eps=raw.get("norm_eps", 1e-5),
            rope_theta=float(rope["rope_theta"]),
        )


class _Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        inner = cfg.num_attention_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class _Scale(nn.Module):
    def __init__(self, dim: int):
        self.scale = nn.Parameter((dim,), "float32")


class TransformerLayer(nn.Module):
    """``h += s1 ⊙ Attn(LN(h))``, ``h += s2 ⊙ MLP(LN(h))``."""

    def __init__(self, cfg: TransformerConfig):
        self.cfg = cfg
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn_layer_scale = _Scale(cfg.hidden_size)
        self.mlp_layer_scale = _Scale(cfg.hidden_size)

    def forward(
        self, h: Tensor, past_k: Tensor, past_v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        frames, heads, hd, window = h.shape[0], cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        x = self.input_layernorm(h)
        att = self.self_attn

        def split(t: Tensor) -> Tensor:
            return op.permute_dims(op.reshape(t, (frames, heads, hd)), [1, 0, 2])  # (H, T, D)

        q, v = split(att.q_proj(x)), split(att.v_proj(x))
        q = _rope(q, cos, sin)
        # Keys are kept time-last, (H, D, W): the time-major key transpose over a symbolic length
        # trips TVM 0.27's RewriteDataflowReshape; rotating in (T, H, D) and transposing once does not.
        k = op.reshape(att.k_proj(x), (frames, heads, hd))
        k = op.permute_dims(_rope(k, op.reshape(cos, (frames, 1, hd)), op.reshape(sin, (frames, 1, hd)), 2), [1, 2, 0])
        keys = op.concat([past_k, k], dim=2)  # (H, D, W + T): slot j holds position pos - W + j
        values = op.concat([past_v, v], dim=1)  # (H, W + T, D)
        scores = op.matmul(q, keys) * (1.0 / math.sqrt(hd)) + mask
        ctx = op.matmul(op.softmax(scores, axis=-1), values)  # (H, T, D)
        ctx = op.reshape(op.permute_dims(ctx, [1, 0, 2]), (frames, heads * hd))
        h = h + att.o_proj(ctx) * self.self_attn_layer_scale.scale
        y = self.mlp.fc2(op.gelu(self.mlp.fc1(self.post_attention_layernorm(h))))
        h = h + y * self.mlp_layer_scale.scale
        return h, _slice(keys, 2, frames, frames + window), _slice(values, 1, frames, frames + window)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, axis: int = 2) -> Tensor:
    """Rotate-half RoPE (as `transformers`): ``x·cos + rotate_half(x)·sin`` over the last axis."""
    half = x.shape[axis] // 2
    rotated = op.concat([op.negative(_slice(x, axis, half, 2 * half)), _slice(x, axis, 0, half)], dim=axis)
    return x * cos + rotated * sin


class StreamingTransformer(nn.Module):
    """Mimi's transformer over frames ``(T, d)``; KV cache: keys ``(layers, heads, head_dim, window)``,
    values ``(layers, heads, window, head_dim)``.

    ``position`` is the absolute index of the chunk's first frame; cache slot j holds position
    ``position - window + j`` (slots before the stream's start are masked).
    """

    def __init__(self, cfg: TransformerConfig):
        self.cfg = cfg
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(frames out, next k cache, next v cache)."""
        cfg = self.cfg
        frames, window = x.shape[0], cfg.sliding_window
        # Positions as float32: exact for integers below 2**24 frames (about 3.7 days at 12.5 Hz).
        pos = op.astype(position, "float32")
        steps = op.astype(op.arange(0, frames, dtype="int32"), "float32")
        query_pos = op.reshape(steps, (frames, 1)) + pos  # (T, 1)
        inv_freq = Tensor.from_const(
            (1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)).astype("float32")
        )
        angles = query_pos * op.reshape(inv_freq, (1, cfg.head_dim // 2))
        angles = op.concat([angles, angles], dim=1)  # (T, D)
        cos, sin = _cos(angles), _sin(angles)
        slots = op.astype(op.arange(0, window, dtype="int32"), "float32") - float(window)
        key_pos = op.concat([op.reshape(slots, (1, window)) + pos, op.reshape(steps, (1, frames)) + pos], dim=1)
        delta = query_pos - key_pos  # (T, W + T): how far back each key is
        allowed = op.wrap_nested(
            relax.op.logical_and(
                relax.op.logical_and((delta >= 0.0)._expr, (delta < float(window))._expr), (key_pos >= 0.0)._expr
            ),
            "allowed",
        )
        mask = op.where(allowed, Tensor.from_scalar(0.0, "float32"), Tensor.from_scalar(-1e30, "float32"))
        ks, vs = [], []
        h = x
        for i, layer in enumerate(self.layers):
            past_k = op.reshape(_slice(k_cache, 0, i, i + 1), (cfg.num_attention_heads, cfg.head_dim, window))
            past_v = op.reshape(_slice(v_cache, 0, i, i + 1), (cfg.num_attention_heads, window, cfg.head_dim))
            h, nk, nv = layer(h, past_k, past_v, cos, sin, mask)
            ks.append(op.reshape(nk, (1, cfg.num_attention_heads, cfg.head_dim, window)))
            vs.append(op.reshape(nv, (1, cfg.num_attention_heads, window, cfg.head_dim)))
        return h, op.concat(ks, dim=0), op.concat(vs, dim=0)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """One entry point ``forward`` with a symbolic number of frames."""
        cfg = self.cfg
        heads, window, hd = cfg.num_attention_heads, cfg.sliding_window, cfg.head_dim
        spec = {
            "forward": {
                "x": nn.spec.Tensor(["t", cfg.hidden_size], "float32"),
                "k_cache": nn.spec.Tensor([cfg.num_hidden_layers, heads, hd, window], "float32"),
                "v_cache": nn.spec.Tensor([cfg.num_hidden_layers, heads, window, hd], "float32"),
                "position": nn.spec.Tensor([1], "int32"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            }
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def _cos(x: Tensor) -> Tensor:
    return op.wrap_nested(relax.op.cos(x._expr), "cos")


def _sin(x: Tensor) -> Tensor:
    return op.wrap_nested(relax.op.sin(x._expr), "sin")


def mimi_transformer_weights(
    tensors: dict[str, np.ndarray], prefix: str, cfg: TransformerConfig
) -> dict[str, np.ndarray]:
    """A MimiModel's ``{prefix}.layers.*`` (e.g. ``encoder_transformer``) onto StreamingTransformer's names."""
    out = {}
    names = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.fc1.weight",
        "mlp.fc2.weight",
        "input_layernorm.weight",
        "input_layernorm.bias",
        "post_attention_layernorm.weight",
        "post_attention_layernorm.bias",
        "self_attn_layer_scale.scale",
        "mlp_layer_scale.scale",
    ]
    for i in range(cfg.num_hidden_layers):
        for n in names:
            out[f"layers.{i}.{n}"] = _get(tensors, f"{prefix}.layers.{i}.{n}" if prefix else f"layers.{i}.{n}")
    return out
