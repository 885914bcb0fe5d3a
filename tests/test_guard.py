"""The conftest guard: a test without the slow marker cannot compile a real model."""

from __future__ import annotations

import pytest
from conftest import run_cli


def test_an_unmarked_test_cannot_compile_a_real_model(tmp_path) -> None:
    proc = run_cli("compile", "smollm2-135m", "-o", str(tmp_path / "s.edgert"))
    assert proc.returncode != 0
    assert "is not marked @pytest.mark.slow" in proc.stderr
    assert not (tmp_path / "s.edgert").exists()


def test_the_guard_also_holds_in_this_process(tmp_path) -> None:
    from edgert.families.compile import compile_model

    with pytest.raises(AssertionError, match=r"not marked @pytest\.mark\.slow"):
        compile_model("codec-speech16k", output=tmp_path / "c.edgert")
