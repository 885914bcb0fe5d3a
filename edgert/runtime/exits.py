"""Early exit: each decoded token runs only as many layers as a policy asks for.

A decode step runs the layers up to each exit point (the exits `edgert calibrate` fitted
adapters for, else a few evenly spaced ones), applies the exit head there, and asks the
`ExitPolicy` whether to stop. A token that stops at layer e gives layers e.. their KV entries
by copy-forward (see `edgert.runtime.layers`). The prompt always runs the full model.

The exit head costs as much as the LM head (on SmolLM2 about eight layers' worth of weights),
so every check is expensive: policies that look at fewer exits are the ones that save time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.generator import GenerationStats, Generator, Token
from edgert.runtime.layers import LayerStack, load_adapters
from edgert.runtime.sampling import SamplingParams


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of a logit vector (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


class ExitPolicy:
    """Decides, at each exit point of a token's pass, whether to stop there."""

    name = "full"

    def exits(self, available: Sequence[int], num_layers: int) -> list[int]:
        """The exit points (depths < num_layers) this policy looks at, in order."""
        return [e for e in available if 0 < e < num_layers]

    def start(self) -> None:
        """Called before each token's pass."""

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        """True to stop after ``depth`` layers with these exit-head logits."""
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
        return float(softmax(logits).max()) >= self.threshold


class Entropy(ExitPolicy):
    """Exit when the exit head's entropy (nats) is at most ``threshold`` (DeeBERT)."""

    def __init__(self, threshold: float):
        self.threshold, self.name = threshold, f"entropy:{threshold:g}"

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        p = softmax(logits)
        return float(-(p * np.log(np.maximum(p, 1e-30))).sum()) <= self.threshold


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

    def start(self) -> None:
        if self.inner:
            self.inner.start()

    def should_exit(self, depth: int, logits: np.ndarray) -> bool:
        return depth >= self.layers or bool(self.inner and self.inner.should_exit(depth, logits))


POLICIES = ("static", "confidence", "entropy", "patience", "budget")


def parse_exit_policy(spec: str, model: Generator) -> ExitPolicy:
    """An `ExitPolicy` from ``static:N``, ``confidence[:P]``, ``entropy[:H]``, ``patience[:K]``, ``budget:N``
    or one of them ``+budget:N``. A name without a value takes the calibrated point stored in the artifact.
    """
    calibrated = model.artifact.manifest.get("exits", {}).get("policies", {})
    policy: ExitPolicy | None = None
    budget: int | None = None
    for part in spec.split("+"):
        name, _, value = part.strip().partition(":")
        if name not in POLICIES:
            raise EdgertError(f"--exit '{spec}': unknown policy '{name}' (one of {', '.join(POLICIES)})")
        if not value:
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
        m, stack, n = self.model, self.stack, self.stack.num_layers
        if m.cache.length + 1 > m.context_length:
            from edgert.errors import ContextLengthError

            raise ContextLengthError(f"{m.cache.length + 1} tokens do not fit the context of {m.context_length}")
        self.policy.start()
        m.cache.begin(1)
        h = stack.embed([token])
        depth = 0
        logits = None
        for e in self.exit_points:
            h = stack.run(h, range(depth, e))
            depth = e
            lg = stack.logits(h, e)[-1]
            self.stats.head_calls += 1
            if self.policy.should_exit(e, lg):
                stack.fill(h, range(e, n))
                logits = lg
                break
        if logits is None:
            h = stack.run(h, range(depth, n))
            depth = n
            logits = stack.logits(h)[-1]
        m.cache.end(1)
        m.cached_ids.append(token)
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
        base = self.model.stats.to_dict()
        for key in ("prompt_tokens", "cached_tokens", "generated_tokens", "stop_reason"):
            setattr(self.stats, key, base[key])
        self.stats.prefill_seconds = self.model.stats.prefill_seconds
        self.stats.decode_seconds = self.model.stats.decode_seconds
        self.stats.decode_step_seconds = self.model.stats.decode_step_seconds

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
