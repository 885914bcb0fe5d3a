"""The KV budget (TOVA eviction) on the tiny Llama built with --evictable-kv."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.runtime.tvm_runtime import global_func, to_numpy


@pytest.fixture(scope="module")
def tiny_evictable(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with RoPE before the cache and the *_at entry points (float activations, as the
    host build it is compared with)."""
    from edgert.families.compile import compile_model

    out = tmp_path_factory.mktemp("tiny-ev") / "tiny-ev.edgert"
    compile_model(str(tiny_gguf_file), target="host", output=out, evictable_kv=True, activations="f32")
    return out


@pytest.fixture(scope="module")
def engines(tiny_evictable: Path) -> Iterator[dict[str, Any]]:
    from edgert.artifact.reader import open_artifact
    from edgert.serve.engine import LLMEngine

    made = {
        "full": LLMEngine(open_artifact(tiny_evictable), max_batch=2, prefix_cache_tokens=0),
        "budget": LLMEngine(open_artifact(tiny_evictable), max_batch=2, prefix_cache_tokens=0, kv_budget=48),
    }
    yield made
    for e in made.values():
        e.close()


def _generate(engine: Any, prompt: list[int], n: int, on_event: Any = None) -> tuple[str, str]:
    from edgert.runtime.sampling import SamplingParams

    done = threading.Event()
    text: list[str] = []
    end: list[str] = []

    def sink(event: tuple[str, Any]) -> None:
        if on_event is not None:
            on_event()
        if event[0] == "text":
            text.append(event[1])
        else:
            end.append(f"{event[0]}:{event[1]}")
            done.set()

    engine.submit(prompt, sink, max_tokens=n, sampling=SamplingParams(temperature=0))
    assert done.wait(60)
    return "".join(text), end[0]


def _prefill(session: Any, cache: Any, seq: int, ids: list[int], entry: str = "prefill", start: int = 0) -> np.ndarray:
    cache.add(seq)
    cache.begin([seq], [len(ids)])
    tokens = session.tensor(np.asarray([ids], np.int32))
    if entry == "prefill":
        logits, cache.obj = session(entry, tokens, cache.obj)
    else:
        pos = session.tensor(np.arange(start, start + len(ids), dtype=np.int32))
        logits, _, cache.obj = session(entry, tokens, pos, cache.obj)
    cache.end()
    return to_numpy(logits)[0, -1]


def _decode_at(session: Any, cache: Any, seq: int, token: int, position: int) -> np.ndarray:
    cache.begin([seq], [1])
    ids = session.tensor(np.asarray([[token]], np.int32))
    logits, _, cache.obj = session("batch_decode_at", ids, session.tensor(np.asarray([position], np.int32)), cache.obj)
    cache.end()
    return to_numpy(logits)[0, 0]


def test_rope_before_the_cache_keeps_logits_and_a_rebuilt_cache_uses_true_positions(
    tiny_evictable: Path, tiny_host_artifact: Path
) -> None:
    import edgert
    from edgert.runtime.kv_budget import SequenceKV
    from edgert.serve.engine import BatchKVCache

    prompt = list(range(300, 337))
    plain = edgert.load(tiny_host_artifact)
    plain_cache = BatchKVCache(plain.session, 4, 1024, 64, 16)
    reference = _prefill(plain.session, plain_cache, 1, prompt)
    session = edgert.load(tiny_evictable).session
    cache = BatchKVCache(session, 4, 1024, 64, 16)
    np.testing.assert_allclose(_prefill(session, cache, 1, prompt, "prefill_at"), reference, atol=1e-4)

    kv = SequenceKV()
    meta, keys, values = kv.read(cache.obj, 1)
    assert keys.shape[:2] == (2, len(prompt))
    full = _decode_at(session, cache, 1, 77, len(prompt))
    # The same prompt written at positions 100.. and rebuilt through the checkpoint path: RoPE sees
    # only distances, so decoding at its true position 100 + T answers as above ...
    shift = 100
    _prefill(session, cache, 2, prompt, "prefill_at", start=shift)
    kv.write(cache.obj, 2, *kv.read(cache.obj, 2))
    np.testing.assert_allclose(_decode_at(session, cache, 2, 77, shift + len(prompt)), full, atol=1e-4)
    # ... and the cache's own length as the position (what RoPE inside the cache uses) does not.
    cache.popn(2, 1)
    assert np.abs(_decode_at(session, cache, 2, 77, len(prompt)) - full).max() > 1e-2
    # Entries shuffled per layer and KV head (K and V together): attention does not see the order.
    rng = np.random.default_rng(0)
    order = np.stack([np.stack([rng.permutation(len(prompt)) for _ in range(2)]) for _ in range(2)])
    gather = order.transpose(0, 2, 1)[..., None]
    _prefill(session, cache, 3, prompt, "prefill_at")
    kv.write(cache.obj, 3, meta, np.take_along_axis(keys, gather, 1), np.take_along_axis(values, gather, 1))
    np.testing.assert_allclose(_decode_at(session, cache, 3, 77, len(prompt)), full, atol=1e-4)


def test_the_budget_bounds_each_sequence_and_matches_the_full_cache_below_it(engines: dict[str, Any]) -> None:
    full, budget = engines["full"], engines["budget"]
    prompt = list(range(500, 520))
    # Below the budget (20 + 28 tokens of 48) nothing is evicted: the same greedy text.
    assert _generate(budget, prompt, 28) == _generate(full, prompt, 28)
    assert budget.counters.evictions == 0

    seen: list[tuple[str, list[int], int]] = []
    forward = budget._forward_at
    length = global_func("vm.builtin.attention_kv_cache_get_sequence_length")

    def spy(entry: str, seq_ids: list[int], ids: np.ndarray, positions: list[int]) -> np.ndarray:
        out = forward(entry, seq_ids, ids, positions)
        seen.append((entry, list(positions), int(length(budget.cache.obj, seq_ids[0]))))
        return out

    pages: list[int] = []
    budget._forward_at = spy
    try:
        text, end = _generate(budget, prompt, 150, lambda: pages.append(budget.cache.pages_in_use))
    finally:
        del budget._forward_at
    assert end == "done:length" and text
    assert budget.counters.evictions >= 5 and budget.counters.evicted_tokens == 16 * budget.counters.evictions
    assert max(n for _, _, n in seen) == 48  # filled to the budget, never beyond
    assert max(pages) <= 48 // 16 + 1  # the budget's pages and the one a partly filled page may add
    fed = [p for _, positions, _ in seen for p in positions]
    assert fed == list(range(len(prompt) + 150 - 1))  # true positions, continuing through evictions


def test_a_prompt_longer_than_the_context_is_taken_only_with_a_budget(engines: dict[str, Any]) -> None:
    from edgert.errors import ContextLengthError

    full, budget = engines["full"], engines["budget"]
    long = np.random.default_rng(3).integers(100, 5000, full.context_length + 40).tolist()
    with pytest.raises(ContextLengthError, match="context holds"):
        _generate(full, long, 4)
    before = budget.counters.evictions
    text, end = _generate(budget, long, 4)
    assert end == "done:length" and text
    assert budget.counters.evictions - before >= (len(long) - 48) // 16
    assert budget.snapshot()["kv_pages_in_use"] == 0


def test_a_budget_needs_an_evictable_artifact(tiny_host_artifact: Path) -> None:
    from edgert.artifact.reader import open_artifact
    from edgert.errors import EdgertError
    from edgert.serve.engine import LLMEngine

    with pytest.raises(EdgertError, match="--evictable-kv"):
        LLMEngine(open_artifact(tiny_host_artifact), kv_budget=64)


def test_run_with_a_kv_budget_takes_a_prompt_longer_than_the_context(
    tiny_evictable: Path, engines: dict[str, Any]
) -> None:
    import json

    from conftest import run_cli

    budget = engines["budget"]
    text = " ".join(f"w{i}" for i in range(budget.context_length))
    ids = budget.encode(prompt=text)
    assert len(ids) > budget.context_length
    proc = run_cli("run", str(tiny_evictable), "--kv-budget", "48", "--raw", "-p", text, "-n", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected, _ = _generate(budget, ids, 6)
    assert out["text"] == expected and out["evicted_tokens"] >= (len(ids) - 48) // 16
    assert out["stats"]["prompt_tokens"] == len(ids)
    refused = run_cli("run", str(tiny_evictable), "--raw", "-p", text, "-n", "6")
    assert refused.returncode != 0 and "context" in refused.stderr and "Traceback" not in refused.stderr
    # chat: a turn longer than the context is taken, evicting; /reset starts a new conversation
    turns = f"{text}\n/reset\nw1 w2\n/exit\n"
    chat = run_cli("chat", str(tiny_evictable), "--kv-budget", "48", "--max-tokens", "4", input=turns)
    assert chat.returncode == 0, chat.stderr
    evicted = [int(n) for n in re.findall(r"(\d+) KV entries evicted", chat.stderr)]
    assert len(evicted) == 2 and evicted[0] >= (len(ids) - 48) // 16, chat.stderr
