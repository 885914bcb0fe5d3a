"""Run cross-compiled kernels and graph artifacts on the emulated board, all in one process.

Started by tests/test_kernels_aarch64.py under ``qemu-aarch64-static`` with the board's Python
(starting it and importing TVM there takes most of the time, so every case runs in this one
process). Reads ``plan.json`` and ``inputs.npz`` from the folder given on the command line
and writes every output to ``outputs.npz`` there; it imports only numpy, the TVM runtime and
edgert's runtime, as a device does.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import tvm


def main(folder: Path) -> None:
    """Run every case of ``folder/plan.json``; outputs to ``folder/outputs.npz``."""
    plan = json.loads((folder / "plan.json").read_text())
    inputs = np.load(folder / "inputs.npz")
    out: dict[str, np.ndarray] = {"machine": np.array(platform.machine())}
    lib = tvm.runtime.load_module(str(folder / plan["library"]))
    for case in plan["kernels"]:
        args = [tvm.runtime.tensor(inputs[name]) for name in case["args"]]
        outs = [tvm.runtime.tensor(np.full(shape, np.nan, dtype)) for shape, dtype in case["outputs"]]
        lib[case["func"]](*args, *outs, *case.get("scalars", []))
        for i, o in enumerate(outs):
            out[f"{case['name']}/{i}"] = o.numpy()
    if plan["graphs"]:
        import edgert

        for case in plan["graphs"]:
            model = edgert.load(folder / case["artifact"], threads=2)
            result = model({name: inputs[key] for name, key in case["feeds"].items()})
            for name, value in result.items():
                out[f"{case['name']}/{name}"] = value
    np.savez(folder / "outputs.npz", **out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
