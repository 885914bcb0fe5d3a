"""Prompt passes of two LLM artifacts (or two checkouts' runtimes on one artifact) alternated pass by pass.

    python tools/prompt_ab.py A.edgert B.edgert --lengths 16 32 64 128 --rounds 15 --threads 2

Each round runs, for every prompt length, one pass of A and one of B (in alternating order), each on
an empty cache (a fresh prompt, as a server's new request), so a busy machine slows both alike. The
figures: each artifact's median pass in ms and the median of the rounds' B / A ratios (below 1: B is
faster), with its quartiles.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

TEXT = "The history of the city begins with a small fishing village on the banks of the river. " * 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import edgert

    models = [edgert.load(p, threads=args.threads, context_length=512) for p in (args.a, args.b)]
    ids = models[0].tokenizer.encode(TEXT)
    chunk = min(m.prefill_chunk for m in models)
    for n in args.lengths:
        if n > min(chunk, len(ids)):
            raise SystemExit(f"error: a prompt of {n} tokens is longer than the build's prefill chunk ({chunk})")
    times = {(n, k): [] for n in args.lengths for k in (0, 1)}
    for m in models:  # warm-up: each shape once
        for n in args.lengths:
            m.reset()
            m.step(ids[:n])
    for r in range(args.rounds):
        for n in args.lengths:
            for k in (r % 2, 1 - r % 2):
                models[k].reset()
                t = time.perf_counter()
                models[k].step(ids[:n])
                times[n, k].append(time.perf_counter() - t)
    print(f"A = {args.a}, B = {args.b}, {args.threads} threads, {args.rounds} rounds")
    for n in args.lengths:
        a, b = np.array(times[n, 0]), np.array(times[n, 1])
        q1, med, q3 = np.percentile(b / a, [25, 50, 75])
        print(
            f"{n:4d} tokens: A {np.median(a) * 1e3:7.2f} ms  B {np.median(b) * 1e3:7.2f} ms  "
            f"B/A paired {med:.3f} (quartiles {q1:.3f}-{q3:.3f})"
        )


if __name__ == "__main__":
    main()
