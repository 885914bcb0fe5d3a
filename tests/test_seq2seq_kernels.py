"""The Whisper encoder's kernels against numpy at the NEON and AVX-512 vector widths (AVX2 runs end to end).

Small shapes chosen to hit the remainders: rows not a multiple of the row tile, keys not a
multiple of the key tile. The vector width only changes tile sizes, so all three run here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import tvm

from edgert.compiler.kernels import seq2seq as sk
from edgert.compiler.target import resolve
from edgert.targets import load_target


@pytest.fixture(scope="module")
def build():
    target, _ = resolve(load_target("host"), 2)
    return lambda func: tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize("lanes", [4, 16])
def test_gemm_with_bias_and_gelu(build, lanes: int) -> None:
    rng = np.random.default_rng(lanes)
    m, k, n, block = 13, 96, 128, 64
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float32)
    packed = w.reshape(n // block, block, k).transpose(0, 2, 1).copy()  # the [N/B, K, B] layout
    expect = x @ w.astype(np.float32).T + b
    for activation, ref in ((None, expect), ("gelu", _gelu(expect))):
        y = tvm.runtime.empty((m, n), "float32", tvm.cpu())
        kernel = build(sk.gemm_kernel(k, n, block, "float16", lanes, activation))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), tvm.runtime.tensor(b), y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lanes", [4, 16])
def test_attention_matches_softmax(build, lanes: int) -> None:
    rng = np.random.default_rng(lanes)
    heads, keys, d, rows = 2, 100, 64, 7
    q = rng.standard_normal((heads, rows, d)).astype(np.float32)
    kt = rng.standard_normal((heads, d, keys)).astype(np.float32)
    v = rng.standard_normal((heads, keys, d)).astype(np.float32)
    o = tvm.runtime.empty((heads, rows, d), "float32", tvm.cpu())
    build(sk.attention_kernel(heads, keys, d, 0.125, lanes))(*(tvm.runtime.tensor(a) for a in (q, kt, v)), o)
    s = np.einsum("hnd,hdm->hnm", q, kt) * 0.125
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(o.numpy(), (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)


def test_cross_attention_reads_its_layer_in_place(build) -> None:
    """The decoder's variant reads layer l's keys [heads, d, m] and values [heads, m, d] from the whole cache."""
    rng = np.random.default_rng(0)
    layers, heads, keys, d, rows = 3, 2, 100, 64, 5
    cross = rng.standard_normal((2 * layers, heads, keys * d)).astype(np.float32)
    q = rng.standard_normal((heads, rows, d)).astype(np.float32)
    layer = 1
    o = tvm.runtime.empty((heads, rows, d), "float32", tvm.cpu())
    c = tvm.runtime.tensor(cross)
    build(sk.attention_kernel(heads, keys, d, 0.125, 8, cross_layers=layers, layer=layer))(
        tvm.runtime.tensor(q), c, c, o
    )
    kt, v = cross[2 * layer].reshape(heads, d, keys), cross[2 * layer + 1].reshape(heads, keys, d)
    s = np.einsum("hnd,hdm->hnm", q, kt) * 0.125
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(o.numpy(), (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_gemm_writes_the_heads_layout(build, lanes: int) -> None:
    """q, k, v split into heads as the GEMM writes them back: keys [head_dim, rows], the rest [rows, head_dim]."""
    rng = np.random.default_rng(lanes)
    m, k, heads, d, block = 13, 32, 2, 32, 32
    n = 3 * heads * d
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float32)
    packed = w.reshape(n // block, block, k).transpose(0, 2, 1).copy()
    y = (x @ w.astype(np.float32).T + b).reshape(m, 3, heads, d)
    expect = np.concatenate(
        [y[:, 0].transpose(1, 0, 2).reshape(heads, -1), y[:, 1].transpose(1, 2, 0).reshape(heads, -1),
         y[:, 2].transpose(1, 0, 2).reshape(heads, -1)]
    )  # fmt: skip
    out = tvm.runtime.empty((3 * heads, m * d), "float32", tvm.cpu())
    kernel = build(sk.gemm_kernel(k, n, block, "float16", lanes, None, heads=(heads, d, 1)))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), tvm.runtime.tensor(b), out)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_attention_over_all_frames_from_the_heads_layout(build) -> None:
    """The encoder's variant: q, k, v in one heads-layout tensor, output [frames, heads * d]."""
    rng = np.random.default_rng(1)
    heads, frames, d = 2, 37, 64
    q, k, v = (rng.standard_normal((heads, frames, d)).astype(np.float32) for _ in range(3))
    qkv = np.concatenate([q.reshape(heads, -1), k.transpose(0, 2, 1).reshape(heads, -1), v.reshape(heads, -1)])
    o = tvm.runtime.empty((frames, heads * d), "float32", tvm.cpu())
    t = tvm.runtime.tensor(qkv)
    build(sk.attention_kernel(heads, frames, d, 0.125, 8, frames=True))(t, t, t, o)
    s = np.einsum("hnd,hmd->hnm", q, k) * 0.125
    p = np.exp(s - s.max(-1, keepdims=True))
    expect = ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(frames, heads * d)
    np.testing.assert_allclose(o.numpy(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [37, 150])
def test_frame_attention_tiles_of_more_rows_give_the_same_bits(build, frames: int) -> None:
    """`ATTN_BLOCK_L2` (48 rows a pass over the keys where L2 is 2 MB) changes which rows share a pass,
    not how any row sums: the output is the 24-row tiles' bit for bit (150 = 3 x 48 + 6 rows)."""
    rng = np.random.default_rng(2)
    heads, d = 2, 64
    t = tvm.runtime.tensor(rng.standard_normal((3 * heads, frames * d)).astype(np.float32))
    outs = []
    for block in (sk.ATTN_BLOCK, sk.ATTN_BLOCK_L2):
        o = tvm.runtime.empty((frames, heads * d), "float32", tvm.cpu())
        build(sk.attention_kernel(heads, frames, d, 0.125, 16, block=block, frames=True))(t, t, t, o)
        outs.append(o.numpy())
    assert sk.ATTN_BLOCK_L2 > sk.ATTN_BLOCK
    np.testing.assert_array_equal(outs[0], outs[1])


def test_plain_heads_projection_and_frame_attention_match_numpy() -> None:
    """The family's plain-op definitions the kernels above stand in for (used where nothing is swapped)."""
    from tvm.relax.frontend import nn

    from edgert.families.shared.seq2seq import Attend, HeadsProjection

    heads, frames, d, width = 2, 11, 8, 16

    class Block(nn.Module):
        def __init__(self) -> None:
            self.qkv = HeadsProjection(width, heads, d, parts=3, transposed=1)
            self.attend = Attend(heads, frames, d)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.attend.frames(self.qkv(x))

    spec = {"forward": {"x": nn.spec.Tensor((frames, width), "float32")}}
    mod, params = Block().export_tvm(spec=spec)
    target, _ = resolve(load_target("host"), 2)
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    rng = np.random.default_rng(2)
    values = {name: rng.standard_normal(tuple(int(s) for s in p.shape)).astype(np.float32) for name, p in params}
    x = rng.standard_normal((frames, width)).astype(np.float32)
    out = vm["forward"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(values[name]) for name, _ in params)).numpy()
    y = (x @ values["qkv.proj.weight"].T + values["qkv.bias"]).reshape(frames, 3, heads, d)
    q, k, v = (y[:, i].transpose(1, 0, 2) for i in range(3))
    s = np.einsum("hnd,hmd->hnm", q, k) * d**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    expect = ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(frames, heads * d)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lanes", [8, 16])
def test_decoder_rows_kernel_on_awkward_row_counts(build, lanes: int) -> None:
    """`rows_kernel` (the decoder's projections and head) against numpy on 1, 2, 3, 5, 7, 9 and 16 rows,
    with bias and GELU and without bias; each row's result does not depend on how many rows came along."""
    rng = np.random.default_rng(lanes)
    k, n, block = 96, 192, 64
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float32)
    packed = tvm.runtime.tensor(w.reshape(n // block, block, k).transpose(0, 2, 1).copy())
    with_bias = build(sk.rows_kernel(k, n, block, "float16", lanes, "gelu", True))
    plain = build(sk.rows_kernel(k, n, block, "float16", lanes, None, False))
    x_all = rng.standard_normal((16, k)).astype(np.float32)
    first_rows = []
    for m in (1, 2, 3, 5, 7, 9, 16):
        x = x_all[:m]
        expect = x @ w.astype(np.float32).T
        y = tvm.runtime.empty((m, n), "float32", tvm.cpu())
        with_bias(tvm.runtime.tensor(x), packed, tvm.runtime.tensor(b), y)
        np.testing.assert_allclose(y.numpy(), _gelu(expect + b), rtol=1e-5, atol=1e-5)
        plain(tvm.runtime.tensor(x), packed, y)
        np.testing.assert_allclose(y.numpy(), expect, rtol=1e-5, atol=1e-5)
        first_rows.append(y.numpy()[0])
    # A verify pass must give the first token the logits a one-token step gives it (lossless drafting).
    assert all(np.array_equal(r, first_rows[0]) for r in first_rows)


@pytest.mark.parametrize("keys", [100, 20])
def test_clamped_cross_attention_matches_the_row_tiles(build, keys: int) -> None:
    """The decoder's clamped cross-attention (the last rows in a tile of 1, 2, 4 or `cross_rows`, filled up with
    copies of the last row) gives the unclamped kernel's output bit for bit, and numpy's within
    float32 rounding, on every remainder tile (1 to 16 rows); each row equals the same row run
    alone (a verify pass's row is a decode step's). 100 keys end in a vector tile over the last 32,
    20 keys (fewer than a tile) in the scalar loop."""
    rng = np.random.default_rng(0)
    layers, heads, d, layer = 2, 2, 64, 1
    cross = tvm.runtime.tensor(rng.standard_normal((2 * layers, heads, keys * d)).astype(np.float32))
    rows = sk.cross_rows(16)  # the AVX-512 build's tile
    kernels = [
        build(sk.attention_kernel(heads, keys, d, 0.125, 16, rows if clamp else 0, layers, layer, 1, clamp=clamp))
        for clamp in (False, True)
    ]
    c = cross.numpy()
    kt, v = c[2 * layer].reshape(heads, d, keys), c[2 * layer + 1].reshape(heads, keys, d)

    def run(kernel: Any, q: np.ndarray) -> np.ndarray:
        o = tvm.runtime.empty(q.shape, "float32", tvm.cpu())
        kernel(tvm.runtime.tensor(q), cross, cross, o)
        return o.numpy()

    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16):
        q = rng.standard_normal((heads, rows, d)).astype(np.float32)
        outs = [run(kernel, q) for kernel in kernels]
        s = np.einsum("hnd,hdm->hnm", q, kt) * 0.125
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(outs[1], (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(outs[1], outs[0])
        alone = np.concatenate([run(kernels[1], q[:, i : i + 1]) for i in range(rows)], axis=1)
        np.testing.assert_array_equal(outs[1], alone)


# -- AMX-BF16 tiles (the encoder's GEMMs where the CPU has them) ---------------------------------------


def _bf16_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32 (numpy has no bfloat16)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def test_bf16_split_is_the_nearest_bfloat16_and_its_remainder(build) -> None:
    """hi is x rounded to bfloat16, lo the remainder rounded again: hi + lo within 2^-17 of x (no tiles needed)."""
    from edgert.compiler.kernels import bf16

    rng = np.random.default_rng(3)
    m, k = 5, 64
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-20, 20, (m, k)))).astype(np.float32)
    xs = tvm.runtime.empty((2, m, k), "uint16", tvm.cpu())
    build(bf16.split_kernel(k, 16))(tvm.runtime.tensor(x), xs)
    parts = (xs.numpy().astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(parts[0], _bf16_nearest(x))
    np.testing.assert_array_equal(parts[1], _bf16_nearest(x - parts[0]))
    assert np.all(np.abs(parts[0].astype(np.float64) + parts[1] - x) <= np.abs(x) * 2.0**-17)


def test_task_span_takes_whole_blocks_in_an_even_count_of_tasks() -> None:
    from edgert.compiler.kernels.bf16 import task_span

    for blocks, span in ((24, 4), (18, 3), (12, 3), (6, 3), (4, 2), (9, 3), (5, 1)):
        assert task_span(blocks) == span, blocks
        assert blocks % task_span(blocks) == 0


def _amx_bf16_build():
    from edgert.compiler.kernels import bf16

    target, _ = resolve(load_target("host"), 2)
    if not bf16.has_amx_bf16(target):
        pytest.skip("this CPU has no AMX-BF16 tiles")
    return lambda func: tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


@pytest.mark.parametrize("heads", [None, (2, 32, 1)])
def test_amx_bf16_gemm_keeps_float32_accuracy(heads: tuple[int, int, int] | None) -> None:
    """Rows past the last whole tile (37 = 2 x 16 + 5), bias, GELU and the heads layout as `gemm_kernel`;
    the split products within a few float32 roundings of float64 (one bfloat16 product would be 2^-9 off)."""
    from edgert.compiler.kernels import bf16

    build = _amx_bf16_build()
    rng = np.random.default_rng(7)
    m, k, block = 37, 96, 64
    n = 3 * 2 * 32 if heads else 128
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float32)
    packed = w.reshape(n // block, block, k).transpose(0, 2, 1).copy()
    exact = x.astype(np.float64) @ w.astype(np.float64).T + b
    split = build(bf16.split_kernel(k, 16))
    xs = tvm.runtime.empty((2, m, k), "uint16", tvm.cpu())
    split(tvm.runtime.tensor(x), xs)
    for activation in (None, "gelu") if heads is None else (None,):
        ref = _gelu(exact) if activation else exact
        shape = (n // 32, m * 32) if heads else (m, n)
        y, y32 = (tvm.runtime.empty(shape, "float32", tvm.cpu()) for _ in range(2))
        args = (tvm.runtime.tensor(packed), tvm.runtime.tensor(b))
        build(bf16.amx_gemm_kernel(k, n, block, "float16", 16, activation, heads))(xs, *args, y)
        build(sk.gemm_kernel(k, n, block, "float16", 16, activation, heads))(tvm.runtime.tensor(x), *args, y32)
        if heads:  # the float32 kernel's layout is checked against numpy above
            np.testing.assert_allclose(y.numpy(), y32.numpy(), rtol=1e-4, atol=1e-4)
            continue
        err, err32 = np.abs(y.numpy() - ref).max(), np.abs(y32.numpy() - ref).max()
        assert err < 1e-4 and err < 20 * max(err32, 1e-7), (err, err32)


def test_encoder_projection_takes_the_tiles_where_they_fit() -> None:
    """`GemmProjection` builds the AMX kernel for K in whole tile rows under an AMX-BF16 target, the float32
    kernel otherwise (Whisper's first convolution, K = 240)."""
    from edgert.compiler.kernels import bf16

    assert bf16.fits(384, 1536, 64, "float16") and bf16.fits(1152, 384, 64, "float32")
    assert not bf16.fits(240, 384, 64, "float16")  # 80 mels x 3 taps
    assert not bf16.fits(384, 1536, 8, "float16")
    with pytest.raises(ValueError, match="AMX-BF16 GEMM needs"):
        bf16.amx_gemm_kernel(240, 384, 64, "float16", 16, None)
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    assert not bf16.has_amx_bf16(avx512)
    amx = tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "mattr": ["+amx-tile", "+amx-bf16"]}
    )
    assert bf16.has_amx_bf16(amx)

    from tvm.relax.frontend import nn

    from edgert.compiler.layout import PackedLinear

    class Net(nn.Module):
        def __init__(self, k: int) -> None:
            self.proj = sk.GemmProjection(PackedLinear(k, 128, 64, "float16"), nn.Parameter((128,), "float32"), "gelu")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.proj(x)

    def kernels(target: tvm.target.Target, k: int) -> set[str]:
        with target:
            mod, _ = Net(k).export_tvm(spec={"forward": {"x": nn.spec.Tensor(("m", k), "float32")}})
        return {gv.name_hint.split("_")[0] for gv in mod.functions if gv.name_hint != "forward"}

    assert kernels(amx, 64) == {"amxbf16", "bf16"}  # the split, then the tiles
    assert kernels(amx, 240) == kernels(avx512, 64) == {"gemm"}


def test_host_target_names_amx_bf16_where_the_cpu_has_it() -> None:
    from edgert.targets import AMX_BF16_FLAG, AMX_FLAGS, X86_CHECKED_FLAGS, host_arch, host_cpu_flags

    assert AMX_BF16_FLAG in X86_CHECKED_FLAGS
    if host_arch() != "x86_64":
        pytest.skip("x86-64 only")
    _, record = resolve(load_target("host"), 2)
    host = host_cpu_flags()
    assert (AMX_BF16_FLAG in record["cpu_flags"]) == ({AMX_BF16_FLAG, *AMX_FLAGS} <= host)
