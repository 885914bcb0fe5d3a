"""A numpy model of TFLite's int8 arithmetic, op by op: it defines the values an int8
partition must produce, and LiteRT's reference kernels (``BUILTIN_REF``) are checked against it
bit for bit (tests/test_npu.py).

Integer ops follow TFLite's reference kernels: int32 accumulation, requantization by
``MultiplyByQuantizedMultiplier`` (a Q31 multiplier and a power-of-two shift), saturation to
int8. Rounding differs between kernels in LiteRT 2.3, as measured against it (tests/test_npu.py):
FULLY_CONNECTED rounds the 64-bit product once; CONV_2D, DEPTHWISE_CONV_2D, BATCH_MATMUL, ADD,
SUB, MUL and RELU round twice (gemmlowp's SaturatingRoundingDoublingHighMul, then
RoundingDivideByPOT), and near-ties come out one apart between the two. Multipliers are computed
from the float32 scales as each kernel does (double products for convolutions and
FULLY_CONNECTED, float32 for MUL). Element-wise nonlinearities (LOGISTIC, TANH, GELU) are
256-entry tables computed in float32 as LiteRT's ``PopulateLookupTable`` does; SOFTMAX is
LiteRT's float32 exp table.
"""

from __future__ import annotations

import math

import numpy as np

from edgert.compiler.npu.ir import Graph, Op

QMIN, QMAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# -- fixed point ---------------------------------------------------------------------------------
def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: ``m ≈ q * 2**(shift - 31)`` with q a Q31 int32."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(_round_away(q * (1 << 31)))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    if shift > 30:
        shift, q_fixed = 30, (1 << 31) - 1
    return q_fixed, shift


def _round_away(x):
    """std::round: half away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _srdhm(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    v = ab + nudge
    res = np.where(v >= 0, v >> 31, -((-v) >> 31))  # C division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, res)


def _rdbpot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def mbqm(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """MultiplyByQuantizedMultiplier as most of LiteRT 2.3's int8 kernels round (twice)."""
    return mbqm_double_rounding(x, multiplier, shift)


def mbqm_single_rounding(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """One rounding of the 64-bit product, ``(x * q + 2**(30 - shift)) >> (31 - shift)``: what
    LiteRT 2.3's FULLY_CONNECTED does (per-channel parameters broadcast)."""
    total = 31 - np.asarray(shift, np.int64)
    x = np.asarray(x, np.int64) * np.asarray(multiplier, np.int64) + (np.int64(1) << (total - 1))
    return x >> total


def mbqm_double_rounding(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """gemmlowp's two roundings: SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = _wrap32(np.asarray(x, np.int64) * (np.int64(1) << left))
    return _rdbpot(_srdhm(x, multiplier), right)


def _wrap32(x: np.ndarray) -> np.ndarray:
    return ((x + 2**31) % 2**32) - 2**31


def _sat8(x: np.ndarray, lo: int = QMIN, hi: int = QMAX) -> np.ndarray:
    return np.clip(x, lo, hi).astype(np.int8)


def activation_range(act: str | None, scale: float, zp: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for int8 outputs (float division, std::round)."""

    def q(f: float) -> int:
        return zp + int(_round_away(np.float32(f) / np.float32(scale)))

    if act == "RELU":
        return max(QMIN, q(0.0)), QMAX
    if act == "RELU6":
        return max(QMIN, q(0.0)), min(QMAX, q(6.0))
    return QMIN, QMAX


# -- ops ----------------------------------------------------------------------------------------
def _qp(g: Graph, name: str) -> tuple[float, int]:
    return g.tensors[name].q.per_tensor


def _requant_per_channel(
    acc: np.ndarray, in_scale: float, w_scales: np.ndarray, out_scale: float, single: bool = False
) -> np.ndarray:
    mult, shift = zip(
        *(
            quantize_multiplier(float(np.float32(in_scale)) * float(np.float32(ws)) / float(np.float32(out_scale)))
            for ws in w_scales
        ),
        strict=True,
    )
    m = np.asarray(mult, np.int64)
    s = np.asarray(shift, np.int64)
    if m.size == 1:
        m, s = m[0], s[0]
    return mbqm_single_rounding(acc, m, s) if single else mbqm(acc, m, s)


def _fully_connected(g: Graph, op: Op, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    s_in, z_in = _qp(g, op.inputs[0])
    s_out, z_out = _qp(g, op.outputs[0])
    wq = g.tensors[op.inputs[1]].q
    k = w.shape[1]
    x2 = x.reshape(-1, k).astype(np.int64) - z_in
    acc = x2 @ w.astype(np.int64).T
    if b is not None:
        acc = acc + b.astype(np.int64)
    y = _requant_per_channel(acc, s_in, wq.scale, s_out, single=True) + z_out
    lo, hi = activation_range(op.options.get("fused_activation"), s_out, z_out)
    return _sat8(y, lo, hi).reshape(g.tensors[op.outputs[0]].shape)


def _batch_matmul(g: Graph, op: Op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, za = _qp(g, op.inputs[0])
    sb, zb = _qp(g, op.inputs[1])
    so, zo = _qp(g, op.outputs[0])
    a = a.astype(np.int64) - za
    b = b.astype(np.int64) - zb
    if op.options.get("adj_x"):
        a = np.swapaxes(a, -1, -2)
    if op.options.get("adj_y"):
        b = np.swapaxes(b, -1, -2)
    acc = np.matmul(a, b)
    m, s = quantize_multiplier(float(np.float32(sa) * np.float32(sb)) / float(np.float32(so)))
    return _sat8(mbqm(acc, m, s) + zo)


def conv_padding(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int, int]:
    """(output size, pad before, pad after) as TFLite computes SAME / VALID."""
    eff = (k - 1) * dilation + 1
    if padding == "SAME":
        out = (size + stride - 1) // stride
        total = max((out - 1) * stride + eff - size, 0)
        return out, total // 2, total - total // 2
    return (size - eff + stride) // stride, 0, 0


def _windows(x: np.ndarray, kh: int, kw: int, stride, dilation, padding: str, fill: int):
    """Patches [N, OH, OW, KH, KW, C] of an NHWC array, padded with ``fill``, and an in-bounds mask."""
    n, h, w, c = x.shape
    oh, pt, pb = conv_padding(h, kh, stride[0], dilation[0], padding)
    ow, pl, pr = conv_padding(w, kw, stride[1], dilation[1], padding)
    xp = np.full((n, h + pt + pb, w + pl + pr, c), fill, np.int64)
    xp[:, pt : pt + h, pl : pl + w] = x
    inb = np.zeros((1, h + pt + pb, w + pl + pr, 1), bool)
    inb[:, pt : pt + h, pl : pl + w] = True
    iy = np.arange(oh)[:, None] * stride[0] + np.arange(kh)[None, :] * dilation[0]  # [OH, KH]
    ix = np.arange(ow)[:, None] * stride[1] + np.arange(kw)[None, :] * dilation[1]  # [OW, KW]
    patches = xp[:, iy[:, None, :, None], ix[None, :, None, :], :]  # [N, OH, OW, KH, KW, C]
    mask = inb[:, iy[:, None, :, None], ix[None, :, None, :], :]
    return patches, mask


def _conv(g: Graph, op: Op, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, depthwise: bool) -> np.ndarray:
    s_in, z_in = _qp(g, op.inputs[0])
    s_out, z_out = _qp(g, op.outputs[0])
    wq = g.tensors[op.inputs[1]].q
    o = op.options
    stride, dil = tuple(o.get("stride", (1, 1))), tuple(o.get("dilation", (1, 1)))
    if depthwise:
        _, kh, kw, cout = w.shape
    else:
        cout, kh, kw, _ = w.shape
    patches, _ = _windows(x.astype(np.int64), kh, kw, stride, dil, o.get("padding", "SAME"), z_in)
    patches = patches - z_in  # padding contributes zero
    if depthwise:
        mult = int(o.get("depth_multiplier", 1))
        p = np.repeat(patches, mult, axis=-1) if mult > 1 else patches
        acc = np.einsum("nhwijc,ijc->nhwc", p, w[0].astype(np.int64))
    else:
        acc = np.einsum("nhwijc,oijc->nhwo", patches, w.astype(np.int64))
    if b is not None:
        acc = acc + b.astype(np.int64)
    y = _requant_per_channel(acc, s_in, wq.scale, s_out) + z_out
    lo, hi = activation_range(o.get("fused_activation"), s_out, z_out)
    assert y.shape[-1] == cout
    return _sat8(y, lo, hi)


def _pool(g: Graph, op: Op, x: np.ndarray, kind: str) -> np.ndarray:
    o = op.options
    kh, kw = o["kernel"]
    s_out, z_out = _qp(g, op.outputs[0])
    patches, mask = _windows(x.astype(np.int64), kh, kw, tuple(o["stride"]), (1, 1), o.get("padding", "VALID"), 0)
    lo, hi = activation_range(o.get("fused_activation"), s_out, z_out)
    if kind == "MAX":
        y = np.where(mask, patches, -(2**40)).max(axis=(3, 4))
    else:
        acc = np.where(mask, patches, 0).sum(axis=(3, 4))
        cnt = np.broadcast_to(mask.sum(axis=(3, 4)), acc.shape).astype(np.int64)
        num = np.where(acc > 0, acc + cnt // 2, acc - cnt // 2)
        y = np.where(num >= 0, num // cnt, -((-num) // cnt))  # C division
    return _sat8(y, lo, hi)


def _add_sub(g: Graph, op: Op, a: np.ndarray, b: np.ndarray, sign: int) -> np.ndarray:
    sa, za = _qp(g, op.inputs[0])
    sb, zb = _qp(g, op.inputs[1])
    so, zo = _qp(g, op.outputs[0])
    left_shift = 20
    sa32, sb32, so32 = (float(np.float32(v)) for v in (sa, sb, so))
    twice_max = 2 * max(sa32, sb32)
    ma, sha = quantize_multiplier(sa32 / twice_max)
    mb, shb = quantize_multiplier(sb32 / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * so32))
    xa = mbqm((a.astype(np.int64) - za) << left_shift, ma, sha)
    xb = mbqm((b.astype(np.int64) - zb) << left_shift, mb, shb)
    y = mbqm(xa + sign * xb, mo, sho) + zo
    lo, hi = activation_range(op.options.get("fused_activation"), so, zo)
    return _sat8(y, lo, hi)


def _mul(g: Graph, op: Op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, za = _qp(g, op.inputs[0])
    sb, zb = _qp(g, op.inputs[1])
    so, zo = _qp(g, op.outputs[0])
    # mul.cc: float * float / float, in float32
    m, s = quantize_multiplier(float(np.float32(np.float32(sa) * np.float32(sb)) / np.float32(so)))
    y = mbqm((a.astype(np.int64) - za) * (b.astype(np.int64) - zb), m, s) + zo
    lo, hi = activation_range(op.options.get("fused_activation"), so, zo)
    return _sat8(y, lo, hi)


def lookup_table(fn, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """LiteRT's PopulateLookupTable<int8_t>: 256 outputs indexed by ``q + 128``, float32 math."""
    vals = np.arange(QMIN, QMAX + 1, dtype=np.int32)
    deq = np.float32(in_scale) * (vals - np.int32(in_zp)).astype(np.float32)
    transformed = np.asarray(fn(deq), np.float32)
    inv = np.float32(1.0) / np.float32(out_scale)
    rescaled = _round_away((transformed * inv).astype(np.float32))
    return _sat8(rescaled.astype(np.int64) + out_zp)


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    xs = np.asarray(x, np.float32)
    return np.array([np.float32(0.5 * float(v) * (1.0 + erf(float(v) * math.sqrt(0.5)))) for v in xs], np.float32)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    xs = np.asarray(x, np.float64)
    return (0.5 * xs * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (xs + 0.044715 * xs**3)))).astype(np.float32)


LUT_FUNCTIONS = {
    "LOGISTIC": lambda v: np.float32(1.0) / (np.float32(1.0) + np.exp(-v)),
    "TANH": np.tanh,
    "GELU": _gelu,
    "EXP": np.exp,
}


def _softmax(g: Graph, op: Op, x: np.ndarray) -> np.ndarray:
    s_in, _ = _qp(g, op.inputs[0])
    so, zo = _qp(g, op.outputs[0])
    beta = float(op.options.get("beta", 1.0))
    scale = np.float32(-np.float32(s_in) * np.float32(beta))
    vals = np.arange(256, dtype=np.float32)
    table = np.empty(256, np.float32)
    table[255 - np.arange(256)] = np.exp((scale * vals).astype(np.float32))  # table[255 - v] = exp(scale * v)
    flat = x.reshape(-1, x.shape[-1]).astype(np.int64)
    out = np.empty(flat.shape, np.int8)
    for i, row in enumerate(flat):
        mx = int(row.max())
        e = table[255 - mx + row]  # exp(scale * (max - x))... as table_offset[x]
        s = np.float32(0)
        for v in e:  # sequential float32 sum, as the kernel adds
            s = np.float32(s + v)
        inv = np.float32(1.0) / np.float32(s * np.float32(so))
        p = (e * inv).astype(np.float32)
        out[i] = _sat8(_round_away(p).astype(np.int64) + zo)
    return out.reshape(x.shape)


def quantize(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """AffineQuantize: round(x / scale) + zero point, saturated (float32 division)."""
    q = _round_away((np.asarray(x, np.float32) / np.float32(scale)).astype(np.float32)).astype(np.int64) + zp
    return _sat8(q)


def dequantize(q: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """Dequantize: float(scale * (q - zero point)) with a double scale."""
    return (float(np.float32(scale)) * (q.astype(np.float64) - zp)).astype(np.float32)


def run(g: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate ``g`` on int8 (or, at float boundaries, float32) feeds; returns every tensor."""
    env: dict[str, np.ndarray] = {n: t.data for n, t in g.tensors.items() if t.data is not None}
    env.update(feeds)
    for op in g.ops:
        ins = [env[i] if i else None for i in op.inputs]
        env[op.outputs[0]] = eval_op(g, op, ins)
    return env


def eval_op(g: Graph, op: Op, ins: list) -> np.ndarray:
    """One op of ``g`` on its input arrays."""
    k = op.kind
    out = g.tensors[op.outputs[0]]
    if k == "FULLY_CONNECTED":
        return _fully_connected(g, op, ins[0], ins[1], ins[2] if len(ins) > 2 else None)
    if k == "BATCH_MATMUL":
        return _batch_matmul(g, op, ins[0], ins[1])
    if k in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return _conv(g, op, ins[0], ins[1], ins[2] if len(ins) > 2 else None, k == "DEPTHWISE_CONV_2D")
    if k in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return _pool(g, op, ins[0], k[:3])
    if k == "ADD":
        return _add_sub(g, op, ins[0], ins[1], 1)
    if k == "SUB":
        return _add_sub(g, op, ins[0], ins[1], -1)
    if k == "MUL":
        return _mul(g, op, ins[0], ins[1])
    if k in LUT_FUNCTIONS:
        fn = _gelu_tanh if (k == "GELU" and op.options.get("approximate")) else LUT_FUNCTIONS[k]
        table = lookup_table(fn, *_qp(g, op.inputs[0]), *_qp(g, op.outputs[0]))
        return table[ins[0].astype(np.int64) + 128]
    if k in ("RELU", "RELU6"):
        si, zi = _qp(g, op.inputs[0])
        so, zo = _qp(g, op.outputs[0])
        m, s = quantize_multiplier(float(np.float32(si)) / float(np.float32(so)))
        lo, hi = activation_range(k, so, zo)
        return _sat8(zo + mbqm(ins[0].astype(np.int64) - zi, m, s), lo, hi)
    if k == "SOFTMAX":
        return _softmax(g, op, ins[0])
    if k == "RESHAPE":
        return ins[0].reshape(out.shape)
    if k == "TRANSPOSE":
        return np.transpose(ins[0], tuple(int(p) for p in ins[1]))
    if k == "CONCATENATION":
        return np.concatenate(ins, axis=int(op.options["axis"]))
    if k == "PAD":
        _, zp = _qp(g, op.inputs[0])
        return np.pad(ins[0], [tuple(p) for p in ins[1]], constant_values=zp)
    if k == "SLICE":
        begin, size = (tuple(int(v) for v in a) for a in ins[1:3])
        return ins[0][
            tuple(
                slice(b, b + (s if s >= 0 else ins[0].shape[d] - b))
                for d, (b, s) in enumerate(zip(begin, size, strict=True))
            )
        ]
    if k == "MIRROR_PAD":
        mode = "reflect" if op.options.get("mode", "REFLECT") == "REFLECT" else "symmetric"
        return np.pad(ins[0], [tuple(p) for p in ins[1]], mode=mode)
    if k == "QUANTIZE":
        return quantize(ins[0], *_qp(g, op.outputs[0]))
    if k == "DEQUANTIZE":
        return dequantize(ins[0], *_qp(g, op.inputs[0]))
    raise NotImplementedError(f"no int8 reference for {k}")


# LiteRT 2.3's reference int8 SOFTMAX aborts the process (a failed check in its fixed-point
# reciprocal) when a row's sum of exponentials reaches 512, i.e. for near-uniform rows of 512 or
# more entries (Whisper's attention over 1500 frames, padding included); measured, rows of 511 run.
REF_SOFTMAX_MAX_ROW = 511


def litert_reference_problem(g: Graph) -> str | None:
    """Why LiteRT's reference kernels (``BUILTIN_REF``) cannot run ``g`` safely, or None."""
    for op in g.ops:
        if op.kind == "SOFTMAX":
            row = g.tensors[op.inputs[0]].shape[-1]
            if row > REF_SOFTMAX_MAX_ROW:
                return (
                    f"SOFTMAX over {row} entries: LiteRT's reference kernel aborts on rows of more than "
                    f"{REF_SOFTMAX_MAX_ROW} (its optimized kernel runs them)"
                )
    return None
