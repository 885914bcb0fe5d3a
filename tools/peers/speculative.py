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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers import Row, speculative_whisper  # noqa: E402

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


def load_suite(path: Path) -> list[str]:
    """The prompts of a suite file (one JSON object with a "prompt" per line)."""
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


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


def llm_rows(args: Any) -> list[Row]:
    """Plain decoding and each mode, runs interleaved, on each suite; rows with plain decoding as the baseline."""
    import edgert
    from edgert.runtime.speculative import SpeculativeDecoder, parse_speculative

    folder = None
    art = args.spec_artifact
    if art is None:
        from edgert.families.compile import compile_model

        folder = Path(tempfile.mkdtemp(prefix="edgert-spec-"))
        art = compile_model("smollm2-135m", output=folder / "smollm2.edgert", threads=args.threads).path
    model = edgert.load(art, threads=args.threads)
    rows = []
    for suite, path in SUITES.items():
        prompts = load_suite(path)[: args.spec_prompts or None]
        specs = list(filter(None, args.spec_modes.split(",")))
        decoders = {}
        for spec in specs:
            drafter, k = parse_speculative(spec, model, lambda p: edgert.load(p, threads=args.threads))
            decoders[spec] = SpeculativeDecoder(model, drafter, k)
        plain, by_spec = [], {spec: [] for spec in specs}
        for _ in range(args.repeats):  # interleaved: a change in the machine's load meets every mode alike
            plain.append(decode_suite(model, prompts, args.spec_tokens))
            for spec, decoder in decoders.items():
                by_spec[spec].append(decode_suite(decoder, prompts, args.spec_tokens))
        reference, base = plain[0][0], statistics.median(r[1] for r in plain)
        for spec, decoder in decoders.items():
            runs, k = by_spec[spec], decoder.k
            counts = runs[0][2]
            acceptance = counts["accepted"] / counts["drafted"] if counts["drafted"] else 0.0
            rows.append(
                Row(
                    NAME,
                    f"{spec} on {suite} ({len(prompts)} prompts, {args.spec_tokens} tokens)",
                    "decode",
                    "tok/s",
                    statistics.median(r[1] for r in runs),
                    base,
                    BASE,
                    extra={
                        "identical": all(r[0] == reference for r in runs),
                        "acceptance": round(acceptance, 3),
                        "tokens_per_verify": round((counts["accepted"] + counts["rounds"]) / counts["rounds"], 2)
                        if counts["rounds"]
                        else 0.0,
                        "k": k,
                    },
                )
            )
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return rows
