"""What batching can give a server: the cost of an N-row ``batch_decode`` pass in one-row passes.

One-row and N-row passes alternate step by step over the same cached sequences, so a busy
machine slows both alike (with ``--threads 1`` they are CPU times); the medians' ratio is the
figure (N rows / its cost in steps = the most N concurrent clients can gain over one from
decoding together).

  python tools/batch_gain.py smol.edgert [smol-int8.edgert ...] --rows 4 --steps 150 --threads 2 [--context 256]

Each sequence holds ``--context`` tokens before the first pass (64 by default), and a token more after
each pass it is in: attention, per sequence, grows with the context while the weights' cost does not.

``--mixed N`` also alternates, in the same loop, a prefill pass of N prompt tokens (a new
sequence each time) and a server's mixed pass: the same N tokens with the N decoding rows beside
them (``prefill_rows``); the difference is what the rows cost riding in the prefill, against
their own ``batch_decode`` pass.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def batch_cost(
    artifact: Path, rows: int, steps: int, threads: int | None, context: int = 64, mixed: int = 0
) -> dict[str, float]:
    """Median seconds of a one-row and a ``rows``-row pass, each sequence holding ``context`` tokens
    (and with ``mixed`` prompt tokens: a prefill pass of them and a mixed pass of them and the rows)."""
    import edgert
    from edgert.serve.engine import BatchKVCache

    gen = edgert.load(artifact, threads=threads)
    for entry in ("batch_decode", *(["prefill_rows"] if mixed else [])):
        if not gen.session.has_entry(entry):
            raise SystemExit(f"error: {artifact} has no {entry} entry point (compiled before it); compile it again")
    kv = gen.session.artifact.manifest["kv_cache"]
    cache = BatchKVCache(
        gen.session,
        rows + 1,
        (rows + 1) * (context + 3 * steps + 32 + mixed),
        kv["prefill_chunk_size"],
        kv["page_size"],
    )
    seqs = list(range(1, rows + 1))
    prompt = np.arange(100, 100 + context, dtype=np.int32)[None]
    chunk = kv["prefill_chunk_size"]
    for s in seqs:
        cache.add(s)
        for at in range(0, context, chunk):  # a long context in the build's prefill chunks
            part = prompt[:, at : at + chunk]
            cache.begin([s], [part.shape[1]])
            _, cache.obj = gen.session("prefill", gen.session.tensor(part), cache.obj)
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

    def prompt_pass(ids: list[int]) -> float:
        """``mixed`` prompt tokens of a new sequence, with ``ids``' decoding rows beside them."""
        new = rows + 1
        cache.add(new)
        cache.begin([*ids, new], [1] * len(ids) + [mixed])
        t = clock()
        tokens = gen.session.tensor(np.full((1, len(ids) + mixed), 7, np.int32))
        at = gen.session.tensor(np.asarray([*range(len(ids)), len(ids) + mixed - 1], np.int32))
        logits, cache.obj = gen.session("prefill_rows", tokens, at, cache.obj)
        np.from_dlpack(logits).argmax(axis=-1)
        cache.end()
        seconds = clock() - t
        cache.remove(new)
        return seconds

    one, many, alone, ride = [], [], [], []
    for _ in range(steps):
        one.append(step(seqs[:1]))
        many.append(step(seqs))
        if mixed:
            alone.append(prompt_pass([]))
            ride.append(prompt_pass(seqs))
    o, m = float(np.median(one)), float(np.median(many))
    out = {"one_row_ms": o * 1000, "rows_ms": m * 1000, "steps": m / o, "gain": rows * o / m}
    out["cpu"] = clock is time.process_time
    if mixed:
        a, r = float(np.median(alone)), float(np.median(ride))
        out.update(prefill_ms=a * 1000, mixed_ms=r * 1000, riding_steps=(r - a) / o)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--context", type=int, default=64, help="tokens each sequence holds before the passes")
    parser.add_argument(
        "--mixed", type=int, default=0, metavar="N", help="also time N prompt tokens with and without the rows"
    )
    args = parser.parse_args()
    for art in args.artifacts:
        r = batch_cost(art, args.rows, args.steps, args.threads, context=args.context, mixed=args.mixed)
        print(
            f"{art.name} ({args.context} tokens of context): 1 row {r['one_row_ms']:.2f} ms,"
            f" {args.rows} rows {r['rows_ms']:.2f} ms"
            f"{' (CPU time)' if r['cpu'] else ''} "
            f"= {r['steps']:.2f} one-row steps; batching gain at most {r['gain']:.2f}x"
        )
        if args.mixed:
            print(
                f"  {args.mixed} prompt tokens {r['prefill_ms']:.2f} ms, with the {args.rows} rows "
                f"{r['mixed_ms']:.2f} ms: the rows ride for {r['riding_steps']:.2f} one-row steps "
                f"(their own pass: {r['steps']:.2f})"
            )


if __name__ == "__main__":
    main()
