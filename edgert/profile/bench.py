"""Benchmark a compiled LM: load time, prefill and decode tokens/s (medians), peak RSS."""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A neutral English passage; the prompt for a benchmark is cut from it (repeated as needed).
BENCH_TEXT = (
    "The river bends twice before it reaches the town, and in spring the water rises high "
    "enough to cover the lower path. People who live near the bridge keep boats tied to their "
    "fences, and children learn early which stones are safe to cross. In summer the current "
    "slows, the fish return, and the old mill wheel turns only when the wind is from the west. "
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def bench_generator(
    path: str | Path,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    repeats: int = 5,
    threads: int | None = None,
    background: int = 0,
) -> dict[str, Any]:
    """Time loading, a prefill of ``prompt_tokens`` and ``gen_tokens`` greedy decode steps.

    ``background`` busy processes spin beside the whole run, the load included (`busy_processes`).
    """
    from edgert.errors import EdgertError
    from edgert.profile.background import busy_processes

    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise EdgertError("bench needs --prompt-tokens, --gen-tokens and --repeats of at least 1")
    with busy_processes(background) as busy:
        result = _bench(path, prompt_tokens, gen_tokens, repeats, threads)
    if background:
        result["background"] = busy.to_dict()
    return result


def _bench(path: str | Path, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int | None) -> dict[str, Any]:
    from edgert.errors import EdgertError
    from edgert.families.registry import load

    t = time.perf_counter()
    model = load(path, threads=threads)
    load_s = time.perf_counter() - t
    base = model.tokenizer.encode(BENCH_TEXT)
    prompt = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    if prompt_tokens + gen_tokens > model.context_length:
        raise EdgertError(
            f"{prompt_tokens} prompt + {gen_tokens} generated tokens exceed the context of {model.context_length}"
        )
    prefill_tps, decode_tps = [], []
    model.score(prompt[:8])  # warm up: first calls page weights in and spin up threads
    for _ in range(repeats):
        model.reset()
        t = time.perf_counter()
        logits = model.prefill(prompt)
        prefill_tps.append(prompt_tokens / (time.perf_counter() - t))
        steps = []
        for _ in range(gen_tokens):
            token = int(np.argmax(logits))
            t = time.perf_counter()
            logits = model.step([token])
            steps.append(time.perf_counter() - t)
        decode_tps.append(1.0 / statistics.median(steps))
    return {
        "artifact": str(path),
        "target": model.artifact.target["name"],
        "threads": model.session.threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "load_seconds": round(load_s, 3),
        "prefill_tokens_per_second": round(statistics.median(prefill_tps), 2),
        "decode_tokens_per_second": round(statistics.median(decode_tps), 2),
        "prefill_tokens_per_second_runs": [round(x, 2) for x in prefill_tps],
        "decode_tokens_per_second_runs": [round(x, 2) for x in decode_tps],
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def step_and_pass(model: Any, drafts: Sequence[int]) -> tuple[float, float, float, float]:
    """One decode step of ``drafts[0]`` and one verify pass over ``drafts`` at the model's cache
    position, both rolled back, reading the logits in place: (step, pass) wall seconds, then (step,
    pass) process CPU seconds."""
    t, c = time.perf_counter(), time.process_time()
    model.step(drafts[:1], view=True)
    decode, cpu_decode = time.perf_counter() - t, time.process_time() - c
    model.rollback(1)
    t, c = time.perf_counter(), time.process_time()
    model.step(drafts, all_logits=True, view=True)
    verify, cpu_verify = time.perf_counter() - t, time.process_time() - c
    model.rollback(len(drafts))
    return decode, verify, cpu_decode, cpu_verify


def bench_verify(
    path: str | Path,
    rows: int = 5,
    rounds: int = 30,
    threads: int | None = None,
    prompt_tokens: int = 64,
    operators: bool = False,
    contexts: Sequence[int] = (),
) -> dict[str, Any]:
    """What a verify pass over ``rows`` tokens costs in decode steps (issue 20's goal: <= 1.5 for 5).

    After a prefill of ``prompt_tokens``, each round times one `decode` step and one `verify`
    pass over ``rows`` tokens at the same cache position (both rolled back), in alternation, so
    a loaded machine slows both alike; the ratio is that of the minimums (the medians, and the
    median of each round's ratio, ``paired``, beside it).
    Both read the logits in place (``view``), as the speculative decoder times them: a copy of
    the pass's rows is no part of what the decoder pays.
    ``contexts``: further cache lengths, timed in the same rounds (``by_context``): a pass's
    attention reads the cache once per row, so its cost in steps grows with the context (the
    grounded prompts verify at 110-230 tokens).
    With one thread the CPU time of the process is timed too (``cpu_*``): it leaves out the time
    another process held the core, so on a busy machine it is the steadier figure.
    ``operators``: also each VM call's time per decode step and per verify pass (`operator_cpu_times`).
    """
    from edgert.errors import EdgertError
    from edgert.families.registry import load

    if rows < 1 or rounds < 1 or prompt_tokens < 1 or any(c < 1 for c in contexts):
        raise EdgertError("bench --verify-rows, --repeats and --prompt-tokens need at least 1")
    model = load(path, threads=threads)
    if not hasattr(model, "rollback") or "verify" not in model.artifact.manifest.get("entry_points", {}):
        raise EdgertError(f"{path}: --verify-rows needs a language model with a verify entry")
    lengths = sorted({prompt_tokens, *contexts})
    longest = lengths[-1]
    if longest + rows > model.context_length:
        raise EdgertError(f"{longest} prompt + {rows} verified tokens exceed the context of {model.context_length}")
    base = model.tokenizer.encode(BENCH_TEXT)
    prompt = (base * ((longest + rows) // len(base) + 1))[: longest + rows]
    model.reset()
    timed: dict[int, tuple[list[float], ...]] = {n: ([], [], [], []) for n in lengths}

    def pair(n: int) -> None:
        for times, value in zip(timed[n], step_and_pass(model, prompt[n : n + rows]), strict=True):
            times.append(value)

    for _ in range(rounds + 2):  # two warm-up rounds, dropped
        for n in lengths:  # shortest first: the cache grows by a prefill of the difference
            if len(model.cached_ids) < n:
                model.prefill(prompt[:n])
            pair(n)
        model.rollback(longest - lengths[0])
    if len(model.cached_ids) < prompt_tokens:
        model.prefill(prompt[:prompt_tokens])
    summary = {n: _verify_summary(*(xs[2:] for xs in timed[n])) for n in lengths}
    cpu_decode, cpu_verify = (xs[2:] for xs in timed[prompt_tokens][2:])
    ops = (
        {"operators": operator_cpu_times(model, prompt[prompt_tokens : prompt_tokens + rows], rounds)}
        if operators
        else {}
    )
    cpu = {}
    if model.session.threads == 1:
        cpu = {
            "cpu_decode_ms_median": round(statistics.median(cpu_decode) * 1e3, 3),
            "cpu_verify_ms_median": round(statistics.median(cpu_verify) * 1e3, 3),
            "cpu_verify_over_decode": round(statistics.median(cpu_verify) / statistics.median(cpu_decode), 3),
        }
    by_context = {"by_context": [{"prompt_tokens": n, **summary[n]} for n in lengths]} if contexts else {}
    return {
        "artifact": str(path),
        "threads": model.session.threads,
        "rows": rows,
        "rounds": rounds,
        **summary[prompt_tokens],
        **cpu,
        **by_context,
        **ops,
    }


def _verify_summary(decode: list[float], verify: list[float], *_: list[float]) -> dict[str, float]:
    """Minimums and medians (ms) of one context's decode steps and verify passes, and their ratios."""
    return {
        "decode_ms_min": round(min(decode) * 1e3, 3),
        "decode_ms_median": round(statistics.median(decode) * 1e3, 3),
        "verify_ms_min": round(min(verify) * 1e3, 3),
        "verify_ms_median": round(statistics.median(verify) * 1e3, 3),
        "verify_over_decode": round(min(verify) / min(decode), 3),
        "verify_over_decode_median": round(statistics.median(verify) / statistics.median(decode), 3),
        # Each round's pass over its own step: the machine here switches between two states for
        # seconds at a time (steps 2.17 against 2.40 ms, passes 3.64 against 3.45), and the
        # minimums of a run that spans both pair a step of one with a pass of the other.
        "verify_over_decode_paired": round(statistics.median(v / d for v, d in zip(verify, decode, strict=True)), 3),
    }


class VMCallTimes:
    """Thread CPU seconds and calls per VM call (kernel or builtin), booked under a label.

    The Relax VM's instrument (`VirtualMachine.set_instrument`) brackets every call while attached;
    calls outside a `booking` are not counted. ``totals[label][name] = [seconds, calls]``.
    """

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, list[float]]] = {}
        self._label: str | None = None
        self._started: list[tuple[str, float]] = []

    def _instrument(self, func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if self._label is None:
            return 0
        if before:
            self._started.append((symbol, time.thread_time()))
        elif self._started:
            name, t0 = self._started.pop()
            entry = self.totals.setdefault(self._label, {}).setdefault(name, [0.0, 0])
            entry[0] += time.thread_time() - t0
            entry[1] += 1
        return 0

    @contextlib.contextmanager
    def attached(self, vm: Any) -> Iterator[VMCallTimes]:
        """Instrument ``vm`` for the block (a no-op instrument again after it)."""
        vm.set_instrument(self._instrument)
        try:
            yield self
        finally:
            self._label = None
            vm.set_instrument(lambda *args: 0)

    @contextlib.contextmanager
    def booking(self, label: str) -> Iterator[None]:
        """Book the calls made in the block under ``label``."""
        self._label = label
        try:
            yield
        finally:
            self._label = None


def operator_cpu_times(model: Any, drafts: list[int], rounds: int) -> list[dict[str, Any]]:
    """Per VM call (kernel or builtin): thread CPU ms per decode step of ``drafts[0]`` and per verify
    pass over ``drafts``, at the model's cache position (both rolled back), largest verify share first.

    The Relax VM's instrument (`VirtualMachine.set_instrument`) brackets every call; thread CPU time
    leaves out the time other processes held the core. With several worker threads the kernels'
    parallel parts are not counted: time with one thread (``-t 1``). The totals include the
    instrument's own cost per call (~1.4 µs: two Python callbacks and clock reads), so builtins
    called often look far larger: SmolLM2's 1,712 builtins a step booked 2.4 ms where perf puts the
    whole VM side at ~0.2 ms (docs/performance.md, vmcall). Compare kernels with kernels.
    """
    calls = VMCallTimes()
    with calls.attached(model.session.vm):
        for _ in range(rounds):
            with calls.booking("decode"):
                model.step(drafts[:1])
            model.rollback(1)
            with calls.booking("verify"):
                model.step(drafts, all_logits=True)
            model.rollback(len(drafts))
    totals = {kind: calls.totals.get(kind, {}) for kind in ("decode", "verify")}
    names = set(totals["decode"]) | set(totals["verify"])

    def per_round(kind: str, name: str, i: int) -> float:
        return totals[kind].get(name, [0.0, 0])[i] / rounds

    rows = [
        {
            "operator": name,
            "decode_ms": round(per_round("decode", name, 0) * 1e3, 4),
            "verify_ms": round(per_round("verify", name, 0) * 1e3, 4),
            "decode_calls": round(per_round("decode", name, 1), 2),
            "verify_calls": round(per_round("verify", name, 1), 2),
        }
        for name in names
    ]
    return sorted(rows, key=lambda r: -r["verify_ms"])
