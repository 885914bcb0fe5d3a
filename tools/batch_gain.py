"""What batching can give a server: the cost of an N-row ``batch_decode`` pass in one-row passes.

One-row and N-row passes alternate step by step over the same cached sequences, so a busy
machine slows both alike (with ``--threads 1`` they are CPU times); the medians' ratio is the
figure (N rows / its cost in steps = the most N concurrent clients can gain over one from
decoding together).

  python tools/batch_gain.py smol.edgert [smol-int8.edgert ...] --rows 4 --steps 150 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def batch_cost(artifact: Path, rows: int, steps: int, threads: int | None, context: int = 64) -> dict[str, float]:
    """Median seconds of a one-row and a ``rows``-row pass, each sequence holding ``context`` tokens."""
    import edgert
    from edgert.serve.engine import BatchKVCache

    gen = edgert.load(artifact, threads=threads)
    if not gen.session.has_entry("batch_decode"):
        raise SystemExit(f"error: {artifact} has no batch_decode entry point (compiled before it); compile it again")
    kv = gen.session.artifact.manifest["kv_cache"]
    cache = BatchKVCache(
        gen.session, rows, rows * (context + 2 * steps + 32), kv["prefill_chunk_size"], kv["page_size"]
    )
    seqs = list(range(1, rows + 1))
    prompt = np.arange(100, 100 + context, dtype=np.int32)[None]
    for s in seqs:
        cache.add(s)
        cache.begin([s], [context])
        _, cache.obj = gen.session("prefill", gen.session.tensor(prompt), cache.obj)
        cache.end()

    # One thread: the process's CPU time, which leaves out the time another process held the core
    # (on a busy machine the steadier figure, as `edgert bench --verify-rows` reports it).
    clock = time.process_time if gen.session.threads == 1 else time.perf_counter

    def step(ids: list[int]) -> float:
        cache.begin(ids, [1] * len(ids))
        t = clock()
        tokens = gen.session.tensor(np.full((len(ids), 1), 7, np.int32))
        logits, cache.obj = gen.session("batch_decode", tokens, cache.obj)
        np.from_dlpack(logits).argmax(axis=-1)
        cache.end()
        return clock() - t

    one, many = [], []
    for _ in range(steps):
        one.append(step(seqs[:1]))
        many.append(step(seqs))
    o, m = float(np.median(one)), float(np.median(many))
    return {
        "one_row_ms": o * 1000,
        "rows_ms": m * 1000,
        "steps": m / o,
        "gain": rows * o / m,
        "cpu": clock is time.process_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    for art in args.artifacts:
        r = batch_cost(art, args.rows, args.steps, args.threads)
        print(
            f"{art.name}: 1 row {r['one_row_ms']:.2f} ms, {args.rows} rows {r['rows_ms']:.2f} ms"
            f"{' (CPU time)' if r['cpu'] else ''} "
            f"= {r['steps']:.2f} one-row steps; batching gain at most {r['gain']:.2f}x"
        )


if __name__ == "__main__":
    main()
