"""The aarch64 i8mm kernels (``smmla``: 2 rows x 2 columns x 8 int8 products per instruction),
cross-compiled for an Armv8.6 core (Neoverse N2) and run under ``qemu-aarch64-static -cpu max``
in the emulated board's root file system, against numpy with the activations rounded as the
kernels round them. No machine here has i8mm: what runs is qemu's emulation of the instruction,
so this checks the arithmetic and the layout, not the speed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from test_kernels_aarch64 import _disassemble, _quantized, run_plan
from test_quant_kernels import int8_activation_reference

from edgert.compiler.kernels.int8 import dot_isa, i8mm_quant_matmul
from edgert.compiler.kernels.quant import quant_block
from edgert.compiler.layout import pack_quantized_mmla

pytestmark = pytest.mark.slow

CASES = [("q4_0_37x64", "Q4_0", 37, 64), ("q4_1_20x96", "Q4_1", 20, 96), ("q8_0_37x96", "Q8_0", 37, 96)]
ROWS = (1, 2, 3, 5, 9)  # one token, one row pair, an odd row left over, more pairs than the row tile


@pytest.fixture(scope="module")
def i8mm_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case built for Neoverse N2 (i8mm) and run once in one emulated process."""
    import tvm

    from edgert.compiler.target import library_compiler, resolve
    from edgert.deploy import board
    from edgert.targets import load_target

    spec = dataclasses.replace(load_target("rpi5"), name="i8mm", cpu="neoverse-n2", features=["+neon", "+i8mm"])
    for tool in (spec.cc, "qemu-aarch64-static"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: tools/setup.sh --test installs it")
    rootfs = board.build_rootfs()
    folder = tmp_path_factory.mktemp("i8mm")
    rng = np.random.default_rng(8)
    inputs, refs, funcs, kernels = {}, {}, {}, []
    for name, kind, n, k in CASES:
        q = _quantized(kind, n, k, rng)
        block = quant_block(n)
        funcs[name] = i8mm_quant_matmul(k, n, block, q.kind)
        weights = pack_quantized_mmla(q, block)
        for i, w in enumerate(weights):
            inputs[f"{name}/w{i}"] = w
        for m in ROWS:
            case = f"{name}/m{m}"
            x = rng.standard_normal((m, k)).astype(np.float32)
            inputs[f"{case}/x"] = x
            refs[case] = int8_activation_reference(x, q.dequantize())
            args = [f"{case}/x", *(f"{name}/w{i}" for i in range(len(weights)))]
            kernels.append({"name": case, "func": name, "args": args, "outputs": [[[m, n], "float32"]]})
    target, record = resolve(spec, threads=2)
    assert dot_isa(record["cpu_flags"]) == "i8mm"
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    lib.export_library(str(folder / "kernels.so"), fcompile=library_compiler(spec, "aarch64"))
    np.savez(folder / "inputs.npz", **inputs)
    (folder / "plan.json").write_text(json.dumps({"library": "kernels.so", "kernels": kernels, "graphs": []}))
    outputs = run_plan(folder, rootfs, "max")  # qemu's "max" core emulates i8mm
    return {"outputs": outputs, "refs": refs, "asm": _disassemble(folder / "kernels.so")}


def test_the_kernels_use_smmla(i8mm_run: dict) -> None:
    assert str(i8mm_run["outputs"]["machine"]) == "aarch64"
    assert "smmla\tv" in i8mm_run["asm"]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_i8mm_matmuls_match_numpy_on_aarch64(i8mm_run: dict, name: str) -> None:
    for m in ROWS:
        key = f"{name}/m{m}"
        want, got = i8mm_run["refs"][key], i8mm_run["outputs"][f"{key}/0"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=key)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_i8mm_layout_gathers_embedding_rows(kind: str) -> None:
    """A tied embedding reads its rows from the LM head's i8mm layout (plain TIR: it runs on this host)."""
    import tvm
    from tvm.relax.frontend import nn

    from edgert.compiler.layout import QuantLinear

    n, k = 37, 64
    q = _quantized(kind, n, k, np.random.default_rng(2))
    head = QuantLinear(k, n, q.kind, "i8mm")

    class Lookup(nn.Module):
        def __init__(self) -> None:
            self.head = head

        def forward(self, ids: nn.Tensor) -> nn.Tensor:
            return self.head.gather(ids)

    mod, named = Lookup().export_tvm(spec={"forward": {"ids": nn.spec.Tensor([5], "int32")}})
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    packed = pack_quantized_mmla(q, head.block)
    weights = dict(zip([f"head.{p}" for p in ("qweight", "scale", "min")][: len(packed)], packed, strict=True))
    ids = np.array([0, 36, 5, 17, 36], np.int32)
    got = vm["forward"](tvm.runtime.tensor(ids), *(tvm.runtime.tensor(weights[name]) for name, _ in named)).numpy()
    np.testing.assert_allclose(got, q.dequantize()[ids], rtol=1e-6, atol=1e-6)
