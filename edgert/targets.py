"""Device descriptions read from `targets/*.toml`, and what this host is.

Shared by the compiler (which turns a description into a TVM target) and the runtime
(which refuses artifacts built for another architecture or for CPU features it lacks).
Only the standard library is used here, so the runtime stays light.
"""

from __future__ import annotations

import functools
import os
import platform
import struct
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import TargetError
from edgert.paths import TARGETS_DIR

# CPU flags that change which instructions compiled code may use; a runtime checks them.
AMX_FLAGS = ("amx-tile", "amx-int8")
# AMX's bfloat16 tiles (float matmuls split in bfloat16 parts: `edgert.compiler.kernels.bf16`); the same
# permission as the int8 tiles.
AMX_BF16_FLAG = "amx-bf16"
X86_CHECKED_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", *AMX_FLAGS, AMX_BF16_FLAG
)  # fmt: skip
ARM_CHECKED_FLAGS = ("neon", "dotprod", "i8mm", "fullfp16", "sve")
# Linux /proc/cpuinfo spells some flags differently from LLVM.
_CPUINFO_ALIASES = {
    "avx512_vnni": "avx512vnni",
    "amx_tile": "amx-tile",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
    "asimd": "neon",
    "asimddp": "dotprod",
    "fphp": "fullfp16",
}
# aarch64 features as the kernel hands them to every process (auxv AT_HWCAP=16 / AT_HWCAP2=26):
# (auxv key, bit). Read there rather than from /proc/cpuinfo, which an emulator (qemu-user)
# passes through from the host machine unchanged.
_ARM_HWCAPS = {"neon": (16, 1), "fullfp16": (16, 9), "dotprod": (16, 20), "sve": (16, 22), "i8mm": (26, 13)}


@dataclass
class TargetSpec:
    """One device kind: its TVM/LLVM target, toolchain, cores and default link."""

    name: str
    description: str
    arch: str
    triple: str
    cpu: str
    features: list[str] = field(default_factory=list)
    big_cores: int = 0
    cores: int = 0
    memory_gb: float = 0.0
    cc: str = "g++"
    cc_hint: str = ""
    link: str = "local"
    # "cpu"; "gpu": kernels run on an OpenCL device, the CPU runs the host code; "npu": int8
    # partitions run on an accelerator (its `[npu]` table: Vela's accelerator config, clock,
    # system config and memory mode, or a TFLite delegate), the rest on the CPU.
    kind: str = "cpu"
    gpu: str = ""  # for kind "gpu": "mali", "adreno" or "generic" (TVM's opencl target device)
    npu: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def is_host(self) -> bool:
        """True for the `host` description, whose CPU is detected when compiling."""
        return self.cpu == "detect"

    def default_threads(self) -> int:
        """Big cores when the description names them, else every core of this machine."""
        return self.big_cores or self.cores or os.cpu_count() or 1


def list_targets() -> list[TargetSpec]:
    """All target descriptions in `targets/`, by name."""
    return [load_target(p.stem) for p in sorted(TARGETS_DIR.glob("*.toml"))]


def load_target(name: str) -> TargetSpec:
    """The description called ``name``, or a TargetError listing the known ones."""
    path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TARGETS_DIR.glob("*.toml")))
        raise TargetError(f"unknown target '{name}' (known targets: {known})")
    with path.open("rb") as fh:
        raw: dict[str, Any] = tomllib.load(fh)
    raw.setdefault("name", name)
    return TargetSpec(**raw, path=path)


def host_arch() -> str:
    """This machine's architecture as edgert names it (x86_64, aarch64)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_cpu_flags() -> set[str]:
    """CPU flags of this machine from /proc/cpuinfo, in LLVM's spelling."""
    if host_arch() == "aarch64" and (caps := _aarch64_hwcaps()) is not None:
        return caps | {"neon"}
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(_CPUINFO_ALIASES.get(f, f) for f in value.split())
    if host_arch() == "aarch64":
        flags.add("neon")
    return flags


_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def enable_amx() -> None:
    """Ask Linux for this process's permission to use AMX tiles (needed once, before the first tile
    instruction of any thread, or that instruction kills the process with SIGILL)."""
    import ctypes

    if host_arch() != "x86_64" or platform.system() != "Linux":
        raise TargetError("AMX kernels run on x86-64 Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise TargetError(
            f"this Linux kernel refuses AMX tiles to the process (arch_prctl: {os.strerror(ctypes.get_errno())}); "
            "compile the model again with --target host here"
        )


def _aarch64_hwcaps() -> set[str] | None:
    """aarch64 CPU features from this process's auxiliary vector, or None where it cannot be read."""
    try:
        data = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    aux = dict(struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]))
    return {flag for flag, (key, bit) in _ARM_HWCAPS.items() if aux.get(key, 0) >> bit & 1}
