#!/usr/bin/env python
"""Calibrate early exit and self-speculative drafting for a compiled Llama-family or Whisper artifact.

    python tools/calibrate_exits.py smollm2.edgert --out exits/          # fit, search, sweep, store
    python tools/calibrate_exits.py smollm2.edgert --policies confidence --skip-search 0
    python tools/calibrate_exits.py w.edgert --sentences 12              # a Whisper decoder

The same as `edgert calibrate` (the library: `edgert.profile.calibrate`; each family's stages are in
`edgert/families/<name>/calibrate.py`). Prints the progress and then each exit's held-out agreement
and each policy's calibrated point as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgert.errors import EdgertError
from edgert.families.shared.calibration import CALIBRATION_TEXT
from edgert.profile.calibrate import calibrate, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="a Llama-family or Whisper .edgert (rewritten in place)")
    parser.add_argument("--text", type=Path, help=f"calibration text (default: {CALIBRATION_TEXT.name})")
    parser.add_argument("--tokens", type=int, help="calibration tokens to use (default 512)")
    parser.add_argument("--exits", type=lambda s: [int(x) for x in s.split(",")], help="exit layers, e.g. 15,20,25")
    parser.add_argument("--ridge", type=float, help="ridge strength (relative to the token count; default 0.01)")
    parser.add_argument("--target-agreement", type=float, help="agreement a calibrated point must reach (0.9)")
    parser.add_argument("--policies", type=lambda s: s.split(","), help="comma-separated exit policies to sweep")
    parser.add_argument("--prompts", type=int, help="reference prompts in the sweep (default 4)")
    parser.add_argument("--steps", type=int, help="tokens per prompt in the sweep (default 48)")
    parser.add_argument("--skip-search", type=int, help="greedy rounds of the draft skip search (0: none; 10)")
    parser.add_argument("-k", type=int, help="draft length the skip search optimizes for (default 4)")
    parser.add_argument("--out", type=Path, help="folder for exit_sweep.csv, exit_sweep.png and exits.json")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--sentences", type=int, help="Whisper: calibration sentences spoken by espeak-ng (12)")
    args = parser.parse_args(argv)
    options = vars(args)
    options["skip_rounds"] = options.pop("skip_search")
    try:
        result = calibrate(options.pop("artifact"), **options)
    except EdgertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
