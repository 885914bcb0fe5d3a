"""The Relax VM calls of an artifact's entry point, counted by callee, and what a VM instrument costs.

    python tools/vm_calls.py ART.edgert [--entry decode] [--steps 60] [--threads 1]

Prints the calls the entry's bytecode makes (kernels and ``vm.builtin.*``), then the thread CPU
time of a decode step (median) with and without an instrument that does nothing: the difference
is what `edgert bench --operators` books to the calls themselves (docs/performance.md, vmcall).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

TEXT = "The history of the city begins with a small fishing village on the banks of the river. " * 12


def call_counts(artifact: Path, entry: str) -> collections.Counter[str]:
    """How often the bytecode of ``entry`` calls each function (one pass through it)."""
    import tvm
    from tvm import relax

    with tempfile.TemporaryDirectory() as tmp:
        if artifact.is_dir():
            library = artifact / "model.so"
        else:
            zipfile.ZipFile(artifact).extract("model.so", tmp)
            library = Path(tmp) / "model.so"
        text = relax.VMExecutable(tvm.runtime.load_module(str(library))).as_text()
    body = re.search(rf"^@{re.escape(entry)}:\n(.*?)(?=^@|\Z)", text, re.S | re.M)
    if body is None:
        raise SystemExit(f"{artifact} has no entry point '{entry}'")
    return collections.Counter(re.findall(r"call\s+(\S+)\s+in:", body.group(1)))


def step_cpu_ms(model, steps: int, instrument) -> float:
    """Median thread CPU ms of a greedy decode step after a 64-token prompt, with ``instrument`` (or none)."""
    model.reset()
    logits = model.prefill(model.tokenizer.encode(TEXT)[:64])
    model.session.vm.set_instrument(instrument)
    times = []
    try:
        for _ in range(steps):
            token = int(np.argmax(logits))
            t = time.thread_time()
            logits = model.step([token])
            times.append(time.thread_time() - t)
    finally:
        model.session.vm.set_instrument(None)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--entry", default="decode")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    counts = call_counts(args.artifact, args.entry)
    builtins = {k: v for k, v in counts.items() if k.startswith("vm.builtin.") and "kv_cache" not in k}
    print(f"{args.entry}: {sum(counts.values())} calls, {sum(builtins.values())} VM builtins")
    for name, n in counts.most_common():
        print(f"{n:6d}  {name}")
    if args.entry != "decode":
        return

    import edgert

    model = edgert.load(args.artifact, threads=args.threads, context_length=512)
    callbacks = [0]

    def noop(*_args) -> int:
        callbacks[0] += 1
        return 0

    for _ in range(2):  # alternated: the machine's load drifts
        plain, instrumented = step_cpu_ms(model, args.steps, None), step_cpu_ms(model, args.steps, noop)
        print(f"decode step, thread CPU median: {plain:.3f} ms; with a no-op instrument {instrumented:.3f} ms")
    print(f"instrument callbacks per step: {callbacks[0] / (2 * args.steps):.0f}")


if __name__ == "__main__":
    main()
