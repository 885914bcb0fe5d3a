"""NPU partitions: the int8 parts of an ONNX graph as TFLite models for phone NPUs (TFLite
delegates) and Arm Ethos-U (through Vela); the rest stays on the CPU.

    tflites, velas, plan, report = compile_npu_graph("model.onnx", "ethos-u55-128", "inputs.npz")

Steps: run the float graph (onnxruntime) on the calibration samples and record every tensor's
range and shape; plan the partitions (`partition`); lower each NPU partition to TFLite ops
(`lower`), quantize it (`quantize`), write it (`tflite_writer`); for Ethos-U targets compile it
with Vela (`vela`). `edgert.families.graph.npu.run_plan` runs the whole graph as planned (CPU
parts with onnxruntime, NPU parts with LiteRT's reference kernels) to measure what int8 costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgert.compiler.npu.partition import GraphInfo, plan, plan_dict, print_plan
from edgert.compiler.npu.quantize import CalibrationError, RangeStats, load_calibration

__all__ = ["Calibrated", "CalibrationError", "calibrate", "compile_npu_graph"]


@dataclass
class Calibrated:
    """A float graph run on calibration samples: ranges, shapes and types of every tensor."""

    model: object  # onnx.ModelProto
    stats: dict[str, RangeStats]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]


def model_inputs(model) -> dict[str, tuple[tuple, np.dtype]]:
    """{input name: (shape with None for symbolic dims, numpy dtype)} of an ONNX model."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out[i.name] = (shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def _session(model, outputs: list[str] | None = None):
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if outputs is not None:
        have = {o.name for o in m.graph.output}
        for name in outputs:
            if name not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def calibrate(model, data: dict[str, np.ndarray], percentile: float | None = None, seed: int = 0) -> Calibrated:
    """Run ``model`` sample by sample and record the range of every tensor.

    ``data``: ``[samples, *input shape]`` per input, as `load_calibration` returns it.
    """
    from onnx import numpy_helper

    from edgert.compiler.npu.lstm import internals

    names = list(dict.fromkeys(o for n in model.graph.node for o in n.output if o))
    sess = _session(model, names)
    out_names = [o.name for o in sess.get_outputs()]
    stats: dict[str, RangeStats] = {}
    shapes: dict[str, tuple[int, ...]] = {k: tuple(np.asarray(v).shape[1:]) for k, v in data.items()}
    dtypes: dict[str, np.dtype] = {k: np.asarray(v).dtype for k, v in data.items()}
    rng = np.random.default_rng(seed)
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    inits = {i.name: i for i in model.graph.initializer}
    lstm_consts = {name: numpy_helper.to_array(inits[name]) for n in lstms for name in n.input if name in inits}
    count = len(next(iter(data.values())))
    for s in range(count):
        feeds = {k: np.asarray(v)[s] for k, v in data.items()}
        values = dict(zip(out_names, sess.run(out_names, feeds), strict=True))
        values.update(feeds)
        for name, v in values.items():
            v = np.asarray(v)
            if s == 0:
                shapes[name], dtypes[name] = tuple(v.shape), v.dtype
            if v.dtype.kind == "f":
                stats.setdefault(name, RangeStats()).update(v, 4096 if percentile else 0, rng)
        for n in lstms:  # the unrolled cell's own tensors (see lstm.py)
            for name, v in internals(n, {**lstm_consts, **values}).items():
                stats.setdefault(name, RangeStats()).update(v, 4096 if percentile else 0, rng)
    return Calibrated(model, stats, shapes, dtypes)


def compile_npu_graph(
    onnx_path: str | Path,
    target_name: str,
    calibration,
    percentile: float | None = None,
    show: bool = False,
    balance: float | None = 4.0,
    smooth: bool = True,
):
    """Partition, quantize and compile an ONNX graph for an NPU target.

    Returns ``(tflite_models, vela_models, plan, vela_report)``: one int8 TFLite model per NPU
    partition (plan order), Vela's compiled models (None for targets without an Ethos-U), the
    plan (operators and MACs per device, partitions, CPU ops with reasons, each NPU partition's
    input/output quantization) and Vela's estimates (None without Vela) in totals and per
    partition.
    """
    import onnx

    from edgert.compiler.npu.lower import lower_partition
    from edgert.compiler.npu.quantize import balance_outputs, quantize_graph, smooth_inputs
    from edgert.compiler.npu.tflite_writer import write_tflite
    from edgert.errors import TargetError
    from edgert.targets import load_target

    target = load_target(target_name)
    if target.kind != "npu":
        raise TargetError(f"target '{target_name}' has no NPU (kind = {target.kind!r}); pick an NPU target")
    ops = target.npu.get("ops", "ethos-u")
    model = onnx.load(str(onnx_path))
    data = load_calibration(calibration, model_inputs(model))
    cal = calibrate(model, data, percentile)
    info = GraphInfo(model, cal.shapes, cal.dtypes)
    info.ranges = {name: s.range(percentile) for name, s in cal.stats.items()}
    info.channels = {name: (s.ch_lo, s.ch_hi) for name, s in cal.stats.items() if s.ch_lo is not None}
    parts = plan(info, ops)
    the_plan = plan_dict(parts, target_name, ops)
    tflites = []
    for p, pd in zip(parts, the_plan["partitions"], strict=True):
        if p.device != "npu":
            continue
        g, stat_of = lower_partition(info, p)
        ranges = {ir: cal.stats[src].range(percentile) for ir, src in stat_of.items() if src in cal.stats}
        ranges.update(g.ranges)
        ins, outs = dict(g.scaled_inputs), dict(g.scaled_outputs)
        if balance:
            chans = {
                ir: (cal.stats[src].ch_lo, cal.stats[src].ch_hi)
                for ir, src in stat_of.items()
                if src in cal.stats
                and cal.stats[src].ch_lo is not None
                and not ir.endswith("/nhwc")
                and ir not in g.ranges
            }
            more_ins, more_outs = balance_outputs(g, ranges, chans, balance)
            ins.update(more_ins)
            outs.update(more_outs)
            ins.update(smooth_inputs(g, ranges, chans) if smooth else {})
        if ins or outs:
            pd["boundary_scales"] = {
                "inputs": {n: {"source": s, "divide_by": k.tolist()} for n, (s, k) in ins.items()},
                "outputs": {n: {"multiply_by": k.tolist()} for n, k in outs.items()},
            }
        q = quantize_graph(g, ranges)
        tflites.append(write_tflite(q, description=f"edgert npu partition {p.index}"))
        pd["tflite"] = len(tflites) - 1
        pd["tflite_ops"] = [op.kind for op in q.ops]
        pd["quantization"] = {n: q.tensors[n].q.to_dict() for n in [*q.inputs, *q.outputs]}
        host_kernels(q, pd)
    if show:
        print_plan(the_plan)
    if not target.npu.get("accelerator"):
        return tflites, None, the_plan, None
    from edgert.compiler.npu.vela import compile_for_target

    velas, reports = [], []
    for i, t in enumerate(tflites):
        b, r = compile_for_target(t, target, name=f"partition{i}")
        velas.append(b)
        reports.append(r)
    report = summarize_vela(reports, the_plan)
    if show:
        print_vela(report)
    return tflites, velas, the_plan, report


def summarize_vela(reports: list, the_plan: dict) -> dict:
    """Totals over partitions: ops and MACs on the NPU per Vela, cycles, latency, memory."""
    npu_macs = sum(layer.macs for r in reports for layer in r.layers if layer.target == "NPU")
    vela_cpu_macs = sum(layer.macs for r in reports for layer in r.layers if layer.target != "NPU")
    cpu_macs = the_plan["devices"]["cpu"]["macs"] + vela_cpu_macs
    first = reports[0] if reports else None
    return {
        "source": "Vela's performance estimate (not a measurement)",
        "accelerator": first.accelerator if first else None,
        "clock_hz": first.clock_hz if first else None,
        "system_config": first.system_config if first else None,
        "memory_mode": first.memory_mode if first else None,
        "npu_ops": sum(r.npu_ops for r in reports),
        "cpu_ops_in_partitions": sum(r.cpu_ops for r in reports),
        "cpu_ops_outside_partitions": the_plan["devices"]["cpu"]["ops"],
        "npu_macs": npu_macs,
        "cpu_macs": cpu_macs,
        "npu_mac_share": npu_macs / (npu_macs + cpu_macs) if npu_macs + cpu_macs else 0.0,
        "cycles_total": sum(r.cycles_total for r in reports),
        "latency_ms": sum(r.latency_ms for r in reports),
        "sram_bytes_peak": max((r.sram_bytes for r in reports), default=0.0),
        "flash_bytes": sum(r.flash_bytes for r in reports),
        "dram_bytes": sum(r.dram_bytes for r in reports),
        "partitions": [r.to_dict() for r in reports],
    }


def print_vela(report: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True)
    if not report["partitions"]:
        console.print("Vela: no NPU partition to compile")
        return
    console.print(
        f"{report['accelerator']} @ {report['clock_hz'] / 1e6:.0f} MHz ({report['source']}): "
        f"{report['npu_ops']} NPU ops, {report['cpu_ops_in_partitions']} left on the CPU inside partitions; "
        f"NPU share of MACs {report['npu_mac_share']:.1%}; {report['cycles_total']:,} cycles = "
        f"{report['latency_ms']:.3f} ms; SRAM peak {report['sram_bytes_peak'] / 1024:.1f} KiB, "
        f"flash {report['flash_bytes'] / 1024:.1f} KiB"
    )


def host_kernels(q, pd: dict) -> None:
    """Record in a partition's plan entry which LiteRT kernels run it on a host: the reference ones
    (bit-exact with `reference`), unless they cannot run it (then ``builtin``, with the reason)."""
    from edgert.compiler.npu.reference import litert_reference_problem

    problem = litert_reference_problem(q)
    if problem:
        pd["host_kernels"], pd["host_kernels_reason"] = "builtin", problem
