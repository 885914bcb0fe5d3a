"""edgert's OpenCL runtime for TVM: load the library built by ``tools/build_opencl_runtime.sh``.

Why a library of edgert's own: the apache-tvm wheel generates OpenCL C but is built without
OpenCL, so an exported module with OpenCL kernels does not load ("ffi.Module.load_from_bytes.opencl"
is missing) and no tensor can live on ``opencl:0``. ``tvm_opencl.cc`` registers the module
loader, the device API and kernel launch; this module loads it after ``libtvm_runtime.so``
(as `edgert.runtime.tvm_runtime` does, without the `tvm` package).

Native code is loaded only if it is what the build wrote: the manifest next to the library records
its sha256, the source's sha256 and the tvm-ffi version, and the folder and file must not be
writable by anyone but their owner (this user or root).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgert.errors import EdgertError, NoDeviceError
from edgert.paths import cache_dir
from edgert.runtime import tvm_runtime
from edgert.targets import host_arch

LIBRARY = "libedgert_opencl.so"
SOURCE = Path(__file__).with_name("tvm_opencl.cc")
BUILD_HINT = "build it with tools/build_opencl_runtime.sh"
NO_DEVICE = (
    "no OpenCL device found (install pocl-opencl-icd for a CPU emulation, or run on a device with an OpenCL driver)"
)


def library_path(arch: str | None = None) -> Path:
    """Where the library for ``arch`` (default: this machine) is: ``$EDGERT_OPENCL_RUNTIME``, else
    the cache folder the build script writes."""
    if env := os.environ.get("EDGERT_OPENCL_RUNTIME"):
        return Path(env)
    return cache_dir() / "opencl" / (arch or host_arch()) / LIBRARY


def verify(path: Path) -> dict:
    """The library's manifest, after checking that ``path`` is safe and unchanged to load."""
    manifest_path = path.with_suffix(".json")
    if not path.is_file() or not manifest_path.is_file():
        raise EdgertError(f"edgert's OpenCL runtime library {path} is not built ({BUILD_HINT})")
    for p in (path.parent, path, manifest_path):
        st = p.stat()
        if st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise EdgertError(f"refusing to load {path}: {p} is writable by others or owned by another user")
    manifest = json.loads(manifest_path.read_text())
    if _sha256(path) != manifest.get("sha256"):
        raise EdgertError(f"refusing to load {path}: its sha256 differs from its manifest ({BUILD_HINT})")
    if SOURCE.is_file() and hashlib.sha256(SOURCE.read_bytes()).hexdigest() != manifest.get("source_sha256"):
        raise EdgertError(f"{path} was built from another version of {SOURCE.name} ({BUILD_HINT})")
    try:
        ffi_version = version("apache-tvm-ffi")
    except PackageNotFoundError:  # a device with tvm_ffi copied in without its metadata
        ffi_version = manifest.get("apache-tvm-ffi")
    if manifest.get("apache-tvm-ffi") != ffi_version:
        raise EdgertError(
            f"{path} was built for apache-tvm-ffi {manifest.get('apache-tvm-ffi')}, "
            f"this process has {ffi_version} ({BUILD_HINT})"
        )
    return manifest


_lock = threading.Lock()
_chosen: Path | None = None  # set by use_library: the device agent's shipped library
_loaded: Path | None = None


def use_library(path: Path) -> None:
    """Load the runtime from ``path`` rather than `library_path()` (on a device: the library the host
    shipped with a GPU artifact). A process loads one such library: another one's bytes are refused."""
    global _chosen
    path = Path(path)
    with _lock:
        if _loaded is not None and _loaded != path:
            if not path.is_file() or _sha256(path) != _sha256(_loaded):
                raise EdgertError(
                    f"this process runs the OpenCL runtime library {_loaded} already; restart it to load {path}"
                )
        _chosen = path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_loaded() -> Path:
    """Load the OpenCL runtime into this process (once), after the TVM runtime library."""
    global _loaded
    with _lock:
        if _loaded is None:
            path = _chosen or library_path()
            verify(path)
            tvm_runtime.ffi()  # libtvm_runtime.so first: the library resolves TVM's symbols from it
            # RTLD_LOCAL: nothing links against it; loading runs its registrations.
            ctypes.CDLL(str(path), ctypes.RTLD_LOCAL)
            _loaded = path
        return _loaded


def devices() -> list[str]:
    """The OpenCL devices found, as "name | OpenCL version" (device 0 first); may be empty."""
    ensure_loaded()
    return [str(d) for d in tvm_runtime.global_func("edgert.opencl.devices")()]


def find_device() -> str:
    """The OpenCL device models run on (``opencl:0``), or NoDeviceError saying why there is none."""
    found = devices()
    if not found:
        why = str(tvm_runtime.global_func("edgert.opencl.why_none")())
        raise NoDeviceError(f"{NO_DEVICE}: {why}")
    return found[0]


def device(index: int = 0) -> object:
    """``opencl:index`` as a TVM device, after checking that it exists."""
    find_device()
    return tvm_runtime.ffi().device("opencl", index)


# TVM's DeviceAttrKind numbers (tvm/runtime/device_api.h) for the attributes OpenCL answers.
ATTRIBUTES = {
    "exist": 0,
    "max_threads_per_block": 1,
    "warp_size": 2,
    "max_shared_memory_per_block": 3,
    "compute_version": 4,
    "device_name": 5,
    "max_clock_rate": 6,
    "multi_processor_count": 7,
    "max_thread_dimensions": 8,
    "api_version": 11,
    "total_global_memory": 14,
}


def attribute(name: str, index: int = 0) -> object:
    """A device attribute as TVM's runtime reports it (``max_threads_per_block``: the largest
    work-group the device takes), or None where the device does not tell."""
    ensure_loaded()
    return tvm_runtime.global_func("runtime.GetDeviceAttr")(4, index, ATTRIBUTES[name])


def device_info(index: int = 0) -> dict[str, object]:
    """Device ``index``: name, OpenCL version, platform, type (GPU, CPU, ...) and whether it is a CPU
    emulation of OpenCL (PoCL, or any CPU device), whose times say nothing about a GPU's."""
    find_device()
    name, cl_version, platform, kind = (str(v) for v in tvm_runtime.global_func("edgert.opencl.device_info")(index))
    emulated = kind == "CPU" or "Portable Computing Language" in platform or "PoCL" in cl_version
    return {"name": name, "version": cl_version, "platform": platform, "type": kind, "cpu_emulation": emulated}


def emulation_note(info: dict[str, object]) -> str:
    """The caveat a profile made on a CPU device carries ("" on a GPU)."""
    if not info.get("cpu_emulation"):
        return ""
    return (
        f"the OpenCL device is {info['name']} ({info['platform']}, type {info['type']}): a CPU emulation of "
        "OpenCL, so these kernel times say nothing about a phone's or board's GPU"
    )


def start_profiling() -> None:
    """Forget earlier kernel records and the memory peak, then time every kernel launch (a profiling queue)."""
    find_device()
    get = tvm_runtime.global_func
    get("edgert.opencl.profile_clear")()
    get("edgert.opencl.memory_reset_peak")()
    get("edgert.opencl.profiling")(True)


def stop_profiling() -> list[dict[str, object]]:
    """Stop timing launches; per kernel and work sizes: count, total/min/max device ns, global/local sizes."""
    get = tvm_runtime.global_func
    get("edgert.opencl.profiling")(False)
    rows = []
    for r in get("edgert.opencl.profile_records")():
        name, count, total, low, high, *sizes = (str(r[0]), *(int(v) for v in list(r)[1:]))
        rows.append(
            {
                "kernel": name,
                "count": count,
                "total_ns": total,
                "min_ns": low,
                "max_ns": high,
                "global": sizes[0:3],
                "local": sizes[3:6],
                "work_dims": sizes[6],
            }
        )
    return rows


def memory() -> dict[str, int]:
    """Bytes the OpenCL device API holds now, its peak (since load or `start_profiling`), allocations made."""
    ensure_loaded()
    now, peak, allocations = (int(v) for v in tvm_runtime.global_func("edgert.opencl.memory")())
    return {"allocated_bytes": now, "peak_bytes": peak, "allocations": allocations}


def virtual_machine(library: str | Path) -> tvm_runtime.VirtualMachine:
    """The Relax VM of a module whose kernels are OpenCL, on the first OpenCL device (the CPU as host)."""
    find_device()
    return tvm_runtime.VirtualMachine(library, tvm_runtime.OPENCL)
