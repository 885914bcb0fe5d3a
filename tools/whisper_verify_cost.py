"""A Whisper decoder verify pass of n tokens in plain decode steps: thread CPU time, one thread.

`python tools/whisper_verify_cost.py w.edgert` alternates a one-token `Seq2Seq.step` and an n-token
`DecoderLayers.forward` (what lookup drafting's verify runs) after a 42-token prompt, on the encoding
of seeded noise, and prints the medians of 30 pairs for 1, 2, 4, 7 and 9 rows. Thread CPU time
leaves out the time other processes hold the core (wall-clock ratios are noise on a loaded machine).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from edgert.artifact.reader import open_artifact
from edgert.runtime.seq2seq import Seq2Seq
from edgert.runtime.seq2seq_speculative import DecoderLayers


def main(path: str) -> None:
    """Print each row count's verify pass in ms and in decode steps."""
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
        t = time.thread_time()
        if n == 0:
            model.step([seq], [300], cross)
        else:
            layers.forward(seq, [300] * n, cross, range(layers.num_layers))
        spent = time.thread_time() - t
        model.cache.popn(seq, max(n, 1))
        return spent

    for n in (1, 2, 4, 7, 9):
        for _ in range(3):
            once(0), once(n)
        pairs = [(once(0), once(n)) for _ in range(30)]
        step, verify = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"{n} rows: {verify * 1e3:.2f} ms = {verify / step:.2f} decode steps (step {step * 1e3:.2f} ms)")


if __name__ == "__main__":
    main(sys.argv[1])
