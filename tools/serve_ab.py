"""An A/B of the server's scheduling in one process: mixed steps on and off, alternated.

Two `LLMEngine`s over the same artifact (``--no-mixed-steps``'s scheduling in one, the default
in the other) run the same closed-loop workload in turn, round after round: C client threads
each submit a request, wait for it to end, submit the next (greedy, random prompt ids of the
given lengths, replies of the given lengths), with 1 and with C clients. A busy machine slows
both alike; the medians of the rounds are the figures (tokens per second, 4-client/1-client).

  python tools/serve_ab.py smol.edgert --threads 2 --clients 4 --requests 24 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def closed_loop(engine: Any, clients: int, requests: int, prompts: list[int], replies: list[int], seed: int) -> dict:
    """``requests`` requests from ``clients`` threads; tokens generated, seconds, first-token times."""
    from edgert.runtime.sampling import SamplingParams

    rng = np.random.default_rng(seed)
    work = [
        (rng.integers(100, 20000, int(rng.choice(prompts))).tolist(), int(rng.choice(replies))) for _ in range(requests)
    ]
    lock = threading.Lock()
    ttft: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not work:
                    return
                prompt, reply = work.pop()
            done = threading.Event()
            first: list[float] = []
            t0 = time.perf_counter()

            def sink(event: tuple[str, Any], done: threading.Event = done, first: list = first, t0: float = t0) -> None:
                if event[0] == "text" and not first:
                    first.append(time.perf_counter() - t0)
                if event[0] != "text":
                    done.set()

            engine.submit(prompt, sink, max_tokens=reply, sampling=SamplingParams(temperature=0))
            done.wait(600)
            with lock:
                ttft.extend(first)

    before = engine.counters.generated_tokens
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    generated = engine.counters.generated_tokens - before
    return {
        "tokens": generated,
        "seconds": wall,
        "tok_s": generated / wall,
        "ttft_p50_ms": 1000 * float(np.median(ttft)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24, help="requests per run (the 1-client run takes a third)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", default="20,60,170", help="prompt lengths in tokens, drawn at random")
    parser.add_argument("--max-tokens", default="16,48", help="reply lengths in tokens, drawn at random")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from edgert.artifact import open_artifact
    from edgert.serve.engine import LLMEngine

    prompts = [int(x) for x in args.prompt_tokens.split(",")]
    replies = [int(x) for x in args.max_tokens.split(",")]
    engines = {
        name: LLMEngine(open_artifact(args.artifact), threads=args.threads, max_batch=args.clients, mixed_steps=on)
        for name, on in (("separate", False), ("mixed", True))
    }
    runs: dict[str, dict[int, list[dict]]] = {name: {1: [], args.clients: []} for name in engines}
    try:
        for r in range(args.rounds):
            for name, engine in engines.items():
                for clients in (1, args.clients):
                    n = max(args.requests // 3, 2) if clients == 1 else args.requests
                    runs[name][clients].append(closed_loop(engine, clients, n, prompts, replies, seed=r))
    finally:
        for engine in engines.values():
            engine.close()
    out = {}
    for name, by in runs.items():
        one = statistics.median(x["tok_s"] for x in by[1])
        many = statistics.median(x["tok_s"] for x in by[args.clients])
        out[name] = {
            "tok_s_1": round(one, 1),
            f"tok_s_{args.clients}": round(many, 1),
            "ratio": round(many / one, 2),
            "ttft_p50_ms_1": round(statistics.median(x["ttft_p50_ms"] for x in by[1]), 1),
            f"ttft_p50_ms_{args.clients}": round(statistics.median(x["ttft_p50_ms"] for x in by[args.clients]), 1),
            "rounds": {c: [round(x["tok_s"], 1) for x in xs] for c, xs in by.items()},
        }
    if args.json:
        print(json.dumps(out))
        return
    for name, o in out.items():
        print(f"{name:8s} {json.dumps(o)}")


if __name__ == "__main__":
    main()
