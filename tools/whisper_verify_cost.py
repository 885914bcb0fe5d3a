"""A Whisper decoder verify pass of n tokens in plain decode steps: thread CPU time, one thread.

`python tools/whisper_verify_cost.py w.edgert` alternates a one-token `Seq2Seq.step` and an n-token
`DecoderLayers.forward` (what lookup drafting's verify runs) after a 42-token prompt, on the encoding
of seeded noise, and prints the medians of 30 pairs for each row count of ``--rows`` (default 1, 2,
4, 7, 9). Thread CPU time leaves out the time other processes hold the core (wall-clock ratios are
noise on a loaded machine). ``--operators N`` prints instead, per VM call (kernel or builtin), the
thread CPU ms of a step and of an N-row pass (the Relax VM's instrument; it adds ~1.5 µs a call,
so compare kernels with kernels).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from edgert.artifact.reader import open_artifact
from edgert.profile.bench import VMCallTimes
from edgert.runtime.seq2seq import Seq2Seq
from edgert.runtime.seq2seq_speculative import DecoderLayers


def _setup(path: str) -> tuple[Seq2Seq, Callable[[int], float]]:
    model = Seq2Seq(open_artifact(path), 1)
    layers = DecoderLayers(model)
    cfg = model.artifact.manifest["model"]
    rng = np.random.default_rng(0)
    cross = model.encode(rng.standard_normal((1, cfg["n_mels"], 2 * cfg["audio_ctx"])).astype(np.float32) * 0.5)
    prompt = [50257, 50362] + [int(t) for t in rng.integers(200, 5000, 40)]
    model.cache.reset()
    seq = model.cache.add()
    model.prefill(seq, prompt, cross)

    def once(n: int) -> float:
        """Thread CPU seconds of a step (n = 0) or an n-token pass, rolled back."""
        t = time.thread_time()
        if n == 0:
            model.step([seq], [300], cross)
        else:
            layers.forward(seq, [300] * n, cross, range(layers.num_layers))
        spent = time.thread_time() - t
        model.cache.popn(seq, max(n, 1))
        return spent

    return model, once


def costs(path: str, rows: list[int], pairs: int = 30) -> None:
    """Print each row count's verify pass in ms and in decode steps."""
    _, once = _setup(path)
    for n in rows:
        for _ in range(3):
            once(0), once(n)
        timed = [(once(0), once(n)) for _ in range(pairs)]
        step, verify = statistics.median(p[0] for p in timed), statistics.median(p[1] for p in timed)
        print(f"{n} rows: {verify * 1e3:.2f} ms = {verify / step:.2f} decode steps (step {step * 1e3:.2f} ms)")


def operators(path: str, n: int, rounds: int = 30) -> None:
    """Print per VM call the thread CPU ms of a step and of an n-row pass, largest pass share first."""
    model, once = _setup(path)
    calls = VMCallTimes()
    with calls.attached(model.session.vm):
        for _ in range(rounds):
            for kind, rows in (("step", 0), ("pass", n)):
                with calls.booking(kind):
                    once(rows)
    totals = {kind: {name: t[0] for name, t in calls.totals.get(kind, {}).items()} for kind in ("step", "pass")}
    names = sorted(set(totals["step"]) | set(totals["pass"]), key=lambda s: -totals["pass"].get(s, 0.0))
    print(f"{'VM call':60s} {'step':>8s} {f'{n} rows':>8s}  (thread CPU ms, mean of {rounds})")
    for name in names:
        a, b = (totals[k].get(name, 0.0) / rounds * 1e3 for k in ("step", "pass"))
        print(f"{name[:60]:60s} {a:8.3f} {b:8.3f}")
    a, b = (sum(totals[k].values()) / rounds * 1e3 for k in ("step", "pass"))
    print(f"{'total':60s} {a:8.3f} {b:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", default="1,2,4,7,9", help="comma-separated row counts of the passes")
    parser.add_argument("--operators", type=int, default=0, help="per VM call, a step against a pass of N rows")
    args = parser.parse_args()
    if args.operators:
        operators(args.artifact, args.operators)
    else:
        costs(args.artifact, [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
