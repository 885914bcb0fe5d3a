"""TVM's paged KV cache as edgert's families build it: one helper for the decoder-only and the
encoder-decoder families (its TIR kernels are picked for the current target)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target


def paged_kv_cache(
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_batch_size: tirx.Var,
    max_total_seq_len: tirx.Var,
    prefill_chunk_size: tirx.Var,
    page_size: tirx.Var,
    support_sliding_window: tirx.Var,
    rope_mode: RopeMode = RopeMode.NONE,
    rope_theta: float = 10000.0,
    attn_kind: str | list[str] = "mha",
    sliding_window: int = 1024,
    symbol_suffix: str = "",
    dtype: str = "float32",
) -> PagedKVCache:
    """TVM's paged KV cache with the TIR kernels of the current target (export inside ``with target:``).

    ``attn_kind`` may name each layer's kind: ``mha_sliding`` layers attend to the last
    ``sliding_window`` positions only (TVM's per-layer sliding-window kernels); it is also the
    window that TVM's prefill kernels mask each query to in a cache whose sequence slides.
    Further caches of the same module (another layer count, another kind of attention) need a
    ``symbol_suffix`` for their kernels' names. ``dtype``: the pages' (and the q/k/v and output the
    cache takes and gives).
    """
    target = Target.current()
    if target is None:
        raise RuntimeError("export the model inside `with target:` so the KV cache picks its kernels")
    with (
        _kernel_symbols(symbol_suffix) if symbol_suffix else contextlib.nullcontext(),
        _prefill_tiles() if target.kind.name != "llvm" else contextlib.nullcontext(),
    ):
        return TIRPagedKVCache(
            attn_kind=attn_kind,  # type: ignore[arg-type]
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, num_layers]),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            qk_head_dim=head_dim,
            v_head_dim=head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=rope_mode,
            rope_scale=1,
            rope_theta=rope_theta,
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=head_dim,
            enable_disaggregation=False,
            dtype=dtype,
            target=target,
            layer_sliding_window_size=sliding_window,
        )


@contextlib.contextmanager
def _kernel_symbols(suffix: str) -> Iterator[None]:
    """The kernels TIRPagedKVCache adds to the module, under global symbols of their own.

    It names its kernels with fixed global symbols, and another cache's kernels (another layer
    count, another kind of attention) are not all merged with the first one's, so the module
    would hold a symbol twice; the builder's ``add_func`` adds ``suffix`` during the call.
    """
    bb = relax.BlockBuilder.current()
    add_func = bb.add_func

    def add_renamed(func: Any, name: str) -> Any:
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "global_symbol" in func.attrs:
            func = func.with_attr("global_symbol", f"{func.attrs['global_symbol']}{suffix}")
        return add_func(func, f"{name}{suffix}")

    bb.add_func = add_renamed  # type: ignore[method-assign]
    try:
        yield
    finally:
        del bb.add_func


PREFILL_KERNEL_MODULES = (
    "tvm.relax.frontend.nn.llm._prefill_kernels",
    "tvm.relax.frontend.nn.llm.tree_attn",
)


@contextlib.contextmanager
def _prefill_tiles() -> Iterator[None]:
    """TVM's GPU prefill kernels with 2 rather than 4 groups of 32 work items at head size 32.

    With its default (32 x 4 work items, 16 x 32 tiles) TVM 0.27's tiled prefill kernels write
    zeros as their output at head size 32 (PoCL, any work-group method; the log-sum-exp is right):
    a Gemma 3 or Llama with 32-wide heads got wrong logits for every step of more than one
    token. 16, 64, 128 and 256 are right with the default; 32 x 2 and 32 x 8 are right at 32.
    """
    import importlib

    modules = [importlib.import_module(name) for name in PREFILL_KERNEL_MODULES]
    original = modules[0]._get_prefill_kernel_config

    def config(h_kv: int, h_q: int, d: int, *args: Any, **kwargs: Any) -> tuple[int, ...]:
        blocks, vec, group, bdx, warps, tile_x, tile_y, tile_z = original(h_kv, h_q, d, *args, **kwargs)
        if d == 32 and bdx * warps == 128 and (tile_x * tile_z) % (bdx * 2) == 0:
            warps = 2
        return blocks, vec, group, bdx, warps, tile_x, tile_y, tile_z

    for module in modules:
        module._get_prefill_kernel_config = config  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module._get_prefill_kernel_config = original  # type: ignore[attr-defined]
