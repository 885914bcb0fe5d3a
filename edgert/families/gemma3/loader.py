"""Gemma 3 weights from a GGUF file, in the names and order of `Gemma3ForCausalLM`'s parameters.

Quantized matrices are kept as the file's codes and scales, exactly (see `kquant_rows`); the rest
come dequantized to float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgert.families.gemma3.model import Gemma3Config
from edgert.frontend.quantized import QuantizedRows, concat_rows

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


def kquant_rows(model: Any, name: str) -> QuantizedRows | None:
    """A 2-D tensor as the file's codes and scales (`GGUFModel.blocks`: Q4_0, Q4_1, Q8_0, Q5_0, Q4_K,
    Q5_K, Q6_K, all exact), or None (then it is used as float32)."""
    return model.blocks(name)


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
