"""Drafts that cost nothing on SmolLM2 and Whisper tiny.en: speculative decoding (lookup, recycle, self)
vs plain decoding.

No peer runtime ships these, so the "peer" column is plain decoding in edgert itself: the ratio
is the speedup. Two suites the project ships: input-grounded prompts (models/prompts/grounded.jsonl:
rewrite, summarize, extract, code edit, where the answer copies from the input) and open-ended
ones (models/prompts/open.jsonl). Per mode and suite: decode tokens/s (decode time over tokens
after the first, summed over the suite, median over ``--repeats``), whether every output is
plain greedy decoding's token for token, and the acceptance rate of the drafts. The Whisper rows
(`peers.speculative_whisper`): ``--speculative lookup`` on long-form and streaming transcription.

    python tools/bench_peers.py --speculative --threads 2
    python tools/bench_peers.py --speculative --spec-artifact smollm2.edgert --spec-modes lookup,recycle
    python tools/bench_peers.py --speculative --spec-cases whisper --spec-whisper-artifact whisper.edgert
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers import Row, paired_ratio, speculative_whisper  # noqa: E402

NAME = "speculative"
HELP = "SmolLM2 and Whisper: lookup and recycle drafting vs plain decoding (--speculative)"
BASE = "plain decoding"
SUITES = {
    "grounded": ROOT / "models" / "prompts" / "grounded.jsonl",
    "open": ROOT / "models" / "prompts" / "open.jsonl",
}


def add_arguments(group: Any) -> None:
    """Options of this section."""
    group.add_argument("--speculative", action="store_true", help="run only this section")
    group.add_argument("--spec-artifact", type=Path, help="a SmolLM2 artifact compiled already (skips the compile)")
    group.add_argument("--spec-modes", default="lookup,recycle", help="comma-separated --speculative specs")
    group.add_argument("--spec-tokens", type=int, default=64, help="tokens per prompt")
    group.add_argument("--spec-prompts", type=int, default=0, help="prompts per suite (0: all)")
    group.add_argument("--spec-cases", default="llm,whisper", help="which cases to run: llm,whisper (both by default)")
    speculative_whisper.add_arguments(group)


def load_cases(path: Path) -> list[dict[str, Any]]:
    """The cases of a suite file (one JSON object with a "prompt", and a "task", per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_suite(path: Path) -> list[str]:
    """The prompts of a suite file."""
    return [case["prompt"] for case in load_cases(path)]


def decode_suite(runner: Any, prompts: list[str], tokens: int) -> tuple[list[list[int]], float, dict[str, int]]:
    """Outputs of ``runner.generate`` (chat, greedy), decode tokens/s, and the summed draft counts."""
    outs, seconds, count = [], 0.0, 0
    drafts = {"drafted": 0, "accepted": 0, "rounds": 0}
    for p in prompts:
        outs.append([t.id for t in runner.generate(p, max_tokens=tokens, chat=True)])
        seconds += runner.stats.decode_seconds
        count += max(len(outs[-1]) - 1, 0)
        for key in drafts:
            drafts[key] += getattr(runner.stats, key, 0)
    return outs, count / seconds if seconds else 0.0, drafts


def run(args: Any) -> list[Row]:
    """The SmolLM2 suites (`llm_rows`) and the Whisper rows, as ``--spec-cases`` asks."""
    cases = set(args.spec_cases.split(","))
    return (llm_rows(args) if "llm" in cases else []) + (
        speculative_whisper.whisper_rows(args) if "whisper" in cases else []
    )


def verify_costs(model: Any, prompt: str, max_rows: int, rounds: int = 9) -> dict[int, float]:
    """A verify pass over n rows in decode steps, n = 2..``max_rows``: after the prompt's prefill, a
    decode step and then the pass at the same cache position, each pair timed back to back, the
    median of ``rounds`` pairs' ratios (a pair meets the same load, so the ratio holds up on a busy
    machine better than either time)."""
    ids = model.encode_prompt(prompt, chat=True)
    model.reset()
    model.prefill(ids)
    drafts = (ids * (max_rows // len(ids) + 1))[:max_rows]
    ratios: dict[int, list[float]] = {n: [] for n in range(2, max_rows + 1)}

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.step(drafts[:n], all_logits=n > 1)
        seconds = time.perf_counter() - t
        model.rollback(n)
        return seconds

    timed(max_rows)  # warm-up
    for _ in range(rounds):
        for n in ratios:
            step = timed(1)
            ratios[n].append(timed(n) / step)
    return {n: statistics.median(r) for n, r in ratios.items()}


def llm_rows(args: Any) -> list[Row]:
    """Plain decoding and each mode, interleaved prompt by prompt, on each suite; rows with plain
    decoding as the baseline.

    Besides the timed ratio (a loaded machine moves it), ``paired_ratio`` is the median and quartiles
    of each repeat's own ratio (a repeat runs plain decoding and the mode prompt by prompt in one
    period, so a load that changes between repeats moves both alike: the ratio of the medians pairs
    one repeat's plain decoding with another's mode), and ``modelled`` is the ratio with each pass
    costed by `verify_costs` (pairs of a step and a pass timed back to back): tokens over plain
    steps plus the passes' cost in decode steps; ``as_met`` (`as_met`) sets it against the passes and
    steps as the decoder met them and the Python between them. Per task of the suite, where the time
    went: rounds, drafts kept, tokens per verify pass, passes that kept nothing, plain steps. Each
    repeat drafts with a fresh drafter (`_fresh_decoder`): the policy carries over, not the outputs.
    """
    import edgert

    folder = None
    art = args.spec_artifact
    if art is None:
        from edgert.families.compile import compile_model

        folder = Path(tempfile.mkdtemp(prefix="edgert-spec-"))
        art = compile_model("smollm2-135m", output=folder / "smollm2.edgert", threads=args.threads).path
    model = edgert.load(art, threads=args.threads)
    specs = list(filter(None, args.spec_modes.split(",")))
    rows = []
    costs = None
    for suite, path in SUITES.items():
        cases = load_cases(path)[: args.spec_prompts or None]
        if costs is None:
            costs = verify_costs(model, cases[0]["prompt"], max(model.cache.rows, 2))
        decoders: dict[str, Any] = {}
        outs: dict[str, list[list[list[int]]]] = {name: [] for name in [BASE, *specs]}
        speed: dict[str, list[float]] = {name: [] for name in outs}
        counts: dict[str, dict[str, Counter]] = {name: {} for name in outs}
        met: dict[str, Counter] = {name: Counter() for name in outs}  # where the time went, every repeat
        for _ in range(args.repeats):
            # A fresh drafter every repeat: the recycle table learns each output it sees, and a repeat
            # after the first would draft the same prompts' own answers from it (open suite: 46 drafts
            # kept in the first repeat, 134 in the second). The policy carries over: its acceptances
            # are per match length and its costs per row count, not per prompt.
            decoders = {spec: _fresh_decoder(spec, model, args, decoders.get(spec)) for spec in specs}
            runners = {BASE: model, **decoders}
            # Prompt by prompt, every mode in turn: a change in the machine's load meets them alike.
            per = {name: ([], 0.0, 0) for name in runners}
            for case in cases:
                for name, runner in runners.items():
                    # From an empty cache, as a first run: a prompt found whole in the cache has its
                    # last token computed again by a decode step, whose int8 numerics differ a little
                    # from the prefill's, and the text may then differ too.
                    model.reset()
                    ids = [t.id for t in runner.generate(case["prompt"], max_tokens=args.spec_tokens, chat=True)]
                    got, seconds, tokens = per[name]
                    per[name] = ([*got, ids], seconds + runner.stats.decode_seconds, tokens + max(len(ids) - 1, 0))
                    _tally_time(met[name], runner.stats, runner is model)
                    if runner is not model and len(outs[name]) == 0:  # the first repeat's counts
                        tally = counts[name].setdefault(case.get("task", suite), Counter())
                        st = runner.stats
                        tally.update(
                            tokens=max(len(ids) - 1, 0),
                            rounds=st.rounds,
                            drafted=st.drafted,
                            accepted=st.accepted,
                            wasted=st.wasted,
                            plain=st.plain_steps,
                            trees=st.trees,
                        )
                        tally.update({f"rows{n}": c for n, c in st.passes.items()})
            for name, (got, seconds, tokens) in per.items():
                outs[name].append(got)
                speed[name].append(tokens / seconds if seconds else 0.0)
        reference, base = outs[BASE][0], statistics.median(speed[BASE])
        for spec, decoder in decoders.items():
            total = sum(counts[spec].values(), Counter())
            rows.append(
                Row(
                    NAME,
                    f"{spec} on {suite} ({len(cases)} prompts, {args.spec_tokens} tokens)",
                    "decode",
                    "tok/s",
                    statistics.median(speed[spec]),
                    base,
                    BASE,
                    extra={
                        "identical": all(r == reference for r in outs[spec]),
                        **draft_summary(total, costs),
                        "paired_ratio": _quartiles(speed[spec], speed[BASE]),
                        "runs": [round(v, 1) for v in speed[spec]],
                        "plain_runs": [round(v, 1) for v in speed[BASE]],
                        "by_task": {task: draft_summary(c, costs) for task, c in counts[spec].items()},
                        "as_met": as_met(met[spec], met[BASE], costs),
                        "verify_costs": {n: round(c, 2) for n, c in costs.items()},
                        "k": decoder.k,
                    },
                )
            )
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _fresh_decoder(spec: str, model: Any, args: Any, before: Any) -> Any:
    """A `SpeculativeDecoder` for ``spec`` with a new drafter; ``before``'s `DraftPolicy` where given."""
    import edgert
    from edgert.runtime.speculative import SpeculativeDecoder, parse_speculative

    drafter, k = parse_speculative(spec, model, lambda p: edgert.load(p, threads=args.threads))
    decoder = SpeculativeDecoder(model, drafter, k)
    if before is not None and before.policy is not None and decoder.policy is not None:
        decoder.policy = before.policy
    return decoder


def _tally_time(c: Counter, stats: Any, plain: bool) -> None:
    """Add one generation's decode time, split into model calls and the rest, to ``c``: for plain
    decoding its steps (``decode_step_seconds``), for a speculative decoder its plain steps and its
    verify passes by row count (seconds and counts)."""
    tokens = max(stats.generated_tokens - 1, 0)
    c.update(tokens=tokens, seconds=stats.decode_seconds)
    if plain:
        c.update(step_seconds=sum(stats.decode_step_seconds), steps=len(stats.decode_step_seconds))
        return
    c.update(step_seconds=stats.plain_seconds, steps=stats.plain_steps, pass_seconds=stats.verify_seconds)
    c.update({f"rows{n}": k for n, k in stats.passes.items()})


def as_met(c: Counter, base: Counter, costs: dict[int, float]) -> dict[str, float]:
    """Where a mode's decode time went against plain decoding's, over every repeat, in plain decoding's
    mean step (``step``): its plain steps (``plain_step``: their mean over plain decoding's), its
    passes (``pass_steps``: their time in steps per pass, against ``table_steps``, what the pass-cost
    table that ``modelled`` uses says for the same passes), and the time outside the model calls per
    token (``rest_us``, plain decoding's ``base_rest_us``); ``timed`` is the speedup over these
    repeats, ``modelled_as_met`` the same counts' speedup with the passes and steps as met and no rest:
    the difference between ``modelled`` and ``timed`` is the table against the passes as met, the
    plain steps, and the rest."""
    if not (base["steps"] and base["tokens"] and c["tokens"] and c["seconds"]):
        return {}
    step = base["step_seconds"] / base["steps"]
    passes = sum(c[f"rows{n}"] for n in range(2, 17))
    table = sum(costs.get(n, n) * c[f"rows{n}"] for n in range(2, 17))
    model_seconds = c["step_seconds"] + c["pass_seconds"]
    return {
        "step_ms": round(step * 1e3, 3),
        "plain_step": round(c["step_seconds"] / c["steps"] / step, 3) if c["steps"] else 0.0,
        "pass_steps": round(c["pass_seconds"] / step / passes, 3) if passes else 0.0,
        "table_steps": round(table / passes, 3) if passes else 0.0,
        "rest_us": round((c["seconds"] - model_seconds) / c["tokens"] * 1e6, 1),
        "base_rest_us": round((base["seconds"] - base["step_seconds"]) / base["tokens"] * 1e6, 1),
        "timed": round((base["seconds"] / base["tokens"]) / (c["seconds"] / c["tokens"]), 3),
        "modelled_as_met": round((base["step_seconds"] / base["tokens"]) / (model_seconds / c["tokens"]), 3),
    }


def _quartiles(ours: list[float], base: list[float]) -> list[float]:
    """`paired_ratio` as [first quartile, median, third quartile], rounded, for a row's JSON."""
    med, q1, q3 = paired_ratio(ours, base)
    return [round(q1, 3), round(med, 3), round(q3, 3)]


def draft_summary(c: Counter, costs: dict[int, float]) -> dict[str, Any]:
    """Acceptance, tokens per verify pass, wasted passes, plain steps and the modelled speedup of
    one mode's counts (``costs``: a pass over n rows in decode steps)."""
    steps = c["plain"] + sum(costs.get(n, n) * c[f"rows{n}"] for n in range(2, 17))
    return {
        "acceptance": round(c["accepted"] / c["drafted"], 3) if c["drafted"] else 0.0,
        "tokens_per_verify": round((c["accepted"] + c["rounds"]) / c["rounds"], 2) if c["rounds"] else 0.0,
        "verifies": c["rounds"],
        "wasted_verifies": c["wasted"],
        "plain_steps": c["plain"],
        "tree_passes": c["trees"],  # verifies over a token tree (costed as a chain of as many rows)
        "modelled": round(c["tokens"] / steps, 3) if steps else 0.0,
    }
