#!/usr/bin/env python3
"""Profile an artifact on a device and write the report (thin script over the API of `edgert profile`).

python tools/profile_device.py tiny-rpi5.edgert --device board:// --runs 3 --report out.html
"""

from __future__ import annotations

import argparse
import json
import sys

from edgert.deploy.profiling import profile_on_device
from edgert.errors import EdgertError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, profile on the device, print the report's paths as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a compiled .edgert artifact")
    parser.add_argument(
        "--device", default="local", help="device URI (local, board://, ssh://, adb://, rpc://, serial://)"
    )
    parser.add_argument("--prompt", help="prompt (default: the model's)")
    parser.add_argument("--runs", type=int, default=3, help="prefill + decode runs")
    parser.add_argument("--max-tokens", type=int, default=32, help="decode steps per run")
    parser.add_argument("--threads", type=int, help="threads on the device")
    parser.add_argument("--report", default="profile.html", help="HTML report (.json, .csv and plots beside it)")
    args = parser.parse_args(argv)
    try:
        paths = profile_on_device(
            args.artifact,
            args.device,
            args.report,
            prompt=args.prompt,
            runs=args.runs,
            max_tokens=args.max_tokens,
            threads=args.threads,
        )
    except (EdgertError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
