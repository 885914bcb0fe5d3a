"""A/B of Whisper engines on a shared machine: transcriptions alternate, each engine in a process of its own.

    python tools/ab_whisper.py A.edgert [B.edgert] [--faster-whisper] [--rounds 10] [--threads 1]
                               [--peer-threads 2] [--seconds 10] [--background 1]

Each contender (the artifacts, and with ``--faster-whisper`` faster-whisper on the recipe's
``model.bin``, float32) loads once in a worker process and transcribes the asr bench's audio
(beckett.wav repeated to ``--seconds``, greedy) when told; the rounds run them one after another
in an order that rotates every round, with a pause between (OpenMP's workers spin on after a
call). Printed: whether every transcript is the first one's, the largest difference of two
artifacts' cross-attention K/V, and per measure (wall clock, the worker's CPU time, edgert's encoder
and decoder time) the medians and the median of the rounds' own ratios to the first contender with
its quartiles: a round runs all in one period, so a load that changes between rounds moves them
alike; with ``--faster-whisper``, also its wall time over each artifact's (the asr bench's ratio).
``--threads 0``: edgert's default (the cores other processes leave free).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAUSE_SECONDS = 0.3


def _worker(kind: str, path: str, threads: int, seconds: float, conn: Any) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers.asr import _audio

    samples = _audio(seconds)
    if kind == "edgert":
        from edgert.families.whisper.transcriber import Transcriber, TranscriptionStats
        from edgert.runtime.tvm_runtime import to_numpy

        tr = Transcriber(path, threads=threads or None)

        def run() -> tuple[str, float, float]:
            stats = TranscriptionStats()
            text = "".join(s.text for s in tr.segments(samples, stats=stats)).strip()
            return text, stats.encode_seconds, stats.decode_seconds

        def kv() -> Any:
            return to_numpy(tr.encode(tr.features(samples)))
    else:
        from faster_whisper import WhisperModel

        model = WhisperModel(path, device="cpu", compute_type="float32", cpu_threads=threads)

        def run() -> tuple[str, float, float]:
            segments, _ = model.transcribe(samples, beam_size=1, temperature=0.0, vad_filter=False, language="en")
            return "".join(s.text for s in segments).strip(), 0.0, 0.0

        def kv() -> Any:
            return None

    run()  # warm-up
    conn.send("ready")
    while (command := conn.recv()) != "stop":
        if command == "kv":
            conn.send(kv())
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        text, enc, dec = run()
        conn.send((text, time.perf_counter() - wall, time.process_time() - cpu, enc, dec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--faster-whisper", action="store_true", help="faster-whisper as one more contender")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--threads", default="1", help="edgert's threads (0: its default, the free cores), or one per artifact: 0,2"
    )
    parser.add_argument("--peer-threads", type=int, default=2, help="faster-whisper's threads")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--background", type=int, default=0, help="busy processes beside all of them")
    args = parser.parse_args()

    from peers import paired_ratio

    from edgert.profile.background import busy_processes
    from edgert.recipes import load_recipe

    threads = [int(t) for t in args.threads.split(",")]
    threads = threads * len(args.artifacts) if len(threads) == 1 else threads
    if len(threads) != len(args.artifacts):
        raise SystemExit(f"--threads {args.threads}: one count, or one per artifact ({len(args.artifacts)})")
    contenders = [("edgert", p, t) for p, t in zip(args.artifacts, threads, strict=True)]
    if args.faster_whisper:
        model_dir = str(load_recipe("whisper-tiny.en").source_path().parent)
        contenders.append(("faster-whisper", model_dir, args.peer_threads))
    names = [f"{Path(p).name} t{t or 'default'}" if kind == "edgert" else kind for kind, p, t in contenders]
    ctx = multiprocessing.get_context("spawn")
    busy = busy_processes(args.background) if args.background else contextlib.nullcontext()
    measures = ("wall", "cpu", "encoder", "decoder")
    got: list[dict[str, list[float]]] = [{k: [] for k in measures} for _ in contenders]
    texts: list[set[str]] = [set() for _ in contenders]
    with busy:
        conns, procs = [], []
        for kind, path, threads in contenders:  # loaded one at a time (loads beside each other collide)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(kind, path, threads, args.seconds, child), daemon=True)
            proc.start()
            if parent.recv() != "ready":
                raise SystemExit(f"{kind} worker failed to start")
            conns.append(parent)
            procs.append(proc)
        ours = [i for i, (kind, _, _) in enumerate(contenders) if kind == "edgert"]
        if len(ours) >= 2:
            kv = []
            for i in ours[:2]:
                conns[i].send("kv")
                kv.append(conns[i].recv())
            diff = abs(kv[0] - kv[1]).max()
            top = abs(kv[0]).max()
            print(f"cross K/V of {names[0]} and {names[1]}: largest difference {diff:.3g} (largest value {top:.3g})")
        for r in range(args.rounds):
            order = [(r + j) % len(contenders) for j in range(len(contenders))]
            for i in order:
                time.sleep(PAUSE_SECONDS)
                conns[i].send("run")
                text, wall, cpu, enc, dec = conns[i].recv()
                texts[i].add(text)
                for key, value in zip(measures, (wall, cpu, enc, dec), strict=True):
                    got[i][key].append(value)
        for conn in conns:
            conn.send("stop")
        for proc in procs:
            proc.join(timeout=30)
    first = next(iter(texts[0]))
    same = all(t == {first} for t in texts)
    print(f"same text in every run: {same} | {first[:70]}")
    print(f"{args.rounds} rounds; faster-whisper threads {args.peer_threads}")
    for key in measures:
        for i, name in enumerate(names):
            if key in ("encoder", "decoder") and contenders[i][0] != "edgert":
                continue
            line = f"{key:8s} {name:28s} median {statistics.median(got[i][key]):.3f} s"
            if i:
                med, q1, q3 = paired_ratio(got[i][key], got[0][key])
                line += f"  / {names[0]}: paired {med:.3f} (quartiles {q1:.3f}-{q3:.3f})"
            print(line)
    if args.faster_whisper:  # the bench's ratio: faster-whisper's latency over edgert's (above 1: edgert faster)
        for i in ours:
            med, q1, q3 = paired_ratio(got[-1]["wall"], got[i]["wall"])
            print(f"faster-whisper / {names[i]}, wall: paired {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
