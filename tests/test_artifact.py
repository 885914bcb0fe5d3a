"""The `.edgert` artifact: what it holds, and that damaged or foreign artifacts are refused.

Every refusal is checked three ways: `open_artifact`, `edgert.load`, and the CLI (`run` and
`inspect` exit 2 with the problem named on stderr and no traceback). The folder form is
built by unzipping the session's artifact (same members as `compile(..., as_dir=True)`);
its variants hard-link the big members and only rewrite the manifest, so no test copies
the 330 MB of weights more than once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import edgert
from edgert.artifact.tensorfile import PAD_PREFIX, read_tensors, write_tensors
from edgert.errors import ArtifactError, EdgertError, TargetError
from edgert.runtime import Generator, open_artifact
from edgert.targets import host_arch, host_cpu_flags

MANIFEST, MANIFEST_HASH, SIGNATURE = "manifest.json", "manifest.sha256", "manifest.sig"


# -- helpers ----------------------------------------------------------------------------
def member_span(zip_path: Path, name: str) -> tuple[int, int]:
    """(offset, size) of a stored member's bytes, found from the zip headers alone."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(name)
    with zip_path.open("rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    assert local[:4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@contextlib.contextmanager
def flipped_byte(path: Path, offset: int) -> Iterator[None]:
    """Invert one byte of ``path`` for the duration of the block."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        original = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([original[0] ^ 0xFF]))
    try:
        yield
    finally:
        with path.open("r+b") as fh:
            fh.seek(offset)
            fh.write(original)


def folder_variant(base: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A folder artifact sharing ``base``'s members (hard links) with an edited, re-hashed manifest."""
    dest.mkdir()
    for p in base.iterdir():
        if p.name not in (MANIFEST, MANIFEST_HASH):
            os.link(p, dest / p.name)
    manifest = json.loads((base / MANIFEST).read_bytes())
    edit(manifest)
    body = json.dumps(manifest, indent=2).encode()
    (dest / MANIFEST).write_bytes(body)
    (dest / MANIFEST_HASH).write_text(hashlib.sha256(body).hexdigest())
    return dest


def assert_cli_refuses(path: Path, fragments: tuple[str, ...]) -> None:
    """`edgert run` and `edgert inspect` exit 2, name the problem, and print no traceback."""
    for args in (("run", str(path), "--prompt", "hi", "--max-tokens", "1"), ("inspect", str(path))):
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
        assert "error:" in res.stderr
        for fragment in fragments:
            assert fragment in res.stderr, (args, fragment, res.stderr)
        assert res.stdout.strip() == "", res.stdout


def sha256_member(zf: zipfile.ZipFile, name: str) -> str:
    digest = hashlib.sha256()
    with zf.open(name) as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zip_copy(smollm_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private copy of the artifact that tests may damage (and must restore)."""
    dest = tmp_path_factory.mktemp("zipcopy") / "smollm2.edgert"
    shutil.copyfile(smollm_artifact, dest)
    open_artifact(dest)  # intact to start with, so each refusal below is the damage's doing
    yield dest
    dest.unlink()


@pytest.fixture(scope="module")
def folder_artifact(smollm_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder form of the artifact (its zip, unpacked)."""
    dest = tmp_path_factory.mktemp("folder") / "smollm2.edgert"
    with zipfile.ZipFile(smollm_artifact) as zf:
        zf.extractall(dest)
    yield dest
    shutil.rmtree(dest)


# -- what an artifact holds ---------------------------------------------------------------
@pytest.mark.slow
def test_artifact_is_a_stored_zip_with_hashed_members(smollm_artifact: Path) -> None:
    with zipfile.ZipFile(smollm_artifact) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert {MANIFEST, MANIFEST_HASH, SIGNATURE, "model.so", "weights.safetensors", "tokenizer.json"} <= set(infos)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
        body = zf.read(MANIFEST)
        assert zf.read(MANIFEST_HASH).decode().strip() == hashlib.sha256(body).hexdigest()
        manifest = json.loads(body)
        assert manifest["format"] == "edgert-artifact" and manifest["format_version"] == 1
        assert set(manifest["files"]) == set(infos) - {MANIFEST, MANIFEST_HASH, SIGNATURE}
        for name, rec in manifest["files"].items():
            assert rec["size"] == infos[name].file_size
            assert rec["sha256"] == sha256_member(zf, name)


@pytest.mark.slow
def test_weights_are_readable_by_safetensors(smollm_artifact: Path, tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    art = open_artifact(smollm_artifact)
    name = art.manifest["weights"]["file"]
    extracted = tmp_path / name
    with zipfile.ZipFile(smollm_artifact) as zf, zf.open(name) as src, extracted.open("wb") as dst:
        shutil.copyfileobj(src, dst)

    theirs = safetensors_numpy.load_file(str(extracted))
    ours_file = read_tensors(extracted)
    ours_in_zip = art.weights()  # read_tensors at the member's offset inside the zip
    order = art.manifest["weights"]["order"]
    assert set(theirs) == set(ours_file) == set(ours_in_zip) == set(order)
    for key in order:
        a, b, c = theirs[key], ours_file[key], ours_in_zip[key]
        assert a.dtype == b.dtype == c.dtype, key
        assert a.shape == b.shape == c.shape, key
        assert np.array_equal(a, b) and np.array_equal(a, c), key
    assert {str(a.dtype) for a in theirs.values()} >= {art.manifest["weights"]["dtype"]}
    with safe_open(str(extracted), framework="numpy") as fh:
        assert fh.metadata() == {"format": "edgert"}
    extracted.unlink()


def test_tensorfile_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(2, 3, 4), dtype=np.int32),
        "f32_transposed": rng.standard_normal((4, 6)).astype(np.float32).T,  # not contiguous
        "i32_big_endian": np.arange(5, dtype=">i4"),
        "scalar": np.array(42, dtype=np.int32),
    }
    path = tmp_path / "t.safetensors"
    with path.open("wb") as fh:
        write_tensors(fh, tensors, {"note": "round trip"})

    assert list(read_tensors(path)) == list(tensors)  # written and read back in the given order
    theirs = {k: v for k, v in load_file(str(path)).items() if not k.startswith(PAD_PREFIX)}  # alignment gaps
    for got in (read_tensors(path), theirs):
        assert set(got) == set(tensors)
        for key, want in tensors.items():
            assert got[key].shape == want.shape, key
            assert got[key].dtype == want.dtype.newbyteorder("="), key
            assert np.array_equal(got[key], want), key
    # The header is padded so tensor data starts 64-byte aligned.
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + header_len) % 64 == 0
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"] == {"note": "round trip"}

    # The same bytes stored inside a bigger file, as in the zip artifact.
    blob = path.read_bytes()
    embedded = tmp_path / "embedded.bin"
    embedded.write_bytes(b"x" * 13 + blob + b"y" * 5)
    got = read_tensors(embedded, offset=13, size=len(blob))
    for key, want in tensors.items():
        assert np.array_equal(got[key], want), key

    with pytest.raises(ValueError, match="complex"):
        write_tensors(io.BytesIO(), {"c": np.zeros(2, dtype=np.complex64)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[:4])
    with pytest.raises(ArtifactError, match="truncated"):
        read_tensors(truncated)
    short = tmp_path / "short.safetensors"
    short.write_bytes(blob[: 8 + header_len + 10])
    with pytest.raises(ArtifactError, match="runs past the end"):
        read_tensors(short)


# -- inspect --------------------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_shows_target_and_entry_points(smollm_artifact: Path) -> None:
    res = run_cli("inspect", str(smollm_artifact))
    assert res.returncode == 0, res.stderr
    manifest = open_artifact(smollm_artifact).manifest
    t = manifest["target"]
    assert f"target    {t['name']}: {t['arch']} {t['triple']} cpu={t['cpu']}" in res.stdout
    for entry in ("prefill", "decode", "verify", "create_kv_cache"):
        assert entry in res.stdout
    for member in manifest["files"]:
        assert member in res.stdout
    assert "all members match their sha256" in res.stdout


@pytest.mark.slow
def test_inspect_json_is_the_manifest(smollm_artifact: Path) -> None:
    res = run_cli("inspect", str(smollm_artifact), "--json")
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    with zipfile.ZipFile(smollm_artifact) as zf:
        assert printed == json.loads(zf.read(MANIFEST))
        members = set(zf.namelist()) - {MANIFEST, MANIFEST_HASH, SIGNATURE}
        assert set(printed["files"]) == members
        for name in members:
            assert printed["files"][name]["sha256"] == sha256_member(zf, name)
            assert printed["files"][name]["size"] == zf.getinfo(name).file_size
    assert printed["target"]["arch"] == host_arch()
    assert set(printed["entry_points"]) >= {"prefill", "decode", "verify", "create_kv_cache"}


# -- the folder form ----------------------------------------------------------------------
@pytest.mark.slow
def test_folder_form_runs_like_the_zip(folder_artifact: Path, smollm: Generator) -> None:
    art = open_artifact(folder_artifact)
    assert art.manifest == open_artifact(smollm.artifact.path).manifest
    assert art.library_file() == folder_artifact / "model.so"
    model = edgert.load(folder_artifact)
    ids = [t.id for t in model.generate("What is the capital of France?", max_tokens=8, chat=True)]
    smollm.reset()
    want = [t.id for t in smollm.generate("What is the capital of France?", max_tokens=8, chat=True)]
    assert ids == want and len(ids) > 0
    res = run_cli("inspect", str(folder_artifact))
    assert res.returncode == 0, res.stderr
    assert "all members match their sha256" in res.stdout


# -- refusals -------------------------------------------------------------------------------
@dataclass
class Broken:
    path: Path
    error: type[EdgertError]
    fragments: tuple[str, ...]  # in the message besides the path
    inspect_ok: bool = False  # `inspect` skips the host check: it looks at foreign artifacts


@contextlib.contextmanager
def broken_artifact(case: str, zip_copy: Path, folder: Path, tmp_path: Path) -> Iterator[Broken]:
    try:
        with _broken_artifact(case, zip_copy, folder, tmp_path) as broken:
            yield broken
    finally:  # drop the big copies and links now, not when pytest prunes old temp folders
        for p in tmp_path.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


@contextlib.contextmanager
def _broken_artifact(case: str, zip_copy: Path, folder: Path, tmp_path: Path) -> Iterator[Broken]:
    if case in ("weights-byte", "library-byte"):
        member = "weights.safetensors" if case == "weights-byte" else "model.so"
        offset, size = member_span(zip_copy, member)
        with flipped_byte(zip_copy, offset + size // 2):
            yield Broken(zip_copy, ArtifactError, (f"member '{member}'", "sha256", "corrupt"))
    elif case == "manifest-byte":
        offset, size = member_span(zip_copy, MANIFEST)
        with zip_copy.open("rb") as fh:
            fh.seek(offset)
            body = fh.read(size)
        # Change a letter inside a string, so the manifest stays valid JSON and only its hash can tell.
        at = body.index(b'"smollm2-135m"') + 1
        with flipped_byte(zip_copy, offset + at):
            yield Broken(zip_copy, ArtifactError, (MANIFEST, "sha256"))
    elif case == "folder-weights-byte":
        dest = tmp_path / "folder.edgert"
        dest.mkdir()
        for p in folder.iterdir():
            if p.name == "weights.safetensors":
                shutil.copyfile(p, dest / p.name)
            else:
                os.link(p, dest / p.name)
        with flipped_byte(dest / "weights.safetensors", 1000):
            yield Broken(dest, ArtifactError, ("member 'weights.safetensors'", "sha256"))
    elif case == "format-version":
        dest = folder_variant(folder, tmp_path / "v2.edgert", lambda m: m.update(format_version=2))
        yield Broken(dest, ArtifactError, ("format version 2", "reads version 1"))
    elif case == "other-arch":

        def to_rpi5(m: dict) -> None:
            m["target"].update(
                name="rpi5", arch="aarch64", triple="aarch64-linux-gnu", cpu="cortex-a76", cpu_flags=["dotprod", "neon"]
            )

        dest = folder_variant(folder, tmp_path / "rpi5.edgert", to_rpi5)
        yield Broken(dest, TargetError, ("'rpi5'", "aarch64", host_arch()), inspect_ok=True)
    elif case == "missing-cpu-flag":
        lacking = "sve" if host_arch() != "aarch64" else "avx512f"
        assert lacking not in host_cpu_flags()

        def add_flag(m: dict) -> None:
            m["target"]["cpu_flags"] = sorted([*m["target"]["cpu_flags"], lacking])

        dest = folder_variant(folder, tmp_path / "flags.edgert", add_flag)
        yield Broken(dest, TargetError, (f"lacks: {lacking}",), inspect_ok=True)
    elif case == "truncated-zip":
        dest = tmp_path / "truncated.edgert"
        with zip_copy.open("rb") as src, dest.open("wb") as dst:
            dst.write(src.read(zip_copy.stat().st_size // 2))
        yield Broken(dest, ArtifactError, ("damaged zip",))
    elif case == "not-a-zip":
        dest = tmp_path / "notes.edgert"
        dest.write_text("just some text, not an artifact\n" * 100)
        yield Broken(dest, ArtifactError, ("not a valid artifact",))
    elif case == "missing-path":
        yield Broken(tmp_path / "nowhere" / "missing.edgert", ArtifactError, ("artifact not found",))
    else:
        raise AssertionError(case)


CASES = [
    "weights-byte",
    "library-byte",
    "manifest-byte",
    "folder-weights-byte",
    "format-version",
    "other-arch",
    "missing-cpu-flag",
    "truncated-zip",
    "not-a-zip",
    "missing-path",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_broken_artifact_is_refused(case: str, zip_copy: Path, folder_artifact: Path, tmp_path: Path) -> None:
    with broken_artifact(case, zip_copy, folder_artifact, tmp_path) as b:
        for opener in (open_artifact, edgert.load):
            with pytest.raises(b.error) as info:
                opener(b.path)
            message = str(info.value)
            assert str(b.path) in message, message
            for fragment in b.fragments:
                assert fragment in message, (fragment, message)

        if b.inspect_ok:
            # Not this machine's target: refused for running, but inspecting is fine.
            art = open_artifact(b.path, check_host=False)
            res = run_cli("run", str(b.path), "--prompt", "hi", "--max-tokens", "1")
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
            for fragment in (str(b.path), *b.fragments):
                assert fragment in res.stderr, (fragment, res.stderr)
            res = run_cli("inspect", str(b.path))
            assert res.returncode == 0, res.stderr
            assert f"target    {art.manifest['target']['name']}: {art.manifest['target']['arch']}" in res.stdout
        else:
            assert_cli_refuses(b.path, (str(b.path), *b.fragments))
    # The damage undone, the same artifact opens again: the refusal was the damage's doing.
    if case.endswith("-byte") and not case.startswith("folder"):
        open_artifact(zip_copy)


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.so").write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match="not an edgert artifact"):
        open_artifact(tmp_path)
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 2 and "not an edgert artifact" in res.stderr and "Traceback" not in res.stderr
