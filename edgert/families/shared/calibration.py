"""What early-exit calibration shares across families (host side): the calibration text, the policy
grids, tuned-lens adapter fitting, the choice of each policy's calibrated point, the sweep's CSV and
plot, and rewriting the artifact with the adapters and its manifest ``exits`` entry.

Each family that calibrates has its own ``calibrate`` module (named in the registry's ``calibrate``);
`edgert.profile.calibrate` picks it for an artifact.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgert.runtime.exits import Confidence, Entropy, ExitPolicy, Patience, StaticDepth
from edgert.runtime.layers import ADAPTERS_FILE

Log = Callable[[str], None]

# English prose the project ships with the package: what the adapters are fitted on.
CALIBRATION_TEXT = Path(__file__).resolve().parent / "calibration.txt"
GRIDS: dict[str, list[float]] = {
    "confidence": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
    "entropy": [2.0, 1.0, 0.5, 0.25, 0.1],
    "patience": [2, 3],
    "static": [],  # filled with the exits
}


def say(message: str) -> None:
    """The default progress log: a line on stdout, flushed."""
    print(message, flush=True)


def grids_for(policies: Any, exits: list[int]) -> dict[str, list[float]]:
    """Each policy's thresholds to sweep (``static``: the exit layers)."""
    return {p: (list(exits) if p == "static" else GRIDS[p]) for p in policies}


def make_policy(name: str, value: float) -> ExitPolicy:
    """The policy ``name`` at threshold ``value``."""
    return (
        {"confidence": Confidence, "entropy": Entropy}[name](value)
        if name in ("confidence", "entropy")
        else (Patience(int(value)) if name == "patience" else StaticDepth(int(value)))
    )


def fit_adapter(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimizing ``|x + x·W + b - y|² + ridge·|W|²`` (closed form, float64)."""
    x64, target = x.astype(np.float64), (y - x).astype(np.float64)
    mean_x, mean_t = x64.mean(0), target.mean(0)
    xc, tc = x64 - mean_x, target - mean_t
    w = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ tc)
    b = mean_t - mean_x @ w
    return w.astype(np.float32), b.astype(np.float32)


def choose_points(rows: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """Per policy: the point with the fewest layers per token whose agreement reaches ``target``, else the most
    agreeing one. Layers, not the measured speedup, decide: they do not depend on the machine's load."""
    chosen = {}
    for name in sorted({r["policy"] for r in rows}):
        mine = [r for r in rows if r["policy"] == name]
        ok = [r for r in mine if r["agreement"] >= target]
        pick = (
            min(ok, key=lambda r: (r["mean_layers"] + r["exit_heads_per_token"], -r["speedup"]))
            if ok
            else max(mine, key=lambda r: r["agreement"])
        )
        chosen[name] = {
            **{k: pick[k] for k in ("threshold", "agreement", "mean_layers", "speedup")},
            "meets_target": bool(ok),
        }
    return chosen


def write_sweep(rows: list[dict], out: Path) -> None:
    """The sweep's rows as ``exit_sweep.csv`` and its picture as ``exit_sweep.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "exit_sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, out / "exit_sweep.png")


def write_plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Speedup against agreement, one line per policy, thresholds annotated (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["policy"] for r in rows}):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["agreement"])
        ax.plot([r["agreement"] for r in mine], [r["speedup"] for r in mine], "o-", label=name)
        for r in mine:
            ax.annotate(
                f"{r['threshold']:g}",
                (r["agreement"], r["speedup"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("top-1 agreement with the full model")
    ax.set_ylabel("decode speedup (median step time, full / policy)")
    ax.set_title("Early exit: speed against agreement")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def store(artifact_path: Path, exits: dict[str, Any], adapters: dict[str, np.ndarray]) -> None:
    """Rewrite the artifact with the adapters member and the ``exits`` manifest entry (atomically)."""
    from edgert.artifact.reader import open_artifact
    from edgert.artifact.tensorfile import write_tensors
    from edgert.artifact.writer import write_artifact

    art = open_artifact(artifact_path, check_host=False)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("format", "format_version", "files")}
    manifest["exits"] = exits
    with tempfile.TemporaryDirectory(dir=artifact_path.parent, prefix=f".{artifact_path.name}.cal.") as tmp:
        staged = {}
        for name in art.manifest["files"]:
            if name == ADAPTERS_FILE:
                continue
            (Path(tmp) / name).write_bytes(art.read_bytes(name))
            staged[name] = Path(tmp) / name
        with (Path(tmp) / ADAPTERS_FILE).open("wb") as fh:
            write_tensors(fh, adapters, {"format": "edgert-exits"})
        staged[ADAPTERS_FILE] = Path(tmp) / ADAPTERS_FILE
        write_artifact(artifact_path, manifest, staged, as_dir=artifact_path.is_dir())


def calibration_sentences(text: Path, count: int) -> list[str]:
    """The first ``count`` sentences of 6 to 30 words of the calibration text."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.read_text().split()))
    return [x for x in sentences if 6 <= len(x.split()) <= 30][:count]
