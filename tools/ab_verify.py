"""A/B of LLM artifacts in one process: a decode step and a verify pass of N rows, alternated.

    python tools/ab_verify.py A.edgert B.edgert [--rows 5] [--rounds 40] [--threads 1] [--context 64] [--dynamic]

Each artifact holds the same prompt (``--context`` tokens, 64 by default); every round times,
artifact by artifact (order reversed every other round), one decode step and one verify pass over
``--rows`` tokens at that position, each rolled back (as `edgert bench --verify-rows` does for one
artifact). With one thread the figures are this process's CPU time, which another process holding the core does not
disturb; with more, wall-clock time. Printed: per artifact, the minimum and median of each and the
verify pass in decode steps; then each artifact against the first (minimums, medians, and the
median of the per-round ratios, ``paired``). ``--dynamic`` adds each artifact again with its pass run
through ``batch_decode`` (its static ``verify_rows_<n>`` entry left out: same file, same process), to
see what a static entry saves.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=64, help="tokens in the cache before each step and pass")
    parser.add_argument("--dynamic", action="store_true", help="also each artifact's pass through batch_decode")
    args = parser.parse_args()

    from edgert.families.registry import load
    from edgert.profile.bench import BENCH_TEXT, step_and_pass

    rows, context = args.rows, args.context
    cpu = args.threads == 1  # one thread: the process's CPU time, steadier on a busy machine
    models = [load(p, threads=args.threads) for p in args.artifacts]
    base = models[0].tokenizer.encode(BENCH_TEXT)
    prompt = (base * ((context + rows) // len(base) + 1))[: context + rows]
    drafts = prompt[context:]
    for model in models:
        model.reset()
        model.prefill(prompt[:context])
    # (label, model, the row counts its passes may run through a static entry: None as loaded)
    sides = [(p, m, None) for p, m in zip(args.artifacts, models, strict=True)]
    if args.dynamic:
        sides += [(f"{p} (batch_decode)", m, frozenset()) for p, m in zip(args.artifacts, models, strict=True)]
    loaded = {id(m): m._row_entries for m in models}
    times = {label: ([], []) for label, _, _ in sides}  # decode, verify: seconds per round
    for r in range(args.rounds + 2):  # two warm-up rounds, dropped
        for path, model, entries in sides if r % 2 == 0 else sides[::-1]:
            model._row_entries = loaded[id(model)] if entries is None else entries
            decode, verify, cpu_decode, cpu_verify = step_and_pass(model, drafts)
            if r >= 2:
                times[path][0].append(cpu_decode if cpu else decode)
                times[path][1].append(cpu_verify if cpu else verify)
    first = args.artifacts[0]
    for path in times:
        d, v = (np.array(x) * 1e3 for x in times[path])
        print(
            f"{path}: decode ms min {d.min():.3f} median {np.median(d):.3f}; verify({rows}) ms min {v.min():.3f} "
            f"median {np.median(v):.3f}; verify/decode min {v.min() / d.min():.3f} paired {np.median(v / d):.3f}"
        )
        if path != first:
            for i, name in enumerate(("decode", f"verify({rows})")):
                a, b = np.array(times[first][i]), np.array(times[path][i])
                print(
                    f"  {name} against {first}: min {b.min() / a.min():.3f} median "
                    f"{np.median(b) / np.median(a):.3f} paired {np.median(b / a):.3f}"
                )


if __name__ == "__main__":
    main()
