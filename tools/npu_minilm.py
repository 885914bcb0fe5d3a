#!/usr/bin/env python
"""all-MiniLM-L6-v2 on an NPU target: partition plan, Vela's estimate, int8 accuracy.

    python tools/npu_minilm.py [--target ethos-u55-128] [--length 32] [--onnx minilm.onnx]

Exports the ONNX graph (tools/export_minilm_onnx.py), calibrates on one set of sentences,
compiles with `compile_npu_graph`, then compares int8 sentence embeddings (NPU partitions on
LiteRT's reference kernels, the rest on onnxruntime) with onnxruntime's float embeddings on
held-out sentences (cosine similarity).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "The weather will be sunny with a light breeze tomorrow.",
    "She baked a chocolate cake for her brother's birthday.",
    "Quantum computers use qubits instead of bits.",
    "The train to Berlin leaves at half past seven.",
    "Please turn off the lights when you leave the room.",
    "Neural networks learn representations from data.",
    "The museum is closed on Mondays.",
    "He scored the winning goal in the final minute.",
    "Add two cups of flour and stir gently.",
    "The river flooded the village after days of rain.",
    "My laptop battery drains too quickly.",
    "Children were playing in the park all afternoon.",
    "The contract must be signed by both parties.",
    "Volcanoes can change the climate for years.",
    "I would like to book a table for two tonight.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Cats sleep for most of the day.",
    "The new policy takes effect next month.",
    "Bananas are rich in potassium.",
    "The spacecraft entered orbit around Mars.",
]
HELD_OUT = [
    "A woman is reading a book in the library.",
    "Interest rates were raised by the central bank.",
    "Can you help me install this software?",
    "It is going to rain heavily this weekend.",
    "The chef prepared a delicious pasta dish.",
    "Electric cars are becoming more popular.",
    "The flight was delayed by three hours.",
    "Dogs are loyal and friendly animals.",
    "The students passed the exam with high marks.",
    "Mountains are covered with snow in winter.",
    "The company released its quarterly earnings report.",
    "He forgot his umbrella on the bus.",
    "Solar panels convert sunlight into electricity.",
    "The hospital opened a new emergency ward.",
    "We watched a documentary about the ocean.",
    "The bridge was built more than a century ago.",
]


def main() -> None:
    from export_minilm_onnx import export, tokenize

    from edgert.compiler.npu import _session, compile_npu_graph
    from edgert.families.graph.npu import run_plan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="ethos-u55-128")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--onnx", type=Path)
    parser.add_argument("--percentile", type=float)
    parser.add_argument("--json", type=Path, help="write the plan and Vela's report here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgert-minilm-"))
    path = args.onnx or export(tmp / "minilm.onnx")
    cal = tokenize(CALIBRATION, args.length)
    tflites, _velas, plan, report = compile_npu_graph(path, args.target, cal, args.percentile, show=True)
    held = tokenize(HELD_OUT, args.length)
    sess = _session(__import__("onnx").load(str(path)))
    cos = []
    for i in range(len(HELD_OUT)):
        feed = {k: v[i : i + 1] for k, v in held.items()}
        ref = sess.run(["sentence_embedding"], feed)[0][0]
        got = run_plan(path, plan, tflites, feed)["sentence_embedding"][0]
        cos.append(float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got))))
    print(
        f"int8 vs float sentence embeddings on {len(cos)} held-out sentences: cosine min {min(cos):.4f}, "
        f"mean {np.mean(cos):.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "vela": report, "cosine": cos}, indent=1, default=str))


if __name__ == "__main__":
    main()
