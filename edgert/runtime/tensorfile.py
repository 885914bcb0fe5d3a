"""Weights as a safetensors file: a JSON header, then raw little-endian tensors. No pickle.

The layout is the public safetensors format, so any safetensors reader opens the file. It is
written and read here with numpy alone because the device runtime must stay that light; the
reader maps the file instead of copying it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgert.errors import ArtifactError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "I64": np.int64,
    "U32": np.uint32,
}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def write_tensors(fh: BinaryIO, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in the given order) in safetensors layout to an open binary file."""
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name, arr in tensors.items():
        dtype = _NAMES.get(np.dtype(arr.dtype).newbyteorder("<").str)
        if dtype is None:
            raise ValueError(f"tensor '{name}': dtype {arr.dtype} cannot be stored")
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for arr in tensors.values():
        fh.write(np.ascontiguousarray(arr).astype(np.dtype(arr.dtype).newbyteorder("<"), copy=False).tobytes())


def read_tensors(path: str | Path, offset: int = 0, size: int | None = None) -> dict[str, np.ndarray]:
    """Map the tensors of a safetensors file (or of a stored member at ``offset`` in a zip)."""
    path = Path(path)
    total = (path.stat().st_size - offset) if size is None else size
    with path.open("rb") as fh:
        fh.seek(offset)
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: weights are truncated (no header)")
        (length,) = struct.unpack("<Q", head)
        if length > total - 8:
            raise ArtifactError(f"{path}: weights header claims {length} bytes, more than the file holds")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise ArtifactError(f"{path}: weights header is not valid JSON: {exc}") from exc
    base = offset + 8 + length
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=base, shape=(total - 8 - length,))
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise ArtifactError(f"{path}: tensor '{name}' runs past the end of the weights")
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out
