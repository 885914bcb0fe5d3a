"""Generation with the compiled SmolLM2 (slow), and the sampling rules on their own (fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgert
from edgert.errors import ContextLengthError
from edgert.runtime import Generator
from edgert.runtime.generator import GenerationStats, TokenEmitter
from edgert.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, token_probabilities

QUESTION = "What is the capital of France?"
STORY = "Tell me a long story about a dragon who learns to fly."


def ids_of(model: Generator, prompt: str, **kwargs: object) -> list[int]:
    return [t.id for t in model.generate(prompt, chat=True, **kwargs)]


@pytest.fixture(scope="module")
def small_context(smollm_artifact: Path) -> Generator:
    """The same artifact loaded with a 64-token context."""
    return edgert.load(smollm_artifact, context_length=64)


# -- generation ------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_is_deterministic(smollm: Generator) -> None:
    smollm.reset()
    first = ids_of(smollm, QUESTION, max_tokens=24)
    smollm.reset()
    second = ids_of(smollm, QUESTION, max_tokens=24)
    third = ids_of(smollm, QUESTION, max_tokens=24)  # the prompt now comes from the cache
    assert smollm.stats.cached_tokens > 0
    assert len(first) > 0
    assert first == second == third
    assert "Paris" in smollm.tokenizer.decode(first)


@pytest.mark.slow
def test_sampling_seed_reproduces_and_seeds_differ(smollm: Generator) -> None:
    def sample(seed: int) -> tuple[int, ...]:
        smollm.reset()
        return tuple(
            ids_of(
                smollm,
                "Write a short poem about the sea.",
                max_tokens=12,
                sampling=SamplingParams(temperature=1.0, seed=seed),
            )
        )

    assert sample(7) == sample(7)
    outputs = {sample(seed) for seed in range(4)}
    assert len(outputs) > 1, "four seeds at temperature 1.0 gave the same tokens"
    smollm.reset()
    greedy = tuple(ids_of(smollm, "Write a short poem about the sea.", max_tokens=12))
    assert greedy == tuple(
        ids_of(
            smollm,
            "Write a short poem about the sea.",
            max_tokens=12,
            sampling=SamplingParams(temperature=1.0, top_k=1, seed=3),
        )
    )


@pytest.mark.slow
def test_max_tokens_is_honoured(smollm: Generator) -> None:
    for n in (1, 5):
        toks = ids_of(smollm, STORY, max_tokens=n)
        assert len(toks) == n
        assert smollm.stats.generated_tokens == n
        assert smollm.stats.stop_reason == "max_tokens"
    with pytest.raises(ValueError, match="max_tokens"):
        ids_of(smollm, STORY, max_tokens=0)


@pytest.mark.slow
def test_stop_string_stops_generation(smollm: Generator) -> None:
    full = "".join(t.text for t in smollm.generate(QUESTION, max_tokens=32, chat=True))
    assert "France" in full and "Paris" in full and full.index("France") < full.index("Paris")
    assert smollm.stats.stop_reason == "stop_token"
    text = "".join(t.text for t in smollm.generate(QUESTION, max_tokens=32, chat=True, stop=["France"]))
    assert smollm.stats.stop_reason == "stop_string"
    assert "France" in text and "Paris" not in text
    assert full.startswith(text)


@pytest.mark.slow
def test_prompt_longer_than_context_is_refused(small_context: Generator) -> None:
    prompt = "Please summarise the following words: " + "apple banana cherry " * 40
    n = len(small_context.encode_prompt(prompt, chat=True))
    assert n > 64
    with pytest.raises(ContextLengthError) as info:
        list(small_context.generate(prompt, chat=True))
    assert str(n) in str(info.value) and "64" in str(info.value)
    # The refused prompt left the model usable.
    assert "Paris" in small_context.tokenizer.decode(ids_of(small_context, QUESTION, max_tokens=16))


@pytest.mark.slow
def test_context_length_above_the_compiled_one_is_refused(smollm_artifact: Path, smollm: Generator) -> None:
    compiled = smollm.artifact.manifest["kv_cache"]["context_length"]
    with pytest.raises(ContextLengthError) as info:
        edgert.load(smollm_artifact, context_length=compiled * 2)
    assert str(compiled * 2) in str(info.value) and str(compiled) in str(info.value)


@pytest.mark.slow
def test_generation_stops_when_the_context_is_full(small_context: Generator) -> None:
    small_context.reset()
    toks = ids_of(small_context, STORY, max_tokens=500)
    stats = small_context.stats
    assert stats.stop_reason == "context_full"
    assert small_context.cache.length == 64
    # Every token but the last one went through the cache, which is full.
    assert stats.prompt_tokens + stats.generated_tokens == 65
    assert len(toks) == stats.generated_tokens


@pytest.mark.slow
def test_score_matches_prefill(smollm: Generator) -> None:
    ids = smollm.encode_prompt(QUESTION, chat=True)
    scores = smollm.score(ids)
    assert scores.shape == (len(ids), smollm.artifact.manifest["model"]["vocab_size"])
    for n in (len(ids), len(ids) // 2):
        smollm.reset()
        logits = smollm.prefill(ids[:n])
        np.testing.assert_allclose(scores[n - 1], logits, atol=1e-3, rtol=0)
    assert not np.allclose(scores[-1], scores[len(ids) // 2 - 1], atol=1e-3)


@pytest.mark.slow
def test_one_token_steps_read_each_new_token(smollm: Generator) -> None:
    """Decode steps refill one input tensor: each step must see its own token, as a prefill of the
    whole sequence does."""
    ids = smollm.encode_prompt(QUESTION, chat=True)
    smollm.reset()
    logits = smollm.prefill(ids)
    steps = [4, 300, 1000]  # not the greedy tokens: a stale input would go unnoticed less often
    for token in steps:
        logits = smollm.step([token])
    smollm.reset()
    np.testing.assert_allclose(smollm.prefill([*ids, *steps]), logits, atol=1e-3, rtol=0)
    smollm.reset()
    assert not np.allclose(smollm.prefill([*ids, 4, 4, 4]), logits, atol=1e-3)


@pytest.mark.slow
def test_chat_reuses_the_cache_and_matches_a_fresh_run(smollm: Generator) -> None:
    smollm.reset()
    session = smollm.chat()
    first = [t.id for t in session.send(QUESTION, max_tokens=32)]
    first_prompt = smollm.stats.prompt_tokens
    assert "Paris" in smollm.tokenizer.decode(first)
    second = [t.id for t in session.send("And of Germany?", max_tokens=32)]
    stats = smollm.stats
    assert stats.cached_tokens >= first_prompt > 0  # the whole first turn's prompt came from the cache
    assert stats.cached_tokens < stats.prompt_tokens
    assert "Berlin" in smollm.tokenizer.decode(second)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]

    conversation = smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template(session.messages[:3]))
    assert len(conversation) == stats.prompt_tokens
    smollm.reset()
    fresh = [t.id for t in smollm.generate(conversation, max_tokens=32)]
    assert smollm.stats.cached_tokens == 0
    assert fresh == second


# -- token emission (no model) ----------------------------------------------------------------
class _Letters:
    """A tokenizer stand-in: token i is the letter chr(97 + i); 25 ('z') is the stop token."""

    stop_token_ids = frozenset({25})

    def stream(self) -> _Letters:
        return self

    def push(self, token: int) -> str:
        return chr(97 + token)


@pytest.mark.parametrize(
    ("ids", "max_tokens", "stop", "text", "reason"),
    [
        ([0, 1, 25, 2], 10, (), "ab", "stop_token"),
        ([0, 1, 2, 3], 10, ("bc",), "abc", "stop_string"),
        ([0, 1, 2, 3], 2, ("",), "ab", "max_tokens"),
        ([0, 1], 10, (), "ab", ""),
    ],
)
def test_token_emitter_ends_as_generate_does(ids: list[int], max_tokens: int, stop: tuple, text: str, reason: str):
    """The emission every decoder shares: the stopping token is not emitted, a stop string's is."""
    stats = GenerationStats(prompt_tokens=1)
    out = TokenEmitter(_Letters(), [7], stats, max_tokens, stop)  # type: ignore[arg-type]
    tokens = list(out.emit(ids))
    assert "".join(t.text for t in tokens) == text and stats.stop_reason == reason and out.done == bool(reason)
    assert stats.generated_tokens == len(tokens) and out.history == [7, *(t.id for t in tokens)]


# -- sampling rules (no model) ----------------------------------------------------------------
def random_logits(seed: int, n: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


def test_negative_temperature_is_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        logits = random_logits(seed)
        assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))
        probs = token_probabilities(logits, SamplingParams())
        assert probs[int(np.argmax(logits))] == 1.0 and probs.sum() == 1.0


def test_top_k_one_is_greedy() -> None:
    for seed in range(5):
        logits = random_logits(seed)
        params = SamplingParams(temperature=1.5, top_k=1, seed=seed)
        assert params.greedy
        sampler = Sampler(params)
        assert all(sampler(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_k_keeps_the_k_best() -> None:
    logits = random_logits(1)
    probs = token_probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(np.flatnonzero(probs)) == set(np.argsort(-logits)[:3])


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Shuffled so the order of the ids is not the order of the probabilities.
    p = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(p)
    params = lambda top_p: SamplingParams(temperature=1.0, top_p=top_p)  # noqa: E731
    for top_p, keep in [
        (0.3, {1}),
        (0.49, {1}),
        (0.51, {1, 3}),
        (0.79, {1, 3}),
        (0.81, {1, 3, 2}),
        (0.94, {1, 3, 2}),
        (0.96, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ]:
        probs = token_probabilities(logits, params(top_p))
        assert set(np.flatnonzero(probs)) == keep, top_p
        np.testing.assert_allclose(probs[sorted(keep)], p[sorted(keep)] / p[sorted(keep)].sum())
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    assert {sampler(logits) for _ in range(200)} == {1, 3}


def test_repetition_penalty() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, -1.0, 0.25])  # seen: divided if > 0, multiplied if < 0
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.5])  # the input is untouched
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [0, 1], 1.0), logits)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [], 2.0), logits)
    # It can change the greedy choice: token 0 leads, but it was seen.
    logits = np.array([2.0, 1.5, 0.0], dtype=np.float32)
    assert Sampler(SamplingParams())(logits, history=[0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, history=[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.5},
        {"top_p": float("nan")},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
    ],
)
def test_invalid_sampling_params_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_token_probabilities_sum_to_one() -> None:
    logits = random_logits(3, n=1000)
    history = [1, 5, 9, 5]
    for params in [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=40),
        SamplingParams(temperature=1.3, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.5, repetition_penalty=1.3),
    ]:
        probs = token_probabilities(logits, params, history)
        assert probs.shape == logits.shape
        assert np.all(probs >= 0)
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)


def test_sampler_follows_the_distribution_and_its_seed() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=11))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh sampler with the same seed draws the same token
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.03)
    # Lower temperature sharpens the distribution.
    sharp = token_probabilities(logits, SamplingParams(temperature=0.5))
    assert sharp[0] > 0.6 and sharp[2] < 0.1


@pytest.mark.slow
def test_token_ids_outside_the_vocabulary_are_refused(smollm: Generator) -> None:
    smollm.reset()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(smollm.generate([1, smollm.vocab_size + 5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.score([-1, 2])
    assert smollm.cache.length == 0  # nothing reached the cache


@pytest.mark.slow
def test_thread_pool_uses_the_threads_asked_for_and_leaves_the_caller_free(smollm: Generator) -> None:
    import os

    from conftest import START_AFFINITY

    from edgert.runtime.session import configure_threads

    # TVM alone would size its pool to half the CPUs; the session sizes it explicitly. (Other
    # tests load models with other thread counts in this process, so the pool is set again here.)
    assert smollm.session.threads >= 1
    assert configure_threads(smollm.session.threads) == smollm.session.threads
    assert os.environ["TVM_NUM_THREADS"] == str(smollm.session.threads)
    # TVM's affinity setting pins the calling thread; the session gives it back its CPUs.
    assert os.sched_getaffinity(0) == START_AFFINITY


def test_a_manifest_without_kv_cache_is_a_one_line_error() -> None:
    from types import SimpleNamespace

    from edgert.errors import ArtifactError
    from edgert.runtime.generator import _language_model_sections

    for manifest in ({"model": {"vocab_size": 10}}, {"kv_cache": {"context_length": "x"}, "model": {}}):
        with pytest.raises(ArtifactError, match="not a language model build"):
            _language_model_sections(SimpleNamespace(path="thin.edgert", manifest=manifest))
