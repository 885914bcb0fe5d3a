"""Reader for CTranslate2's `model.bin` (binary versions 2 to 6), with numpy alone.

The layout, as CTranslate2 writes it (`python/ctranslate2/specs/model_spec.py`,
`ModelSpec._serialize`; read back by `src/models/model.cc`), all little-endian:

    u32 binary_version
    str spec_name, u32 spec_revision                       (version >= 2)
    u32 num_variables, then per variable:
        str name, u8 rank, u32 dims[rank],
        u8 dtype_id, u32 num_bytes                         (version >= 4)
        | u8 item_size, u32 num_items                      (older)
        bytes data
    u32 num_aliases, then per alias: str alias, str target (version >= 3)

where ``str`` is a u16 length (counting a trailing NUL) followed by that many bytes. The file
is memory-mapped: tensors are views into it, not copies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import ModelFileError, UnsupportedModelError, brief

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy
# dtype: its raw 16-bit words are kept and widened by `tensor()`.
_DTYPES: tuple[tuple[str, np.dtype], ...] = (
    ("float32", np.dtype("<f4")),
    ("int8", np.dtype("i1")),
    ("int16", np.dtype("<i2")),
    ("int32", np.dtype("<i4")),
    ("float16", np.dtype("<f2")),
    ("bfloat16", np.dtype("<u2")),
)
MAX_BINARY_VERSION = 6
MAX_RANK = 8  # CTranslate2's tensors have at most 4 dimensions; numpy stops at 64


@dataclass
class CT2Model:
    """A parsed `model.bin`: spec name and revision, variables (memory-mapped) and aliases."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) in self.variables

    def _resolve(self, name: str) -> str:
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def raw(self, name: str) -> np.ndarray:
        """A variable as stored (following aliases)."""
        real = self._resolve(name)
        if real not in self.variables:
            raise ModelFileError(f"{self.path}: variable '{name}' is missing")
        return self.variables[real]

    def tensor(self, name: str) -> np.ndarray:
        """A variable as float32 (int8 weights are dequantized with their `<name>_scale`)."""
        real = self._resolve(name)
        value = self.raw(name)
        kind = self.dtypes[real]
        if kind == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        if kind == "int8" and f"{real}_scale" in self:
            # CTranslate2 quantizes per output row: w ≈ q / scale.
            scale = self.tensor(f"{real}_scale").reshape(-1, *([1] * (value.ndim - 1)))
            return value.astype(np.float32) / scale
        return value.astype(np.float32)

    def scalar(self, name: str, default: Any = None) -> Any:
        """A 0-d or 1-element variable as a Python number, or ``default`` if absent."""
        if name not in self:
            return default
        return self.raw(name).reshape(-1)[0].item()


class _Cursor:
    def __init__(self, path: Path, data: np.ndarray):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > self.data.shape[0]:
            raise ModelFileError(
                f"{self.path}: file is truncated (reading {what} at byte {self.pos} needs {n} bytes, "
                f"{self.data.shape[0] - self.pos} left)"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what).tobytes())

    def u8(self, what: str) -> int:
        return self.unpack("<B", what)[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", what)
        raw = self.take(length, what).tobytes()
        if length == 0 or raw[-1] != 0:
            raise ModelFileError(f"{self.path}: {what} at byte {self.pos - length} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: {what} is not valid UTF-8 (the file is corrupt)") from exc


def read_ct2(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (a file, or the folder holding it with its config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ModelFileError(f"CTranslate2 model not found: {path}")
    if path.stat().st_size < 4:
        raise ModelFileError(f"{path}: file is truncated ({path.stat().st_size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(path, data)
    version = cur.u32("binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ModelFileError(
            f"{path} is not a CTranslate2 model.bin, or of an unknown binary version ({version}; "
            f"edgert reads 1 to {MAX_BINARY_VERSION})"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string("spec name")
        revision = cur.u32("spec revision")
    count = cur.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(count):
        name = cur.string(f"name of variable {i}")
        rank = cur.u8(f"rank of '{name}'")
        if rank > MAX_RANK:
            raise ModelFileError(
                f"{path}: variable '{name}' has rank {rank}, more than {MAX_RANK} (the file is corrupt)"
            )
        shape = cur.unpack(f"<{rank}I", f"shape of '{name}'") if rank else ()
        if version >= 4:
            type_id = cur.u8(f"dtype of '{name}'")
            if type_id >= len(_DTYPES):
                raise ModelFileError(f"{path}: variable '{name}' has unknown dtype id {type_id} (the file is corrupt)")
            kind, dtype = _DTYPES[type_id]
            num_bytes = cur.u32(f"size of '{name}'")
        else:
            item = cur.u8(f"item size of '{name}'")
            by_size = {1: "int8", 2: "float16", 4: "float32"}
            if item not in by_size:
                raise ModelFileError(f"{path}: variable '{name}' has item size {item} (the file is corrupt)")
            kind = by_size[item]
            dtype = dict(_DTYPES)[kind]
            num_bytes = cur.u32(f"size of '{name}'") * item
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if num_bytes != expected:
            raise ModelFileError(
                f"{path}: variable '{name}' holds {num_bytes} bytes, but shape {list(shape)} of {kind} "
                f"needs {expected} (the file is corrupt)"
            )
        variables[name] = cur.take(num_bytes, f"data of '{name}'").view(dtype).reshape(shape)
        dtypes[name] = kind
    aliases: dict[str, str] = {}
    if version >= 3:
        for i in range(cur.u32("alias count")):
            alias = cur.string(f"alias {i}")
            aliases[alias] = cur.string(f"target of alias '{alias}'")
    if cur.pos != data.shape[0]:
        raise ModelFileError(f"{path}: {data.shape[0] - cur.pos} unexpected bytes after the last record")
    config: dict[str, Any] = {}
    config_path = path.parent / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, RecursionError) as exc:
            raise ModelFileError(f"{config_path} is not valid JSON: {brief(exc)}") from exc
        if not isinstance(config, dict):
            raise ModelFileError(f"{config_path} is a JSON {type(config).__name__}, not an object")
    return CT2Model(path, version, spec, revision, variables, dtypes, aliases, config)


def require_spec(model: CT2Model, spec: str) -> None:
    """Refuse a model of another CTranslate2 spec (say, a translation model given as Whisper)."""
    if model.spec != spec:
        raise UnsupportedModelError(f"{model.path}: CTranslate2 spec '{model.spec}' is not {spec}")
