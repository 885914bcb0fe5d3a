"""Post-training int8 quantization of a lowered partition (TFLite's int8 scheme).

- weights: symmetric int8 per output channel (zero point 0), scale = max|w| / 127;
- activations: asymmetric int8 per tensor, the range from calibration data (min/max, or a
  percentile), widened to contain 0 so that zero is exact (TFLite's convention);
- biases: int32 with scale = input scale * weight scale (per channel), zero point 0;
- SOFTMAX / LOGISTIC outputs are fixed at scale 1/256, zero point -128; TANH at 1/128, 0;
  data-movement ops (RESHAPE, TRANSPOSE, PAD, pooling) keep their input's quantization, and a
  CONCATENATION's inputs share its output's.

Calibration data is a ``.npz`` (or a dict) with one array per model input, named as the input;
axis 0 indexes samples: ``[samples, *input shape]``, or ``[samples, *rest]`` for an input whose
first (batch) dimension is 1 or symbolic, each sample then fed as a batch of one. Values at or beyond ±1e30
(``float32`` min used as -inf in attention masks) are left out of ranges: they saturate to the
range's end. A tensor that holds such markers and no negative value (a mask of 0 and -inf) gets
the range [-1e4, 0], so that its markers stay far below what they are added to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgert.compiler.npu.ir import Graph, QParams
from edgert.errors import EdgertError

SENTINEL = 1e30  # |x| at or above this is a -inf/+inf marker, not a value to fit the range to
SENTINEL_FLOOR = 1e4  # a tensor holding -inf markers reaches at least this far, so they stay very negative
PASS_THROUGH = ("RESHAPE", "TRANSPOSE", "PAD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "SLICE", "MIRROR_PAD")


class CalibrationError(EdgertError):
    """Calibration data that does not fit the model (names, shapes, types)."""


@dataclass
class RangeStats:
    """Running min/max (and a sample of values for percentiles) of one tensor."""

    lo: float = np.inf
    hi: float = -np.inf
    neg_inf: bool = False
    samples: list[np.ndarray] = field(default_factory=list)
    ch_lo: np.ndarray | None = None  # per channel of the last axis
    ch_hi: np.ndarray | None = None

    def update(self, x: np.ndarray, keep: int = 0, rng: np.random.Generator | None = None) -> None:
        x = np.asarray(x, np.float32)
        if x.size and self._update_unmarked(x, keep, rng):
            return
        if x.ndim >= 2 and x.shape[-1] <= 4096:
            finite = np.abs(x) < SENTINEL
            lo = np.where(finite, x, np.inf).reshape(-1, x.shape[-1]).min(axis=0)
            hi = np.where(finite, x, -np.inf).reshape(-1, x.shape[-1]).max(axis=0)
            self.ch_lo = lo if self.ch_lo is None else np.minimum(self.ch_lo, lo)
            self.ch_hi = hi if self.ch_hi is None else np.maximum(self.ch_hi, hi)
        x = x.ravel()
        self.neg_inf |= bool((x <= -SENTINEL).any())
        x = x[np.abs(x) < SENTINEL]
        if x.size == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if keep:
            self.samples.append(x if x.size <= keep else rng.choice(x, keep, replace=False))

    def _update_unmarked(self, x: np.ndarray, keep: int, rng: np.random.Generator | None) -> bool:
        """`update` of a tensor without markers or NaN (every ``|x| < SENTINEL``, as most are) in two
        passes over it instead of a dozen: the per-channel minima and maxima give the tensor's.
        Records the same values; returns False, recording nothing, for any other tensor."""
        per_channel = x.ndim >= 2 and x.shape[-1] <= 4096
        if per_channel:
            rows = x.reshape(-1, x.shape[-1])
            ch_lo, ch_hi = rows.min(axis=0), rows.max(axis=0)
            lo, hi = ch_lo.min(), ch_hi.max()
        else:
            lo, hi = x.min(), x.max()
        if not (-SENTINEL < lo and hi < SENTINEL):  # False for NaN too
            return False
        if per_channel:
            self.ch_lo = ch_lo if self.ch_lo is None else np.minimum(self.ch_lo, ch_lo)
            self.ch_hi = ch_hi if self.ch_hi is None else np.maximum(self.ch_hi, ch_hi)
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        if keep:
            x = x.ravel()
            self.samples.append(x if x.size <= keep else rng.choice(x, keep, replace=False))
        return True

    def range(self, percentile: float | None = None) -> tuple[float, float]:
        lo, hi = (self.lo, self.hi) if np.isfinite(self.lo) else (0.0, 0.0)
        if percentile is not None and self.samples:
            v = np.concatenate(self.samples)
            lo, hi = float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile))
        if self.neg_inf and lo >= 0:  # a pure mask (0 or -inf): make -inf very negative
            lo = -SENTINEL_FLOOR
        return lo, hi


def load_calibration(calibration, inputs: dict[str, tuple[tuple, np.dtype]]) -> dict[str, np.ndarray]:
    """Calibration arrays checked against the model's inputs {name: (shape with None for free dims, dtype)}.

    Returned as ``[samples, *input shape]`` per input (one run per sample).
    """
    if isinstance(calibration, str | Path):
        path = Path(calibration)
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = dict(calibration)
    for name, (shape, dtype) in inputs.items():
        if name not in data:
            raise CalibrationError(
                f"calibration data has no array for the model input '{name}' (it has: {', '.join(sorted(data))})"
            )
        a = np.asarray(data[name])
        want = tuple(1 if d is None else d for d in shape)

        def fits(sample: tuple, shape=shape) -> bool:
            return len(sample) == len(shape) and all(d is None or g == d for g, d in zip(sample, shape, strict=True))

        if fits(tuple(a.shape[1:])):  # samples stacked whole: [samples, *input shape]
            data[name] = a
        elif fits((1, *a.shape[1:])):  # samples as a batch: [samples, *input shape without its batch of 1]
            data[name] = a[:, None]
        else:
            raise CalibrationError(
                f"calibration input '{name}' has samples of shape {tuple(a.shape[1:])} (axis 0 = samples), "
                f"the model's input '{name}' is {tuple('?' if d is None else d for d in shape)} "
                f"(one sample = {want})"
            )
        if np.dtype(dtype).kind != a.dtype.kind:
            raise CalibrationError(f"calibration input '{name}' is {a.dtype}, the model's input is {np.dtype(dtype)}")
    extra = sorted(set(data) - set(inputs))
    if extra:
        raise CalibrationError(f"calibration data names inputs the model does not have: {', '.join(extra)}")
    counts = {len(np.asarray(v)) for v in data.values()}
    if len(counts) != 1:
        raise CalibrationError("calibration arrays differ in their number of samples (axis 0)")
    return data


def activation_qparams(lo: float, hi: float) -> QParams:
    """TFLite's asymmetric int8 parameters for the real range [lo, hi] (0 made exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return QParams.of(np.float32(scale), zp)


def weight_qparams(w: np.ndarray, axis: int) -> tuple[np.ndarray, QParams]:
    """Symmetric per-channel int8 weights along ``axis``."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, QParams.of(scale, 0, axis)


def quantize_graph(g: Graph, ranges: dict[str, tuple[float, float]]) -> Graph:
    """The int8 version of a float partition ``g`` with activation ``ranges`` by IR tensor name.

    ``g``'s activation tensors are float32 without data; constants hold float data. Weight
    inputs (FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D input 1) become per-channel int8,
    their biases int32; other float constants per-tensor int8.
    """
    q: dict[str, QParams] = {}
    # fixed-output ops and ranges first; pass-through and concat ties after, in op order
    for name, t in g.tensors.items():
        if t.data is None and t.dtype == "float32" and name in ranges:
            q[name] = activation_qparams(*ranges[name])
    for op in g.ops:
        y = op.outputs[0]
        if op.kind in ("SOFTMAX", "LOGISTIC"):
            q[y] = QParams.of(1 / 256, -128)
        elif op.kind == "TANH":
            q[y] = QParams.of(1 / 128, 0)
        elif op.kind in PASS_THROUGH:
            q[y] = q[op.inputs[0]]
        if "out_range" in op.options:  # a range the lowering knows better than calibration
            q[y] = activation_qparams(*op.options["out_range"])
    producer = {op.outputs[0]: op for op in g.ops}
    for op in reversed(g.ops):  # a CONCATENATION's inputs take its output's parameters, up through
        if op.kind == "CONCATENATION":  # data movement and concatenations before it
            todo = list(op.inputs)
            while todo:
                i = todo.pop()
                q[i] = q[op.outputs[0]]
                src = producer.get(i)
                if src is not None and src.kind in PASS_THROUGH:
                    todo.append(src.inputs[0])
                elif src is not None and src.kind == "CONCATENATION":
                    todo.extend(src.inputs)
    for op in g.ops:  # then forward again, so that every pass-through output equals its input
        if op.kind in PASS_THROUGH:
            q[op.outputs[0]] = q[op.inputs[0]]
    out = Graph(inputs=list(g.inputs), outputs=list(g.outputs), ops=list(g.ops))
    weight_of = {}
    weight_kinds = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
    for op in g.ops:
        if op.kind in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            weight_of[op.inputs[1]] = (op, 3 if op.kind == "DEPTHWISE_CONV_2D" else 0)
    bias_of = {op.inputs[2]: op for op in g.ops if op.kind in weight_kinds and len(op.inputs) > 2 and op.inputs[2]}
    for name, t in g.tensors.items():
        t2 = type(t)(t.name, t.shape, t.dtype, t.q, t.data)
        if t.data is None and t.dtype == "float32":
            if name not in q:
                raise ValueError(f"no calibration range for the tensor '{name}'")
            t2.dtype, t2.q = "int8", q[name]
        elif t.data is not None and t.data.dtype.kind == "f":
            if name in weight_of:
                t2.data, t2.q = weight_qparams(t.data, weight_of[name][1])
                t2.dtype = "int8"
            elif name in bias_of:
                t2.dtype = "int32"
            else:
                qp = activation_qparams(float(np.min(t.data, initial=0)), float(np.max(t.data, initial=0)))
                lo_floor = t.data <= -SENTINEL
                if lo_floor.any():
                    clean = np.where(np.abs(t.data) < SENTINEL, t.data, 0)
                    lo = float(clean.min())
                    qp = activation_qparams(-SENTINEL_FLOOR if lo >= 0 else lo, float(clean.max()))
                s, z = qp.per_tensor
                t2.data = np.clip(np.round(t.data / s) + z, -128, 127).astype(np.int8)
                t2.dtype, t2.q = "int8", qp
        out.tensors[name] = t2
    for bname, op in bias_of.items():
        in_scale = out.tensors[op.inputs[0]].q.per_tensor[0]
        w_scale = out.tensors[op.inputs[1]].q.scale.astype(np.float64)
        bscale = (np.float32(in_scale) * w_scale.astype(np.float32)).astype(np.float32)
        b = g.tensors[bname].data.astype(np.float64)
        out.tensors[bname].data = np.clip(np.round(b / bscale), -(2**31), 2**31 - 1).astype(np.int32)
        out.tensors[bname].q = QParams.of(bscale, 0, 0)
    return out


def balance_outputs(
    g: Graph, ranges: dict[str, tuple[float, float]], channel_ranges: dict, ratio: float = 4.0, target: float = 1.0
):
    """Per-channel scaling at a partition's edges for outputs with outlier channels.

    Transformer residual streams carry a few channels far larger than the rest (MiniLM's FFN
    output reaches 195 where most channels stay within ±5): one int8 scale per tensor then
    erases the small channels. For an output ``T = ADD(a, b)`` whose operands are a
    FULLY_CONNECTED of the partition or a partition input, and whose channel ranges (last axis)
    differ by more than ``ratio``, the partition computes ``T / k`` instead (k per channel, >= 1):
    the FULLY_CONNECTED's weight rows and bias are divided by k, the host feeds the input
    divided by k (a new input ``name/balanced``), and multiplies the output by k. The host's side
    is float work on the CPU, so the NPU does not pay for it.

    Returns ``(inputs, outputs)``: {new input: (source tensor, k)} and {output: k}.
    ``channel_ranges`` maps IR tensor names to per-channel (lo, hi) arrays.
    """
    producer = {op.outputs[0]: op for op in g.ops}
    readers: dict[str, list] = {}
    for op in g.ops:
        for i in op.inputs:
            readers.setdefault(i, []).append(op)
    new_inputs: dict[str, tuple[str, np.ndarray]] = {}
    scaled_outputs: dict[str, np.ndarray] = {}
    for out in list(g.outputs):
        op = producer.get(out)
        if op is None or op.kind != "ADD" or readers.get(out) or out not in channel_ranges:
            continue
        lo, hi = channel_ranges[out]
        amax = np.maximum(np.abs(lo), np.abs(hi))
        typical = float(np.median(amax))
        if typical <= 0 or amax.max() < ratio * typical:
            continue
        k = np.maximum(amax / (target * typical), 1.0).astype(np.float32)
        plan = []
        for i in op.inputs:
            src = producer.get(i)
            if i in g.inputs and i in channel_ranges:
                plan.append(("input", i))
            elif (
                src is not None
                and src.kind == "FULLY_CONNECTED"
                and not src.options.get("fused_activation")
                and len(readers.get(i, [])) == 1
                and i in channel_ranges
            ):
                plan.append(("fc", i))
            else:
                plan = []
                break
        if len(plan) != 2:
            continue
        for how, i in plan:
            clo, chi = channel_ranges[i]
            if how == "fc":
                fc = producer[i]
                w, b = g.tensors[fc.inputs[1]], g.tensors[fc.inputs[2]]
                w.data = (w.data / k[:, None]).astype(np.float32)
                b.data = (b.data / k).astype(np.float32)
                ranges[i] = (float((clo / k).min()), float((chi / k).max()))
            else:
                t = g.tensors[i]
                name = f"{i}/balanced"
                g.add(type(t)(name, t.shape, t.dtype))
                g.inputs.append(name)
                op.inputs[op.inputs.index(i)] = name
                ranges[name] = (float((clo / k).min()), float((chi / k).max()))
                new_inputs[name] = (i, k)
                if all(r is op for r in readers.get(i, [])):
                    g.inputs.remove(i)
                    del g.tensors[i]
        ranges[out] = (float((lo / k).min()), float((hi / k).max()))
        scaled_outputs[out] = k
    return new_inputs, scaled_outputs


def smooth_inputs(
    g: Graph, ranges: dict[str, tuple[float, float]], channel_ranges: dict, ratio: float = 4.0, alpha: float = 0.5
) -> dict[str, tuple[str, np.ndarray]]:
    """SmoothQuant at a partition's inputs: move outlier channels of an input into the weights.

    A partition input read only by FULLY_CONNECTED ops (a LayerNorm output from the CPU, say)
    whose channel ranges differ by more than ``ratio`` is fed divided by ``k = (amax /
    median)**alpha`` per channel (a new input ``name/smoothed``, divided on the host), and the
    weight columns are multiplied by k: the product is unchanged, the activation's int8 steps
    shrink, the per-row weight scales grow by at most ``k``.

    Returns {new input: (source tensor, k)}.
    """
    readers: dict[str, list] = {}
    for op in g.ops:
        for pos, i in enumerate(op.inputs):
            readers.setdefault(i, []).append((op, pos))
    out = {}
    for x in list(g.inputs):
        users = readers.get(x, [])
        if not users or x not in channel_ranges or any(op.kind != "FULLY_CONNECTED" or pos != 0 for op, pos in users):
            continue
        lo, hi = channel_ranges[x]
        amax = np.maximum(np.abs(lo), np.abs(hi))
        typical = float(np.median(amax))
        if typical <= 0 or amax.max() < ratio * typical:
            continue
        k = np.maximum((amax / typical) ** alpha, 1.0).astype(np.float32)
        t = g.tensors[x]
        name = f"{x}/smoothed"
        g.add(type(t)(name, t.shape, t.dtype))
        g.inputs[g.inputs.index(x)] = name
        del g.tensors[x]
        for op, _ in users:
            op.inputs[0] = name
            w = g.tensors[op.inputs[1]]
            w.data = (w.data * k[None, :]).astype(np.float32)
        ranges[name] = (float((lo / k).min()), float((hi / k).max()))
        out[name] = (x, k)
    return out
