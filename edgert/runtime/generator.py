"""Text generation with a decoder-only LM: prefill, decode with a KV cache, sampling, chat.

The loop is built on `Generator.step`, which appends tokens to the cache and returns logits;
early-exit policies and speculative decoding plug in there (run fewer layers, then
`PagedKVCache.rollback` what a verifier rejects).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.errors import ArtifactError, ContextLengthError, EdgertError
from edgert.runtime.sampling import Sampler, SamplingParams
from edgert.runtime.session import PagedKVCache, Session
from edgert.runtime.tokenizer import TextTokenizer, tokenizer_from_artifact
from edgert.runtime.tvm_runtime import copy_into, to_numpy, to_numpy_view


@dataclass
class Token:
    """One generated token and the text it completed (often the token's own text)."""

    id: int
    text: str


@dataclass
class GenerationStats:
    """Counts and timings of the last generation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""
    decode_step_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second (tokens served from the cache excluded)."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second after the first (median step time)."""
        steps = self.decode_step_seconds
        return 1.0 / float(np.median(steps)) if steps else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict for JSON output."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            "stop_reason": self.stop_reason,
        }


class TokenEmitter:
    """Turns the token ids a decoder accepted into `Token`s, and says when generation ends.

    One place for what every decoder does with its tokens: stop at a stop token, detokenize
    incrementally, stop once the text holds a stop string or ``max_tokens`` are out, and count
    them into ``stats`` (``generated_tokens``, ``stop_reason``). ``history`` is the prompt and the
    emitted tokens (what samplers see).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        prompt: Sequence[int],
        stats: GenerationStats,
        max_tokens: int,
        stop: Sequence[str],
    ):
        self.stop_token_ids = tokenizer.stop_token_ids
        self.decoder = tokenizer.stream()
        self.history = list(prompt)
        self.stats, self.max_tokens = stats, max_tokens
        self.stop = [s for s in stop if s]
        self.text = ""

    @property
    def done(self) -> bool:
        """True once a stop reason is set."""
        return bool(self.stats.stop_reason)

    def emit(self, ids: Iterable[int]) -> Iterator[Token]:
        """Yield ``ids`` as tokens until one of them ends the generation (then `done` is true)."""
        stats = self.stats
        for token in ids:
            if token in self.stop_token_ids:
                stats.stop_reason = "stop_token"
                return
            self.history.append(token)
            stats.generated_tokens += 1
            piece = self.decoder.push(token)
            self.text += piece
            yield Token(token, piece)
            if any(s in self.text for s in self.stop):
                stats.stop_reason = "stop_string"
                return
            if stats.generated_tokens >= self.max_tokens:
                stats.stop_reason = "max_tokens"
                return


def _language_model_sections(artifact: Artifact) -> tuple[dict, int]:
    """The manifest's ``kv_cache`` section and context length, checked (a hand-made or damaged
    manifest gets a one-line error instead of a KeyError deep in the loader)."""
    manifest = artifact.manifest
    kv, model = manifest.get("kv_cache"), manifest.get("model")
    try:
        for key in ("context_length", "prefill_chunk_size", "page_size"):
            if int(kv[key]) < 1:
                raise ValueError(key)
        if int(model["vocab_size"]) < 1:
            raise ValueError("vocab_size")
        return kv, int(kv["context_length"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{artifact.path}: the manifest's kv_cache/model sections are missing or wrong ({exc}): "
            "not a language model build"
        ) from None


class Generator:
    """A compiled language model: `generate` yields tokens, `chat` holds a conversation."""

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        context_length: int | None = None,
        free_window: bool = False,
    ):
        """``free_window``: a model with sliding-window layers (Gemma 3) frees their keys and
        values outside the window, so its KV memory grows only in the global layers; prompt
        tokens past the first window then run one at a time (`PagedKVCache`)."""
        manifest = artifact.manifest
        kv, limit = _language_model_sections(artifact)
        if context_length is not None and not 0 < context_length <= limit:
            raise ContextLengthError(f"context length {context_length} is outside 1..{limit}, the compiled maximum")
        self.artifact = artifact
        self.session = Session(artifact, threads)
        self.tokenizer = tokenizer_from_artifact(artifact)
        self.context_length = context_length or limit
        self.prefill_chunk = int(kv["prefill_chunk_size"])
        self.cache = PagedKVCache(
            self.session,
            self.context_length,
            self.prefill_chunk,
            int(kv["page_size"]),
            kv.get("local"),
            rows=int(kv.get("verify_rows", 1)),
            tree=int(kv.get("verify_tree", 0)),
        )
        self.cached_ids: list[int] = []
        self._inputs: dict[tuple[int, int], tuple[Any, np.ndarray | None]] = {}  # shape -> input tensor (`_tokens`)
        self._row_entries = self._static_row_entries()
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self.stats = GenerationStats()
        if free_window:
            self.use_free_window()

    def use_free_window(self) -> None:
        """Free the sliding-window layers' keys and values outside their window from now on (an
        empty cache; see ``free_window``); refused for a model without such layers."""
        kv = self.artifact.manifest["kv_cache"]
        if not kv.get("local"):
            raise EdgertError(
                f"{self.artifact.path}: the model keeps no sliding-window layers in a cache of their own "
                "(only Gemma 3 builds do), so there is no window to free"
            )
        self.cache = PagedKVCache(
            self.session, self.context_length, self.prefill_chunk, int(kv["page_size"]), kv["local"], True
        )
        self.cached_ids.clear()

    def _static_row_entries(self) -> frozenset[int]:
        """Row counts with a static verify entry (``verify_rows_<n>``): the manifest's
        ``kv_cache.verify_row_entries``; a build from before the field has at most ``verify_rows_5``."""
        listed = self.artifact.manifest["kv_cache"].get("verify_row_entries", [5])
        try:
            counts = {int(n) for n in listed}
        except (TypeError, ValueError):
            raise ArtifactError(
                f"{self.artifact.path}: kv_cache.verify_row_entries is not a list of row counts: {listed!r}"
            ) from None
        return frozenset(n for n in counts if self.session.has_entry(f"verify_rows_{n}"))

    def verify_row_entries(self) -> tuple[int, ...]:
        """The verify pass sizes (tokens) that run through an entry with static shapes, ascending;
        other sizes up to `PagedKVCache.rows` take the dynamic ``batch_decode`` (a drafting policy
        may prefer these sizes; it measures their costs either way)."""
        return tuple(sorted(self._row_entries))

    # -- the step function -------------------------------------------------------------
    def step(self, ids: Sequence[int], all_logits: bool = False, view: bool = False) -> np.ndarray:
        """Append ``ids`` to the cache; logits of the last token [vocab] (or of every one [n, vocab]).

        ``view``: the logits are the VM's output buffer itself, valid until the next model call (no
        copy: the decoding loops read them before their next step; a copy of 16 rows cost more
        than the accept walk, and one row's about as much as sampling it)."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if self.cache.length + len(ids) > self.context_length:
            raise ContextLengthError(
                f"{self.cache.length + len(ids)} tokens do not fit the context of {self.context_length}"
            )
        limit = self.cache.chunk_limit()
        if limit is not None and len(ids) > limit:  # a local cache's chunks (`PagedKVCache.chunk_limit`)
            parts, rest = [], list(ids)
            while rest:
                n = self.cache.chunk_limit() or len(rest)
                parts.append(self.step(rest[:n], all_logits, view and not all_logits))
                rest = rest[n:]
            return np.concatenate(parts) if all_logits else parts[-1]
        rows = all_logits and 1 < len(ids) <= self.cache.rows  # a verify pass as decode rows: decode's logits
        if rows:
            entry = self._rows_entry(len(ids))
            self.cache.begin_rows(len(ids))
        else:
            entry = "verify" if all_logits else "decode" if len(ids) == 1 else "prefill"
            self.cache.begin(len(ids))
        tokens = self._tokens(ids, rows)
        if self.cache.local is None:
            logits, self.cache.obj = self.session(entry, tokens, self.cache.obj)
        else:  # a second cache for the sliding-window layers
            logits = self.session(entry, tokens, *self.cache.objs)[0]
        self.cache.end(len(ids))
        self.cached_ids.extend(ids)
        # ``view``: the output buffer itself on the CPU (`to_numpy_view`), else a copy.
        out = (to_numpy_view if view and not self.session.on_gpu else to_numpy)(logits)
        out = out[:, 0] if rows else out[0]
        return out if all_logits else out[-1]

    def step_tree(self, ids: Sequence[int], parents: Sequence[int], view: bool = False) -> np.ndarray:
        """Logits [n, vocab] of a token tree appended after the cache (``ids[0]`` the root, ``parents[i]``
        node i's parent): row i is the decode step's at the end of node i's path, bit for bit
        (`PagedKVCache.begin_tree`). `accept_tree` keeps one path. ``view`` as in `step`."""
        total = self.cache.length + len(ids)
        if total > self.context_length:
            raise ContextLengthError(f"{total} tokens do not fit the context of {self.context_length}")
        if len(ids) != len(parents) or not all(0 <= t < self.vocab_size for t in ids):
            raise ValueError(
                f"a tree of {len(ids)} token ids in the vocabulary and as many parents, not {len(parents)}"
            )
        self.cache.begin_tree(parents)
        # The rows' entries (decode-shaped, static where the artifact has one): the cache's tree tells
        # attention what each row sees, and the matmuls are the verify rows' (same logits, less time).
        logits, self.cache.obj = self.session(self._rows_entry(len(ids)), self._tokens(ids, True), self.cache.obj)
        return (to_numpy_view if view and not self.session.on_gpu else to_numpy)(logits)[:, 0]

    def _rows_entry(self, n: int) -> str:
        """The entry that runs ``n`` decode rows (a chain or a tree): the one with static shapes for
        this many rows where the artifact has it (`verify_row_entries`), else ``batch_decode``."""
        return f"verify_rows_{n}" if n in self._row_entries else "batch_decode"

    def accept_tree(self, ids: Sequence[int], parents: Sequence[int], leaf: int) -> None:
        """Keep the path from the root of the last `step_tree` to node ``leaf`` in the cache."""
        self.cache.end_tree(parents, leaf)
        path = []
        while leaf >= 0:
            path.append(ids[leaf])
            leaf = parents[leaf]
        self.cached_ids.extend(reversed(path))

    def _tokens(self, ids: Sequence[int], rows: bool) -> Any:
        """``ids`` as the entry's int32 input: [n, 1] for decode rows, else [1, n]. A one-token step or
        a pass of decode rows on the CPU refills a tensor kept for its shape, written through a numpy
        view of it (the VM reads its inputs during the call only): a fresh TVM allocation, or a
        copy through ctypes, cost more than the rest of the Python around a step."""
        shape = (len(ids), 1) if rows else (1, len(ids))
        if self.session.on_gpu or (len(ids) != 1 and not rows):
            return self.session.tensor(np.asarray(ids, dtype=np.int32).reshape(shape))
        kept = self._inputs.get(shape)
        if kept is None:
            tensor = self.session.tensor(np.zeros(shape, dtype=np.int32))
            try:
                writer = np.from_dlpack(tensor).reshape(-1)  # a view: the tensor's memory
            except (TypeError, RuntimeError, BufferError):
                writer = None
            kept = self._inputs[shape] = (tensor, writer if writer is not None and writer.flags.writeable else None)
        tensor, writer = kept
        if writer is not None:
            writer[:] = ids
        else:
            copy_into(tensor, np.asarray(ids, dtype=np.int32).reshape(shape))
        return tensor

    def prefill(self, ids: Sequence[int], like_decode: bool = False) -> np.ndarray:
        """Bring the cache to ``ids``, reusing the longest cached prefix; logits after the last.

        ``like_decode``: a few missing tokens (up to `PagedKVCache.rows`) go in as decode rows, so
        the cache holds what decode steps would have written (a drafting model catching up with
        the tokens its target accepted: `speculative.ModelDrafter`).
        """
        common = 0
        for a, b in zip(self.cached_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(ids):  # everything cached: recompute the last token for its logits
            common -= 1
        if not self.cache.rollback(len(self.cached_ids) - common):
            common = 0  # the sliding cache could not go back that far: it was emptied
        del self.cached_ids[common:]
        if like_decode and 1 < len(ids) - common <= self.cache.rows:
            logits = self.step(ids[common:], all_logits=True)[-1]
            self.stats.cached_tokens = common
            return logits
        logits = None
        for start in range(common, len(ids), self.prefill_chunk):
            logits = self.step(ids[start : start + self.prefill_chunk])
        assert logits is not None
        self.stats.cached_tokens = common
        return logits

    def rollback(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens of the cache (a verifier's rejected drafts)."""
        if num_tokens > 0:
            keep = self.cached_ids[:-num_tokens]
            if self.cache.rollback(num_tokens):
                del self.cached_ids[-num_tokens:]
            else:  # emptied (a sliding cache cannot go back that far): compute the rest again
                self.cached_ids.clear()
                if keep:
                    self.prefill(keep)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.cache.reset()
        self.cached_ids.clear()

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` from an empty cache: [len(ids), vocab]."""
        self.reset()
        out = np.concatenate(
            [
                self.step(ids[s : s + self.prefill_chunk], all_logits=True)
                for s in range(0, len(ids), self.prefill_chunk)
            ]
        )
        return out

    # -- generation ----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt; with ``chat`` the text is one user turn in the chat template."""
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def checked_prompt(self, prompt: str | Sequence[int], max_tokens: int, chat: bool = False) -> list[int]:
        """Token ids of a prompt to generate after, refused when empty, too long or ``max_tokens`` < 1."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        ids = self.encode_prompt(prompt, chat)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.context_length:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds {self.context_length}")
        return ids

    def begin_generation(
        self, ids: list[int], stats: GenerationStats, max_tokens: int, stop: Sequence[str]
    ) -> tuple[np.ndarray, TokenEmitter]:
        """Prefill ``ids`` (timed into ``stats``); the logits after them and the emitter of what follows."""
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        stats.prefill_seconds = time.perf_counter() - t0
        return logits, TokenEmitter(self.tokenizer, ids, stats, max_tokens, stop)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        chat: bool = False,
        decode_step: Callable[[int], np.ndarray] | None = None,
    ) -> Iterator[Token]:
        """Yield generated tokens until a stop token, a stop string, ``max_tokens`` or a full context.

        ``decode_step`` (token -> logits) replaces the full-model decode step (early exit).
        """
        ids = self.checked_prompt(prompt, max_tokens, chat)
        sampler = Sampler(sampling or SamplingParams())
        stats = self.stats = GenerationStats(prompt_tokens=len(ids))
        logits, out = self.begin_generation(ids, stats, max_tokens, stop)
        t_decode = time.perf_counter()
        while True:
            token = sampler(logits, out.history)
            yield from out.emit([token])
            if out.done:
                break
            if self.cache.length + 1 > self.context_length:
                stats.stop_reason = "context_full"
                break
            t = time.perf_counter()
            logits = self.step([token], view=True) if decode_step is None else decode_step(token)
            stats.decode_step_seconds.append(time.perf_counter() - t)
        stats.decode_seconds = time.perf_counter() - t_decode

    def chat(self, system: str | None = None) -> ChatSession:
        """A conversation that keeps its KV cache between turns."""
        return ChatSession(self, system)


class ChatSession:
    """Turns of a conversation; each turn prefills only what the cache does not hold yet."""

    def __init__(self, model: Generator, system: str | None = None):
        self.model = model
        self.messages: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]

    def send(self, text: str, max_tokens: int = 512, sampling: SamplingParams | None = None) -> Iterator[Token]:
        """Add a user turn and yield the assistant's reply token by token."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.model.tokenizer.encode(self.model.tokenizer.apply_chat_template(self.messages))
        reply: list[str] = []
        try:
            for tok in self.model.generate(prompt, max_tokens=max_tokens, sampling=sampling):
                reply.append(tok.text)
                yield tok
        except (ContextLengthError, ValueError):
            self.messages.pop()  # the turn did not happen; keep the conversation as it was
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})
