"""Cross-compiling for the ARM targets: the artifact holds an aarch64 library, records its
target, and this x86-64 host refuses to run it, saying why. (Running it on an emulated
board is the ARM issue's work.)"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

import edgert
from edgert.errors import TargetError
from edgert.runtime import open_artifact
from edgert.targets import host_arch

EM_AARCH64 = 183
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gguf_file: Path) -> Path:
    return tiny_gguf_file


@pytest.mark.parametrize(
    ("target", "cpu", "flags"), [("rpi4", "cortex-a72", {"neon"}), ("rpi5", "cortex-a76", {"neon", "dotprod"})]
)
def test_cross_compiled_artifact_is_aarch64_and_refused_here(
    tiny_gguf: Path, tmp_path: Path, target: str, cpu: str, flags: set[str], request: pytest.FixtureRequest
) -> None:
    if target == "rpi5":  # conftest compiles it (through the same CLI) for the board tests already
        out = request.getfixturevalue("tiny_rpi5_artifact")
    else:
        out = tmp_path / f"tiny-{target}.edgert"
        proc = run_cli("compile", str(tiny_gguf), "--target", target, "-o", str(out))
        assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as zf:
        elf = zf.read("model.so")
    assert elf[:4] == b"\x7fELF"
    assert struct.unpack("<H", elf[18:20])[0] == EM_AARCH64
    record = open_artifact(out, check_host=False).manifest["target"]
    assert (record["name"], record["arch"], record["cpu"]) == (target, "aarch64", cpu)
    assert flags <= set(record["cpu_flags"])
    if target == "rpi4":
        assert "dotprod" not in record["cpu_flags"]  # Cortex-A72 has none: no SDOT code may be emitted
    if host_arch() != "aarch64":
        with pytest.raises(TargetError, match=rf"compiled for target '{target}' \(aarch64, {cpu}\)"):
            edgert.load(out)
        res = run_cli("run", str(out), "--prompt", "hi")
        assert res.returncode == 2 and "this machine is x86_64" in res.stderr and "Traceback" not in res.stderr


def test_missing_cross_toolchain_is_named(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "phone.edgert"
    # An empty PATH stands for a machine without the Android NDK.
    res = run_cli("compile", str(tiny_gguf), "--target", "android-arm64", "-o", str(out), env={"PATH": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "aarch64-linux-android24-clang++" in res.stderr and "Android NDK" in res.stderr
    assert not out.exists()


@pytest.mark.skipif(host_arch() != "x86_64", reason="an x86-64 target runs on x86-64 hosts only")
def test_x86_64_v3_target_uses_avx2_only_and_runs_here(
    tiny_gguf: Path, tiny_host_artifact: Path, tmp_path: Path
) -> None:
    """x86-64-v3: an AVX2 build (no AVX-512 code whatever the compiling CPU) that gives the host build's tokens."""
    out = {"x86-64-v3": tmp_path / "tiny-x86-64-v3.edgert", "host": tiny_host_artifact}  # conftest's host build
    proc = run_cli("compile", str(tiny_gguf), "--target", "x86-64-v3", "-o", str(out["x86-64-v3"]))
    assert proc.returncode == 0, proc.stderr
    record = open_artifact(out["x86-64-v3"]).manifest["target"]
    assert (record["cpu"], record["arch"]) == ("x86-64-v3", "x86_64")
    assert {"avx2", "fma", "f16c"} <= set(record["cpu_flags"])
    assert not any(flag.startswith("avx512") for flag in record["cpu_flags"])
    tokens = {t: [tok.id for tok in edgert.load(path).generate([1, 2, 3], max_tokens=8)] for t, path in out.items()}
    assert tokens["x86-64-v3"] == tokens["host"] and tokens["host"]


def test_int8_build_for_an_i8mm_target_uses_smmla(tiny_gguf: Path, tmp_path: Path) -> None:
    """graviton3 (i8mm): `--activations int8` picks the smmla kernels (their arithmetic: test_kernels_i8mm.py)."""
    import shutil
    import subprocess

    out = tmp_path / "tiny-graviton3.edgert"
    proc = run_cli("compile", str(tiny_gguf), "--target", "graviton3", "--activations", "int8", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "i8mm" in open_artifact(out, check_host=False).manifest["target"]["cpu_flags"]
    lib = tmp_path / "model.so"
    with zipfile.ZipFile(out) as zf:
        lib.write_bytes(zf.read("model.so"))
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump is not None
    asm = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "smmla\tv" in asm
