"""Early-exit calibration of a Whisper decoder (`edgert calibrate`; registry ``calibrate``).

Sentences of the calibration text spoken by espeak-ng, each transcribed greedily, then its decoder
tokens run layer by layer (teacher-forced) for the hidden states; tuned-lens adapters are fitted on
the first half of the sentences and their agreement measured on the rest. Each policy's grid is
then swept by real early-exit decoding of the held-out sentences and its calibrated point stored,
where one is faster than the full decoder. State probes (`--exit state`) are fitted on every
sentence (labels through cross-fitted adapters). `edgert transcribe --exit ...` applies them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.families.shared.calibration import (
    CALIBRATION_TEXT,
    Log,
    calibration_sentences,
    choose_points,
    fit_adapter,
    fit_probe,
    grids_for,
    say,
    store,
    write_sweep,
)
from edgert.runtime.exits import probe_features
from edgert.runtime.layers import ADAPTERS_FILE
from edgert.runtime.tvm_runtime import to_numpy


def speak(sentence: str, path: Path) -> Path:
    """``sentence`` spoken by espeak-ng (American English, 130 words a minute) into a WAV file."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise EdgertError("espeak-ng is missing: apt-get install espeak-ng (tools/setup.sh --test does)")
    subprocess.run([espeak, "-v", "en-us", "-s", "130", "-w", str(path), sentence], check=True, capture_output=True)
    return path


def hidden_states(transcriber: Any, layers: Any, wav: Any) -> tuple[np.ndarray, np.ndarray]:
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


def exit_tops(layers: Any, h: np.ndarray, adapter: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Top tokens of the decoder's exit head on hidden states [T, d] (through ``adapter`` when given)."""
    if adapter is not None:
        h = h + h @ adapter[0] + adapter[1]
    tensor = layers.model.session.tensor
    out = [np.argmax(layers.head(tensor(np.ascontiguousarray(h[None, s : s + 64], np.float32))), axis=-1)
           for s in range(0, len(h), 64)]  # fmt: skip
    return np.concatenate(out)


def calibrate(
    artifact: Path,
    text: Path = CALIBRATION_TEXT,
    sentences: int = 12,
    exits: Sequence[int] | None = None,
    ridge: float = 1e-2,
    out: Path | None = None,
    threads: int | None = None,
    policies: Sequence[str] = ("confidence", "entropy", "state", "static"),
    target_agreement: float = 0.9,
    log: Log = say,
) -> dict[str, Any]:
    """Fit tuned-lens adapters for a Whisper decoder's exits and store them in ``artifact``; return the ``exits`` entry.

    The held-out agreement is the top-1 agreement of each exit head with the full decoder on the
    tokens of the sentences not used for fitting (the second half). With ``policies``, each one's
    grid is swept by real early-exit decoding of those sentences and its calibrated point stored
    (``patience`` is left out: over Whisper tiny's 4 layers it cannot save any).
    """
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.seq2seq_speculative import DecoderLayers

    artifact, text = Path(artifact), Path(text)
    policies = [p for p in policies if p != "patience"]
    transcriber = Transcriber(artifact, threads=threads)
    layers = DecoderLayers(transcriber.model)
    layers.adapters = {}  # calibrate the plain exit heads, whatever an earlier calibration stored
    n = layers.num_layers
    exits = sorted(set(exits or range(1, n)))
    if any(not 0 < e < n for e in exits):
        raise EdgertError(f"exits must lie in 1..{n - 1} for this {n}-layer decoder")
    texts = calibration_sentences(text, sentences)
    if len(texts) < 2:
        raise EdgertError(f"{text}: fewer than 2 usable sentences")
    runs, wavs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(texts):
            wavs.append(transcriber.load_audio(speak(sentence, Path(tmp) / f"{i}.wav")))
            runs.append(hidden_states(transcriber, layers, wavs[-1]))
    half = len(runs) // 2
    fit_states = np.concatenate([r[0] for r in runs[:half]], axis=1)
    test_states = np.concatenate([r[0] for r in runs[half:]], axis=1)
    test_top = np.concatenate([r[1] for r in runs[half:]])
    log(f"calibration audio: {len(texts)} espeak-ng sentences, {fit_states.shape[1]} tokens to fit, "
        f"{test_states.shape[1]} held out; exits {exits}")  # fmt: skip
    adapters: dict[str, np.ndarray] = {}
    lens = {}
    for e in exits:
        w, b = fit_adapter(fit_states[e], fit_states[n], ridge)
        adapters[f"exit.{e}.weight"], adapters[f"exit.{e}.bias"] = w, b
        raw = float(np.mean(exit_tops(layers, test_states[e], None) == test_top))
        tuned = float(np.mean(exit_tops(layers, test_states[e], (w, b)) == test_top))
        lens[str(e)] = {"raw_agreement": round(raw, 4), "tuned_agreement": round(tuned, 4)}
        log(f"  exit {e}: agreement with the full decoder {raw:.3f} raw, {tuned:.3f} with the adapter")
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
    if "state" in policies:  # a state probe per exit, on every sentence's tokens
        fit_top = np.concatenate([r[1] for r in runs[:half]])
        held = {}
        for e in exits:
            adapter = adapters[f"exit.{e}.weight"], adapters[f"exit.{e}.bias"]
            # Labels from an adapter that did not see the token (cross-fitting): the first half through one
            # fitted on the second, the second through the stored one.
            cross = fit_adapter(test_states[e], test_states[n], ridge)
            labels = np.concatenate(
                [
                    exit_tops(layers, fit_states[e], cross) == fit_top,
                    exit_tops(layers, test_states[e], adapter) == test_top,
                ]
            )
            features = probe_features(np.concatenate([fit_states[e], test_states[e]]))
            pw, pb, info = fit_probe(features, labels)
            adapters[f"probe.{e}.weight"], adapters[f"probe.{e}.bias"] = pw, pb
            held[str(e)] = info
            log(f"  state probe at exit {e}: {info['base_rate']:.3f} of {len(labels)} tokens agree; held-out "
                f"accuracy {info.get('held_out_accuracy', float('nan')):.3f}")  # fmt: skip
        result["probes"] = {"layers": exits, "tokens": len(fit_top) + len(test_top), "held_out": held}
    del transcriber, layers  # the artifact is rewritten below
    store(artifact, result, adapters)  # the sweep decodes through the stored adapters
    if policies:
        log(f"sweep over the {len(wavs) - half} held-out sentences")
        rows = sweep(artifact, wavs[half:], grids_for(policies, exits), threads, log)
        result["policies"] = choose_points(rows, target_agreement, refuse_slower=True, log=log)
        result["refused"] = sorted({r["policy"] for r in rows} - set(result["policies"]))
        result["target_agreement"] = target_agreement
        if out is not None:
            write_sweep(rows, Path(out))
        store(artifact, result, adapters)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "exits.json").write_text(json.dumps(result, indent=2))
    return result


def sweep(
    artifact: Path, audios: Sequence[Any], grids: dict[str, list[float]], threads: int | None, log: Log = say
) -> list[dict[str, Any]]:
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
            log(f"  {name}:{value:g}  agreement {row['agreement']:.3f}  layers {row['mean_layers']:.2f}  "
                f"speedup {row['speedup']:.2f}x")  # fmt: skip
            rows.append(row)
    return rows
