"""One user's generations through the serving engine: `edgert run/chat --kv-budget N`.

Only the engine evicts KV entries (TOVA, `edgert.runtime.kv_budget`), so a local run with a
budget goes through it: one sequence, events read on the calling thread.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgert.artifact import open_artifact
from edgert.errors import EdgertError
from edgert.runtime.generator import GenerationStats
from edgert.runtime.sampling import SamplingParams
from edgert.serve.engine import LLMEngine


class BudgetedModel:
    """A language model whose sequence keeps at most ``kv_budget`` KV entries (an ``--evictable-kv`` build)."""

    def __init__(self, path: Path, kv_budget: int, threads: int | None = None):
        # One sequence; no start-up warm-up (that is for a server's steady memory).
        self.engine = LLMEngine(open_artifact(path), threads=threads, max_batch=1, kv_budget=kv_budget, warm=False)
        self.stats = GenerationStats()

    @property
    def evicted_tokens(self) -> int:
        """KV entries dropped so far."""
        return self.engine.counters.evicted_tokens

    def encode(self, text: str, chat: bool) -> list[int]:
        """Token ids of ``text``, in the chat template when ``chat``."""
        return self.engine.encode(messages=[{"role": "user", "content": text}]) if chat else self.engine.encode(text)

    def stream(
        self, ids: list[int], max_tokens: int, sampling: SamplingParams, stop: Sequence[str] = ()
    ) -> Iterator[str]:
        """The reply's text pieces as they come; `stats` holds the request's figures after the last."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        req = self.engine.submit(ids, events.put, max_tokens=max_tokens, sampling=sampling, stop=stop)
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise EdgertError(value)
                else:
                    self.stats = req.stats
                    return
        finally:
            self.engine.cancel(req)  # a no-op after the end; frees the sequence when the reader stops early

    def close(self) -> None:
        self.engine.close()


class BudgetedChat:
    """A conversation under a KV budget: each turn sends the whole conversation again; its
    leading tokens come from the engine's prefix cache as far as the budget allows."""

    def __init__(self, model: BudgetedModel, system: str | None = None):
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, max_tokens: int, sampling: SamplingParams) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        ids = self.model.engine.encode(messages=self.messages)
        reply: list[str] = []
        for piece in self.model.stream(ids, max_tokens, sampling):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})
