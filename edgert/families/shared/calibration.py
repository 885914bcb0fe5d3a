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

from edgert.runtime.exits import Confidence, Entropy, ExitPolicy, Patience, StateProbe, StaticDepth
from edgert.runtime.layers import ADAPTERS_FILE

Log = Callable[[str], None]

# English prose the project ships with the package: what the adapters are fitted on.
CALIBRATION_TEXT = Path(__file__).resolve().parent / "calibration.txt"
GRIDS: dict[str, list[float]] = {
    "confidence": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
    "entropy": [2.0, 1.0, 0.5, 0.25, 0.1],
    "patience": [2, 3],
    "state": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "static": [],  # filled with the exits
}
PROBE_L2 = (0.3, 3.0, 30.0, 300.0)  # the L2 strengths a probe's held-out log loss chooses from


def say(message: str) -> None:
    """The default progress log: a line on stdout, flushed."""
    print(message, flush=True)


def grids_for(policies: Any, exits: list[int]) -> dict[str, list[float]]:
    """Each policy's thresholds to sweep (``static``: the exit layers)."""
    return {p: (list(exits) if p == "static" else GRIDS[p]) for p in policies}


def make_policy(name: str, value: float, probes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> ExitPolicy:
    """The policy ``name`` at threshold ``value`` (``state`` reads ``probes``)."""
    if name == "state":
        return StateProbe(value, probes or {})
    return (
        {"confidence": Confidence, "entropy": Entropy}[name](value)
        if name in ("confidence", "entropy")
        else (Patience(int(value)) if name == "patience" else StaticDepth(int(value)))
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _mv(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """a·v with einsum's own loop: BLAS would wake worker threads, which on a busy machine wait for a
    core at every call (measured: a probe fit took 12 s instead of 1 s at load 8)."""
    return np.einsum("ij,j->i", a, v, optimize=False)


def _logistic(
    z: np.ndarray, y: np.ndarray, l2: float, beta: np.ndarray | None = None, iterations: int = 20
) -> np.ndarray:
    """Coefficients (the last one the bias, not penalized) of L2-regularized logistic regression: Newton
    steps solved by conjugate gradients (Hessian-vector products only), from ``beta`` when given."""
    x = np.hstack([z, np.ones((len(z), 1))])
    xt = np.ascontiguousarray(x.T)
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 1e-6
    beta = np.zeros(x.shape[1]) if beta is None else beta.copy()
    for _ in range(iterations):
        p = _sigmoid(_mv(x, beta))
        grad = _mv(xt, p - y) + penalty * beta
        if np.abs(grad).max() < 1e-6 * len(y):
            break
        weight = p * (1 - p)
        step = _conjugate_gradient(lambda v, w=weight: _mv(xt, w * _mv(x, v)) + penalty * v, grad)
        beta -= step
    return beta


def _conjugate_gradient(apply: Callable[[np.ndarray], np.ndarray], b: np.ndarray, steps: int = 200) -> np.ndarray:
    """x with apply(x) ≈ b for a symmetric positive definite ``apply`` (relative residual 1e-6)."""
    x = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rr = float(r @ r)
    stop = 1e-12 * rr
    for _ in range(steps):
        if rr <= stop:
            break
        ad = apply(d)
        alpha = rr / float(d @ ad)
        x += alpha * d
        r -= alpha * ad
        rr, previous = float(r @ r), rr
        d = r + (rr / previous) * d
    return x


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A state probe: logistic regression of ``labels`` (0/1: the exit's top token is the full model's) on
    ``features`` [n, f] (`edgert.runtime.exits.probe_features`). The L2 strength is the one with the lowest
    log loss on a held-out quarter; the probe is then refitted on everything. Returns weight [f], bias [1]
    (the standardization folded in) and the held-out figures."""
    y = labels.astype(np.float64)
    base = (y.sum() + 1) / (len(y) + 2)
    if y.min() == y.max():  # nothing to separate: the (smoothed) base rate everywhere
        bias = np.array([np.log(base / (1 - base))], dtype=np.float32)
        return np.zeros(features.shape[1], np.float32), bias, {"base_rate": round(float(y.mean()), 4)}
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    order = np.random.default_rng(seed).permutation(len(y))
    held, train = order[: len(y) // 4], order[len(y) // 4 :]
    scored = []
    beta = None
    for l2 in sorted(PROBE_L2, reverse=True):  # the strongest first: each fit starts from the one before
        beta = _logistic(z[train], y[train], l2, beta)
        p = _sigmoid(_mv(np.hstack([z[held], np.ones((len(held), 1))]), beta))
        scored.append((_log_loss(p, y[held]), l2, p, beta))
    loss, l2, p, start = min(scored, key=lambda t: t[0])
    beta = _logistic(z, y, l2, start)
    weight = beta[:-1] / std
    bias = beta[-1] - mean @ weight
    info = {
        "base_rate": round(float(y.mean()), 4),
        "l2": l2,
        "held_out_log_loss": round(loss, 4),
        "held_out_base_log_loss": round(_log_loss(np.full(len(held), y[train].mean()), y[held]), 4),
        "held_out_accuracy": round(float(np.mean((p >= 0.5) == (y[held] > 0.5))), 4),
    }
    return weight.astype(np.float32), np.array([bias], dtype=np.float32), info


def fit_adapter(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimizing ``|x + x·W + b - y|² + ridge·|W|²`` (closed form, float64)."""
    x64, target = x.astype(np.float64), (y - x).astype(np.float64)
    mean_x, mean_t = x64.mean(0), target.mean(0)
    xc, tc = x64 - mean_x, target - mean_t
    w = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ tc)
    b = mean_t - mean_x @ w
    return w.astype(np.float32), b.astype(np.float32)


def faster(row: dict[str, Any]) -> bool:
    """Whether a sweep row beats the full model: measured, and by the cost model where the row has one."""
    return row["speedup"] >= 1.0 and row.get("expected_speedup", 1.0) >= 1.0


def choose_points(
    rows: list[dict[str, Any]], target: float, refuse_slower: bool = False, log: Log | None = None
) -> dict[str, dict[str, Any]]:
    """Per policy: the point with the fewest layers per token whose agreement reaches ``target``, else the most
    agreeing one. Layers, not the measured speedup, decide: they do not depend on the machine's load.

    With ``refuse_slower`` only points faster than the full model (`faster`) are candidates, and a
    policy without one is left out (``log`` says so): nothing then defaults to a slower policy.
    """
    chosen = {}
    for name in sorted({r["policy"] for r in rows}):
        mine = [r for r in rows if r["policy"] == name]
        if refuse_slower:
            fast = [r for r in mine if faster(r)]
            if not fast:
                best = max(mine, key=lambda r: r["speedup"])
                if log is not None:
                    log(
                        f"  {name}: no point is faster than the full model (best {name}:{best['threshold']:g} "
                        f"measured {best['speedup']:.2f}x, expected {best.get('expected_speedup', 0):.2f}x); "
                        "not stored"
                    )
                continue
            mine = fast
        ok = [r for r in mine if r["agreement"] >= target]
        pick = (
            min(ok, key=lambda r: (r["mean_layers"] + r["exit_heads_per_token"], -r["speedup"]))
            if ok
            else max(mine, key=lambda r: r["agreement"])
        )
        keys = ("threshold", "agreement", "mean_layers", "speedup", "expected_speedup")
        chosen[name] = {**{k: pick[k] for k in keys if k in pick}, "meets_target": bool(ok)}
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
