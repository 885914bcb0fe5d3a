"""The codec family's hand-written kernels against numpy on awkward shapes (the aarch64 run of
test_kernels_aarch64.py uses the same cases): the LSTM recurrence with a hidden size whose gates
fill one column tile of 8, one of 64, and one step; the one-channel convolution's row dot with a
length that is not a multiple of the vector, one row and many."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgert.families.codec.kernels import lstm_kernel, pack_recurrent, row_dot_kernel

CODEC_KERNELS = ["lstm_h6", "lstm_h16_one_step", "row_dot_k21_m1", "row_dot_k21_m37", "row_dot_k112_m9"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def lstm_reference(xw: np.ndarray, w_hh: np.ndarray, h: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
    """PyTorch's LSTM recurrence (gates i, f, g, o) in float64: (outputs, last h, last c)."""
    hidden = len(h)
    h, c, ys = h.astype(np.float64), c.astype(np.float64), []
    for row in xw.astype(np.float64):
        g = row + w_hh.astype(np.float64) @ h
        i, f, cell, o = (g[k * hidden : (k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cell)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
    return [np.stack(ys), h, c]


def codec_kernel_cases(rng: np.random.Generator) -> dict[str, tuple[Any, dict[str, np.ndarray], list[np.ndarray]]]:
    """name -> (kernel, inputs in argument order, reference outputs)."""
    cases = {}
    for name, hidden, steps in (("lstm_h6", 6, 5), ("lstm_h16_one_step", 16, 1)):
        xw = rng.standard_normal((steps, 4 * hidden)).astype(np.float32)
        w_hh = (0.5 * rng.standard_normal((4 * hidden, hidden))).astype(np.float32)
        h0, c0 = (rng.standard_normal(hidden).astype(np.float32) for _ in range(2))
        inputs = {"xw": xw, "w": pack_recurrent(w_hh), "h0": h0, "c0": c0}
        cases[name] = (lstm_kernel(hidden), inputs, lstm_reference(xw, w_hh, h0, c0))
    for k, m in ((21, 1), (21, 37), (112, 9)):
        x = rng.standard_normal((m, k)).astype(np.float32)
        w, b = rng.standard_normal(k).astype(np.float32), rng.standard_normal(1).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64) + b[0]
        cases[f"row_dot_k{k}_m{m}"] = (row_dot_kernel(k), {"x": x, "w": w, "b": b}, [want.reshape(m, 1)])
    assert sorted(cases) == sorted(CODEC_KERNELS)
    return cases


@pytest.fixture(scope="module")
def host_runs() -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Every case built for the host in one library and run: name -> (outputs, references)."""
    import tvm

    from edgert.compiler.target import resolve
    from edgert.targets import load_target

    cases = codec_kernel_cases(np.random.default_rng(3))
    target, _ = resolve(load_target("host"), threads=2)
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, (func, _, _) in cases.items()})
    lib = tvm.compile(mod, target=target)
    runs = {}
    for name, (_, inputs, refs) in cases.items():
        outs = [tvm.runtime.tensor(np.zeros(r.shape, np.float32)) for r in refs]
        lib[name](*(tvm.runtime.tensor(v) for v in inputs.values()), *outs)
        runs[name] = ([o.numpy() for o in outs], refs)
    return runs


@pytest.mark.parametrize("name", CODEC_KERNELS)
def test_codec_kernels_match_numpy(host_runs: dict, name: str) -> None:
    outputs, refs = host_runs[name]
    for got, want in zip(outputs, refs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
