"""Schedules for plain graphs on CPUs: graph rewrites (weight layouts, quantization) and kernel rules."""

from __future__ import annotations

import logging
from typing import Any

from edgert.compiler.schedules.rules import Elementwise, Fallback, Matmul, RowWise

log = logging.getLogger(__name__)


def rewrite_graph(mod: Any, target: Any, quant: str = "f32") -> tuple[Any, float | None]:
    """Graph-level rewrites before legalization: matmul weights packed (and quantized per ``quant``).

    Returns the module and the relative RMS error the quantization put on the weights (None for f32).
    """
    from edgert.compiler.schedules.dense import pack_dense_weights

    return pack_dense_weights(mod, target, quant)


class _Guarded:
    """A schedule rule whose failures leave the kernel to the next rule instead of failing the build."""

    def __init__(self, rule: Any):
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as exc:  # tirx.ScheduleError and friends: a shape the rule did not foresee
            log.debug("%s did not apply: %s", type(self.rule).__name__, exc)
            return None

    def is_target_available(self, target: Any) -> bool:
        return True


def schedule_rules() -> list[Any]:
    """edgert's rules in the order they are tried."""
    return [_Guarded(r) for r in (Matmul(), RowWise(), Elementwise(), Fallback())]
