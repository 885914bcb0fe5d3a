"""A KV budget per sequence: keep at most N cached tokens, evicting by attention mass (TOVA).

TOVA (Oren et al., 2024, arXiv 2401.06104) keeps the cache entries the *current* query attends
to most: when a sequence's cache is full, the entries with the lowest softmax weight go. Here
the weights are taken per layer and per KV head (the query heads of a group averaged), so each
layer and head keeps its own N tokens.

TVM's paged KV cache only pops entries at the end, so an eviction rebuilds the sequence through
its checkpoint builtins: export each layer's pages (``attention_kv_cache_export_page_group``),
choose the kept entries in numpy, remove the sequence and import it again with only those
(``prepare_import`` / ``import_page_group`` / ``finish_import``): memory copies, no attention
pass. That is only correct because the artifact applies RoPE *before* the cache (``compile
--evictable-kv``): a kept key keeps the rotation of the position it was written at, and new
tokens pass their true positions (tokens seen) to ``prefill_at``/``batch_decode_at``, which
also return the rotated queries scored here.

Evictions come in chunks (``step`` entries at once, default 16): a rebuild copies the whole
sequence, so evicting one entry per token would copy N entries per generated token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.tvm_runtime import global_func, tensor, to_numpy


@dataclass(frozen=True)
class KVBudget:
    """At most ``tokens`` cached entries per sequence; an eviction drops to ``tokens - step``."""

    tokens: int
    step: int = 16
    per_head: bool = True  # False: one choice per layer (all heads' weights averaged), as TOVA's paper

    def __post_init__(self) -> None:
        if self.step < 1 or self.tokens < 2 * self.step:
            raise EdgertError(
                f"--kv-budget {self.tokens} is too small: it must be at least {2 * self.step} tokens "
                f"(twice the eviction step of {self.step})"
            )

    @property
    def keep(self) -> int:
        """Entries left after an eviction."""
        return self.tokens - self.step


def check_evictable(manifest: dict[str, Any]) -> None:
    """Refuse an artifact that was not built for a KV budget, saying how to build one."""
    kv = manifest.get("kv_cache") or {}
    missing = [e for e in ("prefill_at", "batch_decode_at") if e not in manifest.get("entry_points", {})]
    if not kv.get("evictable") or missing:
        raise EdgertError(
            "--kv-budget needs an artifact compiled with --evictable-kv (RoPE before the KV cache); this one was not"
        )


def tova_keep(queries: np.ndarray, keys: np.ndarray, keep: int, per_head: bool = True) -> np.ndarray:
    """The entries to keep: indices [layers, kv_heads, keep] (ascending) of the ``keep`` entries with
    the most attention weight from ``queries`` [layers, heads, dim] over ``keys`` [layers, T, kv_heads, dim].

    Weights are each query head's softmax over the T entries; a KV head's score is the mean over
    the query heads that share it (all heads when not ``per_head``).
    """
    layers, heads, dim = queries.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    q = queries.reshape(layers, kv_heads, group, dim).astype(np.float32)
    logits = np.einsum("lkgd,ltkd->lkgt", q, keys.astype(np.float32)) / np.sqrt(dim)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    score = weights.mean(axis=2)  # [layers, kv_heads, T]
    if not per_head:
        score = np.broadcast_to(score.mean(axis=1, keepdims=True), score.shape)
    # argpartition picks the top ``keep``; ties (e.g. all-zero weights) fall to the older entries
    top = np.argpartition(-score, keep - 1, axis=-1)[..., :keep]
    return np.sort(top, axis=-1)


class SequenceKV:
    """Read and rewrite one sequence of a paged KV cache (its checkpoint builtins).

    TVM's checkpoints export and import sequence id 0 only: a sequence passes through id 0 by
    forking (pages shared, nothing copied), so id 0 must stay free for this (`SCRATCH`).
    """

    SCRATCH = 0

    def __init__(self) -> None:
        self._meta = global_func("vm.builtin.attention_kv_cache_get_checkpoint_metadata")
        self._export = global_func("vm.builtin.attention_kv_cache_export_page_group")
        self._prepare = global_func("vm.builtin.attention_kv_cache_prepare_import")
        self._import = global_func("vm.builtin.attention_kv_cache_import_page_group")
        self._finish = global_func("vm.builtin.attention_kv_cache_finish_import")
        self._remove = global_func("vm.builtin.kv_state_remove_sequence")
        self._fork = global_func("vm.builtin.kv_state_fork_sequence")

    def read(self, cache: Any, seq_id: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """The sequence's metadata and its keys and values [layers, T, kv_heads, dim]."""
        scratch = self.SCRATCH
        if seq_id != scratch:
            self._fork(cache, seq_id, scratch, -1)
        try:
            meta = json.loads(self._meta(cache, scratch))
            length = int(meta["seq_length"])
            ks, vs = [], []
            for group in meta["groups"]:
                buf = tensor(np.zeros(group["shape"], dtype=group["dtype"]))
                self._export(cache, scratch, group["group_index"], buf)
                g = to_numpy(buf)  # [layers, pages, 2, kv_heads, page, dim]
                for layer in g:
                    kv = layer.transpose(1, 2, 0, 3, 4).reshape(2, layer.shape[2], -1, layer.shape[-1])[:, :, :length]
                    ks.append(kv[0].transpose(1, 0, 2))
                    vs.append(kv[1].transpose(1, 0, 2))
        finally:
            if seq_id != scratch:
                self._remove(cache, scratch)
        return meta, np.stack(ks), np.stack(vs)

    def write(self, cache: Any, seq_id: int, meta: dict[str, Any], keys: np.ndarray, values: np.ndarray) -> None:
        """Replace the sequence by ``keys``/``values`` [layers, n, kv_heads, dim] (``meta`` from `read`)."""
        layers, n, kv_heads, dim = keys.shape
        page = int(meta["page_size"])
        pages = -(-n // page)
        dtype = meta["dtype"]
        new = dict(meta)
        new["seq_length"] = n
        new["logical_pages"] = [
            {"logical_page_index": i, "start_pos": i * page, "length": min(page, n - i * page)} for i in range(pages)
        ]
        padded = np.zeros((layers, 2, kv_heads, pages * page, dim), dtype=dtype)
        padded[:, 0, :, :n] = keys.transpose(0, 2, 1, 3)
        padded[:, 1, :, :n] = values.transpose(0, 2, 1, 3)
        # [layers, 2, kv_heads, pages, page, dim] -> [layers, pages, 2, kv_heads, page, dim]
        blocks = padded.reshape(layers, 2, kv_heads, pages, page, dim).transpose(0, 3, 1, 2, 4, 5)
        groups, data = [], []
        for group in meta["groups"]:
            lo, hi = int(group["layer_begin"]), int(group["layer_end"])
            arr = np.ascontiguousarray(blocks[lo:hi])
            groups.append({**group, "num_logical_pages": pages, "shape": list(arr.shape), "nbytes": arr.nbytes})
            data.append(arr)
        new["groups"] = groups
        scratch = self.SCRATCH
        new["seq_id"] = scratch
        self._remove(cache, seq_id)
        try:
            self._prepare(cache, scratch, json.dumps(new))
            for group, arr in zip(groups, data, strict=True):
                self._import(cache, scratch, group["group_index"], tensor(arr))
            self._finish(cache, scratch)
            if seq_id != scratch:
                self._fork(cache, scratch, seq_id, -1)
        finally:
            if seq_id != scratch:  # a failed import must not hold the scratch id (or its pages)
                try:
                    self._remove(cache, scratch)
                except Exception:  # prepare failed before the scratch sequence existed
                    pass

    def evict(self, cache: Any, seq_id: int, queries: np.ndarray, budget: KVBudget) -> int:
        """Keep the ``budget.keep`` entries ``queries`` [layers, heads, dim] attend to most; entries dropped."""
        meta, keys, values = self.read(cache, seq_id)
        length = keys.shape[1]
        if length <= budget.keep:
            return 0
        idx = tova_keep(queries, keys, budget.keep, budget.per_head)  # [layers, kv_heads, keep]
        gather = idx.transpose(0, 2, 1)[..., None]  # [layers, keep, kv_heads, 1]
        kept_k = np.take_along_axis(keys, gather, axis=1)
        kept_v = np.take_along_axis(values, gather, axis=1)
        self.write(cache, seq_id, meta, kept_k, kept_v)
        return length - budget.keep
