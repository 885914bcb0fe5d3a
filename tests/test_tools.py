"""The thin scripts in tools/: compile.py over the same API as `edgert compile`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tool, run_tool

import edgert


@pytest.mark.slow
def test_compile_script_writes_a_runnable_artifact(tmp_path: Path) -> None:
    gguf = load_tool("make_tiny_gguf").write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    out = tmp_path / "tiny.edgert"
    proc = run_tool("compile", str(gguf), "--target", "host", "-o", str(out), "--context", "128")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "compiling with TVM" in proc.stderr  # progress is reported
    model = edgert.load(out)
    assert model.context_length == 128
    assert len([t for t in model.generate([1, 2, 3], max_tokens=4)]) >= 1


def test_compile_script_reports_bad_input(tmp_path: Path) -> None:
    proc = run_tool("compile", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.edgert"))
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.edgert").exists()
