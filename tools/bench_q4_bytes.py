#!/usr/bin/env python
"""q4 kernels of one SmolLM2 step (30 layers of q/k/v, gate/up, down, o) on an AMX CPU, two layouts in one
process, alternated per round, outputs asserted equal bit for bit: A = codes two a byte and the VNNI tiles
(``isa="avx512vnni"``, what ``amx`` builds had), B = codes one a byte and the AMX tiles from 2 rows
(``isa="amx"``). Prints each kernel's median time and the median of per-round ratios B/A.

    TVM_NUM_THREADS=1 python tools/bench_q4_bytes.py ROWS ROUNDS COPIES   # e.g. 1,2,5,128 5 30

COPIES copies of each kernel's weights are cycled (30: from L3 as in a step; 1: hot in L2).
"""

import sys
import time

import numpy as np


def main() -> None:
    import tvm

    from edgert.compiler.kernels.int8 import multirow_quant_matmul
    from edgert.compiler.passes.pipeline import tir_pipeline
    from edgert.targets import enable_amx

    STEP = [
        ("qkv", 576, 960, "rmsnorm"),
        ("gate_up", 576, 3072, "rmsnorm"),
        ("down", 1536, 576, "swiglu"),
        ("o", 576, 576, ""),
    ]
    rows = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 5, 128]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    copies_n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"})
    funcs = {}
    for name, k, n, pro in STEP:
        for isa in ("avx512vnni", "amx"):
            funcs[f"{name}_{isa}"] = multirow_quant_matmul(k, n, 32, "q4", isa, pro).with_attr(
                "global_symbol", f"{name}_{isa}"
            )
    lib = tvm.compile(tvm.IRModule(funcs), target=target, tir_pipeline=tir_pipeline())
    enable_amx()
    rng = np.random.default_rng(0)
    W = {}
    for name, k, n, _ in STEP:
        nb, ng = n // 32, k // 32
        cs = []
        for _ in range(copies_n):
            codes = rng.integers(0, 16, (nb, k, 32)).astype("uint8")  # [nb, K, B]
            sc = (rng.standard_normal((nb, ng, 32)) * 0.01).astype("float16")
            mn = (rng.standard_normal((nb, ng, 32)) * 0.01).astype("float16")
            byt = np.ascontiguousarray(codes.reshape(nb, k // 4, 4, 32).transpose(0, 1, 3, 2))
            c8 = codes.reshape(nb, k // 8, 2, 4, 32)
            nibs = np.ascontiguousarray((c8[:, :, 0] | (c8[:, :, 1] << 4)).transpose(0, 1, 3, 2))
            cs.append(
                {
                    "avx512vnni": [tvm.runtime.tensor(a) for a in (nibs, sc, mn)],
                    "amx": [tvm.runtime.tensor(a) for a in (byt, sc, mn)],
                }
            )
        W[name] = cs
    res = {}
    clock = time.thread_time if tvm.runtime.num_threads() == 1 else time.perf_counter
    for rd in range(rounds):
        for m in rows:
            for name, k, n, pro in STEP:
                x = [tvm.runtime.tensor(rng.standard_normal((m, 2 * k if pro == "swiglu" else k)).astype("float32"))]
                if pro == "rmsnorm":
                    x.append(tvm.runtime.tensor(rng.uniform(0.5, 2, k).astype("float32")))
                outs = {}
                order = ("avx512vnni", "amx") if rd % 2 == 0 else ("amx", "avx512vnni")
                for isa in order:
                    f = lib[f"{name}_{isa}"]
                    y = tvm.runtime.tensor(np.zeros((m, n), "float32"))
                    f(*x, *W[name][0][isa], y)
                    outs[isa] = y.numpy()
                    calls = 60 if m < 64 else 30
                    t = clock()
                    for i in range(calls):
                        f(*x, *W[name][i % copies_n][isa], y)
                    res.setdefault((isa, m, name), []).append((clock() - t) / calls)
                np.testing.assert_array_equal(outs["amx"], outs["avx512vnni"], err_msg=f"{name} {m}")
    print("threads", tvm.runtime.num_threads())
    for m in rows:
        for name, *_ in STEP:
            a, b = np.array(res[("avx512vnni", m, name)]), np.array(res[("amx", m, name)])
            print(
                f"{m:4d} rows {name:8s} A {np.median(a) * 1e6:8.1f} us  B {np.median(b) * 1e6:8.1f} us"
                f"  B/A median {np.median(b / a):.3f}"
            )
        a, b = (sum(np.median(res[(isa, m, nm)]) * 30 for nm, *_ in STEP) for isa in ("avx512vnni", "amx"))
        print(f"{m:4d} rows step's 120 q4 matmuls: A {a * 1e3:.2f} ms  B {b * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
