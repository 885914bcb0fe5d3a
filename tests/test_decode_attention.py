"""edgert's paged decode and prefill attention against numpy, on caches of awkward lengths.

Pages hold 16 tokens; sequences of 1, 16, 17 and 45 tokens (one partial page, one full page,
a page boundary, scattered pages) with grouped-query heads, and a head size that is not a
multiple of the vector width (48) besides SmolLM2's 64. The pages of a sequence are placed
out of order in the pool, as the cache allocates them. The prefill kernel (a verify pass: a few
new tokens over the cached ones) is checked causal and not, with new-token counts from 1 to 5.
A verify pass run as decode rows of one sequence (`rows_append`, then the decode kernel) must give
each row exactly what a decode step of that token gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgert.compiler.passes.attention import (
    paged_decode_attention,
    paged_prefill_attention,
    ragged_prefill_attention,
    rows_append,
)

PAGE = 16


def _pages(rng: np.random.Generator, lengths: list[int], head_dim: int) -> tuple[np.ndarray, ...]:
    """A pool holding sequences of ``lengths`` tokens on scattered pages: pages, indptr, page ids, last page lengths."""
    n_pages = [-(-n // PAGE) for n in lengths]
    pool = 2 + sum(n_pages)
    pages = rng.standard_normal((pool, 2, 2, PAGE, head_dim)).astype(np.float32)
    order = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lengths, n_pages, strict=True)], np.int32)
    return pages, indptr, order, last


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """q [H, D], k/v [L, H_kv, D] -> output [H, D] and log2-sum-exp [H] (scores in log2 units)."""
    h, group = q.shape[0], q.shape[0] // k.shape[1]
    out, lse = np.zeros_like(q, dtype=np.float64), np.zeros(h)
    for i in range(h):
        s = (k[:, i // group].astype(np.float64) @ q[i]) * sm_scale * np.log2(np.e)
        p = np.exp2(s - s.max())
        out[i] = p @ v[:, i // group] / p.sum()
        lse[i] = s.max() + np.log2(p.sum())
    return out, lse


@pytest.fixture(scope="module")
def kernels():
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    funcs = {
        f"attn_{d}": paged_decode_attention(2, 6, d, PAGE).with_attr("global_symbol", f"attn_{d}") for d in (64, 48)
    }
    funcs["mqa_64"] = paged_decode_attention(1, 4, 64, PAGE).with_attr("global_symbol", "mqa_64")
    funcs["prefill_64"] = paged_prefill_attention(2, 6, 64, PAGE).with_attr("global_symbol", "prefill_64")
    funcs["append_64"] = rows_append(2, 64, PAGE).with_attr("global_symbol", "append_64")
    funcs["ragged_48"] = ragged_prefill_attention(2, 6, 48).with_attr("global_symbol", "ragged_48")
    funcs["ragged_64"] = ragged_prefill_attention(2, 6, 64).with_attr("global_symbol", "ragged_64")
    return tvm.compile(tvm.IRModule(funcs), target=target)


@pytest.mark.parametrize("head_dim", [64, 48])
def test_decode_attention_matches_numpy(kernels, head_dim: int) -> None:
    import tvm

    rng = np.random.default_rng(head_dim)
    lengths = [1, 16, 17, 45]
    n_pages = [-(-n // PAGE) for n in lengths]
    pool = 2 + sum(n_pages)
    pages = rng.standard_normal((pool, 2, 2, PAGE, head_dim)).astype(np.float32)
    order = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)  # scattered pages
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lengths, n_pages, strict=True)], np.int32)
    q = rng.standard_normal((len(lengths), 6, head_dim)).astype(np.float32)
    out = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full(q.shape[:2], np.nan, np.float32))
    zeros = np.zeros(len(lengths), np.int32)
    own = np.array(lengths, np.int32) - 1  # each query's position: the last cached token, as in a decode step
    scale = head_dim**-0.5
    args = [q, pages, indptr, order, last, zeros, own]
    kernels[f"attn_{head_dim}"](*[tvm.runtime.tensor(a) for a in args], out, lse, 0, 1.0, 1e4, scale)
    for b, n in enumerate(lengths):
        slots = [(order[indptr[b] + r // PAGE], r % PAGE) for r in range(n)]
        k = np.stack([pages[p, 0, :, s] for p, s in slots])
        v = np.stack([pages[p, 1, :, s] for p, s in slots])
        ref_out, ref_lse = _reference(q[b], k, v, scale)
        np.testing.assert_allclose(out.numpy()[b], ref_out, atol=2e-5, err_msg=f"sequence {b} ({n} tokens)")
        np.testing.assert_allclose(lse.numpy()[b], ref_lse, atol=2e-4)


# Rows of one sequence run as (KV head, up to 8 rows) tasks sharing the pages all rows see: none
# (3, 5), one block (30, 9: two tasks), a last row ending a page (47, 2), several blocks (70, 3),
# two tasks of 6 over 6 blocks (100, 12).
@pytest.mark.parametrize(("prefix", "rows"), [(3, 5), (13, 5), (30, 9), (16, 16), (47, 2), (70, 3), (100, 12)])
def test_rows_equal_decode_steps(kernels, prefix: int, rows: int) -> None:
    """``rows`` tokens after ``prefix`` cached ones, appended as rows of one decode step (every row
    given the last row's slot, as TVM's cache does) and attended to, equal ``rows`` decode steps
    bit for bit, outputs and the pages the sequence holds afterwards; rows that cross a page
    boundary included. Also the numpy reference's values."""
    import tvm

    rng = np.random.default_rng(prefix * 100 + rows)
    total = prefix + rows
    n_pages = -(-total // PAGE)
    pool = n_pages + 3
    start = rng.standard_normal((pool, 2, 2, PAGE, 64)).astype(np.float32)
    order = rng.permutation(pool)[:n_pages].astype(np.int32)
    q = rng.standard_normal((rows, 6, 64)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((rows, 2, 64)).astype(np.float32) for _ in range(2))

    def slot(pos: int) -> int:
        return int(order[pos // PAGE]) * PAGE + pos % PAGE

    def decode(pages, q_rows, lengths, positions):
        """The decode kernel over ``len(lengths)`` entries of this sequence."""
        b = len(lengths)
        used = [-(-n // PAGE) for n in lengths]
        indptr = np.concatenate([[0], np.cumsum(used)]).astype(np.int32)
        values = np.concatenate([order[:u] for u in used]).astype(np.int32)
        last = np.array([n - (u - 1) * PAGE for n, u in zip(lengths, used, strict=True)], np.int32)
        out = tvm.runtime.tensor(np.full((b, 6, 64), np.nan, np.float32))
        lse = tvm.runtime.tensor(np.full((b, 6), np.nan, np.float32))
        aux = [indptr, values, last, np.zeros(b, np.int32), np.array(positions, np.int32)]
        aux_t = [tvm.runtime.tensor(a) for a in aux]
        kernels["attn_64"](tvm.runtime.tensor(q_rows), pages, *aux_t, out, lse, 0, 1.0, 1e4, 0.125)
        return out.numpy()

    # Decode steps: append one token at its slot, attend over the sequence so far.
    steps_pages = tvm.runtime.tensor(start)
    steps = []
    for i in range(rows):
        pos = prefix + i
        kernels["append_64"](
            steps_pages,
            tvm.runtime.tensor(k_new[i : i + 1]),
            tvm.runtime.tensor(v_new[i : i + 1]),
            tvm.runtime.tensor(np.array([slot(pos)], np.int32)),
        )
        steps.append(decode(steps_pages, q[i : i + 1], [pos + 1], [pos])[0])
    # One step of rows: every row given the last row's slot; each entry sees the whole sequence's pages.
    rows_pages = tvm.runtime.tensor(start)
    kernels["append_64"](
        rows_pages,
        tvm.runtime.tensor(k_new),
        tvm.runtime.tensor(v_new),
        tvm.runtime.tensor(np.full(rows, slot(total - 1), np.int32)),
    )
    together = decode(rows_pages, q, [total] * rows, [prefix + i for i in range(rows)])
    np.testing.assert_array_equal(together, np.stack(steps))
    held = [(slot(p) // PAGE, slot(p) % PAGE) for p in range(total)]
    a, b = rows_pages.numpy(), steps_pages.numpy()
    np.testing.assert_array_equal(
        np.stack([a[p, :, :, s] for p, s in held]), np.stack([b[p, :, :, s] for p, s in held])
    )
    for i in range(rows):
        k = np.stack([b[p, 0, :, s] for p, s in held[: prefix + i + 1]])
        v = np.stack([b[p, 1, :, s] for p, s in held[: prefix + i + 1]])
        np.testing.assert_allclose(together[i], _reference(q[i], k, v, 0.125)[0], atol=2e-5)


@pytest.mark.parametrize("length", [47, 20, 8])
def test_head_tasks_equal_kv_head_tiles(kernels, length: int) -> None:
    """With one KV head, a decode step runs one task per query head; 4 rows of one sequence run as
    KV-head tiles of 4 query heads. Row i equals the decode step at its position bit for bit, and the
    numpy reference: 16-row blocks of lane sums, the rows after them, and no block."""
    import tvm

    rng = np.random.default_rng(length)
    pages = rng.standard_normal((6, 2, 1, PAGE, 64)).astype(np.float32)
    n = -(-length // PAGE)
    order = rng.permutation(6)[:n].astype(np.int32)
    q = rng.standard_normal((4, 4, 64)).astype(np.float32)

    def run(q_rows: np.ndarray, seen: int, positions: list[int]) -> np.ndarray:
        """The kernel over ``len(positions)`` entries of the sequence's first ``seen`` tokens."""
        batch, used = len(positions), -(-seen // PAGE)
        out = tvm.runtime.tensor(np.full((batch, 4, 64), np.nan, np.float32))
        lse = tvm.runtime.tensor(np.full((batch, 4), np.nan, np.float32))
        aux = [
            q_rows,
            pages,
            np.arange(batch + 1, dtype=np.int32) * used,
            np.tile(order[:used], batch),
            np.full(batch, seen - (used - 1) * PAGE, np.int32),
            np.zeros(batch, np.int32),
            np.array(positions, np.int32),
        ]
        kernels["mqa_64"](*[tvm.runtime.tensor(x) for x in aux], out, lse, 0, 1.0, 1e4, 0.125)
        return out.numpy()

    tiled = run(q, length, [length - 4 + i for i in range(4)])
    for i in range(4):
        seen = length - 3 + i
        np.testing.assert_array_equal(tiled[i], run(q[i : i + 1], seen, [seen - 1])[0], err_msg=f"row {i}")
        slots = [(order[r // PAGE], r % PAGE) for r in range(seen)]
        k = np.stack([pages[pg, 0, :, sl] for pg, sl in slots])
        v = np.stack([pages[pg, 1, :, sl] for pg, sl in slots])
        np.testing.assert_allclose(tiled[i], _reference(q[i], k, v, 0.125)[0], atol=2e-5)


def test_compiled_llama_uses_this_kernel() -> None:
    """The exported Llama module's CPU decode kernel is replaced by edgert's."""
    import tvm
    from tvm.target import codegen

    from edgert.compiler.passes.attention import (
        DECODE_KERNEL,
        PREFILL_KERNEL,
        RAGGED_KERNEL,
        ROPE_KERNEL,
        use_fast_decode_attention,
    )
    from edgert.families.llama.model import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(64, 32, 64, 1, 4, 2, 8, 1e-5, 1e4, 128, True)
    net = LlamaForCausalLM(cfg)
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    with target:
        mod, _ = net.export_tvm(spec=net.get_default_spec())
    stock = mod[DECODE_KERNEL]
    swapped = use_fast_decode_attention(mod, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.rope_theta)
    assert "expects RoPE applied before the cache" in swapped[DECODE_KERNEL].script()
    assert "expects RoPE applied before the cache" not in stock.script()
    assert "edgert's prefill attention expects" in swapped[PREFILL_KERNEL].script()
    assert "edgert's ragged attention expects" in swapped[RAGGED_KERNEL].script()
    assert "T.parallel" in swapped[ROPE_KERNEL].script() and "T.parallel" not in mod[ROPE_KERNEL].script()
    assert mod[DECODE_KERNEL].same_as(stock)  # the input module is left as it was


@pytest.mark.parametrize("causal", [1, 0])
def test_prefill_attention_matches_numpy(kernels, causal: int) -> None:
    """New tokens (1, 5, 3, 2, 37) over sequences of 1, 17, 21, 45 and 70 cached tokens (the new ones
    among them, as the cache stores them before attending): token t of n sees all but the last
    n - 1 - t tokens when causal, all of them when not; 37 new tokens are a prompt chunk whose causal
    rows end at every slot of three pages."""
    import tvm

    rng = np.random.default_rng(7 + causal)
    lengths, new = [1, 17, 21, 45, 70], [1, 5, 3, 2, 37]
    pages, indptr, order, last = _pages(rng, lengths, 64)
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((sum(new), 6, 64)).astype(np.float32)
    out = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full(q.shape[:2], np.nan, np.float32))
    zeros = np.zeros(len(lengths), np.int32)
    args = [q, q_indptr, pages, indptr, order, last, zeros, np.zeros(sum(new), np.int32)]
    kernels["prefill_64"](*[tvm.runtime.tensor(a) for a in args], out, lse, causal, 0, 1.0, 1e4, 0.125)
    for b, n in enumerate(lengths):
        slots = [(order[indptr[b] + r // PAGE], r % PAGE) for r in range(n)]
        k = np.stack([pages[p, 0, :, s] for p, s in slots])
        v = np.stack([pages[p, 1, :, s] for p, s in slots])
        for t in range(new[b]):
            seen = n - (new[b] - 1 - t) if causal else n
            ref_out, ref_lse = _reference(q[q_indptr[b] + t], k[:seen], v[:seen], 0.125)
            row = q_indptr[b] + t
            np.testing.assert_allclose(out.numpy()[row], ref_out, atol=2e-5, err_msg=f"sequence {b}, new token {t}")
            np.testing.assert_allclose(lse.numpy()[row], ref_lse, atol=2e-4)


@pytest.mark.parametrize("head_dim", [48, 64])
@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_attention_matches_numpy(kernels, causal: int, head_dim: int) -> None:
    """New tokens (1, 5, 3, 40, 17) among new keys (1, 5, 4, 40, 19: more than its queries for the third
    and last sequence): token t of n sees the first kv_len - n + 1 + t keys when causal. Head size 64 is
    SmolLM2's (whole 16-row blocks of keys and their tails, 40 rows: a prompt chunk); 48 is not a multiple
    of the vector width."""
    import tvm

    rng = np.random.default_rng(11 + causal + head_dim)
    new, keys = [1, 5, 3, 40, 17], [1, 5, 4, 40, 19]
    d = head_dim
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(keys)]).astype(np.int32)
    q = rng.standard_normal((sum(new), 6, d)).astype(np.float32)
    k = rng.standard_normal((sum(keys), 2, d)).astype(np.float32)
    v = rng.standard_normal((sum(keys), 2, d)).astype(np.float32)
    out = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32))
    lse = tvm.runtime.tensor(np.full(q.shape[:2], np.nan, np.float32))
    args = [q, q_indptr, k, v, kv_indptr, np.zeros(sum(new), np.int32), np.zeros(len(new), np.int32)]
    kernels[f"ragged_{d}"](*[tvm.runtime.tensor(a) for a in args], out, lse, causal, 0, 1.0, 1e4, d**-0.5)
    for b in range(len(new)):
        ks, vs = k[kv_indptr[b] : kv_indptr[b + 1]], v[kv_indptr[b] : kv_indptr[b + 1]]
        for t in range(new[b]):
            seen = keys[b] - new[b] + 1 + t if causal else keys[b]
            ref_out, ref_lse = _reference(q[q_indptr[b] + t], ks[:seen], vs[:seen], d**-0.5)
            row = q_indptr[b] + t
            np.testing.assert_allclose(out.numpy()[row], ref_out, atol=2e-5, err_msg=f"sequence {b}, new token {t}")
            np.testing.assert_allclose(lse.numpy()[row], ref_lse, atol=2e-4)


def test_fused_rope_equals_tvms_kernel() -> None:
    """edgert's q/k/v split with RoPE gives TVM's ``llama_rope_with_position_map`` results (6 query heads,
    2 kv heads, head size 64, positions out of order and past 1000); without RoPE a plain split."""
    import tvm
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map
    from tvm.target import codegen

    from edgert.compiler.passes.attention import fused_rope

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    funcs = {
        "ours": fused_rope(1e4, 64, 6, 2).with_attr("global_symbol", "ours"),
        "tvm": llama_rope_with_position_map(1e4, 1.0, 64, 6, 2, "float32", {}).with_attr("global_symbol", "tvm"),
    }
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((5, 10, 64)).astype(np.float32)
    positions = np.array([1, 0, 7, 1500, 33], np.int32)
    for apply_rope in (1, 0):
        outs = {}
        for name in funcs:
            bufs = [tvm.runtime.tensor(np.full((5, n, 64), np.nan, np.float32)) for n in (6, 2, 2)]
            lib[name](tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *bufs, apply_rope)
            outs[name] = [b.numpy() for b in bufs]
        for ours, theirs in zip(outs["ours"], outs["tvm"], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
        if apply_rope:
            assert np.abs(outs["ours"][0] - qkv[:, :6]).max() > 0.1  # really rotated
        else:
            np.testing.assert_array_equal(outs["ours"][0], qkv[:, :6])
        np.testing.assert_array_equal(outs["ours"][2], qkv[:, 8:])


def test_float16_cache_kernels_match_numpy() -> None:
    """The kernels of a float16 cache (`--kv-dtype f16`, the CPU default for Llama): queries, keys,
    values and outputs in float16, the sums in float32. Each equals numpy's float64 attention over
    the same float16 values within the output's float16 rounding: the decode kernel over 4 sequences
    (a server's batch), the prefill kernel (causal, over cached pages) and the ragged one, and the
    q/k/v split with RoPE equals the float32 split's rounded to float16."""
    import tvm
    from tvm.target import codegen

    from edgert.compiler.passes.attention import fused_rope

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    half = "float16"
    funcs = {
        "decode": paged_decode_attention(2, 6, 64, PAGE, dtype=half),
        "prefill": paged_prefill_attention(2, 6, 64, PAGE, dtype=half),
        "ragged": ragged_prefill_attention(2, 6, 64, dtype=half),
        "rope": fused_rope(1e4, 64, 6, 2, dtype=half),
        "rope32": fused_rope(1e4, 64, 6, 2),
    }
    lib = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}), target=target)
    rng = np.random.default_rng(16)
    atol = 2e-3  # outputs of magnitude <= 2 in float16: steps of 2^-10

    def run(name: str, args: list[np.ndarray], rows: int, *scalars: float) -> tuple[np.ndarray, np.ndarray]:
        out = tvm.runtime.tensor(np.full((rows, 6, 64), np.nan, np.float16))
        lse = tvm.runtime.tensor(np.full((rows, 6), np.nan, np.float32))
        lib[name](*[tvm.runtime.tensor(a) for a in args], out, lse, *scalars)
        return out.numpy().astype(np.float32), lse.numpy()

    lengths = [1, 16, 17, 45]
    pages, indptr, order, last = _pages(rng, lengths, 64)
    pages = pages.astype(np.float16)
    q = rng.standard_normal((4, 6, 64)).astype(np.float16)
    zeros = np.zeros(4, np.int32)
    own = np.array(lengths, np.int32) - 1
    out, lse = run("decode", [q, pages, indptr, order, last, zeros, own], 4, 0, 1.0, 1e4, 0.125)
    for b, n in enumerate(lengths):
        slots = [(order[indptr[b] + r // PAGE], r % PAGE) for r in range(n)]
        k = np.stack([pages[p, 0, :, s] for p, s in slots]).astype(np.float32)
        v = np.stack([pages[p, 1, :, s] for p, s in slots]).astype(np.float32)
        ref_out, ref_lse = _reference(q[b].astype(np.float32), k, v, 0.125)
        np.testing.assert_allclose(out[b], ref_out, atol=atol, err_msg=f"decode, sequence {b}")
        np.testing.assert_allclose(lse[b], ref_lse, atol=1e-3)

    new = [1, 5, 3, 2]
    q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((sum(new), 6, 64)).astype(np.float16)
    args = [q, q_indptr, pages, indptr, order, last, zeros, np.zeros(sum(new), np.int32)]
    out, _ = run("prefill", args, sum(new), 1, 0, 1.0, 1e4, 0.125)
    for b, n in enumerate(lengths):
        slots = [(order[indptr[b] + r // PAGE], r % PAGE) for r in range(n)]
        k = np.stack([pages[p, 0, :, s] for p, s in slots]).astype(np.float32)
        v = np.stack([pages[p, 1, :, s] for p, s in slots]).astype(np.float32)
        for t in range(new[b]):
            seen = n - (new[b] - 1 - t)
            ref_out, _ = _reference(q[q_indptr[b] + t].astype(np.float32), k[:seen], v[:seen], 0.125)
            np.testing.assert_allclose(out[q_indptr[b] + t], ref_out, atol=atol, err_msg=f"prefill {b}, token {t}")

    new = [1, 40, 17]
    kv_indptr = q_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = rng.standard_normal((sum(new), 6, 64)).astype(np.float16)
    k = rng.standard_normal((sum(new), 2, 64)).astype(np.float16)
    v = rng.standard_normal((sum(new), 2, 64)).astype(np.float16)
    args = [q, q_indptr, k, v, kv_indptr, np.zeros(sum(new), np.int32), np.zeros(len(new), np.int32)]
    out, _ = run("ragged", args, sum(new), 1, 0, 1.0, 1e4, 0.125)
    for b in range(len(new)):
        ks, vs = (x[kv_indptr[b] : kv_indptr[b + 1]].astype(np.float32) for x in (k, v))
        for t in range(new[b]):
            ref_out, _ = _reference(q[q_indptr[b] + t].astype(np.float32), ks[: t + 1], vs[: t + 1], 0.125)
            np.testing.assert_allclose(out[q_indptr[b] + t], ref_out, atol=atol, err_msg=f"ragged {b}, token {t}")

    qkv = rng.standard_normal((5, 10, 64)).astype(np.float16)
    positions = tvm.runtime.tensor(np.array([1, 0, 7, 1500, 33], np.int32))
    split = {}
    for name, dtype, x in (("rope", np.float16, qkv), ("rope32", np.float32, qkv.astype(np.float32))):
        bufs = [tvm.runtime.tensor(np.full((5, n, 64), np.nan, dtype)) for n in (6, 2, 2)]
        lib[name](tvm.runtime.tensor(x), positions, *bufs, 1)
        split[name] = [b.numpy() for b in bufs]
    for ours, wide in zip(split["rope"], split["rope32"], strict=True):
        np.testing.assert_array_equal(ours, wide.astype(np.float16))  # the same float32 math, rounded once
