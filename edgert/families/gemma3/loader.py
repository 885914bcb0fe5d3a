"""Gemma 3 weights from a GGUF file, in the names and order of `Gemma3ForCausalLM`'s parameters.

Quantized matrices are kept as codes and scales where edgert's q4/q8 kernels take them exactly
or nearly (see `kquant_rows`); the rest come dequantized to float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgert.families.gemma3.model import Gemma3Config
from edgert.frontend.quantized import GROUP, QuantizedRows, concat_rows

# Gemma's chat format, for files that carry no `tokenizer.chat_template` (the shipped Q4_K_M does
# not): Gemma 3's published template, a system message folded into the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tokenizer_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The file's tokenizer fields, with Gemma's chat template when the file has none."""
    if metadata.get("tokenizer.chat_template"):
        return metadata
    return {**metadata, "tokenizer.chat_template": GEMMA_CHAT_TEMPLATE}


def _raw_blocks(model: Any, name: str, block_bytes: int) -> np.ndarray:
    t = model._find(name)
    return np.ascontiguousarray(np.asarray(t.data), dtype=np.uint8).reshape(-1, block_bytes)


def _codes(w: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Integer codes of w [N, K] given per-group f32 scale (and offset) [N, K/32]: exact where the
    file's values are ``scale * code + offset``."""
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    if offset is not None:
        g = g - offset[..., None]
    safe = np.where(scale == 0, 1, scale)[..., None]
    return np.clip(np.rint(g / safe), lo, hi).reshape(n, k)


def kquant_rows(model: Any, name: str) -> QuantizedRows | None:
    """A 2-D tensor as q4/q8 codes and scales, or None (then it is used as float32).

    - Q4_0, Q4_1, Q8_0: the file's blocks as they are.
    - Q5_0 (``d * (q - 16)``, q in 0..31): q8 with the same scale and codes -16..15, exact.
    - Q4_K (super-blocks of 256 with 6-bit sub-block scales and mins): q4 with scale ``d * sc`` and
      min ``-dmin * m`` per group of 32; exact codes, the two products rounded to f16 (relative
      error <= 2^-11 of a group's scale).
    Q5_K and Q6_K (5-/6-bit codes, Q6_K's groups of 16) fit neither and come as floats.
    """
    kind = model.tensor_types[name]
    blocks = model.blocks(name)
    if blocks is not None or kind not in ("Q5_0", "Q4_K"):
        return blocks
    w = model.tensor(name)
    if w.ndim != 2:
        return None
    n, k = w.shape
    if kind == "Q5_0":
        d = _raw_blocks(model, name, 22)[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32).reshape(n, -1)
        codes = _codes(w, d, None, -16, 15).astype(np.int8)
        return QuantizedRows("q8", codes, d.astype(np.float16))
    raw = _raw_blocks(model, name, 144)
    d = raw[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    q = raw[:, 4:16].astype(np.uint8)
    sc = np.empty((raw.shape[0], 8), np.float32)
    mn = np.empty((raw.shape[0], 8), np.float32)
    for j in range(8):  # ggml's get_scale_min_k4
        if j < 4:
            sc[:, j], mn[:, j] = q[:, j] & 63, q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    scale = (d[:, None] * sc).reshape(n, k // GROUP)
    offset = (-dmin[:, None] * mn).reshape(n, k // GROUP)
    codes = _codes(w, scale, offset, 0, 15).astype(np.uint8)
    return QuantizedRows("q4", codes, scale.astype(np.float16), offset.astype(np.float16))


def gguf_weights(
    model: Any, cfg: Gemma3Config, keep_blocks: bool = False
) -> Iterator[tuple[str, np.ndarray | QuantizedRows]]:
    """Yield (parameter name, weight) in the nn module's naming, from GGUF tensors.

    With ``keep_blocks``, matrices come as `QuantizedRows` where `kquant_rows` keeps them; a tied
    model yields its table once, as ``lm_head.weight``. Q and K rows keep the file's order: Gemma's
    GGUF converter does not permute them (llama.cpp uses NeoX-style RoPE for it, as TVM does).
    """

    def get(name: str) -> np.ndarray | QuantizedRows:
        blocks = kquant_rows(model, name) if keep_blocks else None
        return blocks if blocks is not None else model.tensor(name)

    if not cfg.tie_word_embeddings:
        yield "embed_tokens.weight", get("token_embd.weight")
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        qkv = [get(b + "attn_q.weight"), get(b + "attn_k.weight"), get(b + "attn_v.weight")]
        yield p + "attn.qkv_proj.weight", concat_rows(qkv)
        yield p + "attn.o_proj.weight", get(b + "attn_output.weight")
        yield p + "attn.q_norm.weight", model.tensor(b + "attn_q_norm.weight")
        yield p + "attn.k_norm.weight", model.tensor(b + "attn_k_norm.weight")
        yield p + "mlp.gate_up_proj.weight", concat_rows([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        yield p + "mlp.down_proj.weight", get(b + "ffn_down.weight")
        yield p + "input_norm.weight", model.tensor(b + "attn_norm.weight")
        yield p + "post_attention_norm.weight", model.tensor(b + "post_attention_norm.weight")
        yield p + "pre_ffw_norm.weight", model.tensor(b + "ffn_norm.weight")
        yield p + "post_ffw_norm.weight", model.tensor(b + "post_ffw_norm.weight")
    yield "norm.weight", model.tensor("output_norm.weight")
    yield "lm_head.weight", get("token_embd.weight" if cfg.tie_word_embeddings else "output.weight")


def tied_weights(cfg: Gemma3Config) -> tuple[str, str] | None:
    """(embedding, head) when the head is the embedding table, else None."""
    return ("embed_tokens", "lm_head") if cfg.tie_word_embeddings else None
