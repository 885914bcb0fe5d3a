"""Running a compiled Llama-family model a layer at a time over its paged KV cache.

The artifact exports ``embed``, ``layer_<i>``, ``kv_fill_<i>`` and ``head`` beside the whole-model
entry points. `LayerStack` calls them on a `Generator`'s session and cache, so early exit
and self-speculative drafting run a subset of the layers with the same weights.

KV fill for skipped layers (documented method): a token that leaves the stack after layer e
writes, for every layer i >= e, the keys and values computed from its exit hidden state
(CALM's copy-forward, `kv_fill_<i>`), so later tokens attend to it at every layer. A
speculative draft writes nothing for the layers it skips: its positions are rolled back
(`PagedKVCache.rollback`) before the full model verifies them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from edgert.errors import ArtifactError
from edgert.runtime import tvm_runtime
from edgert.runtime.session import PagedKVCache, Session
from edgert.runtime.tvm_runtime import to_numpy

ADAPTERS_FILE = "exits.safetensors"


class LayerEntries:
    """The layer entry points of one session (``embed``, ``layer_<i>``, ``kv_fill_<i>``, ``head``) over one
    KV cache (anything with the cache object as ``obj``), and the exit adapters applied before the head.

    `LayerStack` runs a decoder-only model's layers, `edgert.runtime.seq2seq_speculative.DecoderLayers`
    an encoder-decoder's decoder layers.
    """

    def __init__(
        self,
        session: Session,
        cache: Any,
        adapters: dict[int, tuple[np.ndarray, np.ndarray]],
        what: str = "layer",
        uses: str = "early exit and self-speculative decoding",
    ):
        manifest = session.artifact.manifest
        if getattr(cache, "freed", False):
            raise ArtifactError(
                f"{session.artifact.path}: {uses} run the layers in chunks, which a sliding-window cache "
                "that frees its window (free_window) does not take"
            )
        if "layer_0" not in manifest["entry_points"]:
            raise ArtifactError(
                f"{session.artifact.path}: the artifact has no {what} entry points (compiled by an older "
                f"edgert); compile it again for {uses}"
            )
        self.session, self.cache = session, cache
        self.num_layers = int(manifest["model"]["num_layers"])
        vm = session.vm
        # One converted parameter list for every call: converting the Python list each time
        # costs ~15 µs, and a layer-wise step makes dozens of calls.
        self._params = tvm_runtime.ffi().convert(session.params)
        self._embed, self._head = vm["embed"], vm["head"]
        self._layers = [vm[f"layer_{i}"] for i in range(self.num_layers)]
        self._fills = [vm[f"kv_fill_{i}"] for i in range(self.num_layers)]
        self.adapters = adapters

    def fill(self, h: Any, layers: Iterable[int]) -> None:
        """Copy-forward: write the KV entries of ``layers`` from the exit hidden state ``h``."""
        for i in layers:
            self._fills[i](h, *self.cache.objs, self._params)  # the caches come back as they went in

    def logits(self, h: Any, depth: int | None = None) -> np.ndarray:
        """Logits [n, vocab] of hidden states after ``depth`` layers (the full stack when None).

        An exit before the last layer goes through that exit's adapter when the artifact has
        one (a tuned lens: ``h + h·W + b`` maps the layer's state towards the final one).
        """
        if depth is not None and depth < self.num_layers and depth in self.adapters:
            w, b = self.adapters[depth]
            x = to_numpy(h)[0]
            # einsum's own loop, not BLAS: a BLAS matmul wakes its worker threads, which on a busy
            # machine wait for a core (measured: 1.2 ms for this 576 x 576 product beside 0.05 ms).
            y = x + np.einsum("ni,ij->nj", x, w, optimize=False) + b
            h = self.session.tensor(np.ascontiguousarray(y[None], dtype=np.float32))
        return to_numpy(self._head(h, self._params))[0]


class LayerStack(LayerEntries):
    """The layer-range entry points of one session, called over one paged KV cache.

    Where the artifact compiled a span of layers as one entry point (``layers_<a>_<b>``,
    ``kv_fill_<a>_<b>``: the spans between the default exit points), a call that covers the
    span makes one VM call for it instead of one per layer.
    """

    def __init__(
        self,
        session: Session,
        cache: PagedKVCache,
        adapters: dict[int, tuple[np.ndarray, np.ndarray]],
        spans: bool = True,
    ):
        super().__init__(session, cache, adapters)
        self._layer_spans = _spans(session, "layers") if spans else {}
        self._fill_spans = _spans(session, "kv_fill") if spans else {}

    def fill(self, h: Any, layers: Iterable[int]) -> None:
        """Copy-forward: write the KV entries of ``layers`` from the exit hidden state ``h``."""
        order, i = list(layers), 0
        while i < len(order):
            fn, width = _widest(self._fill_spans, order, i, self._fills)
            fn(h, *self.cache.objs, self._params)
            i += width

    def embed(self, ids: Sequence[int]) -> Any:
        """Hidden states [1, n, d] (a device tensor) of token ids."""
        return self._embed(self.session.tensor(np.asarray([ids], dtype=np.int32)), self._params)

    def run(self, h: Any, layers: Iterable[int]) -> Any:
        """Apply ``layers`` in order to ``h``, each writing its KV entries for the open forward pass."""
        order, i = list(layers), 0
        while i < len(order):
            fn, width = _widest(self._layer_spans, order, i, self._layers)
            h = fn(h, *self.cache.objs, self._params)[0]  # the caches come back as they went in
            i += width
        return h


_SPAN = re.compile(r"(layers|kv_fill)_(\d+)_(\d+)")


def _spans(session: Session, kind: str) -> dict[int, list[tuple[int, Any]]]:
    """The artifact's ``<kind>_<a>_<b>`` entry points by first layer: [(end, function)], the widest first."""
    found: dict[int, list[tuple[int, Any]]] = {}
    for name in session.artifact.manifest["entry_points"]:
        m = _SPAN.fullmatch(name)
        if m and m.group(1) == kind:
            found.setdefault(int(m.group(2)), []).append((int(m.group(3)), session.vm[name]))
    return {a: sorted(ends, key=lambda x: -x[0]) for a, ends in found.items()}


def _widest(spans: dict[int, list[tuple[int, Any]]], order: list[int], i: int, single: list[Any]) -> tuple[Any, int]:
    """The entry point covering the most of ``order`` from position ``i`` (a span, else one layer) and its width."""
    a = order[i]
    for end, fn in spans.get(a, ()):
        if order[i : i + end - a] == list(range(a, end)):
            return fn, end - a
    return single[a], 1


def _exit_tensors(session: Session) -> dict[str, np.ndarray]:
    """The tensors `edgert calibrate` stored in the artifact (safetensors; {} without calibration)."""
    exits = session.artifact.manifest.get("exits")
    if not exits or not exits.get("adapters"):
        return {}
    from edgert.artifact.tensorfile import read_tensors

    m = session.artifact._member(exits["adapters"])
    return read_tensors(m.path, m.offset, m.size)


def load_adapters(session: Session) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The exit adapters stored in the artifact by `edgert calibrate` ({} without calibration)."""
    arrays = _exit_tensors(session)
    if not arrays:
        return {}
    layers = session.artifact.manifest["exits"]["layers"]
    return {int(e): (arrays[f"exit.{e}.weight"], arrays[f"exit.{e}.bias"]) for e in layers}


def load_probes(session: Session) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The state probes (weight [d+1], bias [1] per exit) stored by `edgert calibrate` ({} without them)."""
    arrays = _exit_tensors(session)
    probes = session.artifact.manifest.get("exits", {}).get("probes", {})
    # Plain in-memory arrays: a check is a dot product, and a memory map's subclass costs more than it.
    return {
        int(e): (np.array(arrays[f"probe.{e}.weight"]), np.array(arrays[f"probe.{e}.bias"]))
        for e in probes.get("layers", [])
    }
