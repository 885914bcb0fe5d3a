"""A server's batch pass in two LLM builds, alternated pass by pass over the same contexts.

Each build holds one cached sequence per ``--contexts`` entry (its length in tokens, prefilled in the
build's chunks); each round runs one ``batch_decode`` pass over all of them in each build, then pops
the token again, so every pass sees the same contexts. A busy machine slows both builds alike; the
figures are the medians (ms, the pass with the cache's begin/end) and their ratio, B over A, and
whether the two builds' logits were equal bit for bit.

    python tools/batch_ab.py A.edgert B.edgert --contexts 30,80,150,210 --rounds 200 --threads 2
    python tools/batch_ab.py A.edgert B.edgert --contexts 300                # one sequence: a decode step
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _setup(artifact: Path, contexts: list[int], threads: int | None) -> tuple:
    import edgert
    from edgert.serve.engine import BatchKVCache

    gen = edgert.load(artifact, threads=threads, context_length=max(contexts) + 64)
    if not gen.session.has_entry("batch_decode"):
        raise SystemExit(f"error: {artifact} has no batch_decode entry point (compiled before it); compile it again")
    kv = gen.session.artifact.manifest["kv_cache"]
    n = len(contexts)
    cache = BatchKVCache(gen.session, n + 1, (n + 1) * (max(contexts) + 64), kv["prefill_chunk_size"], kv["page_size"])
    chunk = kv["prefill_chunk_size"]
    for s, length in enumerate(contexts, start=1):
        cache.add(s)
        ids = np.arange(100 + s, 100 + s + length, dtype=np.int32)
        for at in range(0, length, chunk):
            part = ids[None, at : at + chunk]
            cache.begin([s], [part.shape[1]])
            _, cache.obj = gen.session("prefill", gen.session.tensor(part), cache.obj)
            cache.end()
    return gen, cache, gen.session.tensor(np.full((n, 1), 7, np.int32))


def compare(a: Path, b: Path, contexts: list[int], rounds: int, threads: int | None) -> dict:
    """Median ms of each build's pass over ``contexts``, their ratio and whether the logits were equal."""
    seqs = list(range(1, len(contexts) + 1))
    builds = [_setup(art, contexts, threads) for art in (a, b)]
    times: list[list[float]] = [[], []]
    last: list[np.ndarray | None] = [None, None]
    for _ in range(rounds):
        for k, (gen, cache, tokens) in enumerate(builds):
            t = time.perf_counter()
            cache.begin(seqs, [1] * len(seqs))
            logits, cache.obj = gen.session("batch_decode", tokens, cache.obj)
            cache.end()
            times[k].append(time.perf_counter() - t)
            last[k] = np.from_dlpack(logits).copy()
            for s in seqs:  # the same contexts for the next pass
                cache.popn(s, 1)
    ms = [float(np.median(t)) * 1e3 for t in times]
    return {"a_ms": ms[0], "b_ms": ms[1], "ratio": ms[1] / ms[0], "same_logits": bool(np.array_equal(*last))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--contexts", default="150,150,150,150", help="each sequence's cached tokens")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.rounds < 1 or not contexts or min(contexts) < 1:
        raise SystemExit("error: --rounds and every context must be at least 1")
    r = compare(args.a, args.b, contexts, args.rounds, args.threads)
    print(
        f"contexts {contexts}: {args.a.name} {r['a_ms']:.3f} ms, {args.b.name} {r['b_ms']:.3f} ms, "
        f"B/A {r['ratio']:.3f}; logits {'equal' if r['same_logits'] else 'differ'}"
    )


if __name__ == "__main__":
    main()
