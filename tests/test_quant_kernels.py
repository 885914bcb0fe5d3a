"""Group-quantized weights: GGUF block decoding, edgert's quantizer, and the q4/q8 matmul kernels.

K-quant blocks (Q4_K, Q5_K, Q6_K) and Q5_0 are random bytes with sane f16 super-block scales (gguf
only dequantizes them): their codes and scales must reproduce gguf's dequantization bit for bit,
and the kernels of their formats (f32 scales, Q6_K's groups of 16, Q5_K's q8 with a min) must
match numpy on awkward shapes.

The kernels are checked against numpy (float64) on awkward shapes: N not a multiple of the
column tile or of the vector width, one output tile smaller than the tile, one row (decode),
a few rows (speculative verify), and row counts past the row tile with a remainder. K is always
whole groups of 32, as GGUF blocks are.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgert.compiler.kernels.quant import ROW_TILE, quant_block, quant_matmul
from edgert.compiler.layout import pack_quantized
from edgert.compiler.quantize import choose_storage, quantize_rows, storage_kind
from edgert.frontend.quantized import QuantizedRows, concat_rows, from_gguf_blocks

# (kind, N, K): N = 1000 and 37 are multiples of neither 8 nor 32; N = 20 is below one tile.
SHAPES = [("q4", 1000, 96), ("q4", 37, 64), ("q4", 20, 32), ("q4", 64, 160), ("q8", 1000, 96), ("q8", 37, 64)]
# Decode (1), below the prefill row tile (2, 3: speculative verify of 1-2 drafts), the prefill
# path at its row tile (4), with a remainder (5 = verify of 4 drafts, 7) and past two tiles (9).
ROWS = (1, 2, 3, ROW_TILE, ROW_TILE + 1, 7, 2 * ROW_TILE + 1)


def _packed_weights(kind: str, n: int, k: int, seed: int) -> tuple[np.random.Generator, QuantizedRows, list]:
    """A random ``[n, k]`` weight quantized as ``kind`` and packed in the dot layout (the tensors the
    int8 kernels take), with its quantized rows and the generator the test draws its inputs from."""
    import tvm

    from edgert.compiler.layout import pack_quantized_dot

    rng = np.random.default_rng(seed)
    q = quantize_rows(rng.standard_normal((n, k)).astype(np.float32), kind)
    return rng, q, [tvm.runtime.tensor(a) for a in pack_quantized_dot(q, quant_block(n))]


def _gguf_blocks(x: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_exactly(kind: str) -> None:
    """Codes and scales read from GGUF bytes reproduce gguf's own dequantization bit for bit."""
    import gguf

    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32) * 3
    blocks = _gguf_blocks(x, kind)
    q = from_gguf_blocks(kind, blocks, x.shape)
    assert q.kind == ("q8" if kind == "Q8_0" else "q4") and q.shape == x.shape
    expected = np.asarray(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]), np.float32)
    np.testing.assert_array_equal(q.dequantize(), expected)
    assert 0 < np.abs(q.dequantize() - x).max() < 1.0  # really quantized, and near the input


# Bytes per block and where its f16 super-block scale(s) sit.
KQUANT_BLOCKS = {
    "Q5_0": (22, 32, (0,)),
    "Q4_K": (144, 256, (0, 2)),
    "Q5_K": (176, 256, (0, 2)),
    "Q6_K": (210, 256, (208,)),
}
# (GGUF type, N, K) for the kernels of the K-quant formats: N off the tile and vector widths.
KQUANT_SHAPES = [("Q4_K", 37, 256), ("Q5_K", 20, 256), ("Q6_K", 1000, 512)]


def kquant_blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF bytes of type ``kind`` for an [n, k] matrix, with f16 scales of a trained model's size."""
    size, per, offsets = KQUANT_BLOCKS[kind]
    b = rng.integers(0, 256, (n * k // per, size), dtype=np.uint8)
    for off in offsets:
        scale = (rng.uniform(0.5, 2.0, len(b)) * 1e-3).astype(np.float16)
        b[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return b.reshape(n, -1)


@pytest.mark.parametrize("kind", list(KQUANT_BLOCKS))
def test_kquant_blocks_decode_exactly(kind: str) -> None:
    """Codes and per-sub-block scales of Q5_0 and K-quant bytes reproduce gguf's dequantization bit for bit."""
    import gguf

    blocks = kquant_blocks(kind, 6, 512, np.random.default_rng(7))
    q = from_gguf_blocks(kind, blocks, (6, 512))
    expected = np.asarray(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]), np.float32)
    np.testing.assert_array_equal(q.dequantize().view(np.uint32), expected.reshape(6, 512).view(np.uint32))
    assert q.fmt.key == {"Q5_0": "q8", "Q4_K": "q4s32", "Q5_K": "q8s32m", "Q6_K": "q8g16s32"}[kind]
    order = np.array([3, 1, 5])
    np.testing.assert_array_equal(q.take_rows(order).dequantize(), q.dequantize()[order])


@pytest.fixture(scope="module")
def kquant_kernels():
    """The kernels of KQUANT_SHAPES compiled for the host in one module, with their matrices."""
    import tvm
    from tvm.target import codegen

    rng = np.random.default_rng(11)
    funcs, mats = {}, {}
    for kind, n, k in KQUANT_SHAPES:
        q = from_gguf_blocks(kind, kquant_blocks(kind, n, k, rng), (n, k))
        funcs[kind] = quant_matmul(k, n, quant_block(n), q.fmt.key).with_attr("global_symbol", kind)
        mats[kind] = q
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    return tvm.compile(tvm.IRModule(funcs), target=target), mats


@pytest.mark.parametrize(("kind", "n", "k"), KQUANT_SHAPES)
def test_kquant_matmul_matches_numpy(kquant_kernels, kind: str, n: int, k: int) -> None:
    import tvm

    lib, mats = kquant_kernels
    q = mats[kind]
    weights = [tvm.runtime.tensor(a) for a in pack_quantized(q, quant_block(n))]
    w64 = q.dequantize().astype(np.float64)
    rng = np.random.default_rng(n)
    for m in ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[kind](tvm.runtime.tensor(x), *weights, y)
        expected = x.astype(np.float64) @ w64.T
        np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=f"m={m}")


@pytest.mark.parametrize(("kind", "gguf_kind"), [("q4", "Q4_1"), ("q8", "Q8_0")])
def test_own_quantizer_matches_ggml(kind: str, gguf_kind: str) -> None:
    """edgert's quantizer gives the values ggml's reference quantizer gives for Q4_1 / Q8_0."""
    import gguf

    x = np.random.default_rng(1).standard_normal((7, 128)).astype(np.float32)
    x[0, :32] = 0.25  # a constant group: scale 0
    ours = quantize_rows(x, kind).dequantize()
    theirs = gguf.quants.dequantize(_gguf_blocks(x, gguf_kind), gguf.GGMLQuantizationType[gguf_kind])
    # Equal but for codes where x sits exactly between two levels (rounding of ties).
    assert np.mean(ours == theirs) > 0.999
    step = np.abs(np.diff(np.sort(np.unique(theirs)))).min()
    assert np.abs(ours - theirs).max() <= max(step, 0.1)


def test_row_operations_and_storage_choice() -> None:
    x = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    q = quantize_rows(x, "q4")
    order = np.array([5, 0, 3, 1, 4, 2])
    np.testing.assert_array_equal(q.take_rows(order).dequantize(), q.dequantize()[order])
    both = concat_rows([q, q.take_rows(order)])
    assert isinstance(both, QuantizedRows) and both.shape == (12, 64)
    mixed = concat_rows([q, x])  # different storages: float32
    assert isinstance(mixed, np.ndarray) and mixed.dtype == np.float32
    assert choose_storage(q, "source") is q and choose_storage(q, "q4") is q
    assert storage_kind(choose_storage(q, "q8")) == "q8"
    assert storage_kind(choose_storage(x, "source")) == "f16" and storage_kind(choose_storage(q, "f32")) == "f32"
    assert storage_kind(choose_storage(x[:, :40], "q4")) == "f16"  # 40 columns: not whole groups


@pytest.fixture(scope="module")
def kernels():
    """Every kernel of SHAPES compiled for the host in one module."""
    import tvm
    from tvm.target import codegen

    funcs = {}
    for kind, n, k in SHAPES:
        name = f"{kind}_{n}_{k}"
        funcs[name] = quant_matmul(k, n, quant_block(n), kind).with_attr("global_symbol", name)
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    return tvm.compile(tvm.IRModule(funcs), target=target)


@pytest.mark.parametrize(("kind", "n", "k"), SHAPES)
def test_quant_matmul_matches_numpy(kernels, kind: str, n: int, k: int) -> None:
    import tvm

    rng = np.random.default_rng(n + k)
    q = quantize_rows(rng.standard_normal((n, k)).astype(np.float32), kind)
    weights = [tvm.runtime.tensor(a) for a in pack_quantized(q, quant_block(n))]
    w64 = q.dequantize().astype(np.float64)
    for m in ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        kernels[f"{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, y)
        expected = x.astype(np.float64) @ w64.T
        np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=f"m={m}")


def test_one_token_path_prefetches_codes_and_scales() -> None:
    """The one-row GEMV issues software prefetches for its code and scale streams (x86 ``prefetcht0``,
    aarch64 ``prfm``): decode is bound by how fast the weights arrive. Each step of the code loop has
    one, and each group one per scale row, so a q4s32 kernel (a min too) has more than a q8 one."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    counts = {}
    for kind in ("q8", "q4s32"):
        func = quant_matmul(64, 64, 32, kind).with_attr("global_symbol", f"f_{kind}")
        asm = tvm.compile(tvm.IRModule({f"f_{kind}": func}), target=target).mod.inspect_source("asm")
        counts[kind] = sum(asm.count(op) for op in ("prefetcht0", "prfm"))
    assert counts["q8"] >= 2 and counts["q4s32"] > counts["q8"], counts


def test_pack_quantized_layout() -> None:
    """Nibble s of word kk in column tile t holds the code of row 8 kk + s, column t * B + j."""
    q = quantize_rows(np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32), "q4")
    qweight, scale, minimum = pack_quantized(q, 32)
    assert qweight.shape == (2, 8, 32) and scale.shape == minimum.shape == (2, 2, 32)
    col, row = 37, 45
    t, j = divmod(col, 32)
    assert (int(qweight[t, row // 8, j]) >> (4 * (row % 8))) & 15 == q.codes[col, row]
    assert scale[t, row // 32, j] == q.scale[col, row // 32]
    assert qweight[1, :, 8:].max() == 0 and scale[1, :, 8:].max() == 0  # zero padding past N = 40


@pytest.mark.slow
def test_quant_kernels_cross_compile_to_neon(tmp_path) -> None:
    """The same kernels built for the Raspberry Pi 5 (aarch64, NEON + dotprod) with the cross
    toolchain: an aarch64 library whose inner loops are NEON vector FMAs, with the multi-row int8
    kernel's ``sdot`` form. (Running them needs an aarch64 machine or the emulated board; here
    they are only compiled.)"""
    import shutil
    import struct
    import subprocess

    import tvm

    from edgert.compiler.target import library_compiler, resolve
    from edgert.targets import load_target

    spec = load_target("rpi5")
    if shutil.which(spec.cc) is None:
        pytest.fail(f"{spec.cc} is missing: tools/setup.sh --test installs it")
    target, record = resolve(spec)
    from edgert.compiler.kernels.int8 import multirow_quant_matmul

    funcs = {
        f"{kind}_{n}_{k}": quant_matmul(k, n, quant_block(n), kind).with_attr("global_symbol", f"{kind}_{n}_{k}")
        for kind, n, k in SHAPES
    }
    # The multi-row int8 kernel's sdot form (not yet the aarch64 default: untimed on a board).
    funcs["multirow_sdot"] = multirow_quant_matmul(64, 37, 32, "q4", "dotprod").with_attr("global_symbol", "mr")
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    out = tmp_path / "kernels.so"
    lib.export_library(str(out), fcompile=library_compiler(spec, record["arch"]))
    elf = out.read_bytes()
    assert elf[:4] == b"\x7fELF" and struct.unpack("<H", elf[18:20])[0] == 183  # EM_AARCH64
    objdump = shutil.which("aarch64-linux-gnu-objdump")  # binutils, installed with the cross g++
    assert objdump is not None
    asm = subprocess.run([objdump, "-d", str(out)], capture_output=True, text=True, check=True).stdout
    # 4-lane float FMAs, nibble shifts and int-to-float conversions on vector registers.
    for op in ("fmla", "ushr", "ucvtf"):
        assert f"{op}\tv" in asm and ".4s" in asm, f"no NEON '{op}' in the kernels"
    assert "sdot\tv" in asm


# -- int8-activation kernels (kernels_int8) ------------------------------------------------


def int8_activation_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` in float64 with x rounded as the int8 kernels round it: per group of 32, scale max|x|/127,
    the codes rounded from float32 products as the kernels form them (a product that float64 puts a
    hair from a half rounded the other way: one code in 3,168, row 27 of 33 rows)."""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(g).max(-1, keepdims=True)
    scale = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    rounded = np.round(g * scale).astype(np.float64) * (amax.astype(np.float64) / 127)
    return rounded.reshape(m, k) @ w.astype(np.float64).T


def int8x2_activation_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` with x in two int8 parts per group of 32, as the VNNI kernel takes q8 weights: the
    rounding of `int8_activation_reference`, plus its remainder rounded the same way on its own scale."""
    m, k = x.shape

    def rounded(a: np.ndarray) -> np.ndarray:
        amax = np.abs(a).max(-1, keepdims=True)
        return np.round(a * np.where(amax > 0, 127 / np.where(amax > 0, amax, 1), 0)) * (amax / 127)

    g = x.reshape(m, k // 32, 32).astype(np.float64)
    first = rounded(g)
    return (first + rounded(g - first)).reshape(m, k) @ w.astype(np.float64).T


@pytest.fixture(scope="module")
def int8_kernels():
    """The int8-activation kernels of SHAPES for this host's instruction set, in one module."""
    import tvm
    from tvm.target import codegen

    from edgert.compiler.kernels.int8 import dot_isa, int8_quant_matmul

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})
    isa = dot_isa(codegen.llvm_get_cpu_features(target))
    if isa is None:
        pytest.fail("this host has neither AVX2 nor dotprod: the int8 kernels need one")
    if isa == "avx512vnni":  # the row-at-a-time AVX2 kernel here; the VNNI one has its own tests below
        isa = "avx2"
    funcs = {
        f"{kind}_{n}_{k}": int8_quant_matmul(k, n, quant_block(n), kind, isa).with_attr(
            "global_symbol", f"{kind}_{n}_{k}"
        )
        for kind, n, k in SHAPES
    }
    return tvm.compile(tvm.IRModule(funcs), target=target)


@pytest.mark.parametrize(("kind", "n", "k"), SHAPES)
def test_int8_activation_matmul_matches_numpy(int8_kernels, kind: str, n: int, k: int) -> None:
    """Every row count (decode, prefill) gives exactly the product with int8-rounded activations
    (to float32 rounding), off the float product by that rounding."""
    import tvm

    rng, q, weights = _packed_weights(kind, n, k, seed=n + k + 1)
    w = q.dequantize()
    for m in ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        if k > 32:
            x[0, :32] = 0  # an all-zero group: activation scale 0
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        int8_kernels[f"{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, y)
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        want = int8_activation_reference(x, w)
        np.testing.assert_allclose(y.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"m={m}")
        rel = np.abs(y.numpy() - exact).max() / np.abs(exact).max()  # really int8: off, but not far
        assert 1e-4 < rel < 0.03, rel


def test_pack_quantized_dot_layout() -> None:
    """Byte t of column j's 4 bytes at row group kk holds rows 8 kk + t (low nibble) and 8 kk + 4 + t (high)."""
    from edgert.compiler.layout import pack_quantized_dot

    q = quantize_rows(np.random.default_rng(4).standard_normal((40, 64)).astype(np.float32), "q4")
    qweight, scale, minimum = pack_quantized_dot(q, 32)
    assert qweight.shape == (2, 8, 32, 4) and qweight.dtype == np.uint8 and scale.shape == (2, 2, 32)
    col, row = 37, 45
    t, j = divmod(col, 32)
    byte = int(qweight[t, row // 8, j, row % 4])
    assert (byte >> (4 * ((row % 8) // 4))) & 15 == q.codes[col, row]
    assert qweight[1, :, 8:].max() == 0 and minimum[1, :, 8:].max() == 0  # zero padding past N = 40
    q8 = quantize_rows(np.random.default_rng(5).standard_normal((20, 32)).astype(np.float32), "q8")
    codes, _ = pack_quantized_dot(q8, 16)
    assert codes.shape == (2, 8, 16, 4) and codes[1, 3, 2, 1] == q8.codes[18, 13]


def test_int8_activations_need_a_dot_product_instruction_set() -> None:
    from edgert.errors import EdgertError
    from edgert.families.llama.build import _int8_isa

    host = {"name": "host", "cpu": "znver3", "cpu_flags": ["avx", "avx2", "fma"]}
    rpi4 = {"name": "rpi4", "cpu": "cortex-a72", "cpu_flags": ["neon"]}
    rpi5 = {"name": "rpi5", "cpu": "cortex-a76", "cpu_flags": ["dotprod", "neon"]}
    assert _int8_isa("f32", rpi4) is None
    assert _int8_isa("int8", host) == "avx2" and _int8_isa("int8", rpi5) == "dotprod"
    znver5 = {"name": "host", "cpu": "znver5", "cpu_flags": ["avx", "avx2", "avx512bw", "avx512f", "avx512vnni", "fma"]}
    assert _int8_isa("int8", znver5) == "avx512vnni"
    # auto: int8 on VNNI only (AVX2's float q8 head was faster; other CPUs not measured)
    assert _int8_isa("auto", znver5) == "avx512vnni" and _int8_isa("auto", host) is None
    assert _int8_isa("auto", rpi4) is None and _int8_isa("auto", rpi5) is None
    # AMX tiles where the CPU has them, on the VNNI layout
    spr = {**znver5, "cpu": "rocketlake", "cpu_flags": [*znver5["cpu_flags"], "amx-int8", "amx-tile"]}
    assert _int8_isa("auto", spr) == "amx" and _int8_isa("int8", spr) == "amx"
    with pytest.raises(EdgertError, match=r"target 'rpi4' \(cortex-a72\) has neon"):
        _int8_isa("int8", rpi4)
    with pytest.raises(EdgertError, match="'int4' is not one of f32, int8, auto"):
        _int8_isa("int4", host)


# -- the multi-row AVX-512 VNNI kernel (kernels.int8.multirow_quant_matmul) -------------------------
# (kind, N, K): N = 1000 and 37 not multiples of the 32-column tile nor of a 16-lane register,
# N = 20 one tile of 16 columns, K = 96 three groups (not a multiple of the 64-byte register), K = 32 one.
VNNI_SHAPES = [("q4", 1000, 96), ("q4", 20, 32), ("q8", 37, 64)]
# Every row tile (1..5) alone and after tiles of 5 (6 = 5 + 1, ..., 9 = 5 + 4), up to a verify pass of
# 15, and prompt chunks (`PROMPT_ROWS` = 16 on: the prologue on every thread, 4 rows a task) of every
# remainder of 4 and of 5.
VNNI_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 15, 16, 17, 33, 63, 64, 100, 128)
# The prologue kernels' row counts: every tile, and prompt chunks on both sides of `PROMPT_ROWS`.
PROLOGUE_ROWS = (1, 2, 3, 5, 6, 7, 9, 13, 15, 16, 17, 63, 64, 100, 128)


@pytest.fixture(scope="module")
def vnni_kernels():
    """The VNNI kernels of VNNI_SHAPES for an AVX-512 VNNI CPU (znver4), and whether this host runs them."""
    import tvm
    from tvm.target import codegen

    from edgert.compiler.kernels.int8 import dot_isa, int8_quant_matmul

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2})
    assert dot_isa(codegen.llvm_get_cpu_features(target)) == "avx512vnni"
    funcs = {
        f"{kind}_{n}_{k}": int8_quant_matmul(k, n, quant_block(n), kind, "avx512vnni").with_attr(
            "global_symbol", f"{kind}_{n}_{k}"
        )
        for kind, n, k in VNNI_SHAPES
    }
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return lib, "avx512vnni" in codegen.llvm_get_cpu_features(host)


@pytest.mark.parametrize(("kind", "n", "k"), VNNI_SHAPES)
def test_vnni_multirow_matmul_matches_numpy(vnni_kernels, kind: str, n: int, k: int) -> None:
    """Every row count gives the product with int8-rounded activations (q8: in two int8 parts) to
    float32 rounding, and each row exactly what it gives alone (a verify pass's rows are decode
    steps bit for bit, whichever tiles the row count takes): rows of one static tile share each
    unpacked code register."""
    import tvm

    lib, runs_here = vnni_kernels
    if not runs_here:  # the code is still checked: VNNI instructions in the compiled kernels
        asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
        assert "vpdpbusd\t%zmm" in asm
        pytest.skip("this host has no AVX-512 VNNI to run the kernels on (compiled and checked only)")
    rng, q, weights = _packed_weights(kind, n, k, seed=n + k + 2)
    w = q.dequantize()
    for m in VNNI_ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[-1] *= 100  # one row far larger: a row's result must not leak into another's
        if k > 32:
            x[0, :32] = 0  # an all-zero group: activation scale 0
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[f"{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, y)
        for i in (0, m // 2, m - 1):
            alone = tvm.runtime.tensor(np.full((1, n), np.nan, np.float32))
            lib[f"{kind}_{n}_{k}"](tvm.runtime.tensor(x[i : i + 1]), *weights, alone)
            np.testing.assert_array_equal(y.numpy()[i], alone.numpy()[0], err_msg=f"m={m}, row {i}")
        want = (int8_activation_reference if kind == "q4" else int8x2_activation_reference)(x, w)
        err = np.abs(y.numpy() - want) / np.abs(want).max(axis=1, keepdims=True)  # per row's own scale
        # q8: the kernel forms the remainder in float32, so now and then one of its codes rounds the other way
        assert err.max() < (1e-5 if kind == "q4" else 3e-5), f"m={m}: {err.max()}"
        if kind == "q8":  # two parts: far closer to the float product than one int8 rounding
            exact = x.astype(np.float64) @ w.astype(np.float64).T
            one_part = int8_activation_reference(x, w)
            assert np.abs(want - exact).max() < 0.02 * np.abs(one_part - exact).max()


# SwiGLU prologue: (kind, N, K) with the down projection's x = [gate | up] of width 2 K.
SWIGLU_SHAPES = [("q4", 37, 64), ("q8", 20, 96)]


@pytest.fixture(scope="module")
def swiglu_kernels():
    """`multirow_quant_matmul` with the swiglu and rmsnorm prologues for SWIGLU_SHAPES (znver4), and a vector kernel
    of `fast_exp` / `fast_exp2`; whether this host runs them."""
    import tvm
    from tvm.script import tirx as T
    from tvm.target import codegen

    from edgert.compiler.kernels.fastmath import fast_exp, fast_exp2
    from edgert.compiler.kernels.int8 import multirow_quant_matmul

    @T.prim_func
    def exps(x: T.Buffer((4096,), "float32"), e: T.Buffer((4096,), "float32"), e2: T.Buffer((4096,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for o in range(256):
            for v in T.vectorized(16):
                e[o * 16 + v] = fast_exp(x[o * 16 + v])
                e2[o * 16 + v] = fast_exp2(x[o * 16 + v])

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "num-cores": 2})
    funcs = {
        f"{prologue}_{kind}_{n}_{k}": multirow_quant_matmul(
            k, n, quant_block(n), kind, "avx512vnni", prologue, 1e-5
        ).with_attr("global_symbol", f"{prologue}_{kind}_{n}_{k}")
        for kind, n, k in SWIGLU_SHAPES
        for prologue in ("swiglu", "rmsnorm")
    }
    for kind, n, k in SWIGLU_SHAPES:  # the residual epilogue, and the kernels it goes with without it
        for prologue in ("", "swiglu"):
            name = f"{prologue}_{kind}_{n}_{k}"
            funcs[f"res{name}"] = multirow_quant_matmul(
                k, n, quant_block(n), kind, "avx512vnni", prologue, residual=True
            ).with_attr("global_symbol", f"res{name}")
            if not prologue:
                funcs[name] = multirow_quant_matmul(k, n, quant_block(n), kind, "avx512vnni").with_attr(
                    "global_symbol", name
                )
    funcs["exps"] = exps.with_attr("global_symbol", "exps")
    lib = tvm.tirx.build(tvm.IRModule(funcs), target=target)
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return lib, "avx512vnni" in codegen.llvm_get_cpu_features(host)


def test_fast_exp_matches_numpy(swiglu_kernels) -> None:
    """The vectorized exp and exp2 are within a few float32 ulp of numpy's over the range they take."""
    import tvm

    lib, runs_here = swiglu_kernels
    if not runs_here:
        pytest.skip("this host has no AVX-512 to run the znver4 kernels on")
    x = np.linspace(-87.0, 88.0, 4096, dtype=np.float32)
    e, e2 = tvm.runtime.tensor(np.zeros(4096, np.float32)), tvm.runtime.tensor(np.zeros(4096, np.float32))
    lib["exps"](tvm.runtime.tensor(x), e, e2)
    ulp = np.finfo(np.float32).eps
    assert np.abs(e.numpy() / np.exp(x.astype(np.float64)) - 1).max() < 4 * ulp
    assert np.abs(e2.numpy() / np.exp2(x.astype(np.float64)) - 1).max() < 4 * ulp


def _rows_as_alone(kernel, x: np.ndarray, extra: list, weights: list, y: np.ndarray) -> None:
    """The first, a middle and the last row of ``y`` (a kernel's output for every row of ``x``) equal each
    row run alone, bit for bit: a prompt chunk's prologue (on every thread) forms the activations of
    the serial one that decode steps and verify passes take."""
    import tvm

    m, n = y.shape
    for i in sorted({0, m // 2, m - 1}):
        alone = tvm.runtime.tensor(np.full((1, n), np.nan, np.float32))
        kernel(tvm.runtime.tensor(x[i : i + 1]), *extra, *weights, alone)
        np.testing.assert_array_equal(y[i], alone.numpy()[0], err_msg=f"m={m}, row {i}")


@pytest.mark.parametrize(("kind", "n", "k"), SWIGLU_SHAPES)
def test_swiglu_prologue_matches_numpy(swiglu_kernels, kind: str, n: int, k: int) -> None:
    """The down projection with ``silu(gate) * up`` formed in its quantization equals the product of
    the int8-rounded SwiGLU activation (numpy's, in float64) with the weights, on every static row
    tile, rows of gates from -100 to 100 (exp's clamps)."""
    import tvm

    lib, runs_here = swiglu_kernels
    if not runs_here:
        pytest.skip("this host has no AVX-512 VNNI to run the kernels on")
    rng, q, weights = _packed_weights(kind, n, k, seed=n + k)
    w = q.dequantize()
    for m in PROLOGUE_ROWS:
        x = (rng.standard_normal((m, 2 * k)) * 3).astype(np.float32)
        x[0, :4] = [-100.0, 100.0, -30.0, 30.0]
        gate, up = x[:, :k].astype(np.float64), x[:, k:].astype(np.float64)
        act = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[f"swiglu_{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, y)
        _rows_as_alone(lib[f"swiglu_{kind}_{n}_{k}"], x, [], weights, y.numpy())
        want = (int8_activation_reference if kind == "q4" else int8x2_activation_reference)(act, w)
        err = np.abs(y.numpy() - want) / np.abs(want).max(axis=1, keepdims=True)
        assert err.max() < (1e-5 if kind == "q4" else 3e-5), f"m={m}: {err.max()}"


@pytest.mark.parametrize(("kind", "n", "k"), SWIGLU_SHAPES)
@pytest.mark.parametrize("prologue", ["", "swiglu"])
def test_residual_epilogue_adds_the_rows_bit_for_bit(swiglu_kernels, prologue: str, kind: str, n: int, k: int) -> None:
    """With ``residual=True`` the kernel writes ``res + x W^T`` equal bit for bit to its output without the
    epilogue plus ``res`` (one float32 add, as the separate add kernel it replaces), on every static row
    tile and a prompt chunk; ``res`` itself is left as it was."""
    import tvm

    lib, runs_here = swiglu_kernels
    if not runs_here:
        pytest.skip("this host has no AVX-512 VNNI to run the kernels on")
    rng, _, weights = _packed_weights(kind, n, k, seed=n + k + 3)
    name = f"{prologue}_{kind}_{n}_{k}"
    for m in (1, 2, 3, 4, 5, 6, 9, 16, 17):
        x = (rng.standard_normal((m, 2 * k if prologue else k)) * 3).astype(np.float32)
        res = (rng.standard_normal((m, n)) * rng.uniform(0.1, 100, (m, 1))).astype(np.float32)
        plain = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[name](tvm.runtime.tensor(x), *weights, plain)
        res_t = tvm.runtime.tensor(res)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[f"res{name}"](tvm.runtime.tensor(x), *weights, res_t, y)
        np.testing.assert_array_equal(y.numpy(), res + plain.numpy(), err_msg=f"m={m}")
        np.testing.assert_array_equal(res_t.numpy(), res)
        assert not np.array_equal(y.numpy(), plain.numpy())


@pytest.mark.parametrize(("kind", "n", "k"), SWIGLU_SHAPES)
def test_rmsnorm_prologue_matches_numpy(swiglu_kernels, kind: str, n: int, k: int) -> None:
    """A projection with the RMSNorm before it taken in its quantization equals the product of the
    int8-rounded norm (numpy's, in float64) with the weights, on every static row tile; a row of
    zeros gives zeros (eps keeps the scale finite)."""
    import tvm

    lib, runs_here = swiglu_kernels
    if not runs_here:
        pytest.skip("this host has no AVX-512 VNNI to run the kernels on")
    rng, q, weights = _packed_weights(kind, n, k, seed=n + k + 1)
    w = q.dequantize()
    gamma = rng.uniform(0.2, 3.0, k).astype(np.float32)
    for m in PROLOGUE_ROWS:
        x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 50, (m, 1))).astype(np.float32)
        x[-1] = 0
        x64 = x.astype(np.float64)
        act = (x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-5) * gamma).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[f"rmsnorm_{kind}_{n}_{k}"](tvm.runtime.tensor(x), tvm.runtime.tensor(gamma), *weights, y)
        _rows_as_alone(lib[f"rmsnorm_{kind}_{n}_{k}"], x, [tvm.runtime.tensor(gamma)], weights, y.numpy())
        want = (int8_activation_reference if kind == "q4" else int8x2_activation_reference)(act, w)
        assert not y.numpy()[-1].any()
        scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-30)
        err = np.abs(y.numpy() - want) / scale
        assert err.max() < (1e-5 if kind == "q4" else 3e-5), f"m={m}: {err.max()}"


# -- AMX tiles (kernels.int8.multirow_quant_matmul with isa="amx") ---------------------------------
AMX_SHAPES = [("q8", 37, 64), ("q8", 1000, 96), ("q8", 20, 32), ("q4", 1000, 96), ("q4", 48, 576), ("q4", 20, 64)]


@pytest.fixture(scope="module")
def amx_kernels():
    """VNNI and AMX builds of AMX_SHAPES for a CPU with AMX-INT8 (sapphirerapids), and whether this host runs them."""
    import tvm

    from edgert.compiler.kernels.int8 import multirow_quant_matmul
    from edgert.targets import AMX_FLAGS, enable_amx, host_cpu_flags

    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "num-cores": 2}
    )
    funcs = {
        f"{isa}_{kind}_{n}_{k}": multirow_quant_matmul(k, n, quant_block(n), kind, isa).with_attr(
            "global_symbol", f"{isa}_{kind}_{n}_{k}"
        )
        for kind, n, k in AMX_SHAPES
        for isa in ("avx512vnni", "amx")
    }
    for kind, n, k in AMX_SHAPES:  # the residual epilogue on the tiles' write-back too
        funcs[f"amx_res_{kind}_{n}_{k}"] = multirow_quant_matmul(
            k, n, quant_block(n), kind, "amx", residual=True
        ).with_attr("global_symbol", f"amx_res_{kind}_{n}_{k}")
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    runs_here = {"avx512vnni", "avx512bw", *AMX_FLAGS} <= host_cpu_flags()
    if runs_here:
        enable_amx()
    return lib, runs_here


@pytest.mark.parametrize(("kind", "n", "k"), AMX_SHAPES)
def test_amx_tiles_give_the_vnni_tiles_results(amx_kernels, kind: str, n: int, k: int) -> None:
    """q8 rows through AMX tiles (two rows on; full row tiles of 16 and a shorter last one) equal the
    VNNI kernel's bit for bit, so a verify pass's rows stay its decode steps; q4 keeps the VNNI tiles
    (the same outputs at every row count, prompt chunks included), and matches numpy's product. With
    the residual epilogue the tiles write ``res`` plus those outputs."""
    import tvm

    lib, runs_here = amx_kernels
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    assert "tdpbssd" in asm and "ldtilecfg" in asm and "tdpbsud" not in asm
    if not runs_here:
        pytest.skip("this host has no AMX-INT8 to run the tiles on (compiled and checked only)")
    rng, q, weights = _packed_weights(kind, n, k, seed=n + k + 7)
    # q4: prompt chunks of awkward sizes too (tiles of 5 and a rest of 1 or 2)
    for m in VNNI_ROWS + ((80, 81, 87, 97) if kind == "q4" else ()):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[-1] *= 100
        if k > 32:
            x[0, :32] = 0
        out = {}
        for isa in ("avx512vnni", "amx"):
            y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
            lib[f"{isa}_{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, y)
            out[isa] = y.numpy()
        assert not np.isnan(out["amx"]).any()
        np.testing.assert_array_equal(out["amx"], out["avx512vnni"], err_msg=f"m={m}")
        res = rng.standard_normal((m, n)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lib[f"amx_res_{kind}_{n}_{k}"](tvm.runtime.tensor(x), *weights, tvm.runtime.tensor(res), y)
        np.testing.assert_array_equal(y.numpy(), res + out["amx"], err_msg=f"residual, m={m}")
        if kind == "q4":
            want = int8_activation_reference(x, q.dequantize())
            err = np.abs(out["amx"] - want) / np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-30)
            assert err.max() < 1e-5, f"m={m}: {err.max()}"


def test_amx_flags_come_from_cpuinfo(tmp_path) -> None:
    """/proc/cpuinfo's amx_tile / amx_int8 are checked flags in LLVM's spelling, so an artifact built with
    tiles refuses a CPU without them; the host target adds them to LLVM's CPU (a virtual machine may
    name an older model than its features)."""
    from edgert.artifact.reader import check_target
    from edgert.errors import TargetError
    from edgert.targets import AMX_FLAGS, X86_CHECKED_FLAGS, host_arch, host_cpu_flags

    assert set(AMX_FLAGS) <= set(X86_CHECKED_FLAGS)
    if host_arch() != "x86_64":
        pytest.skip("x86-64 flags")
    from edgert.compiler.target import resolve
    from edgert.targets import load_target

    _, host = resolve(load_target("host"))
    assert (set(AMX_FLAGS) <= set(host["cpu_flags"])) == (set(AMX_FLAGS) <= host_cpu_flags())
    record = {"name": "host", "arch": "x86_64", "cpu": "sapphirerapids", "cpu_flags": list(AMX_FLAGS)}
    if set(AMX_FLAGS) <= host_cpu_flags():
        check_target(record, tmp_path)
    else:
        with pytest.raises(TargetError, match="amx-int8, amx-tile"):
            check_target(record, tmp_path)
