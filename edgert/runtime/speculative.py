"""Lossless speculative decoding: draft k tokens cheaply, verify them in one full pass.

A drafter proposes k tokens: `SelfDrafter` runs a subset of the model's own layers (a
layer-skipping sub-model, or the first layers and an exit head) over the same KV cache;
`ModelDrafter` runs a second, smaller build of the model (a Q4 build drafting for the f32
one); `LookupDrafter` copies what followed the longest earlier match of the context's suffix
(prompt lookup) and `RecycleDrafter` follows, where lookup finds nothing, an adjacency table of
the tokens the model itself ranked first after each token in earlier steps (Token Recycling):
those two cost nothing to draft, but a verify pass does, so `DraftPolicy` verifies only as many
of their drafts as are expected to pay (acceptance learnt per match length, pass costs timed)
and takes a plain step otherwise. The full model then scores the pending token and the k
drafts in one ``verify`` pass; the agreeing prefix is kept and the rest rolled back (``popn``).
Recycle drafts a token tree where the build verifies trees (`DraftTree`, `Generator.step_tree`):
lookup's copy first, the table's and the context's other choices as branches, the longest path
the full model agrees with kept. Greedy output is the full model's token for token; with
sampling the standard rule (accept draft d with probability min(1, p(d)/q(d)), else resample from
max(0, p - q)) keeps the full model's distribution; a deterministic draft (lookup, recycle) has
q = 1 on its token, so it is kept with probability p(d) and a rejection resamples from p without
d (in a tree, sibling after sibling).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
    wasted: int = 0  # verify passes that kept no draft
    verify_seconds: float = 0.0  # time in verify passes
    plain_seconds: float = 0.0  # time in plain steps
    passes: dict[int, int] = field(default_factory=dict)  # verify passes by row count (drafts + 1)
    trees: int = 0  # of those, passes over a token tree (the rest verified a chain)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def count_round(self, drafted: int, accepted: int) -> None:
        """Record one round: ``drafted`` tokens proposed, the first ``accepted`` of them kept."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.wasted += accepted == 0
        self.passes[drafted + 1] = self.passes.get(drafted + 1, 0) + 1

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON output."""
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "plain_steps": self.plain_steps,
            "wasted_verifies": self.wasted,
            "verify_seconds": round(self.verify_seconds, 4),
            "plain_seconds": round(self.plain_seconds, 4),
            "passes": dict(sorted(self.passes.items())),
            "tree_passes": self.trees,
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


@dataclass
class Candidate:
    """What a cheap drafter could copy: up to ``tokens`` (longest first); ``keys[j]`` names the
    acceptance statistic of draft j (`DraftPolicy`), e.g. the match length it would extend."""

    tokens: list[int]
    keys: list[tuple[Any, ...]]


class LookupDrafter:
    """Prompt lookup: what followed the latest earlier occurrence of the context's longest
    suffix that occurs earlier (at least ``ngram`` tokens, up to ``max_match``).

    `candidate` gives the whole continuation with, per token, the match it would extend (a
    longer match is likelier to hold: SmolLM2 on the grounded suite keeps about 0.3 of the
    drafts after a 1-token match and 0.97 after 12 tokens), so `DraftPolicy` decides how many
    rows to verify; `propose` drafts ``k`` of them outright.
    """

    note = ""

    def __init__(self, ngram: int = 1, max_match: int = 64):
        self.ngram, self.max_match = ngram, max_match
        self._index_source: list[int] | None = None  # the list `_indexed` indexed last, and its index
        self._index: dict[int, list[int]] = {}
        self._indexed_n = 0
        self._index_ends: tuple[int, int] = (0, 0)
        # Where the copies come from (`candidate`): the history's length and the copy's start at the last
        # candidate, and the place the copy that held last would go on from (None: none held yet).
        self._last: tuple[int, int] | None = None
        self._near: int | None = None

    def _indexed(self, context: Sequence[int] | np.ndarray) -> tuple[list[int], dict[int, list[int]]]:
        """``context`` as a list of ints and where each id occurs in it (ascending). The decoder's history
        is one list that only grows, so its index is kept and only the new ids are added: a round then
        looks up its suffix's occurrences instead of scanning the history (plain ints: the sets are small,
        and numpy calls on tiny arrays cost more than the work between passes, caches cold). A list
        changed elsewhere is indexed afresh where its ends show it; a missed change could only spoil
        drafts, which the verifier checks."""
        if not isinstance(context, list):
            seq = context.tolist() if isinstance(context, np.ndarray) else [int(t) for t in context]
            return seq, _positions(seq, {}, 0)
        n, have = len(context), self._indexed_n
        if not (
            context is self._index_source
            and 0 < have <= n
            and context[have - 1] == self._index_ends[1]
            and context[0] == self._index_ends[0]
        ):
            self._index_source, self._index, have = context, {}, 0
            self._last = self._near = None  # another history: its copies start afresh
        if n > have:
            _positions(context, self._index, have)
            self._indexed_n, self._index_ends = n, (context[0], context[n - 1])
        return context, self._index

    def match(self, context: Sequence[int] | np.ndarray, near: int | None = None) -> tuple[int, int, bool] | None:
        """(start of the continuation, match length, whether every occurrence of that length is
        followed by the same token), or None where the suffix (``ngram`` tokens) occurs nowhere earlier.
        Of several occurrences of the longest match, the latest; with ``near``, the first whose
        continuation starts at or after ``near`` (where there is one)."""
        seq, index = self._indexed(context)
        levels = self._levels(seq, index.get(seq[-1], ()) if seq else ())
        if not levels or levels[-1][0] < self.ngram:
            return None
        n, ends = levels[-1]
        end = ends[-1]
        if near is not None and len(ends) > 1:
            end = next((e for e in ends if e + 1 >= near), end)
        follow = seq[end + 1]
        return end + 1, n, all(seq[e + 1] == follow for e in ends)

    def _follow(self, context: Sequence[int] | np.ndarray) -> int | None:
        """Where the source of the copy that held last goes on: the last candidate's start moved on by
        how many of its tokens the history took since (checked on the history itself, so plain steps
        and passes alike count). An output that copies from its input goes through it in order, so of
        several earlier occurrences of a short match, the one at or after this place is likelier to
        continue than the latest (SmolLM2, grounded suite, replayed: lookup 1.348x -> 1.374x)."""
        last = self._last
        if last is None or context is not self._index_source:
            return None
        size, start = last
        n = len(context)
        if n > size:
            took = 0
            while size + took < n and context[size + took] == context[start + took]:
                took += 1
            if took:
                self._near = start + took
        return self._near

    def _levels(self, seq: Sequence[int], where: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(n, where the earlier occurrences of the sequence's last n tokens end) for n = 1, 2, ... while
        there are any (up to ``max_match``); ``where``: the positions of its last token (the last
        position itself may be among them). Where one occurrence is left, the levels it alone holds
        collapse into the longest (a copy of the input matches for dozens of tokens)."""
        size = len(seq)
        if size < 2:
            return []
        last = size - 1
        ends = [e for e in where if e < last] if where and where[-1] >= last else list(where)
        levels: list[tuple[int, list[int]]] = []
        n = 1
        while ends:
            if len(ends) == 1 and n < self.max_match:
                end = ends[0]
                more = min(self.max_match - n, end - n + 1)  # comparisons left before either runs out
                j = 0
                while j < more and seq[end - n - j] == seq[last - n - j]:
                    j += 1
                n += j
                levels.append((n, ends))
                break
            levels.append((n, ends))
            if n >= self.max_match:
                break
            want = seq[last - n]
            ends, n = [e for e in ends if e >= n and seq[e - n] == want], n + 1
        return levels

    def candidate(self, context: Sequence[int], limit: int = 16) -> Candidate | None:
        """The continuation of the longest match (up to ``limit`` tokens), or None."""
        found = self.match(context, self._follow(context))
        if found is None:
            return None
        start, n, unique = found
        if context is self._index_source:
            self._last = (len(context), start)
        tokens = context[start : start + limit]
        tokens = tokens.tolist() if isinstance(tokens, np.ndarray) else [int(t) for t in tokens]
        while len(tokens) < limit:  # the copy reached the end of the context: it goes on copying itself (a loop)
            tokens.append(tokens[len(tokens) - (len(context) - start)])
        # Draft j, if the ones before it hold, extends the match to n + j tokens (the keys of a match
        # length are the same every round: built once, shared, never changed).
        keys = _LOOKUP_KEYS.get((n, unique, len(tokens)))
        if keys is None:
            keys = [("lookup", min(n + j, 12), unique or n + j >= 4) for j in range(len(tokens))]
            if len(_LOOKUP_KEYS) < 4096:
                _LOOKUP_KEYS[n, unique, len(tokens)] = keys
        return Candidate(tokens, keys)

    def branches(
        self, context: Sequence[int] | np.ndarray, exclude: set[int], count: int = 2, depth: int = 3
    ) -> list[Candidate]:
        """Other copies: what followed the other earlier occurrences of the context's suffix (longest
        matches first, the latest first among equals), one per next token not in ``exclude``, up to
        ``count``, each ``depth`` tokens long; keyed by the length of their match."""
        seq, index = self._indexed(context)
        return self._branches(seq, index.get(seq[-1], ()) if seq else (), exclude, count, depth)

    def _branches(
        self, seq: Sequence[int], where: Sequence[int], exclude: set[int], count: int = 2, depth: int = 3
    ) -> list[Candidate]:
        """`branches` of ``seq`` whose last token occurs at ``where``."""
        out: list[Candidate] = []
        seen = set(exclude)
        looked = 0  # occurrences of the longer matches, all looked at (a shorter match's include them)
        for n, ends in reversed(self._levels(seq, where)):
            if len(ends) == looked:
                continue
            looked = len(ends)
            for end in reversed(ends):
                token = seq[end + 1]
                if token in seen:
                    continue
                seen.add(token)
                tokens = [int(t) for t in seq[end + 1 : end + 1 + depth]]
                out.append(
                    Candidate(tokens, [("branch", min(n, 4))] + [("branch-next", j) for j in range(1, len(tokens))])
                )
                if len(out) == count:
                    return out
        return out

    def extended_branches(
        self, context: list[int], tail: Sequence[int], exclude: set[int], count: int = 2, depth: int = 3
    ) -> list[Candidate]:
        """`branches` of ``context + tail`` (as if the drafts ``tail`` held), from the context's index."""
        if not tail:
            return self.branches(context, exclude, count, depth)
        seq, index = self._indexed(context)
        last = tail[-1]
        where = list(index.get(last, ()))
        base = len(seq)
        where += [base + j for j, t in enumerate(tail) if t == last]
        if seq is not context:
            return self._branches(seq + list(tail), where, exclude, count, depth)
        # The tail appended to the context for the search and taken off again: a copy of the history
        # each time cost more than the search (the index is not touched meanwhile).
        context.extend(tail)
        try:
            return self._branches(context, where, exclude, count, depth)
        finally:
            del context[base:]

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray | None]]:
        """Up to ``k`` tokens copied from the context (deterministic drafts: no logits)."""
        found = self.candidate(context, k)
        drafts = found.tokens if found is not None else []
        return drafts, [None] * len(drafts)


_LOOKUP_KEYS: dict[tuple[int, bool, int], list[tuple[Any, ...]]] = {}  # `LookupDrafter.candidate`'s keys


def _positions(seq: Sequence[int], index: dict[int, list[int]], start: int) -> dict[int, list[int]]:
    """Add where ``seq[start:]``'s ids occur to ``index`` (id -> ascending positions)."""
    for i in range(start, len(seq)):
        t = seq[i]
        at = index.get(t)
        if at is None:
            index[t] = [i]
        else:
            at.append(i)
    return index


@dataclass
class DraftTree:
    """Drafts as a tree below the pending token: node i is ``tokens[i]``, a child of node ``parents[i]``
    (-1: of the pending token), ``keys[i]`` its acceptance statistic (`DraftPolicy`). Parents come
    before their children; the main branch (lookup's copy or the table's chain) comes first, so when
    it holds its keys and values are already where the cache keeps them."""

    tokens: list[int]
    parents: list[int]
    keys: list[tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        """True when every node is the child of the one before (a chain verifies as decode rows)."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def subtree(self, nodes: Sequence[int]) -> DraftTree:
        """The tree of ``nodes`` (indices closed under parents), in their order."""
        where = {n: i for i, n in enumerate(sorted(nodes))}
        picked = sorted(nodes)
        return DraftTree(
            [self.tokens[n] for n in picked],
            [where[self.parents[n]] if self.parents[n] >= 0 else -1 for n in picked],
            [self.keys[n] for n in picked],
        )


class RecycleDrafter:
    """Token Recycling: a table of the ``width`` tokens the full model ranked first after each token,
    filled from the logits of every step and verify pass (kept across generations), drafts where
    prompt lookup (`LookupDrafter`, tried first: a copy of the input holds longer) finds nothing.

    `tree` grows a draft tree: the main branch (lookup's copy, else the table's first choices) and,
    below the pending token and each main node, the context's other copies and the table's other
    choices, each followed by its own first choices; `DraftPolicy.choose_tree` keeps the nodes that
    pay and the build verifies them in one pass with a tree attention mask (`Generator.step_tree`).
    The decoder calls `best_tree`, which builds only the nodes that choice could keep.
    A build without that entry (or ``width`` 1) verifies the main branch only, as a chain.
    """

    note = ""

    def __init__(self, vocab_size: int, lookup: LookupDrafter | None = None, width: int = 3, depth: int = 2):
        # One row past the vocabulary, all -1: indexing with -1 ("nothing known") lands there, so a
        # chain through the table is one fancy index a level, no masks.
        self._table = np.full((vocab_size + 1, width), -1, dtype=np.int64)
        self.table = self._table[:vocab_size]  # a view: what `observe` writes and callers read
        # The same memory read one entry at a time as plain ints (a numpy scalar index costs 5x more):
        # drafting reads a few dozen entries a round.
        self._entries = memoryview(self._table)
        self.lookup, self.width, self.depth = lookup, width, depth

    def observe(
        self, tokens: Sequence[int], logits: np.ndarray, first: np.ndarray | None = None, scratch: bool = False
    ) -> None:
        """Record the full model's first ``width`` choices after each of ``tokens`` (``logits``: [len, vocab]).

        Repeated argmaxes with the winners masked: a 49,152-wide argpartition cost 0.09 ms a row.
        ``first``: the rows' argmaxes where the caller has them already; ``scratch``: the caller is done
        with ``logits``, so the masked winners are not put back."""
        n = len(tokens)
        rows = logits.reshape(n, -1)
        if not rows.flags.writeable:
            rows, scratch = rows.copy(), True
        if n == 1 and scratch:  # a plain step's row: scalar masks, no index arrays (half the numpy calls)
            row, picked = rows[0], []
            for r in range(self.width):
                best = int(first[0]) if r == 0 and first is not None else int(row.argmax())
                picked.append(best)
                row[best] = -np.inf
            self.table[tokens[0]] = picked
            return
        index = np.arange(n)
        top = np.empty((n, self.width), dtype=np.int64)
        saved = []
        for r in range(self.width):
            top[:, r] = first if r == 0 and first is not None else np.argmax(rows, axis=-1)
            if r + 1 < self.width:
                if not scratch:
                    saved.append(rows[index, top[:, r]].copy())
                rows[index, top[:, r]] = -np.inf
        for r, values in enumerate(saved):  # the caller's logits as they were
            rows[index, top[:, r]] = values
        self.table[tokens] = top

    def chain(self, token: int, k: int) -> list[int]:
        """Follow the table's first choices from ``token`` for up to ``k`` tokens."""
        drafts: list[int] = []
        entries = self._entries
        for _ in range(k):
            token = entries[token, 0]
            if token < 0:
                break
            drafts.append(token)
        return drafts

    def candidate(self, context: Sequence[int], limit: int = 16) -> Candidate | None:
        """The lookup continuation where there is one, else the table's chain (or None)."""
        found = self.lookup.candidate(context, limit) if self.lookup is not None else None
        if found is not None:
            return found
        tokens = self.chain(int(context[-1]), limit)
        return Candidate(tokens, [("table", min(j, 3)) for j in range(len(tokens))]) if tokens else None

    def tree(self, context: Sequence[int], limit: int = 16) -> DraftTree | None:
        """The candidate tree: the main branch (`candidate`, up to ``limit``) first; then below the
        pending token and each main node, lookup's other copies (`LookupDrafter.branches`: what
        followed other occurrences of the suffix, for the first three places) and the table's other
        choices (keyed by their rank), each followed by up to ``depth`` first choices. None where
        there is nothing to draft. The decoder builds only the nodes a policy could keep (`best_tree`).
        """
        found = self.candidate(context, limit)
        if found is None:  # no main branch: nothing to copy and the table knows nothing after the pending token
            return None
        main = found.tokens
        tokens, parents, keys = list(main), list(range(-1, len(main) - 1)), list(found.keys)
        lookup = self.lookup
        history = context if isinstance(context, list) else [int(t) for t in context]
        # The table's rows after every place of the main branch and their alternatives' chains, a few
        # numpy calls for the whole tree (a row or a chain link at a time cost more than the rest).
        table, width = self._table, self.width
        alts = table[[int(context[-1]), *main[:-1]]]  # below the pending token and main[:-1]
        links, level = [], alts.reshape(-1)
        for _ in range(self.depth):  # the first choice after each, -1 past the table's end (the -1 row)
            level = table[level, 0]
            links.append(level.tolist())
        second = [("table", min(j + 1, 3)) for j in range(self.depth)]
        for at, row in enumerate(alts.tolist(), -1):
            offered = {main[at + 1]}
            if lookup is not None and at < 2:  # other copies from the context, as if the drafts before held
                for branch in lookup.extended_branches(history, main[: at + 1], offered):
                    offered.add(branch.tokens[0])
                    for j, (token, key) in enumerate(zip(branch.tokens, branch.keys, strict=True)):
                        tokens.append(token)
                        parents.append(at if j == 0 else len(tokens) - 2)
                        keys.append(key)
            for rank, alt in enumerate(row):
                if alt < 0 or alt in offered:
                    continue
                tokens.append(alt)
                parents.append(at)
                keys.append(("alt", rank))
                flat = (at + 1) * width + rank
                for j, link in enumerate(links):
                    token = link[flat]
                    if token < 0:
                        break
                    tokens.append(token)
                    parents.append(len(tokens) - 2)
                    keys.append(second[j])
        return DraftTree(tokens, parents, keys)

    def best_tree(self, context: Sequence[int], limit: int, policy: DraftPolicy) -> DraftTree | None:
        """``policy.choose_tree(self.tree(context, limit, policy.acceptance), limit)`` node for node, built
        with only the nodes that can be chosen: nodes join in the tree's order, and one with ``limit``
        nodes before it at least as likely (they rank first: likeliest first, the earlier among equals)
        is left out with what would hang below it (a child is never likelier than its parent). The
        chances are computed once, for both. None where there is nothing to draft."""
        found = self.candidate(context, limit)
        if found is None:
            return None
        accept = policy.acceptance
        main = found.tokens
        tokens, parents, keys = list(main), list(range(-1, len(main) - 1)), list(found.keys)
        chance, along = [], 1.0
        for key in keys:
            along = accept(key) * along
            chance.append(along)
        top = chance[:limit]  # the ``limit`` likeliest chances so far (a min-heap once full)
        heapq.heapify(top)
        full = len(top) >= limit
        first = [("alt", rank) for rank in range(self.width)] + [("branch", n) for n in range(1, 5)]
        best = max(accept(key) for key in first)  # no other choice below a place is likelier than this
        places = len(main)
        if full:  # the places below which something could still be chosen (as `tree` stops)
            places = next((i for i in range(places) if top[0] >= best * (chance[i - 1] if i else 1.0)), places)
        lookup, ranks = self.lookup, range(self.width)
        history = context if isinstance(context, list) else [int(t) for t in context]
        entries = self._entries  # the table's rows and chains, read entry by entry as places are reached
        second = [("table", min(j + 1, 3)) for j in range(self.depth)]

        def add(token: int, parent: int, key: tuple[Any, ...]) -> bool:
            """Join a node unless ``limit`` nodes before it are at least as likely."""
            nonlocal full
            c = accept(key) * (chance[parent] if parent >= 0 else 1.0)
            if full and c <= top[0]:
                return False
            tokens.append(token)
            parents.append(parent)
            keys.append(key)
            chance.append(c)
            if full:
                heapq.heapreplace(top, c)
            else:
                heapq.heappush(top, c)
                full = len(top) >= limit
            return True

        for at in range(-1, places - 1):
            if full and top[0] >= best * (chance[at] if at >= 0 else 1.0):
                break  # nothing below this place or the later ones could be chosen
            after = int(context[-1]) if at < 0 else main[at]
            offered = {main[at + 1]}
            if lookup is not None and at < 2:
                for branch in lookup.extended_branches(history, main[: at + 1], offered):
                    offered.add(branch.tokens[0])
                    parent = at
                    for token, key in zip(branch.tokens, branch.keys, strict=True):
                        if not add(token, parent, key):
                            break
                        parent = len(tokens) - 1
            for rank in ranks:
                alt = entries[after, rank]
                if alt < 0 or alt in offered or not add(alt, at, ("alt", rank)):
                    continue
                token = alt
                for key in second:  # the first choices after it, up to ``depth``
                    token = entries[token, 0]
                    if token < 0 or not add(token, len(tokens) - 1, key):
                        break
        return policy.choose_nodes(DraftTree(tokens, parents, keys), chance, limit)

    def propose(self, context: Sequence[int], k: int, pick: Pick) -> tuple[list[int], list[np.ndarray | None]]:
        """Up to ``k`` tokens: the lookup continuation, else the table's chain (deterministic drafts)."""
        found = self.candidate(context, k)
        drafts = found.tokens if found is not None else []
        return drafts, [None] * len(drafts)


# How often the full model keeps a draft, before this decoder has seen any: SmolLM2 on the project's
# grounded and open suites (tools/peers/speculative.py), by the length of the lookup match the draft
# extends and whether every earlier occurrence of the match went on alike; table chains by position.
PRIOR_ACCEPTANCE = {1: 0.3, 2: 0.55, 3: 0.62, 4: 0.75, 5: 0.85}
ALT_PRIOR = {0: 0.15, 1: 0.06, 2: 0.05}  # SmolLM2, breadth-first trees: 0.03-0.19, 0.02-0.06, 0.03-0.08


def prior_acceptance(key: tuple[Any, ...]) -> float:
    """The acceptance `DraftPolicy` assumes for a key it has no counts for."""
    if key[0] == "table":
        return 0.3
    if key[0] == "alt":  # the table's choice of that rank where the main branch has another token
        return ALT_PRIOR.get(key[1], 0.05)
    if key[0] == "branch":  # another earlier occurrence's next token, by the length of its match
        return 0.1 if key[1] == 1 else 0.3  # SmolLM2, breadth-first trees on both suites: 0.07-0.13, 0.33-0.5
    if key[0] == "branch-next":  # the copy goes on after a kept branch token
        return 0.5
    _, n, unique = key
    a = PRIOR_ACCEPTANCE.get(n, 0.88 if n < 12 else 0.97)
    return a if unique else a / 2


class DraftPolicy:
    """How many drafts to verify, so that each verify pays: the expected tokens a pass over L + 1
    rows yields over what it costs in decode steps, against 1 for a plain step.

    A draft j is kept, when the ones before it were, with the acceptance of its key (counts of
    earlier rounds, starting from `prior_acceptance` weighted as ``prior_weight`` rounds); a pass
    yields 1 + sum_j prod_{i<=j} a_i tokens. What a pass over n rows costs is timed here: the
    fastest of the last few passes of n rows over the fastest of the last few plain steps (the
    fastest, so a pass that lost its core to another process does not count against n). Row counts
    not timed yet are assumed to cost ``1 + prior_slope * (n - 1)`` steps, so the policy tries
    them and then keeps to what pays (the multi-row kernels cost steps, not a line: today 5 rows
    1.9 steps and 9 rows 4.4 on SmolLM2's int8 build).
    """

    def __init__(
        self, max_rows: int, prior_weight: float = 8.0, prior_slope: float = 0.2, window: int = 8, max_tree: int = 0
    ):
        self.max_rows, self.prior_weight, self.prior_slope = max_rows, prior_weight, prior_slope
        self.max_tree = max_tree  # the most nodes of a tree pass (0: the build verifies chains only)
        self.counts: dict[tuple[Any, ...], list[float]] = {}  # key -> [drafts tried, kept]
        self.times: dict[int, deque[float]] = {}  # rows -> seconds of the last passes (chains and trees)
        self.window = window
        # What a round asks for many times (a tree of a hundred nodes, up to 16 row counts), kept until
        # `time` or `record` changes it: Python between passes runs with cold caches on this machine.
        self._costs: list[float] = []  # `cost` by row count
        self._accepted: dict[tuple[Any, ...], float] = {}  # `acceptance` by key

    def acceptance(self, key: tuple[Any, ...]) -> float:
        """The chance a draft of this key is kept (when the drafts before it were)."""
        known = self._accepted.get(key)
        if known is None:
            tried, kept = self.counts.get(key, (0.0, 0.0))
            known = self._accepted[key] = (kept + self.prior_weight * prior_acceptance(key)) / (
                tried + self.prior_weight
            )
        return known

    def cost(self, rows: int) -> float:
        """A pass over ``rows`` rows in decode steps (a tree of that many nodes runs the same entries):
        timed, else the prior but never below what fewer rows were timed at; and never above what
        more rows were timed at (more rows do not cost less, so one unlucky pass of a few rows does
        not rule them out for good)."""
        if rows >= len(self._costs):
            self._costs = self._cost_table(max(rows, self.max_rows, self.max_tree, 16))
        return self._costs[rows]

    def _cost_table(self, upto: int) -> list[float]:
        """`cost` of 0..``upto`` rows, from one look at the timings."""
        slope = self.prior_slope
        prior = [1.0 + slope * max(rows - 1, 0) for rows in range(upto + 1)]
        plain = self.times.get(1)
        if not plain:
            return prior
        step = min(plain)
        timed = {n: min(t) / step for n, t in self.times.items() if n > 1 and t}
        size = max(upto, *timed) + 1 if timed else upto + 1
        below, run = [], -np.inf  # the most that fewer rows were timed at
        for n in range(size):
            below.append(run)
            run = max(run, timed.get(n, -np.inf))
        above, run = [np.inf] * size, np.inf  # the least that more rows were timed at
        for n in range(size - 1, -1, -1):
            above[n] = run
            run = min(run, timed.get(n, np.inf))
        table = prior[:2]
        for rows in range(2, upto + 1):
            own = timed[rows] if rows in timed else max(prior[rows], below[rows])
            table.append(max(min(own, above[rows]), 1.0))
        return table

    @property
    def ready(self) -> bool:
        """False until a plain step has been timed (costs are measured against it)."""
        return bool(self.times.get(1))

    def choose(self, candidate: Candidate, k: int) -> int:
        """How many of the candidate's drafts to verify (0: a plain step pays more)."""
        best, length = 1.0, 0
        expected = kept = 1.0
        n = min(k, len(candidate.tokens), self.max_rows - 1)
        if n <= 0:
            return 0
        self.cost(n + 1)  # the table, once
        costs, known, acceptance = self._costs, self._accepted, self.acceptance
        for j, key in enumerate(candidate.keys[:n]):
            a = known.get(key)
            kept *= acceptance(key) if a is None else a
            expected += kept
            gain = expected / costs[j + 2]
            if gain > best:
                best, length = gain, j + 1
        return length

    def choose_tree(self, tree: DraftTree, k: int) -> DraftTree:
        """The nodes of ``tree`` worth verifying (up to ``k`` and the build's tree size), as a tree:
        node i is kept, when its parent was, with the acceptance of its key, so a pass yields 1 +
        the sum over its nodes of their paths' chances; nodes join likeliest first (a parent is never
        less likely than its child), and the count that yields most per decode step of the pass wins.
        Empty: a plain step pays more."""
        chance: list[float] = []
        acceptance = self.acceptance
        for key, parent in zip(tree.keys, tree.parents, strict=True):
            chance.append(acceptance(key) * (chance[parent] if parent >= 0 else 1.0))
        return self.choose_nodes(tree, chance, k)

    def choose_nodes(self, tree: DraftTree, chance: Sequence[float], k: int) -> DraftTree:
        """`choose_tree` with the nodes' chances given."""
        limit = min(k, self.max_tree - 1)
        # Likeliest first, the earlier node among equals (a stable sort of the negated chances).
        order = sorted(range(len(chance)), key=lambda i: -chance[i])[: max(limit, 0)]
        best, length, expected = 1.0, 0, 1.0
        self.cost(len(order) + 1)  # the table, once
        costs = self._costs
        for j, node in enumerate(order):
            expected += chance[node]
            gain = expected / costs[j + 2]
            if gain > best:
                best, length = gain, j + 1
        return tree.subtree(order[:length])

    def record_tree(self, tree: DraftTree, path: Sequence[int]) -> None:
        """Count a tree round: every node whose parent was kept was tried; those on ``path`` (the kept
        nodes, root first) were kept."""
        kept = set(path)
        for node, (key, parent) in enumerate(zip(tree.keys, tree.parents, strict=True)):
            if parent < 0 or parent in kept:
                counts = self.counts.setdefault(key, [0.0, 0.0])
                counts[0] += 1
                counts[1] += node in kept
                self._accepted.pop(key, None)

    def record(self, keys: Sequence[tuple[Any, ...]], accepted: int) -> None:
        """Count a round: the drafts of ``keys`` were tried in order, the first ``accepted`` kept."""
        for j, key in enumerate(keys[: accepted + 1]):
            counts = self.counts.setdefault(key, [0.0, 0.0])
            counts[0] += 1
            counts[1] += j < accepted
            self._accepted.pop(key, None)

    def time(self, rows: int, seconds: float) -> None:
        """Record how long a pass over ``rows`` rows (1: a plain step) took."""
        times = self.times.get(rows)
        if times is None:
            times = self.times[rows] = deque(maxlen=self.window)
        fastest = min(times) if times else None
        times.append(seconds)
        if fastest is None or min(times) != fastest:  # the costs read the fastest of each row count only
            self._costs = []


def default_skip(num_layers: int) -> list[int]:
    """Layers a draft skips without calibration: every other layer of the middle half."""
    return list(range(num_layers // 4 + 1, num_layers - num_layers // 4, 2))


# lookup and recycle: the most drafts a pass may take (a verify pass runs up to 16 decode rows);
# `DraftPolicy` picks how many of them each round verifies.
DEFAULT_K = {"self": 4, "model": 4, "lookup": 15, "recycle": 15}
OPTIONS = {"self": {"k", "skip", "exit"}, "model": {"k"}, "lookup": {"k", "ngram"}, "recycle": {"k", "tree"}}
SPEC_FORMS = "self:k=N[,skip=...|,exit=N], model:PATH[:k=N], lookup[:k=N,ngram=N] or recycle[:k=N,tree=0|1]"


def parse_speculative(spec: str, model: Generator, load_draft: Callable[[str], Generator]) -> tuple[object, int]:
    """A drafter and k from ``self:k=4``, ``self:k=4,skip=3-9,12``, ``self:k=3,exit=16``,
    ``model:PATH:k=4``, ``lookup:k=15,ngram=1`` or ``recycle:k=15,tree=1`` (for these two ``k`` bounds the
    drafts of a pass, ``ngram`` is the shortest match to copy after and ``tree=0`` drafts chains only;
    `DraftPolicy` decides the rest).

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
        ngram = _int(options.get("ngram", "1"), spec)
        if not 1 <= ngram <= 8:
            raise EdgertError(f"--speculative '{spec}': ngram must be in 1..8")
        return LookupDrafter(ngram), k
    if kind == "recycle":
        tree = options.get("tree", "1")
        if tree not in ("0", "1"):
            raise EdgertError(f"--speculative '{spec}': tree must be 0 (chains) or 1 (token trees)")
        drafter = RecycleDrafter(model.vocab_size, LookupDrafter(), width=3 if tree == "1" else 1)
        if tree == "1" and getattr(getattr(model, "cache", None), "tree", 0) <= 1:
            drafter.note = (
                "recycle: the build has no tree-verify entry (compile it again), so the best chain is drafted"
            )
        return drafter, k
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

    A drafter that offers candidates (lookup, recycle: `candidate`) drafts through a `DraftPolicy`
    (``policy``, on by default for them): each round verifies only as many drafts as are expected
    to pay, and takes a plain step where none would; what it learns carries over between
    generations. ``gate`` (off by default) pauses drafting while rounds are slower than plain steps
    (`DraftGate`). Both change the speed, never the tokens.
    """

    def __init__(
        self, model: Generator, drafter: Any, k: int = 4, gate: bool | None = None, policy: bool | None = None
    ):
        self.model, self.drafter, self.k = model, drafter, k
        self.stats = SpeculativeStats()
        cheap = hasattr(drafter, "candidate")
        self.gate = bool(gate)
        # One gate and one policy for every generation: what they learnt carries over.
        self._gate = DraftGate() if self.gate else None
        rows = getattr(getattr(model, "cache", None), "rows", 1)
        # Token trees where the drafter grows them and the build verifies them (`Generator.step_tree`).
        nodes = getattr(getattr(model, "cache", None), "tree", 0)
        self.tree = nodes if hasattr(drafter, "tree") and getattr(drafter, "width", 1) > 1 and nodes > 1 else 0
        use_policy = cheap if policy is None else policy
        self.policy = DraftPolicy(rows if rows > 1 else k + 1, max_tree=self.tree) if use_policy else None
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
            # A round emits its kept drafts and one token more: with n tokens left to emit, n - 1 drafts
            # are the most that can count (the last token left is a plain step's, not a pass's).
            k = min(self.k, room, max_tokens - stats.generated_tokens - 1)
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
        t = time.perf_counter()
        logits = self.model.step([history[-1]], view=True)
        seconds = time.perf_counter() - t
        if self.policy is not None:
            self.policy.time(1, seconds)
        self.stats.plain_steps += 1
        self.stats.plain_seconds += seconds
        token = sampler(logits, history)
        if self._observe is not None:  # after sampling: the table may mask the logits in place
            fast = self._fast(sampler)
            self._observe(history[-1:], logits, np.array([token]) if fast else None, True)
        return token

    @staticmethod
    def _fast(sampler: Sampler) -> bool:
        """Greedy without a repetition penalty: every row's token is its argmax, taken in one call."""
        params = sampler.params
        return params.greedy and params.repetition_penalty == 1.0

    def _drafts(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[Any], list[Any]]:
        """The drafts of this round, their logits (None: deterministic) and their policy keys."""
        policy = self.policy
        if policy is None:
            drafts, draft_logits = self.drafter.propose(history, k, sampler)
            return drafts[:k], draft_logits[:k], []
        if not policy.ready:  # plain steps are what a pass's cost is measured against
            return [], [], []
        found = self.drafter.candidate(history, min(k, policy.max_rows - 1))
        length = policy.choose(found, k) if found is not None else 0
        if not length:
            return [], [], []
        return found.tokens[:length], [None] * length, found.keys[:length]

    def _tree_drafts(self, history: list[int], k: int) -> DraftTree:
        """This round's draft tree (empty: a plain step): the policy's choice of the drafter's tree, or
        without a policy its k shallowest nodes."""
        policy, none = self.policy, DraftTree([], [], [])
        if policy is not None and not policy.ready:
            return none
        limit = min(k, self.tree - 1, getattr(self.model.cache, "rows", 1) - 1)
        if policy is not None and limit > 0:  # only the nodes the policy could keep are built
            return self.drafter.best_tree(history, limit, policy) or none
        found = self.drafter.tree(history, limit)
        if found is None:
            return none
        # Without a policy, breadth first: every branch below the pending token gets its chance.
        depth: list[int] = []
        for parent in found.parents:
            depth.append(depth[parent] + 1 if parent >= 0 else 0)
        return found.subtree(sorted(range(len(found)), key=lambda i: (depth[i], i))[:limit])

    def _round(self, history: list[int], k: int, sampler: Sampler, params: SamplingParams) -> list[int]:
        """Draft up to k tokens, verify them in one pass; the tokens to emit (kept drafts + one from the full model)."""
        m, stats = self.model, self.stats
        if self.tree:
            tree = self._tree_drafts(history, k)
            if not tree.is_chain:
                return self._tree_round(history, tree, sampler, params)
            drafts, draft_logits, keys = tree.tokens, [None] * len(tree), tree.keys  # a chain: decode rows
        else:
            drafts, draft_logits, keys = self._drafts(history, k, sampler)
        if not drafts:  # nothing worth verifying: a plain step
            return [self._plain(history, sampler)]
        self._drafted = True
        k = len(drafts)
        t = time.perf_counter()
        full = m.step([history[-1], *drafts], all_logits=True, view=True)
        seconds = time.perf_counter() - t
        stats.verify_seconds += seconds
        out: list[int] = []
        best = None
        fast = self._fast(sampler)
        if fast and self._observe is not None:  # the rows' argmaxes in one call (the table takes them too)
            best = np.argmax(full, axis=-1)
            targets = best.tolist()
            accepted = 0
            while accepted < k and targets[accepted] == drafts[accepted]:
                accepted += 1
            out = [*drafts[:accepted], targets[accepted]]
        elif fast:  # row by row up to the first disagreement: the rows after it are never read
            accepted = 0
            target = int(full[0].argmax())
            while accepted < k and target == drafts[accepted]:
                accepted += 1
                target = int(full[accepted].argmax())
            out = [*drafts[:accepted], target]
        for i, d in enumerate(drafts if not fast else ()):
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
            if not fast:
                out.append(sampler(full[k], history + drafts))
        if self._observe is not None:  # after the walk: the table may mask the logits in place
            self._observe([history[-1], *drafts], full, best, True)
        accepted = len(out) - 1
        stats.count_round(k, accepted)
        if self.policy is not None:
            self.policy.record(keys, accepted)
            self.policy.time(k + 1, seconds)
        m.rollback(k - accepted)  # the cache holds the pending token and k drafts; keep the accepted ones
        return out

    def _tree_round(self, history: list[int], tree: DraftTree, sampler: Sampler, params: SamplingParams) -> list[int]:
        """Verify a draft tree in one pass and walk it: from the pending token, the child whose token the
        full model picks (greedy), or with sampling each child in turn kept with probability p(d) and
        else removed from p (the accept/resample rule for deterministic drafts, one sibling after
        another), until no child is kept; the tokens to emit."""
        m, stats = self.model, self.stats
        self._drafted = True
        ids = [history[-1], *tree.tokens]
        parents = [-1, *[p + 1 for p in tree.parents]]
        t = time.perf_counter()
        full = m.step_tree(ids, parents, view=True)
        seconds = time.perf_counter() - t
        stats.verify_seconds += seconds
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(parents[1:], 1):
            children.setdefault(parent, []).append(node)
        best = np.argmax(full, axis=-1) if self._fast(sampler) else None
        targets = best.tolist() if best is not None else []
        node, out = 0, []
        seen = list(history) if best is None else history  # only the slow paths read (and extend) it
        while True:
            kids = children.get(node, [])
            chosen = None
            if best is not None:
                target = targets[node]
                chosen = next((c for c in kids if ids[c] == target), None)
            elif params.greedy:
                target = sampler(full[node], seen)
                chosen = next((c for c in kids if ids[c] == target), None)
            elif kids:
                p = token_probabilities(full[node], params, seen)
                for c in kids:
                    if sampler.rng.random() < p[ids[c]]:
                        chosen = c
                        break
                    p = p.copy()
                    p[ids[c]] = 0.0  # the residual max(p - q, 0) of a draft with q = 1 at its token
                    total = p.sum()
                    p = p / total if total > 0 else token_probabilities(full[node], params, seen)
                if chosen is None:
                    target = int(sampler.rng.choice(p.size, p=p))
            else:  # a leaf kept: the pass also gives the next token
                target = sampler(full[node], seen)
            if chosen is None:
                out.append(target)
                break
            out.append(ids[chosen])
            if best is None:
                seen.append(ids[chosen])
            node = chosen
        if self._observe is not None:  # after the walk: the table may mask the logits in place
            self._observe(ids, full, best, True)
        path = []
        leaf = node
        while node > 0:
            path.append(node - 1)
            node = parents[node]
        t = time.perf_counter()
        m.accept_tree(ids, parents, leaf)
        seconds += time.perf_counter() - t  # the commit is part of a tree pass's cost (a chain's popn is not)
        stats.count_round(len(tree), len(out) - 1)
        stats.trees += 1
        if self.policy is not None:
            self.policy.record_tree(tree, path[::-1])
            self.policy.time(len(ids), seconds)
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
