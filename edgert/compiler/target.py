"""Turn a target description into a TVM target and the record an artifact carries."""

from __future__ import annotations

import platform
import shutil
from typing import Any

from edgert.errors import TargetError
from edgert.targets import (
    AMX_BF16_FLAG,
    AMX_FLAGS,
    ARM_CHECKED_FLAGS,
    X86_CHECKED_FLAGS,
    TargetSpec,
    enable_amx,
    host_arch,
    host_cpu_flags,
)


def resolve(spec: TargetSpec, threads: int | None = None, host_code: bool = False) -> tuple[Any, dict[str, Any]]:
    """(tvm.target.Target, manifest record) for ``spec``; the host's CPU is detected here.

    A GPU target is refused unless ``host_code`` asks for its CPU part (`edgert.compiler.gpu`):
    model builds do not place kernels on the GPU yet, and must not silently build for the CPU.
    """
    import tvm

    if spec.kind != "cpu" and not host_code:
        raise TargetError(
            f"target '{spec.name}' runs kernels on an OpenCL GPU ({spec.gpu}); model builds for GPU targets "
            "are not supported yet"
        )
    from tvm.target import codegen

    if spec.is_host:
        arch = host_arch()
        triple = f"{arch}-linux-gnu" if platform.system() == "Linux" else f"{arch}-unknown-unknown"
        cpu = codegen.llvm_get_system_cpu()  # TVM refuses -mcpu=native; name the CPU instead
        # LLVM names a CPU by its model number, and a virtual machine may report an older model than
        # the features it passes through (AMX on a "rocketlake"): AMX is added from /proc/cpuinfo.
        host = host_cpu_flags()
        amx = [*AMX_FLAGS, AMX_BF16_FLAG] if AMX_BF16_FLAG in host else list(AMX_FLAGS)
        mattr = [f"+{f}" for f in amx] if set(AMX_FLAGS) <= host else []
    else:
        arch, triple, cpu, mattr = spec.arch, spec.triple, spec.cpu, list(spec.features)
    config: dict[str, Any] = {
        "kind": "llvm",
        "mtriple": triple,
        "mcpu": cpu,
        "num-cores": threads or spec.default_threads(),
    }
    if mattr:
        config["mattr"] = mattr
    try:
        target = tvm.target.Target(config)
        features = set(codegen.llvm_get_cpu_features(target))
    except Exception as exc:  # LLVM rejects unknown CPUs and features with assorted errors
        raise TargetError(f"target '{spec.name}': LLVM does not accept cpu '{cpu}' / {mattr}: {exc}") from exc
    checked = X86_CHECKED_FLAGS if arch == "x86_64" else ARM_CHECKED_FLAGS
    if spec.is_host and set(AMX_FLAGS) <= features:
        enable_amx()  # kernels built here may run in this process (tuning, calibration, tests)
    record = {
        "name": spec.name,
        "description": spec.description,
        "arch": arch,
        "triple": triple,
        "cpu": cpu,
        "cpu_flags": sorted(f for f in checked if f in features),
        "threads": threads or spec.default_threads(),
        "link": spec.link,
    }
    return target, record


def library_compiler(spec: TargetSpec, arch: str) -> Any:
    """The `fcompile` for `export_library`: None on the host, the cross toolchain otherwise."""
    if arch == host_arch():
        return None
    if shutil.which(spec.cc) is None:
        raise TargetError(
            f"target '{spec.name}' needs the cross compiler '{spec.cc}', which is not installed"
            + (f" ({spec.cc_hint})" if spec.cc_hint else "")
        )
    from tvm.support import cc

    return cc.cross_compiler(spec.cc)
