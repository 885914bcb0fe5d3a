"""A small op graph in TFLite terms: what `tflite_writer` serializes and `reference` evaluates.

Tensors are named; an op names its inputs and outputs. Int8 activations carry per-tensor
(scale, zero point); constant weights may carry per-channel scales along ``axis``.
Op kinds are TFLite builtin operator names (``FULLY_CONNECTED``, ``ADD`` ...), options use
the schema's field names in snake case (``fused_activation``, ``stride_h``, ``padding`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class QParams:
    """Affine quantization: real = scale * (q - zero_point), per tensor or per channel along ``axis``."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 0

    @classmethod
    def of(cls, scale: float | np.ndarray, zero_point: int | np.ndarray = 0, axis: int = 0) -> QParams:
        s = np.atleast_1d(np.asarray(scale, np.float32))
        z = np.atleast_1d(np.asarray(zero_point, np.int64))
        if z.size == 1 and s.size > 1:
            z = np.zeros(s.size, np.int64) + z[0]
        return cls(s, z, axis)

    @property
    def per_tensor(self) -> tuple[float, int]:
        """(scale, zero point) of a per-tensor quantization."""
        assert self.scale.size == 1, "per-channel quantization where one scale was expected"
        return float(self.scale[0]), int(self.zero_point[0])

    def to_dict(self) -> dict:
        return {"scale": [float(s) for s in self.scale], "zero_point": [int(z) for z in self.zero_point]}


@dataclass
class Tensor:
    """One tensor: shape, element type (int8, int32, float32), quantization, constant data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    q: QParams | None = None
    data: np.ndarray | None = None

    @property
    def is_const(self) -> bool:
        return self.data is not None


@dataclass
class Op:
    """One operator: TFLite builtin name, input and output tensor names, options."""

    kind: str
    inputs: list[str]
    outputs: list[str]
    options: dict = field(default_factory=dict)
    origin: str = ""  # the source graph node(s) it came from


@dataclass
class Graph:
    """Tensors by name, ops in execution order, graph inputs and outputs."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # Set by lowerings that rescale tensors per channel (lstm.py's cell state): calibrated ranges
    # of the rescaled tensors, {new input: (source, k)} the host divides by k, {output: k} it multiplies.
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    scaled_inputs: dict[str, tuple[str, Any]] = field(default_factory=dict)
    scaled_outputs: dict[str, Any] = field(default_factory=dict)

    def add(self, t: Tensor) -> str:
        if t.name in self.tensors:
            raise ValueError(f"tensor '{t.name}' defined twice")
        self.tensors[t.name] = t
        return t.name

    def const(self, name: str, data: np.ndarray, q: QParams | None = None, dtype: str | None = None) -> str:
        data = np.asarray(data)
        return self.add(Tensor(name, tuple(data.shape), dtype or str(data.dtype), q, data))

    def op(self, kind: str, inputs: list[str], outputs: list[str], origin: str = "", **options) -> Op:
        o = Op(kind, list(inputs), list(outputs), options, origin)
        self.ops.append(o)
        return o
