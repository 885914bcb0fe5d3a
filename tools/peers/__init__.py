"""Sections of the peer benchmark (``tools/bench_peers.py``): one module per model kind.

Each section module defines ``NAME`` (the ``--only`` key), ``HELP`` (one line),
``add_arguments(parser)`` for its own options, and ``run(args) -> list[Row]``. A section
runs edgert and its peer on the same model, inputs and thread count, in this process tree.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


def paired_ratio(ours: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of the rounds' own ratios ``ours[r] / base[r]``: a round runs
    both in one period, so a load that changes between rounds moves both alike (the ratio of the
    medians pairs one round's figure with another's)."""
    ratios = [a / b if b else 0.0 for a, b in zip(ours, base, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return med, q1, q3


@dataclass
class Row:
    """One compared measurement; ``ratio`` is edgert's speed over the peer's (>1: edgert faster)."""

    section: str
    case: str
    metric: str
    unit: str
    edgert: float | None
    peer: float | None
    peer_name: str
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """edgert over the peer, oriented so that above 1 means edgert is ahead."""
        if not self.edgert or not self.peer:
            return None
        return self.edgert / self.peer if self.higher_is_better else self.peer / self.edgert

    def to_json(self) -> dict[str, Any]:
        """The row as a plain dict, with the ratio."""
        return {**asdict(self), "ratio": self.ratio}
