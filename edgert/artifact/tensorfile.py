"""Weights as a safetensors file: a JSON header, then raw little-endian tensors. No pickle.

The layout is the public safetensors format, so any safetensors reader opens the file. It is
written and read here with numpy alone because the device runtime must stay that light; the
reader maps the file instead of copying it.

Every tensor starts on a 64-byte boundary of the file (`ALIGNMENT`): TVM's compiled kernels
assume 64-byte aligned buffers (`tvm.runtime.from_dlpack` refuses less), so aligned tensors are
handed to TVM straight from the mapping, without a copy. safetensors allows no holes between
tensors, so the gaps are small uint8 tensors named ``__pad__.N`` that `read_tensors` skips;
the header is padded with spaces, as the format permits.
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
ALIGNMENT = 64
PAD_PREFIX = "__pad__."


def write_tensors(fh: BinaryIO, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in the given order) in safetensors layout to an open binary file.

    Tensor data starts at multiples of `ALIGNMENT` counted from the start of the safetensors
    data, which is itself aligned when ``fh`` is positioned on a multiple of `ALIGNMENT`.
    """
    header: dict[str, object] = {"__metadata__": metadata or {}}
    layout: list[tuple[int, np.ndarray | None]] = []  # (padding bytes before, tensor)
    offset = 0
    for name, arr in tensors.items():
        dtype = _NAMES.get(np.dtype(arr.dtype).newbyteorder("<").str)
        if dtype is None:
            raise ValueError(f"tensor '{name}': dtype {arr.dtype} cannot be stored")
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor '{name}': names starting with '{PAD_PREFIX}' are reserved for padding")
        gap = -offset % ALIGNMENT
        if gap:
            pad = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            header[f"{PAD_PREFIX}{len(layout)}"] = pad
            offset += gap
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        layout.append((gap, arr))
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    start = fh.tell() if fh.seekable() else 0
    blob += b" " * (-(start + 8 + len(blob)) % ALIGNMENT)
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for gap, arr in layout:
        fh.write(b"\0" * gap)
        fh.write(np.ascontiguousarray(arr).astype(np.dtype(arr.dtype).newbyteorder("<"), copy=False).tobytes())


def read_tensors(
    path: str | Path, offset: int = 0, size: int | None = None, copy_on_write: bool = False
) -> dict[str, np.ndarray]:
    """Map the tensors of a safetensors file (or of a stored member at ``offset`` in a zip).

    The arrays are read-only views of the file; with ``copy_on_write`` they are writable views
    of a private mapping (writes stay in this process), which DLPack can export to TVM.
    """
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
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{path}: weights header is not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: weights header is a JSON {type(header).__name__}, not an object")
    base = offset + 8 + length
    avail = total - 8 - length
    entries = {name: _entry(path, name, info, avail) for name, info in header.items() if name != "__metadata__"}
    if avail == 0:  # numpy cannot map zero bytes; only empty tensors fit
        data = np.zeros(0, np.uint8)
    else:
        data = np.memmap(path, dtype=np.uint8, mode="c" if copy_on_write else "r", offset=base, shape=(avail,))
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, start, end) in entries.items():
        if name.startswith(PAD_PREFIX):
            continue
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def _sizes(xs: object) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def _entry(path: Path, name: str, info: object, avail: int) -> tuple[np.dtype, list[int], int, int]:
    """One tensor record of the header, checked: known dtype, shape, offsets inside the data."""
    where = f"{path}: weights tensor '{name}'"
    if not isinstance(info, dict):
        raise ArtifactError(f"{where} is described by a {type(info).__name__}, not an object")
    kind, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(kind, str) or kind not in _DTYPES:
        raise ArtifactError(f"{where} has dtype {kind!r}, which edgert does not read ({', '.join(_DTYPES)})")
    if not _sizes(shape) or not _sizes(offsets) or len(offsets) != 2:
        raise ArtifactError(f"{where} has a malformed shape or data_offsets")
    start, end = offsets
    dtype = np.dtype(_DTYPES[kind]).newbyteorder("<")
    if not start <= end <= avail:
        raise ArtifactError(f"{where} runs past the end of the weights")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != end - start:
        raise ArtifactError(
            f"{where} holds {end - start} bytes, but shape {shape} of {kind} needs {count * dtype.itemsize}"
        )
    return dtype, shape, start, end
