"""edgert's attention kernels for caches with a window (Gemma 3's local layers) against TVM's own.

TVM's ``_sliding_window`` CPU kernels read a sequence's rows through ``[3, batch]`` length info
(last page's length, the window's start in its first page, the attention-sink length). A cache
with ``mha_sliding`` layers hands them the pages of the last ``window`` positions of the prefix
(`paged_kv_cache.cc`: ``GetLayerSlidingWindowOffset``/``NumPages``), and its prefill kernel masks
query t of a chunk to the last ``window - t - 1`` of them; a sliding sequence (sink, start) is
read whole. Both layouts are built here as TVM's cache builds them, on scattered pages, with the
tiny Gemma 3's heads (2 query heads over 1, head size 32) and its window of 4, and a window of 20
that spans pages; edgert's kernels must give TVM's kernels' outputs and log-sum-exps.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgert.compiler.passes.attention import paged_decode_window_attention, paged_prefill_window_attention

PAGE, H, HKV, D = 16, 2, 1, 32
WINDOWS = (4, 20)


def _layer_window(rng: np.random.Generator, prefixes: list[int], window: int):
    """Pages and page tables of sequences with ``prefixes`` cached tokens, as a cache with a window hands
    them to its kernels: the pages of the last ``window`` positions, and their length info."""
    n_pages = [-(-n // PAGE) for n in prefixes]
    pool = 3 + sum(n_pages)
    pages = rng.standard_normal((pool, 2, HKV, PAGE, D)).astype(np.float32)
    order = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)
    indptr, values, info = [0], [], np.zeros((3, len(prefixes)), np.int32)
    at = 0
    for b, (n, total) in enumerate(zip(prefixes, n_pages, strict=True)):
        own = order[at : at + total]
        at += total
        start = (n - window) % PAGE if n > window else 0
        kept = min(total, -(-(start + min(n, window)) // PAGE)) if n else 0
        values.extend(own[total - kept :])
        indptr.append(indptr[-1] + kept)
        info[:, b] = ((n - 1) % PAGE + 1 if n else 0, start, 0)
    return pages, np.array(indptr, np.int32), np.array(values, np.int32), info


def _sliding_sequences(rng: np.random.Generator, shapes: list[tuple[int, int, int, int]]):
    """Sequences of a sliding cache: (pages, start in the first page, sink, last page's length) each."""
    pool = 3 + sum(s[0] for s in shapes)
    pages = rng.standard_normal((pool, 2, HKV, PAGE, D)).astype(np.float32)
    order = rng.permutation(pool)[: sum(s[0] for s in shapes)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum([s[0] for s in shapes])]).astype(np.int32)
    info = np.array([[s[3] for s in shapes], [s[1] for s in shapes], [s[2] for s in shapes]], np.int32)
    return pages, indptr, order, info


@pytest.fixture(scope="module")
def kernels():
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    funcs = {"tvm_decode": _attention_decode_cpu(HKV, H, D, "float32", True, {}, PAGE)}
    funcs["decode"] = paged_decode_window_attention(HKV, H, D, PAGE)
    for w in WINDOWS:
        funcs[f"tvm_prefill_{w}"] = _attention_prefill_cpu(HKV, H, D, "float32", True, {}, PAGE, w)
        funcs[f"prefill_{w}"] = paged_prefill_window_attention(HKV, H, D, w, PAGE)
    return tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}), target=target)


def _prefill(lib, name: str, q, q_indptr, pages, indptr, values, info, causal: int):
    import tvm

    out = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full(q.shape[:2], np.nan, np.float32))
    args = [q, q_indptr, pages, indptr, values, info, np.zeros(info.shape[1], np.int32), np.zeros(len(q), np.int32)]
    lib[name](*[tvm.runtime.tensor(a) for a in args], out, lse, causal, 0, 1.0, 1e4, D**-0.5)
    return out.numpy(), lse.numpy()


def _decode(lib, name: str, q, pages, indptr, values, info):
    import tvm

    out = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full(q.shape[:2], np.nan, np.float32))
    zeros = np.zeros(len(q), np.int32)
    args = [q, pages, indptr, values, info, zeros, zeros]
    lib[name](*[tvm.runtime.tensor(a) for a in args], out, lse, 0, 1.0, 1e4, D**-0.5)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("window", WINDOWS)
def test_window_prefill_matches_tvm(kernels, window: int) -> None:
    """Chunks shorter than the window (as the runtime cuts them) over prefixes shorter than,
    as long as and longer than the window, causal (the masking cache) and not (a sliding one)."""
    rng = np.random.default_rng(window)
    prefixes = [1, window - 1, window, window + 1, 37, 50]
    new = [(i % (window - 1)) + 1 for i in range(len(prefixes))]
    pages, indptr, values, info = _layer_window(rng, prefixes, window)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((sum(new), H, D)).astype(np.float32)
    for causal in (0, 1):  # the causal outputs stay in `got`
        want = _prefill(kernels, f"tvm_prefill_{window}", q, q_indptr, pages, indptr, values, info, causal)
        got = _prefill(kernels, f"prefill_{window}", q, q_indptr, pages, indptr, values, info, causal)
        np.testing.assert_allclose(got[0], want[0], atol=2e-5, err_msg=f"causal={causal}")
        np.testing.assert_allclose(got[1], want[1], atol=2e-4, err_msg=f"causal={causal}")
    # the mask, not only TVM's arithmetic: the last query of a chunk of n sees window - n rows
    b, t = 5, new[5] - 1
    row = q_indptr[b] + t
    seen = window - t - 1
    kv = values[indptr[b] : indptr[b + 1]]
    slots = [(kv[(info[1, b] + r) // PAGE], (info[1, b] + r) % PAGE) for r in range(window)][window - seen :]
    k = np.stack([pages[p, 0, 0, s] for p, s in slots]).astype(np.float64)
    v = np.stack([pages[p, 1, 0, s] for p, s in slots]).astype(np.float64)
    for h in range(H):
        s = k @ q[row, h] * D**-0.5
        p = np.exp(s - s.max())
        np.testing.assert_allclose(got[0][row, h], p @ v / p.sum(), atol=2e-5)


def test_sliding_sequence_prefill_and_decode_match_tvm(kernels) -> None:
    """A sliding cache's sequences: sinks, a window starting inside its first page, partial last pages."""
    rng = np.random.default_rng(3)
    shapes = [(1, 0, 0, 5), (2, 7, 0, 16), (3, 15, 2, 4), (4, 3, 1, 9)]
    pages, indptr, values, info = _sliding_sequences(rng, shapes)
    q = rng.standard_normal((len(shapes), H, D)).astype(np.float32)
    for got, want in zip(
        _decode(kernels, "decode", q, pages, indptr, values, info),
        _decode(kernels, "tvm_decode", q, pages, indptr, values, info),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, atol=2e-4)
    new = [2, 1, 3, 2]
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((sum(new), H, D)).astype(np.float32)
    got = _prefill(kernels, "prefill_20", q, q_indptr, pages, indptr, values, info, 0)
    want = _prefill(kernels, "tvm_prefill_20", q, q_indptr, pages, indptr, values, info, 0)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-4)


@pytest.mark.parametrize("window", WINDOWS)
def test_window_decode_matches_tvm(kernels, window: int) -> None:
    """One token over the window's pages of prefixes shorter than, as long as and longer than the window."""
    rng = np.random.default_rng(10 + window)
    pages, indptr, values, info = _layer_window(rng, [1, window - 1, window, window + 1, 37, 50], window)
    q = rng.standard_normal((indptr.size - 1, H, D)).astype(np.float32)
    got = _decode(kernels, "decode", q, pages, indptr, values, info)
    want = _decode(kernels, "tvm_decode", q, pages, indptr, values, info)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-4)


def test_kernels_of_suffixed_caches_are_replaced_with_their_windows() -> None:
    """The matcher of `use_fast_cache_attention` on a module holding TVM's kernels under the names a
    module with several caches gives them (`families.shared.kv_cache`; Gemma 3's `cache_windows`)."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

    from edgert.compiler.passes.attention import (
        DECODE_KERNEL,
        PREFILL_KERNEL,
        RAGGED_KERNEL,
        SLIDING,
        use_fast_cache_attention,
    )
    from edgert.families.gemma3.model import Gemma3Config, Gemma3ForCausalLM

    stock = {
        DECODE_KERNEL + SLIDING: _attention_decode_cpu(HKV, H, D, "float32", True, {}),
        PREFILL_KERNEL + SLIDING: _attention_prefill_cpu(HKV, H, D, "float32", True, {}, PAGE, 4),
        RAGGED_KERNEL: _attention_prefill_ragged_cpu(HKV, H, D, D, "float32", {}),
    }
    mod = tvm.IRModule(
        {f"{n}{s}": f.with_attr("global_symbol", f"{n}{s}") for n, f in stock.items() for s in ("", "_local", "_other")}
    )
    cfg = Gemma3Config(64, 32, 64, 6, 2, 1, D, 1e-6, 1e6, 1e4, 4, 6, D**-0.5, None, 128, True)
    swapped = use_fast_cache_attention(mod, HKV, H, D, Gemma3ForCausalLM(cfg).cache_windows())
    for name in stock:
        assert "edgert's window" in swapped[name + "_local"].script() or name == RAGGED_KERNEL
        assert swapped[name + "_local"].attrs["global_symbol"] == name + "_local"
        assert not swapped[name + "_local"].same_as(mod[name + "_local"])
        for kept in (name, name + "_other"):  # not named in the windows: left as they were
            assert swapped[kept].same_as(mod[kept])
