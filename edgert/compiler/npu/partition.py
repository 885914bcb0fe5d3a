"""Split an ONNX graph into NPU partitions (int8 TFLite) and CPU work.

Nodes are first grouped into units (a node, or a fused pattern: MatMul + bias Add = one
FULLY_CONNECTED, the exact-erf GELU's five nodes = one GELU). A unit goes to the NPU when edgert
lowers it to TFLite ops the accelerator runs (Vela's supported-operator list for Ethos-U, the
NNAPI list for phones), its tensors are float with static shapes, and it has at most 4
dimensions; otherwise it stays on the CPU with the reason. Units are then ordered
topologically, preferring to continue the current device, and consecutive units of one
device form a partition, so partitions are maximal and never form a cycle. NPU partitions
without any multiply-accumulate (reshapes, a lone add) stay on the CPU: the round trip costs
more than they save. Nothing is dropped: every node is in exactly one partition.

LayerNormalization stays on the CPU: int8 mean/variance/RSQRT loses the accuracy a transformer
needs, and it holds a negligible share of the MACs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from edgert.compiler.npu.graph import GraphInfo, Partition, Unit, attr

# ONNX op types (or fused units) edgert lowers to TFLite int8 ops, per accelerator family.
_COMMON = {
    "MatMul",
    "Linear",
    "Gemm",
    "Conv",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Cast",
    "LSTM",
    "Pad",
    "Slice",
    "Elu",
}
SUPPORTED = {
    # Vela 5.2 SUPPORTED_OPS.md (TFLite, Ethos-U55/U65/U85): FULLY_CONNECTED, BATCH_MATMUL, CONV_2D,
    # DEPTHWISE_CONV_2D, ADD, SUB, MUL, SOFTMAX, LOGISTIC, TANH, GELU, RELU, RELU6, RESHAPE, TRANSPOSE,
    # pools, CONCATENATION, PAD.
    "ethos-u": _COMMON | {"Gelu"},
    # NNAPI (Android 11+ feature level 4+): no GELU operation; it would fall back to the CPU.
    "nnapi": set(_COMMON),
}


def _scalar(info: GraphInfo, name: str) -> float | None:
    c = info.const(name)
    return float(c.ravel()[0]) if c is not None and c.size == 1 else None


def _other(node, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _match_gelu(info: GraphInfo, div) -> list | None:
    """Div(x, √2) → Erf → Add(1) → Mul(x) → Mul(0.5), as exporters write the exact GELU."""
    if div.op_type != "Div" or not np.isclose(_scalar(info, div.input[1]) or 0, np.sqrt(2), rtol=1e-4):
        return None
    x = div.input[0]
    erf = info.only_consumer(div.output[0])
    if erf is None or erf.op_type != "Erf":
        return None
    add = info.only_consumer(erf.output[0])
    if add is None or add.op_type != "Add" or _scalar(info, _other(add, erf.output[0])) != 1.0:
        return None
    mul = info.only_consumer(add.output[0])
    if mul is None or mul.op_type != "Mul" or _other(mul, add.output[0]) != x:
        return None
    half = info.only_consumer(mul.output[0])
    if half is None or half.op_type != "Mul" or _scalar(info, _other(half, mul.output[0])) != 0.5:
        return None
    return [div, erf, add, mul, half]


def _lstm_chains(info: GraphInfo) -> dict[int, list]:
    """{id of an LSTM node: the constant-only nodes computing its weights, which its unit takes along}."""
    from edgert.compiler.npu.lstm import weight_chain

    chains = {}
    for n in info.nodes:
        if n.op_type == "LSTM" and (chain := weight_chain(info, n)) is not None:
            chains[id(n)] = chain
    return chains


def build_units(info: GraphInfo) -> list[Unit]:
    """Nodes grouped into units, in graph order."""
    used: set[int] = set()
    chains = _lstm_chains(info)
    for chain in chains.values():
        used.update(id(m) for m in chain)
    units = []
    for n in info.nodes:
        if id(n) in used:
            continue
        nodes, kind = [n], n.op_type
        if id(n) in chains:
            nodes = [*chains[id(n)], n]
        elif (gelu := _match_gelu(info, n)) is not None:
            nodes, kind = gelu, "Gelu"
        elif n.op_type == "MatMul" and info.const(n.input[1]) is not None and info.const(n.input[1]).ndim == 2:
            add = info.only_consumer(n.output[0])
            bias = info.const(_other(add, n.output[0])) if add is not None and add.op_type == "Add" else None
            if bias is not None and bias.ndim == 1 and bias.shape[0] == info.const(n.input[1]).shape[1]:
                nodes, kind = [n, add], "Linear"
        used.update(id(m) for m in nodes)
        produced = {o for m in nodes for o in m.output}
        ins = [i for m in nodes for i in m.input if i and i not in produced and i not in info.consts]
        outs = [
            o
            for m in nodes
            for o in m.output
            if o in info.graph_outputs or any(id(c) not in {id(x) for x in nodes} for c in info.consumers.get(o, []))
        ]
        units.append(Unit(kind, nodes, list(dict.fromkeys(ins)), outs))
    return units


def unit_macs(info: GraphInfo, u: Unit) -> int:
    """Multiply-accumulates of a unit (matrix products and convolutions; 0 for the rest)."""
    n = u.nodes[-1] if u.kind == "LSTM" else u.nodes[0]
    if n.op_type in ("LSTM", "GRU"):  # weights may be computed (Unsqueeze of constants): use shapes
        x, w, r = (info.shapes.get(i) or getattr(info.const(i), "shape", None) for i in n.input[:3])
        if x is None or w is None or r is None:
            return 0
        return int(x[0] * x[1]) * int(w[0] * w[1]) * int(w[2] + r[2])
    out = info.shapes.get(n.output[0])
    if out is None:
        return 0
    if n.op_type in ("MatMul", "Gemm"):
        a = info.shapes.get(n.input[0]) or info.const(n.input[0]).shape
        k = a[-1] if not (n.op_type == "Gemm" and attr(n, "transA", 0)) else a[0]
        return int(np.prod(out)) * int(k)
    if n.op_type == "Conv":
        w = info.const(n.input[1])
        if w is None:
            return 0
        return int(np.prod(out)) * int(np.prod(w.shape[1:]))
    return 0


def unit_reason(info: GraphInfo, u: Unit, ops: str) -> str:
    """Why a unit stays on the CPU ("" when the NPU takes it)."""
    if u.kind not in SUPPORTED[ops]:
        return f"{u.kind} is not lowered to an int8 op for {ops}"
    for t in [*u.inputs, *u.outputs]:
        if t not in info.shapes:
            return f"no static shape for '{t}'"
        if np.dtype(info.dtypes[t]) != np.float32:
            return f"'{t}' is {np.dtype(info.dtypes[t])}, not float"
        if len(info.shapes[t]) > 4:
            return f"'{t}' has {len(info.shapes[t])} dimensions (at most 4)"
    if not u.inputs:
        return "only constant inputs"
    from edgert.compiler.npu.lower import lowering_problem

    return lowering_problem(info, u) or ""


def _order(units: list[Unit]) -> list[list[Unit]]:
    """Units in a topological order that keeps devices together; runs of one device."""
    producer = {o: i for i, u in enumerate(units) for o in u.outputs}
    deps = [{producer[t] for t in u.inputs if t in producer} for u in units]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    runs: list[list[Unit]] = []
    current = None
    while ready:
        same = [i for i in ready if units[i].device == current]
        i = min(same) if same else min(ready)
        ready.remove(i)
        if units[i].device != current or not runs:
            runs.append([])
            current = units[i].device
        runs[-1].append(units[i])
        for j in users.get(i, []):
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    return runs


def plan(info: GraphInfo, ops: str = "ethos-u") -> list[Partition]:
    """Partitions of the graph, NPU and CPU, in an order that runs."""
    units = build_units(info)
    for u in units:
        u.macs = unit_macs(info, u)
        u.reason = unit_reason(info, u, ops)
        u.device = "cpu" if u.reason else "npu"
    while True:
        runs = _order(units)
        idle = [r for r in runs if r[0].device == "npu" and sum(u.macs for u in r) == 0]
        if not idle:
            break
        for r in idle:
            for u in r:
                u.device, u.reason = "cpu", "its NPU run has no MACs (not worth a partition)"
    parts = []
    for i, run in enumerate(runs):
        produced = {o for u in run for o in u.outputs}
        inside = {id(n) for u in run for n in u.nodes}
        ins = [t for u in run for t in u.inputs if t not in produced]
        outs = [
            o
            for u in run
            for o in u.outputs
            if o in info.graph_outputs or any(id(c) not in inside for c in info.consumers.get(o, []))
        ]
        parts.append(Partition(i, run[0].device, run, list(dict.fromkeys(ins)), outs))
    return parts


def plan_dict(parts: list[Partition], target: str, ops: str) -> dict:
    """The plan as plain data for an artifact manifest: operators and MACs per device."""
    devices = {d: {"ops": 0, "macs": 0, "partitions": 0} for d in ("npu", "cpu")}
    for p in parts:
        devices[p.device]["ops"] += p.n_ops
        devices[p.device]["macs"] += p.macs
        devices[p.device]["partitions"] += 1
    total = devices["npu"]["macs"] + devices["cpu"]["macs"]
    return {
        "target": target,
        "ops": ops,
        "partitions": [
            {
                "index": p.index,
                "device": p.device,
                "nodes": [n.name or n.output[0] for u in p.units for n in u.nodes],
                "op_types": dict(Counter(u.kind for u in p.units)),
                "macs": p.macs,
                "inputs": p.inputs,
                "outputs": p.outputs,
            }
            for p in parts
        ],
        "devices": devices,
        "npu_mac_share": devices["npu"]["macs"] / total if total else 0.0,
        "cpu_ops": [
            {"node": n.name or n.output[0], "op": n.op_type, "reason": u.reason}
            for p in parts
            if p.device == "cpu"
            for u in p.units
            for n in u.nodes
        ],
    }


def print_plan(plan: dict, console=None) -> None:
    """The plan as a table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(
        "#",
        "device",
        "ops",
        "op types",
        "MACs",
        "inputs → outputs",
        title=f"partition plan for {plan['target']} ({plan['ops']})",
    )
    for p in plan["partitions"]:
        kinds = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in p["op_types"].items())
        table.add_row(
            str(p["index"]),
            p["device"],
            str(len(p["nodes"])),
            kinds,
            f"{p['macs']:,}",
            f"{len(p['inputs'])} → {len(p['outputs'])}",
        )
    console.print(table)
    d = plan["devices"]
    console.print(
        f"NPU: {d['npu']['ops']} ops, {d['npu']['macs']:,} MACs in {d['npu']['partitions']} partitions; "
        f"CPU: {d['cpu']['ops']} ops, {d['cpu']['macs']:,} MACs; "
        f"NPU share of MACs {plan['npu_mac_share']:.1%}"
    )
