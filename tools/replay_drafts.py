"""Lookup drafting replayed against plain greedy decoding: steady figures on a loaded machine.

Greedy speculative decoding emits plain decoding's tokens, so a draft is kept exactly where it
equals the next plain token: given each prompt's plain output, the rounds `DraftPolicy` would
run, the drafts they keep and the plain steps between them follow without the model. Each pass
is costed from a table of decode steps per row count, so the speedup does not move with the
machine's load. ``--overhead`` adds what the passes leave out (the decoder's drafting, policy,
table and walk per iteration, plain decoding's sampling per step, emitting per token:
`tools/spec_overhead.py`) as ``with_overhead``, the speedup a timed run can reach. Tables:
``measured`` (`peers.speculative.verify_costs`: the median ratio of a pass to a decode step timed
back to back; or ``--costs 2=1.16,3=1.22,...`` taken elsewhere),
and ``five-at-1.5`` (the same table with every pass's extra cost scaled so 5 rows cost 1.5
steps: issue 20 part 1's target; ``--five-at 1.5,1.4`` adds more). ``--analyse`` says where lookup's
speedup goes: the policy's rounds again with hindsight (no pass that keeps nothing, passes over just
the drafts that hold, both), the best rounds over lookup's drafts could do (`oracle_steps`), and
the steps each loss costs. ``--belief 1.3,1.6`` replays lookup's policy told a wrong cost table (what its
timing errors cost); ``--ngram 2`` with a longer shortest match. Modes: ``policy`` (`DraftPolicy`,
as `--speculative lookup` runs), ``every-k`` (the continuation up to k = 6 at every chance: drafting before the policy).
Recycle (``recycle`` and ``recycle-tree``: chains, or token trees chosen by `DraftPolicy.choose_tree`)
replays its table from the model's logits along plain decoding (`Generator.score` of prompt and
output): the table learns what the kept rows' logits say, not what the rejected branches' rows
would have added (the decoder sees those too), so it is a little poorer than the real one.

    python tools/replay_drafts.py smollm2.edgert [--tokens 64] [--threads 2] [--analyse] [--features] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers.speculative import SUITES, load_cases, verify_costs  # noqa: E402

from edgert.runtime.speculative import DraftPolicy, DraftTree, LookupDrafter, RecycleDrafter  # noqa: E402


def replay(
    prompt: list[int],
    plain: list[int],
    costs: dict[int, float],
    mode: str,
    k: int,
    policy: DraftPolicy,
    hindsight: str = "",
    belief: dict[int, float] | None = None,
    ngram: int = 1,
) -> dict:
    """Rounds over one prompt: the counts, and the decode steps they cost (``costs``: rows -> steps).

    ``hindsight`` (the analysis: what each loss costs) changes the policy's rounds with what the
    plain output shows: ``veto`` turns a round that would keep nothing into a plain step, ``exact``
    verifies only the drafts a round keeps, ``both`` does both. Besides the counts: ``no_draft``
    (plain steps with nothing to copy), ``declined_kept`` (plain steps whose declined draft would have
    held), ``wasted_steps`` (what passes that kept nothing cost beyond a plain step) and
    ``overrun_steps`` (what passes that kept something cost beyond a pass over just the kept drafts).
    ``belief``: the costs the policy is told its passes took (default ``costs``: what they cost), to see
    what a wrong cost table loses; ``ngram``: lookup's shortest match (`LookupDrafter`)."""
    drafter = LookupDrafter(ngram)
    full = prompt + plain
    t = len(prompt)  # full[t] is the pending token (emitted); the cache holds full[:t]
    counts = {"tokens": 0, "verifies": 0, "wasted": 0, "plain": 0, "drafted": 0, "accepted": 0, "steps": 0.0}
    counts.update(no_draft=0, declined_kept=0, wasted_steps=0.0, overrun_steps=0.0)
    seen: list[int] = []  # full[: t + 1], one growing list (lookup indexes it once, as the decoder's history)
    while t < len(full) - 1:
        left = len(full) - 1 - t  # tokens still to come after the pending one
        seen.extend(full[len(seen) : t + 1])
        found = drafter.candidate(seen, min(k, policy.max_rows - 1))
        if found is None:
            length = 0
        elif mode == "policy":
            length = min(policy.choose(found, k), left)
        else:
            length = min(len(found.tokens), k, left)
        if length and hindsight:
            held = _kept(found.tokens[:length], full, t)
            if held == 0 and hindsight in ("veto", "both"):
                length = 0
            elif held and hindsight in ("exact", "both"):
                length = held
        if not length:
            counts["plain"] += 1
            counts["tokens"] += 1
            counts["steps"] += 1.0
            counts["no_draft"] += found is None
            counts["declined_kept"] += found is not None and full[t + 1] == found.tokens[0]
            t += 1
            continue
        drafts = found.tokens[:length]
        kept = _kept(drafts, full, t)
        policy.record(found.keys[:length], kept)
        policy.time(length + 1, (belief or costs)[length + 1])  # as the decoder times its passes (steps of 1.0 s)
        counts["verifies"] += 1
        counts["wasted"] += kept == 0
        if kept:
            counts["overrun_steps"] += costs[length + 1] - costs.get(kept + 1, 1.0)
        else:
            counts["wasted_steps"] += costs[length + 1] - 1.0
        counts["drafted"] += length
        counts["accepted"] += kept
        counts["tokens"] += min(kept + 1, left)  # the run ends at the last plain token, as max_tokens ends it
        counts["steps"] += costs[length + 1]
        t += kept + 1
    return counts


def _kept(drafts: list[int], full: list[int], t: int) -> int:
    """How many of ``drafts`` (after the pending token ``full[t]``) plain decoding emitted next."""
    kept = 0
    while kept < len(drafts) and t + 1 + kept < len(full) and full[t + 1 + kept] == drafts[kept]:
        kept += 1
    return kept


def oracle_steps(prompt: list[int], plain: list[int], costs: dict[int, float], k: int) -> float:
    """The fewest decode steps lookup's drafts could take over one prompt, knowing the output: at each
    place a plain step, or a pass over as many of the continuation's drafts as would hold (never
    more), whichever makes the rest cheapest (dynamic programming from the end)."""
    drafter = LookupDrafter()
    full = prompt + plain
    start, end = len(prompt), len(full) - 1
    held: list[int] = []
    seen: list[int] = []
    for t in range(start, end):
        seen.extend(full[len(seen) : t + 1])
        found = drafter.candidate(seen, k)
        held.append(_kept(found.tokens, full, t) if found is not None else 0)
    best = [0.0] * (end - start + 1)
    for i in range(end - start - 1, -1, -1):
        cheapest = 1.0 + best[i + 1]
        for j in range(1, held[i] + 1):
            cheapest = min(cheapest, costs[j + 1] + best[min(i + 1 + j, end - start)])
        best[i] = cheapest
    return best[0]


def replay_recycle(
    prompt: list[int],
    plain: list[int],
    top: np.ndarray,
    costs: dict[int, float],
    k: int,
    policy: DraftPolicy,
    drafter: RecycleDrafter,
    tree: bool,
) -> dict:
    """`replay` for recycle: ``top[i]`` are the model's first choices after ``(prompt + plain)[i]`` (the
    table learns the rows a round keeps); with ``tree`` the policy's token trees, else its chains."""
    full = prompt + plain
    t = len(prompt)
    drafter.table[full[t - 1]] = top[t - 1]  # the prompt's last row, as the decoder's prefill
    counts = {"tokens": 0, "verifies": 0, "wasted": 0, "plain": 0, "drafted": 0, "accepted": 0, "steps": 0.0}
    counts["trees"] = 0
    seen: list[int] = []  # full[: t + 1], one list that grows (as the decoder's history: lookup indexes it once)
    while t < len(full) - 1:
        left = len(full) - 1 - t
        limit = min(k, policy.max_rows - 1, left)
        seen.extend(full[len(seen) : t + 1])
        if tree:  # as the decoder: `best_tree` is `choose_tree` of the policy's tree, node for node
            chosen = drafter.best_tree(seen, limit, policy) if limit > 0 else None
            chosen = chosen or DraftTree([], [], [])
        else:
            cand = drafter.candidate(seen, limit)
            length = policy.choose(cand, limit) if cand is not None else 0
            chosen = DraftTree([], [], [])
            if length:
                chosen = DraftTree(cand.tokens[:length], list(range(-1, length - 1)), cand.keys[:length])
        if not chosen:
            drafter.table[full[t]] = top[t]
            counts["plain"] += 1
            counts["tokens"] += 1
            counts["steps"] += 1.0
            t += 1
            continue
        node, path = -1, []
        while True:  # greedy: the child whose token plain decoding emitted next
            target = full[t + 1 + len(path)] if t + 1 + len(path) < len(full) else -1
            nxt = next((c for c, p in enumerate(chosen.parents) if p == node and chosen.tokens[c] == target), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        kept = len(path)
        drafter.table[np.asarray(full[t : t + kept + 1])] = top[t : t + kept + 1]
        policy.record_tree(chosen, path)
        policy.time(len(chosen) + 1, costs[len(chosen) + 1])
        counts["verifies"] += 1
        counts["trees"] += not chosen.is_chain
        counts["wasted"] += kept == 0
        counts["drafted"] += len(chosen)
        counts["accepted"] += kept
        counts["tokens"] += min(kept + 1, left)
        counts["steps"] += costs[len(chosen) + 1]
        t += kept + 1
    return counts


def first_draft_features(
    outputs: list[tuple[list[int], list[int]]], tops: list[np.ndarray], probs: list[list[float]]
) -> dict[str, dict[str, list[float]]]:
    """At every place where lookup has a draft: how often its first draft is plain decoding's next token
    ([places, fraction]), by the match's length (``u``: every earlier occurrence went on alike) and, for
    matches of 1-2 tokens (where a pass that keeps nothing is likeliest), by ``top1`` (the model's
    probability of the pending token), ``table`` (the recycle table's first choice after the pending
    token, learnt along the output, equals the draft / differs / is unknown) and ``predicted`` (the
    last place's draft was the pending token)."""
    groups: dict[str, dict[str, list[int]]] = {"match": {}, "top1": {}, "table": {}, "predicted": {}}

    def count(feature: str, bucket: str, held: bool) -> None:
        tally = groups[feature].setdefault(bucket, [0, 0])
        tally[0] += 1
        tally[1] += held

    for (prompt, plain), top, prob in zip(outputs, tops, probs, strict=True):
        full = prompt + plain
        drafter, seen, table, before = LookupDrafter(), [], {}, None
        for t in range(len(prompt), len(full) - 1):
            table[full[t - 1]] = int(top[t - 1][0])
            seen.extend(full[len(seen) : t + 1])
            found, match = drafter.candidate(seen, 1), drafter.match(seen)
            predicted, before = before == full[t], (found.tokens[0] if found is not None else None)
            if found is None or match is None:
                continue
            n, unique = match[1], match[2]
            held = found.tokens[0] == full[t + 1]
            count("match", f"{min(n, 6)}{'u' if unique else ''}", held)
            if n > 2:
                continue
            p = prob[t - 1]
            count("top1", f"{n}: " + ("<0.5" if p < 0.5 else "0.5-0.9" if p < 0.9 else ">=0.9"), held)
            first = table.get(full[t])
            count(
                "table",
                f"{n}: " + ("unknown" if first is None else "agrees" if first == found.tokens[0] else "differs"),
                held,
            )
            count("predicted", f"{n}: {'yes' if predicted else 'no'}", held)
    return {
        feature: {bucket: [c[0], round(c[1] / c[0], 2)] for bucket, c in sorted(buckets.items())}
        for feature, buckets in groups.items()
    }


def analyse(
    outputs: list[tuple[list[int], list[int]]], costs: dict[int, float], rows: int, k: int, total: dict[str, float]
) -> dict[str, Any]:
    """Where the policy's lookup rounds (``total``: their summed counts) lose against hindsight: the
    speedup with each loss taken away (`replay`'s ``hindsight``), the best possible over lookup's
    drafts (`oracle_steps`), and the steps each loss costs."""
    tokens = total["tokens"]
    found: dict[str, Any] = {"policy": round(tokens / total["steps"], 3)}
    for hindsight, label in (("veto", "no_wasted_pass"), ("exact", "no_overrun"), ("both", "neither")):
        policy = timed_policy(rows, costs)
        steps = sum(replay(p, o, costs, "policy", k, policy, hindsight)["steps"] for p, o in outputs)
        found[label] = round(tokens / steps, 3)
    found["oracle"] = round(tokens / sum(oracle_steps(p, o, costs, min(k, rows - 1)) for p, o in outputs), 3)
    found["steps"] = round(total["steps"], 1)
    found.update({key: round(total[key], 1) for key in ("wasted_steps", "overrun_steps")})
    found.update({key: int(total[key]) for key in ("tokens", "plain", "no_draft", "declined_kept", "wasted")})
    return found


def timed_policy(rows: int, costs: dict[int, float], max_tree: int = 0) -> DraftPolicy:
    """A fresh `DraftPolicy` that has timed a plain step at 1.0 and each pass at ``costs`` (in steps)."""
    policy = DraftPolicy(rows, max_tree=max_tree)
    policy.time(1, 1.0)
    for n, c in costs.items():
        policy.time(n, c)
    return policy


def scaled(costs: dict[int, float], five: float) -> dict[int, float]:
    """``costs`` with every pass's extra cost (over one step) scaled so that 5 rows cost ``five`` steps."""
    scale = (five - 1.0) / (costs[5] - 1.0)
    return {n: 1.0 + (c - 1.0) * scale for n, c in costs.items()}


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (``1.3,1.5``)."""
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    """A comma-separated list of integers (``1,2``)."""
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Plain outputs of both suites, then every mode against every cost table."""
    import edgert

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--costs", help="a table of decode steps per row count, 2=1.16,3=1.22,... (else measured)")
    parser.add_argument(
        "--five-at",
        type=_floats,
        default=[1.5],
        help="more cost tables: the measured one with every pass's extra cost scaled so 5 rows cost this many "
        "steps (comma-separated; default 1.5, issue 20 part 1's target)",
    )
    parser.add_argument(
        "--belief",
        type=_floats,
        default=[],
        help="lookup's policy again with a wrong cost table: its passes cost each table's steps, but it is told "
        "the measured table scaled so 5 rows cost this many (comma-separated): what the policy's timing errors cost",
    )
    parser.add_argument(
        "--ngram",
        type=_ints,
        default=[],
        help="lookup's policy again with these shortest matches (comma-separated; the decoder's default is 1)",
    )
    parser.add_argument(
        "--analyse",
        action="store_true",
        help="where lookup's speedup goes: the policy's rounds with hindsight (no pass that keeps nothing, "
        "passes over just the drafts that hold, both) and the best any rounds over its drafts could do",
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="how often lookup's first draft holds, by match length and, for matches of 1-2 tokens, by what "
        "a policy could also know: the model's top-1 probability of the pending token, whether the recycle "
        "table's first choice agrees, whether lookup had predicted the pending token",
    )
    parser.add_argument(
        "--overhead",
        help="the time outside the passes, microseconds (tools/spec_overhead.py): step=2440,plain=60,token=25,"
        "lookup=90,recycle=190: a decode step, plain decoding's own per step, emitting a token, and a decoder "
        "iteration (plain step or pass) of each drafter; adds `with_overhead`, the speedup they leave",
    )
    args = parser.parse_args(argv)
    overhead = {}
    if args.overhead:
        try:
            overhead = {key: float(value) for key, value in (part.split("=") for part in args.overhead.split(","))}
        except ValueError:
            raise SystemExit(f"--overhead {args.overhead!r}: not key=microseconds,...") from None
        missing = {"step", "plain", "token", "lookup", "recycle"} - set(overhead)
        if missing:
            raise SystemExit(f"--overhead needs {', '.join(sorted(missing))}")
    model = edgert.load(args.artifact, threads=args.threads)
    suites = {name: load_cases(path) for name, path in SUITES.items()}
    rows = max(model.cache.rows, 2)
    if args.costs:
        measured = {int(n): float(c) for n, c in (part.split("=") for part in args.costs.split(","))}
        if sorted(measured) != list(range(2, rows + 1)):
            raise SystemExit(f"--costs needs every row count from 2 to {rows}")
    else:
        measured = verify_costs(model, suites["grounded"][0]["prompt"], rows)
    tables = {"measured": measured}
    for target in args.five_at:  # every pass's extra cost scaled so 5 rows cost ``target`` steps
        tables[f"five-at-{target:g}"] = scaled(measured, target)
    outputs, scores, probs = {}, {}, {}
    for name, cases in suites.items():
        outputs[name], scores[name] = [], []
        for case in cases:
            model.reset()  # from an empty cache, as every mode's run
            ids = model.encode_prompt(case["prompt"], chat=True)
            outputs[name].append((ids, [t.id for t in model.generate(ids, max_tokens=args.tokens)]))
            logits = model.score(ids + outputs[name][-1][1])
            part = np.argpartition(logits, -3, axis=-1)[:, -3:]  # the first 3 choices of each row, best first
            order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1)
            scores[name].append(np.take_along_axis(part, order, axis=-1))
            if args.features:  # each row's top-1 probability (how sure the model was of the next token)
                top = logits.max(axis=-1, keepdims=True)
                probs.setdefault(name, []).append((1.0 / np.exp(logits - top).sum(axis=-1)).tolist())
    report: dict[str, Any] = {
        "tokens": args.tokens,
        "costs": {t: {n: round(c, 2) for n, c in table.items()} for t, table in tables.items()},
    }
    if args.features:
        for name in suites:
            found = first_draft_features(outputs[name], scores[name], probs[name])
            report[f"features / {name}"] = found
            for feature, buckets in found.items():
                print(f"features {name:8} {feature:10} {json.dumps(buckets)}")
    for table, costs in tables.items():
        variants = [(f"belief-5@{b:g}", scaled(measured, b), 1) for b in args.belief]
        variants += [(f"ngram-{n}", None, n) for n in args.ngram]
        for label, belief, ngram in variants:  # lookup's policy with a wrong cost table, or another ngram
            for name in suites:
                policy = timed_policy(rows, belief or costs)
                total: Counter[str] = Counter()
                for prompt, plain in outputs[name]:
                    total.update(replay(prompt, plain, costs, "policy", args.k, policy, "", belief, ngram))
                result = {
                    "speedup": round(total["tokens"] / total["steps"], 3),
                    **{key: int(total[key]) for key in ("verifies", "wasted", "plain", "tokens")},
                }
                report[f"{table} / policy {label} / {name}"] = result
                print(f"{table:12} policy {label:12} {name:8} {json.dumps(result)}")
        for mode, k in (("policy", args.k), ("every-k", 6), ("recycle", args.k), ("recycle-tree", args.k)):
            for name in suites:
                # One policy (and table) per suite and mode: they learn across the suite's prompts.
                policy = timed_policy(rows, costs, model.cache.tree)
                drafter = RecycleDrafter(model.vocab_size, LookupDrafter())
                total: Counter[str] = Counter()
                for (prompt, plain), top in zip(outputs[name], scores[name], strict=True):
                    if mode.startswith("recycle"):
                        got = replay_recycle(prompt, plain, top, costs, k, policy, drafter, mode == "recycle-tree")
                    else:
                        got = replay(prompt, plain, costs, mode, k, policy)
                    total.update(got)
                result = {
                    "speedup": round(total["tokens"] / total["steps"], 3),
                    "acceptance": round(total["accepted"] / total["drafted"], 3) if total["drafted"] else 0.0,
                    "tokens_per_verify": round((total["accepted"] + total["verifies"]) / total["verifies"], 2)
                    if total["verifies"]
                    else 0.0,
                    **{key: int(total.get(key, 0)) for key in ("verifies", "wasted", "plain", "tokens", "trees")},
                }
                if overhead:  # plain decoding and the decoder, each with its own time outside the passes
                    o = overhead
                    loop = o["recycle" if mode.startswith("recycle") else "lookup"]
                    plain_time = total["tokens"] * (o["step"] + o["plain"] + o["token"])
                    spec_time = (
                        total["steps"] * o["step"]
                        + (total["verifies"] + total["plain"]) * loop
                        + total["tokens"] * o["token"]
                    )
                    result["with_overhead"] = round(plain_time / spec_time, 3)
                report[f"{table} / {mode} (k={k}) / {name}"] = result
                print(f"{table:12} {mode:8} k={k:<2} {name:8} {json.dumps(result)}")
                if args.analyse and mode == "policy":
                    found = analyse(outputs[name], costs, rows, k, total)
                    report[f"{table} / analysis (k={k}) / {name}"] = found
                    print(f"{table:12} analysis k={k:<2} {name:8} {json.dumps(found)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
