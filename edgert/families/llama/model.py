"""The Llama architecture (SmolLM2, Llama 2/3, TinyLlama, ...) as its equations.

    h = embed(tokens)
    for each layer:  h = h + Wo · Attn(RoPE(Wq · n), RoPE(Wk · n), Wv · n),  n = RMSNorm(h)
                     h = h + Wdown · (SiLU(Wgate · n) ⊙ Wup · n),            n = RMSNorm(h)
    logits = Whead · RMSNorm(h)          (Whead = embed when the embeddings are tied)

Attention is grouped-query attention over a paged KV cache (`TIRPagedKVCache`), which also
applies RoPE to q and k. Every entry point is a slice of this stack, so a runtime can run
a range of layers, exit early or roll the cache back.

Built for a KV budget (``evictable``), RoPE is applied here instead, before the cache, so a
stored key carries the position it was written at; the ``*_at`` entry points take each token's
true position (tokens seen, not the cache's length, which shrinks when entries are evicted)
and also return the rotated queries that score the cached entries (TOVA,
`edgert.runtime.kv_budget`).
"""

from __future__ import annotations

import functools

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from edgert.families.llama.config import LlamaConfig
from edgert.families.shared.kv_cache import paged_kv_cache
from edgert.families.shared.rope import rope
from edgert.runtime.exits import range_spans

__all__ = ["LlamaConfig", "LlamaForCausalLM"]

# Row counts with a static verify entry (``verify_rows_<n>``, `batch_decode` with static shapes: no
# shape computations at run time, `Generator.step`); other counts up to ``kv_cache.verify_rows``
# run `batch_decode`. Few: each entry compiles its own static-shape kernels (all of 2..16: SmolLM2's
# build 12 -> 39 s), and the dynamic pass measured within 0.03 decode steps of the static one
# (SmolLM2, 5, 8 and 16 rows, 1 and 2 threads, loaded).
VERIFY_ROW_ENTRIES = (5, 8, 16)


def plus(residual: Tensor | None, linear: nn.Module, x: Tensor) -> Tensor:
    """``residual + linear(x)`` (``linear(x)`` without a residual), the add in the matmul's write-back
    where the kernel takes it: a block's two residual adds were kernels of their own (58 a SmolLM2
    step or verify pass, ~3 us each)."""
    if residual is None:
        return linear(x)
    if getattr(linear, "takes_residual", False):
        return linear.add_to(residual, x)
    return residual + linear(x)


def normed(linear: nn.Module, norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """``linear(norm(x))``, with the norm in the matmul's quantization where the kernel takes it."""
    if getattr(linear, "takes_rmsnorm", False) and norm.bias is None and norm.axes in (-1, [-1]):
        return linear.rmsnorm(x, norm)
    return linear(norm(x))


class LlamaAttention(nn.Module):
    """Grouped-query self-attention; q, k and v come from one fused projection."""

    def __init__(self, cfg: LlamaConfig, rope_outside: bool = False, kv_dtype: str = "float32"):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kv_dtype = kv_dtype  # the cache's: q, k, v and the attention output cross it in this dtype
        self.rope_outside, self.theta = rope_outside, cfg.rope_theta
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def attn_out(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        """Attention before the output projection [b, s, heads, head_dim]; appends k and v to the cache."""
        return self.attn_out_q(x, cache, layer_id)[0]

    def attn_out_q(
        self,
        x: Tensor,
        cache: PagedKVCache,
        layer_id: int,
        positions: Tensor | None = None,
        norm: nn.RMSNorm | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention output and, with RoPE outside the cache, the rotated queries [b, s, heads, head_dim].

        ``positions`` [b*s]: each token's position (default: the cache's, its sequence length).
        ``norm``: the block's input norm, applied to x first (in the projection's kernel where it can).
        """
        b, s, _ = x.shape
        h, kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x) if norm is None else normed(self.qkv_proj, norm, x)
        qkv = op.reshape(qkv, (b, s, h + 2 * kv, self.head_dim))
        q = None
        if self.rope_outside:
            q, k, v = op.split(qkv, [h, h + kv], axis=2)
            pos = cache.get_query_positions(b * s) if positions is None else positions
            q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
            qkv = op.concat([q, k, v], dim=2)
        # TVM's cache takes q/k/v and gives the output in its pages' dtype (nn's astype is a no-op at float32).
        out = cache.attention_with_fused_qkv(layer_id, qkv.astype(self.kv_dtype), h, sm_scale=self.head_dim**-0.5)
        return out.astype("float32"), q

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor | None = None) -> Tensor:
        return self.forward_q(x, cache, layer_id, positions)[0]

    def forward_q(
        self,
        x: Tensor,
        cache: PagedKVCache,
        layer_id: int,
        positions: Tensor | None = None,
        norm: nn.RMSNorm | None = None,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The attention block's output (plus ``residual`` when given) and its rotated queries (`attn_out_q`)."""
        b, s, _ = x.shape
        out, q = self.attn_out_q(x, cache, layer_id, positions, norm)
        return plus(residual, self.o_proj, op.reshape(out, (b, s, self.num_heads * self.head_dim))), q


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up are one projection."""

    def __init__(self, cfg: LlamaConfig):
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, norm: nn.RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
        """The MLP of x, or of ``norm(x)`` (the norm in the gate/up projection's kernel where it can);
        plus ``residual`` when given (in the down projection's write-back where it can)."""
        gate_up = self.gate_up_proj(x) if norm is None else normed(self.gate_up_proj, norm, x)
        if getattr(self.down_proj, "takes_swiglu", False):  # silu(gate) * up in the kernel's quantization
            if residual is not None and getattr(self.down_proj, "takes_residual", False):
                return self.down_proj.swiglu(gate_up, residual)
            down = self.down_proj.swiglu(gate_up)
            return down if residual is None else residual + down
        gate, up = op.split(gate_up, 2, axis=-1)
        return plus(residual, self.down_proj, op.silu(gate) * up)


class LlamaLayer(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, cfg: LlamaConfig, rope_outside: bool = False, kv_dtype: str = "float32"):
        self.input_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.attn = LlamaAttention(cfg, rope_outside, kv_dtype)
        self.post_attention_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        return self.forward_q(h, cache, layer_id)[0]

    def forward_q(
        self, h: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The block, and its rotated queries when RoPE is outside the cache (else None)."""
        h, q = self.attn.forward_q(h, cache, layer_id, positions, self.input_norm, residual=h)
        return self.mlp(h, self.post_attention_norm, residual=h), q


class LlamaForCausalLM(nn.Module):
    """Token embedding, the layer stack, final norm and the (tied) LM head."""

    evictable = False  # subclasses that build their own blocks (Gemma 3) keep the plain entry points

    def __init__(self, cfg: LlamaConfig, evictable: bool = False, kv_dtype: str = "float32"):
        self.cfg = cfg
        self.evictable = evictable  # RoPE before the cache and the ``*_at`` entry points (KV budget)
        self.kv_dtype = kv_dtype  # the KV cache's pages: float32, or float16 (half the bytes a token)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaLayer(cfg, evictable, kv_dtype) for _ in range(cfg.num_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        # Tied models still get their own head module: the compiler may give it a layout of
        # its own, and the loader fills it from the embedding table.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def _stack(self, h: Tensor, cache: PagedKVCache, start: int = 0, end: int | None = None) -> Tensor:
        for layer_id in range(start, self.cfg.num_layers if end is None else end):
            h = self.layers[layer_id](h, cache, layer_id)
        return h

    def _logits(self, h: Tensor) -> Tensor:
        logits = normed(self.lm_head, self.norm, h)
        return logits if logits.dtype == "float32" else logits.astype("float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids [1, s] to hidden states [1, s, d]."""
        return self._embed(input_ids)

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def prefill(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Run a chunk of the prompt; return the logits of its last token [1, 1, vocab]."""
        h = self._stack(self._embed(input_ids), cache)
        return self._logits(_last_token(h)), cache

    def prefill_rows(self, input_ids: Tensor, rows: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """A ragged pass (several sequences, each its own length, laid end to end in ``input_ids``
        [1, s]); the logits at token indices ``rows`` [r] -> [1, r, vocab].

        A server's mixed step: each decoding sequence's next token (a 1-token piece) beside a
        prompt's chunk, every sequence's last token gathered. The gather comes before the final
        norm and the LM head, so the head (the largest matrix) runs on r rows, not s.
        """
        h = self._stack(self._embed(input_ids), cache)
        return self._logits(_gather_tokens(h, rows)), cache

    def verify(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Like prefill, but the logits of every token [1, s, vocab] (scoring, speculation)."""
        return self._logits(self._stack(self._embed(input_ids), cache)), cache

    def decode(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """One new token per step: logits [1, 1, vocab]."""
        return self._logits(self._stack(self._embed(input_ids), cache)), cache

    def batch_decode(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """One new token for each of ``batch`` sequences in one pass: ids [batch, 1] -> logits [batch, 1, vocab].

        Row i belongs to the i-th sequence id given to the cache's ``begin_forward`` (a server's
        concurrent requests); the projections see ``batch`` rows at once, so the weights are read
        once per step instead of once per sequence.
        """
        return self._logits(self._stack(self._embed(input_ids), cache)), cache

    def verify_rows(self, input_ids: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """`batch_decode` of consecutive tokens of one sequence (a verify pass as decode rows), exported
        once per count of `VERIFY_ROW_ENTRIES` as ``verify_rows_<n>`` with static shapes."""
        return self.batch_decode(input_ids, cache)

    # -- a KV budget: true positions in, rotated queries out ---------------------------------
    def _stack_at(self, h: Tensor, cache: PagedKVCache, positions: Tensor, last: bool) -> tuple[Tensor, Tensor]:
        """The stack at explicit ``positions``; also each layer's queries [layers, rows, heads, head_dim]
        (of the last token when ``last``, else of every row's single token)."""
        qs = []
        for layer_id in range(self.cfg.num_layers):
            h, q = self.layers[layer_id].forward_q(h, cache, layer_id, positions)
            assert q is not None
            heads, dim = self.cfg.num_heads, self.cfg.head_dim
            if last:  # [1, s, heads, head_dim] -> [1, 1, heads * head_dim]
                q = _last_token(op.reshape(q, (q.shape[0], q.shape[1], heads * dim)))
            qs.append(op.reshape(q, (1, q.shape[0], heads, dim)))
        return h, op.concat(qs, dim=0)

    def prefill_at(
        self, input_ids: Tensor, positions: Tensor, cache: PagedKVCache
    ) -> tuple[Tensor, Tensor, PagedKVCache]:
        """Prefill at true ``positions`` [s]: the last token's logits and its queries [layers, 1, heads, head_dim]."""
        h, q = self._stack_at(self._embed(input_ids), cache, positions, last=True)
        return self._logits(_last_token(h)), q, cache

    def batch_decode_at(
        self, input_ids: Tensor, positions: Tensor, cache: PagedKVCache
    ) -> tuple[Tensor, Tensor, PagedKVCache]:
        """`batch_decode` at true ``positions`` [batch]: logits and queries [layers, batch, heads, head_dim]."""
        h, q = self._stack_at(self._embed(input_ids), cache, positions, last=False)
        return self._logits(h), q, cache

    # -- layer-range execution (early exit, self-speculative drafting) --------------------
    # One Relax function per layer (``layer_<i>``) rather than one taking the layer index: the
    # weights stay in the per-layer layout every other entry point uses, the KV cache's layer
    # id stays a constant, and the fused kernels are shared, so compile time grows only by
    # the Relax functions themselves. The sequence length is symbolic, so one form serves
    # prefill, decode and verify (the cache picks its decode or prefill kernel at run time).
    # Beside them, the spans between the default exit points (`range_spans`) as one function
    # each: a layer-wise step then makes a handful of VM calls instead of one per layer.

    def layer(self, layer_id: int, h: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Layer ``layer_id`` on hidden states [1, s, d], writing that layer's KV entries."""
        return self.layers[layer_id](h, cache, layer_id), cache

    def kv_fill(self, layer_id: int, h: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Write layer ``layer_id``'s KV entries computed from ``h`` without running the rest of it.

        This is CALM's copy-forward: a token that exits at layer e gives every skipped layer
        i >= e the keys and values of its exit hidden state, so later tokens can attend to it.
        Only the norm, the q/k/v projection and the cache append run (about a sixth of a
        layer); the attention output comes back so that it is not optimized away.
        """
        block = self.layers[layer_id]
        return block.attn.attn_out_q(h, cache, layer_id, norm=block.input_norm)[0], cache

    def layer_range(self, start: int, end: int, h: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Layers ``start``..``end - 1`` in one call (one VM call per span between exit points)."""
        return self._stack(h, cache, start, end), cache

    def kv_fill_range(self, start: int, end: int, h: Tensor, cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """`kv_fill` of layers ``start``..``end - 1`` from the same ``h`` in one call.

        The attention outputs are summed into the one result, so that none of the appends is
        optimized away (the sum costs a few hundred additions per token).
        """
        out = self.kv_fill(start, h, cache)[0]
        for layer_id in range(start + 1, end):
            out = out + self.kv_fill(layer_id, h, cache)[0]
        return out, cache

    def head(self, h: Tensor) -> Tensor:
        """The exit head: final norm and LM head on hidden states [1, s, d] -> logits [1, s, vocab]."""
        return self._logits(h)

    def create_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The paged KV cache (TVM's CPU/GPU TIR kernels); `_kv_cache_options` says how attention runs."""
        cfg = self.cfg
        options = {"num_layers": cfg.num_layers, "rope_theta": cfg.rope_theta, **self._kv_cache_options()}
        return paged_kv_cache(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            **options,
        )

    def _kv_cache_options(self) -> dict:
        """What a family changes in the cache (`paged_kv_cache`'s options: the layers it holds, RoPE):
        here RoPE applied by the cache (before us when evictable)."""
        return {"rope_mode": RopeMode.NONE if self.evictable else RopeMode.NORMAL, "dtype": self.kv_dtype}

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        """Entry points and their shapes, as exported to Relax."""
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        hidden = nn.spec.Tensor([1, "seq_len", self.cfg.hidden_size], "float32")
        for i in range(self.cfg.num_layers):  # the exporter looks entry points up as attributes
            object.__setattr__(self, f"layer_{i}", functools.partial(self.layer, i))
            object.__setattr__(self, f"kv_fill_{i}", functools.partial(self.kv_fill, i))
        layer_spans, fill_spans = range_spans(self.cfg.num_layers)
        ranges = [f"layers_{a}_{b}" for a, b in layer_spans] + [f"kv_fill_{a}_{b}" for a, b in fill_spans]
        for a, b in layer_spans:
            object.__setattr__(self, f"layers_{a}_{b}", functools.partial(self.layer_range, a, b))
        for a, b in fill_spans:
            object.__setattr__(self, f"kv_fill_{a}_{b}", functools.partial(self.kv_fill_range, a, b))
        for n in VERIFY_ROW_ENTRIES:
            object.__setattr__(self, f"verify_rows_{n}", self.verify_rows)
        spec = {
            "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": packed},
            "prefill_rows": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "rows": nn.spec.Tensor(["num_rows"], "int32"),
                "cache": cache,
                "$": packed,
            },
            "verify": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": packed},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "cache": cache, "$": packed},
            "batch_decode": {"input_ids": nn.spec.Tensor(["batch_size", 1], "int32"), "cache": cache, "$": packed},
            # batch_decode at each verify pass's row count, with static shapes: no shape computations
            # at run time (`Generator.step`).
            **{
                f"verify_rows_{n}": {"input_ids": nn.spec.Tensor([n, 1], "int32"), "cache": cache, "$": packed}
                for n in VERIFY_ROW_ENTRIES
            },
            "embed": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "$": packed},
            "head": {"h": hidden, "$": packed},
            **{
                f"{kind}_{i}": {"h": hidden, "cache": cache, "$": packed}
                for i in range(self.cfg.num_layers)
                for kind in ("layer", "kv_fill")
            },
            **{name: {"h": hidden, "cache": cache, "$": packed} for name in ranges},
            **(self._budget_spec(cache) if self.evictable else {}),
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)

    def _budget_spec(self, cache: nn.spec.Object) -> dict:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        return {
            "prefill_at": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "positions": nn.spec.Tensor(["seq_len"], "int32"),
                "cache": cache,
                "$": packed,
            },
            "batch_decode_at": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "positions": nn.spec.Tensor(["batch_size"], "int32"),
                "cache": cache,
                "$": packed,
            },
        }


def _last_token(h: Tensor) -> Tensor:
    """h[:, -1:, :] for a symbolic sequence length."""
    return op.tensor_expr_op(
        lambda x: te.compute((x.shape[0], 1, x.shape[2]), lambda i, _, k: x[i, x.shape[1] - 1, k], name="last_token"),
        "last_token",
        [h],
    )


def _gather_tokens(h: Tensor, rows: Tensor) -> Tensor:
    """h[:, rows, :] (the caller passes indices inside the pass; topi's fast ``take`` would warn at each build)."""
    return op.tensor_expr_op(
        lambda x, r: te.compute(
            (x.shape[0], r.shape[0], x.shape[2]), lambda i, j, k: x[i, r[j], k], name="gather_tokens"
        ),
        "gather_tokens",
        [h, rows],
    )
