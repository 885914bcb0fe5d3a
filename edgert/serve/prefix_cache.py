"""Which earlier prompts' KV the paged cache still holds, found by page-aligned token blocks.

Each entry is a sequence of the paged KV cache kept after its request ended, cut back to whole
pages. A prompt's blocks of ``page_size`` tokens are hashed as a chain (block i's key covers
blocks 0..i), so one dict lookup per block finds the entries sharing that many leading blocks;
the server forks the longest match (TVM's ``fork_sequence`` shares those pages, no copy) and
prefills only the rest. The match then goes on token by token into the next page of the entries
sharing those blocks (a fork inside a page copies that one page, a memory copy per layer): a
chat template's system part of 24 tokens, or a shared first word, no longer stops at 16.
Entries are evicted least recently used first, under a token bound.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Entry:
    """A cached sequence: its id in the KV cache and the tokens its KV holds (whole pages)."""

    seq_id: int
    tokens: tuple[int, ...]
    keys: list[bytes] = field(default_factory=list)


def block_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The chained digest of each whole block of ``tokens``: key i covers blocks 0..i."""
    keys: list[bytes] = []
    prev = b""
    for start in range(0, len(tokens) - page_size + 1, page_size):
        block = np.asarray(tokens[start : start + page_size], dtype=np.int64).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    """Cached sequences by block key, least recently used first, at most ``max_tokens`` tokens."""

    def __init__(self, page_size: int, max_tokens: int):
        self.page_size = page_size
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # seq id -> entry, oldest use first
        self._index: dict[bytes, set[int]] = {}
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, prompt: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt`` and how many tokens it shares: whole
        leading blocks by key, then token by token into the next block; at least one prompt token
        is left to prefill (its logits start the reply)."""
        best: Entry | None = None
        matched = 0
        limit = len(prompt) - 1
        sharing: Iterable[int] = self.entries.keys()  # entries sharing the blocks matched so far
        for i, key in enumerate(block_keys(prompt[:limit], self.page_size)):
            ids = self._index.get(key)
            if not ids:
                break
            best, matched, sharing = self.entries[next(iter(ids))], (i + 1) * self.page_size, ids
        # The rest of a page: an entry holding the next block may share some of its tokens.
        base, stop = matched, min(limit, matched + self.page_size - 1)
        for seq_id in sharing:
            tokens = self.entries[seq_id].tokens
            n = base
            end = min(stop, len(tokens))
            while n < end and tokens[n] == prompt[n]:
                n += 1
            if n > matched:
                best, matched = self.entries[seq_id], n
        if best is not None:
            self.entries.move_to_end(best.seq_id)
        return best, matched

    def covered(self, tokens: Sequence[int]) -> bool:
        """True when an entry already holds all of ``tokens`` (whole blocks only)."""
        keys = block_keys(tokens, self.page_size)
        return bool(keys) and bool(self._index.get(keys[-1]))

    def add(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Keep sequence ``seq_id``, whose KV holds ``tokens`` (a whole number of pages)."""
        entry = Entry(seq_id, tuple(tokens), block_keys(tokens, self.page_size))
        self.entries[seq_id] = entry
        for key in entry.keys:
            self._index.setdefault(key, set()).add(seq_id)
        self.tokens += len(entry.tokens)

    def pop_oldest(self) -> Entry | None:
        """Forget the least recently used entry and return it (its sequence is the caller's to remove)."""
        if not self.entries:
            return None
        _, entry = self.entries.popitem(last=False)
        for key in entry.keys:
            ids = self._index.get(key)
            if ids is not None:
                ids.discard(entry.seq_id)
                if not ids:
                    del self._index[key]
        self.tokens -= len(entry.tokens)
        return entry

    def over_bound(self) -> bool:
        """True while the entries hold more tokens than allowed."""
        return self.tokens > self.max_tokens

    def pages(self) -> int:
        """Pages the entries hold, counting shared ones once per entry (an upper bound)."""
        return sum(len(e.tokens) // self.page_size for e in self.entries.values())
