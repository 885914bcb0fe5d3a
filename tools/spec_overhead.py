"""Where a speculative round's time goes outside the model's entry calls, beside plain decoding's step.

Wraps the pieces of `SpeculativeDecoder` and `Generator.generate` with ``time.perf_counter_ns`` and
``time.thread_time_ns`` (the main thread's CPU time: steadier than wall time on a loaded machine,
and the Python around a pass runs on that thread alone) and runs plain decoding and each mode on
the grounded suite, alternated prompt by prompt. Per mode: microseconds per emitted token of the
entry calls (the VM, wall; its CPU spreads over the worker threads), logits to numpy, drafting and
the policy, the recycle table's top-3 (`observe`), the sampler/accept walk, the cache's KV rollback
or tree commit, the tokenizer (emit), and the rest of the loop.

    python tools/spec_overhead.py smol.edgert [--threads 2] [--prompts 10] [--modes lookup,recycle]
    python tools/spec_overhead.py smol.edgert --threads 2 --as-met 300   # a 5-row pass as met vs the bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers.speculative import SUITES, load_cases  # noqa: E402

PARTS = (
    "entry",
    "to_numpy",
    "tokens in",
    "kv begin/end",
    "draft+policy",
    "  lookup match",
    "  tree build",
    "  policy choice",
    "  tree+choice",
    "observe",
    "sampler+walk",
    "kv rollback/commit",
    "emit",
    "other",
)


class Clock:
    """Wall and main-thread CPU nanoseconds per part; nested parts are subtracted from their caller."""

    def __init__(self) -> None:
        self.wall: dict[str, int] = defaultdict(int)
        self.cpu: dict[str, int] = defaultdict(int)
        self.stack: list[list[int]] = []  # per open part: [wall of children, cpu of children]

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append([0, 0])
            w, c = time.perf_counter_ns(), time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter_ns() - w, time.thread_time_ns() - c
                child = self.stack.pop()
                self.wall[name] += dw - child[0]
                self.cpu[name] += dc - child[1]
                if self.stack:
                    self.stack[-1][0] += dw
                    self.stack[-1][1] += dc

        return timed


class TimedSession:
    """The session with its entry calls timed; ``passes`` keeps each decode pass's process CPU time and
    wall time by (clock, rows): the pass costs the decoder meets, against what the replay assumes."""

    def __init__(self, session: Any, call: Callable[..., Any], clock: Callable[[], Any]):
        self._session, self._call, self._clock = session, call, clock
        self.passes: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)

    def __call__(self, entry: str, *args: Any) -> Any:
        if entry == "prefill":
            return self._call(entry, *args)
        rows = 1 if entry == "decode" else int(args[0].shape[0])
        w, c = time.perf_counter_ns(), time.process_time_ns()
        out = self._call(entry, *args)
        self.passes[(id(self._clock()), rows)].append((time.perf_counter_ns() - w, time.process_time_ns() - c))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def main(argv: list[str] | None = None) -> int:
    """Plain decoding and each mode on the grounded suite; a table of microseconds per token."""
    import edgert
    from edgert.runtime import generator, sampling, speculative
    from edgert.runtime.speculative import SpeculativeDecoder, parse_speculative

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--suite", default="grounded", choices=sorted(SUITES))
    parser.add_argument("--modes", default="lookup,recycle")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--neighbours", action="store_true", help="only: a pass's cost after a decode step vs after another pass"
    )
    parser.add_argument(
        "--as-met",
        type=float,
        metavar="SECONDS",
        help="only: for SECONDS, a 5-row pass in decode steps as lookup meets it vs the bench's at the same context",
    )
    args = parser.parse_args(argv)
    model = edgert.load(args.artifact, threads=args.threads)
    if args.neighbours:
        return neighbours(model, load_cases(SUITES[args.suite])[0]["prompt"])
    if args.as_met:
        cases = load_cases(SUITES[args.suite])[: args.prompts]
        return as_met(model, [c["prompt"] for c in cases], args.tokens, args.as_met, args.json)
    clocks = {name: Clock() for name in ["plain", *args.modes.split(",")]}
    prefill = Clock()  # what begin_generation does (outside the decode time) goes here
    current: list[Clock] = [clocks["plain"]]

    def routed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = {id(clock): clock.wrap(name, fn) for clock in [*clocks.values(), prefill]}

        def call(*a: Any, **k: Any) -> Any:
            return wrapped[id(current[0])](*a, **k)

        return call

    # Patch the module-level helpers and classes the loops call (this process only).
    generator.to_numpy = routed("to_numpy", generator.to_numpy)
    sampling.Sampler.__call__ = routed("sampler+walk", sampling.Sampler.__call__)
    speculative.token_probabilities = routed("sampler+walk", speculative.token_probabilities)
    generator.TokenEmitter.emit = _timed_generator(routed, "emit", generator.TokenEmitter.emit)
    session = model.session
    timed = model.session = TimedSession(session, routed("entry", session.__call__), lambda: current[0])
    begin = model.begin_generation

    def begin_generation(*a: Any, **k: Any) -> Any:
        was, current[0] = current[0], prefill
        try:
            return begin(*a, **k)
        finally:
            current[0] = was

    model.begin_generation = begin_generation
    model.rollback = routed("kv rollback/commit", model.rollback)
    model.accept_tree = routed("kv rollback/commit", model.accept_tree)
    model._tokens = routed("tokens in", model._tokens)
    for name in ("begin", "begin_rows", "begin_tree", "end"):
        setattr(model.cache, name, routed("kv begin/end", getattr(model.cache, name)))
    decoders = {}
    for spec in clocks:
        if spec == "plain":
            continue
        drafter, k = parse_speculative(spec, model, lambda p: edgert.load(p, threads=args.threads))
        dec = SpeculativeDecoder(model, drafter, k)
        dec._drafts = routed("draft+policy", dec._drafts)
        dec._tree_drafts = routed("draft+policy", dec._tree_drafts)
        lookup = getattr(drafter, "lookup", drafter)
        if hasattr(lookup, "match"):
            lookup.match = routed("  lookup match", lookup.match)
        if hasattr(drafter, "tree"):
            drafter.tree = routed("  tree build", drafter.tree)
        if hasattr(drafter, "best_tree"):  # builds only what the policy could choose, and chooses
            drafter.best_tree = routed("  tree+choice", drafter.best_tree)
        if dec.policy is not None:
            dec.policy.choose = routed("  policy choice", dec.policy.choose)
            dec.policy.choose_tree = routed("  policy choice", dec.policy.choose_tree)
        if dec._observe is not None:
            dec._observe = routed("observe", dec._observe)
        decoders[spec] = dec
    tokens = {label: 0 for label in clocks}
    decode = {label: 0.0 for label in clocks}
    loops = {label: 0 for label in clocks}  # decoder iterations: plain steps and verify passes
    cases = load_cases(SUITES[args.suite])[: args.prompts]
    for case in cases:
        for label, clock in clocks.items():
            current[0] = clock
            runner = model if label == "plain" else decoders[label]
            model.reset()
            ids = [t.id for t in runner.generate(case["prompt"], max_tokens=args.tokens, chat=True)]
            tokens[label] += max(len(ids) - 1, 0)
            decode[label] += runner.stats.decode_seconds
            st = runner.stats
            loops[label] += max(len(ids) - 1, 0) if label == "plain" else st.rounds + st.plain_steps
    model.session = session
    report: dict[str, Any] = {}
    print(f"{'us per token (wall / cpu)':28}" + "".join(f"{label:>20}" for label in clocks))
    for part in PARTS:
        cells = []
        for label, clock in clocks.items():
            n = max(tokens[label], 1)
            if part == "other":
                wall = decode[label] * 1e9 - sum(clock.wall.values())
                cpu = None
            else:
                wall, cpu = clock.wall.get(part, 0), clock.cpu.get(part, 0)
            cells.append((wall / n / 1e3, None if cpu is None else cpu / n / 1e3))
            report.setdefault(part, {})[label] = cells[-1]
        print(f"{part:28}" + "".join(f"{w:>11.1f} / {'-' if c is None else f'{c:.1f}':>6}" for w, c in cells))
    print(f"{'decode, us per token':28}" + "".join(f"{decode[x] * 1e6 / max(tokens[x], 1):>20.1f}" for x in clocks))
    per = {x: decode[x] / max(tokens[x], 1) for x in clocks}
    print(f"{'speedup (timed)':28}" + "".join(f"{per['plain'] / per[x]:>20.3f}" for x in clocks))
    for label, dec in decoders.items():
        st = dec.stats
        passes = dict(sorted(st.passes.items()))
        print(f"{label}: last prompt rounds {st.rounds}, plain {st.plain_steps}, passes {passes}")
    # A pass over n rows in decode steps, as the decoder met them: its median process CPU time over the
    # median plain step's (the plain decoding run's, and the decoder's own plain steps').
    print(
        "pass costs met (median process CPU of a pass / of a plain decoding step; "
        "in brackets / the mode's own plain steps)"
    )
    base = [c for _, c in timed.passes.get((id(clocks["plain"]), 1), [])]
    step = float(np.median(base)) if base else float("nan")
    met: dict[str, dict[int, list[float]]] = {}
    for label, clock in clocks.items():
        if label == "plain":
            continue
        own = [c for _, c in timed.passes.get((id(clock), 1), [])]
        own_step = float(np.median(own)) if own else float("nan")
        cells = []
        for rows in range(2, 17):
            got = [c for _, c in timed.passes.get((id(clock), rows), [])]
            if got:
                m = float(np.median(got))
                met.setdefault(label, {})[rows] = [round(m / step, 2), round(m / own_step, 2), len(got)]
                cells.append(f"{rows}: {m / step:.2f} ({m / own_step:.2f}, n={len(got)})")
        print(f"  {label}: plain step {own_step / step:.2f}; " + ", ".join(cells))
    report["pass_costs"] = met
    # What `tools/replay_drafts.py --overhead` takes: the main thread's CPU outside the passes' steps
    # (entry, input, cache begin/end: what the cost table times), per plain-decoding step, per decoder
    # iteration (emit excluded) and per emitted token (emit), in microseconds.
    inside = {"entry", "to_numpy", "tokens in", "kv begin/end", "emit"}
    plain_us = sum(c for part, c in clocks["plain"].cpu.items() if part not in inside) / max(loops["plain"], 1) / 1e3
    emit_us = {x: clocks[x].cpu.get("emit", 0) / max(tokens[x], 1) / 1e3 for x in clocks}
    print(f"outside the passes (CPU us): plain decoding {plain_us:.1f} a step + emit {emit_us['plain']:.1f} a token")
    for label in decoders:
        own = sum(c for part, c in clocks[label].cpu.items() if part not in inside) / max(loops[label], 1) / 1e3
        report.setdefault("outside_us", {})[label] = {"iteration": own, "token": emit_us[label], "loops": loops[label]}
        print(f"  {label}: {own:.1f} an iteration + emit {emit_us[label]:.1f} a token")
    report.setdefault("outside_us", {})["plain"] = {"iteration": plain_us, "token": emit_us["plain"]}
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "decode_seconds": decode, "parts": report}, indent=1) + "\n")
    return 0


def as_met(model: Any, prompts: list[str], tokens: int, seconds: float, out: Path | None = None) -> int:
    """A 5-row pass in decode steps three ways, prompt by prompt in one process until ``seconds``
    pass: as lookup's decoder meets it (the median of its 5-row passes over the median of its plain
    steps, wall), as the bench times it at the same cache length (10 step/pass pairs, both rolled
    back) and as ``edgert bench --verify-rows 5`` does (the bench text at 128 tokens). Each prompt
    is tagged with the CPU time other processes took meanwhile (`threads.sample`), so quiet prompts
    can be told from loaded ones; the machine's state moves all three alike within a prompt.
    Each is also taken in process CPU time (``*_cpu``): at one thread the pass's own work, with the
    time another process held the core left out (at two, the workers' spinning is billed too)."""
    from edgert.profile.bench import BENCH_TEXT
    from edgert.runtime.speculative import SpeculativeDecoder, parse_speculative
    from edgert.runtime.threads import allowed_cpus, sample

    step, calls = model.step, []

    def logged(ids: Any, all_logits: bool = False, view: bool = False) -> Any:
        length = model.cache.length
        t, c = time.perf_counter(), time.process_time()
        logits = step(ids, all_logits, view)
        calls.append((len(ids), time.perf_counter() - t, length, time.process_time() - c))
        return logits

    def pairs(ids: list[int], at: int) -> tuple[float, float]:
        """10 step/pass pairs at cache length ``at``: the pass in steps, wall and process CPU."""
        model.reset()
        model.prefill(ids[:at])
        one, five = [], []
        for _ in range(10):
            for n, got in ((1, one), (5, five)):
                t, c = time.perf_counter(), time.process_time()
                step(ids[at : at + n], all_logits=n > 1, view=True)
                got.append((time.perf_counter() - t, time.process_time() - c))
                model.rollback(n)
        return _ratio(five, one, 0), _ratio(five, one, 1)

    drafter, k = parse_speculative("lookup", model, lambda p: None)
    decoder = SpeculativeDecoder(model, drafter, k)
    text = model.tokenizer.encode(BENCH_TEXT) * (140 // len(model.tokenizer.encode(BENCH_TEXT)) + 1)
    cpus, rows, end = allowed_cpus(), [], time.monotonic() + seconds
    while time.monotonic() < end:
        for prompt in prompts:
            before = sample(cpus)
            calls.clear()
            model.step = logged
            model.reset()
            got = [t.id for t in decoder.generate(prompt, max_tokens=tokens, chat=True)]
            model.step = step
            plain = [(s, c) for n, s, _, c in calls[1:] if n == 1]
            five = [(s, c) for n, s, _, c in calls[1:] if n == 5]
            if len(plain) < 3 or len(five) < 2:
                continue
            at = int(np.median([a for n, _, a, _ in calls[1:] if n == 5]))
            ids = (model.encode_prompt(prompt, chat=True) + got) * 2
            (bench, bench_cpu), (cli, cli_cpu) = pairs(ids, at), pairs(text, 128)
            row = {
                "context": at,
                "decoder": _ratio(five, plain, 0),
                "bench_at_context": bench,
                "bench_cli": cli,
                "decoder_cpu": _ratio(five, plain, 1),
                "bench_at_context_cpu": bench_cpu,
                "bench_cli_cpu": cli_cpu,
            }
            after = sample(cpus)
            if before is not None and after is not None and after.total > before.total:
                wall = (after.total - before.total) / len(cpus)
                row["others_cpus"] = (after.busy - before.busy - (after.own - before.own)) / wall
            rows.append(row)
    print("        prompts context decoder  bench at context  bench (cli, 128)   [process CPU: the same three]")
    keys = ("context", "decoder", "bench_at_context", "bench_cli")
    keys += tuple(f"{key}_cpu" for key in keys[1:])
    for label, keep in (("quiet", lambda r: r.get("others_cpus", 1) < 0.15), ("all", lambda r: True)):
        sel = [r for r in rows if keep(r)]
        if sel:
            med = {key: float(np.median([r[key] for r in sel])) for key in keys}
            line = f"{label:6} {len(sel):4d} {med['context']:8.0f} {med['decoder']:8.2f}"
            cpu = f"[{med['decoder_cpu']:.2f} {med['bench_at_context_cpu']:.2f} {med['bench_cli_cpu']:.2f}]"
            print(f"{line} {med['bench_at_context']:17.2f} {med['bench_cli']:17.2f}   {cpu}")
    if out:
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _ratio(passes: list[tuple[float, float]], steps: list[tuple[float, float]], i: int) -> float:
    """The median of field ``i`` (0: wall, 1: process CPU) of ``passes`` over that of ``steps``."""
    return float(np.median([p[i] for p in passes]) / np.median([s[i] for s in steps]))


def neighbours(model: Any, prompt: str, rounds: int = 25) -> int:
    """What the replay's cost table assumes (`peers.speculative.verify_costs`: a pass timed right after
    a decode step, both after the prompt) against the order the decoder runs them in: a decode step or
    a pass of n rows right after a decode step, after a pass of 5 rows (a static entry) and after a
    pass of 4 (the dynamic ``batch_decode``), each followed by its rollback as a round's; medians
    of wall and process CPU time (the workers' share included), alternated round by round."""
    ids = model.encode_prompt(prompt, chat=True)
    model.reset()
    model.prefill(ids)
    fill = (ids * 4)[:16]

    def run(n: int) -> tuple[int, int]:
        w, c = time.perf_counter_ns(), time.process_time_ns()
        model.step(fill[:n], all_logits=n > 1, view=True)
        w, c = time.perf_counter_ns() - w, time.process_time_ns() - c
        model.rollback(n)
        return w, c

    def tree(n: int) -> tuple[int, int]:  # two branches below the root, as recycle's trees: commit the root
        parents = [-1, 0, *range(1, n - 2), 0][:n]
        w, c = time.perf_counter_ns(), time.process_time_ns()
        model.step_tree(fill[:n], parents, view=True)
        model.accept_tree(fill[:n], parents, 0)
        w, c = time.perf_counter_ns() - w, time.process_time_ns() - c
        model.rollback(1)
        return w, c

    cases = [(before, n) for n in (1, 4, 5, 8) for before in (1, 5, 4, 3)]
    got: dict[tuple[int, int], list[tuple[int, int]]] = {case: [] for case in cases}
    trees: dict[int, list[tuple[int, int]]] = {n: [] for n in (3, 4, 5, 8)}
    for n in (1, 4, 5, 8):
        run(n)  # warm-up
        tree(n)
    for _ in range(rounds):
        for before, n in cases:
            run(before)
            got[(before, n)].append(run(n))
        for n in trees:
            run(1)
            trees[n].append(tree(n))
    step = float(np.median([c for _, c in got[(1, 1)]]))
    wstep = float(np.median([w for w, _ in got[(1, 1)]]))
    print("a pass of n rows (decode steps: after a decode step = 1; CPU / wall) after ...")
    for n in (1, 4, 5, 8):
        cells = []
        for before in (1, 5, 4, 3):
            c = float(np.median([c for _, c in got[(before, n)]])) / step
            w = float(np.median([w for w, _ in got[(before, n)]])) / wstep
            cells.append(f"after {before} row{'s' if before > 1 else ''}: {c:.2f} / {w:.2f}")
        print(f"  n={n}: " + ", ".join(cells))
    cells = []
    for n, times in trees.items():
        c = float(np.median([c for _, c in times])) / step
        w = float(np.median([w for w, _ in times])) / wstep
        cells.append(f"{n} nodes {c:.2f} / {w:.2f}")
    print("a tree pass with its commit, after a decode step: " + ", ".join(cells))
    return 0


def _timed_generator(routed: Callable[..., Any], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A generator method timed step by step (the time spent producing each item, not the caller's)."""
    step = routed(name, lambda it: next(it))

    def gen(*args: Any, **kwargs: Any) -> Any:
        it = fn(*args, **kwargs)
        while True:
            try:
                item = step(it)
            except StopIteration:
                return
            yield item

    return gen


if __name__ == "__main__":
    sys.exit(main())
