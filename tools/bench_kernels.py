#!/usr/bin/env python
"""Quantized matmul kernels side by side: float activations (`kernels.quant_matmul`) against int8
activations (`kernels.int8.int8_quant_matmul` for this CPU's instruction set), on SmolLM2-135M's
matrix shapes.

    TVM_NUM_THREADS=1 python tools/bench_kernels.py [--rounds 15] [--rows 1 2 5 8]

``--rows m ...`` times m rows at once (m = k + 1 is the verify pass of k speculative drafts), each
row count in turn. On an AVX-512 VNNI CPU a third kernel is timed: the AVX2 one-row-at-a-time
int8 kernel (``avx2``), what ``--activations int8`` built there before the multi-row VNNI kernel.

The kernels of a shape are timed in alternation (``rounds`` times, each a TVM time_evaluator
of ``number`` calls), so a loaded machine slows them alike; prints the median and the minimum
per kernel in microseconds and the ratio of the minimums (float / int8: above 1, int8 is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (kind, N, K): q/o projections and MLP up/gate (576 -> 1536), MLP down (1536 -> 576), the LM head.
SHAPES = [("q4", 1536, 576), ("q4", 576, 1536), ("q8", 1536, 576), ("q4", 49152, 576)]


def main(argv: list[str] | None = None) -> int:
    """Build both kernels per shape for this host and time them in alternation."""
    import tvm
    from tvm.target import codegen

    from edgert.compiler.kernels.int8 import dot_isa, int8_quant_matmul
    from edgert.compiler.kernels.quant import quant_block, quant_matmul
    from edgert.compiler.layout import pack_quantized, pack_quantized_dot
    from edgert.compiler.quantize import quantize_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x per call (1: decode)")
    args = parser.parse_args(argv)
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    isa = dot_isa(codegen.llvm_get_cpu_features(target))
    if isa is None:
        print("error: this CPU has neither AVX2 nor dotprod", file=sys.stderr)
        return 2
    variants = {"float": None, "int8": isa, **({"avx2": "avx2"} if isa in ("avx512vnni", "amx") else {})}
    funcs = {}
    for kind, n, k in SHAPES:
        b = quant_block(n)
        for p, v in variants.items():
            funcs[f"{p}_{kind}_{n}_{k}"] = int8_quant_matmul(k, n, b, kind, v) if v else quant_matmul(k, n, b, kind)
    module = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    lib = tvm.compile(module, target=target).jit()
    rng = np.random.default_rng(0)
    print(f"instruction set {isa}; microseconds per call (median / min of {args.rounds} rounds)")
    for rows in args.rows:
        print(f"-- {rows} row(s)")
        for kind, n, k in SHAPES:
            q = quantize_rows(rng.standard_normal((n, k)).astype(np.float32), kind)
            x = tvm.runtime.tensor(rng.standard_normal((rows, k)).astype(np.float32))
            y = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
            packed = {
                "float": [tvm.runtime.tensor(a) for a in pack_quantized(q, quant_block(n))],
                "dot": [tvm.runtime.tensor(a) for a in pack_quantized_dot(q, quant_block(n))],
            }
            number = max(1, int(2e7 // (n * k * rows)))
            timers = {
                p: lib.time_evaluator(f"{p}_{kind}_{n}_{k}", tvm.cpu(), number=number, repeat=1) for p in variants
            }
            times: dict[str, list[float]] = {p: [] for p in variants}
            for _ in range(args.rounds):
                for p in variants:
                    times[p].append(timers[p](x, *packed["float" if p == "float" else "dot"], y).mean * 1e6)
            cells = "   ".join(f"{p} {np.median(t):8.1f} / {min(t):8.1f}" for p, t in times.items())
            print(f"{kind} N={n:>5} K={k:>4}: {cells}   ratio {min(times['float']) / min(times['int8']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
