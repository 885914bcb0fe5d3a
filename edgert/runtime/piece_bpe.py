"""SentencePiece-style BPE (GGUF ``llama`` vocabularies: Gemma, Llama 2) from compact tables.

The `tokenizers` library holds such a vocabulary in hash maps of strings: Gemma 3's 262,144
pieces and 513,511 merges take about 95 MiB of heap and 0.8 s to parse, a third of the RSS
growth of the 270M model while it decodes. The same tokenizer as numpy tables (pieces as one
UTF-8 blob with offsets, merges as sorted ``left * n + right`` keys) is mapped from the artifact
in a few MB and milliseconds. `compact_tables` builds them at compile time from the `tokenizers`
document itself, and only for the one pipeline this module reproduces step for step (added
tokens split leftmost-longest on the raw text, spaces replaced by ``▁``, BPE by merge rank with
byte fallback, the decoder Replace/ByteFallback/Fuse); any other document keeps `tokenizers`.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Mapping, Sequence

import numpy as np

from edgert.errors import ArtifactError

SPACE = "\u2581"
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
_DECODERS = [
    {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
TABLES = (
    "piece_bytes",
    "piece_offsets",
    "added",
    "byte_value",
    "byte_ids",
    "merge_keys",
    "merge_ranks",
    "merge_ids",
    "unk",
)


def compact_tables(document: str) -> dict[str, np.ndarray] | None:
    """The tables of a `tokenizers` JSON document, or None when it is not the pipeline `PieceBPE` runs."""
    doc = json.loads(document)
    model = doc.get("model") or {}
    normalizer = doc.get("normalizer")
    if normalizer is not None and normalizer.get("type") == "Sequence" and len(normalizer.get("normalizers", [])) == 1:
        normalizer = normalizer["normalizers"][0]
    decoder = doc.get("decoder") or {}
    simple = (
        model.get("type") == "BPE"
        and model.get("byte_fallback") is True
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("ignore_merges")
        and model.get("fuse_unk") is True
        and normalizer == _REPLACE
        and doc.get("pre_tokenizer") is None
        and doc.get("post_processor") is None
        and decoder.get("type") == "Sequence"
        and decoder.get("decoders") == _DECODERS
        and all(
            not (t["normalized"] or t["lstrip"] or t["rstrip"] or t["single_word"]) for t in doc.get("added_tokens", [])
        )
    )
    if not simple:
        return None
    vocab: dict[str, int] = model["vocab"]
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        return None
    pieces = [""] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    added = np.zeros(n, np.uint8)
    for t in doc.get("added_tokens", []):
        if vocab.get(t["content"]) != t["id"]:
            return None  # an added token outside the model's vocabulary: not this pipeline
        added[t["id"]] = 1 if t["special"] else 2
    encoded = [p.encode() for p in pieces]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    byte_value = np.full(n, -1, np.int32)
    for i, p in enumerate(pieces):
        m = _BYTE_PIECE.fullmatch(p)
        if m:
            byte_value[i] = int(m.group(1), 16)
    merges: dict[int, tuple[int, int]] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        # a later duplicate replaces an earlier one, as in `tokenizers`' map of merges
        merges[vocab[left] * n + vocab[right]] = (rank, vocab[left + right])
    keys = np.array(sorted(merges), np.int64)
    unk = model.get("unk_token")
    return {
        "piece_bytes": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "piece_offsets": offsets,
        "added": added,
        "byte_value": byte_value,
        "byte_ids": np.array([vocab.get(f"<0x{b:02X}>", -1) for b in range(256)], np.int32),
        "merge_keys": keys,
        "merge_ranks": np.array([merges[k][0] for k in keys.tolist()], np.int32),
        "merge_ids": np.array([merges[k][1] for k in keys.tolist()], np.int32),
        "unk": np.array([vocab.get(unk, -1) if unk else -1], np.int32),
    }


class PieceBPE:
    """Encode and decode with `compact_tables`' tables, as `tokenizers` does with the document."""

    def __init__(self, tables: Mapping[str, np.ndarray], where: str = "tokenizer tables"):
        missing = [k for k in TABLES if k not in tables]
        if missing:
            raise ArtifactError(f"{where}: tokenizer tables lack {', '.join(missing)}")
        t = {k: np.asarray(tables[k]) for k in TABLES}  # plain views: a memmap's indexing is slow
        self._blob, self._offsets = t["piece_bytes"].tobytes(), t["piece_offsets"]
        self._n = n = len(self._offsets) - 1
        if n < 1 or any(len(t[k]) != n for k in ("added", "byte_value")) or len(t["byte_ids"]) != 256:
            raise ArtifactError(f"{where}: tokenizer tables disagree on the vocabulary size")
        if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0) or self._offsets[-1] != len(self._blob):
            raise ArtifactError(f"{where}: tokenizer tables have broken piece offsets")
        self._added_kind, self._byte_value = t["added"], t["byte_value"]
        self._mkeys, self._mranks, self._mids = t["merge_keys"], t["merge_ranks"], t["merge_ids"]
        self._byte_ids = [int(i) for i in t["byte_ids"]]
        self._unk = int(t["unk"][0])
        # Pieces of one character (a UTF-8 lead byte and as many bytes as it announces): the
        # symbols BPE starts from.
        lengths = np.diff(self._offsets)
        lead = t["piece_bytes"][np.minimum(self._offsets[:-1], max(len(self._blob) - 1, 0))]
        announced = np.select([lead < 0x80, lead < 0xE0, lead < 0xF0], [1, 2, 3], 4)
        self._chars: dict[str, int] = {}
        for i in np.flatnonzero(lengths == announced).tolist():
            try:
                self._chars.setdefault(self.piece(i), i)
            except UnicodeDecodeError:
                raise ArtifactError(f"{where}: piece {i} is not UTF-8") from None
        # Added tokens by text, and per first character the lengths to try (longest first).
        self._added: dict[str, int] = {self.piece(i): i for i in np.flatnonzero(self._added_kind).tolist()}
        lens: dict[str, set[int]] = {}
        for text in self._added:
            lens.setdefault(text[0], set()).add(len(text))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lens.items()}
        self._first = re.compile("[" + "".join(re.escape(c) for c in lens) + "]") if lens else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        """Number of pieces (added tokens are pieces of the vocabulary here)."""
        return self._n

    def piece(self, i: int) -> str:
        """The text of piece ``i``."""
        return self._blob[self._offsets[i] : self._offsets[i + 1]].decode("utf-8")

    # -- encoding --------------------------------------------------------------------------
    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in it recognised, no BOS)."""
        ids: list[int] = []
        for segment, token in self._split_added(text):
            if token is not None:
                ids.append(token)
            elif segment:
                ids.extend(self._bpe(segment.replace(" ", SPACE)))
        return ids

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Text cut at added tokens, leftmost-longest (the Aho-Corasick match `tokenizers` uses)."""
        out: list[tuple[str, int | None]] = []
        if self._first is None:
            return [(text, None)]
        pos = last = 0
        while (m := self._first.search(text, pos)) is not None:
            i = m.start()
            for length in self._lengths[text[i]]:
                token = self._added.get(text[i : i + length])
                if token is not None:
                    if last < i:
                        out.append((text[last:i], None))
                    out.append(("", token))
                    last = pos = i + length
                    break
            else:
                pos = i + 1
        if last < len(text):
            out.append((text[last:], None))
        return out

    def _merge(self, left: int, right: int) -> tuple[int, int] | None:
        key = left * self._n + right
        j = int(self._mkeys.searchsorted(key))
        if j < len(self._mkeys) and int(self._mkeys[j]) == key:
            return int(self._mranks[j]), int(self._mids[j])
        return None

    def _bpe(self, word: str) -> list[int]:
        """`tokenizers`' BPE on one word: characters (or their byte pieces), then merges by rank."""
        syms: list[int] = []
        pending_unk = False  # fuse_unk: a run of unknown characters is one <unk>, added late as there
        for ch in word:
            i = self._chars.get(ch)
            if i is not None:
                if pending_unk:
                    syms.append(self._unk)
                    pending_unk = False
                syms.append(i)
                continue
            byte_ids = [self._byte_ids[b] for b in ch.encode()]
            if all(b >= 0 for b in byte_ids):
                syms.extend(byte_ids)
                continue
            pending_unk = self._unk >= 0  # without an unknown token the character is dropped
        if pending_unk:
            syms.append(self._unk)
        n = len(syms)
        if n < 2:
            return syms
        arr = np.asarray(syms, np.int64)
        keys = arr[:-1] * self._n + arr[1:]
        at = np.minimum(self._mkeys.searchsorted(keys), len(self._mkeys) - 1)
        hit = self._mkeys[at] == keys
        heap = [
            (int(r), int(p), int(t))
            for p, r, t in zip(np.flatnonzero(hit), self._mranks[at[hit]], self._mids[at[hit]], strict=True)
        ]
        heapq.heapify(heap)
        nxt = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        alive = [True] * n
        while heap:
            _, pos, new = heapq.heappop(heap)
            j = nxt[pos]
            if not alive[pos] or j >= n:
                continue
            m = self._merge(syms[pos], syms[j])
            if m is None or m[1] != new:  # the pair changed since it was queued
                continue
            syms[pos], alive[j] = new, False
            nxt[pos] = nxt[j]
            if nxt[j] < n:
                prev[nxt[j]] = pos
            if prev[pos] >= 0 and (m := self._merge(syms[prev[pos]], new)) is not None:
                heapq.heappush(heap, (m[0], prev[pos], m[1]))
            if nxt[pos] < n and (m := self._merge(new, syms[nxt[pos]])) is not None:
                heapq.heappush(heap, (m[0], pos, m[1]))
        return [s for s, keep in zip(syms, alive, strict=True) if keep]

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: pieces with ``▁`` as spaces, runs of byte pieces as UTF-8 (U+FFFD per
        byte where invalid), ids outside the vocabulary dropped."""
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if not 0 <= i < self._n or (skip_special_tokens and self._added_kind[i] == 1):
                continue
            b = int(self._byte_value[i])
            if b >= 0:
                run.append(b)
                continue
            if run:
                parts.append(_bytes_text(run))
                run.clear()
            parts.append(self.piece(i).replace(SPACE, " "))
        if run:
            parts.append(_bytes_text(run))
        return "".join(parts)


def _bytes_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
