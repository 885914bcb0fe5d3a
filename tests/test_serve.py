"""`edgert serve` on the tiny Llama: the `openai` client, errors, the queue, batching, prefix caching."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import uvicorn
from conftest import load_tool, run_cli, shared_build


class Server:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, models: dict[str, Any], api_key: str | None = None):
        from edgert.serve.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.models = models
        config = uvicorn.Config(create_app(models, api_key), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.msg, json.loads(data) if data else None

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        for m in self.models.values():
            m.runtime.close()


def _served(artifact: Path, **options: Any) -> dict[str, Any]:
    from edgert.serve.models import load_models

    named = artifact.with_name("tiny.edgert")
    if not named.exists():
        named.symlink_to(artifact.name)
    return load_models([named], **options)


@pytest.fixture(scope="module")
def server(tiny_host_artifact: Path) -> Iterator[Server]:
    srv = Server(_served(tiny_host_artifact, max_batch=4, max_queue=8))
    yield srv
    srv.stop()


def engine_of(srv: Server) -> Any:
    return srv.models["tiny"].runtime


def wait_idle(engine: Any, seconds: float = 10.0) -> dict[str, Any]:
    deadline = time.time() + seconds
    while True:
        snap = engine.snapshot()
        if (snap["active_sequences"] == 0 and snap["queue_length"] == 0) or time.time() > deadline:
            return snap
        time.sleep(0.02)


def submit_collect(engine: Any, prompt: list[int], **options: Any) -> tuple[list[tuple[str, Any]], threading.Event]:
    """Submit ``prompt`` to ``engine``; its events as they come, and an event set when it ends."""
    events: list[tuple[str, Any]] = []
    done = threading.Event()

    def sink(event: tuple[str, Any]) -> None:
        events.append(event)
        if event[0] != "text":
            done.set()

    engine.submit(prompt, sink, **options)
    return events, done


def test_openai_client_chat_completions_and_models(server: Server, tiny_host_artifact: Path) -> None:
    import edgert

    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "Say something about boards."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert whole.choices[0].message.content == text and text
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    # The server's greedy completion is the single-sequence Generator's.
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    gen = edgert.load(tiny_host_artifact)
    want = "".join(t.text for t in gen.generate("Once upon a time", max_tokens=10))
    assert done.choices[0].text == want
    assert done.usage.prompt_tokens == len(gen.tokenizer.encode("Once upon a time"))


def test_metrics_are_prometheus_text_that_counts_the_requests_and_passes(server: Server) -> None:
    """/metrics: every sample line parses, and the counters agree with a request made here."""
    import re

    client = server.client()
    client.completions.create(model="tiny", prompt="Count this", max_tokens=6, temperature=0)
    wait_idle(engine_of(server))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) (-?[0-9.e+-]+|\+Inf)', line)
        assert m, f"not a Prometheus sample: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    assert samples['edgert_requests_total{path="/v1/completions",status="200"}'] >= 1
    generated = samples['edgert_generated_tokens_total{model="tiny"}']
    assert generated >= 6
    passes = {k: v for k, v in samples.items() if k.startswith("edgert_model_passes_total{")}
    tokens = sum(v for k, v in samples.items() if k.startswith("edgert_model_pass_tokens_total{"))
    assert passes and sum(passes.values()) > 0 and tokens >= generated
    assert samples['edgert_kv_pages_in_use{model="tiny"}'] >= 0


def test_api_key_is_required_and_open_hosts_need_one(tiny_host_artifact: Path, server: Server) -> None:
    from starlette.testclient import TestClient

    from edgert.serve.app import create_app

    app = TestClient(create_app(server.models, api_key="sesame"))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = app.get("/v1/models", headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert app.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    proc = run_cli("serve", str(tiny_host_artifact), "--host", "0.0.0.0")
    assert proc.returncode == 2
    assert "--api-key" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_requests_get_openai_error_shapes(server: Server) -> None:
    cases = [
        (b"{not json", "/v1/chat/completions", 400, "invalid_json"),
        (json.dumps({"model": "nope", "prompt": "hi"}), "/v1/completions", 404, "model_not_found"),
        (json.dumps({"model": "tiny"}), "/v1/chat/completions", 400, "missing_field"),
        (json.dumps({"prompt": "hi"}), "/v1/completions", 400, "missing_field"),
        (json.dumps({"model": "tiny", "prompt": [5] * 300}), "/v1/completions", 400, "context_length_exceeded"),
        (json.dumps({"model": "tiny", "input": "hi"}), "/v1/embeddings", 400, "wrong_model_kind"),
    ]
    for body, path, status, code in cases:
        got, _, data = server.post(path, body)
        assert got == status, (path, body, data)
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["code"] == code
        assert data["error"]["message"] and "\n" not in data["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(tiny_host_artifact: Path) -> None:
    srv = Server(_served(tiny_host_artifact, max_batch=1, max_queue=1, paused=True))
    try:
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0})
        first: list[Any] = []
        waiting = threading.Thread(target=lambda: first.append(srv.post("/v1/completions", body)))
        waiting.start()
        deadline = time.time() + 10
        while engine_of(srv).snapshot()["queue_length"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        status, headers, data = srv.post("/v1/completions", body)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert data["error"]["type"] == "rate_limit_error"
        engine_of(srv).resume()
        waiting.join(timeout=20)
        assert first and first[0][0] == 200 and first[0][2]["usage"]["completion_tokens"] >= 1
    finally:
        srv.stop()


def test_a_client_that_disconnects_frees_its_sequence_and_pages(server: Server) -> None:
    engine = engine_of(server)
    before = wait_idle(engine)["kv_pages_in_use"]
    cancelled = engine.counters.cancelled
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "tiny", "prompt": "tell a long story", "max_tokens": 240, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    assert engine.snapshot()["active_sequences"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    snap = wait_idle(engine, 5.0)
    assert snap["active_sequences"] == 0 and snap["kv_pages_in_use"] == before
    assert engine.counters.cancelled == cancelled + 1


def test_batch_ab_times_a_pass_over_fixed_contexts(tiny_host_artifact: Path) -> None:
    """tools/batch_ab.py: one build against itself over 3 sequences of 3, 20 and 40 tokens gives the
    same logits in each (every pass pops its token, so both see the same contexts) and two timings."""
    result = load_tool("batch_ab").compare(tiny_host_artifact, tiny_host_artifact, [3, 20, 40], 3, 1)
    assert result["same_logits"] and result["a_ms"] > 0 and result["b_ms"] > 0


def test_batched_decode_logits_equal_single_sequence_ones(tiny_host_artifact: Path) -> None:
    import edgert
    from edgert.serve.engine import BatchKVCache

    gen = edgert.load(tiny_host_artifact)
    cache = BatchKVCache(gen.session, 4, 1024, 64, 16)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (3, 17, 40)]
    for i, p in enumerate(prompts):
        cache.add(i)
        cache.begin([i], [len(p)])
        _, cache.obj = gen.session("prefill", gen.session.tensor(np.asarray([p], np.int32)), cache.obj)
        cache.end()
    nxt = [7, 123, 4000]
    cache.begin([0, 1, 2], [1, 1, 1])
    logits, cache.obj = gen.session(
        "batch_decode", gen.session.tensor(np.asarray([[t] for t in nxt], np.int32)), cache.obj
    )
    cache.end()
    batched = edgert.runtime.tvm_runtime.to_numpy(logits)[:, 0]
    for p, t, row in zip(prompts, nxt, batched, strict=True):
        gen.reset()
        gen.prefill(p)
        single = gen.step([t])
        np.testing.assert_allclose(row, single, atol=1e-4, rtol=1e-4)
        assert int(np.argmax(row)) == int(np.argmax(single))


def test_a_repeated_prefix_is_not_prefilled_again(server: Server) -> None:
    engine = engine_of(server)
    prompt = list(range(2000, 2070))  # 70 tokens nobody sent before: 4 whole pages can come back
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    status, _, first = server.post("/v1/completions", body)
    assert status == 200 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    prefilled, hits = engine.counters.prefill_tokens, engine.counters.prefix_hit_tokens
    status, _, second = server.post("/v1/completions", body)
    assert status == 200 and second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    assert engine.counters.prefill_tokens - prefilled == 70 - 64
    assert engine.counters.prefix_hit_tokens - hits == 64


def test_prefix_cache_evicts_least_recently_used_under_its_bound() -> None:
    from edgert.serve.prefix_cache import PrefixCache

    cache = PrefixCache(page_size=4, max_tokens=8)
    cache.add(1, [1, 2, 3, 4, 5, 6, 7, 8])
    cache.add(2, [1, 2, 3, 4, 9, 9, 9, 9])
    entry, n = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert entry is not None and entry.seq_id == 1 and n == 8
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])[1] == 7  # one token is always left to prefill
    assert cache.over_bound()
    assert cache.pop_oldest().seq_id == 2  # 1 was used last
    assert not cache.over_bound() and cache.lookup([1, 2, 3, 4, 9, 9, 9, 9, 0])[0].seq_id == 1


def test_prefix_match_goes_on_inside_the_next_page() -> None:
    from edgert.serve.prefix_cache import PrefixCache

    cache = PrefixCache(page_size=4, max_tokens=64)
    cache.add(1, [1, 2, 3, 4, 5, 6, 7, 8])
    cache.add(2, [1, 2, 3, 4, 5, 6, 9, 9])
    cache.add(3, [7, 7, 7, 7])
    entry, n = cache.lookup([1, 2, 3, 4, 5, 6, 9, 0, 0])
    assert entry is not None and entry.seq_id == 2 and n == 7  # one block, then 3 tokens of the next
    assert cache.lookup([7, 7, 1, 1])[1] == 2  # inside the first page
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7])[1] == 6  # one token is always left to prefill
    assert cache.lookup([2, 2, 2])[0] is None


def test_a_prefix_reused_inside_a_page_gives_the_text_of_a_fresh_run(tiny_host_artifact: Path) -> None:
    """A prompt sharing 21 tokens (a page and 5) with an earlier one forks it inside a page (TVM
    copies that page): the greedy reply is the one-sequence runtime's."""
    import edgert
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(11)
    first = rng.integers(0, 1000, 40).tolist()
    second = first[:21] + rng.integers(1000, 2000, 12).tolist()
    gen = edgert.load(tiny_host_artifact)
    expected = "".join(t.text for t in gen.generate(second, max_tokens=8, sampling=greedy))
    engine = LLMEngine(open_artifact(tiny_host_artifact), max_batch=2)
    try:
        for prompt in (first, second):
            events, done = submit_collect(engine, prompt, max_tokens=8, sampling=greedy)
            assert done.wait(60)
        assert engine.counters.prefix_hit_tokens == 21
        assert "".join(e[1] for e in events if e[0] == "text") == expected
        idle = wait_idle(engine)  # only the two cached prefixes hold pages (sharing their first)
        assert idle["kv_pages_in_use"] == idle["prefix_cache_pages"] - 1 == 3
    finally:
        engine.close()


def test_pages_in_use_return_to_zero_after_a_short_load_test(server: Server) -> None:
    engine = engine_of(server)
    tool = load_tool("load_test")
    tool.run_load(server.url, "tiny", clients=4, requests=6, max_seconds=60, seed=99)  # warm-up
    warm = tool.rss_mib(os.getpid())  # the server runs in this process
    report = tool.run_load(server.url, "tiny", clients=4, requests=12, max_seconds=60)
    summary = report.summary()
    assert summary["requests"] == 12 and summary["errors"] == 0, report.errors
    assert summary["generated_tokens"] > 0 and summary["ttft_p50_ms"] is not None
    assert engine.counters.decode_rows > engine.counters.decode_steps  # some steps decoded several sequences
    assert summary["active_sequences"] == 0
    engine.clear_prefix_cache()
    assert engine.snapshot()["kv_pages_in_use"] == 0
    assert tool.rss_mib(os.getpid()) <= 1.05 * warm


def test_load_test_scaling_sends_the_same_requests_with_one_client_and_with_several(server: Server) -> None:
    tool = load_tool("load_test")
    result = tool.scaling_run(server.url, "tiny", warmup=0, clients=3, requests=6, max_seconds=60, rounds=2)
    # Request n depends on n alone: greedy replies to the same requests have the same lengths,
    # whether one client sent them or three.
    one, many = result["generated_tokens"]
    assert one == many and one[0] > 0
    assert len(result["ratios"]) == 2 and result["median_ratio"] > 0
    assert wait_idle(engine_of(server))["active_sequences"] == 0


def test_the_trace_has_a_line_per_step_with_the_passes_metrics_count(tiny_host_artifact: Path, tmp_path: Path) -> None:
    """``trace=FILE``: each step's passes, the Python around them and the event loop's CPU; the passes
    in the file are the ones /metrics counts, and tools/serve_timeline.py sums them the same way."""
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    trace = tmp_path / "trace.jsonl"
    made = time.perf_counter()
    engine = LLMEngine(open_artifact(tiny_host_artifact), max_batch=4, paused=True, step_tokens=16, trace=str(trace))
    rng = np.random.default_rng(5)
    try:
        runs = [
            submit_collect(engine, rng.integers(0, 1000, n).tolist(), max_tokens=12, sampling=SamplingParams())
            for n in (3, 40, 70)
        ]
        t0 = time.perf_counter()
        engine.resume()
        for _, done in runs:
            assert done.wait(60)
        wait_idle(engine)
        counted = {k: (int(n), t) for k, (n, _, t) in engine.counters.passes.items()}
    finally:
        engine.close()
    t1 = time.perf_counter()  # the scheduler has ended: every step is written
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert steps and all(made < s["t"] < t1 for s in steps)  # the caller's perf_counter clock
    assert all(s["py"] >= 0 and s["loop_cpu"] >= 0 and s["cpu"] >= 0 for s in steps)
    summary = load_tool("serve_timeline").summarize(steps)
    assert {k: (n, t) for k, (n, _, t, _) in summary["passes"].items()} == counted
    assert "mixed/2" in counted or "mixed/1" in counted  # the long prompts rode beside decoding rows
    # The first step's wait began while the engine was paused; the rest of each step is inside the run.
    assert summary["pass_seconds"] <= summary["wall"] - summary["wait"] <= t1 - t0

    # tools/pass_cost.py runs each of the trace's pass shapes again and prices the run with them.
    pass_cost = load_tool("pass_cost")
    counts = pass_cost.shapes_of(steps)
    assert sum(counts.values()) == sum(n for n, _ in counted.values())
    shapes = [*counts, *(("decode", k, k) for k in range(1, 5) if ("decode", k, k) not in counts)]
    cost = pass_cost.time_shapes(tiny_host_artifact, shapes, threads=1, rounds=1, context=16)
    assert set(cost) == set(shapes) and all(v > 0 for v in cost.values())
    m = pass_cost.model(counts, cost, batch=4)
    assert m["seconds"] == pytest.approx(sum(n * cost[s] for s, n in counts.items()))
    decode_rows = sum(n * r for (k, r, _), n in counts.items() if k == "decode")
    others = sum(n * cost[s] for s, n in counts.items() if s[0] != "decode")
    assert m["full_batches"] == pytest.approx(others + decode_rows / 4 * cost[("decode", 4, 4)])
    riding = sum(n * cost[("decode", r, r)] for (k, r, _), n in counts.items() if k == "mixed")
    assert m["prompts_free"] == pytest.approx(m["seconds"] - others + riding)


@pytest.mark.slow
def test_transcriptions_answer_the_openai_client_and_refuse_bad_audio(whisper_short_artifact: Path) -> None:
    from test_whisper import beckett_wav

    from edgert.families.whisper.transcriber import Transcriber
    from edgert.serve.models import load_models

    named = whisper_short_artifact.with_name("whisper.edgert")
    if not named.exists():
        named.symlink_to(whisper_short_artifact.name)
    srv = Server(load_models([named]))
    try:
        client = srv.client()
        with beckett_wav().open("rb") as fh:
            got = client.audio.transcriptions.create(model="whisper", file=fh)
        direct = Transcriber(whisper_short_artifact)
        assert got.text == direct.transcribe(beckett_wav(), beam_size=direct.default_beam_size).text and got.text
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model="whisper", file=("x.wav", b"not a wav file"))
        assert bad.value.status_code == 400 and bad.value.body["code"] == "invalid_audio"
        assert "uploaded file" in bad.value.body["message"]
    finally:
        srv.stop()


def test_requests_admitted_together_share_prefill_passes_and_match_one_by_one(tiny_host_artifact: Path) -> None:
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    engine = LLMEngine(open_artifact(tiny_host_artifact), max_batch=4, prefix_cache_tokens=0, paused=True)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 23, 40)]

    calls: list[int] = []

    def dispatch(fn: Any) -> None:  # an event loop's call_soon_threadsafe, counted
        calls.append(1)
        fn()

    def submit(prompt: list[int], via: Any = None) -> tuple[list[tuple[str, Any]], threading.Event]:
        return submit_collect(engine, prompt, max_tokens=8, sampling=SamplingParams(temperature=0), dispatch=via)

    try:
        steps = engine.counters.decode_steps
        together = [submit(p, dispatch) for p in prompts]
        engine.resume()  # all three are admitted in one step
        for _, done in together:
            assert done.wait(60)
        passes = engine.counters.prefill_passes
        # The three requests' events reach their loop in one callback per step.
        assert len(calls) <= engine.counters.decode_steps - steps + 1 < sum(len(e) for e, _ in together)
        alone = []
        for p in prompts:
            events, done = submit(p)
            assert done.wait(60)
            alone.append(events)
        assert [e for e, _ in together] == alone
        assert all(e[-1] == ("done", "length") for e in alone)
        # 5 + 23 + 40 tokens in two passes: 64 (the first two prompts end in it and sample their
        # first tokens), then the last 4 beside those two decoding rows (a mixed pass of 6);
        # one by one: 5, 16 + 7, 32 + 8 (five passes).
        assert passes == 2 and engine.counters.mixed_passes == 1
        assert engine.counters.prefill_passes - passes == 5
        assert engine.snapshot()["kv_pages_in_use"] == 0
    finally:
        engine.close()


def test_mixed_steps_give_decoding_rows_the_text_of_one_by_one_runs(tiny_host_artifact: Path) -> None:
    """Prompts prefilled in bounded chunks beside decoding sequences (one ragged pass per step):
    each request's greedy text equals its run alone; the rows' logits equal a decode step's."""
    import edgert
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.runtime.tvm_runtime import to_numpy
    from edgert.serve.engine import BatchKVCache, LLMEngine

    rng = np.random.default_rng(11)
    # The pass's logits at the decoding rows and at the new prompt's last token, against a
    # decode step and a prefill of each sequence alone.
    gen = edgert.load(tiny_host_artifact)
    cache = BatchKVCache(gen.session, 4, 1024, 64, 16)
    old = [rng.integers(0, 1000, n).tolist() for n in (9, 30)]
    for i, p in enumerate(old):
        cache.add(i)
        cache.begin([i], [len(p)])
        _, cache.obj = gen.session("prefill", gen.session.tensor(np.asarray([p], np.int32)), cache.obj)
        cache.end()
    new = rng.integers(0, 1000, 21).tolist()
    cache.add(2)
    cache.begin([0, 1, 2], [1, 1, len(new)])
    ids, rows = np.asarray([[5, 77, *new]], np.int32), np.asarray([0, 1, 22], np.int32)
    logits, cache.obj = gen.session("prefill_rows", gen.session.tensor(ids), gen.session.tensor(rows), cache.obj)
    cache.end()
    mixed = to_numpy(logits)[0]
    for p, t, row in zip(old, (5, 77), mixed, strict=False):
        gen.reset()
        gen.prefill(p)
        np.testing.assert_allclose(row, gen.step([t]), atol=1e-4, rtol=1e-4)
    gen.reset()
    np.testing.assert_allclose(mixed[2], np.asarray(gen.prefill(new)).reshape(-1), atol=1e-4, rtol=1e-4)

    engine = LLMEngine(
        open_artifact(tiny_host_artifact), max_batch=4, prefix_cache_tokens=0, paused=True, step_tokens=16
    )
    prompts = [rng.integers(0, 1000, n).tolist() for n in (3, 60, 100)]
    try:
        assert engine.mixed

        def run(prompt: list[int]) -> tuple[list[tuple[str, Any]], threading.Event]:
            return submit_collect(engine, prompt, max_tokens=24, sampling=SamplingParams(temperature=0))

        together = [run(p) for p in prompts]
        engine.resume()
        for _, done in together:
            assert done.wait(60)
        # The first pass ends the two short prompts; the long one's last 35 tokens then ride with
        # their two decoding rows in passes of at most 16 tokens.
        assert engine.counters.mixed_passes >= 3
        alone = []
        for p in prompts:
            events, done = run(p)
            assert done.wait(60)
            alone.append(events)
        assert [e for e, _ in together] == alone
        assert all(e[-1] == ("done", "length") for e in alone)
        assert engine.snapshot()["kv_pages_in_use"] == 0
    finally:
        engine.close()


def test_gemma3_is_served_with_its_two_kv_caches(tiny_gemma_host_artifact: Path) -> None:
    """Gemma 3 keeps its sliding-window layers in a second cache: batched and mixed steps over both
    give each request the greedy text of `edgert.load`'s one-sequence runtime; pages go back to zero."""
    import edgert
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(5)
    # Longer than the window (4) and than a page (16): pieces are cut at the window, masks matter.
    prompts = [rng.integers(0, 1000, n).tolist() for n in (6, 21, 37)]
    gen = edgert.load(tiny_gemma_host_artifact)
    expected = ["".join(t.text for t in gen.generate(p, max_tokens=10, sampling=greedy)) for p in prompts]
    engine = LLMEngine(open_artifact(tiny_gemma_host_artifact), max_batch=4, paused=True)
    try:

        def run(prompt: list[int]) -> tuple[list[tuple[str, Any]], threading.Event]:
            return submit_collect(engine, prompt, max_tokens=10, sampling=greedy)

        together = [run(p) for p in prompts]
        engine.resume()
        for _, done in together:
            assert done.wait(60)
        assert engine.counters.mixed_passes >= 1
        assert ["".join(e[1] for e in events if e[0] == "text") for events, _ in together] == expected
        # A repeated prompt that runs past the window (4) reuses only its first page's tokens but
        # one, copied into a sequence of its own (a fork further on attends wrongly past the window).
        events, done = run(prompts[2])
        assert done.wait(60)
        assert engine.counters.prefix_hit_tokens == 15
        assert "".join(e[1] for e in events if e[0] == "text") == expected[2]
        assert wait_idle(engine)["kv_pages_in_use"] > 0  # the cached prefixes'
        engine.clear_prefix_cache()
        assert engine.snapshot()["kv_pages_in_use"] == 0  # in both caches
    finally:
        engine.close()


@pytest.fixture(scope="session")
def tiny_gemma_window24_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 with a window of 24 (longer than a page of 16), compiled for this machine."""

    def build(folder: Path) -> None:
        load_tool("make_tiny_gguf").write_tiny_gemma3(folder / "g.gguf", sliding_window=24)
        proc = run_cli("compile", str(folder / "g.gguf"), "--target", "host", "-o", str(folder / "g.edgert"))
        assert proc.returncode == 0, proc.stderr

    return shared_build(tmp_path_factory, "tiny-gemma-window24", build) / "g.edgert"


@pytest.mark.slow
def test_gemma3_reuses_a_prefix_while_the_request_stays_inside_its_window(
    tiny_gemma_window24_artifact: Path,
) -> None:
    """A Gemma 3 request whose prompt and reply fit the sliding window (24) forks a cached prefix
    past the first page and gets the one-sequence runtime's greedy text; one that runs past the
    window reuses 15 tokens (a copy of the first page) and gets it too."""
    import edgert
    from edgert.artifact import open_artifact
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(13)
    first = rng.integers(0, 1000, 20).tolist()
    inside = first[:18] + rng.integers(1000, 2000, 2).tolist()  # 20 + 4 tokens: inside the window
    past = first[:18] + rng.integers(1000, 2000, 12).tolist()  # 30 + 4: past it
    gen = edgert.load(tiny_gemma_window24_artifact)
    expected = ["".join(t.text for t in gen.generate(p, max_tokens=4, sampling=greedy)) for p in (inside, past)]
    engine = LLMEngine(open_artifact(tiny_gemma_window24_artifact), max_batch=2)
    try:
        got, hits = [], []
        for prompt in (first, inside, past):
            before = engine.counters.prefix_hit_tokens
            events, done = submit_collect(engine, prompt, max_tokens=4, sampling=greedy)
            assert done.wait(60)
            got.append("".join(e[1] for e in events if e[0] == "text"))
            hits.append(engine.counters.prefix_hit_tokens - before)
        assert hits == [0, 16, 15]  # the first request's 23 tokens keep one page
        assert got[1:] == expected
    finally:
        engine.close()


def test_step_tokens_outside_the_batch_and_chunk_are_refused(tiny_host_artifact: Path) -> None:
    from edgert.artifact import open_artifact
    from edgert.errors import EdgertError
    from edgert.serve.engine import LLMEngine

    with pytest.raises(EdgertError, match="--step-tokens 4 must exceed --max-batch"):
        LLMEngine(open_artifact(tiny_host_artifact), max_batch=4, step_tokens=4, warm=False)


@pytest.mark.slow
def test_smollm_server_memory_stays_at_its_start_up_level(smollm_artifact: Path) -> None:
    from edgert.serve.models import load_models

    named = smollm_artifact.with_name("smol.edgert")
    if not named.exists():
        named.symlink_to(smollm_artifact.name)
    srv = Server(load_models([named], max_batch=4))
    try:
        tool = load_tool("load_test")
        mix = tool.Mix(words=(40, 120), max_tokens=(16,))
        tool.run_load(srv.url, "smol", clients=4, requests=4, max_seconds=120, seed=99, mix=mix)  # warm-up
        warm = tool.rss_mib(os.getpid())  # the server runs in this process
        report = tool.run_load(srv.url, "smol", clients=4, requests=8, max_seconds=120, mix=mix)
        summary = report.summary()
        assert summary["requests"] == 8 and summary["errors"] == 0, report.errors
        # Finished prompts fill the prefix cache and new lengths reach new KV pages: without the
        # start-up warm-up this run grew RSS by 10-30 %.
        assert summary["prefix_cache_pages"] > 0 and summary["kv_pages_leaked"] == 0
        assert tool.rss_mib(os.getpid()) <= 1.05 * warm
    finally:
        srv.stop()
