"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature <= 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {self.temperature}")
        if not math.isfinite(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be finite, got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature <= 0.0 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Make tokens seen before less likely (CTRL's rule, as llama.cpp and transformers apply it)."""
    if penalty == 1.0 or not history:
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def token_probabilities(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> np.ndarray:
    """The distribution sampling draws from, after penalty, temperature, top-k and top-p."""
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, params.repetition_penalty)
    if params.greedy:
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    logits = logits / params.temperature
    if 0 < params.top_k < logits.size:
        cut = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < cut, -np.inf, logits)
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


class Sampler:
    """Stateful sampler: owns the random generator so a seed reproduces a run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Pick the next token id."""
        if self.params.greedy:
            logits = apply_repetition_penalty(np.asarray(logits), history, self.params.repetition_penalty)
            return int(np.argmax(logits))
        probs = token_probabilities(logits, self.params, history)
        return int(self.rng.choice(probs.size, p=probs))
