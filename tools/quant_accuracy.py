#!/usr/bin/env python
"""The accuracy cost of weight quantization: each ``--quant`` build against the f32 build.

    python tools/quant_accuracy.py smollm2-135m --quants f32,source,q8,q4 --text README.md
    python tools/quant_accuracy.py smollm2-135m --quants f32,source,source+int8,q8+int8

Compiles the model once per storage choice, scores the same text (its first ``--tokens``
tokens) with each, and prints perplexity and the share of positions whose greedy next token
equals the f32 build's (teacher-forced), with the artifact sizes. Writes the rows as JSON.
A choice with ``+int8`` is compiled with ``--activations int8``; since those kernels serve the
decode path (one token at a time), such a build scores the text token by token through ``step``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main(argv: list[str] | None = None) -> int:
    """Compile, score, compare."""
    import edgert
    from edgert.errors import EdgertError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="recipe name or .gguf path")
    parser.add_argument("--quants", default="f32,source,q8,q4", help="comma-separated --quant choices; f32 first")
    parser.add_argument("--text", type=Path, default=ROOT / "README.md", help="the text to score")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the text to score")
    parser.add_argument("--json", type=Path, default=Path("quant_accuracy.json"))
    args = parser.parse_args(argv)
    quants = args.quants.split(",")
    if quants[0] != "f32":
        quants = ["f32", *[q for q in quants if q != "f32"]]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="quant-acc-") as tmp:
            reference = None
            for choice in quants:
                quant, _, activations = choice.partition("+")
                print(f"compiling with --quant {quant} --activations {activations or 'f32'} ...", file=sys.stderr)
                result = edgert.compile(
                    args.model, output=Path(tmp) / f"{choice}.edgert", quant=quant, activations=activations or None
                )
                model = edgert.load(result.path)
                ids = model.tokenizer.encode(args.text.read_text())[: args.tokens]
                if activations == "int8":  # the int8 kernels run in decode: one token per step
                    model.reset()
                    logits = np.stack([model.prefill(ids[:1])] + [model.step([t]) for t in ids[1:]])
                else:
                    logits = model.score(ids)
                logp = log_softmax(logits[:-1])
                nll = -logp[np.arange(len(ids) - 1), ids[1:]]
                greedy = logits.argmax(-1)
                if reference is None:
                    reference = greedy
                size = sum(f["size"] for f in result.manifest["files"].values())
                rows.append(
                    {
                        "quant": choice,
                        "storage": result.manifest["weights"]["storage"],
                        "artifact_mb": round(size / 1e6, 1),
                        "perplexity": round(float(np.exp(nll.mean())), 3),
                        "greedy_agreement_with_f32": round(float((greedy == reference).mean()), 4),
                        "tokens": len(ids),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del model
    except EdgertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
