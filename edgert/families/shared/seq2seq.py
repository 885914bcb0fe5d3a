"""What the encoder-decoder families (Whisper, Marian) share: the decoder's entry points.

An encoder-decoder model's decoder runs over two caches: its own keys and values in TVM's paged
KV cache (one sequence per beam), and the cross-attention keys and values that ``encode``
returns once per input and every ``prefill``/``decode`` call takes as a plain tensor. A family
subclasses `EncoderDecoder` and writes ``encode``, ``_decode`` (token ids and positions ->
logits) and ``cache_shape``; the rest is here.
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from edgert.families.shared.kv_cache import paged_kv_cache


def last_token(h: Tensor) -> Tensor:
    """h[:, -1:, :] for a symbolic sequence length."""
    return op.tensor_expr_op(
        lambda x: te.compute((x.shape[0], 1, x.shape[2]), lambda i, _, k: x[i, x.shape[1] - 1, k], name="last_token"),
        "last_token",
        [h],
    )


class EncoderDecoder(nn.Module):
    """Base of an encoder-decoder family: ``prefill``, ``decode``, ``create_kv_cache`` and their spec."""

    def cache_shape(self) -> tuple[int, int, int]:
        """(decoder layers, heads, head width) of the self-attention cache."""
        raise NotImplementedError

    def _hidden(self, ids: Tensor, positions: Tensor, cross: Tensor, cache: PagedKVCache) -> Tensor:
        """The decoder's last hidden states [b, s, d] (its layers write their self-attention KV)."""
        raise NotImplementedError

    def _logits(self, h: Tensor) -> Tensor:
        """Hidden states [b, s, d] -> logits [b, s, vocab]."""
        raise NotImplementedError

    def prefill(
        self, input_ids: Tensor, positions: Tensor, cross_kv: Tensor, cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        """The decoder prompt of one sequence [1, s]: logits of its last token [1, 1, vocab].

        The head runs on the last position only: over a whole prompt it was most of the prefill
        (Whisper's 51,864-word head on every token of the previous window's text)."""
        return self._logits(last_token(self._hidden(input_ids, positions, cross_kv, cache))), cache

    def decode(
        self, input_ids: Tensor, positions: Tensor, cross_kv: Tensor, cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        """One token for each of b sequences (beams) [b, 1]: logits [b, 1, vocab]."""
        return self._logits(self._hidden(input_ids, positions, cross_kv, cache)), cache

    def create_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The decoder's self-attention cache: TVM's paged cache with its CPU kernels, no RoPE."""
        layers, heads, head_dim = self.cache_shape()
        return paged_kv_cache(
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
        )

    def decoder_spec(self, cross: nn.spec.Tensor) -> dict[str, Any]:
        """Spec entries of ``prefill``, ``decode`` and ``create_kv_cache``; ``cross`` is the cross-attention K/V."""
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        return {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "positions": nn.spec.Tensor([1, "seq_len"], "int32"),
                "cross_kv": cross,
                "cache": cache,
                "$": packed,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch", 1], "int32"),
                "positions": nn.spec.Tensor(["batch", 1], "int32"),
                "cross_kv": cross,
                "cache": cache,
                "$": packed,
            },
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }


class Projection(nn.Module):
    """y = act(x Wᵀ + b), with the bias kept apart so the compiler can pack the bias-free matmul
    (and, for the encoder's many rows, fuse bias and activation into one kernel)."""

    def __init__(self, in_features: int, out_features: int, activation: str | None = None):
        self.proj = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter((out_features,), "float32")
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x) + self.bias
        return op.gelu(y) if self.activation == "gelu" else y


class HeadsProjection(Projection):
    """A projection whose output splits into ``parts`` per-head tensors (q, k, v or k, v), laid out
    for `Attend`: [parts * heads, rows * head_dim], each head's block row-major [rows, head_dim],
    except the part ``transposed`` (the keys), stored [head_dim, rows]. The compiler fuses the layout
    into the matmul's write-back."""

    def __init__(self, in_features: int, heads: int, head_dim: int, parts: int, transposed: int):
        super().__init__(in_features, parts * heads * head_dim)
        self.heads, self.head_dim, self.parts, self.transposed = heads, head_dim, parts, transposed

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        parts = op.split(super().forward(x), self.parts, axis=-1)
        by_head = [op.reshape(y, (rows, self.heads, self.head_dim)) for y in parts]
        blocks = [op.permute_dims(y, _order(i == self.transposed)) for i, y in enumerate(by_head)]
        return op.concat([op.reshape(b, (self.heads, rows * self.head_dim)) for b in blocks], dim=0)


def _order(transposed: bool) -> list[int]:
    """Axes from [rows, heads, head_dim] to keys [heads, head_dim, rows] or else [heads, rows, head_dim]."""
    return [1, 2, 0] if transposed else [1, 0, 2]


class Attend(nn.Module):
    """softmax(q kᵀ · scale) v per head: q [h, n, d], keys transposed kt [h, d, m], v [h, m, d] -> [h, n, d].

    Written with plain ops; the compiler swaps in a fused kernel (`apply_seq2seq_kernels`).
    """

    def __init__(self, heads: int, keys: int, head_dim: int):
        self.heads, self.keys, self.head_dim, self.scale = heads, keys, head_dim, head_dim**-0.5

    def forward(self, q: Tensor, kt: Tensor, v: Tensor) -> Tensor:
        return op.matmul(op.softmax(op.matmul(q, kt) * self.scale, axis=-1), v)

    def cross(self, q: Tensor, cross: Tensor, layer: int) -> Tensor:
        """Attend over layer ``layer`` of the cross-attention cache [layers * 2, heads, keys * head_dim]."""
        kt = cross_slice(cross, 2 * layer, (self.heads, self.head_dim, self.keys))
        v = cross_slice(cross, 2 * layer + 1, (self.heads, self.keys, self.head_dim))
        return self.forward(q, kt, v)

    def frames(self, qkv: Tensor) -> Tensor:
        """Self-attention of every frame over all of them, from a `HeadsProjection` of q, k, v
        [3 * heads, frames * head_dim] -> [frames, heads * head_dim] (heads side by side)."""
        h, d, m = self.heads, self.head_dim, self.keys
        parts = op.reshape(qkv, (3, h, m * d))
        q, kt, v = (cross_slice(parts, i, shape) for i, shape in enumerate([(h, m, d), (h, d, m), (h, m, d)]))
        return op.reshape(op.permute_dims(self.forward(q, kt, v), [1, 0, 2]), (m, h * d))


def cross_slice(cross: Tensor, index: int, shape: tuple[int, int, int]) -> Tensor:
    """cross[index] viewed as ``shape``: one layer's keys [heads, d, frames] or values [heads, frames, d]."""
    _, inner = shape[1], shape[2]
    return op.tensor_expr_op(
        lambda x: te.compute(shape, lambda h, a, b: x[index, h, a * inner + b], name="cross_slice"),
        "cross_slice",
        [cross],
    )
