"""edgert's kernels and schedule rules on aarch64: cross-compiled for the Raspberry Pi 5 (NEON,
dotprod) and run under ``qemu-aarch64-static`` in the emulated board's root file system.

One aarch64 library holds the quantized matmuls (q4 from GGUF Q4_0 and Q4_1 blocks, q8 from
Q8_0, each also as the int8-activation ``sdot`` kernel; the K-quant formats of Q4_K, Q5_K and
Q6_K blocks; and the float16 packed matmul) and the
paged decode attention, the codec family's LSTM and one-channel convolution; the project's tiny ONNX
graphs (dense + GELU epilogue, attention with softmax, residual layer norm, conv1d) are compiled
for the board with the graph schedule rules. All of it runs in ONE emulated process (starting
Python and TVM under qemu is the slow part) and is compared here with numpy / onnxruntime on
the same awkward shapes as the host tests: sizes that are not a multiple of the vector width or
the column tile, one row, rows below and past the prefill row tile, one cached token, a page
boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_tool
from test_codec_kernels import CODEC_KERNELS, codec_kernel_cases
from test_decode_attention import PAGE, _reference
from test_quant_kernels import KQUANT_BLOCKS, int8_activation_reference, kquant_blocks

from edgert.compiler.kernels.int8 import int8_quant_matmul
from edgert.compiler.kernels.quant import ROW_TILE, packed_matmul, pick_block, quant_block, quant_matmul
from edgert.compiler.layout import pack_columns, pack_quantized, pack_quantized_dot
from edgert.compiler.passes.attention import paged_decode_attention
from edgert.frontend.quantized import from_gguf_blocks

pytestmark = pytest.mark.slow

# (name, GGUF type or float dtype, N, K): N = 37 and 1000 are multiples of neither 8 nor 32, 20 is below one tile.
MATMULS = [
    ("q4_0_37x64", "Q4_0", 37, 64),
    ("q4_1_1000x96", "Q4_1", 1000, 96),
    ("q4_1_20x32", "Q4_1", 20, 32),
    ("q8_0_37x96", "Q8_0", 37, 96),
    ("q4_k_37x256", "Q4_K", 37, 256),  # the K-quant formats: f32 sub-block scales (and mins)
    ("q5_k_20x256", "Q5_K", 20, 256),
    ("q6_k_40x512", "Q6_K", 40, 512),  # groups of 16
    ("f16_40x24", "float16", 40, 24),
]
ROWS = (1, 3, 5, 7, 2 * ROW_TILE + 1)  # decode, below the prefill row tile, past it with remainders
ATTENTION_LENGTHS = [1, 16, 17, 45]  # one token, a full page, a page boundary, scattered pages
GRAPHS = ["dense", "attention", "layernorm", "conv1d"]


def _quantized(kind: str, n: int, k: int, rng: np.random.Generator):
    import gguf

    if kind in KQUANT_BLOCKS:  # gguf does not quantize these: random blocks
        return from_gguf_blocks(kind, kquant_blocks(kind, n, k, rng), (n, k))
    x = rng.standard_normal((n, k)).astype(np.float32)
    return from_gguf_blocks(kind, gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]), (n, k))


@pytest.fixture(scope="module")
def board_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build everything for rpi5, run it once on the emulated board; inputs, references and outputs."""
    import tvm

    import edgert
    from edgert.compiler.target import library_compiler, resolve
    from edgert.deploy import board
    from edgert.targets import load_target

    spec = load_target("rpi5")
    for tool in (spec.cc, "qemu-aarch64-static"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: tools/setup.sh --test installs it")
    rootfs = board.build_rootfs()  # cached after the first build
    folder = tmp_path_factory.mktemp("aarch64")
    rng = np.random.default_rng(5)
    inputs: dict[str, np.ndarray] = {}
    refs: dict[str, np.ndarray] = {}
    funcs, kernels = {}, []

    for name, kind, n, k in MATMULS:
        if kind.startswith("float"):
            block = pick_block(n)
            w = rng.standard_normal((n, k)).astype(np.float16)
            funcs[name] = packed_matmul(k, n, block, kind)
            weights, dense = [pack_columns(w, block, kind)], w.astype(np.float64)
        else:
            q = _quantized(kind, n, k, rng)
            block = quant_block(n)
            funcs[name] = quant_matmul(k, n, block, q.fmt.key)
            weights, dense = list(pack_quantized(q, block)), q.dequantize().astype(np.float64)
            if q.fmt.plain:  # The int8-activation kernel (sdot) on the same weights and inputs, in its own layout.
                funcs[f"{name}_sdot"] = int8_quant_matmul(k, n, block, q.kind, "dotprod")
                for i, wt in enumerate(pack_quantized_dot(q, block)):
                    inputs[f"{name}_sdot/w{i}"] = wt
        for i, wt in enumerate(weights):
            inputs[f"{name}/w{i}"] = wt
        for m in ROWS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            case = f"{name}/m{m}"
            inputs[f"{case}/x"] = x
            refs[f"{case}/0"] = x.astype(np.float64) @ dense.T
            args = [f"{case}/x", *(f"{name}/w{i}" for i in range(len(weights)))]
            kernels.append({"name": case, "func": name, "args": args, "outputs": [[[m, n], "float32"]]})
            if f"{name}_sdot" in funcs:
                sdot_args = [f"{case}/x", *(f"{name}_sdot/w{i}" for i in range(len(weights)))]
                out = [[[m, n], "float32"]]
                kernels.append({"name": f"{case}/sdot", "func": f"{name}_sdot", "args": sdot_args, "outputs": out})
                refs[f"{case}/sdot/0"] = int8_activation_reference(x, dense)

    for d in (64, 48):  # SmolLM2's head size, and one that is not a multiple of the 16-lane vector
        name = f"attention_d{d}"
        funcs[name] = paged_decode_attention(2, 6, d, PAGE)
        n_pages = [-(-n // PAGE) for n in ATTENTION_LENGTHS]
        pool = 2 + sum(n_pages)
        pages = rng.standard_normal((pool, 2, 2, PAGE, d)).astype(np.float32)
        order = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
        last = np.array([n - (p - 1) * PAGE for n, p in zip(ATTENTION_LENGTHS, n_pages, strict=True)], np.int32)
        q = rng.standard_normal((len(ATTENTION_LENGTHS), 6, d)).astype(np.float32)
        zeros = np.zeros(len(ATTENTION_LENGTHS), np.int32)
        own = np.array(ATTENTION_LENGTHS, np.int32) - 1  # each query's position, the last cached token (a decode step)
        arrays = {"q": q, "pages": pages, "indptr": indptr, "order": order, "last": last, "z0": zeros, "pos": own}
        for key, value in arrays.items():
            inputs[f"{name}/{key}"] = value
        scale = d**-0.5
        kernels.append(
            {
                "name": name,
                "func": name,
                "args": [f"{name}/{key}" for key in arrays],
                "outputs": [[list(q.shape), "float32"], [list(q.shape[:2]), "float32"]],
                "scalars": [0, 1.0, 1e4, scale],
            }
        )
        outs, lses = [], []
        for b, n in enumerate(ATTENTION_LENGTHS):
            slots = [(order[indptr[b] + r // PAGE], r % PAGE) for r in range(n)]
            kk = np.stack([pages[p, 0, :, s] for p, s in slots])
            vv = np.stack([pages[p, 1, :, s] for p, s in slots])
            o, lse = _reference(q[b], kk, vv, scale)
            outs.append(o)
            lses.append(lse)
        refs[f"{name}/0"], refs[f"{name}/1"] = np.stack(outs), np.stack(lses)

    for name, (func, case_inputs, case_refs) in codec_kernel_cases(rng).items():
        funcs[name] = func
        inputs.update({f"{name}/{key}": value for key, value in case_inputs.items()})
        refs.update({f"{name}/{i}": ref for i, ref in enumerate(case_refs)})
        out = [[list(ref.shape), "float32"] for ref in case_refs]
        kernels.append({"name": name, "func": name, "args": [f"{name}/{key}" for key in case_inputs], "outputs": out})

    target, record = resolve(spec, threads=2)
    lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    lib.export_library(str(folder / "kernels.so"), fcompile=library_compiler(spec, record["arch"]))

    ort = pytest.importorskip("onnxruntime")
    onnx_files = load_tool("make_tiny_onnx").write(folder / "onnx", GRAPHS)
    graphs = []
    for name in GRAPHS:
        sess = ort.InferenceSession(str(onnx_files[name]), providers=["CPUExecutionProvider"])
        feeds = {}
        for inp in sess.get_inputs():
            shape = [d if isinstance(d, int) else 3 for d in inp.shape]  # 3 rows for symbolic dims
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
            inputs[f"{name}/{inp.name}"] = feeds[inp.name]
        for o, value in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
            refs[f"{name}/{o.name}"] = value
        edgert.compile(str(onnx_files[name]), target="rpi5", output=folder / f"{name}.edgert")
        graphs.append({"name": name, "artifact": f"{name}.edgert", "feeds": {key: f"{name}/{key}" for key in feeds}})

    # onnxruntime's integer layers (dynamic MatMulInteger, QDQ MatMul, Gemm and Conv): the sdot kernels.
    import onnx
    from test_graph_conv import _integer_layers_graph

    onnx.save(_integer_layers_graph(), str(folder / "int8.onnx"))
    sess = ort.InferenceSession(str(folder / "int8.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        "x": rng.standard_normal((1, 13, 20)).astype(np.float32),
        "x2": rng.standard_normal((13, 20)).astype(np.float32),
    }
    inputs.update({f"int8/{key}": value for key, value in feeds.items()})
    refs.update({f"int8/{o.name}": v for o, v in zip(sess.get_outputs(), sess.run(None, feeds), strict=True)})
    edgert.compile(str(folder / "int8.onnx"), target="rpi5", output=folder / "int8.edgert")
    graphs.append({"name": "int8", "artifact": "int8.edgert", "feeds": {key: f"int8/{key}" for key in feeds}})
    with zipfile.ZipFile(folder / "int8.edgert") as zf:
        (folder / "int8.so").write_bytes(zf.read("model.so"))

    np.savez(folder / "inputs.npz", **inputs)
    (folder / "plan.json").write_text(json.dumps({"library": "kernels.so", "kernels": kernels, "graphs": graphs}))
    outputs = run_plan(folder, rootfs, spec.cpu)
    asm = _disassemble(folder / "kernels.so")
    return {"outputs": outputs, "refs": refs, "asm": asm, "int8_asm": _disassemble(folder / "int8.so")}


def run_plan(folder: Path, rootfs: Path, cpu: str) -> dict[str, np.ndarray]:
    """Run ``folder``'s plan.json with tests/board_kernel_runner.py under qemu-aarch64 (``-cpu cpu``)
    in the board's root file system, with this checkout's runtime; its outputs by name."""
    from edgert.deploy import board
    from edgert.paths import config_dir

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{ROOT}:{rootfs / board.SITE}",  # this checkout's runtime, the board's aarch64 wheels
        "TVM_USE_RUNTIME_LIB": "1",
        "TVM_NUM_THREADS": "2",
        "HOME": str(folder),
        "EDGERT_CACHE": str(folder / "cache"),
        # The artifacts here are signed with this user's key: the emulated process trusts the same keys.
        "XDG_CONFIG_HOME": str(config_dir().parent),
    }
    argv = ["qemu-aarch64-static", "-L", str(rootfs), "-cpu", cpu, str(rootfs / board.PYTHON)]
    argv += [str(ROOT / "tests" / "board_kernel_runner.py"), str(folder)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(folder / "outputs.npz") as f:
        return {key: f[key] for key in f.files}


def _disassemble(lib: Path) -> str:
    objdump = shutil.which("aarch64-linux-gnu-objdump")  # binutils, installed with the cross g++
    assert objdump is not None
    return subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout


def test_it_ran_on_aarch64_with_neon(board_run: dict) -> None:
    assert str(board_run["outputs"]["machine"]) == "aarch64"
    # vector FMAs, int-to-float conversions and the int8 kernels' dot products: NEON/dotprod code really ran
    for op in ("fmla", "ucvtf", "sdot"):
        assert f"{op}\tv" in board_run["asm"], f"no NEON '{op}' in the kernels"


@pytest.mark.parametrize("name", [m[0] for m in MATMULS if m[1] in ("Q4_0", "Q4_1", "Q8_0")])
def test_int8_activation_matmuls_match_numpy_on_aarch64(board_run: dict, name: str) -> None:
    """The sdot kernels: int8-rounded activations for every row count."""
    for m in ROWS:
        key = f"{name}/m{m}/sdot/0"
        want, got = board_run["refs"][key], board_run["outputs"][key]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=key)


@pytest.mark.parametrize("name", [m[0] for m in MATMULS])
def test_matmuls_match_numpy_on_aarch64(board_run: dict, name: str) -> None:
    for m in ROWS:
        key = f"{name}/m{m}/0"
        want, got = board_run["refs"][key], board_run["outputs"][key]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=key)


@pytest.mark.parametrize("head_dim", [64, 48])
def test_decode_attention_matches_numpy_on_aarch64(board_run: dict, head_dim: int) -> None:
    name = f"attention_d{head_dim}"
    np.testing.assert_allclose(board_run["outputs"][f"{name}/0"], board_run["refs"][f"{name}/0"], atol=2e-5)
    np.testing.assert_allclose(board_run["outputs"][f"{name}/1"], board_run["refs"][f"{name}/1"], atol=2e-4)


def test_int8_graph_matches_onnxruntime_bytes_on_aarch64(board_run: dict) -> None:
    """MatMulInteger and the QDQ layers on the graph's sdot kernels: onnxruntime's integers and bytes."""
    assert "sdot\tv" in board_run["int8_asm"]
    keys = [k for k in board_run["refs"] if k.startswith("int8/")]
    assert len(keys) == 5
    for key in keys:
        want, got = board_run["refs"][key], board_run["outputs"][key]
        assert got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("case", GRAPHS + CODEC_KERNELS)
def test_graph_rules_and_codec_kernels_match_on_aarch64(board_run: dict, case: str) -> None:
    """The graphs against onnxruntime, the codec family's kernels against numpy."""
    keys = [k for k in board_run["refs"] if k.startswith(f"{case}/")]
    assert keys
    for key in keys:
        np.testing.assert_allclose(board_run["outputs"][key], board_run["refs"][key], rtol=1e-5, atol=1e-5)
