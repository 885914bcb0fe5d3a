#!/usr/bin/env python
"""Compare edgert with its peers (llama.cpp, onnxruntime, ...) in one run on the same models.

    python tools/bench_peers.py                     # every section
    python tools/bench_peers.py --only llm --threads 2 --json out.json
    python tools/bench_peers.py --early-exit --threads 2   # early exit and speculative decoding
    python tools/bench_peers.py --speculative --threads 2  # lookup/recycle drafts vs plain decoding (LLM, Whisper)
    python tools/bench_peers.py --only llm --background 1  # also with 1 busy process beside each engine

Each section lives in ``tools/peers/<name>.py``. Prints one table (medians and ratios) and
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Row


def sections() -> dict[str, object]:
    """The section modules found in tools/peers/, by NAME."""
    import peers

    found = {}
    for info in pkgutil.iter_modules(peers.__path__):
        module = importlib.import_module(f"peers.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def print_table(rows: list[Row]) -> None:
    """Print the rows as a table with ratios (edgert ahead when the ratio is above 1)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="edgert vs peers (medians; ratio > 1: edgert ahead)")
    for name in ("section", "case", "metric", "edgert", "peer", "ratio", "note"):
        table.add_column(name, justify="right" if name in ("edgert", "peer", "ratio") else "left")
    for row in rows:
        ratio = row.ratio
        note = ", ".join(f"{k}={v}" for k, v in row.extra.items())
        table.add_row(
            row.section,
            row.case,
            f"{row.metric} [{row.unit}]",
            "-" if row.edgert is None else f"{row.edgert:.4g}",
            "-" if row.peer is None else f"{row.peer:.4g} ({row.peer_name})",
            "-" if ratio is None else f"{ratio:.2f}x",
            note,
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections and report."""
    mods = sections()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(mods), help="run only these sections")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (medians)")
    parser.add_argument(
        "--background",
        type=int,
        default=0,
        help="busy processes beside each engine for contended rows next to the quiet ones (llm, asr, codec)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench_peers.json"), help="where to write the rows")
    for module in mods.values():
        group = parser.add_argument_group(f"{module.NAME}: {getattr(module, 'HELP', '')}")
        if hasattr(module, "add_arguments"):
            module.add_arguments(group)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    if getattr(args, "early_exit", False):  # --early-exit: that section alone
        args.only = ["early_exit"]
    if getattr(args, "speculative", False):  # --speculative: that section alone
        args.only = ["speculative"]
    # The early-exit section calibrates for minutes, the speculative one decodes two suites per mode;
    # they run when asked for by name.
    for name in args.only or [m for m in mods if m not in ("early_exit", "speculative")]:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.extend(mods[name].run(args))
    print_table(rows)
    args.json.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    # The speculative section's modes are lossless: output that differs from plain decoding is a bug, not a
    # figure. (The early-exit section's exit policies may differ by design; it reports agreement.)
    differ = [r.case for r in rows if r.section == "speculative" and r.extra.get("identical") is False]
    for case in differ:
        print(f"error: output not identical to plain decoding: {case}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
