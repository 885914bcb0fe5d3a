"""Marian (MarianMT) compiled by edgert vs transformers' own generate, on seeded random weights.

The weights are random (tools/make_tiny_marian.py): this checks the encoder-decoder path for
correctness, token for token, not translation quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reference]


@pytest.fixture(scope="module")
def marian_dir(request: pytest.FixtureRequest) -> Path:
    """conftest's `tiny_marian` (built once per run), skipped without transformers before it is built."""
    pytest.importorskip("transformers")
    return request.getfixturevalue("tiny_marian")


@pytest.fixture(scope="module")
def translator(marian_dir: Path, request: pytest.FixtureRequest):
    from edgert.families.marian.translator import Translator

    return Translator(request.getfixturevalue("tiny_marian_artifact"))


@pytest.mark.parametrize("beams", [1, 4])
def test_identical_tokens_to_transformers(marian_dir: Path, translator, beams: int) -> None:
    import torch
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(str(marian_dir)).eval()
    rng = np.random.default_rng(beams)
    lengths, early = [], 0
    for _ in range(6):
        src = [int(t) for t in rng.integers(1, 95, size=int(rng.integers(2, 16)))] + [0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([src]), num_beams=beams, do_sample=False, max_new_tokens=24)
        ref_ids = ref[0].tolist()[1:]  # drop the decoder start token
        ref_ids = ref_ids[: ref_ids.index(0) + 1] if 0 in ref_ids else ref_ids  # padding after the end
        assert translator.translate_ids(src, beam_size=beams, max_new_tokens=24) == ref_ids, src
        lengths.append(len(ref_ids))
        early += len(ref_ids) < 24
    assert len(set(lengths)) > 1 and early > 0  # the cases differ and some end before the limit


def test_bad_source_ids_are_refused(translator) -> None:
    with pytest.raises(ValueError, match="source ids"):
        translator.translate_ids([5, 1000, 0])
    with pytest.raises(ValueError, match="source ids"):
        translator.translate_ids([])
