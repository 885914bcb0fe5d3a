#!/usr/bin/env python3
"""A conversation in a few lines: the KV cache is kept between turns, so each turn only
prefills what is new.

    python examples/chat.py smollm2.edgert
"""

import sys

import edgert

model = edgert.load(sys.argv[1])
chat = model.chat(system="You are a concise assistant.")
for question in ["Name a large city in Japan.", "What is it famous for?"]:
    print(f"> {question}")
    for token in chat.send(question, max_tokens=96):
        print(token.text, end="", flush=True)
    s = model.stats
    print(f"\n[{s.cached_tokens} of {s.prompt_tokens} prompt tokens came from the cache]\n")
