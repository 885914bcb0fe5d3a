"""What a server run's model passes cost on their own: each pass shape of a trace, timed in this process.

  python tools/load_test.py --serve ART --threads 2 --scaling 3 --json --serve-args="--trace t.jsonl" > runs.json
  python tools/pass_cost.py ART t.jsonl:runs.json [t2.jsonl:runs2.json ...] --threads 1 --rounds 5

Every distinct pass of the runs (``decode/4``, ``mixed/3`` of 64 tokens, ``prefill/0`` of 32, ...; of
all the traces given, each with the load test's JSON output) is run again here, the shapes alternated
round by round, and its median cost is multiplied by how often each run had it. With ``--threads 1``
the clock is this process's CPU time, which a busy machine does not inflate: the figures are what
the schedule itself costs, without HTTP, Python or other processes.

Per run: the passes' modelled seconds against those measured in the server, the tokens/s that the
passes alone allow, and two bounds: every decoding row in a full ``--max-batch``-row pass (no passes
with fewer rows; rows riding in mixed passes still counted there), and prompt tokens for free (a
mixed pass costs its rows' own decode pass). Decoding rows hold ``--context`` tokens; a prompt piece
is one new sequence (its padding included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_timeline import load, run_windows


def shapes_of(steps: list[dict[str, Any]]) -> dict[tuple[str, int, int], int]:
    """How many passes of each (kind, rows, tokens) ``steps`` ran."""
    out: dict[tuple[str, int, int], int] = {}
    for s in steps:
        for kind, rows, tokens, _, _ in s["passes"]:
            out[(kind, rows, tokens)] = out.get((kind, rows, tokens), 0) + 1
    return out


def time_shapes(
    artifact: Path, shapes: list[tuple[str, int, int]], threads: int | None, rounds: int, context: int
) -> dict[tuple[str, int, int], float]:
    """Median seconds of each shape, all shapes once per round (CPU time at one thread)."""
    import edgert
    from edgert.serve.engine import BatchKVCache

    gen = edgert.load(artifact, threads=threads)
    kv = gen.session.artifact.manifest["kv_cache"]
    rows = max([r for _, r, _ in shapes] + [1])
    cache = BatchKVCache(gen.session, rows + 1, (rows + 1) * (context + 300), kv["prefill_chunk_size"], kv["page_size"])
    seqs = list(range(1, rows + 1))
    prompt = np.arange(100, 100 + context, dtype=np.int32)[None]
    for s in seqs:
        cache.add(s)
        cache.begin([s], [context])
        _, cache.obj = gen.session("prefill", gen.session.tensor(prompt), cache.obj)
        cache.end()
    clock = time.process_time if gen.session.threads == 1 else time.perf_counter
    new = rows + 1

    def run(kind: str, r: int, tokens: int) -> float:
        ids = seqs[:r]
        if kind == "decode":
            cache.begin(ids, [1] * r)
            t = clock()
            logits, cache.obj = gen.session("batch_decode", gen.session.tensor(np.full((r, 1), 7, np.int32)), cache.obj)
        else:
            cache.add(new)
            cache.begin([*ids, new], [1] * r + [tokens - r])
            t = clock()
            at = gen.session.tensor(np.asarray([*range(r), tokens - 1], np.int32))
            tok = gen.session.tensor(np.full((1, tokens), 7, np.int32))
            logits, cache.obj = gen.session("prefill_rows", tok, at, cache.obj)
        np.from_dlpack(logits).argmax(axis=-1)
        seconds = clock() - t
        cache.end()
        if kind != "decode":
            cache.remove(new)
        for s in ids:
            cache.popn(s, 1)
        return seconds

    times: dict[tuple[str, int, int], list[float]] = {s: [] for s in shapes}
    for shape in shapes:  # one untimed run each: first-call costs
        run(*shape)
    for _ in range(rounds):
        for shape in shapes:
            times[shape].append(run(*shape))
    return {s: statistics.median(v) for s, v in times.items()}


def model(counts: dict[tuple[str, int, int], int], cost: dict[tuple[str, int, int], float], batch: int) -> dict:
    """Modelled seconds of a run's passes, and the bounds (full batches; prompt tokens free)."""
    seconds = sum(n * cost[s] for s, n in counts.items())
    decode_rows = sum(n * r for (k, r, _), n in counts.items() if k == "decode")
    decode_s = sum(n * cost[s] for s, n in counts.items() if s[0] == "decode")
    full = cost.get(("decode", batch, batch))
    full_batches = seconds - decode_s + (decode_rows / batch * full if full else decode_s)
    # Prompt tokens free: a mixed pass costs what its rows' own decode pass costs; prefill passes nothing.
    free = sum(
        n * (cost[s] if k == "decode" else cost.get(("decode", r, r), 0.0) if r else 0.0)
        for s, n in counts.items()
        for k, r, _ in [s]
    )
    return {"seconds": seconds, "full_batches": full_batches, "prompts_free": free}


def run_tokens(data: dict[str, Any]) -> dict[str, int]:
    """Generated tokens of each run in load_test.py's JSON output, by `run_windows`' labels."""
    tokens = {}
    for server, s in data.items():
        if "windows" in s:
            labels = [f"{server} 1 client round {i + 1}" for i in range(len(s["windows"][0]))]
            labels += [f"{server} {s['clients']} clients round {i + 1}" for i in range(len(s["windows"][1]))]
            tokens.update(zip(labels, [*s["generated_tokens"][0], *s["generated_tokens"][1]], strict=True))
        else:
            tokens[server] = s["generated_tokens"]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument(
        "traces", nargs="+", help="TRACE:RUNS: a server's --trace file and load_test.py's --json output"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=64, help="tokens each decoding row holds")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    tokens = {}
    for pair in args.traces:
        trace, runs_file = (Path(p) for p in pair.rsplit(":", 1))
        prefix = f"{trace.stem}: " if len(args.traces) > 1 else ""
        for label, a, b in run_windows(runs_file):
            steps = load(trace, a, b)
            measured = sum(p[4] for s in steps for p in s["passes"])
            runs.append((prefix + label, shapes_of(steps), measured, b - a))
        for label, n in run_tokens(json.loads(runs_file.read_text())).items():
            tokens[prefix + label] = n
    shapes = sorted({s for _, counts, _, _ in runs for s in counts})
    for k in range(1, args.max_batch + 1):  # the bounds' full batches
        if ("decode", k, k) not in shapes:
            shapes.append(("decode", k, k))
    cost = time_shapes(args.artifact, shapes, args.threads, args.rounds, args.context)
    out = {}
    for label, counts, measured, wall in runs:
        m = model(counts, cost, args.max_batch)
        n = tokens.get(label, 0)
        out[label] = {
            "tokens": n,
            "wall_s": round(wall, 3),
            "passes_measured_s": round(measured, 3),
            "passes_modelled_s": round(m["seconds"], 3),
            "tok_s_wall": round(n / wall, 1),
            "tok_s_passes": round(n / m["seconds"], 1),
            "tok_s_full_batches": round(n / m["full_batches"], 1),
            "tok_s_prompts_free": round(n / m["prompts_free"], 1) if m["prompts_free"] else None,
        }
    result = {
        "clock": "CPU time, one thread" if args.threads == 1 else f"wall, {args.threads} threads",
        "cost_ms": {f"{k}/{r} {t}": round(1000 * v, 3) for (k, r, t), v in sorted(cost.items())},
        "runs": out,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"pass costs ({result['clock']}, median of {args.rounds}): "
        + ", ".join(f"{k} {v} ms" for k, v in result["cost_ms"].items() if k.startswith("decode"))
    )
    for label, r in out.items():
        print(
            f"{label}: {r['tokens']} tokens; wall {r['wall_s']} s ({r['tok_s_wall']} tok/s); passes in the server "
            f"{r['passes_measured_s']} s, modelled {r['passes_modelled_s']} s ({r['tok_s_passes']} tok/s); "
            f"full batches {r['tok_s_full_batches']} tok/s; prompts free {r['tok_s_prompts_free']} tok/s"
        )


if __name__ == "__main__":
    main()
