"""An ONNX LSTM on the NPU: unrolled over its time steps into int8 TFLite ops Ethos-U runs.

Vela 5.2 takes UNIDIRECTIONAL_SEQUENCE_LSTM only with int16 activations, and LiteRT's integer
LSTM kernel has its own fixed-point cell, so edgert writes the cell out instead: per gate one
FULLY_CONNECTED on the input for all steps at once (its bias is ONNX's ``Wb + Rb``), SLICE per
step, one FULLY_CONNECTED on the previous hidden state, ADD, LOGISTIC/TANH, then MUL and ADD for
the cell and the hidden state. Separate gates (not one ``4H`` product and a split) give each
gate's pre-activation its own int8 range. A zero (or absent) initial state drops the terms it
would zero. silero-vad runs one step per 512-sample chunk; the codec encoder's LSTM a few dozen.

Calibration: `internals` runs the cell in float on the calibration samples, so that every
tensor the unrolled cell makes has a range (all steps share one range per role: later steps
see states that calibration may not have reached at that step).

The weights are often computed from constants in the graph (silero-vad's exporter slices and
re-concatenates the gate blocks): `weight_chain` finds those nodes so that the LSTM unit takes
them along (they fold into the int8 weights when the unit goes to the NPU).
"""

from __future__ import annotations

import numpy as np

from edgert.compiler.npu.graph import GraphInfo, Unit, Unlowerable, attr

GATES = ("i", "o", "f", "c")  # ONNX's order of the four gate blocks in W, R and B


def stat_key(node) -> str:
    return node.name or next(o for o in node.output if o)


def lstm_problem(info: GraphInfo, node) -> str | None:
    """Why this LSTM cannot be unrolled into TFLite ops (None when it can)."""
    direction = attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        return f"LSTM direction {direction} (only forward is unrolled)"
    if attr(node, "layout", 0):
        return "LSTM with layout 1"
    if attr(node, "input_forget", 0) or attr(node, "clip", None) is not None:
        return "LSTM with input_forget or clip"
    acts = attr(node, "activations", None)
    if acts and [a.decode() if isinstance(a, bytes) else a for a in acts] != ["Sigmoid", "Tanh", "Tanh"]:
        return "LSTM with activations other than Sigmoid, Tanh, Tanh"
    if len(node.input) > 4 and node.input[4]:
        return "LSTM with sequence_lens"
    if len(node.input) > 7 and node.input[7]:
        return "LSTM with peepholes"
    return None


def weight_chain(info: GraphInfo, node) -> list | None:
    """The nodes that compute the LSTM's W, R and B from constants and feed nothing else, in
    graph order ([] when they are constants already; None when one is computed otherwise)."""
    producer = {o: n for n in info.nodes for o in n.output}
    chain: dict[int, object] = {}

    def collect(name: str) -> bool:
        if not name or name in info.consts:
            return True
        p = producer.get(name)
        if p is None or p.op_type == "LSTM":
            return False
        if id(p) in chain:
            return True
        if not all(collect(i) for i in p.input):
            return False
        chain[id(p)] = p
        return True

    if not all(collect(i) for i in node.input[1:4]):
        return None
    inside = set(chain) | {id(node)}
    for p in chain.values():
        for o in p.output:
            if o in info.graph_outputs or any(id(c) not in inside for c in info.consumers.get(o, [])):
                return None
    order = {id(n): k for k, n in enumerate(info.nodes)}
    return sorted(chain.values(), key=lambda n: order[id(n)])


def constant_inputs(info: GraphInfo, chain: list, node) -> dict[str, np.ndarray]:
    """W, R, B (and constant initial states) of ``node``: the chain evaluated by ONNX's reference."""
    from onnx.reference import ReferenceEvaluator

    env = dict(info.consts)
    for n in chain:
        outs = ReferenceEvaluator(n).run(None, {i: env[i] for i in n.input if i})
        env.update(zip(n.output, outs, strict=False))
    return {i: np.asarray(env[i]) for i in node.input if i and i in env}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def internals(node, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float cell's intermediate tensors for one run (stacked over steps), by calibration name."""
    get = values.get
    x, w, r = get(node.input[0]), get(node.input[1]), get(node.input[2])
    if x is None or w is None or r is None:
        return {}
    h_size = r.shape[-1]
    b = get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    b = np.zeros((1, 8 * h_size), np.float32) if b is None else b
    wk = w[0].reshape(4, h_size, -1)
    rk = r[0].reshape(4, h_size, h_size)
    bk = (b[0, : 4 * h_size] + b[0, 4 * h_size :]).reshape(4, h_size)
    batch = x.shape[1]
    h = get(node.input[5]) if len(node.input) > 5 and node.input[5] else None
    c = get(node.input[6]) if len(node.input) > 6 and node.input[6] else None
    h = np.zeros((batch, h_size), np.float32) if h is None else h[0]
    c = np.zeros((batch, h_size), np.float32) if c is None else c[0]
    key = stat_key(node)
    out: dict[str, list] = {}

    def keep(name: str, v: np.ndarray) -> None:
        out.setdefault(f"{key}#{name}", []).append(np.asarray(v, np.float32))

    for t in range(x.shape[0]):
        pre = []
        for k in range(4):
            xp, hp = x[t] @ wk[k].T + bk[k], h @ rk[k].T
            keep(f"xp{k}", xp)
            keep(f"hp{k}", hp)
            keep(f"pre{k}", xp + hp)
            pre.append(xp + hp)
        i, o, f, g = _sigmoid(pre[0]), _sigmoid(pre[1]), _sigmoid(pre[2]), np.tanh(pre[3])
        keep("fc", f * c)
        keep("ig", i * g)
        c = f * c + i * g
        h = o * np.tanh(c)
        keep("c", c)
        keep("h", h)
    return {k: np.concatenate(v) for k, v in out.items()}


TANH_SPAN = 4.5  # tanh(4.5) = 0.9998
CELL_RATIO = 4.0  # rescale the cell state when its largest channel exceeds this many times the median


def cell_scale(info: GraphInfo, node) -> np.ndarray | None:
    """Per-channel divisors k >= 1 of the cell state, or None when its channels are alike.

    silero-vad's cell state holds a few integrators reaching ±47 while the median channel stays
    within ±2: one int8 scale for all (step 0.27) erases the small channels, and the error, carried
    from chunk to chunk, flips speech decisions. The cell then runs on c / k (the largest channels
    brought to the median's range): ``c' = f * c' + (i * g) / k``, tanh reads ``c' * k``; the
    state crosses the partition's edge as c / k (the host divides and multiplies back)."""
    channels = getattr(info, "channels", {})
    key = stat_key(node)
    found = [channels[n] for n in (f"{key}#c", node.input[6] if len(node.input) > 6 else "") if n in channels]
    if not found:
        return None
    amax = np.max([np.maximum(np.abs(lo), np.abs(hi)) for lo, hi in found], axis=0)
    typical = float(np.median(amax))
    if typical <= 0 or amax.max() < CELL_RATIO * typical:
        return None
    return np.maximum(amax / typical, 1.0).astype(np.float32)


def lower_lstm(L, u: Unit) -> None:
    """Write the unrolled cell of the unit's LSTM into the lowerer ``L``'s graph."""

    info = L.info
    node = u.nodes[-1]
    if (why := lstm_problem(info, node)) is not None:
        raise Unlowerable(why)
    consts = constant_inputs(info, u.nodes[:-1], node)
    w, r = consts.get(node.input[1]), consts.get(node.input[2])
    if w is None or r is None:
        raise Unlowerable("LSTM weights that are not constant")
    h_size = int(attr(node, "hidden_size", r.shape[-1]))
    xs = info.shapes[node.input[0]]
    steps, batch = int(xs[0]), int(xs[1])
    b = consts.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    b = np.zeros((1, 8 * h_size), np.float32) if b is None else b
    wk = w[0].reshape(4, h_size, -1)
    rk = r[0].reshape(4, h_size, h_size)
    bk = (b[0, : 4 * h_size] + b[0, 4 * h_size :]).reshape(4, h_size)
    key = stat_key(node)
    L.n += 1
    tag = f"{key}/lstm{L.n}"

    def act(name: str, shape, stat: str) -> str:
        return L.act(f"{tag}/{name}", shape, f"{key}#{stat}")

    def state(pos: int) -> str | None:
        """The initial hidden (pos 5) or cell (pos 6) state as [batch, H], or None when zero."""
        name = node.input[pos] if len(node.input) > pos else ""
        if not name:
            return None
        c = info.const(name) if name not in consts else consts[name]
        if c is not None:
            if np.any(c):
                raise Unlowerable("LSTM with a non-zero constant initial state")
            return None
        y = L.act(f"{tag}/{name}/2d", (batch, h_size), name)
        L.g.op("RESHAPE", [L.get(name), L.i32((batch, h_size))], [y], origin=u.name, new_shape=(batch, h_size))
        return y

    c_input = node.input[6] if len(node.input) > 6 else ""
    # Only a state fed from outside is rescaled: its error is what builds up from call to call.
    ck = cell_scale(info, node) if c_input and c_input in L.g.inputs else None

    def rescale(x: str, vec: np.ndarray, name: str, stat: str, rng: tuple[float, float]) -> str:
        """``x * vec`` per channel as a 1x1 DEPTHWISE_CONV_2D: per-channel int8 weights hold each
        factor exactly (a MUL by a constant vector would round them all to one int8 scale)."""
        x4 = act(f"{name}/in4d", (1, 1, batch, h_size), stat)
        L.g.op("RESHAPE", [x, L.i32((1, 1, batch, h_size))], [x4], origin=u.name, new_shape=(1, 1, batch, h_size))
        y4 = act(f"{name}/4d", (1, 1, batch, h_size), stat)
        w, b = L.const(vec.reshape(1, 1, 1, h_size), "w"), L.const(np.zeros(h_size, np.float32), "b")
        L.g.op("DEPTHWISE_CONV_2D", [x4, w, b], [y4], origin=u.name, depth_multiplier=1, padding="VALID",
               stride=(1, 1), dilation=(1, 1))  # fmt: skip
        y = act(name, (batch, h_size), stat)
        L.g.op("RESHAPE", [y4, L.i32((batch, h_size))], [y], origin=u.name, new_shape=(batch, h_size))
        L.g.ranges[x4] = L.g.ranges.get(x, rng_of(x))
        L.g.ranges[y4] = L.g.ranges[y] = rng
        return y

    def rng_of(x: str) -> tuple[float, float]:
        return L.g.ranges.get(x) or info.ranges.get(L.stat_of[x], (0.0, 0.0))

    def scaled_range(stat: str) -> tuple[float, float]:
        lo, hi = info.channels[stat]
        return float(min((lo / ck).min(), 0.0)), float(max((hi / ck).max(), 0.0))

    h = state(5)
    if ck is None:
        c = state(6)
    else:  # the partition reads c / k: a new input that the host divides
        src = c_input
        fed = L.g.add(type(L.g.tensors[src])(f"{src}/cell_scaled", L.g.tensors[src].shape, "float32"))
        L.stat_of[fed] = src
        L.g.inputs.append(fed)
        L.g.scaled_inputs[fed] = (src, ck)
        L.g.ranges[fed] = scaled_range(src)
        c = act("cell_scaled/2d", (batch, h_size), "c")
        L.g.op("RESHAPE", [fed, L.i32((batch, h_size))], [c], origin=u.name, new_shape=(batch, h_size))
        L.g.ranges[c] = L.g.ranges[fed]
    x2 = L.act(f"{tag}/x2d", (steps * batch, wk.shape[2]), node.input[0])
    L.g.op("RESHAPE", [L.get(node.input[0]), L.i32(x2_shape := L.g.tensors[x2].shape)], [x2], origin=u.name,
           new_shape=x2_shape)  # fmt: skip
    xp_all = []
    for k in range(4):
        y = act(f"xp{k}", (steps * batch, h_size), f"xp{k}")
        L.g.op("FULLY_CONNECTED", [x2, L.const(wk[k], "w"), L.const(bk[k], "b")], [y], origin=u.name)
        xp_all.append(y)
    hs = []
    for t in range(steps):
        pre = []
        for k in range(4):
            xp = xp_all[k]
            if steps > 1:
                xp = act(f"t{t}/xp{k}", (batch, h_size), f"xp{k}")
                L.g.op("SLICE", [xp_all[k], L.i32((t * batch, 0)), L.i32((batch, h_size))], [xp], origin=u.name)
            if h is None:
                pre.append(xp)
                continue
            hp = act(f"t{t}/hp{k}", (batch, h_size), f"hp{k}")
            zero = np.zeros(h_size, np.float32)
            L.g.op("FULLY_CONNECTED", [h, L.const(rk[k], "w"), L.const(zero, "b")], [hp], origin=u.name)
            p = act(f"t{t}/pre{k}", (batch, h_size), f"pre{k}")
            L.g.op("ADD", [xp, hp], [p], origin=u.name)
            pre.append(p)
        gates = []
        for k, p in enumerate(pre):
            g = act(f"t{t}/gate{k}", (batch, h_size), f"pre{k}")  # fixed output range (LOGISTIC/TANH)
            L.g.op("TANH" if GATES[k] == "c" else "LOGISTIC", [p], [g], origin=u.name)
            gates.append(g)
        gi, go, gf, gg = gates
        ig = act(f"t{t}/ig", (batch, h_size), "ig" if c is not None else "c")
        L.g.op("MUL", [gi, gg], [ig], origin=u.name)
        if ck is not None:
            ig = rescale(ig, 1 / ck, f"{tag}/t{t}/ig_scaled", "ig" if c is not None else "c",
                         scaled_range(f"{key}#ig" if c is not None else f"{key}#c"))  # fmt: skip
        if c is not None:
            fc = act(f"t{t}/fc", (batch, h_size), "fc")
            L.g.op("MUL", [gf, c], [fc], origin=u.name)
            c_new = act(f"t{t}/c", (batch, h_size), "c")
            L.g.op("ADD", [fc, ig], [c_new], origin=u.name)
            if ck is not None:
                L.g.ranges[fc], L.g.ranges[c_new] = scaled_range(f"{key}#fc"), scaled_range(f"{key}#c")
            c = c_new
        else:
            c = ig
        tanh_in = c
        if ck is not None:  # tanh is flat beyond ±TANH_SPAN: that range keeps the input's int8 steps fine
            lo, hi = info.ranges.get(f"{key}#c", (-TANH_SPAN, TANH_SPAN))
            tanh_in = rescale(c, ck, f"{tag}/t{t}/c_unscaled", "c", (max(lo, -TANH_SPAN), min(hi, TANH_SPAN)))
        tc = act(f"t{t}/tanh_c", (batch, h_size), "c")
        L.g.op("TANH", [tanh_in], [tc], origin=u.name)
        h = act(f"t{t}/h", (batch, h_size), "h")
        L.g.op("MUL", [go, tc], [h], origin=u.name)
        hs.append(h)
    outs = dict(zip(("y", "y_h", "y_c"), [*node.output, "", ""], strict=False))
    if outs["y"] and outs["y"] in u.outputs:
        src = hs[0]
        if steps > 1:
            src = act("y/concat", (steps * batch, h_size), "h")
            L.g.op("CONCATENATION", hs, [src], origin=u.name, axis=0)
        shape = info.shapes[outs["y"]]
        L.g.op("RESHAPE", [src, L.i32(shape)], [L.define(outs["y"], "nchw")], origin=u.name, new_shape=shape)
    for name, src in ((outs["y_h"], hs[-1]), (outs["y_c"], c)):
        if name and name in u.outputs:
            shape = info.shapes[name]
            y = L.define(name, "nchw")
            L.g.op("RESHAPE", [src, L.i32(shape)], [y], origin=u.name, new_shape=shape)
            if ck is not None and src is c:  # the partition gives c / k: the host multiplies it back
                L.g.scaled_outputs[y] = ck
                L.g.ranges[y] = L.g.ranges[c]
