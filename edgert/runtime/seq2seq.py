"""The encoder-decoder runtime: encode once, keep the cross-attention K/V, decode with greedy or beam search.

The decoder's self-attention keys and values live in TVM's paged KV cache, one sequence per
beam; beams that survive a step are forked from their parent (pages are shared, not copied),
the others removed. Logits processors (Whisper's timestamp rules, token suppression) see the
raw logits of every live sequence and mask tokens to -inf in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.runtime import tvm_runtime
from edgert.runtime.session import Session
from edgert.runtime.tvm_runtime import to_numpy

# (step, logits [rows, vocab] to edit in place, the tokens each row generated so far)
LogitsProcessor = Callable[[int, np.ndarray, Sequence[Sequence[int]]], None]
# (sequence, token to feed, step, the tokens so far) -> logits [n, vocab] of the next n steps (`Seq2Seq.greedy`)
Advance = Callable[[int, int, int, list[int]], np.ndarray]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, -inf entries staying -inf."""
    m = np.max(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = x - m
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def best_token(logits: np.ndarray) -> tuple[int, float]:
    """The most likely token of one row of logits and its log-probability.

    Greedy decoding needs one log-probability, not all of them: log p(t) = x_t - max - log sum exp(x - max),
    with a single temporary array instead of `log_softmax`'s three (this runs once per decoded token).
    """
    tok = int(np.argmax(logits))
    # exp(x - x_tok) is 1 at the token itself, so the sum is at least 1.
    total = float(np.sum(np.exp(logits - logits[tok])))
    return tok, -float(np.log(total))


def apply_processors(
    processors: Sequence[LogitsProcessor], step: int, logits: np.ndarray, tokens: Sequence[int]
) -> np.ndarray:
    """Let ``processors`` edit one sequence's logits [vocab] in place at ``step``; returns them."""
    for proc in processors:
        proc(step, logits[None], [tokens])
    return logits


class SequenceCache:
    """Several sequences in one paged KV cache: add, fork (for beams), remove, run forward passes."""

    def __init__(self, session: Session, max_sequences: int, max_length: int, page_size: int = 16):
        get = tvm_runtime.global_func
        self._shape = shape = tvm_runtime.shape
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._clear = get("vm.builtin.kv_state_clear")
        self._popn = get("vm.builtin.kv_state_popn")
        self.max_length = max_length
        # Forking keeps parents alive until their children exist: room for two generations.
        self.obj = session.vm["create_kv_cache"](
            shape([max_sequences]),
            shape([max_length * max_sequences]),
            shape([max_length]),
            shape([page_size]),
            shape([0]),
        )
        self.lengths: dict[int, int] = {}
        self._next = 0

    @property
    def objs(self) -> tuple[Any, ...]:
        """The cache objects an entry point takes (one: the layer entries pass ``*objs``)."""
        return (self.obj,)

    def add(self) -> int:
        """A new empty sequence; returns its id."""
        seq = self._next
        self._next += 1
        self._add(self.obj, seq)
        self.lengths[seq] = 0
        return seq

    def fork(self, parent: int) -> int:
        """A new sequence sharing all of ``parent``'s tokens."""
        seq = self._next
        self._next += 1
        self._fork(self.obj, parent, seq, -1)
        self.lengths[seq] = self.lengths[parent]
        return seq

    def remove(self, seq: int) -> None:
        """Drop a sequence and free the pages only it used."""
        self._remove(self.obj, seq)
        del self.lengths[seq]

    def begin(self, seqs: Sequence[int], counts: Sequence[int]) -> None:
        """Announce a forward pass appending ``counts[i]`` tokens to ``seqs[i]``."""
        self._begin(self.obj, self._shape(list(seqs)), self._shape(list(counts)))
        self._pending = list(zip(seqs, counts, strict=True))

    def end(self) -> None:
        """Close the forward pass."""
        self._end(self.obj)
        for seq, n in self._pending:
            self.lengths[seq] += n

    def popn(self, seq: int, n: int) -> None:
        """Forget the last ``n`` tokens of ``seq`` (rejected speculative drafts)."""
        if n > 0:
            self._popn(self.obj, seq, n)
            self.lengths[seq] -= n

    def reset(self) -> None:
        """Forget every sequence."""
        self._clear(self.obj)
        self.lengths.clear()


@dataclass
class Hypothesis:
    """A decoded sequence: its tokens (end token excluded) and scores."""

    tokens: list[int]
    score: float  # sum of token log-probabilities (end token included when one was produced)
    normalized: float  # score / length ** length_penalty, the ranking key of beam search
    extra: dict[str, Any] = field(default_factory=dict)


class Seq2Seq:
    """An encoder-decoder artifact loaded for running: `encode` once, then `greedy` or `beam`."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.artifact = artifact
        self.session = Session(artifact, threads)
        kv = artifact.manifest["kv_cache"]
        self.max_length = int(kv["context_length"])
        self.cache = SequenceCache(self.session, int(kv.get("max_sequences", 16)), self.max_length, kv["page_size"])
        self.vocab_size = int(artifact.manifest["model"]["vocab_size"])
        self.calls = {"encode": 0, "prefill": 0, "decode": 0}
        # Per decode step (~5 ms on tiny.en) these save ~0.1 ms: the entry point looked up once, the
        # weight list converted once (140 tensors), the token and position tensors reused per batch size.
        self._decode = self.session.vm["decode"]
        self._params = tvm_runtime.ffi().convert(self.session.params)
        self._step_inputs: dict[int, tuple[Any, Any]] = {}
        # An NPU build: the encoder is a plan of int8 partitions (LiteRT) and CPU parts, and the
        # library's `cross_kv` turns its output into the cross-attention K/V.
        self.npu_encoder = None
        npu = artifact.manifest.get("npu")
        if npu is not None and "encoder" in npu:
            from edgert.runtime.partitioned import PartitionedGraph

            self.npu_encoder = PartitionedGraph(artifact, threads, entry=npu["encoder"])
            self._after_encoder = npu["encoder"]["then"]

    def encode(self, *inputs: np.ndarray) -> Any:
        """Run the encoder; the result (cross-attention K/V) stays a device tensor."""
        self.calls["encode"] += 1
        if self.npu_encoder is not None:
            names = [s["name"] for s in self.npu_encoder.inputs]
            out = self.npu_encoder(dict(zip(names, inputs, strict=True)))
            (encoded,) = out.values()
            return self.session(self._after_encoder, self.session.tensor(np.ascontiguousarray(encoded)))
        return self.session("encode", *(self.session.tensor(np.ascontiguousarray(x)) for x in inputs))

    def _positions(self, seqs: Sequence[int], n: int) -> np.ndarray:
        return np.array([[self.cache.lengths[s] + i for i in range(n)] for s in seqs], np.int32)

    def prefill(self, seq: int, tokens: Sequence[int], cross: Any) -> np.ndarray:
        """Feed ``tokens`` to sequence ``seq``; logits of the last one [vocab]."""
        if self.cache.lengths[seq] + len(tokens) > self.max_length:
            raise ValueError(f"the decoder prompt needs more than {self.max_length} positions")
        ids = np.array([list(tokens)], np.int32)
        pos = self._positions([seq], len(tokens))
        self.cache.begin([seq], [len(tokens)])
        tensor = self.session.tensor
        logits, self.cache.obj = self.session("prefill", tensor(ids), tensor(pos), cross, self.cache.obj)
        self.cache.end()
        self.calls["prefill"] += 1
        return to_numpy(logits)[0, -1]

    def step(self, seqs: Sequence[int], tokens: Sequence[int], cross: Any) -> np.ndarray:
        """One token for each sequence; logits [len(seqs), vocab]."""
        ids = np.array([[t] for t in tokens], np.int32)
        pos = self._positions(seqs, 1)
        inputs = self._step_inputs.get(len(seqs))
        if inputs is None:
            inputs = self._step_inputs[len(seqs)] = (self.session.tensor(ids), self.session.tensor(pos))
        else:
            tvm_runtime.copy_into(inputs[0], ids)
            tvm_runtime.copy_into(inputs[1], pos)
        self.cache.begin(seqs, [1] * len(seqs))
        # The entry is called directly, not through Session.__call__ (the weights come with it here).
        logits, self.cache.obj = self.session.pool.run(self._decode, *inputs, cross, self.cache.obj, self._params)
        self.cache.end()
        self.calls["decode"] += 1
        return to_numpy(logits)[:, 0]

    def greedy(
        self,
        cross: Any,
        prompt: Sequence[int],
        eos: int,
        max_new: int,
        processors: Sequence[LogitsProcessor] = (),
        on_first_logits: Callable[[np.ndarray], None] | None = None,
        advance: Advance | None = None,
        start: Callable[[int], np.ndarray] | None = None,
    ) -> Hypothesis:
        """Most likely token at each step until ``eos`` or ``max_new`` tokens.

        ``advance(seq, token, step, tokens)`` feeds ``token``, the last of ``tokens``, and returns the
        logits [n, vocab] of steps ``step``..``step + n - 1`` (default: one full decoder `step`, n = 1).
        Early exit passes one that runs fewer layers; self-speculative decoding one that drafts and
        verifies, returning a row for each accepted draft and one more (their tokens may already
        be in the cache, so the length limit counts from the prompt). ``start(seq)`` feeds the prompt to
        the new sequence and returns the logits of steps 0..n-1 (default: `prefill`, n = 1; lookup
        drafting verifies its first drafts in the prompt's pass).
        """
        self.cache.reset()
        seq = self.cache.add()
        rows = start(seq) if start is not None else self.prefill(seq, prompt, cross)[None]
        if max_new < 1:
            return Hypothesis([], 0.0, 0.0)
        if on_first_logits is not None:
            on_first_logits(rows[0])
        if advance is None:

            def advance(seq: int, token: int, step: int, tokens: list[int]) -> np.ndarray:
                return self.step([seq], [token], cross)

        tokens: list[int] = []
        score = 0.0
        while True:
            for logits in rows:
                step = len(tokens)
                tok, logp = best_token(apply_processors(processors, step, logits, tokens))
                score += logp
                if tok == eos:
                    return Hypothesis(tokens, score, score / max(len(tokens), 1))
                tokens.append(tok)
                if step == max_new - 1 or len(prompt) + step + 1 > self.max_length:
                    return Hypothesis(tokens, score, score / max(len(tokens), 1))
            rows = advance(seq, tokens[-1], len(tokens), tokens)

    def beam(
        self,
        cross: Any,
        prompt: Sequence[int],
        eos: int,
        max_new: int,
        beam_size: int = 5,
        length_penalty: float = 1.0,
        patience: float = 1.0,
        processors: Sequence[LogitsProcessor] = (),
        on_first_logits: Callable[[np.ndarray], None] | None = None,
    ) -> Hypothesis:
        """Beam search as CTranslate2 runs it: 2 x beam candidates per step, a finished
        candidate is replaced by the next unfinished one, and the search ends when
        ``round(beam * patience)`` hypotheses are done; they are ranked by
        score / length ** length_penalty."""
        self.cache.reset()
        root = self.cache.add()
        logits = self.prefill(root, prompt, cross)[None].copy()
        seqs, alive, scores = [root], [[]], np.zeros(1, np.float32)
        done: list[Hypothesis] = []
        want = max(1, round(beam_size * patience))
        n_cand = 2 * beam_size
        for step in range(max_new):
            if step == 0 and on_first_logits is not None:
                on_first_logits(logits[0])
            for proc in processors:
                proc(step, logits, alive)
            flat = (log_softmax(logits) + scores[:, None]).reshape(-1)
            top = np.argpartition(-flat, n_cand - 1)[:n_cand]
            top = top[np.argsort(-flat[top], kind="stable")]
            origin, words, cand = top // logits.shape[1], top % logits.shape[1], flat[top]
            last = step == max_new - 1
            chosen, secondary = [], beam_size
            for k in range(beam_size):
                pick = k
                if words[k] == eos or last:
                    toks = alive[origin[k]] + ([] if words[k] == eos else [int(words[k])])
                    done.append(Hypothesis(toks, float(cand[k]), float(cand[k]) / max(len(toks), 1) ** length_penalty))
                    for j in range(secondary, n_cand):
                        if words[j] != eos:
                            pick, secondary = j, j + 1
                            break
                chosen.append(pick)
            if last or len(done) >= want:
                break
            new_seqs = [self.cache.fork(seqs[origin[j]]) for j in chosen]
            for s in seqs:
                self.cache.remove(s)
            alive = [alive[origin[j]] + [int(words[j])] for j in chosen]
            scores = cand[chosen].astype(np.float32)
            seqs = new_seqs
            logits = self.step(seqs, [int(words[j]) for j in chosen], cross).copy()
        done.sort(key=lambda h: -h.normalized)
        return done[0]

    def beam_transformers(
        self,
        cross: Any,
        prompt: Sequence[int],
        eos: int,
        max_new: int,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        processors: Sequence[LogitsProcessor] = (),
    ) -> Hypothesis:
        """Beam search as Hugging Face transformers runs it (`generate(num_beams=...)`, early_stopping=False).

        Processors see log-probabilities (transformers applies them after the log-softmax);
        2 x beam candidates per step; a candidate among the top ``beam`` that ends (end token
        or length limit) joins the finished set with score / generated_length ** length_penalty;
        the search stops when no running beam can beat the worst of ``beam`` finished ones.
        The returned tokens include the end token when one was produced.
        """
        self.cache.reset()
        root = self.cache.add()
        logits = self.prefill(root, prompt, cross)[None]
        seqs, alive, scores = [root], [[]], np.zeros(1, np.float32)
        finished: list[tuple[float, list[int]]] = []
        n_cand, open_heuristic = 2 * beam_size, True
        for step in range(max_new):
            logp = log_softmax(logits.astype(np.float32))
            for proc in processors:
                proc(step, logp, alive)
            flat = (logp + scores[:, None]).reshape(-1)
            top = np.argsort(-flat, kind="stable")[:n_cand]
            origin, words, cand = top // logits.shape[1], top % logits.shape[1], flat[top]
            hits = (words == eos) | (step + 1 >= max_new)
            for j in range(beam_size):
                if hits[j] and open_heuristic:
                    toks = alive[origin[j]] + [int(words[j])]
                    finished.append((float(cand[j]) / (step + 1) ** length_penalty, toks))
            finished = sorted(finished, key=lambda f: -f[0])[:beam_size]
            running = np.where(hits, cand - 1e9, cand)
            keep = np.argsort(-running, kind="stable")[:beam_size]
            scores = running[keep].astype(np.float32)
            if len(finished) == beam_size:
                best_possible = scores[0] / (step + 1) ** length_penalty
                open_heuristic = open_heuristic and best_possible > finished[-1][0]
            if not open_heuristic or bool(np.all(hits)):
                break
            new_seqs = [self.cache.fork(seqs[origin[j]]) for j in keep]
            for s in seqs:
                self.cache.remove(s)
            alive = [alive[origin[j]] + [int(words[j])] for j in keep]
            seqs = new_seqs
            logits = self.step(seqs, [int(words[j]) for j in keep], cross)
        score, tokens = finished[0]
        return Hypothesis(tokens, score * len(tokens) ** length_penalty, score)
