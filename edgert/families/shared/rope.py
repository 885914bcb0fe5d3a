"""Rotary position embedding applied in the model, before the KV cache (Gemma 3's per-layer bases;
Llama artifacts built for a KV budget, whose kept keys must keep the positions they were written at)."""

from __future__ import annotations

import math
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate the halves of each head of x [b, s, h, d] (GPT-NeoX / Hugging Face layout) at ``positions`` [b*s]."""

    def compute(x: te.Tensor, pos: te.Tensor) -> te.Tensor:
        b, s, h, d = x.shape
        half = d // 2

        def value(i: Any, j: Any, k: Any, c: Any) -> Any:
            p = pos[i * s + j].astype("float32")
            inv = tirx.exp(tirx.const(-2.0 * math.log(theta) / int(d), "float32") * (c % half).astype("float32"))
            angle = p * inv
            other = tirx.if_then_else(c < half, -x[i, j, k, c + half], x[i, j, k, c - half])
            return x[i, j, k, c] * tirx.cos(angle) + other * tirx.sin(angle)

        return te.compute((b, s, h, d), value, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, positions])
