"""Where a server's time went, from its scheduler timeline (``edgert serve --trace FILE``).

  python tools/serve_timeline.py trace.jsonl [--from T] [--to T] [--steps 40]
  python tools/load_test.py --serve ART --scaling 3 --json --serve-args="--trace trace.jsonl" > runs.json
  python tools/serve_timeline.py trace.jsonl --runs runs.json

``--runs`` takes load_test.py's JSON output and summarizes each of its runs' windows (the trace's
times and the load test's are the same monotonic clock).

Each line of the trace is one scheduler step (`edgert.serve.engine.StepTrace`). The table sums the
steps' time by what they did: waiting for work, model passes by kind and decoding rows (count,
seconds, mean ms, tokens, padding), and the Python around the passes; then the event loop's CPU
(the process's main thread: HTTP, JSON, SSE writes), and how long decode passes of the most
common row count took in steps where the event loop ran against steps where it did not (it
shares the cores with TVM's workers). ``--steps N`` also prints the first N steps of the window.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def load(path: Path, start: float = 0.0, stop: float = float("inf")) -> list[dict[str, Any]]:
    """The trace's steps that began in [start, stop) seconds."""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [s for s in steps if start <= s["t"] < stop]


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds by phase and pass kind, and the event loop's share, over ``steps``."""
    out: dict[str, Any] = {"steps": len(steps), "wait": 0.0, "admit": 0.0, "py": 0.0, "loop_cpu": 0.0, "cpu": 0.0}
    passes: dict[str, list[float]] = {}
    for s in steps:
        for key in ("wait", "admit", "py", "loop_cpu", "cpu"):
            out[key] += s[key]
        for kind, rows, tokens, pad, seconds in s["passes"]:
            entry = passes.setdefault(f"{kind}/{rows}", [0, 0.0, 0, 0])
            entry[0] += 1
            entry[1] += seconds
            entry[2] += tokens
            entry[3] += pad
    out["passes"] = dict(sorted(passes.items()))
    out["pass_seconds"] = sum(e[1] for e in passes.values())
    out["wall"] = out["wait"] + out["admit"] + out["py"] + out["pass_seconds"]
    # Decode passes of the most common row count, split by whether the event loop ran in their step.
    decode = [s for s in steps if len(s["passes"]) == 1 and s["passes"][0][0] == "decode"]
    if decode:
        rows = statistics.mode(s["passes"][0][1] for s in decode)
        same = [s for s in decode if s["passes"][0][1] == rows]
        quiet = [s["passes"][0][4] for s in same if s["loop_cpu"] < 1e-4]
        busy = [s["passes"][0][4] for s in same if s["loop_cpu"] >= 1e-4]
        out["decode_rows"] = rows
        out["decode_ms_loop_idle"] = [len(quiet), 1000 * statistics.median(quiet) if quiet else None]
        out["decode_ms_loop_busy"] = [len(busy), 1000 * statistics.median(busy) if busy else None]
    return out


def print_summary(s: dict[str, Any]) -> None:
    wall = s["wall"] or 1.0
    print(f"{s['steps']} steps, {s['wall']:.3f} s")
    print(f"  wait for work {s['wait']:.3f} s ({100 * s['wait'] / wall:.1f} %)")
    print(
        f"  python (admit, sample, detokenize, send) {s['admit'] + s['py']:.3f} s "
        f"({100 * (s['admit'] + s['py']) / wall:.1f} %)"
    )
    print(f"  model passes {s['pass_seconds']:.3f} s ({100 * s['pass_seconds'] / wall:.1f} %):")
    for key, (n, seconds, tokens, pad) in s["passes"].items():
        print(
            f"    {key:<10} {n:>5} passes {seconds:8.3f} s ({100 * seconds / wall:5.1f} %) "
            f"{1000 * seconds / n:7.2f} ms each, {tokens:>6} tokens ({pad} padding)"
        )
    print(f"  event loop CPU {s['loop_cpu']:.3f} s; process CPU {s['cpu']:.3f} s ({s['cpu'] / wall:.2f} cores)")
    if "decode_rows" in s:
        (nq, q), (nb, b) = s["decode_ms_loop_idle"], s["decode_ms_loop_busy"]
        fmt = lambda v: "-" if v is None else f"{v:.2f} ms"  # noqa: E731
        print(
            f"  decode/{s['decode_rows']} passes (median): event loop idle in the step {fmt(q)} ({nq}), "
            f"busy {fmt(b)} ({nb})"
        )


def print_steps(steps: list[dict[str, Any]]) -> None:
    print(f"{'t s':>9} {'wait ms':>8} {'py ms':>6} {'loop ms':>7}  passes (kind/rows tokens ms)")
    for s in steps:
        passes = ", ".join(f"{k}/{r} {n}{f'+{p}pad' if p else ''} {1000 * sec:.1f}" for k, r, n, p, sec in s["passes"])
        print(
            f"{s['t']:9.3f} {1000 * s['wait']:8.2f} {1000 * (s['admit'] + s['py']):6.2f} "
            f"{1000 * s['loop_cpu']:7.2f}  {passes}"
        )


def run_windows(path: Path) -> list[tuple[str, float, float]]:
    """(label, start, stop) of each run in load_test.py's JSON output (``--scaling`` or a plain run)."""
    data = json.loads(path.read_text())
    out: list[tuple[str, float, float]] = []
    for server, s in data.items():
        if "windows" in s:
            for label, windows in (("1 client", s["windows"][0]), (f"{s['clients']} clients", s["windows"][1])):
                out += [(f"{server} {label} round {i + 1}", a, b) for i, (a, b) in enumerate(windows)]
        elif "window" in s:
            out.append((server, *s["window"]))
    return sorted(out, key=lambda w: w[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--from", dest="start", type=float, default=0.0, help="seconds into the trace")
    parser.add_argument("--to", dest="stop", type=float, default=float("inf"))
    parser.add_argument("--steps", type=int, default=0, help="also print the first N steps")
    parser.add_argument("--runs", type=Path, help="load_test.py's --json output: one summary per run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.runs:
        summaries = {label: summarize(load(args.trace, a, b)) for label, a, b in run_windows(args.runs)}
        if args.json:
            print(json.dumps(summaries, indent=2))
            return
        for label, summary in summaries.items():
            print(f"== {label}")
            print_summary(summary)
        return
    steps = load(args.trace, args.start, args.stop)
    summary = summarize(steps)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print_summary(summary)
    if args.steps:
        print_steps(steps[: args.steps])


if __name__ == "__main__":
    main()
