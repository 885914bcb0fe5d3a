#!/usr/bin/env python
"""Calibrate early exit and self-speculative drafting for a compiled Llama-family artifact.

    python tools/calibrate_exits.py smollm2.edgert --out exits/          # fit, search, sweep, store
    python tools/calibrate_exits.py smollm2.edgert --policies confidence --skip-search 0
    python tools/calibrate_exits.py w.edgert --sentences 12              # a Whisper decoder: adapters only

1. Runs the model layer by layer over a calibration text the project ships
   (tools/data/calibration.txt) and keeps every layer's hidden states.
2. Fits, per exit layer e, a tuned-lens adapter: ``h_e + h_e·W + b ≈ h_final`` by closed-form
   ridge regression on the first half of the tokens; reports the top-1 agreement of the exit
   head with the full model on the second half, with and without the adapter.
3. Searches greedily for the layers a speculative draft skips (teacher-forced agreement of the
   layer-skipping sub-model, scored by the expected tokens per unit of work).
4. Sweeps each exit policy's threshold with real early-exit decoding (copy-forward KV) along the
   full model's greedy continuations of the recipe's reference prompts: agreement with the full
   model, mean layers per token, measured speedup (median step time). Writes CSV and a PNG plot.
5. Stores the adapters (``exits.safetensors``), the exits, the draft skip set and each policy's
   calibrated point (the fastest threshold whose agreement reaches ``--target-agreement``) in the
   artifact's manifest.

A Whisper artifact gets stages 1, 2 and 5 (`calibrate_whisper`): sentences of the calibration
text spoken by espeak-ng, each transcribed greedily, then its decoder tokens run layer by layer
(teacher-forced) for the hidden states; adapters are fitted on the first half of the sentences
and their agreement measured on the rest. `edgert transcribe --exit ...` then applies them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgert.runtime.exits import (  # noqa: E402
    Confidence,
    EarlyExitDecoder,
    Entropy,
    ExitPolicy,
    Patience,
    StaticDepth,
    default_exits,
)
from edgert.runtime.layers import ADAPTERS_FILE, LayerStack  # noqa: E402
from edgert.runtime.tvm_runtime import to_numpy  # noqa: E402

CALIBRATION_TEXT = ROOT / "tools" / "data" / "calibration.txt"
GRIDS: dict[str, list[float]] = {
    "confidence": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
    "entropy": [2.0, 1.0, 0.5, 0.25, 0.1],
    "patience": [2, 3],
    "static": [],  # filled with the exits
}


def make_policy(name: str, value: float) -> ExitPolicy:
    """The policy ``name`` at threshold ``value``."""
    return (
        {"confidence": Confidence, "entropy": Entropy}[name](value)
        if name in ("confidence", "entropy")
        else (Patience(int(value)) if name == "patience" else StaticDepth(int(value)))
    )


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


def fit_adapter(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimizing ``|x + x·W + b - y|² + ridge·|W|²`` (closed form, float64)."""
    x64, target = x.astype(np.float64), (y - x).astype(np.float64)
    mean_x, mean_t = x64.mean(0), target.mean(0)
    xc, tc = x64 - mean_x, target - mean_t
    w = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ tc)
    b = mean_t - mean_x @ w
    return w.astype(np.float32), b.astype(np.float32)


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
    model: Any, ids: Sequence[int], reference: np.ndarray, rounds: int, k: int, head_layers: float, verify_cost: float
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
        print(f"  skip {sorted(skip)}: agreement {alpha:.3f}, expected speedup {gain:.2f}x", flush=True)
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


def sweep(
    model: Any, prompts: Sequence[str], steps: int, policies: dict[str, list[float]]
) -> tuple[list[dict[str, Any]], float]:
    """Agreement, mean layers and measured speedup of each policy point; and the full model's step time."""
    references, full_times = [], []
    for p in prompts:
        ref = [t.id for t in model.generate(p, max_tokens=steps, chat=True)]
        if len(ref) >= 2:
            references.append((p, ref))
    for p, ref in references:  # the full model's step time along the same tokens
        model.prefill(model.encode_prompt(p, chat=True))
        for t in ref[:-1]:
            start = time.perf_counter()
            model.step([t])
            full_times.append(time.perf_counter() - start)
    full = float(np.median(full_times))
    rows = []
    for name, grid in policies.items():
        for value in grid:
            decoder = EarlyExitDecoder(model, make_policy(name, value))
            hits = total = 0
            times: list[float] = []
            for p, ref in references:
                model.prefill(model.encode_prompt(p, chat=True))
                for t, nxt in itertools.pairwise(ref):
                    start = time.perf_counter()
                    top = int(np.argmax(decoder.step(t)))
                    times.append(time.perf_counter() - start)
                    hits += top == nxt
                    total += 1
            stats = decoder.stats
            row = {
                "policy": name,
                "threshold": value,
                "agreement": round(hits / max(total, 1), 4),
                "mean_layers": round(stats.mean_layers, 3),
                "exit_heads_per_token": round(stats.head_calls / max(len(stats.depths), 1), 3),
                "speedup": round(full / float(np.median(times)), 3),
                "tokens": total,
            }
            print(
                f"  {name}:{value:g}  agreement {row['agreement']:.3f}  layers {row['mean_layers']:.2f}  "
                f"speedup {row['speedup']:.2f}x",
                flush=True,
            )
            rows.append(row)
    return rows, full


def choose_points(rows: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """Per policy: the point with the fewest layers per token whose agreement reaches ``target``, else the most
    agreeing one. Layers, not the measured speedup, decide: they do not depend on the machine's load."""
    chosen = {}
    for name in sorted({r["policy"] for r in rows}):
        mine = [r for r in rows if r["policy"] == name]
        ok = [r for r in mine if r["agreement"] >= target]
        pick = (
            min(ok, key=lambda r: (r["mean_layers"] + r["exit_heads_per_token"], -r["speedup"]))
            if ok
            else max(mine, key=lambda r: r["agreement"])
        )
        chosen[name] = {
            **{k: pick[k] for k in ("threshold", "agreement", "mean_layers", "speedup")},
            "meets_target": bool(ok),
        }
    return chosen


def write_sweep(rows: list[dict], out: Path) -> None:
    """The sweep's rows as ``exit_sweep.csv`` and its picture as ``exit_sweep.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "exit_sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, out / "exit_sweep.png")


def write_plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Speedup against agreement, one line per policy, thresholds annotated (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["policy"] for r in rows}):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["agreement"])
        ax.plot([r["agreement"] for r in mine], [r["speedup"] for r in mine], "o-", label=name)
        for r in mine:
            ax.annotate(
                f"{r['threshold']:g}",
                (r["agreement"], r["speedup"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("top-1 agreement with the full model")
    ax.set_ylabel("decode speedup (median step time, full / policy)")
    ax.set_title("Early exit: speed against agreement")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def store(artifact_path: Path, exits: dict[str, Any], adapters: dict[str, np.ndarray]) -> None:
    """Rewrite the artifact with the adapters member and the ``exits`` manifest entry (atomically)."""
    from edgert.artifact.reader import open_artifact
    from edgert.artifact.tensorfile import write_tensors
    from edgert.artifact.writer import write_artifact

    art = open_artifact(artifact_path, check_host=False)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("format", "format_version", "files")}
    manifest["exits"] = exits
    with tempfile.TemporaryDirectory(dir=artifact_path.parent, prefix=f".{artifact_path.name}.cal.") as tmp:
        staged = {}
        for name in art.manifest["files"]:
            if name == ADAPTERS_FILE:
                continue
            (Path(tmp) / name).write_bytes(art.read_bytes(name))
            staged[name] = Path(tmp) / name
        with (Path(tmp) / ADAPTERS_FILE).open("wb") as fh:
            write_tensors(fh, adapters, {"format": "edgert-exits"})
        staged[ADAPTERS_FILE] = Path(tmp) / ADAPTERS_FILE
        write_artifact(artifact_path, manifest, staged, as_dir=artifact_path.is_dir())


def calibrate(
    artifact: Path,
    text: Path = CALIBRATION_TEXT,
    tokens: int = 512,
    exits: Sequence[int] | None = None,
    ridge: float = 1e-2,
    target_agreement: float = 0.9,
    policies: Sequence[str] = ("confidence", "entropy", "patience", "static"),
    prompts: int = 4,
    steps: int = 48,
    skip_rounds: int = 10,
    k: int = 4,
    out: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every calibration stage on ``artifact`` and store the result in it; return the ``exits`` entry."""
    import edgert
    from edgert.recipes import find_recipe

    model = edgert.load(artifact, threads=threads)
    n = int(model.artifact.manifest["model"]["num_layers"])
    exits = sorted(set(exits or default_exits(n)))
    ids = model.tokenizer.encode(text.read_text())[:tokens]
    print(f"calibration text: {len(ids)} tokens; exits {exits}", flush=True)
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
        print(f"  exit {e}: agreement with the full model {raw:.3f} raw, {tuned:.3f} with the adapter", flush=True)
    result: dict[str, Any] = {
        "layers": exits,
        "adapters": ADAPTERS_FILE,
        "calibration": {"text": text.name, "tokens": len(ids), "ridge": ridge, "held_out_agreement": lens},
    }
    if skip_rounds > 0:
        verify_cost = measure_verify_cost(model, k)
        head = head_cost_in_layers(model)
        print(f"draft search: verify of {k + 1} tokens costs {verify_cost:.2f} steps, the head {head:.1f} layers")
        skip, trace = search_skip(model, ids[:128], full_top, skip_rounds, k, head, verify_cost)
        result["draft_skip"] = skip
        result["draft_search"] = {
            "k": k,
            "verify_cost": round(verify_cost, 3),
            "head_layers": round(head, 2),
            "trace": trace,
        }
    store(Path(artifact), {**result, "policies": {}}, adapters)  # the sweep below reads the adapters
    model = edgert.load(artifact, threads=threads)
    grids = {p: (list(exits) if p == "static" else GRIDS[p]) for p in policies}
    recipe = find_recipe(model.artifact.manifest.get("name", ""))
    reference = list((recipe.run if recipe else {}).get("reference_prompts", [])) or ["Tell me about rivers."]
    print(f"sweep over {min(prompts, len(reference))} prompts x {steps} tokens", flush=True)
    rows, full_step = sweep(model, reference[:prompts], steps, grids)
    result["policies"] = choose_points(rows, target_agreement)
    result["target_agreement"] = target_agreement
    result["sweep"] = {
        "prompts": min(prompts, len(reference)),
        "tokens": steps,
        "full_step_ms": round(full_step * 1e3, 3),
    }
    if out is not None:
        write_sweep(rows, out)
        (out / "exits.json").write_text(json.dumps(result, indent=2))
    store(Path(artifact), result, adapters)
    return result


def calibration_sentences(text: Path, count: int) -> list[str]:
    """The first ``count`` sentences of 6 to 30 words of the calibration text."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.read_text().split()))
    return [x for x in sentences if 6 <= len(x.split()) <= 30][:count]


def speak(sentence: str, path: Path) -> Path:
    """``sentence`` spoken by espeak-ng (American English, 130 words a minute) into a WAV file."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is missing: apt-get install espeak-ng (tools/setup.sh --test does)")
    subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), sentence], check=True, capture_output=True)
    return path


def whisper_hidden_states(transcriber: Any, layers: Any, wav: Path) -> tuple[np.ndarray, np.ndarray]:
    """Greedy transcript of ``wav``, then every decoder layer's output over its tokens (teacher-forced):
    states [L+1, T, d] and the full decoder's top tokens [T] (raw logits, before Whisper's rules)."""
    audio = transcriber.load_audio(wav)
    cross = transcriber.encode(transcriber.features(audio.samples))
    hyp, _ = transcriber.decode_window(cross)
    tokens = [transcriber.config["sot"], *hyp.tokens]
    model = transcriber.model
    model.cache.reset()
    seq = model.cache.add()
    h = layers.embed(seq, tokens)
    model.cache.begin([seq], [len(tokens)])
    per_layer = [to_numpy(h)[0]]
    for i in range(layers.num_layers):
        h = layers.run(h, cross, [i])
        per_layer.append(to_numpy(h)[0])
    top = np.argmax(layers.head(h), axis=-1)
    model.cache.end()
    model.cache.reset()
    return np.stack(per_layer), top


def whisper_exit_tops(layers: Any, h: np.ndarray, adapter: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Top tokens of the decoder's exit head on hidden states [T, d] (through ``adapter`` when given)."""
    if adapter is not None:
        h = h + h @ adapter[0] + adapter[1]
    tensor = layers.model.session.tensor
    out = [np.argmax(layers.head(tensor(np.ascontiguousarray(h[None, s : s + 64], np.float32))), axis=-1)
           for s in range(0, len(h), 64)]  # fmt: skip
    return np.concatenate(out)


def calibrate_whisper(
    artifact: Path,
    text: Path = CALIBRATION_TEXT,
    sentences: int = 12,
    exits: Sequence[int] | None = None,
    ridge: float = 1e-2,
    out: Path | None = None,
    threads: int | None = None,
    policies: Sequence[str] = ("confidence", "entropy", "static"),
    target_agreement: float = 0.9,
) -> dict[str, Any]:
    """Fit tuned-lens adapters for a Whisper decoder's exits and store them in ``artifact``; return the ``exits`` entry.

    The held-out agreement is the top-1 agreement of each exit head with the full decoder on the
    tokens of the sentences not used for fitting (the second half). With ``policies``, each one's
    grid is swept by real early-exit decoding of those sentences and its calibrated point stored.
    """
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.seq2seq_speculative import DecoderLayers

    transcriber = Transcriber(artifact, threads=threads)
    layers = DecoderLayers(transcriber.model)
    layers.adapters = {}  # calibrate the plain exit heads, whatever an earlier calibration stored
    n = layers.num_layers
    exits = sorted(set(exits or range(1, n)))
    if any(not 0 < e < n for e in exits):
        raise SystemExit(f"exits must lie in 1..{n - 1} for this {n}-layer decoder")
    texts = calibration_sentences(text, sentences)
    if len(texts) < 2:
        raise SystemExit(f"{text}: fewer than 2 usable sentences")
    runs, wavs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(texts):
            wavs.append(transcriber.load_audio(speak(sentence, Path(tmp) / f"{i}.wav")))
            runs.append(whisper_hidden_states(transcriber, layers, wavs[-1]))
    half = len(runs) // 2
    fit_states = np.concatenate([r[0] for r in runs[:half]], axis=1)
    test_states = np.concatenate([r[0] for r in runs[half:]], axis=1)
    test_top = np.concatenate([r[1] for r in runs[half:]])
    print(f"calibration audio: {len(texts)} espeak-ng sentences, {fit_states.shape[1]} tokens to fit, "
          f"{test_states.shape[1]} held out; exits {exits}", flush=True)  # fmt: skip
    adapters: dict[str, np.ndarray] = {}
    lens = {}
    for e in exits:
        w, b = fit_adapter(fit_states[e], fit_states[n], ridge)
        adapters[f"exit.{e}.weight"], adapters[f"exit.{e}.bias"] = w, b
        raw = float(np.mean(whisper_exit_tops(layers, test_states[e], None) == test_top))
        tuned = float(np.mean(whisper_exit_tops(layers, test_states[e], (w, b)) == test_top))
        lens[str(e)] = {"raw_agreement": round(raw, 4), "tuned_agreement": round(tuned, 4)}
        print(f"  exit {e}: agreement with the full decoder {raw:.3f} raw, {tuned:.3f} with the adapter", flush=True)
    result: dict[str, Any] = {
        "layers": exits,
        "adapters": ADAPTERS_FILE,
        "calibration": {
            "audio": "espeak-ng en-us",
            "text": text.name,
            "sentences": len(texts),
            "fit_tokens": int(fit_states.shape[1]),
            "held_out_tokens": int(test_states.shape[1]),
            "ridge": ridge,
            "held_out_agreement": lens,
        },
        "policies": {},
    }
    del transcriber, layers  # the artifact is rewritten below
    store(Path(artifact), result, adapters)  # the sweep decodes through the stored adapters
    if policies:
        grids = {p: (list(exits) if p == "static" else GRIDS[p]) for p in policies}
        print(f"sweep over the {len(wavs) - half} held-out sentences", flush=True)
        rows = whisper_sweep(artifact, wavs[half:], grids, threads)
        result["policies"] = choose_points(rows, target_agreement)
        result["target_agreement"] = target_agreement
        if out is not None:
            write_sweep(rows, out)
        store(Path(artifact), result, adapters)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "exits.json").write_text(json.dumps(result, indent=2))
    return result


def whisper_sweep(artifact: Path, audios: Sequence[Any], grids: dict[str, list[float]], threads: int | None) -> list:
    """Each policy point's greedy transcripts against the full decoder's: agreement (tokens equal position by
    position, over the full transcript's length), mean layers per token, and decoder speedup (time per token)."""
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.exits import parse_exit_policy
    from edgert.runtime.seq2seq_speculative import EarlyExitSeq2Seq

    transcriber = Transcriber(artifact, threads=threads)
    windows = [transcriber.encode(transcriber.features(a.samples)) for a in audios]

    def decode(decoder: Any) -> tuple[list[list[int]], float]:
        started = time.perf_counter()
        transcriber.early_exit = decoder
        tokens = [transcriber.decode_window(cross)[0].tokens for cross in windows]
        transcriber.early_exit = None
        return tokens, time.perf_counter() - started

    reference, full_time = decode(None)
    per_token = full_time / max(sum(len(t) + 1 for t in reference), 1)
    rows = []
    for name, grid in grids.items():
        for value in grid:
            decoder = EarlyExitSeq2Seq(transcriber.model, parse_exit_policy(f"{name}:{value:g}", transcriber.model))
            tokens, seconds = decode(decoder)
            pairs = zip(reference, tokens, strict=True)
            hits = sum(a == b for ref, got in pairs for a, b in zip(ref, got, strict=False))
            total = sum(len(ref) for ref in reference)
            row = {
                "policy": name,
                "threshold": value,
                "agreement": round(hits / max(total, 1), 4),
                "mean_layers": round(decoder.mean_layers, 3),
                # an exit head runs at every exit point up to the depth the token left at
                "exit_heads_per_token": round(
                    float(np.mean([sum(e <= d for e in decoder.exit_points) for d in decoder.depths] or [0])), 3
                ),
                "speedup": round(per_token / (seconds / max(len(decoder.depths), 1)), 3),
                "tokens": total,
            }
            print(f"  {name}:{value:g}  agreement {row['agreement']:.3f}  layers {row['mean_layers']:.2f}  "
                  f"speedup {row['speedup']:.2f}x", flush=True)  # fmt: skip
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="a Llama-family or Whisper .edgert (rewritten in place)")
    parser.add_argument("--text", type=Path, default=CALIBRATION_TEXT, help="calibration text")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens to use")
    parser.add_argument("--exits", type=lambda s: [int(x) for x in s.split(",")], help="exit layers, e.g. 15,20,25")
    parser.add_argument("--ridge", type=float, default=1e-2, help="ridge strength (relative to the token count)")
    parser.add_argument("--target-agreement", type=float, default=0.9, help="agreement a calibrated point must reach")
    parser.add_argument(
        "--policies", type=lambda s: s.split(","), default=["confidence", "entropy", "patience", "static"]
    )
    parser.add_argument("--prompts", type=int, default=4, help="reference prompts in the sweep")
    parser.add_argument("--steps", type=int, default=48, help="tokens per prompt in the sweep")
    parser.add_argument("--skip-search", type=int, default=10, help="greedy rounds of the draft skip search (0: none)")
    parser.add_argument("-k", type=int, default=4, help="draft length the skip search optimizes for")
    parser.add_argument("--out", type=Path, help="folder for exit_sweep.csv, exit_sweep.png and exits.json")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--sentences", type=int, default=12, help="Whisper: calibration sentences spoken by espeak-ng")
    args = parser.parse_args(argv)
    from edgert.artifact.reader import open_artifact

    if open_artifact(args.artifact, check_host=False).family == "whisper":
        policies = [p for p in args.policies if p != "patience"]  # 4 layers: patience cannot save any
        result = calibrate_whisper(
            args.artifact, args.text, args.sentences, args.exits, args.ridge, args.out, args.threads, policies,
            args.target_agreement,
        )  # fmt: skip
        print(json.dumps({**result["calibration"]["held_out_agreement"], **result["policies"]}, indent=2))
        return 0
    result = calibrate(
        args.artifact,
        args.text,
        args.tokens,
        args.exits,
        args.ridge,
        args.target_agreement,
        args.policies,
        args.prompts,
        args.steps,
        args.skip_search,
        args.k,
        args.out,
        args.threads,
    )
    print(json.dumps(result["policies"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
