"""The Gemma 3 architecture as its equations (as llama.cpp's ``gemma3`` graph computes it).

    h = embed(tokens) * sqrt(d)
    for each layer:  h = h + PostNorm(Wo · Attn(RoPE_l(QNorm(Wq · n)), RoPE_l(KNorm(Wk · n)), Wv · n)),  n = RMSNorm(h)
                     h = h + PostNorm(Wdown · (GELU_tanh(Wgate · n) ⊙ Wup · n)),                       n = RMSNorm(h)
    logits = softcap(Whead · RMSNorm(h))        (Whead = embed, tied; softcap only when the file asks)

Layers are local (attention over the last ``sliding_window`` positions, RoPE base
``rope_local_base``) or global (whole context, the file's ``rope.freq_base``) in the pattern of
`GEMMA3_DEFAULTS`. RMSNorm weights are used as stored: Gemma's ``x * (1 + w)`` convention is
already folded into GGUF files (llama.cpp's converter adds the 1), so the norm is the plain one.
RoPE is applied here, per layer with its own base, because TVM's paged cache has one base for
all layers; the cache then stores rotated keys (``RopeMode.NONE``). The global and the local
layers keep their keys and values in two caches, so that the local layers' pages outside the
window are freed (see `Gemma3ForCausalLM`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from edgert.compiler.compile import create_kv_cache_entry
from edgert.errors import ModelFileError, UnsupportedModelError
from edgert.families.llama.build import _layer_entry_points
from edgert.families.llama.model import LlamaForCausalLM, _gather_tokens, _last_token
from edgert.families.shared.kv_cache import paged_kv_cache
from edgert.families.shared.rope import rope

# What a Gemma 3 GGUF does not state, with Gemma 3's published values (as llama.cpp fills them in
# `llama_model::load_hparams` for LLM_ARCH_GEMMA3): every 6th layer is global, the others slide
# over the file's window with RoPE base 10,000; queries are scaled by 1/sqrt(head_dim).
GEMMA3_DEFAULTS: dict[str, Any] = {
    "sliding_window_pattern": 6,
    "rope_local_base": 10000.0,
    "rope_global_base": 1000000.0,
    "sliding_window": 512,
    "rms_norm_eps": 1e-6,
    "context_length": 32768,
}


@dataclass
class Gemma3Config:
    """Hyper-parameters of a Gemma 3 model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # the global layers' base
    rope_local_theta: float
    sliding_window: int
    sliding_window_pattern: int
    query_scale: float
    final_logit_softcapping: float | None
    context_length: int
    tie_word_embeddings: bool

    @classmethod
    def from_gguf(cls, model: Any) -> Gemma3Config:
        """Read the config from a GGUF file's ``gemma3.*`` metadata (the rest from `GEMMA3_DEFAULTS`)."""
        if model.architecture != "gemma3":
            raise UnsupportedModelError(f"{model.path}: architecture '{model.architecture}' is not gemma3")
        required = (
            "gemma3.block_count",
            "gemma3.embedding_length",
            "gemma3.feed_forward_length",
            "gemma3.attention.head_count",
            "tokenizer.ggml.tokens",
        )
        missing = [k for k in required if model.metadata.get(k) is None]
        if missing:
            raise ModelFileError(f"{model.path}: metadata field(s) missing or unreadable: {', '.join(missing)}")
        if model.arch_field("attn_logit_softcapping") is not None:
            # Gemma 2 caps attention scores; TVM's paged-attention kernels have no such step.
            raise UnsupportedModelError(f"{model.path}: attention logit soft-capping is not supported")
        hidden = int(model.arch_field("embedding_length"))
        heads = int(model.arch_field("attention.head_count"))
        head_dim = int(model.arch_field("attention.key_length", hidden // heads))
        if int(model.arch_field("attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModelError(f"{model.path}: key and value head sizes differ")
        softcap = model.arch_field("final_logit_softcapping")
        d = GEMMA3_DEFAULTS
        return cls(
            vocab_size=len(model.metadata["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=int(model.arch_field("feed_forward_length")),
            num_layers=int(model.arch_field("block_count")),
            num_heads=heads,
            num_kv_heads=int(model.arch_field("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(model.arch_field("attention.layer_norm_rms_epsilon", d["rms_norm_eps"])),
            rope_theta=float(model.arch_field("rope.freq_base", d["rope_global_base"])),
            rope_local_theta=float(d["rope_local_base"]),
            sliding_window=int(model.arch_field("attention.sliding_window", d["sliding_window"])),
            sliding_window_pattern=int(d["sliding_window_pattern"]),
            query_scale=head_dim**-0.5,
            final_logit_softcapping=None if softcap is None else float(softcap),
            context_length=int(model.arch_field("context_length", d["context_length"])),
            tie_word_embeddings="output.weight" not in model.tensor_types,
        )

    def is_local(self, layer_id: int) -> bool:
        """True for a sliding-window layer (all but every ``sliding_window_pattern``-th)."""
        return (layer_id + 1) % self.sliding_window_pattern != 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)


class Gemma3Attention(nn.Module):
    """Grouped-query attention with q/k RMSNorm and the layer's own RoPE base; q, k, v fused."""

    def __init__(self, cfg: Gemma3Config, layer_id: int):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.theta = cfg.rope_local_theta if cfg.is_local(layer_id) else cfg.rope_theta
        self.scale = cfg.query_scale
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False)
        self.k_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False)

    def attn_out(self, x: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor) -> Tensor:
        """Attention before the output projection [b, s, heads, head_dim]; appends k and v to the cache.

        ``positions`` [b*s] are the tokens' absolute positions (from the global cache: the local
        one counts only what its window keeps).
        """
        b, s, _ = x.shape
        h, kv = self.num_heads, self.num_kv_heads
        qkv = op.reshape(self.qkv_proj(x), (b, s, h + 2 * kv, self.head_dim))
        q, k, v = op.split(qkv, [h, h + kv], axis=2)
        q = rope(self.q_norm(q), positions, self.theta)
        k = rope(self.k_norm(k), positions, self.theta)
        fused = op.concat([q, k, v], dim=2)
        return cache.attention_with_fused_qkv(layer_id, fused, h, sm_scale=self.scale)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor) -> Tensor:
        b, s, _ = x.shape
        out = self.attn_out(x, cache, layer_id, positions)
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * self.head_dim)))


class Gemma3MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)); gate and up are one projection."""

    def __init__(self, cfg: Gemma3Config):
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.gelu(gate, approximate="tanh") * up)


class Gemma3Layer(nn.Module):
    """One block with norms before and after attention and the MLP (the "sandwich")."""

    def __init__(self, cfg: Gemma3Config, layer_id: int):
        eps = cfg.rms_norm_eps
        self.input_norm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)
        self.attn = Gemma3Attention(cfg, layer_id)
        self.post_attention_norm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)
        self.pre_ffw_norm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)
        self.mlp = Gemma3MLP(cfg)
        self.post_ffw_norm = nn.RMSNorm(cfg.hidden_size, -1, eps, bias=False)

    def forward(self, h: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor) -> Tensor:
        h = h + self.post_attention_norm(self.attn(self.input_norm(h), cache, layer_id, positions))
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """The Llama model's entry points (prefill, decode, verify, per-layer pieces) over Gemma 3 blocks."""

    def __init__(self, cfg: Gemma3Config):  # not super().__init__: that builds Llama blocks
        self.cfg = cfg  # type: ignore[assignment]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Gemma3Layer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def _embed(self, input_ids: Tensor) -> Tensor:
        # llama.cpp scales by sqrtf(d) in f32 (Hugging Face rounds it to the weights' dtype first).
        return self.embed_tokens(input_ids) * math.sqrt(self.cfg.hidden_size)

    def _logits(self, h: Tensor) -> Tensor:
        logits = super()._logits(h)
        cap = self.cfg.final_logit_softcapping
        return logits if not cap else op.tanh(logits / cap) * cap

    # -- two KV caches --------------------------------------------------------------------
    # TVM's paged cache shares one page table among its layers, so the global layers get a
    # cache of their own (every position) and the local layers a second one, made in one of two
    # ways (the runtime picks, `edgert.runtime.session.PagedKVCache`):
    # - ``create_local_kv_cache``: ``mha_sliding`` layers, whose kernels mask each query to its
    #   window in chunks shorter than the window; every position stays in the cache. (One plain layer that
    #   no block uses is appended: TVM 0.27 allocates its query/key/value staging buffers only
    #   when a cache has one.)
    # - ``create_local_kv_cache_freed``: plain layers in a cache whose sequence slides
    #   (`vm.builtin.attention_kv_cache_enable_sliding_window_for_seq`), keeping window - 1
    #   positions and freeing the pages that slide out. A cache with an ``mha_sliding`` layer
    #   never lets a sequence slide, and here every query of a step sees all that is kept: exact
    #   for one token (the kept positions and itself are its window) and for chunks that end
    #   before the window is full, so the runtime steps one token at a time past that.
    # Positions come from the global cache (a sliding one counts only what it keeps).

    def _cache_of(self, layer_id: int) -> tuple[bool, int]:
        """(local?, the layer's index in its cache)."""
        kinds = [self.cfg.is_local(i) for i in range(layer_id + 1)]
        return kinds[-1], kinds[:-1].count(kinds[-1])

    def _two_cache_stack(self, h: Tensor, cache: PagedKVCache, local_cache: PagedKVCache) -> Tensor:
        b, s, _ = h.shape
        positions = cache.get_query_positions(b * s)
        for layer_id, layer in enumerate(self.layers):
            local, index = self._cache_of(layer_id)
            h = layer(h, local_cache if local else cache, index, positions)
        return h

    def prefill(  # type: ignore[override]
        self, input_ids: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """Run a chunk of the prompt; the logits of its last token [1, 1, vocab]."""
        h = self._two_cache_stack(self._embed(input_ids), cache, local_cache)
        return self._logits(_last_token(h)), cache, local_cache

    def verify(  # type: ignore[override]
        self, input_ids: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """Like prefill, but the logits of every token [1, s, vocab]."""
        return self._logits(self._two_cache_stack(self._embed(input_ids), cache, local_cache)), cache, local_cache

    def decode(  # type: ignore[override]
        self, input_ids: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """One new token: logits [1, 1, vocab]."""
        return self._logits(self._two_cache_stack(self._embed(input_ids), cache, local_cache)), cache, local_cache

    # A server's batch (`edgert.serve.engine`): each sequence in both caches under the same id.
    def batch_decode(  # type: ignore[override]
        self, input_ids: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """One new token for each of ``batch`` sequences: ids [batch, 1] -> logits [batch, 1, vocab]."""
        return self.decode(input_ids, cache, local_cache)

    def prefill_rows(  # type: ignore[override]
        self, input_ids: Tensor, rows: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """A ragged pass over several sequences; the logits at token indices ``rows`` [1, r, vocab]."""
        h = self._two_cache_stack(self._embed(input_ids), cache, local_cache)
        return self._logits(_gather_tokens(h, rows)), cache, local_cache

    # Layer-range entry points (early exit, self-speculative drafting), over both caches.
    def layer(  # type: ignore[override]
        self, layer_id: int, h: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """Layer ``layer_id`` on hidden states [1, s, d], writing its KV entries in its cache."""
        b, s, _ = h.shape
        local, index = self._cache_of(layer_id)
        positions = cache.get_query_positions(b * s)
        return self.layers[layer_id](h, local_cache if local else cache, index, positions), cache, local_cache

    def kv_fill(  # type: ignore[override]
        self, layer_id: int, h: Tensor, cache: PagedKVCache, local_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache, PagedKVCache]:
        """Write layer ``layer_id``'s KV entries computed from ``h`` (CALM's copy-forward, as Llama's)."""
        b, s, _ = h.shape
        local, index = self._cache_of(layer_id)
        positions = cache.get_query_positions(b * s)
        block = self.layers[layer_id]
        out = block.attn.attn_out(block.input_norm(h), local_cache if local else cache, index, positions)
        return out, cache, local_cache

    @property
    def num_local_layers(self) -> int:
        return sum(self.cfg.is_local(i) for i in range(self.cfg.num_layers))

    def _kv_cache_options(self) -> dict:
        """The global layers' cache (Llama's `create_kv_cache`): keys arrive rotated (RoPE is per layer,
        see the module docstring)."""
        return {"num_layers": self.cfg.num_layers - self.num_local_layers, "rope_mode": RopeMode.NONE}

    def create_local_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The local layers' cache that masks (see the notes above)."""
        n = self.num_local_layers
        return self._local_cache(
            [max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window],
            ["mha_sliding"] * n + ["mha"],
            "_local",
        )

    def create_local_kv_cache_freed(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The local layers' cache whose sequence slides (see the notes above)."""
        sizes = [max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window]
        return self._local_cache(sizes, ["mha"] * self.num_local_layers, "_freed")

    def cache_windows(self) -> dict[str, int]:
        """The window of each local cache's kernels, by their name suffix (see `_local_cache`): edgert's
        CPU attention replaces them (`compiler.passes.attention.use_fast_cache_attention`)."""
        return {"_local": self.cfg.sliding_window, "_freed": self.cfg.sliding_window}

    def _local_cache(self, sizes: list[tirx.Var], kinds: list[str], suffix: str) -> PagedKVCache:
        cfg = self.cfg
        batch, total, chunk, page, sliding = sizes
        return paged_kv_cache(
            num_layers=len(kinds),
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_batch_size=batch,
            max_total_seq_len=total,
            prefill_chunk_size=chunk,
            page_size=page,
            support_sliding_window=sliding,
            rope_mode=RopeMode.NONE,
            attn_kind=kinds,
            sliding_window=cfg.sliding_window,
            symbol_suffix=suffix,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """prefill, verify, decode over both caches, and the two cache constructors."""
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        ids = nn.spec.Tensor([1, "seq_len"], "int32")
        create = {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        }
        hidden = nn.spec.Tensor([1, "seq_len", self.cfg.hidden_size], "float32")
        for i in range(self.cfg.num_layers):  # the exporter looks entry points up as attributes
            object.__setattr__(self, f"layer_{i}", functools.partial(self.layer, i))
            object.__setattr__(self, f"kv_fill_{i}", functools.partial(self.kv_fill, i))
        spec = {
            "prefill": {"input_ids": ids, "cache": cache, "local_cache": cache, "$": packed},
            "verify": {"input_ids": ids, "cache": cache, "local_cache": cache, "$": packed},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "cache": cache, "local_cache": cache, "$": packed},
            "batch_decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "cache": cache,
                "local_cache": cache,
                "$": packed,
            },
            "prefill_rows": {
                "input_ids": ids,
                "rows": nn.spec.Tensor(["num_rows"], "int32"),
                "cache": cache,
                "local_cache": cache,
                "$": packed,
            },
            "embed": {"input_ids": ids, "$": packed},
            "head": {"h": hidden, "$": packed},
            **{
                f"{kind}_{i}": {"h": hidden, "cache": cache, "local_cache": cache, "$": packed}
                for i in range(self.cfg.num_layers)
                for kind in ("layer", "kv_fill")
            },
            "create_kv_cache": create,
            "create_local_kv_cache": dict(create),
            "create_local_kv_cache_freed": dict(create),
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)

    def manifest_entry_points(self) -> dict[str, Any]:
        """The manifest's entry points; each takes and returns both caches."""
        cache = {"name": "cache", "type": "PagedKVCache"}
        local = {"name": "local_cache", "type": "PagedKVCache"}
        ids = {"name": "input_ids", "dtype": "int32"}
        logits = {"name": "logits", "dtype": "float32"}
        vocab = self.cfg.vocab_size
        layers = _layer_entry_points(self.cfg)
        for i in range(self.cfg.num_layers):  # both caches in and out
            for kind in ("layer", "kv_fill"):
                entry = layers[f"{kind}_{i}"]
                entry["inputs"].append(local)
                entry["outputs"].append(local)
        return {
            "prefill": {
                "inputs": [{**ids, "shape": [1, "seq_len"]}, cache, local],
                "outputs": [{**logits, "shape": [1, 1, vocab]}, cache, local],
            },
            "verify": {
                "inputs": [{**ids, "shape": [1, "seq_len"]}, cache, local],
                "outputs": [{**logits, "shape": [1, "seq_len", vocab]}, cache, local],
            },
            "decode": {
                "inputs": [{**ids, "shape": [1, 1]}, cache, local],
                "outputs": [{**logits, "shape": [1, 1, vocab]}, cache, local],
            },
            "batch_decode": {  # a server's batch, one row per sequence
                "inputs": [{**ids, "shape": ["batch_size", 1]}, cache, local],
                "outputs": [{**logits, "shape": ["batch_size", 1, vocab]}, cache, local],
            },
            "prefill_rows": {  # a server's mixed step: a ragged pass, the logits at ``rows``
                "inputs": [
                    {**ids, "shape": [1, "seq_len"]},
                    {"name": "rows", "dtype": "int32", "shape": ["num_rows"]},
                    cache,
                    local,
                ],
                "outputs": [{**logits, "shape": [1, "num_rows", vocab]}, cache, local],
            },
            **layers,
            "create_kv_cache": create_kv_cache_entry(cache),
            "create_local_kv_cache": create_kv_cache_entry(local),
            "create_local_kv_cache_freed": create_kv_cache_entry(local),
        }

    def manifest_kv_cache(self) -> dict[str, Any]:
        """What the runtime needs to create the local cache, either way."""
        return {
            "local": {
                "create": "create_local_kv_cache",
                "create_freed": "create_local_kv_cache_freed",
                "window": self.cfg.sliding_window,
                "num_layers": self.num_local_layers,
            }
        }
