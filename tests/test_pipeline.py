"""The build pipeline keeps every kernel's buffers ``noalias`` in the generated code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from edgert.compiler.layout import QuantLinear  # noqa: E402
from edgert.compiler.passes.pipeline import (  # noqa: E402
    _without_unpacking,
    relax_pipeline,
    unrestricted_kernels,
)


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


class _Norm(nn.Module):
    def __init__(self) -> None:
        self.norm = nn.LayerNorm(384)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.norm(x)


@pytest.mark.parametrize(("rows", "threaded"), [(1500, True), ("n", False), (2, False)])
def test_only_big_fixed_shape_kernels_are_spread_over_threads(rows, threaded: bool) -> None:
    """A layer norm over 1500 frames runs on the thread pool; over a symbolic or a tiny row count, serially."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edgert.compiler.passes.pipeline import schedule_static_kernels

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod, _ = _Norm().export_tvm(spec={"forward": {"x": nn.spec.Tensor([rows, 384], "float32")}})
    with target:
        mod = tvm.transform.Sequential([*cpu.legalize_passes(target), schedule_static_kernels()])(mod)
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels
    assert any("T.parallel" in f.script() for f in kernels) is threaded


def _scratch_kernel() -> tvm.tirx.PrimFunc:
    from tvm.script import tirx as T

    @T.prim_func
    def scratch(x: T.Buffer((64, 16), "float32"), y: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "scratch", "tirx.noalias": True})
        for i in T.parallel(64):
            acc = T.alloc_buffer((16,), "float32", scope="local")  # a per-iteration tile, as the q4 matmuls'
            for j in range(16):
                acc[j] = x[i, j] * T.float32(2)
            y[i] = acc[0] + acc[15]

    return scratch


def test_local_scratch_stays_on_the_stack() -> None:
    """TVM's own lowering takes a workspace from its pool for a ``local`` tile on every parallel
    iteration; edgert's TIR pipeline keeps it on the stack, with the same results."""
    import numpy as np

    from edgert.compiler.passes.pipeline import tir_pipeline

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = tvm.IRModule({"scratch": _scratch_kernel()})
    x = np.random.default_rng(0).standard_normal((64, 16)).astype("float32")
    for pipeline, pooled in (("default", True), (tir_pipeline(), False)):
        lib = tvm.tirx.build(mod, target=target, pipeline=pipeline)
        assert ("@__TVMBackendAllocWorkspace" in lib.inspect_source("ll")) is pooled
        y = tvm.runtime.tensor(np.zeros(64, "float32"))
        lib["scratch"](tvm.runtime.tensor(x), y)
        np.testing.assert_array_equal(y.numpy(), x[:, 0] * 2 + x[:, 15] * 2)


def test_stack_scratch_keeps_to_its_budget() -> None:
    """Past the per-kernel stack budget a tile goes back to TVM's workspace pool."""
    import tvm_ffi

    from edgert.compiler.passes.pipeline import stack_scratch

    marked: list[bool] = []
    for limit in (64, 63):  # the 16-float tile: 64 bytes
        out = stack_scratch(limit)(tvm.IRModule({"scratch": _scratch_kernel()}))
        tvm_ffi.structural_map(
            out["scratch"],
            [(tvm.tirx.AllocBuffer, lambda op: marked.append(bool(op.annotations.get("disable_lower_builtin"))) or op)],
        )
    assert marked == [True, False]


class _Views(nn.Module):
    """Two entry points over two parameters: one reshapes through a chain of views, one none."""

    def __init__(self) -> None:
        self.a = nn.Parameter((4, 6), "float32")
        self.b = nn.Parameter((24,), "float32")

    def chain(self, x: nn.Tensor) -> nn.Tensor:
        rows = nn.op.reshape(x, (4, 6))  # (2, 12) -> (4, 6) -> (24,): a reshape of a reshape
        flat = nn.op.reshape(nn.op.add(rows, self.a), (24,))
        return nn.op.reshape(nn.op.reshape(flat, (2, 12)), (24,))  # back to its own shape: none

    def plain(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.add(x, self.a)  # `b` is unpacked and unused; nothing to rewrite


def _reshapes(func: relax.Function) -> int:
    calls = [b.value for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    return sum(getattr(c.op, "name", "") == "relax.reshape" for c in calls)


def test_remove_redundant_reshape_is_tvms_pass() -> None:
    """edgert's faster form of TVM's ``RemoveRedundantReshape`` gives the module TVM's pass gives:
    chains collapsed where there are some, the function untouched (unused bindings kept) where not,
    and the module it was given unchanged."""
    import tvm_ffi

    from edgert.compiler.passes.pipeline import remove_redundant_reshape

    packed = {"param_mode": "packed", "effect_mode": "none"}  # as the LLM builds: one tuple, unpacked in each
    spec = {
        "chain": {"x": nn.spec.Tensor([2, 12], "float32"), "$": packed},
        "plain": {"x": nn.spec.Tensor([4, 6], "float32"), "$": packed},
    }
    mod, _ = _Views().export_tvm(spec=spec)
    before = tvm_ffi.structural_hash(mod)
    theirs = relax.transform.RemoveRedundantReshape()(mod)
    ours = remove_redundant_reshape()(mod)
    assert tvm_ffi.structural_hash(mod) == before
    assert tvm_ffi.structural_equal(ours, theirs)
    assert _reshapes(ours["chain"]) < _reshapes(mod["chain"])  # the pass did rewrite something
    assert len(ours["plain"].body.blocks[0].bindings) == len(mod["plain"].body.blocks[0].bindings)
    # Both functions took the form without their unpacking (no fallback to the plain pass):
    assert all(_without_unpacking(mod[name], lambda f: f) is not None for name in ("chain", "plain"))


def test_without_unpacking_puts_the_function_back_as_it_was() -> None:
    """Taking the parameter tuple's unpacking out and putting it back, with nothing done between,
    gives the function it was given; a function that uses the tuple past its unpacking is refused."""
    import tvm_ffi

    packed = {"param_mode": "packed", "effect_mode": "none"}
    mod, _ = _Views().export_tvm(spec={"chain": {"x": nn.spec.Tensor([2, 12], "float32"), "$": packed}})
    seen = []
    func = mod["chain"]
    back = _without_unpacking(func, lambda f: seen.append(f) or f)
    assert tvm_ffi.structural_equal(back, func)
    # While the transform ran, the unpacked weights were parameters and the tuple was gone:
    assert len(seen[0].params) == len(func.params) - 1 + len(func.params[-1].ty.fields)
    assert not any(isinstance(b.value, relax.TupleGetItem) for b in seen[0].body.blocks[0].bindings)

    tuple_param = func.params[-1]
    block = func.body.blocks[0]
    extra = relax.DataflowBlock(
        [*block.bindings, relax.VarBinding(relax.DataflowVar("again", tuple_param.ty), tuple_param)]
    )
    used_later = relax.Function(
        func.params, relax.SeqExpr([extra], func.body.body), func.ret_ty, func.is_pure, func.attrs
    )
    assert _without_unpacking(used_later, lambda f: f) is None


@pytest.mark.slow
def test_remove_redundant_reshape_is_tvms_pass_on_the_tiny_llama(
    tiny_gguf_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On the module a Llama build compiles (the tiny Llama's: every entry point, its packed weights),
    edgert's pass gives TVM's module, and each entry point that unpacks the weights went without them."""
    import tvm_ffi

    from edgert.compiler.compile import Build
    from edgert.compiler.passes.pipeline import remove_redundant_reshape
    from edgert.families.compile import compile_model

    class _Captured(Exception):
        pass

    captured = []

    def capture(_self, mod, *_args, **_kwargs):
        captured.append(mod)
        raise _Captured

    monkeypatch.setattr(Build, "compile", capture)
    with pytest.raises(_Captured):
        compile_model(tiny_gguf_file, "host", tmp_path / "tiny.edgert")
    mod = captured[0]
    theirs = relax.transform.RemoveRedundantReshape()(mod)
    ours = remove_redundant_reshape()(mod)
    assert tvm_ffi.structural_equal(ours, theirs)
    assert not tvm_ffi.structural_equal(ours, mod)  # there were chains to collapse
    packed = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function) and f.params]
    packed = [name for name in packed if isinstance(mod[name].params[-1].ty, relax.TupleType)]
    assert "decode" in packed and "prefill" in packed
    assert all(_without_unpacking(mod[name], lambda f: f) is not None for name in packed)
