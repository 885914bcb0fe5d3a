#!/usr/bin/env python
"""The paged decode attention kernel (`compiler.passes.attention.paged_decode_attention`) of one SmolLM2
layer (9 query heads, 3 KV heads, head size 64, pages of 16) by context length and row count, against
another version of ``passes/attention.py``; outputs asserted equal bit for bit across versions.

    git show main:edgert/compiler/passes/attention.py > /tmp/attention_main.py
    TVM_NUM_THREADS=1 python tools/bench_attention.py --against /tmp/attention_main.py

A case of ``rows`` rows is a verify pass run as decode rows of one sequence (row i sees the
prefix and rows 0..i, as `rows_append` leaves them); ``--batch N`` is N sequences of the context
length each, one row each (a server's batch). Versions alternate call by call, so a busy machine
slows them alike; the figure is the median of ``--rounds`` timings (microseconds per call) and, per
version, the row cost in one-row calls. Also a fit ``cost = a + b * context`` per (row, head): ``a``
is the per-head prologue and epilogue, ``b`` the per-key work (q·k, exp, p·v).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H_QO, H_KV, D, PAGE = 9, 3, 64, 16


def _outputs(n: int, count: int) -> list[tuple]:
    """``count`` pairs of output tensors (attention [n, heads, dim], log-sum-exp [n, heads]) for n queries."""
    import tvm

    return [
        (tvm.runtime.tensor(np.zeros((n, H_QO, D), np.float32)), tvm.runtime.tensor(np.zeros((n, H_QO), np.float32)))
        for _ in range(count)
    ]


def _load(path: Path, tag: str):
    spec = importlib.util.spec_from_file_location(tag, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(rng: np.random.Generator, context: int, rows: int, batch: int) -> list[np.ndarray]:
    """Decode-kernel arguments: ``batch`` sequences of ``context`` tokens, or one of ``context`` + rows - 1
    tokens read by ``rows`` rows at consecutive positions."""
    if batch > 1:
        lengths, positions, seqs = [context] * batch, [context - 1] * batch, batch
    else:
        total = context + rows - 1
        lengths, positions, seqs = [total] * rows, [context - 1 + i for i in range(rows)], 1
    per = -(-max(lengths) // PAGE)
    pool = per * seqs + 2
    pages = rng.standard_normal((pool, 2, H_KV, PAGE, D)).astype(np.float32)
    order = rng.permutation(pool)[: per * seqs].astype(np.int32).reshape(seqs, per)
    values = np.concatenate([order[min(b, seqs - 1)] for b in range(len(lengths))]).astype(np.int32)
    indptr = np.arange(len(lengths) + 1, dtype=np.int32) * per
    last = np.array([n - (per - 1) * PAGE for n in lengths], np.int32)
    q = rng.standard_normal((len(lengths), H_QO, D)).astype(np.float32)
    return [q, pages, indptr, values, last, np.zeros(len(lengths), np.int32), np.array(positions, np.int32)]


def main(argv: list[str] | None = None) -> int:
    import tvm
    from tvm.target import codegen

    from edgert.compiler.passes.pipeline import tir_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, action="append", default=[], help="another attention.py")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 864])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch", type=int, default=4, help="also a batch of N sequences (0: none)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=30, help="calls per timing")
    parser.add_argument("--tile-tasks", type=int, help="this version's TILE_TASKS (default: its own)")
    parser.add_argument(
        "--cpu", action="store_true", help="time this thread's CPU time (with TVM_NUM_THREADS=1: steadier when loaded)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="read 64 MiB between calls (timed one by one, after a call on a copy of the pages: warm code), "
        "as a model's weights evict its pages between steps",
    )
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent / "edgert/compiler/passes/attention.py"
    versions = [here, *args.against]
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    funcs = []
    for i, path in enumerate(versions):
        module = _load(path, f"attention_v{i}")
        if i == 0 and args.tile_tasks is not None:
            module.TILE_TASKS = args.tile_tasks
        mod = tvm.IRModule({"f": module.paged_decode_attention(H_KV, H_QO, D, PAGE).with_attr("global_symbol", "f")})
        funcs.append(tvm.compile(mod, target=target, tir_pipeline=tir_pipeline())["f"])  # as a build does
    cases = [(c, r, 1) for c in args.contexts for r in args.rows]
    cases += [(c, 1, args.batch) for c in args.contexts if args.batch > 1]
    rng = np.random.default_rng(0)
    clock = time.thread_time if args.cpu else time.perf_counter
    flush = np.ones(16 << 20, np.float32) if args.cold else None  # 64 MiB, twice the L3
    table: dict[tuple[int, int, int], list[float]] = {}
    for context, rows, batch in cases:
        case = _case(rng, context, rows, batch)
        arrays = [tvm.runtime.tensor(a) for a in case]
        warm = [tvm.runtime.tensor(a) for a in case] if args.cold else []  # the same call on other pages
        outs = _outputs(arrays[0].shape[0], len(versions))
        times: list[list[float]] = [[] for _ in versions]
        for _ in range(args.rounds):
            for v, f in enumerate(funcs):
                if args.cold:  # each call after the flush: the median of its calls
                    one = []
                    for _ in range(args.calls):
                        flush.sum()
                        f(*warm, *outs[v], 0, 1.0, 1e4, 0.125)  # code, workspace and table warm; pages cold
                        t0 = clock()
                        f(*arrays, *outs[v], 0, 1.0, 1e4, 0.125)
                        one.append(clock() - t0)
                    times[v].append(float(np.median(one)) * 1e6)
                    continue
                t0 = clock()
                for _ in range(args.calls):
                    f(*arrays, *outs[v], 0, 1.0, 1e4, 0.125)
                times[v].append((clock() - t0) / args.calls * 1e6)
        for v in range(1, len(versions)):
            for a, b in zip(outs[0], outs[v], strict=True):
                np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"version {v} differs")
        table[(context, rows, batch)] = [float(np.median(t)) for t in times]
    names = ["this", *[p.name for p in args.against]]
    print(
        f"{'context':>7} {'rows':>4} {'batch':>5}  " + "  ".join(f"{n:>14}" for n in names) + "  (us/call; x one row)"
    )
    for (context, rows, batch), us in table.items():
        one = table[(context, 1, 1)] if (context, 1, 1) in table else us
        cells = [f"{u:8.1f} ({u / o:4.2f})" for u, o in zip(us, one, strict=True)]
        print(f"{context:>7} {rows:>4} {batch:>5}  " + "  ".join(cells))
    ones = [(c, table[(c, 1, 1)]) for c in args.contexts if (c, 1, 1) in table]
    if len(ones) >= 2:
        xs = np.array([c for c, _ in ones], float)
        for v, name in enumerate(names):
            ys = np.array([us[v] for _, us in ones]) / H_QO
            b, a = np.polyfit(xs, ys, 1)
            print(f"{name}: per (row, head) {a:.2f} us + {b * 1e3:.2f} ns per key")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
