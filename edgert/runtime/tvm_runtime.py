"""The TVM runtime as edgert runs models: `tvm_ffi` and ``libtvm_runtime.so``, without the `tvm` package.

Why not ``import tvm``: even with ``TVM_USE_RUNTIME_LIB=1`` it imports 127 Python modules and
registers about 150 object types (0.45 s and 80 MiB peak RSS here, before any model), while
running an artifact needs only the runtime library's global functions: load a module, start its
VM, make tensors, call. `tvm_ffi` (the package TVM's objects and functions are made of) gives
exactly that: 0.1 s and 45 MiB. A process that has imported `tvm` already keeps it; the calls
here then go through the same library.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgert.artifact.tensorfile import ALIGNMENT
from edgert.errors import EdgertError

POOLED_ALLOCATOR = 2  # tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
CPU = 1  # kDLCPU
OPENCL = 4  # kDLOpenCL


@functools.cache
def ffi() -> ModuleType:
    """`tvm_ffi` with ``libtvm_runtime.so`` loaded, so its global functions are registered."""
    module = _import_ffi()
    if "tvm" not in sys.modules:
        # RTLD_GLOBAL as TVM itself loads it: modules loaded later resolve its symbols.
        ctypes.CDLL(str(_runtime_library()), ctypes.RTLD_GLOBAL)
    return module


def _import_ffi() -> ModuleType:
    # ml_dtypes only names bfloat16/float8 numpy dtypes for tvm_ffi (optional there); importing it
    # took 0.5 s of a 0.8 s load to first token (ml_dtypes 0.7).
    return import_without_torch("tvm_ffi", also=("ml_dtypes",))


def import_tvm() -> ModuleType:
    """The whole `tvm` package (the device agent's RPC server needs it), imported without torch."""
    return import_without_torch("tvm")


def import_without_torch(name: str, also: tuple[str, ...] = ()) -> ModuleType:
    """``import name`` with torch (and the optional modules ``also``) kept out of the process,
    unless they are loaded already.

    Why: `tvm_ffi` (imported by `tvm` too) imports torch whenever it is installed (4-7 s and
    300 MiB) for interop a model never uses. The block is lifted afterwards: the program can still
    import torch itself later; only tvm_ffi's optional torch fast paths stay off in this process.
    """
    if name in sys.modules:
        return sys.modules[name]
    blocked = [m for m in ("torch", *also) if m not in sys.modules]
    for module in blocked:
        sys.modules[module] = None  # type: ignore[assignment]  # makes `import module` raise ImportError
    try:
        return importlib.import_module(name)
    finally:
        for module in blocked:
            if sys.modules.get(module, 0) is None:
                del sys.modules[module]


def _runtime_library() -> Path:
    """``libtvm_runtime.so``: from ``TVM_LIBRARY_PATH``, else the installed `tvm` package's lib/."""
    name = "libtvm_runtime.dylib" if sys.platform == "darwin" else "libtvm_runtime.so"
    folders = [Path(p) for p in os.environ.get("TVM_LIBRARY_PATH", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.origin:
        folders += [Path(spec.origin).parent / "lib", Path(spec.origin).parent]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise EdgertError(f"the TVM runtime library {name} was not found (looked in {', '.join(map(str, folders))})")


@functools.cache
def global_func(name: str) -> Any:
    """A function the TVM runtime library registered under ``name`` (looked up once: tensors are
    made and refilled on every decode step)."""
    return ffi().get_global_func(name)


@functools.cache
def cpu() -> Any:
    """The host CPU as a TVM device."""
    return ffi().device("cpu", 0)


def shape(dims: list[int]) -> Any:
    """A TVM shape tuple."""
    return ffi().Shape(dims)


def tensor(array: np.ndarray, device: Any = None) -> Any:
    """A TVM-allocated copy of ``array`` (aligned as the kernels assume), on ``device`` (the CPU)."""
    array = np.ascontiguousarray(array)
    out = global_func("runtime.TVMTensorAllocWithScope")(
        shape(list(array.shape)), str(array.dtype), cpu() if device is None else device, None
    )
    copy_into(out, array)
    return out


def copy_into(out: Any, array: np.ndarray) -> None:
    """Overwrite TVM tensor ``out`` with ``array`` (same shape and dtype)."""
    array = np.ascontiguousarray(array)
    global_func("runtime.TVMTensorCopyFromBytes")(out, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)


def wrap(array: np.ndarray) -> Any:
    """``array`` itself as a TVM tensor (no copy); refused unless 64-byte aligned, contiguous and writable."""
    return ffi().from_dlpack(array, require_alignment=ALIGNMENT, require_contiguous=True)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a TVM tensor (the VM reuses its output buffers on the next call)."""
    try:
        return np.array(np.from_dlpack(value), copy=True)
    except (TypeError, RuntimeError, BufferError):  # a dtype numpy's DLPack import does not take
        out = np.empty(tuple(int(d) for d in value.shape), dtype=str(value.dtype))
        global_func("runtime.TVMTensorCopyToBytes")(value, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out


def to_numpy_view(value: Any) -> np.ndarray:
    """A VM output as numpy without a copy (valid until the VM writes that buffer again); a copy where
    DLPack does not take it (a device tensor, a dtype numpy's import refuses)."""
    try:
        return np.from_dlpack(value)
    except (TypeError, RuntimeError, BufferError):
        return to_numpy(value)


class VirtualMachine:
    """The Relax VM of a compiled module, with pooled memory (the calls `tvm.runtime.vm` makes).

    ``device_type`` (DLPack's number; 4: OpenCL) is where kernels run; the CPU is always the host.
    An OpenCL module loads only after edgert's OpenCL runtime: use `edgert.runtime.opencl.virtual_machine`.
    """

    def __init__(self, library: str | Path, device_type: int = CPU):
        self.module = ffi().load_module(str(library))["vm_load_executable"]()
        host = (CPU, 0, POOLED_ALLOCATOR)
        self.module["vm_initialization"](*(host if device_type == CPU else (device_type, 0, POOLED_ALLOCATOR, *host)))

    def __getitem__(self, name: str) -> Any:
        return self.module[name]

    def set_instrument(self, instrument: Any) -> None:
        """Call ``instrument(func, name, before_run, ret_value, *args)`` around every VM call (0: go on)."""
        self.module["set_instrument"](ffi().convert(instrument))
