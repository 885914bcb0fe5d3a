"""The `.edgert` artifact: a stored (uncompressed) zip, or a folder, holding

    manifest.json        format version, family, target, entry points, KV cache, tokenizer,
                         and the sha256 and size of every other member
    manifest.sha256      the sha256 of manifest.json itself
    model.so             the compiled library for the target
    weights.safetensors  the weights, in the order the entry points take them
    tokenizer.json       a Hugging Face `tokenizers` document

Opening verifies all of it: a runtime refuses another format version, another target, or a
member whose hash differs, and says which. Hashing the members costs about 1 s per GB, so a
successful check is remembered in the cache folder under the file's identity (device, inode,
size, modification and change times, like git's index): any later write to the file changes
its change time, which no program can set back, and the next open hashes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact.format import FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_HASH, Manifest, sha256_of
from edgert.artifact.signing import SIGNATURE, SignatureStatus, check_signature, require_trusted
from edgert.artifact.tensorfile import read_tensors
from edgert.errors import ArtifactError, TargetError, brief
from edgert.paths import cache_dir
from edgert.targets import host_arch, host_cpu_flags

# Files changed this recently are hashed on every open and never remembered: a write within
# the same timestamp tick as the check would leave the stamp unchanged (git's "racy clean").
_RACY_SECONDS = 2.0


@dataclass
class Member:
    """Where a member's bytes lie: a file, and for a zip the offset of the stored data."""

    path: Path
    offset: int
    size: int


class Artifact:
    """An opened, verified artifact."""

    def __init__(self, path: Path, manifest: dict[str, Any], members: dict[str, Member]):
        self.path, self.manifest, self._members = path, manifest, members
        self.info: Manifest | None = None  # the typed manifest, set by `open_artifact`
        self._manifest_bytes = b""
        self._signature: SignatureStatus | None = None

    def signature(self) -> SignatureStatus:
        """What ``manifest.sig`` says of the manifest: trusted, untrusted, unsigned or invalid (checked once)."""
        if self._signature is None:
            sig = self.read_bytes(SIGNATURE) if SIGNATURE in self._members else None
            self._signature = check_signature(self._manifest_bytes, sig)
        return self._signature

    @property
    def family(self) -> str:
        """Model family (``llama``, ...)."""
        return str(self.manifest["family"])

    @property
    def target(self) -> dict[str, Any]:
        """The target record: name, arch, triple, cpu, cpu_flags."""
        return dict(self.manifest["target"])

    def read_bytes(self, name: str) -> bytes:
        """A member's bytes."""
        m = self._member(name)
        with m.path.open("rb") as fh:
            fh.seek(m.offset)
            return fh.read(m.size)

    def read_text(self, name: str) -> str:
        """A member decoded as UTF-8."""
        try:
            return self.read_bytes(name).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{self.path}: member '{name}' is not valid UTF-8 (byte {exc.start})") from None

    def weights(self, copy_on_write: bool = False) -> dict[str, np.ndarray]:
        """The weights, memory-mapped from the artifact (see `read_tensors` for ``copy_on_write``)."""
        weights = self.manifest.get("weights")
        if not isinstance(weights, dict) or not isinstance(weights.get("file"), str):
            raise ArtifactError(f"{self.path}: the manifest names no weights file")
        return self.tensors(weights["file"], copy_on_write)

    def tensors(self, name: str, copy_on_write: bool = False) -> dict[str, np.ndarray]:
        """The tensors of the safetensors member ``name``, memory-mapped from the artifact."""
        m = self._member(name)
        return read_tensors(m.path, m.offset, m.size, copy_on_write=copy_on_write)

    def library_file(self) -> Path:
        """A path to the compiled library that the dynamic loader can open."""
        return self.member_file(self.manifest["library"])

    def member_file(self, name: str) -> Path:
        """A path to member ``name`` as a file of its own, to be loaded as native code.

        Refused unless the manifest is signed by a trusted key (or ``--allow-unsigned`` was given).
        A zip's members are copied to the cache once, under their sha256; a cached copy is hashed
        again before every use, and one that no longer matches (swapped, damaged) is written anew.
        """
        require_trusted(self.signature(), self.path)
        m = self._member(name)
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.path}: member '{name}' is not listed in the manifest")
        digest = self.manifest["files"][name]["sha256"]
        if self.path.is_dir():
            if not _file_matches(m.path, digest):  # changed since it was opened
                raise ArtifactError(f"{self.path}: member '{name}' does not match its sha256 (the file is corrupt)")
            return m.path
        dest = cache_dir() / "libs" / f"{digest}{Path(name).suffix}"
        if not _file_matches(dest, digest):
            data = self.read_bytes(name)
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactError(f"{self.path}: member '{name}' does not match its sha256 (the file is corrupt)")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, dest)
        return dest

    def _member(self, name: str) -> Member:
        if name not in self._members:
            raise ArtifactError(f"{self.path}: member '{name}' is missing")
        return self._members[name]


def _file_matches(path: Path, digest: str) -> bool:
    """True if ``path`` exists and its sha256 is ``digest``."""
    try:
        with path.open("rb") as fh:
            return sha256_of(fh) == digest
    except OSError:
        return False


def _zip_members(path: Path) -> dict[str, Member]:
    members: dict[str, Member] = {}
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as fh:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ArtifactError(f"{path}: member '{info.filename}' is compressed; artifacts store members")
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise ArtifactError(f"{path}: member '{info.filename}' has a damaged header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                members[info.filename] = Member(path, start, info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise ArtifactError(f"{path} is not a valid artifact (damaged zip: {brief(exc)})") from exc
    except (OSError, ValueError, struct.error, EOFError, OverflowError) as exc:
        # offsets in a damaged directory that point before the file's start or past its end
        raise ArtifactError(f"{path} is not a valid artifact (damaged zip: {brief(exc)})") from None
    return members


def _dir_members(path: Path) -> dict[str, Member]:
    return {p.name: Member(p, 0, p.stat().st_size) for p in path.iterdir() if p.is_file()}


def check_target(target: dict[str, Any], where: Path) -> None:
    """Refuse an artifact compiled for another architecture or for CPU features this host lacks."""
    arch = host_arch()
    if target.get("arch") != arch:
        raise TargetError(
            f"{where} was compiled for target '{target.get('name')}' ({target.get('arch')}, "
            f"{target.get('cpu')}); this machine is {arch}. Run it on such a device, "
            "or compile it here with --target host."
        )
    missing = sorted(set(target.get("cpu_flags", [])) - host_cpu_flags())
    if missing:
        raise TargetError(
            f"{where} was compiled for CPU '{target.get('cpu')}' and needs CPU features this "
            f"machine lacks: {', '.join(missing)}. Compile it again with --target host here."
        )


def open_artifact(
    path: str | Path, *, verify: bool = True, check_host: bool = True, trust_stamp: bool = True
) -> Artifact:
    """Open an artifact, checking its format version, member hashes and (optionally) target.

    With ``trust_stamp``, members whose files are unchanged since a successful check (same
    device, inode, size, mtime and ctime) are not hashed again.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    members = _dir_members(path) if path.is_dir() else _zip_members(path)
    art = Artifact(path, {}, members)
    if MANIFEST not in members:
        raise ArtifactError(f"{path} is not an edgert artifact (no {MANIFEST})")
    raw = art.read_bytes(MANIFEST)
    if verify:
        want = art.read_text(MANIFEST_HASH).strip() if MANIFEST_HASH in members else None
        if want != hashlib.sha256(raw).hexdigest():
            raise ArtifactError(f"{path}: {MANIFEST} does not match its recorded sha256 (the file is corrupt)")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: {MANIFEST} is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an edgert artifact (format '{manifest.get('format')}')")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, but this runtime reads version "
            f"{FORMAT_VERSION}: compile the model again with this edgert"
        )
    art.info = Manifest.from_dict(manifest, str(path))
    art.manifest = manifest
    art._manifest_bytes = raw
    if verify:
        for name, info in manifest["files"].items():
            m = art._member(name)
            if m.size != info["size"]:
                raise ArtifactError(f"{path}: member '{name}' has {m.size} bytes, the manifest says {info['size']}")
        stamp = _stamp(art, raw) if trust_stamp else None
        if stamp is None or not _stamp_known(stamp):
            for name, info in manifest["files"].items():
                m = art._member(name)
                with m.path.open("rb") as fh:
                    fh.seek(m.offset)
                    if sha256_of(fh, m.size) != info["sha256"]:
                        raise ArtifactError(f"{path}: member '{name}' does not match its sha256 (the file is corrupt)")
            if stamp is not None:
                _remember_stamp(stamp)
    if check_host:
        check_target(manifest["target"], path)
    return art


def _stamp(art: Artifact, manifest_bytes: bytes) -> dict[str, Any] | None:
    """The identity of the artifact's files, or None while one was changed too recently to trust."""
    files = sorted({m.path for m in art._members.values()})
    now = time.time()
    ids = []
    for f in files:
        st = f.stat()
        if now - max(st.st_mtime, st.st_ctime) < _RACY_SECONDS:
            return None
        ids.append([str(f.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "files": ids}


def _stamp_file(stamp: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "verified" / key


def _stamp_known(stamp: dict[str, Any]) -> bool:
    """True if these exact files passed the hash check before."""
    try:
        return json.loads(_stamp_file(stamp).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _remember_stamp(stamp: dict[str, Any]) -> None:
    """Record a successful check (best effort: a read-only cache only costs the next open a hash)."""
    dest = _stamp_file(stamp)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        with os.fdopen(fd, "w") as out:
            json.dump(stamp, out)
        os.replace(tmp, dest)
    except OSError:
        pass
