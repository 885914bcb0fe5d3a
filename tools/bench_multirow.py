#!/usr/bin/env python
"""The multi-row int8 kernels (`kernels.int8.multirow_quant_matmul`) of one SmolLM2 step, by row count,
against another version of ``kernels/int8.py``; outputs asserted equal bit for bit.

    git show main:edgert/compiler/kernels/int8.py > /tmp/int8_main.py
    TVM_NUM_THREADS=1 python tools/bench_multirow.py --against /tmp/int8_main.py --rows 1 5 8 16
    TVM_NUM_THREADS=1 python tools/bench_multirow.py --isa amx --against /tmp/int8_main.py --rows 16 64 128

``--isa amx`` (a CPU with AMX-INT8) builds the kernels with their tiles (both versions' weights in the
VNNI layout, which ``amx`` shares).

Each kernel of a step (q/k/v and gate/up with the RMSNorm prologue, down with SwiGLU's, the output
projection, the q8 LM head with RMSNorm) gets one copy of its weights per layer, cycled, so that
they come from memory as in a step (``--cold MB``: as many copies as make MB, so that small matrices
and the one LM head do not stay in L3 between calls, or for the next version); ``--prologue`` times
32-column kernels instead (what the activation prologue costs per call). With one thread the figure
is the thread's CPU time (another process holding the core does not count). Prints a step's matmul
milliseconds per row count and its ratio to one row's, per version, and each kernel's rate in
``vpdpbusd`` a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_attention import _load  # tools/ is this script's folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name, kind, K, N, prologue, calls per step (SmolLM2-135M: 30 layers)
STEP = [
    ("qkv", "q4", 576, 960, "rmsnorm", 30),
    ("gate_up", "q4", 576, 3072, "rmsnorm", 30),
    ("down", "q4", 1536, 576, "swiglu", 30),
    ("o", "q4", 576, 576, "", 30),
    ("head", "q8", 576, 49152, "rmsnorm", 1),
]


def _dots(kind: str, k: int, n: int) -> int:
    """``vpdpbusd`` instructions a row of a K x N matmul takes: 64 byte products each, twice for q8
    (its activation in two int8 parts). The rate against one core's (a C loop of the kernel's shape
    reached about 5 G/s on znver5) says how far the kernel is from the instruction's throughput."""
    return k * n // 64 * (2 if kind == "q8" else 1)


def main(argv: list[str] | None = None) -> int:
    import tvm
    from tvm.target import codegen

    from edgert.compiler.passes.pipeline import tir_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, action="append", default=[], help="another int8.py (repeatable)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prologue", action="store_true", help="32 columns: the prologue's cost")
    parser.add_argument("--isa", choices=("avx512vnni", "amx"), default="avx512vnni")
    parser.add_argument(
        "--cold", type=float, default=0, help="at least this many MB of weight copies per kernel (more than L3)"
    )
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent / "edgert/compiler/kernels/int8.py"
    versions = [here, *args.against]
    shapes = [(n, kind, k, 32 if args.prologue else cols, pro, per) for n, kind, k, cols, pro, per in STEP]
    target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    if args.isa == "amx":  # LLVM may name a virtual machine's CPU by an older model (see targets.py)
        from edgert.targets import enable_amx

        target["mattr"] = ["+amx-tile", "+amx-int8"]
        enable_amx()
    target = tvm.target.Target(target)
    libs = []
    for vi, path in enumerate(versions):
        mod = _load(path, f"int8_v{vi}")
        funcs = {
            f"{name}_{vi}": mod.multirow_quant_matmul(k, n, 32, kind, args.isa, pro).with_attr(
                "global_symbol", f"{name}_{vi}"
            )
            for name, kind, k, n, pro, _ in shapes
        }
        libs.append(tvm.compile(tvm.IRModule(funcs), target=target, tir_pipeline=tir_pipeline()).jit())
    rng = np.random.default_rng(0)
    weights: dict[str, list] = {}
    res: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for m in args.rows:
            for name, kind, k, n, pro, per in shapes:
                x = [tvm.runtime.tensor(rng.standard_normal((m, 2 * k if pro == "swiglu" else k)).astype("float32"))]
                if pro == "rmsnorm":
                    x.append(tvm.runtime.tensor(rng.uniform(0.5, 2, k).astype("float32")))
                nb, ng, kq = -(-n // 32), k // 32, k // 8 if kind == "q4" else k // 4
                if name not in weights:
                    copies = []
                    size = nb * kq * 32 * 4 + nb * ng * 32 * 2 * (2 if kind == "q4" else 1)  # bytes a copy
                    # a step streams ~100 MB of weights: with --cold every call finds its copy out of L3
                    count = max(per, -(-int(args.cold * 2**20) // size))
                    for _ in range(1 if args.prologue else count):
                        codes = rng.integers(0, 255, (nb, kq, 32, 4)).astype("uint8" if kind == "q4" else "int8")
                        scales = [(rng.standard_normal((nb, ng, 32)) * 0.01).astype("float16")]
                        copies.append([tvm.runtime.tensor(a) for a in [codes, *scales * (2 if kind == "q4" else 1)]])
                    weights[name] = copies
                copies = weights[name]
                outs = []
                for vi, lib in enumerate(libs):
                    f = lib[f"{name}_{vi}"]
                    y = tvm.runtime.tensor(np.zeros((m, n), "float32"))
                    f(*x, *copies[0], y)
                    calls = max(len(copies) * 2, 200 if args.prologue else 4)
                    clock = time.thread_time if tvm.runtime.num_threads() == 1 else time.perf_counter
                    t = clock()
                    for i in range(calls):
                        f(*x, *copies[i % len(copies)], y)
                    res.setdefault((vi, m, name), []).append((clock() - t) / calls)
                    outs.append(y.numpy())
                for o in outs[1:]:
                    np.testing.assert_array_equal(o, outs[0], err_msg=f"{name}, {m} rows")
    for vi, path in enumerate(versions):
        one = None
        for m in args.rows:
            step = sum(min(res[(vi, m, name)]) * per for name, *_, per in shapes)
            one = one or step
            parts = ", ".join(f"{name} {min(res[(vi, m, name)]) * 1e6:.1f}" for name, *_ in shapes)
            rates = ", ".join(
                f"{name} {m * _dots(kind, k, n) / min(res[(vi, m, name)]) * 1e-9:.1f}"
                for name, kind, k, n, *_ in shapes
            )
            rates = "" if args.prologue else f" | G vpdpbusd/s: {rates}"
            print(f"{path}: {m:3d} rows {step * 1e3:.3f} ms = {step / one:.2f} x one row | us: {parts}{rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
