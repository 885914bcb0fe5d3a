"""`edgert calibrate`: fit early-exit adapters, the draft skip set and each exit policy's threshold, and
store them in the artifact (`edgert.profile.calibrate`; `tools/calibrate_exits.py` is the same)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgert.cli.common import AllowUnsignedOpt, ArtifactArg, ThreadsOpt, note


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def calibrate(
    artifact: ArtifactArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for exit_sweep.csv, exit_sweep.png and exits.json.")
    ] = None,
    target_agreement: Annotated[
        float | None, typer.Option("--target-agreement", help="Agreement a calibrated point must reach (0.9).")
    ] = None,
    sentences: Annotated[
        int | None, typer.Option("--sentences", help="Whisper: calibration sentences spoken by espeak-ng (12).")
    ] = None,
    text: Annotated[
        Path | None, typer.Option("--text", help="Calibration text (default: the one edgert ships).")
    ] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="LLMs: calibration tokens to use (512).")] = None,
    exits: Annotated[
        str | None, typer.Option("--exits", help="Exit layers, e.g. 15,20,25 (default: the family's).")
    ] = None,
    ridge: Annotated[
        float | None, typer.Option("--ridge", help="Ridge strength, relative to the token count (0.01).")
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(
            "--policies", help="Exit policies to sweep: confidence,entropy,patience,state,static (the default)."
        ),
    ] = None,
    prompts: Annotated[int | None, typer.Option("--prompts", help="LLMs: reference prompts in the sweep (4).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="LLMs: tokens per prompt in the sweep (48).")] = None,
    skip_search: Annotated[
        int | None, typer.Option("--skip-search", help="LLMs: greedy rounds of the draft skip search (0: none; 10).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="LLMs: draft length the skip search optimizes for (4).")] = None,
    threads: ThreadsOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Calibrate early exit for ARTIFACT (rewritten in place): exit adapters, draft skip set, policy thresholds."""
    from edgert.profile.calibrate import calibrate as run_calibration
    from edgert.profile.calibrate import summary

    result = run_calibration(
        artifact,
        log=note,
        out=out,
        target_agreement=target_agreement,
        sentences=sentences,
        text=text,
        tokens=tokens,
        exits=_ints(exits) if exits else None,
        ridge=ridge,
        policies=[p.strip() for p in policies.split(",") if p.strip()] if policies else None,
        prompts=prompts,
        steps=steps,
        skip_rounds=skip_search,
        k=k,
        threads=threads,
    )
    print(json.dumps(summary(result), indent=2))
