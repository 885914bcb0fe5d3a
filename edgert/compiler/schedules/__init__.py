"""Schedules for plain graphs on CPUs: graph rewrites (weight layouts, quantization) and kernel rules."""

from __future__ import annotations

import logging
from typing import Any

from edgert.compiler.schedules.dwpw import DepthwisePointwise
from edgert.compiler.schedules.rules import Elementwise, Fallback, FullReduction, Matmul, Pool, RowWise

log = logging.getLogger(__name__)


def rewrite_graph(mod: Any, target: Any, quant: str = "f32") -> tuple[Any, float | None]:
    """Graph-level rewrites before legalization: convolutions channels-last, a depthwise conv and the
    1x1 conv after it as one kernel (`dwpw`), sigmoids through tanh (for its fast form), matmul
    weights packed (and quantized per ``quant``).

    Returns the module and the relative RMS error the quantization put on the weights (None for f32).
    """
    from edgert.compiler.schedules.dense import pack_dense_weights
    from edgert.compiler.schedules.dwpw import fuse_depthwise_pointwise
    from edgert.compiler.schedules.fastmath import sigmoid_as_tanh
    from edgert.compiler.schedules.layout import channels_last

    mod = fuse_depthwise_pointwise(channels_last(mod), target)
    return pack_dense_weights(sigmoid_as_tanh(mod), target, quant)


class _Guarded:
    """A schedule rule whose `ScheduleError` (a shape it did not foresee: TVM refuses a primitive)
    leaves the kernel to the next rule instead of failing the build; the kernel then shows in the
    build's list of kernels on TVM's default schedule. Any other error is a bug and propagates."""

    def __init__(self, rule: Any):
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir

        try:
            return self.rule.apply(func, target, tunable)
        except s_tir.ScheduleError as exc:
            name = func.attrs.get("global_symbol", "?") if func.attrs else "?"
            log.warning("%s did not apply to %s: %s", type(self.rule).__name__, name, str(exc).splitlines()[0])
            return None

    def is_target_available(self, target: Any) -> bool:
        return True


def schedule_rules() -> list[Any]:
    """edgert's rules in the order they are tried."""
    from edgert.compiler.schedules.fastmath import vectorizable_nearbyint

    vectorizable_nearbyint()  # before any rule's vectorize: TVM checks it when it lowers the loops
    rules = (DepthwisePointwise(), Matmul(), Pool(), RowWise(), Elementwise(rows=True), FullReduction(), Fallback())
    return [_Guarded(r) for r in rules]
