"""Loading without copies: aligned tensors in the artifact, weights handed to TVM from the
mapping, the copy fallback for older artifacts, remembered hash checks, and torch kept out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edgert
from edgert.artifact import reader as artifact_module
from edgert.artifact.reader import MANIFEST, MANIFEST_HASH, _zip_members, open_artifact
from edgert.artifact.tensorfile import ALIGNMENT, PAD_PREFIX, read_tensors, write_tensors
from edgert.errors import ArtifactError

PROMPT_IDS = [1, 2, 3, 4, 5, 6, 7, 8]


def _old_layout(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout edgert wrote before tensors were aligned (8-byte header padding, no gaps)."""
    header: dict[str, object] = {"__metadata__": {"format": "edgert"}}
    offset = 0
    for name, arr in tensors.items():
        dtype = {"float32": "F32", "float16": "F16", "int32": "I32", "int8": "I8", "uint8": "U8", "uint32": "U32"}
        header[name] = {
            "dtype": dtype[str(arr.dtype)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    if (8 + len(blob)) % ALIGNMENT == 0:  # make sure the first tensor is misaligned, as most were
        blob += b" " * 8
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for arr in tensors.values():
            fh.write(np.ascontiguousarray(arr).tobytes())


def _rehash(folder: Path) -> None:
    """Record the members' new hashes in the manifest and sign it, as the packager would."""
    from edgert.artifact.signing import SIGNATURE, sign_manifest

    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    body = json.dumps(manifest, indent=2).encode()
    (folder / MANIFEST).write_bytes(body)
    (folder / MANIFEST_HASH).write_bytes(hashlib.sha256(body).hexdigest().encode())
    (folder / SIGNATURE).write_bytes(sign_manifest(body))


RACY = 0.2  # the tests shorten the window in which a freshly written file is hashed on every open


def _age(path: Path) -> None:
    """Wait out that window."""
    st = path.stat()
    time.sleep(max(0.0, max(st.st_mtime, st.st_ctime) + RACY + 0.05 - time.time()))


def test_tensors_are_aligned_and_still_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(1)
    tensors = {
        "odd_f32": rng.standard_normal(3).astype(np.float32),  # 12 bytes: the next tensor needs a gap
        "i8": rng.integers(-128, 127, size=(5, 7), dtype=np.int8),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "u32": rng.integers(0, 2**32 - 1, size=9, dtype=np.uint32),
    }
    path = tmp_path / "w.safetensors"
    with path.open("wb") as fh:
        write_tensors(fh, tensors, {"format": "edgert"})
    got = read_tensors(path)
    assert list(got) == list(tensors)  # padding tensors are not shown
    for name, want in tensors.items():
        assert np.array_equal(got[name], want), name
        assert got[name].ctypes.data % ALIGNMENT == 0, name  # the mapping is page-aligned, so file offsets count
    theirs = load_file(str(path))  # the safetensors library accepts the padded layout
    assert {n for n in theirs if not n.startswith(PAD_PREFIX)} == set(tensors)
    assert any(n.startswith(PAD_PREFIX) for n in theirs)
    for name, want in tensors.items():
        assert np.array_equal(theirs[name], want), name
    with pytest.raises(ValueError, match="reserved"):
        write_tensors(path.open("wb"), {f"{PAD_PREFIX}0": np.zeros(1, np.uint8)})


def test_zip_members_and_weights_are_aligned(tiny_host_artifact: Path) -> None:
    members = _zip_members(tiny_host_artifact)
    assert all(m.offset % ALIGNMENT == 0 for m in members.values()), {n: m.offset for n, m in members.items()}
    art = open_artifact(tiny_host_artifact)
    m = members[art.manifest["weights"]["file"]]
    with tiny_host_artifact.open("rb") as fh:
        fh.seek(m.offset)
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    data_start = m.offset + 8 + length
    for name in art.manifest["weights"]["order"]:
        assert (data_start + header[name]["data_offsets"][0]) % ALIGNMENT == 0, name


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    real = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == real:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_weights_are_used_in_place_and_old_artifacts_are_copied(tiny_host_artifact: Path, tmp_path: Path) -> None:
    model = edgert.load(tiny_host_artifact)
    session = model.session
    assert session.mapped_weights == len(session.params) > 0
    ranges = _mapped_ranges(tiny_host_artifact)
    for p in session.params:  # TVM reads every weight straight out of the artifact's mapping
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), hex(p.data_ptr())
    want = model.prefill(PROMPT_IDS)

    # The same model in the layout written before alignment: it loads, copies, and agrees.
    folder = tmp_path / "old.edgert"
    folder.mkdir()
    art = open_artifact(tiny_host_artifact)
    for name in [*art.manifest["files"], MANIFEST]:
        (folder / name).write_bytes(art.read_bytes(name))
    weights = art.manifest["weights"]["file"]
    _old_layout(folder / weights, {n: np.array(a) for n, a in read_tensors(folder / weights).items()})
    _rehash(folder)
    old = edgert.load(folder)
    assert old.session.mapped_weights < len(old.session.params)
    assert np.array_equal(old.prefill(PROMPT_IDS), want)


def test_remembered_check_still_refuses_a_changed_artifact(
    tiny_host_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifact_module, "_RACY_SECONDS", RACY)
    copy = tmp_path / "copy.edgert"
    shutil.copyfile(tiny_host_artifact, copy)
    open_artifact(copy)  # just written: hashed, not remembered (racy window)
    assert not (tmp_path / "cache" / "verified").exists()
    _age(copy)
    open_artifact(copy)
    assert len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    open_artifact(copy)  # remembered: the same file opens again without hashing

    # Flip one byte of the weights and put the modification time back: the change time
    # still moves, so the stamp no longer matches and the hash check refuses the file.
    st = copy.stat()
    m = _zip_members(copy)[open_artifact(copy).manifest["weights"]["file"]]
    with copy.open("r+b") as fh:
        fh.seek(m.offset + m.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    _age(copy)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_artifact(copy)


def test_runtime_does_not_import_torch() -> None:
    pytest.importorskip("torch")
    code = (
        "import sys; from edgert.runtime import tvm_runtime; tvm_runtime.ffi(); "
        "assert 'tvm_ffi' in sys.modules; "
        "assert 'torch' not in sys.modules, 'torch was imported, or is still blocked'"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
