"""Translation with a compiled Marian artifact: source token ids in, target token ids out.

Decoding follows Hugging Face transformers' `generate` for Marian (decoder starts from
``decoder_start_token_id``; the end token is forced at the last allowed position), so the
runtime can be checked token for token against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgert.artifact.reader import Artifact, open_artifact
from edgert.errors import ArtifactError
from edgert.runtime.seq2seq import Seq2Seq


class Translator:
    """``Translator("m.edgert").translate_ids([12, 7, 0], beam_size=4)``."""

    def __init__(self, artifact: str | Path | Artifact, threads: int | None = None):
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        if art.family != "marian":
            raise ArtifactError(f"{art.path}: a '{art.family}' model is not a translation model")
        self.artifact = art
        self.model = Seq2Seq(art, threads)
        cfg = art.manifest["model"]
        self.eos, self.start = int(cfg["eos_token_id"]), int(cfg["decoder_start_token_id"])
        self.forced_eos = cfg.get("forced_eos_token_id")
        self.vocab_size = int(cfg["vocab_size"])

    def translate_ids(self, source: Sequence[int], beam_size: int = 1, max_new_tokens: int = 64) -> list[int]:
        """Target ids (the end token included when produced) for source ids (ending with the end token)."""
        src = np.array([list(source)], np.int32)
        if src.size == 0 or src.min() < 0 or src.max() >= self.vocab_size:
            raise ValueError(f"source ids must be non-empty and in [0, {self.vocab_size})")
        max_new = min(max_new_tokens, self.model.max_length - 1)
        cross = self.model.encode(src)
        forced = self.forced_eos

        def force_eos(step: int, scores: np.ndarray, _seqs: Sequence[Sequence[int]]) -> None:
            if forced is not None and step == max_new - 1:
                scores[:, :] = -np.inf
                scores[:, forced] = 0.0

        if beam_size > 1:
            hyp = self.model.beam_transformers(
                cross, [self.start], self.eos, max_new, beam_size, processors=[force_eos]
            )
            return hyp.tokens
        hyp = self.model.greedy(cross, [self.start], self.eos, max_new, processors=[force_eos])
        ended = len(hyp.tokens) < max_new
        return hyp.tokens + ([self.eos] if ended else [])
