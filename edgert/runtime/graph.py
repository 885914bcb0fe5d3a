"""A compiled plain graph (family ``graph``): call it with numpy arrays by input name.

model = edgert.load("minilm.edgert")
out = model(input_ids=ids, attention_mask=mask)   # {"last_hidden_state": array, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.artifact import Artifact
from edgert.runtime.session import Session


class GraphModel:
    """The artifact's ``main`` entry point as a Python callable over numpy arrays."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.session = Session(artifact, threads=threads)
        entry = artifact.manifest["entry_points"]["main"]
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self._main = self.session.vm["main"]
        self._buffers: dict[tuple[int, tuple[int, ...]], Any] = {}

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in order."""
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return [o["name"] for o in self.outputs]

    def _check(self, spec: dict[str, Any], value: Any, sizes: dict[str, int]) -> np.ndarray:
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

    def __call__(self, inputs: Mapping[str, Any] | None = None, /, **named: Any) -> dict[str, np.ndarray]:
        """Run the graph on numpy arrays given by input name; return the outputs by name."""
        given = {**(inputs or {}), **named}
        unknown = sorted(set(given) - set(self.input_names))
        if unknown:
            raise EdgertError(f"unknown input(s) {', '.join(unknown)}; the graph takes {', '.join(self.input_names)}")
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise EdgertError(f"missing input(s) {', '.join(missing)}; the graph takes {', '.join(self.input_names)}")
        sizes: dict[str, int] = {}
        args = [self._input(i, self._check(spec, given[spec["name"]], sizes)) for i, spec in enumerate(self.inputs)]
        result = self._main(*args, *self.session.params)
        values = [result] if len(self.outputs) == 1 else list(result)
        out = {spec["name"]: _to_numpy(v) for spec, v in zip(self.outputs, values, strict=True)}
        # An output that is an input or a weight (graphs may return them as they are) would alias
        # memory this model reuses: those are copied.
        owned = self._owned_pointers()
        return {k: v.copy() if _pointer(v) in owned else v for k, v in out.items()}

    def _owned_pointers(self) -> set[int]:
        if not hasattr(self, "_params_ptrs"):
            self._params_ptrs = {_pointer(_to_numpy(p)) for p in self.session.params}
        return self._params_ptrs | {_pointer(_to_numpy(b)) for b in self._buffers.values()}

    def _input(self, index: int, arr: np.ndarray) -> Any:
        # Input tensors are kept per shape and refilled: for a streaming model called every
        # 32 ms, allocating them each call cost more than its kernels.
        key = (index, arr.shape)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self.session.tensor(arr)
        else:
            buf.copyfrom(arr)
        return buf


def _pointer(arr: np.ndarray) -> int:
    return int(arr.__array_interface__["data"][0])


def _to_numpy(value: Any) -> np.ndarray:
    """A VM output as numpy without a copy (the VM hands each call fresh output tensors)."""
    try:
        return np.from_dlpack(value)
    except (TypeError, RuntimeError, BufferError):
        return value.numpy()
