#!/usr/bin/env python
"""Tune a graph's kernels with MetaSchedule and store the database for its target.

    python tools/tune.py model.onnx --target host --trials 200 [--input-shape x=1,128]

The database lands in ``targets/tuning/<target>/<model hash>/`` (``$EDGERT_TUNING_DIR``
overrides the ``targets/tuning`` part); `edgert compile` applies it when compiling the same
model file for the same target, and uses edgert's schedule rules for every kernel tuning did
not cover. Tuning uses the same graph rewrites as compile (weight packing, ``--quant``), so the
kernels it measures are the ones the artifact runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tune(
    model: Path,
    target: str,
    trials: int,
    quant: str = "f32",
    input_shapes: dict | None = None,
    seed: int = 0,
    strategy: str = "evolutionary",
) -> Path:
    """Tune ``model`` for ``target`` with ``trials`` measured candidates in all; return the database folder."""
    import functools

    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import meta_schedule as ms

    from edgert.compiler.target import resolve
    from edgert.compiler.tuning import database_dir, register_cpu_intrinsics_only
    from edgert.families.graph.build import import_graph, optimize
    from edgert.targets import load_target

    spec = load_target(target)
    tvm_target, record = resolve(spec)
    cpu_intrinsics = functools.partial(register_cpu_intrinsics_only, record["arch"])
    cpu_intrinsics()
    mod, _, _, _ = import_graph(model, input_shapes or {})
    mod, _, _ = optimize(mod, tvm_target, quant)
    with tvm_target:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tvm_target) + cpu.legalize_passes(tvm_target))(mod)
    out = database_dir(spec.name, model)
    out.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(
        str(out / "database_workload.json"), str(out / "database_tuning_record.json"), allow_missing=True
    )
    with tempfile.TemporaryDirectory(prefix="edgert-tune-") as work:  # MetaSchedule's logs
        ms.relax_integration.tune_relax(
            mod,
            params={},
            target=tvm_target,
            work_dir=work,
            max_trials_global=trials,
            num_trials_per_iter=min(64, max(2, trials)),
            database=database,
            # One build worker and one measuring process: on a small board (and in CI) a worker per
            # core only competes with the measurements.
            # Generous time limits: a fresh worker first imports TVM's tensor intrinsics, which
            # takes minutes on a loaded 2-core machine and made every candidate time out at 30 s.
            builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=900, initializer=cpu_intrinsics),
            runner=ms.runner.LocalRunner(timeout_sec=300),
            # xgboost is not a dependency: without a learned cost model, candidates are sampled
            # from the design space and every one is measured.
            cost_model="random",
            strategy=strategy,
            seed=seed,
        )
    (out / "tuned.json").write_text(
        json.dumps({"model": model.name, "target": spec.name, "trials": trials, "quant": quant}, indent=2) + "\n"
    )
    return out


def main() -> int:
    """Command line."""
    from edgert.families.graph.build import parse_input_shapes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an .onnx or .tflite file")
    parser.add_argument("--target", default="host")
    parser.add_argument("--trials", type=int, default=64, help="measured candidates over all kernels")
    parser.add_argument("--quant", default="f32")
    parser.add_argument("--input-shape", action="append", help="NAME=D0,D1,... (as for edgert compile)")
    parser.add_argument(
        "--strategy", default="evolutionary", choices=["evolutionary", "replay-trace"], help="MetaSchedule search"
    )
    args = parser.parse_args()
    t = time.perf_counter()
    shapes = parse_input_shapes(args.input_shape)
    out = tune(args.model, args.target, args.trials, args.quant, shapes, strategy=args.strategy)
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
