"""Schedules for plain graphs on CPUs: graph rewrites (weight layouts) and per-kernel rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def rewrite_graph(mod: Any, quant: str = "f32") -> Any:
    """Graph-level rewrites before legalization (weight packing, quantization)."""
    return mod


def graph_pipeline(target: Any, tuning_db: Path | None = None) -> Any:
    """The Relax pipeline for graphs: TVM's CPU passes with edgert's schedule rules."""
    from tvm import relax

    return relax.get_default_pipeline(target)
