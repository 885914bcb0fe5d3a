"""Layer-range execution and lossless speculative decoding on SmolLM2 (the session artifact)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from edgert.errors import EdgertError
from edgert.runtime.layers import LayerStack
from edgert.runtime.sampling import Sampler, SamplingParams
from edgert.runtime.speculative import (
    Candidate,
    DraftGate,
    DraftPolicy,
    DraftTree,
    LookupDrafter,
    ModelDrafter,
    RecycleDrafter,
    SelfDrafter,
    SpeculativeDecoder,
    parse_speculative,
)

# Plain-text openings (no chat template), so every run decodes the full 64 tokens.
PROMPTS = [
    "Paris is a city that",
    "Once upon a time, in a small village by the sea,",
    "A neural network is",
    "The water cycle begins when",
    "To make pancakes, you need",
    "The three primary colors are",
    "The history of the bicycle",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The best way to learn a new language is",
]


@pytest.fixture(scope="module")
def references(smollm) -> dict[str, list[int]]:
    """The full model's greedy 64 tokens for each prompt."""
    return {p: [t.id for t in smollm.generate(p, max_tokens=64)] for p in PROMPTS}


@pytest.mark.slow
def test_layer_by_layer_equals_the_whole_model(smollm) -> None:
    ids = smollm.encode_prompt("The capital of France is")
    smollm.prefill(ids)
    whole = smollm.step([ids[-1]])
    smollm.rollback(1)
    stack = LayerStack(smollm.session, smollm.cache, {})
    smollm.cache.begin(1)
    h = stack.run(stack.embed([ids[-1]]), range(stack.num_layers))
    pieces = stack.logits(h)
    smollm.cache.end(1)
    assert pieces.shape == (1, smollm.vocab_size)
    np.testing.assert_array_equal(pieces[0], whole)
    # The next step sees the same cache either way.
    after = smollm.step([11])
    smollm.rollback(2)
    smollm.step([ids[-1]])
    np.testing.assert_array_equal(after, smollm.step([11]))


@pytest.mark.slow
def test_rollback_leaves_the_cache_as_a_run_without_the_rejected_tokens(smollm) -> None:
    ids = smollm.encode_prompt("Rolling back a cache")
    smollm.reset()
    smollm.prefill(ids)
    clean = smollm.step([42])
    smollm.reset()
    smollm.prefill(ids)
    smollm.step([7, 8, 9, 10], all_logits=True)  # a rejected draft, verified in one pass
    smollm.rollback(4)
    assert smollm.cache.length == len(ids) and smollm.cached_ids == ids
    np.testing.assert_array_equal(smollm.step([42]), clean)
    # A layer-skipping draft (skipped layers write nothing) rolled back leaves no trace either.
    smollm.rollback(1)
    SelfDrafter(smollm, [0, 1, 5, 29]).propose([*ids, 42], 3, lambda lg, _h: int(np.argmax(lg)))
    assert smollm.cache.length == len(ids)
    np.testing.assert_array_equal(smollm.step([42]), clean)


@pytest.mark.slow
def test_greedy_self_speculative_output_is_the_full_models(smollm, references) -> None:
    n = int(smollm.artifact.manifest["model"]["num_layers"])
    # Two layers that `edgert calibrate`'s search skips first: most drafts agree (fewer rounds, a
    # quicker test) and some do not, so both paths run.
    skip = {5, 26}
    decoder = SpeculativeDecoder(smollm, SelfDrafter(smollm, [i for i in range(n) if i not in skip]), k=4)
    drafted = accepted = 0
    for prompt, ref in references.items():
        out = [t.id for t in decoder.generate(prompt, max_tokens=64)]
        assert out == ref, prompt
        drafted, accepted = drafted + decoder.stats.drafted, accepted + decoder.stats.accepted
    assert all(len(r) == 64 for r in references.values())
    assert 0 < accepted < drafted  # both the accept and the reject paths ran


@pytest.mark.slow
def test_two_model_drafting_keeps_both_caches_in_step(smollm, smollm_artifact, references) -> None:
    import edgert

    draft = edgert.load(smollm_artifact)  # the same build drafting: every draft must be accepted
    decoder = SpeculativeDecoder(smollm, ModelDrafter(draft, smollm), k=3)
    for prompt in PROMPTS[:2]:
        assert [t.id for t in decoder.generate(prompt, max_tokens=64)] == references[prompt]
        assert decoder.stats.acceptance_rate == 1.0
        assert decoder.stats.generated_tokens == 64 and decoder.stats.rounds == 16


@pytest.mark.slow
def test_sampled_speculation_is_seeded_and_counts_its_drafts(smollm) -> None:
    n = int(smollm.artifact.manifest["model"]["num_layers"])
    drafter = SelfDrafter(smollm, range(n // 2), depth=n // 2)  # an exit-head drafter
    decoder = SpeculativeDecoder(smollm, drafter, k=2)
    params = SamplingParams(temperature=0.8, top_k=40, seed=3)
    first = [t.id for t in decoder.generate("The weather today", max_tokens=20, sampling=params)]
    again = [t.id for t in decoder.generate("The weather today", max_tokens=20, sampling=params)]
    assert first == again and len(first) == 20
    stats = decoder.stats.to_dict()
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["drafted"] >= 2 * stats["rounds"] - 2


@pytest.mark.slow
def test_bad_speculative_options_are_named(smollm) -> None:
    for spec, words in [
        ("fast:k=4", "expected self"),
        ("self:k=0", "k must be"),
        ("self:k=4,skip=3-x", "not an integer"),
        ("self:exit=99", "exit must be"),
        ("self:k=2,depth=3", "unknown option"),
    ]:
        with pytest.raises(EdgertError, match=words):
            parse_speculative(spec, smollm, lambda _p: smollm)
    drafter, k = parse_speculative("self:k=3,skip=3-5,9", smollm, lambda _p: smollm)
    assert k == 3 and not {3, 4, 5, 9} & set(drafter.layers) and 0 in drafter.layers


@pytest.mark.slow
def test_cli_runs_speculative_and_early_exit(smollm_artifact, references) -> None:
    prompt = PROMPTS[1]
    proc = run_cli(
        "run", str(smollm_artifact), "-p", prompt, "--raw", "-n", "24", "--json", "--speculative", "self:k=3,skip=5"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == references[prompt][:24]
    assert result["stats"]["drafted"] > 0 and 0 <= result["stats"]["acceptance_rate"] <= 1
    proc = run_cli("run", str(smollm_artifact), "-p", prompt, "--raw", "-n", "12", "--exit", "static:20")
    assert proc.returncode == 0, proc.stderr
    assert "20.00 of 30 layers per token" in " ".join(proc.stderr.split())
    proc = run_cli("run", str(smollm_artifact), "-p", prompt, "--exit", "static:20", "--speculative", "self:k=2")
    assert proc.returncode != 0 and "pick one" in proc.stderr


def test_the_accept_resample_rule_keeps_the_full_models_distribution() -> None:
    """With sampling, the first token of a round follows the full model's p, whatever the draft's q."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.1, 0.2, 0.3, 0.4])  # a poor draft

    class Full:  # the verifier: the same distribution at every position
        def step(self, ids: list[int], all_logits: bool = False, view: bool = False) -> np.ndarray:
            return np.tile(np.log(p), (len(ids), 1))

        def rollback(self, n: int) -> None:
            pass

    class Draft:
        def propose(self, history, k, pick):
            drafts = []
            for _ in range(k):
                drafts.append(pick(np.log(q), history + drafts))
            return drafts, [np.log(q)] * k

    decoder = SpeculativeDecoder(Full(), Draft(), k=1)  # type: ignore[arg-type]
    params = SamplingParams(temperature=1.0, seed=0)
    sampler = Sampler(params)
    first = [decoder._round([0], 1, sampler, params)[0] for _ in range(8000)]
    freq = np.bincount(first, minlength=4) / len(first)
    np.testing.assert_allclose(freq, p, atol=0.02)
    assert 0.4 < decoder.stats.acceptance_rate < 0.6  # sum(min(p, q)) = 0.45


# -- drafts that cost nothing: prompt lookup and Token Recycling ----------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_host_artifact):
    """The tiny random Llama (fast; its greedy text repeats itself, so drafts are both kept and refused)."""
    import edgert

    return edgert.load(tiny_host_artifact)


def test_lookup_drafts_what_followed_the_latest_match_of_the_last_ngram() -> None:
    pick = lambda lg, h: 0  # noqa: E731 (never called: lookup drafts from the context alone)
    drafter = LookupDrafter(ngram=2)
    ctx = [5, 6, 7, 1, 2, 9, 5, 6, 7, 3, 4, 8, 8, 5, 6, 7]
    assert drafter.propose(ctx, 3, pick) == ([3, 4, 8], [None] * 3)  # the latest of two 3-token matches
    # A 2-gram whose continuation reaches the end of the context: the copy goes on copying itself.
    assert drafter.propose([1, 2, 3, 9, 2, 3], 4, pick)[0] == [9, 2, 3, 9]
    assert LookupDrafter(ngram=3).propose([1, 2, 3, 9, 2, 3], 4, pick) == ([], [])  # shorter than ngram
    assert drafter.propose([1, 2, 3, 4], 4, pick) == ([], [])  # no earlier occurrence: no draft
    assert drafter.propose([4, 4, 4, 4, 4], 2, pick)[0] == [4, 4]  # a run copies itself


def test_lookup_copies_after_the_longest_match_and_says_how_long() -> None:
    drafter = LookupDrafter(ngram=1)
    # The context ends "8 2 3": "8 2 3" occurs at the start, the later "9 2 3" matches 2 tokens only,
    # so the copy follows the earlier, longer match.
    ctx = [8, 2, 3, 5, 6, 9, 2, 3, 7, 1, 8, 2, 3]
    assert drafter.match(ctx) == (3, 3, True)
    found = drafter.candidate(ctx, 3)
    assert found is not None and found.tokens == [5, 6, 9]
    # Draft j extends the match to 3 + j tokens: the key the policy keeps its counts under.
    assert [key[1] for key in found.keys] == [3, 4, 5]
    # Two earlier "4"s followed by different tokens: the match is not unique.
    assert drafter.match([4, 1, 4, 2, 4]) == (3, 1, False)
    assert LookupDrafter(ngram=2).match([4, 1, 4, 2, 4]) is None  # shorter than the shortest match to copy after


def test_lookup_resumes_the_copy_it_was_following_among_equal_matches() -> None:
    """Of several occurrences of the longest match, `LookupDrafter.candidate` takes the first at or after
    where the copy that held last goes on (an output goes through its input in order), not the latest;
    ``match`` takes that place as ``near``; another history starts without one."""
    ctx = [8, 9, 1, 4, 3, 9, 1, 6, 8]
    assert LookupDrafter().match([*ctx, 9, 77, 1]) == (7, 1, False)  # latest "1": 6 follows
    assert LookupDrafter().match([*ctx, 9, 77, 1], near=3) == (3, 1, False)  # the first at or after 3
    drafter = LookupDrafter()
    history = list(ctx)
    for token, first in ((9, 9), (77, 1)):  # the output copies "8 9", then writes 77 where the copy has 1
        found = drafter.candidate(history, 2)
        assert found is not None and found.tokens[0] == first
        history.append(token)
    assert drafter.candidate(history, 2) is None  # 77 occurs nowhere earlier
    history.append(1)
    assert history == [*ctx, 9, 77, 1]
    found = drafter.candidate(history, 2)
    assert found is not None and found.tokens == [4, 3]  # the copy of "8 9 1" resumes, not "9 1 6"
    assert LookupDrafter().candidate(list(history), 2).tokens == [6, 8]  # a fresh drafter: the latest
    # Nothing taken since: the place stays; a new list (another generation) forgets it.
    assert drafter.candidate(history, 2).tokens == [4, 3]
    assert drafter.candidate(list(history), 2).tokens == [6, 8]


def test_lookup_offers_the_other_copies_and_the_policy_takes_a_branch_when_rows_are_cheap() -> None:
    """`LookupDrafter.branches`: what followed the other occurrences of the suffix (longest match
    first, latest first), one per next token; `DraftPolicy.choose_tree` keeps a branch only where
    its row pays."""
    drafter = LookupDrafter()
    # "3 5" occurred once (then 8); "5" alone also at position 4 (then 6): 8 is the main copy.
    ctx = [3, 5, 8, 0, 5, 6, 3, 5]
    assert drafter.candidate(ctx, 2).tokens == [8, 0]
    (other,) = drafter.branches(ctx, {8})
    assert other.tokens == [6, 3, 5] and other.keys[0] == ("branch", 1)
    assert drafter.branches([1, 2], set()) == []  # nothing occurred before
    tree = DraftTree([8, 0, 6], [-1, 0, -1], [("lookup", 12, True), ("lookup", 12, True), ("branch", 2)])
    policy = DraftPolicy(16, max_tree=16)
    policy.time(1, 1.0)
    for rows in (2, 3, 4):
        policy.time(rows, 1.0)  # rows free up to 4: the branch (0.3) is worth its row
    chosen = policy.choose_tree(tree, 15)
    assert chosen.tokens == [8, 0, 6] and chosen.parents == [-1, 0, -1] and not chosen.is_chain
    dear = DraftPolicy(16, max_tree=16)
    for rows, steps in ((1, 1.0), (2, 1.0), (3, 1.0), (4, 1.6)):  # a fourth row costs 0.6 steps
        dear.time(rows, steps)
    chosen = dear.choose_tree(tree, 15)  # the two sure drafts only, a chain
    assert chosen.tokens == [8, 0] and chosen.is_chain


def test_recycle_follows_the_models_first_choice_after_each_token() -> None:
    drafter = RecycleDrafter(vocab_size=6)
    assert drafter.propose([3], 4, None)[0] == []  # nothing seen yet
    logits = np.full((3, 6), -1.0)
    logits[0, 4], logits[1, 5], logits[2, 1] = 2.0, 3.0, 1.0  # after 3 comes 4, after 4 comes 5, after 5 comes 1
    drafter.observe([3, 4, 5], logits)
    assert drafter.propose([0, 3], 5, None) == ([4, 5, 1], [None] * 3)  # stops where the table has nothing
    drafter.observe([5], np.eye(6)[3])  # newer logits replace the old choice: after 5 comes 3
    assert drafter.propose([3], 4, None)[0] == [4, 5, 3, 4]
    # With lookup in front (the default from the CLI): a copy from the context where there is one.
    both = RecycleDrafter(vocab_size=6, lookup=LookupDrafter())
    both.table[:] = drafter.table
    assert both.propose([3, 0, 1, 3], 2, None)[0] == [0, 1]  # "3" occurred before, followed by 0 1
    found = both.candidate([2, 3], 3)  # no earlier 3: the table's chain, keyed as such
    assert found is not None and found.tokens == [4, 5, 3] and found.keys[0][0] == "table"


def test_the_recycle_table_from_argmaxes_given_and_scratch_logits_is_the_same() -> None:
    """`RecycleDrafter.observe` with the rows' argmaxes passed in and logits it may overwrite (what the
    decoder does after its accept walk) fills the same table; without ``scratch`` the logits stay."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    tokens = [4, 9, 4, 17, 250]  # a token twice: the later row wins, as one fancy assignment does
    plain, given = RecycleDrafter(vocab_size=300), RecycleDrafter(vocab_size=300)
    before = logits.copy()
    plain.observe(tokens, logits)
    np.testing.assert_array_equal(logits, before)
    given.observe(tokens, logits, np.argmax(logits, axis=-1), scratch=True)
    np.testing.assert_array_equal(given.table, plain.table)
    order = np.argsort(-before, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(plain.table[[9, 17, 250]], order[[1, 3, 4]])
    one = RecycleDrafter(vocab_size=300)  # a plain step's single row, as the decoder passes it
    one.observe([250], before[4].copy(), np.array([int(np.argmax(before[4]))]), scratch=True)
    np.testing.assert_array_equal(one.table[250], order[4])


def test_lookup_reuses_its_index_only_while_the_history_grows() -> None:
    """`LookupDrafter` adds to its index what the history gained since the last call; a list changed in
    place, shrunk, another list or a tuple is indexed afresh, so its matches equal a fresh drafter's."""
    rng = np.random.default_rng(3)
    history = rng.integers(0, 12, 40).tolist()
    kept = LookupDrafter()
    for _ in range(30):
        history.extend(rng.integers(0, 12, 3).tolist())
        assert kept.match(history) == LookupDrafter().match(list(history))
    history[0] = 99  # changed where the index starts
    assert kept.match(history) == LookupDrafter().match(list(history))
    del history[-5:]  # shrunk
    history[-1] = 98
    assert kept.match(history) == LookupDrafter().match(list(history))
    other = history[:20]
    assert kept.match(other) == LookupDrafter().match(list(other))
    assert kept.match((1, 2, 1)) == LookupDrafter().match([1, 2, 1]) == (1, 1, True)


def test_the_policy_verifies_only_drafts_that_pay() -> None:
    """`DraftPolicy`: drafts expected to yield more tokens per decode step than a plain step."""
    policy = DraftPolicy(max_rows=16)
    assert not policy.ready  # no plain step timed: costs have nothing to be measured against
    policy.time(1, 0.010)
    sure = Candidate(list(range(15)), [("lookup", 12, True)] * 15)  # a long match: 0.97 a draft
    unsure = Candidate([1, 2], [("lookup", 1, False)] * 2)  # one ambiguous token: 0.15
    # Untimed row counts cost the prior 1 + 0.2 (n - 1) steps: a long copy takes nearly every row.
    assert policy.ready and policy.choose(sure, 15) >= 12
    assert policy.choose(unsure, 15) == 0  # 1.15 tokens for 1.2 steps: a plain step pays more
    assert policy.choose(sure, 4) == 4  # never more than k
    policy.time(9, 0.045)  # 9 rows timed at 4.5 steps: more rows are assumed to cost at least that
    assert policy.cost(12) == pytest.approx(4.5) and policy.cost(4) == pytest.approx(1.6)
    # Timed: 9 rows and more cost 4.5 steps, 8 rows 2 steps: the policy stops at 8 rows.
    for rows in range(2, 17):
        policy.time(rows, 0.010 * (1 + 0.14 * (rows - 1) if rows <= 8 else 4.5))
    assert policy.choose(sure, 15) == 7
    assert policy.cost(8) == pytest.approx(1.98)
    # A slow pass (the core was taken) does not count: the fastest of the last ones does.
    policy.time(8, 0.5)
    assert policy.cost(8) == pytest.approx(1.98)
    # A row count timed only when the core was taken costs no more than more rows were timed at.
    unlucky = DraftPolicy(max_rows=16)
    unlucky.time(1, 0.010)
    unlucky.time(5, 0.040)
    unlucky.time(8, 0.020)
    assert unlucky.cost(5) == pytest.approx(2.0) and unlucky.cost(6) == pytest.approx(2.0)
    # Drafts of a key that keep failing lose the policy's trust; kept ones gain it.
    key = ("lookup", 3, True)
    start = policy.acceptance(key)
    for _ in range(40):
        policy.record([key, ("lookup", 4, True)], 0)
    assert policy.acceptance(key) < start / 2 and policy.choose(Candidate([1], [key]), 15) == 0
    assert ("lookup", 4, True) not in policy.counts  # never tried: its draft came after a rejection
    for _ in range(200):
        policy.record([key], 1)
    assert policy.acceptance(key) > start


def test_greedy_lookup_and_recycle_output_is_plain_decoding(tiny) -> None:
    references = {p: [t.id for t in tiny.generate(p, max_tokens=24)] for p in PROMPTS}
    trees = 0
    for spec in ("lookup:k=5", "recycle:k=4", "lookup:k=3,ngram=2", "lookup", "recycle:k=6,tree=0"):
        drafter, k = parse_speculative(spec, tiny, lambda _p: tiny)
        # Without the policy every chance to draft is taken, so both the accept and reject paths run.
        decoder = SpeculativeDecoder(tiny, drafter, k, policy=False)
        # The default: the policy picks the rounds and their length (up to 16 rows), the speed only.
        policy = SpeculativeDecoder(tiny, drafter, k)
        assert policy.policy is not None and decoder.policy is None
        drafted = accepted = 0
        for prompt, ref in references.items():
            assert [t.id for t in decoder.generate(prompt, max_tokens=24)] == ref, (spec, prompt)
            drafted, accepted = drafted + decoder.stats.drafted, accepted + decoder.stats.accepted
            trees += decoder.stats.trees
            assert [t.id for t in policy.generate(prompt, max_tokens=24)] == ref, (spec, prompt)
        assert 0 < accepted < drafted, spec
        # recycle verifies token trees (breadth first without the policy); tree=0 and lookup, chains
        assert (decoder.tree > 0) == spec.startswith("recycle:k=4"), spec
        gated = SpeculativeDecoder(tiny, drafter, k, gate=True, policy=False)  # the gate changes the speed only
        assert [t.id for t in gated.generate(PROMPTS[2], max_tokens=24)] == references[PROMPTS[2]]
    assert trees > 0


def test_no_round_drafts_past_the_tokens_left(tiny) -> None:
    """A round emits its kept drafts and one token more: with n tokens left it drafts at most n - 1, and
    the last token is a plain step's (the tiny model's text repeats, so every chance is a draft)."""
    for max_tokens in (1, 2, 5, 11):
        ref = [t.id for t in tiny.generate(PROMPTS[0], max_tokens=max_tokens)]
        drafter, k = parse_speculative("lookup:k=8", tiny, lambda _p: tiny)
        decoder = SpeculativeDecoder(tiny, drafter, k, policy=False)
        out = [t.id for t in decoder.generate(PROMPTS[0], max_tokens=max_tokens)]
        assert out == ref
        st = decoder.stats
        # every emitted token after the first came from a pass or a plain step; none were cut off
        assert st.accepted + st.rounds + st.plain_steps == len(out) - 1, (max_tokens, st.to_dict())
        assert max(st.passes, default=1) <= max(max_tokens - 1, 1)


def test_a_deterministic_draft_keeps_the_full_models_distribution() -> None:
    """Lookup and recycle drafts have q = 1 on their token: kept with probability p(d), else resampled without d."""
    p = np.array([0.5, 0.3, 0.15, 0.05])

    class Full:
        def step(self, ids: list[int], all_logits: bool = False, view: bool = False) -> np.ndarray:
            return np.tile(np.log(p), (len(ids), 1))

        def rollback(self, n: int) -> None:
            pass

    class Fixed:  # always drafts token 1, as a lookup would
        def propose(self, history, k, pick):
            return [1] * k, [None] * k

    decoder = SpeculativeDecoder(Full(), Fixed(), k=1)  # type: ignore[arg-type]
    params = SamplingParams(temperature=1.0, seed=1)
    sampler = Sampler(params)
    first = [decoder._round([0], 1, sampler, params)[0] for _ in range(8000)]
    np.testing.assert_allclose(np.bincount(first, minlength=4) / len(first), p, atol=0.02)
    assert abs(decoder.stats.acceptance_rate - p[1]) < 0.03

    class Offered(Fixed):  # offers candidates, so the policy decides (it learns p(1) and keeps drafting)
        def candidate(self, history, limit):
            return Candidate([1] * limit, [("lookup", 12, True)] * limit)

    decoder = SpeculativeDecoder(Full(), Offered(), k=1)  # type: ignore[arg-type]
    assert decoder.policy is not None
    decoder.policy.time(1, 0.01)
    decoder.policy.time(2, 0.001)  # a pass costs no more than a step: always worth a draft
    first = [decoder._round([0], 1, sampler, params)[0] for _ in range(8000)]
    np.testing.assert_allclose(np.bincount(first, minlength=4) / len(first), p, atol=0.02)
    assert decoder.stats.plain_steps == 0 and abs(decoder.stats.acceptance_rate - p[1]) < 0.03


def test_a_draft_tree_keeps_the_full_models_distribution() -> None:
    """A tree walked with sampling: the children of a kept node are tried in turn, each kept with its
    probability under what the siblings before it left (p without their tokens), else the token is
    drawn from that rest; every emitted token, first and second, follows the full model's p."""
    p = np.array([0.4, 0.3, 0.2, 0.1])

    class Cache:
        tree, rows = 16, 16

    class Full:
        cache = Cache()

        def __init__(self) -> None:
            self.kept: list[int] = []

        def step_tree(self, ids: list[int], parents: list[int], view: bool = False) -> np.ndarray:
            return np.tile(np.log(p), (len(ids), 1))

        def accept_tree(self, ids: list[int], parents: list[int], leaf: int) -> None:
            self.kept.append(leaf)

    class Tree:  # below the pending token: 1, then 2 (a sibling), then 0 (below the 1)
        width = 3

        def tree(self, history, limit):
            return DraftTree([1, 2, 0], [-1, -1, 0], [("alt", 0), ("alt", 1), ("table", 1)])

    full = Full()
    decoder = SpeculativeDecoder(full, Tree(), k=3, policy=False)  # type: ignore[arg-type]
    assert decoder.tree == 16
    params = SamplingParams(temperature=1.0, seed=2)
    sampler = Sampler(params)
    rounds = [decoder._round([0], 3, sampler, params) for _ in range(12000)]
    first = np.bincount([r[0] for r in rounds], minlength=4) / len(rounds)
    np.testing.assert_allclose(first, p, atol=0.02)
    # After a kept 1, its child 0 was tried: the next token still follows p.
    second = [r[1] for r in rounds if r[0] == 1]
    np.testing.assert_allclose(np.bincount(second, minlength=4) / len(second), p, atol=0.03)
    # The cache keeps the path walked: node 1 (the draft 1) or 3 (its child) after a kept 1, else the root.
    assert {leaf for r, leaf in zip(rounds, full.kept, strict=True) if r[0] != 1 and r[0] != 2} == {0}
    assert decoder.stats.trees == len(rounds) and decoder.stats.accepted > 0


def test_the_gate_pauses_drafting_while_rounds_are_slower_than_plain_steps() -> None:
    gate = DraftGate(pause=2, probe=5)
    assert not gate.draft_now()  # no plain step timed yet
    gate.record(False, 0.010, 1)
    assert gate.draft_now()
    gate.record(True, 0.030, 2)  # 15 ms a token against 10: pause 2 steps, then 4
    assert [gate.draft_now() for _ in range(3)] == [False, False, True]
    gate.record(True, 0.030, 1)
    assert [gate.draft_now() for _ in range(5)] == [False] * 4 + [True]
    for _ in range(5):  # rounds that pay: drafting goes on, with a plain step timed every 5 rounds
        gate.record(True, 0.012, 3)
    assert not gate.draft_now()
    gate.record(False, 0.010, 1)
    assert gate.draft_now() and gate.pause == 2


def test_lookup_and_recycle_options_are_checked(tiny) -> None:
    drafter, k = parse_speculative("lookup", tiny, lambda _p: tiny)
    assert isinstance(drafter, LookupDrafter) and k == 15 and drafter.ngram == 1
    drafter, k = parse_speculative("recycle:k=3", tiny, lambda _p: tiny)
    # The build verifies token trees (kv_cache.verify_tree): the table keeps 3 choices, no note to print.
    assert isinstance(drafter, RecycleDrafter) and k == 3 and drafter.width == 3 and not drafter.note
    assert isinstance(drafter.lookup, LookupDrafter)  # lookup first, the table where it misses
    assert parse_speculative("recycle:tree=0", tiny, lambda _p: tiny)[0].width == 1  # chains only
    bad = [("lookup:ngram=0", "ngram must be"), ("recycle:skip=3", "unknown option"), ("look", "lookup")]
    for spec, words in [*bad, ("recycle:tree=2", "tree must be")]:
        with pytest.raises(EdgertError, match=words):
            parse_speculative(spec, tiny, lambda _p: tiny)


def test_cli_runs_lookup_decoding(tiny_host_artifact, tiny) -> None:
    prompt = PROMPTS[0]
    proc = run_cli(
        "run", str(tiny_host_artifact), "-p", prompt, "--raw", "-n", "16", "--json", "--speculative", "lookup"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == [t.id for t in tiny.generate(prompt, max_tokens=16)]
    assert result["stats"]["drafted"] + result["stats"]["plain_steps"] > 0
    args = ("run", str(tiny_host_artifact), "-p", prompt, "--raw", "-n", "8", "--json", "--speculative", "recycle")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == result["tokens"][:8]


def test_bench_times_a_verify_pass_at_several_contexts(tiny_host_artifact) -> None:
    """`bench_verify(contexts=...)`: the same alternated rounds at each cache length, shortest first,
    the main figures those of ``prompt_tokens``; a length past the model's context is refused."""
    from edgert.profile import bench_verify

    r = bench_verify(tiny_host_artifact, rows=3, rounds=3, threads=1, prompt_tokens=16, contexts=(40, 8, 16))
    assert [c["prompt_tokens"] for c in r["by_context"]] == [8, 16, 40]
    at = {c["prompt_tokens"]: c for c in r["by_context"]}
    for key in ("decode_ms_min", "verify_ms_min", "verify_over_decode", "verify_over_decode_median"):
        assert r[key] == at[16][key]
    for c in r["by_context"]:
        assert c["verify_over_decode"] == pytest.approx(c["verify_ms_min"] / c["decode_ms_min"], rel=0.01)
        assert c["decode_ms_min"] <= c["decode_ms_median"]
        assert c["verify_over_decode_paired"] > 0
    assert "by_context" not in bench_verify(tiny_host_artifact, rows=2, rounds=1, threads=1, prompt_tokens=8)
    with pytest.raises(EdgertError, match="exceed the context"):
        bench_verify(tiny_host_artifact, rows=3, rounds=1, threads=1, prompt_tokens=8, contexts=(10**6,))


@pytest.mark.slow
def test_bench_times_a_verify_pass_in_decode_steps(tiny_host_artifact) -> None:
    """`edgert bench --verify-rows`: both entries timed at the same cache position, the ratio of the
    minimums reported (and the CPU-time one with one thread); a model without verify is refused."""
    proc = run_cli(
        "bench", str(tiny_host_artifact), "--verify-rows", "3", "-r", "3", "-t", "1", "--operators", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["rows"] == 3 and r["rounds"] == 3 and r["threads"] == 1
    assert r["verify_over_decode"] == pytest.approx(r["verify_ms_min"] / r["decode_ms_min"], rel=0.01)
    assert r["cpu_verify_over_decode"] > 0 and r["decode_ms_min"] > 0
    # Per VM call: the cache's attention once per layer (2) in a decode step and in a verify pass.
    ops = {o["operator"]: o for o in r["operators"]}
    attention = ops["vm.builtin.attention_kv_cache_attention_with_fused_qkv"]
    assert attention["decode_calls"] == attention["verify_calls"] == 2
    assert sum(o["verify_ms"] for o in r["operators"]) > 0
    proc = run_cli("bench", str(tiny_host_artifact), "--verify-rows", "3", "--prompt-tokens", "0")
    assert proc.returncode != 0 and "need at least 1" in proc.stderr


@pytest.mark.slow
def test_lookup_and_recycle_on_smollm2_grounded_prompts(smollm) -> None:
    """SmolLM2 on three of the project's input-grounded prompts: plain decoding's tokens, drafts mostly kept."""
    from conftest import ROOT

    suite = [json.loads(line)["prompt"] for line in (ROOT / "models/prompts/grounded.jsonl").read_text().splitlines()]
    prompts = [suite[1], suite[6], suite[8]]  # a grammar fix and two code edits: answers that copy the input
    references = [[t.id for t in smollm.generate(p, max_tokens=48, chat=True)] for p in prompts]
    for spec in ("lookup", "recycle"):
        drafter, k = parse_speculative(spec, smollm, lambda _p: smollm)
        decoder = SpeculativeDecoder(smollm, drafter, k, policy=False)
        # The policy's rounds, up to 16 rows a pass (recycle: lookup and the table both).
        chosen = SpeculativeDecoder(smollm, drafter, k) if spec == "recycle" else None
        drafted = accepted = 0
        for prompt, ref in zip(prompts, references, strict=True):
            assert [t.id for t in decoder.generate(prompt, max_tokens=48, chat=True)] == ref, (spec, prompt)
            drafted, accepted = drafted + decoder.stats.drafted, accepted + decoder.stats.accepted
            if chosen is not None:
                assert [t.id for t in chosen.generate(prompt, max_tokens=48, chat=True)] == ref, (spec, prompt)
        assert 0 < accepted < drafted, spec
        if spec == "lookup":
            assert accepted / drafted > 0.1  # copies of the input: far above chance (1 in 49,152)


def test_replaying_drafts_against_plain_output_counts_what_the_policy_would_run() -> None:
    """`tools/replay_drafts.py`: a draft is kept where it equals plain decoding's next token; every
    emitted token is counted once, passes at the table's cost."""
    from conftest import load_tool

    replay = load_tool("replay_drafts").replay
    costs = {n: 1.0 + 0.2 * (n - 1) for n in range(2, 17)}
    prompt = [7, *range(100, 140)]
    copy = [*range(100, 140)]  # the answer repeats the prompt: long drafts, nearly all kept
    policy = DraftPolicy(16)
    policy.time(1, 1.0)
    got = replay(prompt, copy, costs, "policy", 15, policy)
    assert got["tokens"] == len(copy) - 1  # the tokens after the first, each once
    assert 0 <= got["accepted"] + got["verifies"] + got["plain"] - got["tokens"] <= 1  # the last pass may overrun
    assert got["verifies"] > 0 and got["tokens"] / got["steps"] > 2.0
    # Nothing in the context to copy: plain steps only, whatever the mode.
    fresh = [*range(500, 520)]
    for mode in ("policy", "every-k"):
        got = replay(prompt, fresh, costs, mode, 6, policy)
        assert got["verifies"] == 0 and got["plain"] == got["tokens"] == len(fresh) - 1


def test_the_replays_hindsight_and_oracle_bound_the_policys_rounds() -> None:
    """`tools/replay_drafts.py --analyse`: with hindsight no pass keeps nothing (``veto``) or runs past
    the kept drafts (``exact``); the oracle's steps are at most any replay's and at least the tokens
    over the best tokens-per-step a pass could give."""
    from conftest import load_tool

    tool = load_tool("replay_drafts")
    costs = {n: 1.0 + 0.2 * (n - 1) for n in range(2, 17)}
    prompt = [7, *range(100, 160)]
    # A copy of the input with edits (a word changed, one left out, one added) and a fresh tail.
    output = [*range(100, 115), 900, *range(116, 130), *range(131, 150), 901, *range(150, 160), *range(600, 610)]
    tokens = len(output) - 1
    oracle = tool.oracle_steps(prompt, output, costs, 15)
    assert tokens / max(n / c for n, c in costs.items()) <= oracle < tokens
    for hindsight in ("", "veto", "exact", "both"):
        policy = DraftPolicy(16)
        policy.time(1, 1.0)
        got = tool.replay(prompt, output, costs, "policy", 15, policy, hindsight)
        assert got["tokens"] == tokens and got["steps"] >= oracle - 1e-9, hindsight
        if hindsight in ("veto", "both"):
            assert got["wasted"] == 0 and got["wasted_steps"] == 0.0
        if hindsight in ("exact", "both"):
            assert got["overrun_steps"] == 0.0
        assert got["no_draft"] >= 9  # the fresh tail's tokens have nothing to copy (its first has no match)
    # `--features`: every place with a draft counted once by match length; the copy's long matches hold.
    full = prompt + output
    top = np.array([[t, 0, 0] for t in full[1:]] + [[0, 0, 0]])  # the model's first choice: the next token
    found = tool.first_draft_features([(prompt, output)], [top], [[0.95] * len(full)])
    places = sum(1 for t in range(len(prompt), len(full) - 1) if LookupDrafter().match(full[: t + 1]) is not None)
    assert sum(c for c, _ in found["match"].values()) == places
    assert found["match"]["6u"][1] > 0.8


def test_the_replay_can_tell_the_policy_a_wrong_cost_table_or_another_ngram() -> None:
    """`tools/replay_drafts.py --belief` / ``--ngram``: the passes are counted at their true cost whatever
    the policy is told; told they cost far more, it takes plain steps only; a shortest match of 2 tokens
    drafts nothing where the context repeats single tokens only."""
    from conftest import load_tool

    tool = load_tool("replay_drafts")
    replay = tool.replay
    costs = {n: 1.0 + 0.2 * (n - 1) for n in range(2, 17)}
    prompt = [7, *range(100, 140)]
    copy = [*range(100, 140)]

    def policy(table: dict[int, float]) -> DraftPolicy:
        return tool.timed_policy(16, table)

    right = replay(prompt, copy, costs, "policy", 15, policy(costs))
    assert replay(prompt, copy, costs, "policy", 15, policy(costs), "", costs) == right
    dear = {n: 3.0 * n for n in costs}  # no pass could pay at these costs
    told = replay(prompt, copy, costs, "policy", 15, policy(dear), "", dear)
    assert told["verifies"] == 0 and told["steps"] == told["tokens"] == len(copy) - 1
    assert right["steps"] < told["steps"]
    # Each prompt token once, in the output between fresh ones: matches of one token only.
    interleaved = [t for pair in zip(range(500, 530), range(100, 130), strict=True) for t in pair]
    assert replay(prompt, interleaved, costs, "policy", 15, policy(costs))["verifies"] > 0
    assert replay(prompt, interleaved, costs, "policy", 15, policy(costs), "", None, 2)["verifies"] == 0


def _longest_match(ctx: list[int], max_match: int, ngram: int = 1) -> tuple[int, int, bool] | None:
    """`LookupDrafter.match` by brute force: every earlier position's backward match with the suffix."""
    last = len(ctx) - 1
    lengths = {}
    for end in range(last):
        n = 0
        while n < max_match and end - n >= 0 and ctx[end - n] == ctx[last - n]:
            n += 1
        if n:
            lengths[end] = n
    if not lengths or max(lengths.values()) < ngram:
        return None
    n = max(lengths.values())
    ends = [end for end, length in lengths.items() if length == n]
    return ends[-1] + 1, n, len({ctx[end + 1] for end in ends}) == 1


def test_the_incremental_lookup_index_matches_a_brute_force_search() -> None:
    """`LookupDrafter` keeps a position index of the growing history (updated by the new tokens only);
    its matches equal a search of every earlier position, while the list grows and after it changes."""
    rng = np.random.default_rng(11)
    for max_match, ngram in ((64, 1), (4, 1), (64, 2)):
        drafter = LookupDrafter(ngram=ngram, max_match=max_match)
        history = rng.integers(0, 9, 5).tolist()
        for step in range(120):
            if step % 3 == 0 and len(history) > 12:  # copies of earlier text: long matches
                at = int(rng.integers(0, len(history) - 8))
                history.extend(history[at : at + int(rng.integers(1, 8))])
            history.append(int(rng.integers(0, 9)))
            assert drafter.match(history) == _longest_match(history, max_match, ngram)
            if step == 60:
                history[0], history[-1] = 99, 98  # changed where its ends show it: indexed afresh
                assert drafter.match(history) == _longest_match(history, max_match, ngram)


def test_the_pruned_tree_gives_the_policys_choice_of_the_whole_tree() -> None:
    """`RecycleDrafter.best_tree` builds only the nodes that could be among the likeliest; what it
    returns is `DraftPolicy.choose_tree` of the whole tree, node for node, whatever the counts say."""
    rng = np.random.default_rng(5)
    keys = [("lookup", n, u) for n in range(1, 13) for u in (True, False)]
    keys += [("alt", r) for r in range(3)] + [("branch", n) for n in range(1, 5)]
    keys += [("table", j) for j in range(1, 4)] + [("branch-next", j) for j in range(1, 3)]
    trees = 0
    for _trial in range(12):
        vocab = int(rng.integers(5, 40))
        drafter = RecycleDrafter(vocab_size=vocab, lookup=LookupDrafter())
        drafter.table[:] = rng.integers(-1, vocab, (vocab, 3))
        policy = DraftPolicy(16, max_tree=16)
        policy.time(1, 1.0)
        for rows in range(2, 17):
            policy.time(rows, 1.0 + float(rng.uniform(0.02, 0.3)) * rows)
        for key in keys:
            if rng.random() < 0.7:
                tried = float(rng.integers(1, 50))
                policy.counts[key] = [tried, float(rng.integers(0, int(tried) + 1))]
        history = rng.integers(0, vocab, 40).tolist()
        history += history[5:25]
        for _ in range(6):
            history.append(int(rng.integers(0, vocab)))
            for limit in (1, 4, 15):
                whole = drafter.tree(history, limit)
                best = drafter.best_tree(history, limit, policy)
                assert (whole is None) == (best is None)
                if whole is not None:
                    chosen = policy.choose_tree(whole, limit)
                    assert (best.tokens, best.parents, best.keys) == (chosen.tokens, chosen.parents, chosen.keys)
                    trees += len(chosen) > 1 and not chosen.is_chain
    assert trees  # some choices were trees, not only chains
