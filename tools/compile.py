#!/usr/bin/env python3
"""Compile a model recipe or a GGUF file to an .edgert artifact (thin script over the API).

python tools/compile.py smollm2-135m --target host -o smollm2.edgert
"""

from __future__ import annotations

import argparse
import sys

from edgert.errors import EdgertError
from edgert.families.compile import compile_model


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, compile, print where the artifact went."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="recipe name (models/*.toml) or path to a .gguf file")
    parser.add_argument("--target", default="host", help="target name (targets/*.toml)")
    parser.add_argument("-o", "--output", help="artifact path (default: NAME.edgert)")
    parser.add_argument("--weight-dtype", choices=["f16", "f32"], help="weight storage dtype")
    parser.add_argument("--quant", choices=["source", "q4", "q8", "f16", "f32"], help="weights (default: source)")
    parser.add_argument("--context", type=int, help="context length in tokens")
    parser.add_argument("--threads", type=int, help="threads the artifact defaults to")
    args = parser.parse_args(argv)

    def progress(stage: str, fraction: float | None) -> None:
        if fraction is None:
            print(f"[edgert] {stage} ...", file=sys.stderr, flush=True)

    try:
        result = compile_model(
            args.model,
            target=args.target,
            output=args.output,
            weight_dtype=args.weight_dtype,
            quant=args.quant,
            context_length=args.context,
            threads=args.threads,
            progress=progress,
        )
    except EdgertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
