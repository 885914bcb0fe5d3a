"""A/B of LLM artifacts in one process on a shared machine: prefill and decode steps alternate.

    python tools/ab_llm.py A.edgert B.edgert [C.edgert ...] [--rounds 6] [--steps 24] [--threads 2]

Each round prefills the same 128-token text in every artifact (order reversed every other round),
then runs ``--steps`` greedy decode steps, alternating artifact by artifact. Printed per artifact:
tokens per wall-clock second (best and median) and per second of this process's CPU time (median),
which a busy machine disturbs less than the wall clock (waiting for a core costs no CPU time).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TEXT = "The history of the city begins with a small fishing village on the banks of the river. " * 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import edgert

    models = [edgert.load(p, threads=args.threads, context_length=512) for p in args.artifacts]
    ids = models[0].tokenizer.encode(TEXT)[:128]
    times: dict[str, dict[str, list[tuple[float, float]]]] = {p: {"prefill": [], "decode": []} for p in args.artifacts}

    def timed(fn: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - w, time.process_time() - c)

    for r in range(args.rounds):
        order = list(zip(args.artifacts, models, strict=True))
        order = order if r % 2 == 0 else order[::-1]
        logits = {}
        for path, model in order:
            model.reset()
            logits[path], t = timed(lambda model=model: model.prefill(ids))
            times[path]["prefill"].append(t)
        for i in range(args.steps):
            for path, model in order if i % 2 == 0 else order[::-1]:
                token = int(np.argmax(logits[path]))
                logits[path], t = timed(lambda model=model, token=token: model.step([token]))
                times[path]["decode"].append(t)
    for path in args.artifacts:
        parts = []
        for kind, n in (("prefill", len(ids)), ("decode", 1)):
            wall = np.array([w for w, _ in times[path][kind]])
            cpu = np.array([c for _, c in times[path][kind]])
            parts.append(
                f"{kind} tok/s wall best {n / wall.min():.1f} median {n / np.median(wall):.1f}, "
                f"per CPU second {n / np.median(cpu):.1f}"
            )
        print(f"{path}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
