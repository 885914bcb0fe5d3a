"""Early-exit calibration of a Llama-family artifact (`edgert calibrate`; registry ``calibrate``).

1. Runs the model layer by layer over the calibration text and keeps every layer's hidden states.
2. Fits, per exit layer e, a tuned-lens adapter: ``h_e + h_e·W + b ≈ h_final`` by closed-form
   ridge regression on the first half of the tokens; reports the top-1 agreement of the exit
   head with the full model on the second half, with and without the adapter.
3. Searches greedily for the layers a speculative draft skips (teacher-forced agreement of the
   layer-skipping sub-model, scored by the expected tokens per unit of work).
4. Fits a state probe per exit (logistic regression on the exit's hidden state: does the exit
   head's top token equal the full model's?) on the calibration text and on the full model's
   replies to the reference prompts the sweep leaves out.
5. Sweeps each exit policy's threshold with real early-exit decoding (copy-forward KV) along the
   full model's greedy continuations of the recipe's reference prompts: agreement with the full
   model, mean layers per token, measured speedup (median step time, each policy step beside a
   full step on the same token) and the speedup a cost model of the step's pieces expects.
   Writes CSV and a PNG plot.
6. Stores the adapters and probes (``exits.safetensors``), the exits, the draft skip set and each
   policy's calibrated point (the fastest threshold whose agreement reaches ``target_agreement``)
   in the artifact's manifest. Only points faster than the full model (measured and expected)
   are candidates: a policy without one is not stored, and the log says so.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgert.families.shared.calibration import (
    CALIBRATION_TEXT,
    Log,
    choose_points,
    fit_adapter,
    fit_probe,
    grids_for,
    make_policy,
    say,
    store,
    write_sweep,
)
from edgert.runtime.exits import EarlyExitDecoder, default_exits, probe_features
from edgert.runtime.layers import ADAPTERS_FILE, LayerStack, load_adapters, load_probes
from edgert.runtime.tvm_runtime import to_numpy


def hidden_states(model: Any, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's output over ``ids`` from an empty cache: states [L+1, T, d] and the full model's top tokens [T]."""
    stack = LayerStack(model.session, model.cache, {})
    model.reset()
    states, top = [], []
    for s in range(0, len(ids), model.prefill_chunk):
        chunk = list(ids[s : s + model.prefill_chunk])
        model.cache.begin(len(chunk))
        h = stack.embed(chunk)
        per_layer = [to_numpy(h)[0]]
        for i in range(stack.num_layers):
            h = stack.run(h, [i])
            per_layer.append(to_numpy(h)[0])
        top.append(np.argmax(stack.logits(h), axis=-1))
        model.cache.end(len(chunk))
        states.append(np.stack(per_layer))
    model.reset()
    return np.concatenate(states, axis=1), np.concatenate(top)


def exit_tops(model: Any, h: np.ndarray, adapter: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Top tokens of the exit head on hidden states [T, d] (through ``adapter`` when given)."""
    stack = LayerStack(model.session, model.cache, {})
    if adapter is not None:
        h = h + h @ adapter[0] + adapter[1]
    out = []
    for s in range(0, len(h), 64):
        t = model.session.tensor(np.ascontiguousarray(h[None, s : s + 64], dtype=np.float32))
        out.append(np.argmax(stack.logits(t), axis=-1))
    return np.concatenate(out)


def draft_agreement(model: Any, ids: Sequence[int], skip: set[int], reference: np.ndarray) -> float:
    """Teacher-forced top-1 agreement of the sub-model without ``skip`` with the full model over ``ids``."""
    stack = LayerStack(model.session, model.cache, {})
    model.reset()
    model.cache.begin(len(ids))
    h = stack.run(stack.embed(list(ids)), [i for i in range(stack.num_layers) if i not in skip])
    tops = np.argmax(stack.logits(h), axis=-1)
    model.cache.end(len(ids))
    model.reset()
    return float(np.mean(tops == reference[: len(ids)]))


def expected_speedup(alpha: float, k: int, draft_cost: float, verify_cost: float) -> float:
    """Tokens per full-step-equivalent of a k-draft round with per-token acceptance ``alpha`` (Leviathan et al.)."""
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return tokens / (k * draft_cost + verify_cost)


def search_skip(
    model: Any,
    ids: Sequence[int],
    reference: np.ndarray,
    rounds: int,
    k: int,
    head_layers: float,
    verify_cost: float,
    log: Log = say,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy search for the skip set with the best expected speculative speedup; the set and the trace."""
    n = int(model.artifact.manifest["model"]["num_layers"])
    skip: set[int] = set()
    best: tuple[float, list[int]] = (0.0, [])
    trace = []
    for _ in range(rounds):
        scored = []
        for layer in range(1, n - 1):  # the first and last layers are never skipped
            if layer not in skip:
                scored.append((draft_agreement(model, ids, skip | {layer}, reference), layer))
        if not scored:
            break
        alpha, layer = max(scored)
        skip.add(layer)
        cost = (n - len(skip) + head_layers) / (n + head_layers)
        gain = expected_speedup(alpha, k, cost, verify_cost)
        trace.append({"skip": sorted(skip), "agreement": round(alpha, 4), "expected_speedup": round(gain, 3)})
        log(f"  skip {sorted(skip)}: agreement {alpha:.3f}, expected speedup {gain:.2f}x")
        if gain > best[0]:
            best = (gain, sorted(skip))
    return best[1], trace


def measure_verify_cost(model: Any, k: int, repeats: int = 7) -> float:
    """Median time of a (k+1)-token verify pass over a one-token decode step."""
    model.reset()
    model.prefill(model.tokenizer.encode("Measuring the cost of a verify pass."))

    def median(n: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.step([42] * n, all_logits=n > 1)
            times.append(time.perf_counter() - t)
            model.rollback(n)
        return float(np.median(times))

    return median(k + 1) / median(1)


def head_cost_in_layers(model: Any) -> float:
    """The LM head's weight bytes over one layer's (what an exit check costs, in layers)."""
    weights = model.artifact.weights()
    head = sum(a.nbytes for n, a in weights.items() if n.startswith("lm_head."))
    layer = sum(a.nbytes for n, a in weights.items() if n.startswith("layers.0."))
    return head / layer if layer else 0.0


def measure_costs(model: Any, repeats: int = 10) -> dict[str, float]:
    """Median seconds of a full decode step and of the pieces of a layer-wise one (per layer, per filled
    layer, the exit head, the embedding), timed in turn so that a busy machine slows them alike."""
    stack = LayerStack(model.session, model.cache, load_adapters(model.session))
    n = stack.num_layers
    first = default_exits(n)[0] if default_exits(n) else n // 2
    model.reset()
    model.prefill(model.tokenizer.encode("Measuring the cost of the pieces of a decode step."))

    def full() -> None:
        model.step([42])
        model.rollback(1)

    def pieces(layers: range, fills: range, head: int | None = None) -> None:
        model.cache.begin(1)
        h = stack.embed([42])
        h = stack.run(h, layers)
        stack.fill(h, fills)
        if head is not None:
            stack.logits(h, head)
        model.cache.end(1)
        model.cache.rollback(1)

    cases = {
        "full": full,
        "embed": lambda: pieces(range(0), range(0)),
        "layers": lambda: pieces(range(n), range(0)),
        "fills": lambda: pieces(range(0), range(first, n)),
        "head": lambda: pieces(range(0), range(0), n),
        "exit_head": lambda: pieces(range(0), range(0), first),  # through the exit's adapter, if any
        "layerwise": lambda: pieces(range(n), range(0), n),  # the whole model in pieces: as long as a step
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    model.reset()
    return {
        "full": med["full"],
        "embed": med["embed"],
        "layer": max(med["layers"] - med["embed"], 0.0) / n,
        "fill": max(med["fills"] - med["embed"], 0.0) / max(n - first, 1),
        "head": max(med["head"] - med["embed"], 0.0),
        "exit_head": max(med["exit_head"] - med["embed"], 0.0),
        "layerwise": med["layerwise"],
    }


def expected_speedup_of(costs: dict[str, float], num_layers: int, depths: Sequence[int], exit_heads: int) -> float:
    """The full step's time over the cost model's time of a policy's step: layers run, layers filled by
    copy-forward, exit heads (plus the final head of the tokens that ran the whole stack). Host work of a
    policy's check (a softmax, a probe's dot product) is not in it: the measured speedup has it.

    The pieces give the shares; the scale comes from the whole model run in pieces against a decode
    step, two calls of the same length (on a busy machine a long call is preempted more often than a
    short one, so sums of short pieces come out too small)."""
    if not depths:
        return 0.0
    d = np.asarray(depths, dtype=np.float64)
    policy = (
        len(d) * costs["embed"]
        + d.sum() * costs["layer"]
        + (num_layers - d).sum() * costs["fill"]
        + exit_heads * costs["exit_head"]
        + int(np.sum(d >= num_layers)) * costs["head"]
    )
    whole = len(d) * (costs["embed"] + num_layers * costs["layer"] + costs["head"])
    if policy <= 0 or costs["layerwise"] <= 0:
        return 0.0
    return costs["full"] / costs["layerwise"] * whole / policy


def sweep(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    policies: dict[str, list[float]],
    log: Log = say,
    costs: dict[str, float] | None = None,
    probes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Agreement, mean layers, expected (``costs``) and measured speedup of each policy point; and the full
    model's step time. Each policy step is timed right after a full step on the same token (rolled back), so
    a busy machine slows both alike."""
    references = []
    for p in prompts:
        ref = [t.id for t in model.generate(p, max_tokens=steps, chat=True)]
        if len(ref) >= 2:
            references.append((p, ref))
    rows, all_full = [], []
    n = int(model.artifact.manifest["model"]["num_layers"])
    for name, grid in policies.items():
        for value in grid:
            decoder = EarlyExitDecoder(model, make_policy(name, value, probes))
            hits = total = 0
            times: list[float] = []
            full_times: list[float] = []
            for p, ref in references:
                model.prefill(model.encode_prompt(p, chat=True))
                for t, nxt in itertools.pairwise(ref):
                    start = time.perf_counter()
                    model.step([t])
                    full_times.append(time.perf_counter() - start)
                    model.rollback(1)
                    start = time.perf_counter()
                    top = int(np.argmax(decoder.step(t)))
                    times.append(time.perf_counter() - start)
                    hits += top == nxt
                    total += 1
            stats = decoder.stats
            all_full += full_times
            row = {
                "policy": name,
                "threshold": value,
                "agreement": round(hits / max(total, 1), 4),
                "mean_layers": round(stats.mean_layers, 3),
                "exit_heads_per_token": round(stats.head_calls / max(len(stats.depths), 1), 3),
                "speedup": round(float(np.median(full_times)) / float(np.median(times)), 3) if times else 0.0,
                "expected_speedup": round(expected_speedup_of(costs, n, stats.depths, stats.head_calls), 3)
                if costs
                else 0.0,
                "tokens": total,
            }
            log(
                f"  {name}:{value:g}  agreement {row['agreement']:.3f}  layers {row['mean_layers']:.2f}  "
                f"speedup {row['speedup']:.2f}x measured, {row['expected_speedup']:.2f}x expected"
            )
            rows.append(row)
    return rows, float(np.median(all_full)) if all_full else 0.0


def probe_data(
    model: Any, text_states: tuple[np.ndarray, np.ndarray], prompts: Sequence[str], steps: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every layer's states and the full model's top tokens over the calibration text (``text_states``) and
    over the chat ``prompts`` with the full model's greedy replies (what a state probe learns from)."""
    runs = [text_states]
    for p in prompts:
        reply = [t.id for t in model.generate(p, max_tokens=steps, chat=True)]
        runs.append(hidden_states(model, model.encode_prompt(p, chat=True) + reply))
    states = np.concatenate([r[0] for r in runs], axis=1)
    top = np.concatenate([r[1] for r in runs])
    return states, top, len(top)


def calibrate(
    artifact: Path,
    text: Path = CALIBRATION_TEXT,
    tokens: int = 512,
    exits: Sequence[int] | None = None,
    ridge: float = 1e-2,
    target_agreement: float = 0.9,
    policies: Sequence[str] = ("confidence", "entropy", "patience", "state", "static"),
    prompts: int = 4,
    steps: int = 48,
    skip_rounds: int = 10,
    k: int = 4,
    out: Path | None = None,
    threads: int | None = None,
    log: Log = say,
) -> dict[str, Any]:
    """Run every calibration stage on ``artifact`` and store the result in it; return the ``exits`` entry."""
    from edgert.families.registry import load
    from edgert.recipes import find_recipe

    artifact, text = Path(artifact), Path(text)
    model = load(artifact, threads=threads)
    n = int(model.artifact.manifest["model"]["num_layers"])
    exits = sorted(set(exits or default_exits(n)))
    ids = model.tokenizer.encode(text.read_text())[:tokens]
    log(f"calibration text: {len(ids)} tokens; exits {exits}")
    states, full_top = hidden_states(model, ids)
    half = len(ids) // 2
    adapters: dict[str, np.ndarray] = {}
    lens = {}
    for e in exits:
        w, b = fit_adapter(states[e, :half], states[n, :half], ridge)
        adapters[f"exit.{e}.weight"], adapters[f"exit.{e}.bias"] = w, b
        raw = float(np.mean(exit_tops(model, states[e, half:], None) == full_top[half:]))
        tuned = float(np.mean(exit_tops(model, states[e, half:], (w, b)) == full_top[half:]))
        lens[str(e)] = {"raw_agreement": round(raw, 4), "tuned_agreement": round(tuned, 4)}
        log(f"  exit {e}: agreement with the full model {raw:.3f} raw, {tuned:.3f} with the adapter")
    result: dict[str, Any] = {
        "layers": exits,
        "adapters": ADAPTERS_FILE,
        "calibration": {"text": text.name, "tokens": len(ids), "ridge": ridge, "held_out_agreement": lens},
    }
    if skip_rounds > 0:
        verify_cost = measure_verify_cost(model, k)
        head = head_cost_in_layers(model)
        log(f"draft search: verify of {k + 1} tokens costs {verify_cost:.2f} steps, the head {head:.1f} layers")
        skip, trace = search_skip(model, ids[:128], full_top, skip_rounds, k, head, verify_cost, log)
        result["draft_skip"] = skip
        result["draft_search"] = {
            "k": k,
            "verify_cost": round(verify_cost, 3),
            "head_layers": round(head, 2),
            "trace": trace,
        }
    recipe = find_recipe(model.artifact.manifest.get("name", ""))
    reference = list((recipe.run if recipe else {}).get("reference_prompts", [])) or ["Tell me about rivers."]
    if "state" in policies:
        # The probes learn from the text and from replies to the prompts the sweep does not decode.
        states, top, count = probe_data(model, (states, full_top), reference[prompts : prompts + 4], steps)
        held = {}
        for e in exits:
            w, b = adapters[f"exit.{e}.weight"], adapters[f"exit.{e}.bias"]
            # Labels from an adapter that did not see the token: the first half of the text through one
            # fitted on the second (cross-fitting), the rest through the stored one. On the tokens it was
            # fitted on, an adapter agrees far more often than it will when decoding.
            cross = fit_adapter(states[e, half : len(ids)], states[n, half : len(ids)], ridge)
            labels = np.concatenate(
                [
                    exit_tops(model, states[e, :half], cross) == top[:half],
                    exit_tops(model, states[e, half:], (w, b)) == top[half:],
                ]
            )
            pw, pb, info = fit_probe(probe_features(states[e]), labels)
            adapters[f"probe.{e}.weight"], adapters[f"probe.{e}.bias"] = pw, pb
            held[str(e)] = info
            log(
                f"  state probe at exit {e}: {info['base_rate']:.3f} of {count} tokens agree; held-out accuracy "
                f"{info.get('held_out_accuracy', float('nan')):.3f}"
            )
        result["probes"] = {"layers": exits, "tokens": count, "held_out": held}
        del states
    store(artifact, {**result, "policies": {}}, adapters)  # the sweep below reads the adapters and probes
    model = load(artifact, threads=threads)
    costs = measure_costs(model)
    log(
        "step costs (ms): full {full:.3f}, in pieces {layerwise:.3f}; layer {layer:.3f}, filled layer {fill:.3f}, "
        "head {head:.3f}, exit head {exit_head:.3f}".format(**{k: v * 1e3 for k, v in costs.items()})
    )
    log(f"sweep over {min(prompts, len(reference))} prompts x {steps} tokens")
    rows, full_step = sweep(
        model, reference[:prompts], steps, grids_for(policies, exits), log, costs, load_probes(model.session)
    )
    result["policies"] = choose_points(rows, target_agreement, refuse_slower=True, log=log)
    result["refused"] = sorted({r["policy"] for r in rows} - set(result["policies"]))
    result["target_agreement"] = target_agreement
    result["sweep"] = {
        "prompts": min(prompts, len(reference)),
        "tokens": steps,
        "full_step_ms": round(full_step * 1e3, 3),
        "costs_ms": {k: round(v * 1e3, 4) for k, v in costs.items()},
    }
    if out is not None:
        out = Path(out)
        write_sweep(rows, out)
        (out / "exits.json").write_text(json.dumps(result, indent=2))
    store(artifact, result, adapters)
    return result
