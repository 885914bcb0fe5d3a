"""CPU time per Relax VM call of an LLM artifact's decode steps (all threads of the process).

    python tools/decode_cpu_profile.py g.edgert [--steps 24] [--threads 2] [--prefill 128]

With ``--prefill N`` the calls of N-token prompt passes instead (a fresh sequence each time, N <= the
build's prefill chunk), per pass.

As `edgert.profile.measure.operator_times`, but each call's process CPU time is taken beside its
wall time: on a shared machine a parallel kernel's wall time counts the waits for a core, its CPU
time much less. The instrument (a Python callback per call, ~2.5 us) inflates the VM's own builtins
(`vm.builtin.*`); compare kernels with kernels.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import numpy as np

TEXT = "The history of the city begins with a small fishing village on the banks of the river. " * 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=0, help="profile prompt passes of this many tokens")
    args = parser.parse_args()

    import edgert

    model = edgert.load(args.artifact, threads=args.threads, context_length=512)
    ids = model.tokenizer.encode(TEXT)[:128]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    started: list[tuple[str, float, float]] = []
    active = [False]

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *rest: Any) -> int:
        if not active[0]:
            return 0
        if before:
            started.append((symbol, time.perf_counter(), time.process_time()))
        elif started:
            name, w, c = started.pop()
            entry = totals[name]
            entry[0] += time.perf_counter() - w
            entry[1] += time.process_time() - c
            entry[2] += 1
        return 0

    model.reset()
    logits = model.prefill(ids)
    model.session.vm.set_instrument(instrument)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    active[0] = True
    for _ in range(args.steps):
        if args.prefill:
            active[0] = False
            model.reset()
            active[0] = True
            logits = model.step(ids[: args.prefill])
        else:
            logits = model.step([int(np.argmax(logits))])
    active[0] = False
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = args.steps
    print(f"per step (instrumented): wall {wall / n * 1e3:.2f} ms, CPU {cpu / n * 1e3:.2f} ms")
    for name, (w, c, calls) in sorted(totals.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(
            f"CPU {c / n * 1e3:7.3f} ms {c / cpu * 100:5.1f} %  wall {w / n * 1e3:7.3f} ms"
            f"  calls {calls / n:5.0f}  {name}"
        )


if __name__ == "__main__":
    main()
