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
            h = self.session.tensor(np.ascontiguousarray((x + x @ w + b)[None], dtype=np.float32))
        return to_numpy(self._head(h, self._params))[0]


class LayerStack(LayerEntries):
    """The layer-range entry points of one session, called over one paged KV cache."""

    def __init__(self, session: Session, cache: PagedKVCache, adapters: dict[int, tuple[np.ndarray, np.ndarray]]):
        super().__init__(session, cache, adapters)

    def embed(self, ids: Sequence[int]) -> Any:
        """Hidden states [1, n, d] (a device tensor) of token ids."""
        return self._embed(self.session.tensor(np.asarray([ids], dtype=np.int32)), self._params)

    def run(self, h: Any, layers: Iterable[int]) -> Any:
        """Apply ``layers`` in order to ``h``, each writing its KV entries for the open forward pass."""
        for i in layers:
            h = self._layers[i](h, *self.cache.objs, self._params)[0]
        return h


def load_adapters(session: Session) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The exit adapters stored in the artifact by `edgert calibrate` ({} without calibration)."""
    exits = session.artifact.manifest.get("exits")
    if not exits or not exits.get("adapters"):
        return {}
    from edgert.artifact.tensorfile import read_tensors

    m = session.artifact._member(exits["adapters"])
    arrays = read_tensors(m.path, m.offset, m.size)
    return {int(e): (arrays[f"exit.{e}.weight"], arrays[f"exit.{e}.bias"]) for e in exits["layers"]}
