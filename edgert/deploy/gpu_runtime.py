"""edgert's OpenCL runtime library shipped with GPU artifacts (`edgert.runtime.opencl`).

A device that runs a GPU artifact needs ``libedgert_opencl.so`` built for it (its architecture; for
Android, with the NDK) and a vendor OpenCL driver (libOpenCL.so, e.g. Mali's or Adreno's). The host
builds the library when its cache lacks it (``tools/build_opencl_runtime.sh --arch ...``) and sends it
to the agent, which checks the bytes' sha256 against the build's manifest, keeps both in its folder
(``.opencl/``) and loads the library from there (`opencl.verify` checks the sha256 again before the
load). Then the agent finds the OpenCL device, so a device without OpenCL is named before the artifact
is uploaded.

Host side: `ship` (called on deploy) and `host_library`. Device side: the agent's operations
``opencl_info`` and ``opencl_put`` (`agent_op`) and `adopt_shipped`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgert.errors import DeviceError, EdgertError
from edgert.paths import cache_dir
from edgert.runtime import opencl
from edgert.targets import host_arch

SHIPPED = ".opencl"  # in the agent's folder; not an artifact name (those end in .edgert)
BUILD_SCRIPT = Path(__file__).resolve().parent.parent.parent / "tools" / "build_opencl_runtime.sh"


# -- host side -------------------------------------------------------------------------------------


def library_arch(target: dict[str, Any]) -> str:
    """The build of the library a GPU artifact's target needs: android-arm64, aarch64 or x86_64."""
    if "android" in str(target.get("triple", "")):
        return "android-arm64"
    return str(target.get("arch") or host_arch())


def _device_arch(arch: str) -> str:
    return "aarch64" if arch == "android-arm64" else arch


def host_library(arch: str) -> Path:
    """This machine's copy of the library for ``arch``, verified; built first when missing or stale."""
    # $EDGERT_OPENCL_RUNTIME (in library_path) names this machine's library, never a cross build.
    path = opencl.library_path() if arch == host_arch() else cache_dir() / "opencl" / arch / opencl.LIBRARY
    try:
        opencl.verify(path)
        return path
    except EdgertError:
        if path.name != opencl.LIBRARY:
            raise
    if not BUILD_SCRIPT.is_file():
        raise DeviceError(
            f"edgert's OpenCL runtime for {arch} is not built at {path} and this installation has no "
            f"tools/build_opencl_runtime.sh: build it in an edgert checkout with --arch {arch} --out {path.parent}"
        )
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--arch", arch, "--out", str(path.parent)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},  # the wheels' headers
    )
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeviceError(f"cannot build edgert's OpenCL runtime for {arch}: {why[-1] if why else proc.returncode}")
    opencl.verify(path)
    return path


def ship(dev: Any, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Before a GPU artifact goes to ``dev``: send the OpenCL runtime library unless the device holds the
    same bytes, have the agent load it and find its OpenCL device; that device (None: nothing to do)."""
    target = manifest.get("target", {})
    if target.get("kind") != "gpu" or dev.link == "local":  # local: this process loads its own library
        return None
    if dev.hello().get("emulated"):
        return None  # the emulated board refuses GPU artifacts itself, saying why
    arch = library_arch(target)
    lib = host_library(arch)
    meta = json.loads(lib.with_suffix(".json").read_text())
    held = dev.request({"op": "opencl_info"})[0]
    if held.get("sha256") != meta["sha256"]:
        dev.request({"op": "opencl_put", "sha256": meta["sha256"], "manifest": meta}, lib.read_bytes())
    return dev.request({"op": "opencl_info", "load": True, "sha256": meta["sha256"]})[0]["device"]


# -- device side -----------------------------------------------------------------------------------


def shipped_library(root: Path) -> Path:
    """Where the agent with folder ``root`` keeps the library the host sent."""
    return Path(root) / SHIPPED / opencl.LIBRARY


def adopt_shipped(root: Path) -> None:
    """Have this process load the library shipped to ``root`` (if any) rather than its own cache's."""
    path = shipped_library(root)
    if path.is_file():
        opencl.use_library(path)


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def op_opencl_info(agent: Any, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """The shipped library's sha256 (None: none shipped); with ``load``: load it and find the OpenCL device."""
    path = shipped_library(agent.root)
    sha = _file_sha256(path)
    reply: dict[str, Any] = {"sha256": sha, "arch": host_arch()}
    if header.get("load"):
        if sha is not None:
            expected = header.get("sha256")
            if expected is not None and sha != expected:
                raise DeviceError(
                    f"the OpenCL runtime library in {path.parent} does not match the one sent "
                    f"(sha256 {sha[:16]}…, expected {str(expected)[:16]}…)"
                )
            opencl.use_library(path)
        opencl.find_device()  # verifies the sha256 against its manifest, loads it, finds the device
        reply["device"] = opencl.device_info()
        reply["library"] = str(opencl.ensure_loaded())
    return reply, b""


def op_opencl_put(agent: Any, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Keep the library sent (after checking its sha256 and architecture) and use it from now on."""
    meta = dict(header.get("manifest") or {})
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.get("sha256") or digest != meta.get("sha256"):
        raise DeviceError(
            f"the OpenCL runtime library arrived damaged: its sha256 is {digest[:16]}…, "
            f"its build manifest says {str(meta.get('sha256'))[:16]}…"
        )
    if _device_arch(str(meta.get("arch"))) != host_arch():
        raise DeviceError(f"the OpenCL runtime library sent is built for {meta.get('arch')}, not {host_arch()}")
    path = shipped_library(agent.root)
    path.parent.mkdir(exist_ok=True)
    path.parent.chmod(0o755)  # opencl.verify refuses a folder others may write to
    for dest, data, mode in (
        (path, payload, 0o755),
        (path.with_suffix(".json"), (json.dumps(meta, indent=1) + "\n").encode(), 0o644),
    ):
        part = dest.with_name(f".{dest.name}.part")
        part.write_bytes(data)
        part.chmod(mode)
        os.replace(part, dest)
    opencl.use_library(path)
    return {"path": str(path.relative_to(agent.root)), "size": len(payload)}, b""


OPS = {"opencl_info": op_opencl_info, "opencl_put": op_opencl_put}


def agent_op(agent: Any, op: str) -> Any:
    """The agent's handler for ``op`` when it is one of this module's, else None."""
    function = OPS.get(op)
    if function is None:
        return None
    return lambda header, payload: function(agent, header, payload)
