#!/usr/bin/env python3
"""Smallest use of the runtime: load an artifact and stream an answer.

python examples/generate.py smollm2.edgert "What is the capital of France?"
"""

import sys

import edgert
from edgert.runtime import SamplingParams

model = edgert.load(sys.argv[1])
prompt = sys.argv[2] if len(sys.argv) > 2 else "Tell me a fact about owls."
for token in model.generate(
    prompt, max_tokens=128, chat=True, sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1)
):
    print(token.text, end="", flush=True)
print(f"\n[{model.stats.decode_tokens_per_second:.1f} tokens/s]")
