"""The graph the NPU planner works on: units of ONNX nodes, partitions of units, and the
calibrated facts about every tensor (`GraphInfo`); shared by `partition` and `lower`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class Unit:
    """One node, or a fused pattern of nodes, placed as a whole."""

    kind: str
    nodes: list
    inputs: list[str]  # activation inputs (not constants)
    outputs: list[str]
    macs: int = 0
    device: str = "cpu"
    reason: str = ""

    @property
    def name(self) -> str:
        return self.nodes[-1].name or self.nodes[-1].output[0]


@dataclass
class Partition:
    index: int
    device: str
    units: list[Unit]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(u.macs for u in self.units)

    @property
    def n_ops(self) -> int:
        return sum(len(u.nodes) for u in self.units)


class GraphInfo:
    """Constants, shapes and consumers of an ONNX graph (shapes from a calibration run)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]):
        self.model = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.nodes = []
        for n in g.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(next(a for a in n.attribute if a.name == "value").t)
            else:
                self.nodes.append(n)
        self.shapes, self.dtypes = shapes, dtypes
        # calibrated (lo, hi) per tensor, where the planner has them: some lowerings depend on them
        self.ranges: dict[str, tuple[float, float]] = {}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.consts]
        self.graph_outputs = [o.name for o in g.output]
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def only_consumer(self, name: str):
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.graph_outputs else None


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class Unlowerable(Exception):
    """A unit edgert cannot express in TFLite int8 ops (the message says why)."""
