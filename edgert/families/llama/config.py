"""The Llama hyper-parameters and what a build reads from a GGUF file, checked, without TVM.

Kept apart from the model's equations (`model`, which imports TVM) so that reading and checking
a source file, as `tools/fuzz.py` does thousands of times, stays light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgert.errors import ModelFileError, UnsupportedModelError


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool

    @classmethod
    def from_gguf(cls, model: Any) -> LlamaConfig:
        """Read the config from a GGUF file's `llama.*` metadata."""
        if model.architecture != "llama":
            raise UnsupportedModelError(
                f"{model.path}: architecture '{model.architecture}' is not supported (edgert compiles: llama)"
            )
        required = (
            "llama.block_count",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "tokenizer.ggml.tokens",
        )
        missing = [k for k in required if model.metadata.get(k) is None]
        if missing:
            raise ModelFileError(f"{model.path}: metadata field(s) missing or unreadable: {', '.join(missing)}")
        tokens = model.metadata["tokenizer.ggml.tokens"]
        if not isinstance(tokens, list):
            raise ModelFileError(f"{model.path}: tokenizer.ggml.tokens is not a list")

        def number(name: str, default: Any, kind: type, low: float, high: float) -> Any:
            value = model.arch_field(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ModelFileError(f"{model.path}: llama.{name} is {value!r}, not a number in {low}..{high}")
            if kind is int and value != int(value):
                raise ModelFileError(f"{model.path}: llama.{name} is {value!r}, not a whole number")
            return kind(value)

        hidden = number("embedding_length", None, int, 1, 1 << 16)
        heads = number("attention.head_count", None, int, 1, 1024)
        kv_heads = number("attention.head_count_kv", heads, int, 1, heads)
        head_dim = number("rope.dimension_count", hidden // heads, int, 2, 1 << 12)
        if heads % kv_heads or head_dim % 2:
            raise ModelFileError(
                f"{model.path}: {heads} attention heads cannot share {kv_heads} KV heads, or the head size "
                f"{head_dim} is odd"
            )
        return cls(
            vocab_size=len(tokens),
            hidden_size=hidden,
            intermediate_size=number("feed_forward_length", None, int, 1, 1 << 18),
            num_layers=number("block_count", None, int, 1, 1024),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5, float, 1e-12, 1.0),
            rope_theta=number("rope.freq_base", 10000.0, float, 1.0, 1e12),
            context_length=number("context_length", 2048, int, 1, 1 << 24),
            tie_word_embeddings="output.weight" not in model.tensor_types,
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The GGUF tensors this config reads and their (numpy-order) shapes."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["output.weight"] = (v, h)
        for i in range(self.num_layers):
            b = f"blk.{i}."
            shapes |= {
                b + "attn_norm.weight": (h,),
                b + "attn_q.weight": (q, h),
                b + "attn_k.weight": (kv, h),
                b + "attn_v.weight": (kv, h),
                b + "attn_output.weight": (h, q),
                b + "ffn_norm.weight": (h,),
                b + "ffn_gate.weight": (f, h),
                b + "ffn_up.weight": (f, h),
                b + "ffn_down.weight": (h, f),
            }
        return shapes

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)


def read_source(
    source: Any, parsed: Any = None, config_cls: Any = None, loader: Any = None
) -> tuple[Any, Any, str, dict[str, Any]]:
    """Everything a build takes from the GGUF file before TVM runs, each part checked: the parsed
    file, the config (``config_cls.from_gguf``, default `LlamaConfig`), the tokenizer document and
    the manifest's tokenizer section (its chat template rendered once in the sandbox; a family's
    ``loader.tokenizer_metadata`` may complete the file's fields). Bad input fails here, before
    the minutes of building."""
    from edgert.frontend import read_gguf
    from edgert.frontend.gguf_tokenizer import build_tokenizer_json, tokenizer_config
    from edgert.runtime.chat_template import check_template

    gguf_model = parsed if parsed is not None else read_gguf(source)
    cfg = (config_cls or LlamaConfig).from_gguf(gguf_model)
    gguf_model.check_tensor_types()
    if hasattr(cfg, "tensor_shapes"):
        gguf_model.check_shapes(cfg.tensor_shapes())
    where = str(gguf_model.path)
    metadata = getattr(loader, "tokenizer_metadata", lambda m: m)(gguf_model.metadata)
    tokenizer_json = build_tokenizer_json(metadata, where)
    fields = tokenizer_config(metadata, where)
    if fields["chat_template"]:
        check_template(fields["chat_template"], where, fields["bos_token"] or "", fields["eos_token"] or "")
    return gguf_model, cfg, tokenizer_json, fields
