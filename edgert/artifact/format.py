"""The artifact format: its name and version, member names, hashing, and the typed manifest.

Both the compiler (which writes artifacts) and the runtime (which reads them) import this
module; it needs the standard library only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from edgert.errors import ArtifactError

FORMAT = "edgert-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
_CHUNK = 1 << 22


def sha256_of(fh: Any, size: int | None = None) -> str:
    """sha256 of a binary stream, reading at most ``size`` bytes."""
    digest = hashlib.sha256()
    left = size
    while left is None or left > 0:
        block = fh.read(_CHUNK if left is None else min(_CHUNK, left))
        if not block:
            break
        digest.update(block)
        if left is not None:
            left -= len(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    """The fields every artifact's ``manifest.json`` has, typed; family sections stay in ``sections``.

    ``sections`` holds what a family adds (``model``, ``kv_cache``, ``tokenizer``, ``codec``,
    ``graph``, ...) under the same keys as in the JSON, so `to_dict` writes the same document.
    """

    name: str
    family: str
    target: dict[str, Any]
    entry_points: dict[str, Any] = field(default_factory=dict)
    library: str = "model.so"
    weights: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    tvm_version: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    sections: dict[str, Any] = field(default_factory=dict)

    _TYPES: ClassVar[dict[str, type]] = {
        "name": str,
        "family": str,
        "target": dict,
        "entry_points": dict,
        "library": str,
        "weights": dict,
        "created_by": str,
        "tvm_version": str,
        "defaults": dict,
        "files": dict,
        "format": str,
        "format_version": int,
    }

    @classmethod
    def from_dict(cls, raw: Any, where: str = "manifest") -> Manifest:
        """Check the shape of a parsed ``manifest.json`` and type it; a one-line error names the bad field."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: {MANIFEST} is a JSON {type(raw).__name__}, not an object")
        known = {f.name for f in fields(cls)} - {"sections"}
        for key in ("name", "family", "target"):
            if key not in raw:
                raise ArtifactError(f"{where}: {MANIFEST} has no '{key}'")
        for key, kind in cls._TYPES.items():
            value = raw.get(key)
            if key in raw and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ArtifactError(
                    f"{where}: {MANIFEST} field '{key}' is a {type(raw[key]).__name__}, expected {kind.__name__}"
                )
        for member, info in raw.get("files", {}).items():
            good = isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("size"), int)
            if not good:
                raise ArtifactError(f"{where}: {MANIFEST} entry for member '{member}' lacks a sha256 and a size")
        for key in ("name", "family"):
            if not raw[key]:
                raise ArtifactError(f"{where}: {MANIFEST} field '{key}' is empty")
        return cls(
            **{k: raw[k] for k in known if k in raw},
            sections={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: format fields first, then the common fields, the family sections, the files."""
        out: dict[str, Any] = {"format": self.format, "format_version": self.format_version}
        for key in ("name", "family", "created_by", "tvm_version", "target"):
            out[key] = getattr(self, key)
        out.update({k: v for k, v in self.sections.items() if k not in ("entry_points",)})
        out["entry_points"] = self.entry_points
        out["weights"] = self.weights
        out["library"] = self.library
        out["defaults"] = self.defaults
        out["files"] = self.files
        return out
