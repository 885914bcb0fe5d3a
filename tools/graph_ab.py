#!/usr/bin/env python
"""Two builds of the zoo against each other and onnxruntime, interleaved in one process.

    python tools/graph_ab.py ZOO BEFORE_DIR AFTER_DIR --threads 1 --repeats 40 [NAME ...]

BEFORE_DIR and AFTER_DIR hold ``NAME.edgert`` for the zoo's entries (built by two checkouts with
``edgert compile``). Each engine runs once in turn, ``--repeats`` times; the minimum and median
of each are printed and written as JSON. On a shared machine the minimum is the steadier figure:
a neighbour's burst lands on one engine's run, not on one engine.

``--block K`` runs each engine K+1 times in a row and times the last K. At 2 threads the engines
of one process share the cores with each other's spinning workers (onnxruntime's after each run,
TVM's yields): interleaved run by run, edgert's 2-thread minimums were no better than its 1-thread
ones in a quiet minute where onnxruntime's scaled 1.9x. Blocks lessen that; separate processes
(``bench_peers.py``) avoid it. The engines' order is reversed every other round, and each line
ends with the median of the rounds' paired ratios after / before and after / onnxruntime (each
round's block medians; with quartiles in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import paired_ratio
from peers.graph import SETTLE_S, _engine, _zoo_feeds


def main() -> None:
    """Command line: time and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoo", type=Path)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--block", type=int, default=1, help="timed runs per engine in a row (after one untimed)")
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help="seconds of pause before each engine's block (the previous engine's workers stop spinning)",
    )
    parser.add_argument("--json", type=Path, default=Path("graph_ab.json"))
    args = parser.parse_args()
    index = json.loads((args.zoo / "zoo.json").read_text())
    results = {}
    for name in args.names or list(index):
        feeds = _zoo_feeds(index[name])
        engines = {
            "before": _engine("edgert", str(args.before / f"{name}.edgert"), args.threads),
            "after": _engine("edgert", str(args.after / f"{name}.edgert"), args.threads),
            "onnxruntime": _engine("onnxruntime", str(args.zoo / index[name]["file"]), args.threads),
        }
        times: dict[str, list[float]] = {k: [] for k in engines}
        rounds: dict[str, list[float]] = {k: [] for k in engines}
        for run in engines.values():  # warm-up
            run(feeds)
        order = list(engines)
        for r in range(max(1, args.repeats // args.block)):
            for key in order if r % 2 == 0 else order[::-1]:
                run = engines[key]
                time.sleep(args.settle)
                if args.block > 1:
                    run(feeds)  # the previous engine's threads stop spinning meanwhile
                block = []
                for _ in range(args.block):
                    t = time.perf_counter()
                    run(feeds)
                    block.append(time.perf_counter() - t)
                times[key] += block
                rounds[key].append(float(np.median(block)))
        row: dict[str, dict[str, float]] = {
            k: {"min_ms": min(v) * 1e3, "median_ms": float(np.median(v)) * 1e3} for k, v in times.items()
        }
        for label, num, den in (("after/before", "after", "before"), ("after/onnxruntime", "after", "onnxruntime")):
            med, q1, q3 = paired_ratio(rounds[num], rounds[den])
            row[label] = {"paired": med, "q1": q1, "q3": q3}
        results[name] = row
        cells = "  ".join(f"{k} {r['min_ms']:.4g} ({r['median_ms']:.4g})" for k, r in row.items() if "min_ms" in r)
        pairs = "  ".join(f"{k} {r['paired']:.3f}" for k, r in row.items() if "paired" in r)
        print(f"{name} t{args.threads}: min (median) ms  {cells}  paired {pairs}", flush=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
