"""On-device measurements of a loaded language model: prefill, per-token decode, per-operator time.

Runs where the model runs (the device agent calls it), so it imports only numpy and the
runtime; the report with plots is drawn on the host (`edgert.profile.report`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from edgert.profile.bench import peak_rss_mb


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min and max of durations in seconds, as milliseconds."""
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p90": round(float(np.percentile(ms, 90)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
        "min": round(float(ms.min()), 3),
        "max": round(float(ms.max()), 3),
    }


def operator_times(model: Any, ids: list[int], steps: int = 3) -> list[dict[str, Any]]:
    """Time every call the Relax VM makes during ``steps`` decode steps after prefilling ``ids``.

    TVM 0.27's Relax VM reports each call instruction to an instrument function
    (`VirtualMachine.set_instrument`), before and after it runs; the gap is the call's time.
    The totals include the instrument's own small cost per call.
    """
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    started: list[tuple[str, float]] = []
    active = [False]

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if not active[0]:
            return 0
        if before:
            started.append((symbol, time.perf_counter()))
        elif started:
            name, t0 = started.pop()
            entry = totals[name]
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
        return 0

    model.reset()
    logits = model.prefill(ids)
    model.session.vm.set_instrument(instrument)
    active[0] = True
    try:
        for _ in range(steps):
            logits = model.step([int(np.argmax(logits))])
    finally:
        active[0] = False
    total = sum(v[0] for v in totals.values()) or 1.0
    rows = [
        {
            "operator": name,
            "calls_per_token": round(n / steps, 2),
            "ms_per_token": round(s / steps * 1e3, 4),
            "share": round(s / total, 4),
        }
        for name, (s, n) in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["ms_per_token"])


def _dims(sizes: list[int], dims: int) -> str:
    return "x".join(str(v) for v in sizes[: max(1, dims)])


def gpu_kernels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenCL kernel records (per kernel and work sizes) merged per kernel, longest total first, with
    their share of all kernel time and each work size (global / local) they ran with."""
    merged: dict[str, dict[str, Any]] = {}
    for r in records:
        m = merged.setdefault(r["kernel"], {"kernel": r["kernel"], "count": 0, "total_ns": 0, "work_sizes": []})
        m["count"] += r["count"]
        m["total_ns"] += r["total_ns"]
        dims = r["work_dims"]
        m["work_sizes"].append(
            {"global": _dims(r["global"], dims), "local": _dims(r["local"], dims), "count": r["count"]}
        )
    total = sum(m["total_ns"] for m in merged.values()) or 1
    rows = []
    for m in merged.values():
        sizes = sorted(m["work_sizes"], key=lambda w: -w["count"])
        rows.append(
            {
                "kernel": m["kernel"],
                "count": m["count"],
                "total_ms": round(m["total_ns"] / 1e6, 4),
                "mean_us": round(m["total_ns"] / m["count"] / 1e3, 3),
                "share": round(m["total_ns"] / total, 4),
                "global": sizes[0]["global"],
                "local": sizes[0]["local"],
                "work_sizes": sizes,
            }
        )
    return sorted(rows, key=lambda r: -r["total_ms"])


def gpu_profile(model: Any, ids: list[int], steps: int = 3) -> dict[str, Any]:
    """Device times of every OpenCL kernel over one prefill of ``ids`` and ``steps`` decode steps, from
    OpenCL events (a profiling queue), and the device memory the runtime allocated.

    A separate pass from the latency runs: a profiling queue timestamps every command. The wall time
    covers the same pass (it ends with the logits read back, so every kernel has finished); on an
    in-order queue the kernels' device times add up to at most that.
    """
    from edgert.runtime import opencl

    info = opencl.device_info()
    params = model.session.params
    weights = sum(int(np.prod([int(d) for d in p.shape])) * np.dtype(str(p.dtype)).itemsize for p in params)
    model.reset()
    resident = opencl.memory()["allocated_bytes"]
    opencl.start_profiling()
    try:
        t = time.perf_counter()
        logits = model.prefill(ids)
        for _ in range(steps):
            logits = model.step([int(np.argmax(logits))])
        wall = time.perf_counter() - t
    finally:
        records = opencl.stop_profiling()
    mem = opencl.memory()
    kernels = gpu_kernels(records)
    return {
        "device": info,
        "note": opencl.emulation_note(info),
        "window": f"1 prefill of {len(ids)} tokens + {steps} decode steps",
        "wall_ms": round(wall * 1e3, 3),
        "kernel_ms": round(sum(k["total_ms"] for k in kernels), 3),
        "launches": sum(k["count"] for k in kernels),
        "kernels": kernels,
        "memory": {
            "weights_bytes": weights,
            "resident_bytes": resident,
            "peak_bytes": mem["peak_bytes"],
            "allocated_bytes": mem["allocated_bytes"],
            "allocations": mem["allocations"],
        },
    }


def profile_generator(
    model: Any, prompt: str | None = None, runs: int = 3, max_tokens: int = 32, operators: bool = True
) -> dict[str, Any]:
    """Prefill ``prompt`` and decode ``max_tokens`` greedy tokens ``runs`` times; time every step."""
    if runs < 1 or max_tokens < 1:
        raise ValueError("profile needs at least 1 run and 1 token")
    text = prompt if prompt is not None else model.artifact.manifest.get("defaults", {}).get("prompt", "Hello!")
    ids = model.encode_prompt(text, chat=model.tokenizer.has_chat_template)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) + max_tokens > model.context_length:
        raise ValueError(f"{len(ids)} prompt + {max_tokens} tokens exceed the context of {model.context_length}")
    prefill_s: list[float] = []
    decode_runs: list[list[float]] = []
    tokens: list[int] = []
    for run in range(runs):
        model.reset()
        t = time.perf_counter()
        logits = model.prefill(ids)
        prefill_s.append(time.perf_counter() - t)
        steps: list[float] = []
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            if run == 0:
                tokens.append(token)
            t = time.perf_counter()
            logits = model.step([token])
            steps.append(time.perf_counter() - t)
        decode_runs.append(steps)
    per_token = [s for steps in decode_runs for s in steps]
    result: dict[str, Any] = {
        "artifact": model.artifact.path.name,
        "model": model.artifact.manifest.get("name"),
        "target": model.artifact.target,
        "threads": model.session.threads,
        "prompt": text,
        "prompt_tokens": len(ids),
        "runs": runs,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "prefill_ms": percentiles_ms(prefill_s),
        "prefill_tokens_per_second": round(len(ids) / float(np.median(prefill_s)), 2),
        "decode_ms": percentiles_ms(per_token),
        "decode_tokens_per_second": round(1e3 / percentiles_ms(per_token)["p50"], 2),
        "decode_step_ms": [[round(s * 1e3, 3) for s in steps] for steps in decode_runs],
        "operators": operator_times(model, ids) if operators else [],
    }
    if getattr(model.session, "on_gpu", False):
        result["gpu"] = gpu_profile(model, ids)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def graph_feeds(model: Any, shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a graph model from its manifest specs: seeded normal values for float inputs, ones for
    integer ones (token ids and masks alike stay in range). A symbolic dimension takes its size from
    ``shapes`` (NAME -> dims, as `edgert compile --input-shape`) or else 1."""
    from edgert.errors import EdgertError

    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {spec["name"] for spec in model.inputs})
    if unknown:
        names = ", ".join(spec["name"] for spec in model.inputs)
        raise EdgertError(f"--input-shape names {', '.join(unknown)}, which the graph does not take (it takes {names})")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        want = spec["shape"]
        given = shapes.get(spec["name"])
        if given is not None and len(given) != len(want):
            raise EdgertError(
                f"--input-shape {spec['name']} has rank {len(given)}; the graph takes rank {len(want)} {want}"
            )
        dims = [
            int(g) if given is not None else (d if isinstance(d, int) else 1)
            for g, d in zip(given or want, want, strict=True)
        ]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[spec["name"]] = np.ones(dims, dtype)
    return feeds


def graph_operator_times(model: Any, feeds: dict[str, np.ndarray], calls: int = 10) -> list[dict[str, Any]]:
    """Time every call the Relax VM makes (each kernel, each allocation) over ``calls`` runs of the
    graph, as `operator_times` does for decode steps: each kernel's median time per run (on a shared
    machine one preempted run would dominate a mean), longest first."""
    per_run: list[dict[str, list[float]]] = []
    started: list[tuple[str, float]] = []

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            started.append((symbol, time.perf_counter()))
        elif started:
            name, t0 = started.pop()
            entry = per_run[-1].setdefault(name, [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
        return 0

    model(feeds)  # warm: the first call allocates the VM's storage
    model.session.vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            per_run.append({})
            model(feeds)
    finally:
        model.session.vm.set_instrument(lambda *_: 0)
    names = {name: entry[1] for run in per_run for name, entry in run.items()}
    medians = {name: float(np.median([run.get(name, [0.0])[0] for run in per_run])) for name in names}
    total = sum(medians.values()) or 1.0
    rows = [
        {
            "operator": name,
            "calls_per_run": names[name],
            "ms_per_run": round(medians[name] * 1e3, 4),
            "share": round(medians[name] / total, 4),
        }
        for name in names
    ]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def profile_graph(
    model: Any, runs: int = 20, input_shapes: dict[str, list[int]] | None = None, operators: bool = True
) -> dict[str, Any]:
    """Run a graph artifact ``runs`` times on seeded inputs (`graph_feeds`); time every call and each kernel."""
    if runs < 1:
        raise ValueError("profile needs at least 1 run")
    feeds = graph_feeds(model, input_shapes)
    model(feeds)  # warm-up: first-call allocations are not the graph's latency
    calls: list[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        model(feeds)
        calls.append(time.perf_counter() - t)
    result: dict[str, Any] = {
        "kind": "graph",
        "artifact": model.artifact.path.name,
        "model": model.artifact.manifest.get("name"),
        "target": model.artifact.target,
        "threads": model.session.threads,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "runs": runs,
        "call_ms": percentiles_ms(calls),
        "call_run_ms": [round(s * 1e3, 4) for s in calls],
        "operators": graph_operator_times(model, feeds, min(runs, 100)) if operators else [],
    }
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result
