"""Adaptive depth on SmolLM2 and Whisper tiny.en: the full model vs early exit and speculative decoding.

No peer runtime ships these, so the "peer" column is the full model in edgert itself: the
ratio is the speedup. Each case decodes the recipe's reference prompts (chat, greedy) and
reports decode tokens/s (total decode time over tokens after the first, median over
``--repeats``) and agreement with the full model: teacher-forced top-1 agreement for early
exit, identical output (yes/no) and acceptance rate for speculative decoding. The Whisper
rows (`peers.early_exit_whisper`) time the decoder on the same speech the tests use.

    python tools/bench_peers.py --early-exit --threads 2
    python tools/bench_peers.py --early-exit --ee-artifact cal.edgert --ee-f32-artifact f32.edgert \
        --ee-whisper-artifact whisper-tiny.en.edgert
    python tools/bench_peers.py --early-exit --ee-artifact cal.edgert --ee-cases exit \
        --ee-policies static:15,static:20,state:0.7      # exit policies only, stored and given

Each exit policy's decode is timed alternately with the full model's (``--repeats`` pairs), so a
busy machine slows both alike.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers import Row, early_exit_whisper  # noqa: E402

NAME = "early_exit"
HELP = "SmolLM2, Whisper: early-exit policies and speculative decoding vs the full model (--early-exit)"
BASE = "full model"


def add_arguments(group: Any) -> None:
    """Options of this section."""
    group.add_argument("--early-exit", action="store_true", help="run only this section")
    group.add_argument("--ee-artifact", type=Path, help="a SmolLM2 artifact calibrated by tools/calibrate_exits.py")
    group.add_argument("--ee-f32-artifact", type=Path, help="an f32 build: two-model mode drafts for it with the Q4")
    group.add_argument("--ee-prompts", type=int, default=4, help="reference prompts per case")
    group.add_argument("--ee-tokens", type=int, default=64, help="tokens per prompt")
    group.add_argument("--ee-k", type=int, default=4, help="draft length of speculative decoding")
    group.add_argument(
        "--ee-cases",
        type=lambda v: set(v.split(",")),
        default={"exit", "speculative", "whisper"},
        help="which cases to run: exit,speculative,whisper (all by default)",
    )
    group.add_argument(
        "--ee-policies",
        type=lambda v: [p for p in v.split(",") if p],
        default=[],
        help="exit policies to measure besides the stored ones, e.g. static:15,state:0.8 (the frontier)",
    )
    early_exit_whisper.add_arguments(group)


def _prepare(args: Any) -> Path:
    """A calibrated artifact: the one given, else SmolLM2 compiled and calibrated here (minutes)."""
    if args.ee_artifact is not None:
        return args.ee_artifact
    from edgert.families.compile import compile_model

    folder = Path(tempfile.mkdtemp(prefix="edgert-ee-"))
    art = compile_model("smollm2-135m", output=folder / "smollm2.edgert", threads=args.threads).path
    sys.path.insert(0, str(ROOT / "tools"))
    import calibrate_exits

    calibrate_exits.calibrate(art, threads=args.threads, out=folder)
    print(f"calibrated artifact and plots in {folder}", file=sys.stderr)
    return art


def _decode(runner: Any, prompts: list[str], tokens: int) -> tuple[list[list[int]], float]:
    """Outputs of ``runner.generate`` and its decode tokens/s (time over tokens after the first)."""
    outs, seconds, count = [], 0.0, 0
    for p in prompts:
        outs.append([t.id for t in runner.generate(p, max_tokens=tokens, chat=True)])
        seconds += runner.stats.decode_seconds
        count += max(len(outs[-1]) - 1, 0)
    return outs, count / seconds if seconds else 0.0


def run(args: Any) -> list[Row]:
    """Measure every case; rows with the full model as the baseline."""
    import edgert
    from edgert.recipes import load_recipe
    from edgert.runtime.exits import EarlyExitDecoder, parse_exit_policy
    from edgert.runtime.speculative import ModelDrafter, SpeculativeDecoder, parse_speculative

    art = _prepare(args)
    model = edgert.load(art, threads=args.threads)
    prompts = list(load_recipe("smollm2-135m").run["reference_prompts"])[: args.ee_prompts]
    n = args.ee_tokens
    cases = args.ee_cases
    full_runs = [_decode(model, prompts, n) for _ in range(args.repeats)]
    reference = full_runs[0][0]
    full = statistics.median(r[1] for r in full_runs)
    rows = []
    calibrated = model.artifact.manifest.get("exits", {}).get("policies", {})
    stored = [f"{name}:{point['threshold']:g}" for name, point in sorted(calibrated.items())]
    for spec in stored + [p for p in args.ee_policies if p not in stored] if "exit" in cases else []:
        decoder = EarlyExitDecoder(model, parse_exit_policy(spec, model))
        fulls, speeds = [], []
        for _ in range(args.repeats):  # alternated: a busy machine slows both alike
            fulls.append(_decode(model, prompts, n)[1])
            speeds.append(_decode(decoder, prompts, n)[1])
        layers = decoder.stats.mean_layers
        agreement = statistics.mean(
            decoder.agreement(p, r, chat=True) for p, r in zip(prompts, reference, strict=True) if len(r) > 1
        )
        rows.append(
            Row(
                NAME,
                f"exit {spec}" + ("" if spec in stored else " (not stored)"),
                "decode",
                "tok/s",
                statistics.median(speeds),
                statistics.median(fulls),
                BASE,
                extra={"agreement": round(agreement, 3), "mean_layers": round(layers, 2)},
            )
        )
    last_exit = model.artifact.manifest["exits"]["layers"][-1]
    specs = (f"self:k={args.ee_k}", f"self:k={args.ee_k},exit={last_exit}")
    for spec in specs if "speculative" in cases else ():
        drafter, k = parse_speculative(spec, model, lambda p: edgert.load(p, threads=args.threads))
        decoder = SpeculativeDecoder(model, drafter, k)
        runs = [_decode(decoder, prompts, n) for _ in range(args.repeats)]
        stats = decoder.stats
        rows.append(
            Row(
                NAME,
                f"speculative {spec}",
                "decode",
                "tok/s",
                statistics.median(r[1] for r in runs),
                full,
                BASE,
                extra={"identical": runs[0][0] == reference, "acceptance": round(stats.acceptance_rate, 3)},
            )
        )
    if args.ee_f32_artifact is not None and "speculative" in cases:
        target = edgert.load(args.ee_f32_artifact, threads=args.threads)
        f32_runs = [_decode(target, prompts, n) for _ in range(args.repeats)]
        decoder = SpeculativeDecoder(target, ModelDrafter(model, target), args.ee_k)
        runs = [_decode(decoder, prompts, n) for _ in range(args.repeats)]
        rows.append(
            Row(
                NAME,
                f"f32 verified, Q4 drafts (k={args.ee_k})",
                "decode",
                "tok/s",
                statistics.median(r[1] for r in runs),
                statistics.median(r[1] for r in f32_runs),
                "f32 full model",
                extra={
                    "identical": runs[0][0] == f32_runs[0][0],
                    "acceptance": round(decoder.stats.acceptance_rate, 3),
                },
            )
        )
    if "whisper" in cases:
        rows.extend(early_exit_whisper.whisper_rows(args))
    if args.ee_artifact is None:
        shutil.rmtree(Path(art).parent, ignore_errors=True)
    return rows
