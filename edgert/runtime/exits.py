"""Early exit: each decoded token runs only as many layers as a policy asks for.

A decode step runs the layers up to each exit point (the exits `edgert calibrate` fitted
adapters for, else a few evenly spaced ones), applies the exit head there, and asks the
`ExitPolicy` whether to stop. A token that stops at layer e gives layers e.. their KV entries
by copy-forward (see `edgert.runtime.layers`). The prompt always runs the full model.

The exit head costs as much as the LM head (on SmolLM2 about seven layers' worth of time), so
every check that reads it is expensive. `StateProbe` decides from the hidden state with a
logistic-regression probe instead (a dot product), and the head runs once, where the token leaves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from edgert.errors import ContextLengthError, EdgertError
from edgert.runtime.generator import GenerationStats, Generator, Token
from edgert.runtime.layers import LayerEntries, LayerStack, load_adapters, load_probes
from edgert.runtime.sampling import SamplingParams
from edgert.runtime.tvm_runtime import to_numpy


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of a logit vector (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


class ExitPolicy:
    """Decides, at each exit point of a token's pass, whether to stop there.

    A policy that ``reads_head`` sees the exit head's logits at every exit it looks at; one that
    does not (`StateProbe`) decides from the hidden state alone, and the head runs once, where
    the token leaves.
    """

    name = "full"
    reads_head = True

    def exits(self, available: Sequence[int], num_layers: int) -> list[int]:
        """The exit points (depths < num_layers) this policy looks at, in order."""
        return [e for e in available if 0 < e < num_layers]

    def start(self) -> None:
        """Called before each token's pass."""

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        """True to stop after ``depth`` layers with these exit-head logits."""
        return False

    def should_exit_state(self, depth: int, h: np.ndarray) -> bool:
        """True to stop after ``depth`` layers with this hidden state [d] (policies that do not read the head)."""
        return False


class StaticDepth(ExitPolicy):
    """Every token runs exactly ``depth`` layers."""

    def __init__(self, depth: int):
        self.depth, self.name = depth, f"static:{depth}"

    def exits(self, available: Sequence[int], num_layers: int) -> list[int]:
        return [self.depth] if 0 < self.depth < num_layers else []

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        return True


class Confidence(ExitPolicy):
    """Exit when the exit head's top softmax probability reaches ``threshold`` (CALM)."""

    def __init__(self, threshold: float):
        self.threshold, self.name = threshold, f"confidence:{threshold:g}"

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        # The top probability is 1 / sum(exp(z - max)): one float32 pass over the vocabulary.
        z = np.asarray(logits, dtype=np.float32)
        return 1.0 / float(np.exp(z - z.max()).sum(dtype=np.float64)) >= self.threshold


class Entropy(ExitPolicy):
    """Exit when the exit head's entropy (nats) is at most ``threshold`` (DeeBERT)."""

    def __init__(self, threshold: float):
        self.threshold, self.name = threshold, f"entropy:{threshold:g}"

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        # H = log Z - sum(e·z)/Z over z - max, in float32 (a float64 softmax of the vocabulary costs
        # a sizeable share of a decode step).
        z = np.asarray(logits, dtype=np.float32)
        z = z - z.max()
        e = np.exp(z)
        total = float(e.sum(dtype=np.float64))
        return float(np.log(total) - float(np.dot(e, z)) / total) <= self.threshold


class Patience(ExitPolicy):
    """Exit when ``k`` consecutive exit heads agree on the top token (PABEE)."""

    def __init__(self, k: int):
        if k < 2:
            raise EdgertError(f"patience needs at least 2 agreeing exits, got {k}")
        self.k, self.name = k, f"patience:{k}"
        self._run: list[int] = []

    def start(self) -> None:
        self._run = []

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        top = int(np.argmax(logits))
        self._run = [*self._run, top] if self._run and self._run[-1] == top else [top]
        return len(self._run) >= self.k


class Budget(ExitPolicy):
    """At most ``layers`` layers per token; with an inner policy, it may stop earlier."""

    def __init__(self, layers: int, inner: ExitPolicy | None = None):
        self.layers, self.inner = layers, inner
        self.name = f"{inner.name}+budget:{layers}" if inner else f"budget:{layers}"

    def exits(self, available: Sequence[int], num_layers: int) -> list[int]:
        inner = self.inner.exits(available, num_layers) if self.inner else []
        cap = [self.layers] if 0 < self.layers < num_layers else []
        return sorted({e for e in inner if e < self.layers} | set(cap))

    @property
    def reads_head(self) -> bool:  # type: ignore[override]
        """As the inner policy; the cap alone needs no head until the token leaves."""
        return bool(self.inner and self.inner.reads_head)

    def start(self) -> None:
        if self.inner:
            self.inner.start()

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        return depth >= self.layers or bool(self.inner and self.inner.should_exit(depth, logits))

    def should_exit_state(self, depth: int, h: np.ndarray) -> bool:
        return depth >= self.layers or bool(self.inner and self.inner.should_exit_state(depth, h))


def probe_features(h: np.ndarray) -> np.ndarray:
    """What a state probe reads from hidden states [..., d]: the RMS-normalized state and its log RMS [..., d+1]."""
    h = np.asarray(h, dtype=np.float64)
    rms = np.sqrt(np.mean(h * h, axis=-1, keepdims=True)) + 1e-6
    return np.concatenate([h / rms, np.log(rms)], axis=-1)


class StateProbe(ExitPolicy):
    """Exit at the first exit whose state probe gives at least ``threshold`` (CALM's "state" confidence).

    A probe is a logistic regression on the exit's hidden state (`probe_features`), fitted by
    `edgert calibrate` to predict whether the exit head's top token is the full model's. A check
    costs one dot product; the exit head runs only where the token leaves.
    """

    reads_head = False

    def __init__(self, threshold: float, probes: dict[int, tuple[np.ndarray, np.ndarray]]):
        self.threshold, self.probes, self.name = threshold, probes, f"state:{threshold:g}"

    def exits(self, available: Sequence[int], num_layers: int) -> list[int]:
        return [e for e in sorted(self.probes) if 0 < e < num_layers]

    def probability(self, depth: int, h: np.ndarray) -> float:
        """The probe's probability that the exit head at ``depth`` gives the full model's top token."""
        w, b = self.probes[depth]
        z = float(probe_features(h) @ w + b[0])
        return 1.0 / (1.0 + np.exp(-z)) if z > -500 else 0.0

    def should_exit_state(self, depth: int, h: np.ndarray) -> bool:
        return self.probability(depth, h) >= self.threshold


POLICIES = ("static", "confidence", "entropy", "patience", "state", "budget")
GIVE_A_VALUE = {"confidence": 0.9, "entropy": 0.5, "patience": 3, "state": 0.5, "static": 20}  # examples in errors


def parse_exit_policy(spec: str, model: Generator) -> ExitPolicy:
    """An `ExitPolicy` from ``static:N``, ``confidence[:P]``, ``entropy[:H]``, ``patience[:K]``, ``state[:P]``,
    ``budget:N`` or one of them ``+budget:N``. A name without a value takes the calibrated point stored in the
    artifact (calibration stores only points faster than the full model).
    """
    calibrated = model.artifact.manifest.get("exits", {}).get("policies", {})
    policy: ExitPolicy | None = None
    budget: int | None = None
    for part in spec.split("+"):
        name, _, value = part.strip().partition(":")
        if name not in POLICIES:
            raise EdgertError(f"--exit '{spec}': unknown policy '{name}' (one of {', '.join(POLICIES)})")
        if not value:
            if name in model.artifact.manifest.get("exits", {}).get("refused", []):
                raise EdgertError(
                    f"--exit '{spec}': calibration found no point of '{name}' faster than the full model, so none "
                    f"is stored (give a value, e.g. {name}:{GIVE_A_VALUE.get(name, 1)}, to run a slower one anyway)"
                )
            if name not in calibrated:
                raise EdgertError(
                    f"--exit '{spec}': '{name}' needs a value (the artifact has no calibrated point for it; "
                    "run edgert calibrate)"
                )
            value = str(calibrated[name]["threshold"])
        try:
            number = float(value)
        except ValueError as exc:
            raise EdgertError(f"--exit '{spec}': '{value}' is not a number") from exc
        if name == "budget":
            budget = int(number)
        elif policy is not None:
            raise EdgertError(f"--exit '{spec}': combine one policy with budget:N, not two policies")
        elif name == "static":
            policy = StaticDepth(int(number))
        elif name == "confidence":
            policy = Confidence(number)
        elif name == "entropy":
            policy = Entropy(number)
        elif name == "state":
            probes = load_probes(model.session)
            if not probes:
                raise EdgertError(f"--exit '{spec}': the artifact has no state probes (run edgert calibrate)")
            policy = StateProbe(number, probes)
        else:
            policy = Patience(int(number))
    if budget is not None:
        return Budget(budget, policy)
    assert policy is not None
    return policy


def default_exits(num_layers: int) -> list[int]:
    """Exit points without calibration: every sixth of the depth, from the half on."""
    step = max(1, num_layers // 6)
    return [e for e in range(step, num_layers, step) if e >= num_layers // 2]


def range_spans(num_layers: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The layer ranges an artifact compiles as single entry points (``layers_<a>_<b>``, ``kv_fill_<a>_<b>``).

    The stack is cut at the default exit points: the spans between them (a decode step that
    exits there, or runs on, makes one call per span instead of one per layer) and, for each
    exit, the copy-forward fill of every layer after it. Spans of one layer are left to
    ``layer_<i>`` and ``kv_fill_<i>``.
    """
    cuts = [0, *default_exits(num_layers), num_layers]
    layers = [(a, b) for a, b in itertools.pairwise(cuts) if b - a >= 2]
    fills = [(e, num_layers) for e in default_exits(num_layers) if num_layers - e >= 2]
    return layers, fills


def exit_pass(
    stack: LayerEntries,
    policy: ExitPolicy,
    exit_points: Sequence[int],
    h: Any,
    run: Callable[[Any, range], Any],
    judge: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, int, int]:
    """One token's pass (inside an open forward pass) with ``policy`` choosing where it leaves the stack.

    ``run(h, layers)`` applies layers; at each exit point the exit head's logits (``judge`` may
    mask a copy first) go to the policy, or, for a policy that does not read the head, the
    hidden state of the last position. A token that exits after layer e fills the KV of layers
    e.. by copy-forward. Returns the logits of the last position, the depth used and how many
    exit heads ran.
    """
    n = stack.num_layers
    policy.start()
    depth = heads = 0
    for e in exit_points:
        h = run(h, range(depth, e))
        depth = e
        if policy.reads_head:
            logits = stack.logits(h, e)[-1]
            heads += 1
            leave = policy.should_exit(e, logits if judge is None else judge(logits))
        elif policy.should_exit_state(e, to_numpy(h)[0, -1]):
            logits, heads, leave = stack.logits(h, e)[-1], heads + 1, True
        else:
            leave = False
        if leave:
            stack.fill(h, range(e, n))
            return logits, e, heads
    return stack.logits(run(h, range(depth, n)))[-1], n, heads


@dataclass
class EarlyExitStats(GenerationStats):
    """GenerationStats plus the depth each decoded token used."""

    num_layers: int = 0
    depths: list[int] = field(default_factory=list)
    head_calls: int = 0

    @property
    def mean_layers(self) -> float:
        """Mean layers run per decoded token (the full depth when nothing was decoded)."""
        return float(np.mean(self.depths)) if self.depths else float(self.num_layers)

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict for JSON output."""
        return {
            **super().to_dict(),
            "num_layers": self.num_layers,
            "mean_layers": round(self.mean_layers, 3),
            "exit_heads_per_token": round(self.head_calls / len(self.depths), 3) if self.depths else 0.0,
        }


class EarlyExitDecoder:
    """Decodes with an `ExitPolicy`; same interface as `Generator.generate`."""

    def __init__(self, model: Generator, policy: ExitPolicy):
        self.model, self.policy = model, policy
        adapters = load_adapters(model.session)
        self.stack = LayerStack(model.session, model.cache, adapters)
        n = self.stack.num_layers
        stored = model.artifact.manifest.get("exits", {}).get("layers")
        self.exit_points = policy.exits(stored or default_exits(n), n)
        self.stats = EarlyExitStats(num_layers=n)

    def step(self, token: int) -> np.ndarray:
        """Decode one token with the policy; logits [vocab]. Records the depth used."""
        m = self.model
        if m.cache.length + 1 > m.context_length:
            raise ContextLengthError(f"{m.cache.length + 1} tokens do not fit the context of {m.context_length}")
        m.cache.begin(1)
        logits, depth, looked = exit_pass(
            self.stack, self.policy, self.exit_points, self.stack.embed([token]), self.stack.run
        )
        m.cache.end(1)
        m.cached_ids.append(token)
        self.stats.head_calls += looked
        self.stats.depths.append(depth)
        return logits

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        chat: bool = False,
    ) -> Iterator[Token]:
        """Yield tokens; each decoded token runs the layers the policy chose."""
        self.stats = EarlyExitStats(num_layers=self.stack.num_layers)
        yield from self.model.generate(prompt, max_tokens, sampling, stop, chat, decode_step=self.step)
        for f in fields(GenerationStats):  # the run's counts and timings, kept by the model's generate
            setattr(self.stats, f.name, getattr(self.model.stats, f.name))

    def agreement(self, prompt: str | Sequence[int], reference: Sequence[int], chat: bool = False) -> float:
        """Fraction of ``reference`` tokens (the full model's greedy output) this policy predicts when fed them.

        Teacher-forced: each reference token is decoded with the policy (its KV from the exits
        taken), and the policy's top token is compared with the next reference token.
        """
        if len(reference) < 2:
            raise ValueError("agreement needs at least two reference tokens")
        self.model.prefill(self.model.encode_prompt(prompt, chat))  # the first token comes from the full model
        hits = sum(int(np.argmax(self.step(t))) == nxt for t, nxt in itertools.pairwise(reference))
        return hits / (len(reference) - 1)
