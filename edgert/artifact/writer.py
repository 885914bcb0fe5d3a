"""Write an artifact atomically: stage the members, hash them, then rename into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from edgert.artifact.format import FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_HASH, sha256_of
from edgert.artifact.signing import SIGNATURE, sign_manifest
from edgert.artifact.tensorfile import ALIGNMENT
from edgert.errors import OutputPathError

# The zip extra field that Android's zipalign uses to pad a local header: the member's data
# then starts on an aligned offset, so the runtime maps aligned tensors straight out of the zip.
_ALIGN_EXTRA_ID = 0xD935


def check_output_path(out: Path, as_dir: bool = False) -> Path:
    """Refuse an output whose folder is missing or not writable, before any work is done."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {out}: the folder {parent} is not writable")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise OutputPathError(f"cannot write {out}: it is a folder that holds something else")
    if as_dir and out.exists() and not out.is_dir():
        raise OutputPathError(f"cannot write a folder artifact at {out}: a file is there")
    return out


def write_artifact(
    out: Path, manifest: dict[str, Any], staged: dict[str, Path], as_dir: bool = False, sign: bool = True
) -> dict[str, Any]:
    """Hash the staged members into the manifest, sign it with the user's key (`edgert.artifact.signing`;
    created on first use) unless ``sign`` is False, write ``out`` (zip or folder) atomically; return the manifest."""
    out = check_output_path(out, as_dir)
    files = {}
    for name, path in staged.items():
        with path.open("rb") as fh:
            files[name] = {"sha256": sha256_of(fh), "size": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    body = json.dumps(manifest, indent=2, sort_keys=False).encode()
    members = {MANIFEST: body, MANIFEST_HASH: hashlib.sha256(body).hexdigest().encode()}
    if sign:
        members[SIGNATURE] = sign_manifest(body)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        if as_dir:
            tmp.chmod(0o755)  # mkdtemp makes it private; an artifact folder is ordinary data
            for name, data in members.items():
                (tmp / name).write_bytes(data)
            for name, path in staged.items():
                shutil.copyfile(path, tmp / name)
            staged_out = tmp
        else:
            staged_out = tmp / "artifact.zip"
            with zipfile.ZipFile(staged_out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, data in members.items():
                    with zf.open(_aligned_info(zf, name, len(data)), "w") as dst:
                        dst.write(data)
                for name, path in staged.items():
                    with zf.open(_aligned_info(zf, name, path.stat().st_size), "w") as dst, path.open("rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
            with staged_out.open("rb") as fh:
                os.fsync(fh.fileno())
        if out.is_dir():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "artifact")
            os.replace(staged_out, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged_out, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored member whose data will start at a multiple of `ALIGNMENT` in the zip (zipalign's way).

    The local header is 30 bytes, the name, then the extra field (with zipfile's own zip64
    record appended for members near 4 GiB); the padding goes into an extra record of its own.
    """
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    info.external_attr = 0o644 << 16
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # the rule zipfile applies when it writes the header
    fixed = 30 + len(name.encode("utf-8")) + 4 + 2 + (20 if zip64 else 0)
    pad = -(zf.fp.tell() + fixed) % ALIGNMENT
    info.extra = struct.pack("<HHH", _ALIGN_EXTRA_ID, 2 + pad, ALIGNMENT) + b"\0" * pad
    return info
