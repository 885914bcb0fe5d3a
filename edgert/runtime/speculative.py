"""Lossless speculative decoding: draft k tokens cheaply, verify them in one full pass.

A drafter proposes k tokens: `SelfDrafter` runs a subset of the model's own layers (a
layer-skipping sub-model, or the first layers and an exit head) over the same KV cache;
`ModelDrafter` runs a second, smaller build of the model (a Q4 build drafting for the f32
one); `LookupDrafter` copies what followed the last n-gram's earlier occurrence in the context
(prompt lookup) and `RecycleDrafter` follows an adjacency table of the tokens the model itself
ranked first after each token in earlier steps (Token Recycling): those two cost nothing to
draft, and `SpeculativeDecoder` stops drafting with them for a while whenever its rounds yield
fewer tokens per second than plain steps, so they are not slower than plain decoding by more
than the probing costs. The full model then scores the pending token and the k drafts in one ``verify`` pass;
the agreeing prefix is kept and the rest rolled back (``popn``). Greedy output is the full
model's token for token; with sampling the standard rule (accept draft d with probability
min(1, p(d)/q(d)), else resample from max(0, p - q)) keeps the full model's distribution; a
deterministic draft (lookup, recycle) has q = 1 on its token, so it is kept with probability p(d)
and a rejection resamples from p without d.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.generator import GenerationStats, Generator, Token
from edgert.runtime.layers import LayerStack, load_adapters
from edgert.runtime.sampling import Sampler, SamplingParams, token_probabilities

Pick = Callable[[np.ndarray, Sequence[int]], int]


@dataclass
class DraftStats:
    """Drafting counts: rounds of draft-and-verify, tokens drafted, drafts the verifier accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0  # decode steps without a draft (nothing to propose, or drafting paused)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def count_round(self, drafted: int, accepted: int) -> None:
        """Record one round: ``drafted`` tokens proposed, the first ``accepted`` of them kept."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON output."""
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "plain_steps": self.plain_steps,
        }


@dataclass
class SpeculativeStats(DraftStats, GenerationStats):
    """GenerationStats plus the drafting counts."""

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first per second of decoding (rounds emit several tokens at once)."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict for JSON output."""
        return {
            **GenerationStats.to_dict(self),
            **DraftStats.to_dict(self),
            "tokens_per_round": round((self.accepted + self.rounds) / self.rounds, 3) if self.rounds else 0.0,
        }


class SelfDrafter:
    """Drafts with some of the model's own layers over the model's own KV cache.

    ``layers`` run in order; the skipped ones write no KV entries, which is harmless because
    every drafted position is rolled back before the full model verifies it. ``depth`` names
    the exit whose adapter maps the last state to the head (an exit-head drafter).
    """

    def __init__(self, model: Generator, layers: Sequence[int], depth: int | None = None):
        self.model = model
        self.stack = LayerStack(model.session, model.cache, load_adapters(model.session))
        bad = [i for i in layers if not 0 <= i < self.stack.num_layers]
        if bad or not layers:
            n = self.stack.num_layers
            raise EdgertError(f"draft layers {list(layers)} are not a non-empty subset of 0..{n - 1}")
        self.layers, self.depth = list(layers), depth

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray]]:
        """Draft ``k`` tokens after ``context`` (the cache holds all of it but the last token)."""
        cache, history = self.model.cache, list(context)
        drafts: list[int] = []
        logits: list[np.ndarray] = []
        for _ in range(k):
            cache.begin(1)
            h = self.stack.run(self.stack.embed([history[-1]]), self.layers)
            lg = self.stack.logits(h, self.depth)[-1]
            cache.end(1)
            token = pick(lg, history)
            drafts.append(token)
            logits.append(lg)
            history.append(token)
        cache.rollback(k)
        return drafts, logits


class ModelDrafter:
    """Drafts with a second build of the model (same tokenizer), which keeps its own cache."""

    def __init__(self, draft: Generator, target: Generator):
        if draft.vocab_size != target.vocab_size:
            raise EdgertError(
                f"the draft model's vocabulary ({draft.vocab_size}) is not the target's ({target.vocab_size})"
            )
        self.draft = draft

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray]]:
        """Draft ``k`` tokens after ``context``; the draft cache catches up by its longest common prefix."""
        history = list(context)
        lg = self.draft.prefill(history, like_decode=True)  # the accepted tokens as decode would add them
        drafts: list[int] = []
        logits: list[np.ndarray] = []
        for j in range(k):
            token = pick(lg, history)
            drafts.append(token)
            logits.append(lg)
            history.append(token)
            if j < k - 1:
                lg = self.draft.step([token])
        return drafts, logits


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
    n-gram (``ngram`` tokens, else shorter, down to one). Drafts nothing where nothing matches."""

    note = ""

    def __init__(self, ngram: int = 3):
        self.ngram = ngram

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray | None]]:
        """Up to ``k`` tokens copied from the context (deterministic drafts: no logits)."""
        ctx = np.asarray(context, dtype=np.int64)
        size = len(ctx)
        for n in range(min(self.ngram, size - 1), 0, -1):
            # Windows of n tokens that start before the tail does, compared with the tail.
            windows = np.lib.stride_tricks.sliding_window_view(ctx[: size - 1], n)
            starts = np.flatnonzero((windows == ctx[size - n :]).all(axis=1))
            if starts.size:
                # The latest match whose continuation has k tokens, else the latest of all.
                full = starts[starts + n + k <= size]
                start = int(full[-1] if full.size else starts[-1]) + n
                drafts = [int(t) for t in ctx[start : start + k]]
                return drafts, [None] * len(drafts)
        return [], []


class RecycleDrafter:
    """Token Recycling: a table of the token the full model ranked first after each token, filled
    from the logits of every step and verify pass (kept across generations), drafts a chain.

    The method drafts a tree of each token's top candidates and verifies it with a tree
    attention mask; the builds have a chain ``verify`` only (no tree-verify entry), so the best
    chain is drafted (the table keeps the first candidate), and `note` says so.
    """

    note = "recycle: the build has no tree-verify entry, so the best chain is drafted"

    def __init__(self, vocab_size: int):
        self.table = np.full(vocab_size, -1, dtype=np.int64)

    def observe(self, tokens: Sequence[int], logits: np.ndarray) -> None:
        """Record the full model's first choice after each of ``tokens`` (``logits``: [len, vocab])."""
        self.table[np.asarray(tokens)] = np.argmax(logits.reshape(len(tokens), -1), axis=-1)

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray | None]]:
        """Follow the table from the last token for up to ``k`` tokens (deterministic drafts)."""
        drafts: list[int] = []
        token = int(context[-1])
        for _ in range(k):
            token = int(self.table[token])
            if token < 0:
                break
            drafts.append(token)
        return drafts, [None] * len(drafts)


def default_skip(num_layers: int) -> list[int]:
    """Layers a draft skips without calibration: every other layer of the middle half."""
    return list(range(num_layers // 4 + 1, num_layers - num_layers // 4, 2))


DEFAULT_K = {"self": 4, "model": 4, "lookup": 6, "recycle": 4}
OPTIONS = {"self": {"k", "skip", "exit"}, "model": {"k"}, "lookup": {"k", "ngram"}, "recycle": {"k"}}
SPEC_FORMS = "self:k=N[,skip=...|,exit=N], model:PATH[:k=N], lookup[:k=N,ngram=N] or recycle[:k=N]"


def parse_speculative(spec: str, model: Generator, load_draft: Callable[[str], Generator]) -> tuple[object, int]:
    """A drafter and k from ``self:k=4``, ``self:k=4,skip=3-9,12``, ``self:k=3,exit=16``,
    ``model:PATH:k=4``, ``lookup:k=6,ngram=3`` or ``recycle:k=4``.

    Without ``skip`` or ``exit``, ``self`` uses the skip set stored by `edgert calibrate`,
    else `default_skip`.
    """
    kind, _, rest = spec.partition(":")
    if kind == "model":
        path, _, rest = rest.rpartition(":") if ":k=" in ":" + rest else (rest, "", "")
        if not path:
            path, rest = rest, ""
    elif kind not in OPTIONS:
        raise EdgertError(f"--speculative '{spec}': expected {SPEC_FORMS}")
    options = parse_draft_options(rest, spec, OPTIONS[kind])
    try:
        k = int(options.get("k", DEFAULT_K[kind]))
    except ValueError as exc:
        raise EdgertError(f"--speculative '{spec}': k must be an integer") from exc
    if not 1 <= k <= 16:
        raise EdgertError(f"--speculative '{spec}': k must be in 1..16")
    if kind == "model":
        return ModelDrafter(load_draft(path), model), k
    if kind == "lookup":
        ngram = _int(options.get("ngram", "3"), spec)
        if not 1 <= ngram <= 8:
            raise EdgertError(f"--speculative '{spec}': ngram must be in 1..8")
        return LookupDrafter(ngram), k
    if kind == "recycle":
        return RecycleDrafter(model.vocab_size), k
    num_layers = int(model.artifact.manifest["model"]["num_layers"])
    if "exit" in options:
        depth = _int(options["exit"], spec)
        if not 1 <= depth < num_layers:
            raise EdgertError(f"--speculative '{spec}': exit must be in 1..{num_layers - 1}")
        return SelfDrafter(model, range(depth), depth), k
    if "skip" in options:
        skip = parse_layer_set(options["skip"], spec)
    else:
        stored = model.artifact.manifest.get("exits", {}).get("draft_skip")
        skip = list(stored) if stored else default_skip(num_layers)
    return SelfDrafter(model, [i for i in range(num_layers) if i not in set(skip)]), k


def parse_draft_options(text: str, spec: str, known: set[str] | None = None) -> dict[str, str]:
    """``k=4,skip=3,5,7`` -> {"k": "4", "skip": "3,5,7"}; only the ``known`` keys (default: ``self``'s)."""
    options: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            if options:  # a continuation of a comma list: skip=3,5,7
                options[list(options)[-1]] += "," + part
                continue
            raise EdgertError(f"--speculative '{spec}': '{part}' is not KEY=VALUE")
        options[key.strip()] = value.strip()
    unknown = set(options) - (known if known is not None else OPTIONS["self"])
    if unknown:
        raise EdgertError(f"--speculative '{spec}': unknown option(s) {', '.join(sorted(unknown))}")
    return options


def parse_layer_set(text: str, spec: str = "") -> list[int]:
    """``3-9,12`` -> [3, 4, ..., 9, 12]."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, dash, hi = part.partition("-")
        out.extend(range(_int(lo, spec), _int(hi, spec) + 1) if dash else [_int(lo, spec)])
    return out


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise EdgertError(f"--speculative '{spec}': '{text}' is not an integer") from exc


class DraftGate:
    """Pauses cheap drafting while it does not pay: never much slower than plain decoding.

    Keeps the seconds per emitted token of plain steps and of draft rounds (moving averages);
    when rounds fall behind, drafting pauses for ``pause`` steps, doubling while it keeps
    losing (up to 64). A plain step is timed now and then (every ``probe`` rounds) so the
    comparison follows a machine whose load changes.
    """

    def __init__(self, pause: int = 4, probe: int = 32, weight: float = 0.3):
        self.plain: float | None = None
        self.round: float | None = None
        self.base_pause, self.pause, self.probe, self.weight = pause, pause, probe, weight
        self.wait = 0
        self.since_plain = 0

    def draft_now(self) -> bool:
        """True when the next step should draft."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return self.plain is not None and self.since_plain < self.probe

    def record(self, drafted: bool, seconds: float, tokens: int) -> None:
        """Count a step: a draft round (else a plain step) that took ``seconds`` and emitted ``tokens``."""
        per = seconds / max(tokens, 1)
        w = self.weight
        if not drafted:
            self.plain = per if self.plain is None else (1 - w) * self.plain + w * per
            self.since_plain = 0
            return
        self.since_plain += 1
        self.round = per if self.round is None else (1 - w) * self.round + w * per
        if self.plain is None:
            return
        if self.round > self.plain:
            self.wait, self.pause = self.pause, min(2 * self.pause, 64)
            self.round = None  # judged afresh after the pause
        else:
            self.pause = self.base_pause


class SpeculativeDecoder:
    """Generates with a drafter and the full model as verifier; same interface as `Generator.generate`.

    ``gate`` (default: on for the drafters that cost nothing, lookup and recycle) pauses drafting
    while rounds are slower than plain steps (`DraftGate`); it changes the speed, never the tokens.
    """

    def __init__(self, model: Generator, drafter: Any, k: int = 4, gate: bool | None = None):
        self.model, self.drafter, self.k = model, drafter, k
        self.stats = SpeculativeStats()
        self.gate = isinstance(drafter, LookupDrafter | RecycleDrafter) if gate is None else gate
        # One gate for every generation: what it learnt about rounds and plain steps carries over.
        self._gate = DraftGate() if self.gate else None
        self._observe = getattr(drafter, "observe", None)
        self._drafted = False  # whether the last step drafted (for the gate)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        chat: bool = False,
    ) -> Iterator[Token]:
        """Yield tokens as the full model would produce them (greedy: identical; sampling: same distribution)."""
        m = self.model
        ids = m.checked_prompt(prompt, max_tokens, chat)
        params = sampling or SamplingParams()
        sampler = Sampler(params)
        stats = self.stats = SpeculativeStats(prompt_tokens=len(ids))
        gate = self._gate
        logits, out = m.begin_generation(ids, stats, max_tokens, stop)
        if self._observe is not None:
            self._observe(ids[-1:], logits)
        pending = [sampler(logits, out.history)]
        t_decode = time.perf_counter()
        while True:
            yield from out.emit(pending)
            if out.done:
                break
            # The cache holds history[:-1]; a round appends the pending token and k drafts.
            room = m.context_length - m.cache.length - 1
            if room < 0:
                stats.stop_reason = "context_full"
                break
            k = min(self.k, room, max_tokens - stats.generated_tokens)
            history = out.history
            t = time.perf_counter()
            self._drafted = False
            if k and (gate is None or gate.draft_now()):
                pending = self._round(history, k, sampler, params)
            else:
                pending = [self._plain(history, sampler)]
            if gate is not None:
                gate.record(self._drafted, time.perf_counter() - t, len(pending))
        stats.decode_seconds = time.perf_counter() - t_decode

    def _plain(self, history: list[int], sampler: Sampler) -> int:
        """One decode step of the full model, no draft."""
        logits = self.model.step([history[-1]])
        if self._observe is not None:
            self._observe(history[-1:], logits)
        self.stats.plain_steps += 1
        return sampler(logits, history)

    def _round(self, history: list[int], k: int, sampler: Sampler, params: SamplingParams) -> list[int]:
        """Draft k tokens, verify them in one pass; the tokens to emit (accepted drafts + one from the full model)."""
        m, stats = self.model, self.stats
        drafts, draft_logits = self.drafter.propose(history, k, sampler)
        drafts, draft_logits = drafts[:k], draft_logits[:k]
        if not drafts:  # nothing to propose: a plain step
            return [self._plain(history, sampler)]
        self._drafted = True
        k = len(drafts)
        full = m.step([history[-1], *drafts], all_logits=True)
        if self._observe is not None:
            self._observe([history[-1], *drafts], full)
        out: list[int] = []
        for i, d in enumerate(drafts):
            seen = history + drafts[:i]
            if params.greedy:
                target = sampler(full[i], seen)
                if target != d:
                    out.append(target)
                    break
            else:
                p = token_probabilities(full[i], params, seen)
                if draft_logits[i] is None:  # a deterministic draft: q is 1 at d
                    q = np.zeros_like(p)
                    q[d] = 1.0
                else:
                    q = token_probabilities(draft_logits[i], params, seen)
                if sampler.rng.random() >= min(1.0, p[d] / max(q[d], 1e-30)):
                    residual = np.maximum(p - q, 0.0)
                    total = residual.sum()
                    residual = residual / total if total > 0 else p
                    out.append(int(sampler.rng.choice(residual.size, p=residual)))
                    break
            out.append(d)
        else:  # every draft agreed: the verify pass also gives the next token
            out.append(sampler(full[k], history + drafts))
        accepted = len(out) - 1
        stats.count_round(k, accepted)
        m.rollback(k - accepted)  # the cache holds the pending token and k drafts; keep the accepted ones
        return out


def adaptive_decoder(
    model: Generator,
    speculative: str | None = None,
    exit_policy: str | None = None,
    load_draft: Callable[[str], Generator] | None = None,
) -> Any:
    """What decodes for `edgert run`: ``model`` itself, a `SpeculativeDecoder` for a ``speculative`` spec
    (``load_draft`` opens a draft model's artifact), or an `EarlyExitDecoder` for an ``exit_policy``."""
    if speculative and exit_policy:
        raise EdgertError("--speculative and --exit are separate modes; pick one")
    if speculative:
        if load_draft is None:
            raise EdgertError(f"--speculative '{speculative}': no way to load a draft model was given")
        drafter, k = parse_speculative(speculative, model, load_draft)
        return SpeculativeDecoder(model, drafter, k)
    if exit_policy:
        from edgert.runtime.exits import EarlyExitDecoder, parse_exit_policy

        return EarlyExitDecoder(model, parse_exit_policy(exit_policy, model))
    return model
