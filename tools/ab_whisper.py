"""A/B of two Whisper artifacts in one process on a shared machine: transcriptions alternate.

    python tools/ab_whisper.py A.edgert B.edgert [--rounds 10] [--threads 1] [--seconds 10] [--background 1]

Both transcribe the asr bench's audio (beckett.wav repeated to ``--seconds``, greedy), A then B, B then
A every other round. Printed: whether the transcripts are the same, the largest difference of the two
encoders' cross-attention K/V, and per measure (wall clock, process CPU time, encoder and decoder wall
time) both medians and the median of the rounds' own ratios B / A with its quartiles: a round runs
both in one period, so a load that changes between rounds moves both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="0: the runtime's default (the free cores)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--background", type=int, default=0, help="busy processes beside both")
    args = parser.parse_args()

    from peers import paired_ratio
    from peers.asr import _audio

    from edgert.families.whisper.transcriber import Transcriber, TranscriptionStats
    from edgert.profile.background import busy_processes
    from edgert.runtime.tvm_runtime import to_numpy

    samples = _audio(args.seconds)
    busy = busy_processes(args.background) if args.background else contextlib.nullcontext()
    with busy:
        models = [Transcriber(p, threads=args.threads or None) for p in (args.a, args.b)]
        texts = [m.transcribe(samples).text for m in models]  # also the warm-up
        print(f"same text: {texts[0] == texts[1]} | {texts[1][:70]}")
        mel = models[0].features(samples)
        kv = [to_numpy(m.encode(mel)) for m in models]
        print(f"cross K/V: largest difference {abs(kv[0] - kv[1]).max():.3g} (largest value {abs(kv[0]).max():.3g})")
        measures = ("wall", "cpu", "encoder", "decoder")
        got: list[dict[str, list[float]]] = [{k: [] for k in measures} for _ in models]
        for r in range(args.rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                stats = TranscriptionStats()
                wall, cpu = time.perf_counter(), time.process_time()
                list(models[i].segments(samples, stats=stats))
                got[i]["cpu"].append(time.process_time() - cpu)
                got[i]["wall"].append(time.perf_counter() - wall)
                got[i]["encoder"].append(stats.encode_seconds)
                got[i]["decoder"].append(stats.decode_seconds)
    print(f"threads A {models[0].model.session.threads}, B {models[1].model.session.threads}; {args.rounds} rounds")
    for key in measures:
        med, q1, q3 = paired_ratio(got[1][key], got[0][key])
        a, b = statistics.median(got[0][key]), statistics.median(got[1][key])
        print(f"{key:8s} A {a:.3f} s  B {b:.3f} s  B/A paired {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
