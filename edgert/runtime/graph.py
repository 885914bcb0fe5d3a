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
from edgert.runtime.graph_io import GraphInterface, to_numpy_view
from edgert.runtime.session import Session
from edgert.runtime.tvm_runtime import copy_into


def open_graph(artifact: Artifact, threads: int | None = None) -> GraphInterface:
    """The graph family's runtime task: a `GraphModel`, or for an artifact built for an NPU target
    (a manifest with an ``npu`` section) a `edgert.runtime.partitioned.PartitionedGraph`, which
    has the same interface."""
    if "npu" in artifact.manifest:
        from edgert.runtime.partitioned import PartitionedGraph

        return PartitionedGraph(artifact, threads=threads)
    return GraphModel(artifact, threads=threads)


class GraphModel(GraphInterface):
    """The artifact's ``main`` entry point as a Python callable over numpy arrays."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.session = Session(artifact, threads=threads)
        entry = artifact.manifest["entry_points"]["main"]
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self._main = self.session.vm["main"]
        # Input tensors per (input, shape): the device tensor and a numpy view of its memory.
        self._buffers: dict[tuple[int, tuple[int, ...]], tuple[Any, np.ndarray]] = {}
        self._out_names = [spec["name"] for spec in self.outputs]
        # Addresses of the weights and input buffers, which an output may alias (by `Tensor.data_ptr`,
        # ~0.1 us, where numpy's `__array_interface__` took ~2.4 us a call). On a GPU the weights and
        # inputs are device buffers: nothing the outputs could alias.
        self._held_ptrs: set[int] = set() if self.session.on_gpu else {p.data_ptr() for p in self.session.params}

    def __call__(self, inputs: Mapping[str, Any] | None = None, /, **named: Any) -> dict[str, np.ndarray]:
        """Run the graph on numpy arrays given by input name; return the outputs by name."""
        given = self._given(inputs, named)
        sizes: dict[str, int] = {}
        args = [self._input(i, self._check(spec, given[spec["name"]], sizes)) for i, spec in enumerate(self.inputs)]
        # The entry is called directly, not through Session.__call__ (which would look it up again).
        result = self.session.pool.run(self._main, *args, *self.session.params)
        values = (result,) if len(self._out_names) == 1 else tuple(result)
        # An output that is an input or a weight (graphs may return them as they are) would alias
        # memory this model reuses: those are copied.
        held = self._held_ptrs
        return {
            name: to_numpy_view(v).copy() if v.data_ptr() in held else to_numpy_view(v)
            for name, v in zip(self._out_names, values, strict=True)
        }

    def _input(self, index: int, arr: np.ndarray) -> Any:
        # Input tensors are kept per shape and refilled through a numpy view of their memory: for
        # a streaming model called every 32 ms, allocating them (or `Tensor.copyfrom`, ~30 us
        # of Python each) cost more than its kernels.
        key = (index, arr.shape)
        entry = self._buffers.get(key)
        if entry is None and self.session.on_gpu:  # a device buffer, refilled by a copy
            entry = self._buffers[key] = (self.session.tensor(arr), np.empty(0))
        elif entry is None:
            tensor = self.session.tensor(arr)
            view = to_numpy_view(tensor)
            entry = self._buffers[key] = (tensor, view)
            self._held_ptrs.add(tensor.data_ptr())
        elif self.session.on_gpu:
            copy_into(entry[0], arr)
        elif entry[1].flags.writeable:
            np.copyto(entry[1], arr)
        else:
            copy_into(entry[0], arr)
        return entry[0]


def run_npz(
    path: Any, inputs: Any, outputs: Any, threads: int | None = None, device_kind: str | None = None
) -> dict[str, np.ndarray]:
    """Run the graph artifact at ``path`` on the arrays of the .npz ``inputs`` (by input name) and write its
    outputs to the .npz ``outputs`` (`edgert run GRAPH --inputs IN.npz -o OUT.npz`); the outputs by name."""
    from pathlib import Path

    from edgert.artifact.reader import open_artifact
    from edgert.errors import OutputPathError
    from edgert.runtime.session import check_device_kind

    inputs, outputs = Path(inputs), Path(outputs)
    art = open_artifact(path)
    if art.family != "graph":
        raise EdgertError(f"{path} is a '{art.family}' model; --inputs/--output run graph artifacts")
    check_device_kind(art, device_kind)
    try:
        with np.load(inputs, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise EdgertError(f"cannot read inputs {inputs}: not an .npz file of arrays ({exc})") from exc
    result = open_graph(art, threads=threads)(feeds)
    if not outputs.absolute().parent.is_dir():
        raise OutputPathError(f"cannot write {outputs}: the folder {outputs.parent} does not exist")
    with outputs.open("wb") as fh:  # a file object keeps numpy from appending .npz to the name
        np.savez(fh, **result)
    return result
