"""The build pipeline keeps every kernel's buffers ``noalias`` in the generated code."""

from __future__ import annotations

import re

import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from edgert.compiler.layout import QuantLinear  # noqa: E402
from edgert.compiler.pipeline import relax_pipeline, unrestricted_kernels  # noqa: E402


class _Linear(nn.Module):
    def __init__(self) -> None:
        self.lin = QuantLinear(64, 48, "q4")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.lin(x)


def _exported() -> tvm.IRModule:
    # A dynamic row count is what makes the VM add its `shape_func` (no noalias, sorts last).
    mod, _ = _Linear().export_tvm(spec={"forward": {"x": nn.spec.Tensor(["m", 64], "float32")}})
    return mod


def _kernel_ir(executable: relax.VMExecutable) -> str:
    for module in [executable.mod, *executable.mod.imports]:
        try:
            ir = module.inspect_source("ll")
        except Exception:  # modules without LLVM source (the VM bytecode)
            continue
        if "quant_matmul" in ir:
            return ir
    raise AssertionError("no LLVM module holds the quantized kernel")


def test_default_pipeline_leaves_a_kernel_without_noalias() -> None:
    """The condition the workaround exists for (if TVM fixes it, this test says so)."""
    target = tvm.target.Target("llvm")
    with target:
        lowered = relax.get_default_pipeline(target)(_exported())
    assert "shape_func" in unrestricted_kernels(lowered)


def test_edgert_pipeline_restricts_every_kernel() -> None:
    target = tvm.target.Target("llvm")
    with target:
        lowered = relax_pipeline(target)(_exported())
    assert unrestricted_kernels(lowered) == []

    executable = tvm.compile(_exported(), target=target, relax_pipeline=relax_pipeline(target))
    # The kernel's compute scope is emitted as its own function with noalias pointer arguments.
    compute = re.findall(r"define internal [^\n]*quant_matmul[^\n]*_compute_\(([^)]*)\)", _kernel_ir(executable))
    assert compute and "noalias" in compute[0]
