"""Schedules for plain graphs on CPUs: graph rewrites (weight layouts, quantization) and kernel rules."""

from __future__ import annotations

import logging
from pathlib import Path
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


def graph_pipeline(target: Any, tuning_db: Path | None = None, stats: dict[str, int] | None = None) -> Any:
    """The Relax pipeline for graphs: TVM's CPU passes, with edgert's rules (or a tuning database).

    ``stats`` (if given) receives ``kernels`` and ``tuned_kernels``: how many kernels the module
    has and how many took their schedule from the tuning database.
    """
    from tvm.s_tir import dlight

    from edgert.compiler.pipeline import cpu_pipeline

    # Tuned kernels first; the rules then schedule only what tuning did not cover.
    scheduling = [] if tuning_db is None else [_apply_tuning(tuning_db, stats)]
    scheduling.append(dlight.ApplyDefaultSchedule(*schedule_rules()))
    return cpu_pipeline(target, scheduling)


def _apply_tuning(tuning_db: Path, stats: dict[str, int] | None) -> Any:
    """A pass giving kernels their schedules from a MetaSchedule database (and counting them)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    @tvm.transform.module_pass(opt_level=0, name="edgert.ApplyTuning")
    def _apply(mod: Any, _ctx: Any) -> Any:
        db = ms.database.JSONDatabase(
            str(tuning_db / "database_workload.json"), str(tuning_db / "database_tuning_record.json")
        )
        with db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        if stats is not None:
            kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
            stats["kernels"] = len(kernels)
            stats["tuned_kernels"] = sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in kernels)
        return mod

    return _apply
