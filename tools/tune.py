#!/usr/bin/env python
"""Tune a graph's kernels with MetaSchedule and store the database for its target.

    python tools/tune.py model.onnx --target host --trials 200 [--input-shape x=1,128]
    python tools/tune.py model.onnx --target rpi5 --tracker 127.0.0.1:9190 --key rpi5 --trials 64

The database lands in ``targets/tuning/<target>/<model hash>/`` (``$EDGERT_TUNING_DIR``
overrides the ``targets/tuning`` part); `edgert compile` applies it when compiling the same
model file for the same target, and uses edgert's schedule rules for every kernel tuning did
not cover. Tuning uses the same graph rewrites as compile (weight packing, ``--quant``), so the
kernels it measures are the ones the artifact runs.

With ``--tracker HOST:PORT --key K`` the candidates are cross-compiled here into shared libraries
and measured on the devices the TVM RPC tracker leases under key K (MetaSchedule's RPC runner, one
measuring worker per free device): the edgert agents of a farm (`edgert farm`, `edgert board start
--count N --tracker`) or TVM's own RPC servers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tune(
    model: Path,
    target: str,
    trials: int,
    quant: str = "f32",
    input_shapes: dict | None = None,
    seed: int = 0,
    strategy: str = "evolutionary",
    tracker: str | None = None,
    key: str | None = None,
) -> Path:
    """Tune ``model`` for ``target`` with ``trials`` measured candidates in all; return the database folder."""
    import functools

    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import meta_schedule as ms

    from edgert.compiler.target import resolve
    from edgert.compiler.tuning import CROSS_EXPORT, database_dir, tuning_worker_init
    from edgert.families.graph.build import import_graph, optimize
    from edgert.targets import load_target

    spec = load_target(target)
    tvm_target, record = resolve(spec)
    runner, f_export, cc = ms.runner.LocalRunner(timeout_sec=300), None, None
    if tracker is not None:
        runner, cc = _rpc_runner(ms, tracker, key or spec.name), spec.cc
        f_export = CROSS_EXPORT
    cpu_intrinsics = functools.partial(tuning_worker_init, record["arch"], cc)
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
    where = f"tracker {tracker}, key {key or spec.name}" if tracker else "this host"
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
            builder=ms.builder.LocalBuilder(
                max_workers=1, timeout_sec=900, initializer=cpu_intrinsics, f_export=f_export
            ),
            runner=runner,
            # xgboost is not a dependency: without a learned cost model, candidates are sampled
            # from the design space and every one is measured.
            cost_model="random",
            strategy=strategy,
            seed=seed,
        )
    (out / "tuned.json").write_text(
        json.dumps(
            {"model": model.name, "target": spec.name, "trials": trials, "quant": quant, "measured_on": where},
            indent=2,
        )
        + "\n"
    )
    return out


def _rpc_runner(ms: Any, tracker: str, key: str) -> Any:
    """MetaSchedule's RPC runner over the devices the tracker has free under ``key`` (one worker each)."""
    from edgert.deploy.farm import address, summary
    from edgert.errors import DeviceError

    host, port = address(tracker)
    free = summary(tracker).get(key, {}).get("free", 0)
    if free == 0:
        raise DeviceError(f"no free device with key '{key}' at the tracker {tracker} (see `edgert farm status`)")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=600)
    # Emulated boards are slow: a few repeats of at least 50 ms each keep the noise of a loaded host down.
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(config, evaluator, max_workers=free)


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
    parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker: measure on its devices")
    parser.add_argument("--key", default=None, help="the devices' key at the tracker (e.g. rpi5)")
    args = parser.parse_args()
    t = time.perf_counter()
    shapes = parse_input_shapes(args.input_shape)
    if (args.tracker is None) != (args.key is None):
        parser.error("--tracker and --key go together")
    out = tune(
        args.model,
        args.target,
        args.trials,
        args.quant,
        shapes,
        strategy=args.strategy,
        tracker=args.tracker,
        key=args.key,
    )
    print(f"wrote {out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
