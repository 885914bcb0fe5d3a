"""What both graph runners share (`GraphModel`, and `PartitionedGraph` for NPU artifacts): the
inputs and outputs of the manifest's ``main`` entry, and the checks of the arrays given to them."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.tvm_runtime import to_numpy_view

__all__ = ["GraphInterface", "to_numpy_view"]


class GraphInterface:
    """Input and output specs (``inputs``, ``outputs``: name, dtype, shape) and their checks."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in order."""
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return [o["name"] for o in self.outputs]

    def _check(self, spec: dict[str, Any], value: Any, sizes: dict[str, int]) -> np.ndarray:
        # The common call (a contiguous array of the input's fixed shape and dtype) returns at once:
        # the full check cost ~1 us an input, a few percent of a 0.05 ms graph.
        fixed = self._fixed_specs.get(spec["name"])
        if (
            fixed is not None
            and type(value) is np.ndarray
            and value.shape == fixed[0]
            and value.dtype == fixed[1]
            and value.flags.c_contiguous
        ):
            return value
        name, want = spec["name"], spec["shape"]
        arr = np.ascontiguousarray(np.asarray(value, dtype=spec["dtype"]))
        if arr.ndim != len(want):
            raise EdgertError(f"input '{name}' has shape {list(arr.shape)}; the graph takes rank {len(want)} {want}")
        for axis, (got, dim) in enumerate(zip(arr.shape, want, strict=True)):
            if isinstance(dim, int):
                if got != dim:
                    raise EdgertError(f"input '{name}' has shape {list(arr.shape)}; the graph takes {want}")
            elif sizes.setdefault(dim, got) != got:
                raise EdgertError(
                    f"input '{name}' axis {axis} ('{dim}') is {got}, but another input set '{dim}' to {sizes[dim]}"
                )
        return arr

    @functools.cached_property
    def _fixed_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype] | None]:
        """Each input's shape and dtype when every dimension is fixed (None when one is symbolic)."""
        return {
            spec["name"]: (tuple(spec["shape"]), np.dtype(spec["dtype"]))
            if all(isinstance(d, int) for d in spec["shape"])
            else None
            for spec in self.inputs
        }

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.input_names)

    def _given(self, inputs: Mapping[str, Any] | None, named: dict[str, Any]) -> dict[str, Any]:
        """The arrays by name, refusing unknown and missing inputs."""
        if not named and type(inputs) is dict and inputs.keys() == self._name_set:
            return inputs  # exactly the graph's inputs: nothing to merge or refuse
        given = {**(inputs or {}), **named}
        unknown = sorted(set(given) - set(self.input_names))
        if unknown:
            raise EdgertError(f"unknown input(s) {', '.join(unknown)}; the graph takes {', '.join(self.input_names)}")
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise EdgertError(f"missing input(s) {', '.join(missing)}; the graph takes {', '.join(self.input_names)}")
        return given
