"""A graph artifact compiled for an NPU target (manifest section ``npu``): the plan run in order,
CPU partitions on TVM's runtime, NPU partitions as int8 TFLite models in LiteRT.

    model = edgert.load("minilm-u55.edgert")      # a PartitionedGraph (`open_graph` chooses it)
    out = model(input_ids=ids, attention_mask=mask)

On a host the NPU partitions run on LiteRT's reference kernels, which edgert's integer model of
TFLite matches bit for bit; Ethos-U's Vela-compiled partitions (``ethos-u`` custom ops) run only
on the device's NPU driver. Imports nothing of the compiler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.runtime import tvm_runtime
from edgert.runtime.graph_io import GraphInterface, to_numpy_view
from edgert.runtime.session import configure_threads


class _CpuPart:
    """One CPU partition: its library's ``main`` and its weights."""

    def __init__(self, artifact: Artifact, part: dict[str, Any]):
        self.vm = tvm_runtime.VirtualMachine(artifact.member_file(part["library"]))
        arrays = artifact.tensors(part["weights"], copy_on_write=True)
        self.params = [tvm_runtime.tensor(arrays[name]) for name in part["order"]]
        self.inputs = part["entry"]["inputs"]
        self.outputs = part["entry"]["outputs"]
        self._main = self.vm["main"]

    def __call__(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [
            tvm_runtime.tensor(np.ascontiguousarray(np.asarray(env[s["name"]], dtype=s["dtype"]))) for s in self.inputs
        ]
        result = self._main(*args, *self.params)
        values = [result] if len(self.outputs) == 1 else list(result)
        return {s["name"]: np.array(to_numpy_view(v)) for s, v in zip(self.outputs, values, strict=True)}


class _NpuPart:
    """One NPU partition: its int8 TFLite model in LiteRT, with the boundary scales of its edges."""

    def __init__(self, artifact: Artifact, part: dict[str, Any], delegate: str | None = None):
        from edgert.runtime.litert import open_partition

        # The reference kernels (bit-exact with edgert's integer model) unless the plan says they
        # cannot run this partition (`host_kernels`, with its reason).
        reference = part.get("host_kernels", "reference") == "reference"
        self.model = open_partition(artifact.read_bytes(part["tflite"]), delegate, reference)
        scales = part.get("boundary_scales") or {}
        self.in_scales = {
            n: (s["source"], np.asarray(s["divide_by"], np.float32)) for n, s in scales.get("inputs", {}).items()
        }
        self.out_scales = {n: np.asarray(s["multiply_by"], np.float32) for n, s in scales.get("outputs", {}).items()}

    def __call__(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        local = dict(env)
        for name, (source, k) in self.in_scales.items():
            local[name] = env[source] / k
        outs = self.model(*(np.asarray(local[n]).astype(np.float32) for n in self.model.input_names))
        result = {}
        for name, y in zip(self.model.output_names, outs, strict=True):
            result[name] = y * self.out_scales[name] if name in self.out_scales else y
        return result


class PartitionedGraph(GraphInterface):
    """An NPU artifact's plan as a Python callable over numpy arrays (the interface of `GraphModel`)."""

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        delegate: str | None = None,
        entry: dict[str, Any] | None = None,
    ):
        """``delegate``: a TFLite delegate library for the NPU partitions; by default the one the
        target's ``[npu]`` table names (in the manifest), loaded when the device has it, else the
        partitions run on LiteRT's CPU kernels (said once on stderr). ``entry``: the plan's inputs
        and outputs when they are not the ``main`` entry point (a Whisper encoder's)."""
        self.artifact = artifact
        entry = entry or artifact.manifest["entry_points"]["main"]
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self.npu = artifact.manifest["npu"]
        self.plan = self.npu["plan"]
        self.delegate = delegate or self.npu.get("target", {}).get("delegate")
        parts = self.plan["partitions"]
        self.threads = (
            configure_threads(threads, artifact.target.get("threads"))
            if any(p["device"] == "cpu" for p in parts)
            else None
        )
        self.parts: list[tuple[dict[str, Any], Any]] = [
            (p, _NpuPart(artifact, p, self.delegate) if p["device"] == "npu" else _CpuPart(artifact, p)) for p in parts
        ]

    def run_parts(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every tensor the plan passes between partitions, with the graph inputs (for debugging)."""
        env = dict(feeds)
        for _p, run in self.parts:
            env.update(run(env))
        return env

    def __call__(self, inputs: Mapping[str, Any] | None = None, /, **named: Any) -> dict[str, np.ndarray]:
        """Run the plan on numpy arrays given by input name; return the outputs by name."""
        given = self._given(inputs, named)
        sizes: dict[str, int] = {}
        feeds = {spec["name"]: self._check(spec, given[spec["name"]], sizes) for spec in self.inputs}
        env = self.run_parts(feeds)
        return {spec["name"]: np.array(env[spec["name"]], dtype=spec["dtype"]) for spec in self.outputs}
