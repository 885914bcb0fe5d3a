#!/usr/bin/env python
"""The prefill attention kernels of one SmolLM2 layer (9 query heads, 3 KV heads, head size 64, pages
of 16), compiled as a build compiles them (`passes.pipeline.tir_pipeline`: scratch on the stack), against
another version of ``passes/attention.py``; the largest output difference printed beside the times.

    git show main:edgert/compiler/passes/attention.py > /tmp/attention_main.py
    TVM_NUM_THREADS=1 python tools/bench_prefill_attention.py --against /tmp/attention_main.py --cpu

Cases: ``batch_prefill_ragged_kv`` over a fresh prompt of each ``--prompts`` length (causal: a prompt
pass's new tokens among themselves), and ``batch_prefill_paged_kv_cpu`` for a server's mixed pass:
``--rows`` one-token pieces over ``--context`` cached tokens each beside a prompt chunk with a cached
prefix of the same length. Versions alternate call batch by call batch (``--rounds``, medians in
microseconds per call). Without the build's pipeline a kernel's ``local`` scratch is a workspace
allocation per parallel task, which can make a slower kernel look faster.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_attention import _load, _outputs  # tools/ is this script's folder

H_QO, H_KV, D, PAGE = 9, 3, 64, 16


def _ragged(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    q = rng.standard_normal((n, H_QO, D)).astype(np.float32)
    k, v = (rng.standard_normal((n, H_KV, D)).astype(np.float32) for _ in range(2))
    indptr = np.array([0, n], np.int32)
    return [q, indptr, k, v, indptr, np.zeros(n, np.int32), np.zeros(1, np.int32)]


def _paged(rng: np.random.Generator, rows: int, context: int, chunk: int) -> list[np.ndarray]:
    qlens, kvlens = [1] * rows + [chunk], [context] * (rows + 1)
    n_pages = [-(-x // PAGE) for x in kvlens]
    pool = sum(n_pages) + 2
    pages = rng.standard_normal((pool, 2, H_KV, PAGE, D)).astype(np.float32)
    order = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)  # scattered pages
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([x - (p - 1) * PAGE for x, p in zip(kvlens, n_pages, strict=True)], np.int32)
    q = rng.standard_normal((sum(qlens), H_QO, D)).astype(np.float32)
    q_indptr = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    zeros = np.zeros(len(qlens), np.int32)
    return [q, q_indptr, pages, indptr, order, last, zeros, np.zeros(sum(qlens), np.int32)]


def main(argv: list[str] | None = None) -> int:
    import tvm
    from tvm.target import codegen

    from edgert.compiler.passes.pipeline import tir_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, action="append", default=[], help="another attention.py")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--rows", type=int, default=4, help="decode rows of the mixed pass's paged case")
    parser.add_argument("--context", type=int, default=64, help="cached tokens of each sequence there")
    parser.add_argument("--chunk", type=int, default=60, help="prompt tokens beside the rows there")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    parser.add_argument("--cpu", action="store_true", help="this thread's CPU time (with TVM_NUM_THREADS=1)")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent / "edgert/compiler/passes/attention.py"
    versions = [here, *args.against]
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    libs = []
    for i, path in enumerate(versions):
        module = _load(path, f"attention_v{i}")
        funcs = {
            "ragged": module.ragged_prefill_attention(H_KV, H_QO, D),
            "paged": module.paged_prefill_attention(H_KV, H_QO, D, PAGE),
        }
        mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
        libs.append(tvm.compile(mod, target=target, tir_pipeline=tir_pipeline()))  # as a build does
    rng = np.random.default_rng(0)
    cases = [(f"ragged, prompt of {n}", "ragged", _ragged(rng, n), 1) for n in args.prompts]
    paged = _paged(rng, args.rows, args.context, args.chunk)
    cases.append((f"paged, {args.rows} rows + {args.chunk} over {args.context} each", "paged", paged, 0))
    clock = time.thread_time if args.cpu else time.perf_counter
    names = ["this", *[p.name for p in args.against]]
    print(f"{'case':<36}" + "".join(f"{n:>22}" for n in names) + "   (us/call, median; max |output - this|)")
    for label, kind, arrays, causal in cases:
        tensors = [tvm.runtime.tensor(a) for a in arrays]
        outs = _outputs(arrays[0].shape[0], len(versions))
        times: list[list[float]] = [[] for _ in versions]
        for _ in range(args.rounds):
            for v, lib in enumerate(libs):
                t0 = clock()
                for _ in range(args.calls):
                    lib[kind](*tensors, *outs[v], causal, 0, 1.0, 1e4, 0.125)
                times[v].append((clock() - t0) / args.calls * 1e6)
        diffs = [float(np.abs(o[0].numpy() - outs[0][0].numpy()).max()) for o in outs]
        cells = [f"{np.median(t):10.1f} ({d:.1e})" for t, d in zip(times, diffs, strict=True)]
        print(f"{label:<36}" + "".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
