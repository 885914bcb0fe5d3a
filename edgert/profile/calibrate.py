"""Early-exit calibration of an artifact (`edgert calibrate`): the artifact's family fits the exit
adapters, sweeps the exit policies and stores the calibrated points in the artifact (see each
family's ``calibrate`` module in the registry)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from edgert.errors import EdgertError

# How each option is spelled on the command line, for errors.
FLAGS = {
    "text": "--text",
    "tokens": "--tokens",
    "exits": "--exits",
    "ridge": "--ridge",
    "target_agreement": "--target-agreement",
    "policies": "--policies",
    "prompts": "--prompts",
    "steps": "--steps",
    "skip_rounds": "--skip-search",
    "k": "-k",
    "out": "--out",
    "threads": "--threads",
    "sentences": "--sentences",
}


def calibrate(artifact: str | Path, log: Any = None, **options: Any) -> dict[str, Any]:
    """Calibrate early exit for ``artifact`` (rewritten in place) and return its manifest ``exits`` entry.

    ``options`` (None: the family's default) are those of the family's calibration, as ``FLAGS``
    lists them; one the family does not take is refused, naming the families that do. ``log``
    takes each progress line (default: printed).
    """
    from edgert.artifact.reader import open_artifact
    from edgert.families.registry import FAMILIES, get

    path = Path(artifact)
    family = get(open_artifact(path, check_host=False).family)
    function = family.calibrate_function()
    if function is None:
        takers = ", ".join(f.name for f in FAMILIES if f.calibrate)
        raise EdgertError(f"{path}: {family.name} models have no early-exit calibration (only {takers} do)")
    given = {k: v for k, v in options.items() if v is not None}
    takes = set(inspect.signature(function).parameters)
    for key in given:
        if key not in takes:
            takers = [f.name for f in FAMILIES if f.calibrate and key in _parameters(f)]
            flag = FLAGS.get(key, key)
            if not takers:
                raise EdgertError(f"unknown calibration option '{key}'")
            raise EdgertError(f"{flag} applies to calibrating {', '.join(takers)} models, not {family.name}")
    if log is not None:
        given["log"] = log
    return function(path, **given)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of a calibration: each exit's held-out agreement and each policy's calibrated point."""
    return {**result["calibration"]["held_out_agreement"], **result.get("policies", {})}


def _parameters(family: Any) -> set[str]:
    return set(inspect.signature(family.calibrate_function()).parameters)
