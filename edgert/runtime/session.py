"""A compiled model loaded on a device: the Relax VM, its weights and its paged KV cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.artifact.tensorfile import ALIGNMENT
from edgert.errors import EdgertError
from edgert.runtime import tvm_runtime
from edgert.runtime.threads import AdaptiveThreads, ClaimedLaunch
from edgert.targets import AMX_FLAGS, enable_amx


def configure_threads(threads: int | None, default: int | None = None) -> int:
    """Set up TVM's thread pool (`edgert.runtime.threads`); return the worker count now in use.

    ``threads`` (or ``TVM_NUM_THREADS``) fixes the count; else it follows the cores other
    processes leave free, up to ``default`` (the target's big cores) or every CPU allowed. An
    explicit count outside 1..CPUs is refused (a pool of 100000 threads never finishes starting).
    """
    if threads is not None:
        check_threads(threads)
    return AdaptiveThreads(threads, default).threads


def check_threads(threads: int, cpus: int | None = None) -> None:
    """Refuse a thread count outside 1..the CPUs of this machine, with a one-line error."""
    cpus = cpus or os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise EdgertError(f"--threads {threads}: give a number from 1 to {cpus} (the CPUs of this machine)")


DEVICE_KINDS = ("cpu", "gpu")


def device_kind(artifact: Artifact) -> str:
    """Where an artifact's kernels run: ``gpu`` (an OpenCL device) or ``cpu``."""
    return "gpu" if artifact.target.get("kind") == "gpu" else "cpu"


def check_device_kind(artifact: Artifact, wanted: str | None) -> str:
    """The artifact's device kind, refused with a one-line error when it is not ``wanted`` (None: any)."""
    kind = device_kind(artifact)
    if wanted is not None and wanted not in DEVICE_KINDS:
        raise EdgertError(f"--device-kind '{wanted}' is not one of {', '.join(DEVICE_KINDS)}")
    if wanted is not None and wanted != kind:
        other = "host-opencl (or a GPU target)" if wanted == "gpu" else "host (or a CPU target)"
        raise EdgertError(
            f"{artifact.path} runs its kernels on the {kind.upper()} (target '{artifact.target.get('name')}'); "
            f"for the {wanted.upper()} compile it with --target {other}"
        )
    return kind


class Session:
    """The artifact's library and weights, ready to call its entry points.

    A GPU artifact (``target.kind = "gpu"``) runs its kernels on the first OpenCL device: the
    weights are copied there once at load, the KV cache lives there, inputs go there and outputs
    come back (`tvm_runtime.to_numpy`). Without an OpenCL device it is refused, saying why.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None, device_kind: str | None = None):
        self.artifact = artifact
        self.device_kind = check_device_kind(artifact, device_kind)
        self.pool = AdaptiveThreads(threads, artifact.target.get("threads"))
        if set(AMX_FLAGS) <= set(artifact.target.get("cpu_flags", [])):
            enable_amx()  # before any thread runs a tile instruction (they would die of SIGILL)
        if self.device_kind == "gpu":
            from edgert.runtime import opencl

            self.vm = opencl.virtual_machine(artifact.library_file())
            self.device = tvm_runtime.ffi().device("opencl", 0)
        else:
            library = artifact.library_file()
            self.vm = tvm_runtime.VirtualMachine(library)
            self.device = tvm_runtime.cpu()
            # The library's own parallel launch, where it has one (graphs): robust to a late worker.
            launch = ClaimedLaunch.attach(library)
            if launch is not None:
                self.pool.attach(launch)
        # A private (copy-on-write) mapping: DLPack exports only writable arrays, and the
        # kernels never write their weights, so the pages stay shared with the file cache.
        arrays = artifact.weights(copy_on_write=True)
        self.mapped_weights = 0  # how many weights TVM reads from the artifact's mapping (the rest are copies)
        self.params = [self._weight(arrays[name]) for name in artifact.manifest["weights"]["order"]]

    @property
    def threads(self) -> int:
        """CPU worker threads in use now (they follow the free cores unless the count was forced)."""
        return self.pool.threads

    @property
    def on_gpu(self) -> bool:
        """True when the kernels (and weights, KV cache) are on an OpenCL device."""
        return self.device_kind == "gpu"

    def _weight(self, array: np.ndarray) -> Any:
        """A weight as a TVM tensor: the artifact's mapping itself where it is aligned, else a copy
        (on a GPU: always a copy in the device's memory).

        Artifacts written before tensors were aligned (and any odd tensor) get the copy.
        """
        if self.on_gpu:
            return tvm_runtime.tensor(array, self.device)
        if array.ctypes.data % ALIGNMENT == 0 and array.flags.c_contiguous and array.dtype.isnative:
            try:
                tensor = tvm_runtime.wrap(array)
            except (BufferError, ValueError, RuntimeError):
                pass
            else:
                self.mapped_weights += 1
                return tensor
        return tvm_runtime.tensor(array)

    def tensor(self, array: np.ndarray) -> Any:
        """A numpy array as a tensor on this session's device."""
        return tvm_runtime.tensor(array, self.device)

    def __call__(self, entry: str, *args: Any) -> Any:
        """Call entry point ``entry`` with ``args`` and the weights."""
        return self.pool.run(self.vm[entry], *args, self.params)

    def has_entry(self, entry: str) -> bool:
        """True if the module exports ``entry``."""
        return entry in self.artifact.manifest["entry_points"]


class PagedKVCache:
    """One sequence's paged KV cache (TVM's `PagedAttentionKVCache` object) and its bookkeeping.

    A manifest's ``local`` section (Gemma 3) adds a second cache for the sliding-window layers
    (entry points then take both, `objs`). Its kernels mask each query to its window and it
    keeps every position; with ``free_window`` its sequence slides instead: it keeps the last
    window - 1 positions and frees the pages that slide out, and a step that goes past them must
    be one token (`chunk_limit`).
    """

    _SEQ = 0

    def __init__(
        self,
        session: Session,
        max_length: int,
        prefill_chunk: int,
        page_size: int = 16,
        local: dict[str, Any] | None = None,
        free_window: bool = False,
        rows: int = 1,
        tree: int = 0,
    ):
        self._shape = shape = tvm_runtime.shape
        get = tvm_runtime.global_func
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._popn = get("vm.builtin.kv_state_popn")
        self._clear = get("vm.builtin.kv_state_clear")
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._available = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._commit = get("vm.builtin.attention_kv_cache_commit_accepted_token_tree_nodes")
        self.max_length = max_length
        # A verify pass of up to ``rows`` tokens may run as decode rows (`begin_rows`); the cache
        # then takes that many batch entries.
        self.rows = rows if local is None else 1
        # A token tree of up to ``tree`` nodes may verify in one pass (`begin_tree`); 0: none.
        self.tree = tree if local is None else 0
        self.obj = session.vm["create_kv_cache"](
            shape([self.rows]),
            shape([max_length]),
            shape([prefill_chunk]),
            shape([page_size]),
            shape([0]),
        )
        self.local: Any = None
        self.freed = False
        self.keep = max_length
        if local is not None:
            self.freed = free_window
            self.window = int(local["window"])
            if free_window:
                self.keep = self.window - 1
                self.local = session.vm[local["create_freed"]](
                    shape([1]),
                    shape([min(self.keep, max_length) + prefill_chunk]),  # what it keeps, and a chunk
                    shape([prefill_chunk]),
                    shape([page_size]),
                    shape([1]),  # its sequence slides
                )
                self._slide = get("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
            else:
                self.local = session.vm[local["create"]](
                    shape([1]), shape([max_length]), shape([prefill_chunk]), shape([page_size]), shape([0])
                )
        self.objs: tuple[Any, ...] = (self.obj,) if self.local is None else (self.obj, self.local)
        self._free_pages = [int(self._available(o)) for o in self.objs]
        self._one_token = (shape([self._SEQ]), shape([1]))  # a decode step's arguments, made once
        self._add_sequence()
        self.length = 0

    def _add_sequence(self) -> None:
        for obj in self.objs:
            self._add(obj, self._SEQ)
        if self.freed:
            self._slide(self.local, self._SEQ, self.keep, 0)  # no attention sink

    def begin(self, num_tokens: int) -> None:
        """Announce that the next forward pass appends ``num_tokens`` tokens."""
        args = self._one_token if num_tokens == 1 else (self._shape([self._SEQ]), self._shape([num_tokens]))
        for obj in self.objs:
            self._begin(obj, *args)

    def begin_rows(self, num_tokens: int) -> None:
        """Announce ``num_tokens`` (<= `rows`) consecutive tokens of the sequence as rows of a decode step.

        Each row is a batch entry of the same sequence, so the cache runs its decode kernel and each
        row attends to the prefix and the rows before it as a decode step would, bit for bit
        (`edgert.compiler.passes.attention.rows_append`). Only artifacts whose manifest states
        ``kv_cache.verify_rows`` have the kernels for it.
        """
        if not 1 <= num_tokens <= self.rows:
            raise ValueError(f"{num_tokens} rows do not fit the cache's {self.rows}")
        self._begin(self.obj, self._shape([self._SEQ] * num_tokens), self._shape([1] * num_tokens))

    def begin_tree(self, parents: Sequence[int]) -> None:
        """Announce a token tree (``parents[i]`` < i, node 0 the root at the next position) for a
        ``verify`` pass: node i gets the position of its depth and attends to the prefix and its
        ancestors (`edgert.compiler.passes.attention.paged_tree_attention`), so its logits are the
        decode step's at the end of its path, bit for bit. Close it with `end_tree`.

        TVM's cache runs that kernel only while the sequence holds a tree not yet committed (it then
        appends before attention; a fresh tree takes a ragged kernel and merges two softmaxes, which
        rounds otherwise): the last cached token is popped and reserved again as a one-node tree (its
        keys and values stay in their slot: a pop frees no data and the same slot comes back) and the
        nodes hang below it.
        """
        if not 1 <= len(parents) <= self.tree or self.length < 1:
            raise ValueError(f"a tree of {len(parents)} nodes does not fit the cache's {self.tree} (or it is empty)")
        if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(f"tree parents {list(parents)} are not a rooted tree in topological order")
        seq = self._shape([self._SEQ])
        self._popn(self.obj, self._SEQ, 1)
        self._begin(self.obj, seq, self._shape([1]), self._shape([-1]))
        self._end(self.obj)
        self._begin(self.obj, seq, self._shape([len(parents)]), self._shape([p + 1 for p in parents]))

    def end_tree(self, parents: Sequence[int], leaf: int) -> None:
        """Close a tree pass keeping the path from the root to node ``leaf``: its keys and values move
        to consecutive positions (TVM's compact copy) and the other nodes are dropped.

        TVM's commit copies by the slots of the last forward pass, which here followed the one-node
        tree; so the pass's nodes are dropped (the data stays), reserved again as a tree of their own
        (no kernel runs) and that tree is committed.
        """
        seq = self._shape([self._SEQ])
        self._end(self.obj)
        self._commit(self.obj, seq, self._shape([-1]))  # drops the pass's nodes, closes the open tree
        self._begin(self.obj, seq, self._shape([len(parents)]), self._shape(list(parents)))
        self._end(self.obj)
        self._commit(self.obj, seq, self._shape([leaf]))
        depth, node = 0, leaf
        while node > 0:
            depth, node = depth + 1, parents[node]
        self.length += depth + 1

    def end(self, num_tokens: int) -> None:
        """Close the forward pass started by `begin`."""
        for obj in self.objs:
            self._end(obj)
        self.length += num_tokens

    def rollback(self, num_tokens: int) -> bool:
        """Forget the last ``num_tokens`` tokens (speculative decoding, chat edits).

        False once a sliding local cache has freed positions that the remaining tokens attend
        to: the cache is then empty (`reset`) and the caller prefills again.
        """
        if num_tokens <= 0:
            return True
        if self.freed and self.length > self.keep:
            self.reset()
            return False
        for obj in self.objs:
            self._popn(obj, self._SEQ, num_tokens)
        self.length -= num_tokens
        return True

    def reset(self) -> None:
        """Empty the cache."""
        for obj in self.objs:
            self._clear(obj)
        self._add_sequence()
        self.length = 0

    def chunk_limit(self) -> int | None:
        """The most tokens the next step may append (None: any), with a local cache.

        TVM's masking kernels give a chunk's queries their window only while the chunk is shorter
        than the window (a longer one reads past it: NaN or wrong values); a sliding cache keeps
        window - 1 positions, and a chunk must end before they are full, then steps are one token.
        """
        if self.local is None:
            return None
        if not self.freed:
            return self.window - 1
        return max(self.keep - self.length, 1)

    def pages_in_use(self) -> list[int]:
        """Pages holding keys and values now, per cache (the global one, then a local one)."""
        return [free - int(self._available(o)) for free, o in zip(self._free_pages, self.objs, strict=True)]
