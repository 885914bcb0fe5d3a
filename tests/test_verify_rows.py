"""A verify pass's logits equal decode steps' bit for bit (it runs as decode rows of one sequence).

`Generator.step(ids, all_logits=True)` over up to a page of tokens runs the ``batch_decode``
entry with the sequence named once per row (`PagedKVCache.begin_rows`): the cache appends
before attention and runs its decode kernel, each row masked to its own position. With int8
activations (the default on AVX-512 VNNI) every matmul is integer-exact per row, so each row's
logits are those of a decode step of the same token at the same position; this is what keeps
speculative decoding lossless with int8 rounding. Float kernels take other paths for several
rows than for one (shared weight loads), so there the rows agree to float rounding only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# (cached tokens, verified tokens): inside a page, ending on a boundary, crossing one, 8 and 16 rows.
CASES = [(3, 5), (11, 5), (14, 9), (20, 8), (33, 16)]


class _Entries:
    """A session that records the entry points called, and hides the static ``verify_rows_<n>`` ones
    when ``dynamic`` (so the pass takes ``batch_decode``)."""

    def __init__(self, session, dynamic: bool = False):
        self._session, self.dynamic, self.called = session, dynamic, []

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def has_entry(self, name: str) -> bool:
        return not (self.dynamic and name.startswith("verify_rows_")) and self._session.has_entry(name)

    def __call__(self, entry: str, *args):
        self.called.append(entry)
        return self._session(entry, *args)


def _rows_against_steps(model, seed: int, cases=CASES) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each case: the verify pass's logits and those of decode steps, plus one step after each."""
    pairs = []
    for cached, rows in cases:
        rng = np.random.default_rng([seed, cached, rows])  # a case's tokens do not depend on the others
        ids = [int(t) for t in rng.integers(5, model.vocab_size, cached + rows)]
        model.reset()
        model.prefill(ids[:cached])
        verified = model.step(ids[cached:], all_logits=True)
        after_verify = model.step([42])  # the cache holds what decode steps would have written
        model.reset()
        model.prefill(ids[:cached])
        stepped = np.stack([model.step([t]) for t in ids[cached:]])
        after_steps = model.step([42])
        pairs.append((np.vstack([verified, after_verify]), np.vstack([stepped, after_steps])))
    return pairs


def _check(model, seed: int) -> None:
    """Rows equal steps: bit for bit with int8 activations, to float rounding with f32 ones; passes of
    5, 8 and 16 rows run their static entries (``verify_rows_<n>``), 9 rows ``batch_decode``, which
    gives the static entries' logits where they are hidden."""
    assert model.cache.rows == 16 and model.artifact.manifest["kv_cache"]["verify_rows"] == 16
    assert model.verify_row_entries() == (5, 8, 16)
    exact = model.artifact.manifest["weights"]["activations"] == "int8"
    session = model.session
    try:
        model.session = spy = _Entries(session)
        pairs = _rows_against_steps(model, seed)
        static = [e for e in spy.called if e.startswith("verify_rows_")]
        assert static == ["verify_rows_5", "verify_rows_5", "verify_rows_8", "verify_rows_16"]
        assert spy.called.count("batch_decode") == 1  # the pass of 9 rows
        model.session = spy = _Entries(session, dynamic=True)
        model._row_entries = model._static_row_entries()  # read at load: as a build without the entries
        dynamic = _rows_against_steps(model, seed, CASES[-2:])
        assert "batch_decode" in spy.called and not any(e.startswith("verify_rows_") for e in spy.called)
    finally:
        model.session = session
        model._row_entries = model._static_row_entries()
    for (verified, _), (verified_dynamic, _) in zip(pairs[-2:], dynamic, strict=True):
        if exact:
            np.testing.assert_array_equal(verified_dynamic, verified)
        else:  # static shapes may give the float kernels another schedule
            np.testing.assert_allclose(verified_dynamic, verified, atol=1e-4)
    for verified, stepped in pairs:
        assert verified.shape == stepped.shape
        if exact:
            np.testing.assert_array_equal(verified, stepped)
        else:  # f32 activations (a CPU without VNNI): the float multi-row kernels round differently
            np.testing.assert_allclose(verified, stepped, atol=1e-4)


def test_tiny_verify_rows_equal_decode_steps(tiny_host_default_artifact: Path, tiny_host_artifact: Path) -> None:
    """The tiny Llama with the default activations (int8 on VNNI): bit for bit; with f32: to rounding."""
    from edgert.artifact.reader import open_artifact
    from edgert.runtime.generator import Generator

    _check(Generator(open_artifact(tiny_host_default_artifact)), 1)
    _check(Generator(open_artifact(tiny_host_artifact)), 1)


def _path(node: int, parents: list[int]) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


# (cached tokens, parents, accepted leaf): two branches below the root, one that is a deep side
# branch crossing a page boundary, a root whose children all fail, the 16 nodes of the largest tree.
TREES = [
    (13, [-1, 0, 0, 1, 2, 3], 4),
    (14, [-1, 0, 1, 2, 0, 4, 5, 1], 6),
    (1, [-1, 0, 0], 0),
    (31, [-1, 0, 0, 0, 1, 2, 3, 4, 7, 1, 9, 10, 11, 12, 13, 14], 15),
]


def test_a_tree_pass_gives_each_node_its_paths_decode_step(tiny_host_default_artifact: Path) -> None:
    """`Generator.step_tree`: node i attends to the prefix and its ancestors at the position of its
    depth, so its logits are those of decode steps along its path, bit for bit with int8 activations;
    `accept_tree` leaves the cache as those steps would (the next step agrees too)."""
    from edgert.artifact.reader import open_artifact
    from edgert.runtime.generator import Generator

    model = Generator(open_artifact(tiny_host_default_artifact))
    assert model.cache.tree == 16 and model.artifact.manifest["kv_cache"]["verify_tree"] == 16
    exact = model.artifact.manifest["weights"]["activations"] == "int8"
    rng = np.random.default_rng(3)
    for cached, parents, leaf in TREES:
        prefix = [int(t) for t in rng.integers(5, model.vocab_size, cached)]
        ids = [int(t) for t in rng.integers(5, model.vocab_size, len(parents))]
        model.reset()
        model.prefill(prefix)
        tree = model.step_tree(ids, parents)
        model.accept_tree(ids, parents, leaf)
        kept = list(model.cached_ids)
        after = model.step([42])
        for node in range(len(parents)):
            model.reset()
            model.prefill(prefix)
            steps = [model.step([ids[j]]) for j in _path(node, parents)]
            if exact:
                np.testing.assert_array_equal(tree[node], steps[-1])
            else:  # f32 activations (a CPU without VNNI): the multi-row kernels round differently
                np.testing.assert_allclose(tree[node], steps[-1], atol=1e-4)
            if node == leaf:  # the kept path's keys and values are where those steps put theirs
                assert model.cached_ids == kept and model.cache.length == cached + len(steps)
                np.testing.assert_allclose(model.step([42]), after, rtol=0, atol=0 if exact else 1e-4)
    with pytest.raises(ValueError, match="not a rooted tree"):
        model.step_tree([5, 6, 7], [-1, 2, 0])


@pytest.fixture(scope="module")
def smollm_default(smollm_default_artifact: Path):
    import edgert

    return edgert.load(smollm_default_artifact)


@pytest.mark.slow
def test_smollm_verify_rows_equal_decode_steps(smollm_default) -> None:
    """SmolLM2 with the default activations (int8 on an AVX-512 VNNI CPU)."""
    _check(smollm_default, 2)


@pytest.mark.slow
def test_int8_speculation_gives_plain_decodings_tokens(smollm_default, smollm_default_artifact: Path) -> None:
    """With int8 activations, greedy self-speculation and a second copy of the model drafting give
    plain decoding's tokens, and the copy's drafts are all accepted (its cache catches up through
    decode rows too). Before verify ran as decode rows, int8 rounding of verify's last-bit
    differences left plain decoding's tokens (1 of 10 prompts of test_speculative.py)."""
    import edgert
    from edgert.runtime.speculative import ModelDrafter, SelfDrafter, SpeculativeDecoder

    model = smollm_default
    n = int(model.artifact.manifest["model"]["num_layers"])
    prompts = ["The three primary colors are", "def fibonacci(n):"]
    plain = {p: [t.id for t in model.generate(p, max_tokens=32)] for p in prompts}
    selfspec = SpeculativeDecoder(model, SelfDrafter(model, [i for i in range(n) if i not in (5, 26)]), k=4)
    for p in prompts:
        assert [t.id for t in selfspec.generate(p, max_tokens=32)] == plain[p], p
    twin = SpeculativeDecoder(model, ModelDrafter(edgert.load(smollm_default_artifact), model), k=3)
    assert [t.id for t in twin.generate(prompts[0], max_tokens=32)] == plain[prompts[0]]
    assert twin.stats.acceptance_rate == 1.0
