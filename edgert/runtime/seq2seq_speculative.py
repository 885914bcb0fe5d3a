"""Speculative greedy decoding for an encoder-decoder's decoder (Whisper): self-drafted or looked up.

The artifact exports the decoder in pieces (``embed``, ``layer_<i>``, ``head``). A draft runs
a subset of the decoder layers (a layer-skipping sub-decoder, or the first j layers and the
head) one token at a time; the full decoder then verifies the pending token and the k drafts
in one pass over the self-attention KV cache, the agreeing prefix is kept and the rest popped
(``kv_state_popn``). Draft and verify take the same cross-attention K/V tensor, computed once
per window by ``encode``. The drafted positions are popped before the verify pass, so layers a
draft skips need no KV fill. Greedy output is the full decoder's, token for token.

`LookupSeq2Seq` drafts at no cost from text the decoder has seen: a reference hypothesis (the
previous window's tokens in long-form transcription, the last partial hypothesis of the same
utterance when streaming) and the prompt and tokens decoded so far (n-gram lookup); the same
one-pass verify keeps the agreeing prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.exits import ExitPolicy, exit_pass
from edgert.runtime.layers import LayerEntries, load_adapters
from edgert.runtime.seq2seq import Advance, Hypothesis, LogitsProcessor, Seq2Seq, apply_processors
from edgert.runtime.speculative import (
    OPTIONS,
    DraftGate,
    DraftStats,
    default_skip,
    parse_draft_options,
    parse_layer_set,
)
from edgert.runtime.tvm_runtime import to_numpy


class DecoderLayers(LayerEntries):
    """The decoder's layer entry points of one `Seq2Seq`, called over its sequence cache."""

    def __init__(self, model: Seq2Seq):
        super().__init__(
            model.session, model.cache, load_adapters(model.session), "decoder layer", "speculative decoding"
        )
        self.model = model
        # Artifacts compiled before the ``verify`` entry point run a full pass layer by layer.
        verify = "verify" in model.artifact.manifest["entry_points"]
        self._verify = model.session.vm["verify"] if verify else None
        # Artifacts with the row kernels run a pass of up to this many tokens as decode rows of one
        # sequence (the cache told the sequence once per token): each row attends as a decode step does.
        self.rows = int(model.artifact.manifest["kv_cache"].get("verify_rows", 0))

    def begin(self, seq: int, n: int) -> None:
        """Open a forward pass appending ``n`` tokens to ``seq``: as decode rows where the artifact can."""
        cache = self.model.cache
        if 1 < n <= self.rows:
            cache.begin([seq] * n, [1] * n)
        else:
            cache.begin([seq], [n])

    def embed(self, seq: int, tokens: Sequence[int]) -> Any:
        """Hidden states [1, n, d] of ``tokens`` at ``seq``'s next positions (inside an open forward pass)."""
        m = self.model
        tensor = m.session.tensor
        pos = np.array([[m.cache.lengths[seq] + i for i in range(len(tokens))]], np.int32)
        return self._embed(tensor(np.array([list(tokens)], np.int32)), tensor(pos), self._params)

    def run(self, h: Any, cross: Any, layers: Iterable[int]) -> Any:
        """Apply decoder ``layers`` to ``h``, each writing its self-attention KV entries."""
        for i in layers:
            h, self.cache.obj = self._layers[i](h, cross, self.cache.obj, self._params)
        return h

    def head(self, h: Any, depth: int | None = None) -> np.ndarray:
        """Logits [n, vocab] of hidden states (final norm + tied head, after any layer; see `LayerEntries.logits`)."""
        return self.logits(h, depth)

    def forward(self, seq: int, tokens: Sequence[int], cross: Any, layers: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to ``seq`` through ``layers`` only; logits [len(tokens), vocab]."""
        m = self.model
        if self._verify is not None and list(layers) == list(range(self.num_layers)):
            tensor = m.session.tensor
            ids = tensor(np.array([list(tokens)], np.int32))
            pos = tensor(m._positions([seq], len(tokens)))
            self.begin(seq, len(tokens))
            # The entry is called directly, as `Seq2Seq.step` does.
            out, self.cache.obj = m.session.pool.run(self._verify, ids, pos, cross, self.cache.obj, self._params)
            m.cache.end()
            return to_numpy(out)[0]
        h = self.embed(seq, tokens)
        self.begin(seq, len(tokens))
        logits = self.head(self.run(h, cross, layers))
        m.cache.end()
        return logits


class GreedyVariant:
    """Greedy decoding of a `Seq2Seq` through `Seq2Seq.greedy`, with the decoder steps a subclass provides."""

    model: Seq2Seq

    def _advance(self, cross: Any, max_new: int, processors: Sequence[LogitsProcessor]) -> Advance:
        raise NotImplementedError

    def _start(
        self, cross: Any, prompt: Sequence[int], max_new: int, processors: Sequence[LogitsProcessor]
    ) -> Callable[[int], np.ndarray] | None:
        """The prompt's pass for `Seq2Seq.greedy` (``start``); None: its plain prefill."""
        return None

    def greedy(
        self,
        cross: Any,
        prompt: Sequence[int],
        eos: int,
        max_new: int,
        processors: Sequence[LogitsProcessor] = (),
        on_first_logits: Callable[[np.ndarray], None] | None = None,
    ) -> Hypothesis:
        """`Seq2Seq.greedy`'s loop and result (same arguments), each step taken by this decoder."""
        advance = self._advance(cross, max_new, processors)
        start = self._start(cross, prompt, max_new, processors)
        return self.model.greedy(cross, prompt, eos, max_new, processors, on_first_logits, advance, start)


class SelfSpeculativeDecoder(GreedyVariant):
    """Greedy decoding of a `Seq2Seq` with drafts from its own decoder layers (``draft_layers``);
    the output is `Seq2Seq.greedy`'s, decoded k drafted tokens per full-decoder pass."""

    def __init__(self, model: Seq2Seq, draft_layers: Sequence[int], k: int = 4):
        self.layers = DecoderLayers(model)
        n = self.layers.num_layers
        if not draft_layers or any(not 0 <= i < n for i in draft_layers):
            raise EdgertError(f"draft layers {list(draft_layers)} are not a non-empty subset of 0..{n - 1}")
        if not 1 <= k <= 16:
            raise EdgertError(f"k must be in 1..16 (got {k})")
        self.model, self.draft_layers, self.k = model, list(draft_layers), k
        self.stats = DraftStats()

    def _pick(self, logits: np.ndarray, step: int, tokens: list[int], processors: Sequence[LogitsProcessor]) -> int:
        return _pick(logits, step, tokens, processors)

    def _advance(self, cross: Any, max_new: int, processors: Sequence[LogitsProcessor]) -> Advance:
        """Rounds for `Seq2Seq.greedy`: draft k tokens, verify them in one full-decoder pass."""
        m = self.model

        def advance(seq: int, token: int, step: int, tokens: list[int]) -> np.ndarray:
            # The cache holds everything but ``token``; a round appends it and k drafts.
            k = min(self.k, m.max_length - m.cache.lengths[seq] - 1, max_new - 1 - step)
            if k < 1:
                return m.step([seq], [token], cross)
            drafts: list[int] = []
            for _ in range(k):
                lg = self.layers.forward(seq, [(tokens + drafts)[-1]], cross, self.draft_layers)[0]
                drafts.append(self._pick(lg, step + len(drafts), tokens + drafts, processors))
            m.cache.popn(seq, k)
            return verify(self.layers, seq, token, drafts, cross, step, tokens, processors, self.stats)

        return advance


def _pick(logits: np.ndarray, step: int, tokens: list[int], processors: Sequence[LogitsProcessor]) -> int:
    """The greedy token of ``logits`` at ``step`` after ``tokens``, as `Seq2Seq.greedy` takes it
    (`best_token`'s argmax, without the log-probability: a sum of exps over the vocabulary per row)."""
    return int(np.argmax(apply_processors(processors, step, logits.copy(), tokens)))


def verify(
    layers: DecoderLayers,
    seq: int,
    token: int,
    drafts: list[int],
    cross: Any,
    step: int,
    tokens: list[int],
    processors: Sequence[LogitsProcessor],
    stats: DraftStats,
) -> np.ndarray:
    """One full-decoder pass over ``token`` (the last of ``tokens``) and ``drafts``; keeps the drafts
    the decoder itself would have picked greedily and pops the rest from ``seq``. Returns the logits
    of the accepted drafts' steps and of the step after them (what `Seq2Seq.greedy`'s advance returns)."""
    full = layers.forward(seq, [token, *drafts], cross, list(range(layers.num_layers)))
    return accept(layers, seq, full, drafts, step, tokens, processors, stats)


def accept(
    layers: DecoderLayers,
    seq: int,
    rows: np.ndarray,
    drafts: list[int],
    step: int,
    tokens: list[int],
    processors: Sequence[LogitsProcessor],
    stats: DraftStats,
) -> np.ndarray:
    """Of a pass whose last ``len(drafts)`` tokens were ``drafts`` and whose ``rows`` are the logits of
    steps ``step``.. (the row before each draft, and one more), keep the drafts greedy decoding picks,
    pop the rest from ``seq`` and return the rows of the kept drafts' steps and the step after them."""
    accepted = 0
    for i, d in enumerate(drafts):
        if _pick(rows[i], step + i, tokens + drafts[:i], processors) != d:
            break
        accepted += 1
    stats.count_round(len(drafts), accepted)
    layers.model.cache.popn(seq, len(drafts) - accepted)
    return rows[: accepted + 1]


def lookup_drafts(
    reference: Sequence[int],
    context: Sequence[int],
    k: int,
    ngram: int = 3,
    wildcard_from: int | None = None,
    special_from: int | None = None,
) -> tuple[list[int], int]:
    """Up to ``k`` tokens that followed an earlier occurrence of ``context``'s last n-gram in
    ``reference`` followed by ``context``, for the longest n up to ``ngram`` that occurs.

    Of that n-gram's occurrences the one with the longest draft wins, the latest among equals.
    Tokens from ``special_from`` on (Whisper's end, start and language tokens, timestamps) are
    never drafted: a draft ends before one, and one that would start with one is no draft (a
    timestamp follows, and its value shifts from window to window). Tokens from ``wildcard_from``
    on (the timestamps) match each other. No draft runs past the end of ``reference``. A single
    token (n = 1) matches in ``reference`` only: in the tokens decoded so far and the prompt (the
    previous text) its next token was right for 1 of 46 drafts on long-form speech, in the previous
    hypothesis of the same audio for 45 of 67. After a timestamp (a segment boundary) a match in the
    prompt or the tokens so far drafts one token: its n-gram (". <|t|> <|t|>") holds one word and
    matches every sentence start; on the bench's long-form speech those drafts kept the first
    word ("The") or nothing, never more (`tools/whisper_draft_replay.py`: 1.25x -> 1.31x). The
    reference's aligned head (what the next window hears again, after its start timestamp) drafts
    in full. Returns the draft and n (0: nothing matched).
    """
    tokens = [*reference, -1, *context]  # -1: no n-gram or draft spans the join
    corpus = np.asarray(tokens, np.int64)
    keys = corpus if wildcard_from is None else np.minimum(corpus, wildcard_from)
    stop = np.iinfo(np.int64).max if special_from is None else special_from
    size = len(keys)
    boundary = wildcard_from is not None and bool(context) and context[-1] >= wildcard_from
    # Where the tail's last token occurs before it: every n-gram match ends at one of these (narrowed
    # one token back per n; a window over the whole corpus per n cost ~3x as much on short corpora).
    ends = np.flatnonzero(keys[: size - 1] == keys[size - 1])
    for n in range(min(ngram, len(context)), 0, -1):
        found = ends[ends >= n - 1]
        for j in range(1, n):
            found = found[keys[found - j] == keys[size - 1 - j]]
        starts = found - (n - 1)
        if n == 1:  # a lone token recurs too often in running text: only the reference's say what follows
            starts = starts[starts < len(reference)]
        if not starts.size:
            continue
        best: list[int] = []
        for start in starts[::-1].tolist():
            draft: list[int] = []
            length = 1 if boundary and start >= len(reference) else k
            for t in tokens[start + n : start + n + length]:
                if t < 0 or t >= stop:
                    break
                draft.append(t)
            if len(draft) > len(best):
                best = draft
                if len(best) == k:
                    break
        return best, n
    return [], 0


class LookupSeq2Seq(GreedyVariant):
    """Greedy decoding of a `Seq2Seq` with drafts looked up in text the decoder has seen (`lookup_drafts`):
    ``reference`` (given to `greedy`: the previous window's tokens, or the last hypothesis of the same
    audio), laid out after the prompt's last tokens so that the first step can draft too, and the
    prompt and tokens decoded so far. The output is `Seq2Seq.greedy`'s.

    A short prompt (streaming's two tokens) and its first drafts go through one pass (`_start`), so
    the first round costs no pass of its own (``prompt_rounds`` counts them). A `DraftGate` (``gate``)
    pauses drafting while rounds yield fewer tokens per second than plain steps (reference text the
    audio no longer says); it changes the speed, never the tokens.
    """

    def __init__(
        self,
        model: Seq2Seq,
        k: int = 6,
        ngram: int = 3,
        wildcard_from: int | None = None,
        special_from: int | None = None,
        gate: bool = True,
    ):
        if not 1 <= k <= 16:
            raise EdgertError(f"k must be in 1..16 (got {k})")
        if not 1 <= ngram <= 8:
            raise EdgertError(f"ngram must be in 1..8 (got {ngram})")
        self.layers = DecoderLayers(model)
        self.model, self.k, self.ngram = model, k, ngram
        self.wildcard_from, self.special_from = wildcard_from, special_from
        self.stats = DraftStats()
        self.prompt_rounds = 0  # rounds verified in the prompt's pass (counted in ``stats`` too)
        self.gate = DraftGate() if gate else None  # one gate for every window: what it learnt carries over
        self._prompt: list[int] = []
        self._reference: list[int] = []

    def greedy(
        self,
        cross: Any,
        prompt: Sequence[int],
        eos: int,
        max_new: int,
        processors: Sequence[LogitsProcessor] = (),
        on_first_logits: Callable[[np.ndarray], None] | None = None,
        reference: Sequence[int] = (),
    ) -> Hypothesis:
        """`Seq2Seq.greedy` (same arguments), drafting from ``reference`` and the tokens so far."""
        self._prompt = list(prompt)
        self._reference = [*self._prompt[-self.ngram :], *reference] if reference else []
        return super().greedy(cross, prompt, eos, max_new, processors, on_first_logits)

    def _start(
        self, cross: Any, prompt: Sequence[int], max_new: int, processors: Sequence[LogitsProcessor]
    ) -> Callable[[int], np.ndarray] | None:
        """A short prompt and the drafts after it in one pass (as decode rows): the first round costs no
        pass of its own. From an empty cache those rows' logits are the prefill's bit for bit
        (`tests/test_whisper_speculative.py`), so the tokens stay plain greedy decoding's."""
        m, layers = self.model, self.layers
        # No more rows than a round's pass (k drafts and the pending token): the build's row tiles are
        # sized for it (7 on AVX-512), and an 8th row costs a tile of its own (0.2 decode steps; the
        # replay of the bench's streaming decodes: 1.43x -> 1.45x with k = 6).
        k = min(
            self.k, m.max_length - len(prompt) - 1, max_new - 1, layers.rows - len(prompt), self.k + 1 - len(prompt)
        )
        if not self._reference or k < 1 or (self.gate is not None and not self.gate.draft_now()):
            return None
        drafts, _ = lookup_drafts(self._reference, self._prompt, k, self.ngram, self.wildcard_from, self.special_from)
        if not drafts:
            return None

        def start(seq: int) -> np.ndarray:
            self.prompt_rounds += 1
            full = layers.forward(seq, [*prompt, *drafts], cross, list(range(layers.num_layers)))
            return accept(layers, seq, full[len(prompt) - 1 :], drafts, 0, [], processors, self.stats)

        return start

    def _advance(self, cross: Any, max_new: int, processors: Sequence[LogitsProcessor]) -> Advance:
        """Rounds for `Seq2Seq.greedy`: look k tokens up, verify them in one full-decoder pass."""
        m, gate = self.model, self.gate

        def advance(seq: int, token: int, step: int, tokens: list[int]) -> np.ndarray:
            # The cache holds everything but ``token``; a round appends it and its drafts.
            k = min(self.k, m.max_length - m.cache.lengths[seq] - 1, max_new - 1 - step)
            drafts: list[int] = []
            # The gate compares this thread's CPU time (the decoder runs on it, at one thread wholly): on a
            # busy machine wall-clock steps vary with other processes' turns and paused drafting that paid.
            t = time.thread_time()
            if k >= 1 and (gate is None or gate.draft_now()):
                context = self._prompt + tokens
                drafts, _ = lookup_drafts(
                    self._reference, context, k, self.ngram, self.wildcard_from, self.special_from
                )
            if drafts:
                rows = verify(self.layers, seq, token, drafts, cross, step, tokens, processors, self.stats)
            else:
                rows = m.step([seq], [token], cross)
                self.stats.plain_steps += 1
            if gate is not None:
                gate.record(bool(drafts), time.thread_time() - t, len(rows))
            return rows

        return advance


# Measured skip sets by decoder depth (acceptance with k=4 on espeak-ng speech, 3 sentences, not
# the test audio; skipping layer 0 / 1 / 2 / 3 of tiny.en: 0.04 / 0.49 / 0.31 / 0.23).
MEASURED_SKIP = {4: [1]}


SEQ2SEQ_FORMS = "self:k=N[,skip=...|,exit=N] or lookup[:k=N,ngram=N]"


def parse_seq2seq_speculative(
    spec: str, model: Seq2Seq, wildcard_from: int | None = None, special_from: int | None = None
) -> SelfSpeculativeDecoder | LookupSeq2Seq:
    """A decoder from ``self:k=4``, ``self:k=4,skip=2``, ``self:k=3,exit=2`` (first 2 decoder layers + head)
    or ``lookup:k=6,ngram=3`` (``wildcard_from``, ``special_from``: the first timestamp and special token,
    see `lookup_drafts`).

    Without ``skip`` or ``exit`` the draft skips `MEASURED_SKIP`'s layers (layer 1 of tiny.en's 4),
    else `default_skip`'s.
    """
    kind, _, rest = spec.partition(":")
    if kind == "lookup":
        options = parse_draft_options(rest, spec, OPTIONS["lookup"])
        k, ngram = (parse_layer_set(options.get(key, str(default)), spec) for key, default in (("k", 6), ("ngram", 3)))
        if len(k) != 1 or len(ngram) != 1:
            raise EdgertError(f"--speculative '{spec}': k and ngram are single integers")
        try:
            return LookupSeq2Seq(model, k[0], ngram[0], wildcard_from, special_from)
        except EdgertError as exc:
            raise EdgertError(f"--speculative '{spec}': {exc}") from exc
    if kind != "self":
        raise EdgertError(f"--speculative '{spec}': an encoder-decoder drafts by itself or by lookup: {SEQ2SEQ_FORMS}")
    options = parse_draft_options(rest, spec)
    n = int(model.artifact.manifest["model"]["num_layers"])
    k = parse_layer_set(options.get("k", "4"), spec)
    if len(k) != 1:
        raise EdgertError(f"--speculative '{spec}': k must be one integer")
    if "exit" in options:
        depth = parse_layer_set(options["exit"], spec)
        if len(depth) != 1 or not 1 <= depth[0] < n:
            raise EdgertError(f"--speculative '{spec}': exit must be one layer count in 1..{n - 1}")
        layers = list(range(depth[0]))
    else:
        skip = set(
            parse_layer_set(options["skip"], spec) if "skip" in options else MEASURED_SKIP.get(n, default_skip(n))
        )
        layers = [i for i in range(n) if i not in skip]
    return SelfSpeculativeDecoder(model, layers, k[0])


class EarlyExitSeq2Seq(GreedyVariant):
    """Greedy decoding of a `Seq2Seq` where each decoded token runs the decoder layers an `ExitPolicy` picks.

    The prompt runs the full decoder; a token that exits after layer e writes the KV of layers
    e.. by copy-forward (``kv_fill_<i>``) so later tokens attend to it at every layer. The
    policy sees the exit head's logits after Whisper's rules masked them.
    """

    def __init__(self, model: Seq2Seq, policy: ExitPolicy):
        self.layers = DecoderLayers(model)
        n = self.layers.num_layers
        self.model, self.policy = model, policy
        stored = model.artifact.manifest.get("exits", {}).get("layers")
        self.exit_points = policy.exits(stored or list(range(1, n)), n)
        self.depths: list[int] = []

    @property
    def mean_layers(self) -> float:
        """Mean decoder layers per decoded token."""
        return float(np.mean(self.depths)) if self.depths else float(self.layers.num_layers)

    def stats(self) -> dict[str, float | int | str]:
        """Policy, depth and mean layers per token (JSON output)."""
        return {
            "policy": self.policy.name,
            "num_layers": self.layers.num_layers,
            "tokens": len(self.depths),
            "mean_layers": round(self.mean_layers, 3),
        }

    def _step(self, seq: int, token: int, cross: Any, step: int, tokens: list[int], processors: Sequence) -> np.ndarray:
        m, layers = self.model, self.layers

        def masked(logits: np.ndarray) -> np.ndarray:  # the policy sees the logits Whisper's rules leave
            return apply_processors(processors, step, logits.copy(), tokens)

        h = layers.embed(seq, [token])
        m.cache.begin([seq], [1])
        logits, depth, _ = exit_pass(
            layers, self.policy, self.exit_points, h, lambda h, r: layers.run(h, cross, r), masked
        )
        m.cache.end()
        self.depths.append(depth)
        return logits

    def _advance(self, cross: Any, max_new: int, processors: Sequence[LogitsProcessor]) -> Advance:
        """Steps for `Seq2Seq.greedy`: the policy chooses each decoded token's depth."""

        def advance(seq: int, token: int, step: int, tokens: list[int]) -> np.ndarray:
            return self._step(seq, token, cross, step, tokens, processors)[None]

        return advance
