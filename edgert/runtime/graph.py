"""A compiled plain graph (family ``graph``): call it with numpy arrays by input name.

model = edgert.load("minilm.edgert")
out = model(input_ids=ids, attention_mask=mask)   # {"last_hidden_state": array, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.errors import EdgertError
from edgert.runtime.session import Session
from edgert.runtime.tvm_runtime import copy_into, to_numpy


class GraphModel:
    """The artifact's ``main`` entry point as a Python callable over numpy arrays."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.session = Session(artifact, threads=threads)
        entry = artifact.manifest["entry_points"]["main"]
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self._main = self.session.vm["main"]
        # Input tensors per (input, shape): the device tensor, a numpy view of its memory, its address.
        self._buffers: dict[tuple[int, tuple[int, ...]], tuple[Any, np.ndarray, int]] = {}
        # On a GPU the weights and inputs are device buffers: nothing the outputs could alias.
        self._params_ptrs = set() if self.session.on_gpu else {_pointer(_to_numpy(p)) for p in self.session.params}
        self._buffer_ptrs: set[int] = set()

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
        return {k: v.copy() if self._owned(v) else v for k, v in out.items()}

    def _owned(self, arr: np.ndarray) -> bool:
        ptr = _pointer(arr)
        return ptr in self._params_ptrs or ptr in self._buffer_ptrs

    def _input(self, index: int, arr: np.ndarray) -> Any:
        # Input tensors are kept per shape and refilled through a numpy view of their memory: for
        # a streaming model called every 32 ms, allocating them (or `Tensor.copyfrom`, ~30 us
        # of Python each) cost more than its kernels.
        key = (index, arr.shape)
        entry = self._buffers.get(key)
        if entry is None and self.session.on_gpu:  # a device buffer, refilled by a copy
            entry = self._buffers[key] = (self.session.tensor(arr), np.empty(0), 0)
        elif entry is None:
            tensor = self.session.tensor(arr)
            view = _to_numpy(tensor)
            entry = self._buffers[key] = (tensor, view, _pointer(view))
            self._buffer_ptrs.add(entry[2])
        elif self.session.on_gpu:
            copy_into(entry[0], arr)
        elif entry[1].flags.writeable:
            np.copyto(entry[1], arr)
        else:
            copy_into(entry[0], arr)
        return entry[0]


def _pointer(arr: np.ndarray) -> int:
    return int(arr.__array_interface__["data"][0])


def _to_numpy(value: Any) -> np.ndarray:
    """A VM output as numpy without a copy (the VM hands each call fresh output tensors)."""
    try:
        return np.from_dlpack(value)
    except (TypeError, RuntimeError, BufferError):
        return to_numpy(value)


def run_npz(
    path: Any, inputs: Any, outputs: Any, threads: int | None = None, device_kind: str | None = None
) -> dict[str, np.ndarray]:
    """Run the graph artifact at ``path`` on the arrays of the .npz ``inputs`` (by input name) and write its
    outputs to the .npz ``outputs`` (`edgert run GRAPH --inputs IN.npz -o OUT.npz`); the outputs by name."""
    from pathlib import Path

    from edgert.artifact.reader import open_artifact
    from edgert.errors import OutputPathError

    inputs, outputs = Path(inputs), Path(outputs)
    from edgert.runtime.session import check_device_kind

    art = open_artifact(path)
    if art.family != "graph":
        raise EdgertError(f"{path} is a '{art.family}' model; --inputs/--output run graph artifacts")
    check_device_kind(art, device_kind)
    try:
        with np.load(inputs, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise EdgertError(f"cannot read inputs {inputs}: not an .npz file of arrays ({exc})") from exc
    result = GraphModel(art, threads=threads)(feeds)
    if not outputs.absolute().parent.is_dir():
        raise OutputPathError(f"cannot write {outputs}: the folder {outputs.parent} does not exist")
    with outputs.open("wb") as fh:  # a file object keeps numpy from appending .npz to the name
        np.savez(fh, **result)
    return result
