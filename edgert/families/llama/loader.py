"""Llama weights from a GGUF file, in the names and order of `LlamaForCausalLM`'s parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgert.families.llama.config import LlamaConfig
from edgert.frontend.quantized import QuantizedRows, concat_rows


def _unpermute_rope(w: np.ndarray | QuantizedRows, n_heads: int) -> np.ndarray | QuantizedRows:
    """Undo the row permutation that GGUF converters apply to q/k for llama.cpp's RoPE.

    llama.cpp rotates adjacent pairs (x0, x1); TVM's kernels rotate the halves
    (x_i, x_{i+d/2}), as Hugging Face does, so the rows go back to the original order.
    """
    rows = w.shape[0]
    order = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.take_rows(order) if isinstance(w, QuantizedRows) else w[order]


def gguf_weights(
    model: Any, cfg: LlamaConfig, keep_blocks: bool = False
) -> Iterator[tuple[str, np.ndarray | QuantizedRows]]:
    """Yield (parameter name, weight) in the nn module's naming, from GGUF tensors.

    A tied model yields its table once, as ``lm_head.weight`` (see `tied_weights`).
    Weights are float32 arrays; with ``keep_blocks``, Q4_0/Q4_1/Q8_0 matrices come as their
    codes and scales (`QuantizedRows`) instead.
    """

    def get(name: str) -> np.ndarray | QuantizedRows:
        blocks = model.blocks(name) if keep_blocks else None
        return blocks if blocks is not None else model.tensor(name)

    if not cfg.tie_word_embeddings:  # tied: the head's table (below) is the embedding too
        yield "embed_tokens.weight", get("token_embd.weight")
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q = _unpermute_rope(get(b + "attn_q.weight"), cfg.num_heads)
        k = _unpermute_rope(get(b + "attn_k.weight"), cfg.num_kv_heads)
        yield p + "attn.qkv_proj.weight", concat_rows([q, k, get(b + "attn_v.weight")])
        yield p + "attn.o_proj.weight", get(b + "attn_output.weight")
        yield p + "mlp.gate_up_proj.weight", concat_rows([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        yield p + "mlp.down_proj.weight", get(b + "ffn_down.weight")
        yield p + "input_norm.weight", model.tensor(b + "attn_norm.weight")
        yield p + "post_attention_norm.weight", model.tensor(b + "ffn_norm.weight")
    yield "norm.weight", model.tensor("output_norm.weight")
    yield "lm_head.weight", get("token_embd.weight" if cfg.tie_word_embeddings else "output.weight")


def tied_weights(cfg: LlamaConfig) -> tuple[str, str] | None:
    """(embedding, head) when the head is the embedding table, else None."""
    return ("embed_tokens", "lm_head") if cfg.tie_word_embeddings else None
