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
        args = [self.session.tensor(self._check(spec, given[spec["name"]], sizes)) for spec in self.inputs]
        result = self._main(*args, *self.session.params)
        values = [result] if len(self.outputs) == 1 else list(result)
        return {spec["name"]: v.numpy() for spec, v in zip(self.outputs, values, strict=True)}
