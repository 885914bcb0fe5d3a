#!/usr/bin/env python
"""Tune a graph's kernels with MetaSchedule and store the database for its target.

    python tools/tune.py model.onnx --target host --trials 200 [--input-shape x=1,128]
    python tools/tune.py model.onnx --target rpi5 --tracker 127.0.0.1:9190 --key rpi5 --trials 64

The database lands in ``targets/tuning/<target>/<model hash>/`` (``$EDGERT_TUNING_DIR``
overrides the ``targets/tuning`` part); `edgert compile` applies it when compiling the same
model file for the same target, and uses edgert's schedule rules for every kernel tuning did
not cover. Tuning uses the same graph rewrites as compile (weight packing, ``--quant``), so the
kernels it measures are the ones the artifact runs.

``--compare`` (with ``--tracker``) tunes nothing: it times every kernel on a leased device twice,
with edgert's schedule rules (untuned) and with the stored database's schedule, through the same
RPC runner, and prints both (to check that tuning on the devices paid off).

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


def compare(
    model: Path,
    target: str,
    tracker: str,
    key: str | None = None,
    quant: str = "f32",
    input_shapes: dict | None = None,
    rounds: int = 3,
) -> list[dict[str, Any]]:
    """Time each kernel of ``model`` on a device of the tracker, untuned (edgert's rules) and tuned
    (the stored database); a row per kernel with both median times in ms (None: no tuned schedule)."""
    import statistics

    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight
    from tvm.s_tir import meta_schedule as ms
    from tvm.support import cc as tvm_cc

    from edgert.compiler.schedules import schedule_rules
    from edgert.compiler.target import resolve
    from edgert.compiler.tuning import database_for, tuning_worker_init
    from edgert.errors import EdgertError
    from edgert.families.graph.build import import_graph, optimize
    from edgert.targets import load_target

    spec = load_target(target)
    tvm_target, record = resolve(spec)
    tuning_worker_init(record["arch"])
    folder = database_for(spec.name, model)
    if folder is None:
        raise EdgertError(f"no tuning database for {model} on {spec.name}: run tools/tune.py first")
    database = ms.database.JSONDatabase(
        str(folder / "database_workload.json"), str(folder / "database_tuning_record.json")
    )
    mod, _, _, _ = import_graph(model, input_shapes or {})
    mod, _, _ = optimize(mod, tvm_target, quant)
    with tvm_target:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tvm_target) + cpu.legalize_passes(tvm_target))(mod)
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    runner = _rpc_runner(ms, tracker, key or spec.name, workers=1)
    fcompile = tvm_cc.cross_compiler(spec.cc)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgert-compare-") as work:

        def build(kernel: Any, tag: str) -> Any:
            path = str(Path(work) / f"{tag}.so")
            tvm.compile(kernel, target=tvm_target).export_library(path, fcompile=fcompile)
            return ms.runner.RunnerInput(path, "cpu", ms.arg_info.ArgInfo.from_prim_func(kernel["main"]))

        def time_ms(*inputs: Any) -> list[float]:
            # Alternated rounds, the median of each: a shared (emulating) host drifts between runs.
            samples: list[list[float]] = [[] for _ in inputs]
            for _ in range(rounds):
                for i, one in enumerate(inputs):
                    result = runner.run([one])[0].result()
                    if result.error_msg:
                        why = result.error_msg.strip().splitlines()[-1]
                        raise EdgertError(f"timing {one.artifact_path} on the device failed: {why}")
                    samples[i] += [float(t) * 1e3 for t in result.run_secs]
            return [statistics.median(s) for s in samples]

        for i, task in enumerate(tasks):
            kernel = task.dispatched[0]
            # Looked up first: edgert's rules rewrite the kernel they are given in place.
            sch = database.query_schedule(kernel, tvm_target, workload_name="main")
            with tvm_target:
                untuned = dlight.ApplyDefaultSchedule(*schedule_rules())(kernel)
            inputs = [build(untuned, f"untuned{i}")] + ([] if sch is None else [build(sch.mod, f"tuned{i}")])
            times = time_ms(*inputs)
            rows.append({"kernel": task.task_name, "untuned_ms": times[0], "tuned_ms": times[1] if sch else None})
    return rows


def _rpc_runner(ms: Any, tracker: str, key: str, workers: int | None = None) -> Any:
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
    return ms.runner.RPCRunner(config, evaluator, max_workers=workers or free)


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
    parser.add_argument(
        "--compare", action="store_true", help="with --tracker: time each kernel untuned and tuned on a device"
    )
    args = parser.parse_args()
    t = time.perf_counter()
    shapes = parse_input_shapes(args.input_shape)
    if (args.tracker is None) != (args.key is None):
        parser.error("--tracker and --key go together")
    if args.compare:
        if args.tracker is None:
            parser.error("--compare measures on a device: give --tracker and --key")
        rows = compare(args.model, args.target, args.tracker, args.key, args.quant, shapes)
        for row in rows:
            tuned = "no tuned schedule" if row["tuned_ms"] is None else f"tuned {row['tuned_ms']:.3f} ms"
            print(f"{row['kernel']}: untuned {row['untuned_ms']:.3f} ms, {tuned}")
        return 0
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
