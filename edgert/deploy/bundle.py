"""What is shipped to a device: edgert's runtime side, the agent, the target files and the public keys
this host trusts (the device then trusts the artifacts they signed), as one tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from edgert.artifact.signing import SHIPPED, trusted_keys
from edgert.paths import TARGETS_DIR

# The device side: no compiler, frontend or CLI; the families' runtime tasks are there, their
# builds are not (`RUNTIME_EXCLUDE`).
RUNTIME_PARTS = (
    "__init__.py",
    "version.py",
    "errors.py",
    "paths.py",
    "targets.py",
    "artifact",
    "runtime",
    "families",
    "deploy",
    "profile",
)
RUNTIME_EXCLUDE = (
    "build.py", "model.py", "loader.py", "mimi.py", "ct2.py", "assets.py", "seq2seq.py", "kernels.py", "transformer.py",
    "lower.py", "npu.py", "calibrate.py", "calibration.py", "kv_cache.py",
)  # fmt: skip


def runtime_tar() -> bytes:
    """edgert's runtime side and agent (no compiler, frontend or family builds) as an uncompressed tar."""
    buf = io.BytesIO()
    package = Path(__file__).resolve().parent.parent
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for part in RUNTIME_PARTS:
            path = package / part
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py"))
            files = [f for f in files if not (f.parent.parent.name == "families" and f.name in RUNTIME_EXCLUDE)]
            for f in files:
                tar.add(f, arcname=str(Path("edgert") / f.relative_to(package)))
        for f in sorted(TARGETS_DIR.glob("*.toml")):
            tar.add(f, arcname=f"targets/{f.name}")
        for fp, public in trusted_keys().items():
            data = public.hex().encode() + b"\n"
            info = tarfile.TarInfo(f"{SHIPPED}/{fp}.pub")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
