"""Continuous batching of a compiled language model: one scheduler thread, one paged KV cache.

Requests enter a bounded queue (`QueueFullError` when it is full: the server answers 429). The
scheduler thread owns the model: it admits queued requests while the batch has room and the KV
cache has pages for them, prefills each (forking the longest cached prefix, see `PrefixCache`),
then runs every active sequence's next token in ONE ``batch_decode`` pass per step. A cancelled
request (a client that went away) loses its sequence and pages before the next step.

Mixed steps (artifacts with the ``prefill_rows`` entry): while a prompt waits to be prefilled,
each step is one ragged pass over the decoding sequences' next tokens (a 1-token piece each) and
a chunk of the waiting prompts, bounded by a token budget (``step_tokens``), as vLLM's chunked
prefill and llama.cpp's server do: the decoding rows ride in the prefill pass (nearly free: the
weights are read once for all of them) and are never stalled longer than one bounded pass.

With a KV budget (``kv_budget``, an artifact built ``--evictable-kv``) no sequence holds more than
N cached tokens: prompts of any length are taken, and a sequence about to exceed N first drops
its least-attended entries (TOVA, `edgert.runtime.kv_budget`); it then runs the ``*_at`` entry
points at its true positions.

Events go to each request's ``sink``: ``("text", str)`` pieces, then ``("done", finish_reason)``
or ``("error", message)``. They are collected over a scheduler step and handed over once per step:
called on the scheduler thread, or, for requests submitted with a ``dispatch`` (an event loop's
``call_soon_threadsafe``), in one callback per loop and step, so an event loop wakes once per
step instead of once per token and request.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact
from edgert.errors import ContextLengthError, EdgertError
from edgert.runtime.generator import GenerationStats, TokenEmitter
from edgert.runtime.kv_budget import KVBudget, SequenceKV, check_evictable
from edgert.runtime.sampling import Sampler, SamplingParams
from edgert.runtime.session import Session
from edgert.runtime.tokenizer import tokenizer_from_artifact
from edgert.runtime.tvm_runtime import global_func, shape, to_numpy
from edgert.serve.prefix_cache import PrefixCache

Sink = Callable[[tuple[str, Any]], None]
Dispatch = Callable[[Callable[[], None]], Any]
FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length"}


def piece(n: int, chunk: int) -> int:
    """How many of ``n`` tokens to prefill next: a whole ``chunk``, else the largest power of two.

    TVM's pooled allocator keeps the buffers of every shape it has run, per size: prefilling
    prompts of every length would grow a server's memory with each new length it meets (about
    3 MiB per request on SmolLM2). Whole chunks and powers of two bound the shapes to a handful
    (log2(chunk) + 2); splitting a prefill is exact, it only costs a few more calls.
    """
    if n <= 0:
        return 0
    return chunk if n >= chunk else 1 << (n.bit_length() - 1)


# "mixed": passes carrying both prompt tokens and decoding rows (`LLMEngine._mixed_step`).
PAD_TO = 8  # a mixed pass beyond 2 * max_batch tokens is padded to a multiple of this (`_mixed_step`)
PHASES = ("wait", "admit", "prefill", "mixed", "decode", "sample", "detokenize", "send")


def name_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (/proc/PID/task/TID/comm, top -H), when Linux allows."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _split(n: int, cap: int) -> list[int]:
    """``n`` tokens in pieces of at most ``cap``."""
    return [min(cap, n - i) for i in range(0, n, cap)]


def _deliver(items: list[tuple[Sink, tuple[str, Any]]]) -> None:
    for sink, event in items:
        sink(event)


def _view(value: Any) -> np.ndarray:
    """A numpy view of a TVM tensor, valid until the VM's next call (no copy of the logits)."""
    try:
        return np.from_dlpack(value)
    except (TypeError, RuntimeError, BufferError):
        return to_numpy(value)


def _thread_cpu_ns(tid: int) -> int:
    """Nanoseconds thread ``tid`` of this process has run on a CPU (/proc's schedstat; 0 where absent)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class StepTrace:
    """The scheduler's timeline, one JSON line per step (``edgert serve --trace FILE``).

    A step's line: ``t`` (the step's start, ``time.perf_counter()``: CLOCK_MONOTONIC on Linux, the
    clock of other processes' ``perf_counter`` too, so a load test's run times select its steps), ``wait``/``admit``
    (seconds), ``passes`` ([kind, decoding rows, tokens, padding tokens, seconds] each: a step has
    one, or several prefill passes without mixed steps), ``py`` (the step's seconds outside model
    passes and waiting: admitting, sampling, detokenizing, handing events over), ``loop_cpu`` (CPU
    seconds of the event-loop thread, the process's main thread, during the step: it runs on the
    same cores as TVM's workers) and ``cpu`` (the whole process's CPU seconds in the step). Lines
    are buffered and written when the scheduler goes idle or every 256 steps.
    """

    def __init__(self, path: str):
        self._fh = open(path, "a", buffering=1 << 16)  # open for the engine's lifetime
        self._loop_tid = threading.main_thread().native_id or 0
        self._lines = 0
        self.passes: list[list[Any]] = []
        self._begin()

    def _begin(self) -> None:
        self._loop = _thread_cpu_ns(self._loop_tid)
        self._cpu = time.process_time()
        self.passes = []

    def pass_done(self, kind: str, rows: int, tokens: int, pad: int, seconds: float) -> None:
        """Record one model pass of the current step."""
        self.passes.append([kind, rows, tokens, pad, round(seconds, 6)])

    def step_done(self, start: float, wait: float, admit: float) -> None:
        """Write the step that began at ``start`` (``perf_counter``) and begin the next one."""
        now = time.perf_counter()
        line = {
            "t": round(start, 6),
            "wait": round(wait, 6),
            "admit": round(admit, 6),
            "passes": self.passes,
            "py": round(now - start - wait - admit - sum(p[4] for p in self.passes), 6),
            "loop_cpu": round((_thread_cpu_ns(self._loop_tid) - self._loop) / 1e9, 6),
            "cpu": round(time.process_time() - self._cpu, 6),
        }
        self._fh.write(json.dumps(line) + "\n")
        self._lines += 1
        if self._lines % 256 == 0:
            self._fh.flush()
        self._begin()

    def flush(self) -> None:
        """Write the buffered lines (the scheduler calls this before it waits for work)."""
        self._fh.flush()

    def close(self) -> None:
        """Write what is buffered and close the file."""
        self._fh.close()


class QueueFullError(EdgertError):
    """The request queue is full: try again later."""


@dataclass
class Request:
    """One generation: its prompt, limits and where its events go; the rest is the scheduler's."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    sink: Sink
    dispatch: Dispatch | None = None  # runs a callable on the sink's thread (None: the scheduler's)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    seq_id: int = -1
    kv_tokens: list[int] = field(default_factory=list)  # the tokens whose KV the sequence holds
    next_token: int = -1  # sampled, not yet in the cache
    reserved_pages: int = 0
    first_token_at: float | None = None
    sent: int = 0  # characters of the emitter's text sent so far
    stats: GenerationStats = field(default_factory=GenerationStats)
    emitter: TokenEmitter | None = None
    sampler: Sampler | None = None
    position: int = 0  # tokens fed so far: the next token's true position
    queries: np.ndarray | None = None  # the last token's rotated queries [layers, heads, dim] (KV budget)
    evicted: int = 0  # entries dropped by the KV budget (its kv_tokens then no longer match the cache)


class BatchKVCache:
    """TVM's paged KV cache holding many sequences, by sequence id.

    A manifest's ``local`` section (Gemma 3: the sliding-window layers keep their keys and values
    in a cache of their own) adds that second cache, the masking kind that keeps every position;
    each sequence lives in both under the same id and every operation applies to both (`objs`).
    """

    def __init__(
        self,
        session: Session,
        max_batch: int,
        max_tokens: int,
        prefill_chunk: int,
        page_size: int,
        local: dict[str, Any] | None = None,
    ):
        self._begin = global_func("vm.builtin.kv_state_begin_forward")
        self._end = global_func("vm.builtin.kv_state_end_forward")
        self._add = global_func("vm.builtin.kv_state_add_sequence")
        self._fork = global_func("vm.builtin.kv_state_fork_sequence")
        self._remove = global_func("vm.builtin.kv_state_remove_sequence")
        self._popn = global_func("vm.builtin.kv_state_popn")
        self._available = global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        sizes = (shape([max_batch]), shape([max_tokens]), shape([prefill_chunk]), shape([page_size]), shape([0]))
        self.objs: list[Any] = [session.vm["create_kv_cache"](*sizes)]
        if local is not None:
            self.objs.append(session.vm[local["create"]](*sizes))
        # Both caches have the same pages and a sequence takes the same number in each.
        self.total_pages = int(self._available(self.obj))

    @property
    def obj(self) -> Any:
        """The (global) cache object; the only one without a local cache."""
        return self.objs[0]

    @obj.setter
    def obj(self, value: Any) -> None:
        self.objs[0] = value

    def begin(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        for obj in self.objs:
            self._begin(obj, shape(list(seq_ids)), shape(list(lengths)))

    def end(self) -> None:
        for obj in self.objs:
            self._end(obj)

    def add(self, seq_id: int) -> None:
        for obj in self.objs:
            self._add(obj, seq_id)

    def fork(self, parent: int, child: int, length: int) -> None:
        """``child`` starts as the first ``length`` tokens of ``parent``, sharing its pages."""
        for obj in self.objs:
            self._fork(obj, parent, child, length)

    def remove(self, seq_id: int) -> None:
        for obj in self.objs:
            self._remove(obj, seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        if n > 0:
            for obj in self.objs:
                self._popn(obj, seq_id, n)

    @property
    def pages_in_use(self) -> int:
        """Pages holding keys and values (the larger count of the two caches: a leak in either shows)."""
        return max(self.total_pages - int(self._available(obj)) for obj in self.objs)


@dataclass
class Counters:
    """What /metrics reports (monotonic counts and the TTFT histogram)."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    evicted_tokens: int = 0  # KV entries dropped by the budget
    evictions: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (the rest came from the prefix cache)
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_passes: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    mixed_passes: int = 0  # passes with prompt tokens and decoding rows together
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(
        default_factory=lambda: dict.fromkeys((0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), 0)
    )
    # Where the scheduler thread's time goes (perf_counter sums, a few calls per step): waiting for
    # work, admitting, prefill passes, decode passes, sampling, detokenizing, handing text over.
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # Model passes by kind and decoding rows ("decode/4", "mixed/3", "prefill/0"): [passes, seconds,
    # tokens], to tell where a run's pass time went (a 4-row pass against 1-row ones, prompt tokens).
    passes: dict[str, list[float]] = field(default_factory=dict)

    def count_pass(self, kind: str, rows: int, seconds: float, tokens: int) -> None:
        """Count one model pass of ``kind`` with ``rows`` decoding rows and ``tokens`` tokens in all."""
        entry = self.passes.setdefault(f"{kind}/{rows}", [0, 0.0, 0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] += tokens


class LLMEngine:
    """A llama-family artifact served with continuous batching and prefix caching.

    ``max_batch``: sequences decoded together; ``max_queue``: requests waiting beyond those;
    ``kv_tokens``: the KV cache's size in tokens over all sequences (default: a full context
    for each batch row); ``prefix_cache_tokens``: tokens of finished prompts kept for reuse
    (0: none). ``paused`` loads the model but admits nothing until `resume`. ``kv_budget``: at most
    this many cached tokens per sequence (TOVA eviction; needs an ``--evictable-kv`` artifact).
    ``warm``: bring the process to its steady memory before serving (`_warm_up`). ``step_tokens``:
    the tokens of a mixed step (decoding rows plus prompt chunk; default 64, at most the prefill
    chunk); a step without decoding rows takes a whole prefill chunk. ``mixed_steps=False``: prefill
    passes, then a decode pass, as for artifacts without ``prefill_rows`` (an A/B of the two).
    ``trace``: a file to append the scheduler's timeline to, a JSON line per step (`StepTrace`).
    """

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        max_batch: int = 4,
        max_queue: int = 16,
        kv_tokens: int | None = None,
        prefix_cache_tokens: int | None = None,
        paused: bool = False,
        kv_budget: int | None = None,
        warm: bool = True,
        step_tokens: int | None = None,
        mixed_steps: bool = True,
        trace: str | None = None,
    ):
        manifest = artifact.manifest
        kv = manifest["kv_cache"]
        self.artifact = artifact
        self.context_length = int(kv["context_length"])
        self.prefill_chunk = int(kv["prefill_chunk_size"])
        self.page_size = int(kv["page_size"])
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self.local = kv.get("local")  # Gemma 3's sliding-window layers: a second cache (`BatchKVCache`)
        if self.local and "batch_decode" not in manifest["entry_points"]:
            raise EdgertError(
                f"{artifact.path}: this model keeps its sliding-window layers in a second KV cache and was "
                "compiled before the server could batch it; compile it again, or use `edgert run` or `edgert chat`"
            )
        # The local cache's masking kernels keep a sequence's queries to their window only in pieces
        # shorter than it (`edgert.runtime.session.PagedKVCache.chunk_limit`).
        self.piece_cap = int(self.local["window"]) - 1 if self.local else self.prefill_chunk
        if max_batch < 1 or max_queue < 1:
            raise EdgertError(f"--max-batch and --max-queue must be at least 1 (got {max_batch}, {max_queue})")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.budget: KVBudget | None = None
        if kv_budget is not None:
            check_evictable(manifest)
            if kv_budget > self.context_length:
                raise EdgertError(f"--kv-budget {kv_budget} exceeds the context ({self.context_length} tokens)")
            self.budget = KVBudget(kv_budget)
        self._kv = SequenceKV() if self.budget else None
        self.kv_tokens = kv_tokens or self.context_length * max_batch
        if self.kv_tokens < self.context_length:
            raise EdgertError(f"--kv-tokens {self.kv_tokens} is less than one context ({self.context_length} tokens)")
        cache_tokens = self.context_length if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefix_cache = PrefixCache(self.page_size, max(cache_tokens, 0))
        self.tokenizer = tokenizer_from_artifact(artifact)
        self.batched = "batch_decode" in manifest["entry_points"]  # artifacts built before it decode row by row
        # Mixed prefill+decode steps need the gathering entry (older artifacts prefill first, then
        # decode); the KV budget's ``*_at`` entries run sequence by sequence.
        self.mixed = mixed_steps and self.batched and "prefill_rows" in manifest["entry_points"] and self.budget is None
        if step_tokens is not None and not max_batch < step_tokens <= self.prefill_chunk:
            raise EdgertError(
                f"--step-tokens {step_tokens} must exceed --max-batch ({max_batch}) and be at most the "
                f"artifact's prefill chunk ({self.prefill_chunk})"
            )
        self.step_tokens = step_tokens or min(64, self.prefill_chunk)
        if self.step_tokens <= max_batch:  # no room for a prompt beside a full batch
            self.mixed = False
        if self.local and not self.mixed:  # its prompts are cut per sequence in mixed steps only
            raise EdgertError(
                f"{artifact.path}: a model with a sliding-window cache is served in mixed steps only "
                "(--step-tokens above --max-batch, and not --no-mixed-steps)"
            )
        self.counters = Counters()
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self._pending: deque[Request] = deque()
        self._outbox: dict[Dispatch | None, list[tuple[Sink, tuple[str, Any]]]] = {}
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = paused
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.session: Session | None = None
        self.cache: BatchKVCache | None = None
        self._threads = threads
        self.warm = warm
        self._trace_path = trace
        self.trace: StepTrace | None = None
        # The model is loaded on the scheduler thread: TVM's thread pool belongs to the thread
        # that configures it, and every call runs there.
        self._thread = threading.Thread(target=self._run, name="edgert-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- the API the server calls ------------------------------------------------------
    def encode(
        self, prompt: str | Sequence[int] | None = None, messages: list[dict[str, str]] | None = None
    ) -> list[int]:
        """Token ids of a completion prompt (text or ids) or of chat ``messages`` in the chat template."""
        if messages is not None:
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt or []]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def submit(
        self,
        prompt: list[int],
        sink: Sink,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        dispatch: Dispatch | None = None,
    ) -> Request:
        """Queue a generation; `QueueFullError` when the queue is full, ValueError/ContextLengthError for bad input.

        ``dispatch`` (e.g. ``loop.call_soon_threadsafe``): ``sink`` is called through it, once per step.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not prompt:
            raise ValueError("the prompt is empty")
        if self.budget is None and len(prompt) >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.context_length} "
                "(with room for at least one generated token)"
            )
        req = Request(list(prompt), max_tokens, sampling or SamplingParams(), [s for s in stop if s], sink, dispatch)
        held = self.context_length if self.budget is None else self.budget.tokens
        req.reserved_pages = self._pages_for(min(len(prompt) + max_tokens, held))
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the queue holds {self.max_queue} requests already; try again shortly")
            self._pending.append(req)
            self.counters.requests += 1
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): its sequence and pages are freed before the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def resume(self) -> None:
        """Start admitting requests (after ``paused=True``)."""
        with self._cond:
            self._paused = False
            self._cond.notify()

    def close(self) -> None:
        """Stop the scheduler thread; queued and running requests get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (their pages go back to the cache); waits for the scheduler."""
        done = threading.Event()
        with self._cond:
            self._clear_request = done
            self._cond.notify()
        done.wait(timeout=30)

    _clear_request: threading.Event | None = None

    def snapshot(self) -> dict[str, Any]:
        """The gauges of /metrics: queue, active sequences, pages, cached prefixes, recent tokens/s."""
        with self._cond:
            now = time.perf_counter()
            while self._rate and now - self._rate[0][0] > 10.0:
                self._rate.popleft()
            recent = sum(n for _, n in self._rate)
            span = max(now - self._rate[0][0], 1e-3) if self._rate else 1.0
            return {
                "queue_length": len(self._pending),
                "active_sequences": len(self._active),
                "kv_pages_total": self.cache.total_pages if self.cache else 0,
                "kv_pages_in_use": self.cache.pages_in_use if self.cache else 0,
                "prefix_cache_entries": len(self.prefix_cache),
                "prefix_cache_tokens": self.prefix_cache.tokens,
                "prefix_cache_pages": self.prefix_cache.pages(),
                "tokens_per_second": recent / span if self._rate else 0.0,
            }

    # -- the scheduler thread --------------------------------------------------------------
    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size) + 1

    def _tick(self, phase: str, since: float) -> float:
        """Add the time since ``since`` to ``phase``; the time now (the next phase's start)."""
        now = time.perf_counter()
        self.counters.phase_seconds[phase] += now - since
        return now

    def _run(self) -> None:
        name_thread("edgert-sched")
        try:
            self.session = Session(self.artifact, self._threads)
            self.cache = BatchKVCache(
                # one sequence more than the batch: a mixed pass's padding (`_mixed_step`)
                self.session,
                self.max_batch + 1,
                self.kv_tokens,
                self.prefill_chunk,
                self.page_size,
                self.local,
            )
            if self.warm:
                self._warm_up()
        except BaseException as exc:
            self._load_error = exc
            self._ready.set()
            return
        if self._trace_path:
            self.trace = StepTrace(self._trace_path)
        self._ready.set()
        while True:
            t = t_wait = time.perf_counter()
            with self._cond:
                while not self._stopping and self._clear_request is None and not self._work_ready():
                    if self.trace is not None:
                        self.trace.flush()
                    self._cond.wait()
                t = self._tick("wait", t)
                if self._stopping:
                    break
                clear, self._clear_request = self._clear_request, None
                self._reap_cancelled()
                admitted = self._admit()
            t_admit = self._tick("admit", t)
            if clear is not None:
                while self._evict_one():
                    pass
                clear.set()
            if admitted:
                self._start(admitted)
                self._flush()  # first tokens go out before the decode step, not after it
            if self._active:
                if self.mixed and any(r.next_token < 0 for r in self._active):
                    self._mixed_step()
                else:
                    self._decode_step()
            self._flush()
            if self.trace is not None:
                self.trace.step_done(t_wait, t - t_wait, t_admit - t)
        for req in [*self._pending, *self._active]:
            self._emit(req, ("error", "the server is shutting down"))
        self._flush()
        if self.trace is not None:
            self.trace.close()

    def _emit(self, req: Request, event: tuple[str, Any]) -> None:
        self._outbox.setdefault(req.dispatch, []).append((req.sink, event))

    def _flush(self) -> None:
        """Hand the step's events over: one callback per dispatch (event loop), in order."""
        if not self._outbox:
            return
        t = time.perf_counter()
        outbox, self._outbox = self._outbox, {}
        for dispatch, items in outbox.items():
            try:
                if dispatch is None:
                    _deliver(items)
                else:
                    dispatch(functools.partial(_deliver, items))
            except Exception:  # a closed event loop or a broken sink: nobody is left to tell
                pass
        self._tick("send", t)

    def _warm_up(self) -> None:
        """Reach the memory a long run would reach, before the first request.

        Left alone, a server's RSS grows for a long while: the KV pool's pages become resident
        the first time a sequence writes them (TVM hands freed pages out again first, so only
        a new high-water mark of tokens in flight or prefixes kept touches new ones), and TVM's
        pooled allocator keeps buffers for each new shape a pass runs (batch sizes, prefill
        pieces). Here every page is written once: a sequence of half a page is forked until the
        pool is full (a fork inside a page copies that page, in every layer: a memory copy, no
        model pass), and each shape the scheduler runs (`piece` sizes, 1..max_batch decode rows)
        runs once. llama.cpp likewise clears its whole KV buffer at start-up.
        """
        assert self.session is not None and self.cache is not None
        cache = self.cache
        half = max(self.page_size // 2, 1)
        root = next(self._ids)
        cache.add(root)
        for n in _split(half, self.piece_cap):
            self._forward("prefill", [root], np.zeros((1, n), dtype=np.int32))
        forks: list[int] = []
        while cache.total_pages - cache.pages_in_use > 0:
            forks.append(next(self._ids))
            cache.fork(root, forks[-1], half)
        for seq in (root, *forks):
            cache.remove(seq)
        if self.budget is not None:  # its entries take true positions; their shapes warm up in use
            return
        if self.mixed:  # prompts run through prefill_rows only
            self._warm_mixed()
        else:
            size = 1
            while True:
                seq = next(self._ids)
                cache.add(seq)
                self._forward("prefill", [seq], np.zeros((1, size), dtype=np.int32))
                cache.remove(seq)
                if size >= self.prefill_chunk:
                    break
                size = min(size * 2, self.prefill_chunk)
        rows = [next(self._ids) for _ in range(self.max_batch if self.batched else 1)]
        for seq in rows:
            cache.add(seq)
            self._forward("prefill", [seq], np.zeros((1, 1), dtype=np.int32))
        for n in range(1, len(rows) + 1):
            entry = "batch_decode" if self.batched else "decode"
            self._forward(entry, rows[:n], np.zeros((n, 1), dtype=np.int32))
        for seq in rows:
            cache.remove(seq)

    def _warm_mixed(self) -> None:
        """Run each shape a mixed step takes: 1..2*max_batch tokens, the powers of two and the chunk
        (one sequence each), and 1..max_batch gathered rows."""
        sizes = set(range(1, 2 * self.max_batch + 1)) | {self.prefill_chunk, self.step_tokens}
        sizes |= {1 << k for k in range(self.prefill_chunk.bit_length()) if 1 << k <= self.prefill_chunk}
        sizes |= set(range(PAD_TO, self.step_tokens + 1, PAD_TO))  # padded mixed passes
        shapes = [(n, [n - 1]) for n in sorted(sizes)]
        shapes += [(r, list(range(r))) for r in range(2, self.max_batch + 1)]
        assert self.cache is not None
        for n, rows in shapes:
            lengths = [1] * n if len(rows) > 1 else _split(n, self.piece_cap)  # the pieces a step may take
            if len(lengths) > self.max_batch:  # more pieces than a step has sequences: never run
                continue
            seqs = [next(self._ids) for _ in lengths]
            for seq in seqs:
                self.cache.add(seq)
            self._forward("prefill_rows", seqs, np.zeros((1, n), dtype=np.int32), lengths, rows)
            for seq in seqs:
                self.cache.remove(seq)

    def _work_ready(self) -> bool:
        if any(r.cancelled for r in self._active) or any(r.cancelled for r in self._pending):
            return True
        return bool(self._active) or (bool(self._pending) and not self._paused)

    def _reap_cancelled(self) -> None:
        for req in [r for r in self._pending if r.cancelled]:
            self._pending.remove(req)
            self.counters.cancelled += 1
        for req in [r for r in self._active if r.cancelled]:
            self._release(req, keep_prefix=False)
            self.counters.cancelled += 1

    def _admit(self) -> list[Request]:
        """Queued requests that fit the batch and the KV pages (evicting cached prefixes for room), FIFO."""
        admitted: list[Request] = []
        if self._paused:
            return admitted
        assert self.cache is not None
        while self._pending and len(self._active) + len(admitted) < self.max_batch:
            req = self._pending[0]
            reserved = sum(r.reserved_pages for r in (*self._active, *admitted))
            while reserved + req.reserved_pages + self.prefix_cache.pages() > self.cache.total_pages:
                if not self._evict_one():
                    break
            if reserved + req.reserved_pages + self.prefix_cache.pages() > self.cache.total_pages:
                if self._active or admitted:
                    break  # wait for running requests to give pages back
                self._pending.popleft()
                self._emit(
                    req,
                    (
                        "error",
                        f"the request needs {req.reserved_pages} KV pages; the server has {self.cache.total_pages}",
                    ),
                )
                continue
            admitted.append(self._pending.popleft())
        self._active.extend(admitted)
        return admitted

    def _evict_one(self) -> bool:
        entry = self.prefix_cache.pop_oldest()
        if entry is None:
            return False
        assert self.cache is not None
        self.cache.remove(entry.seq_id)
        return True

    def _guarded(self, fn: Callable[[Request], None], req: Request) -> None:
        try:
            fn(req)
        except Exception as exc:  # one request's failure must not take the scheduler down
            self._fail(req, f"{type(exc).__name__}: {exc}")

    def _fail(self, req: Request, message: str) -> None:
        if req in self._active:
            self._release(req, keep_prefix=False)
        self._emit(req, ("error", message))

    def _forward(
        self,
        entry: str,
        seq_ids: list[int],
        ids: np.ndarray,
        lengths: list[int] | None = None,
        rows: list[int] | None = None,
    ) -> np.ndarray:
        """One pass of ``entry`` over ``ids`` [rows, n] appended to ``seq_ids``; logits as a numpy view
        (valid until the next pass). ``lengths``: each sequence's share of a [1, n] prefill; ``rows``:
        the token indices whose logits ``prefill_rows`` returns."""
        assert self.session is not None and self.cache is not None
        self.cache.begin(seq_ids, lengths or [ids.shape[1]] * len(seq_ids))
        args = [self.session.tensor(ids)]
        if rows is not None:
            args.append(self.session.tensor(np.asarray(rows, dtype=np.int32)))
        logits, *objs = self.session(entry, *args, *self.cache.objs)
        self.cache.objs = objs
        self.cache.end()
        return _view(logits)

    def _forward_at(self, entry: str, seq_ids: list[int], ids: np.ndarray, positions: list[int]) -> np.ndarray:
        """``_forward`` through a ``*_at`` entry at true ``positions`` (one per id); keeps each row's queries."""
        assert self.session is not None and self.cache is not None
        self.cache.begin(seq_ids, [ids.shape[1]] * len(seq_ids))
        pos = self.session.tensor(np.asarray(positions, dtype=np.int32))
        logits, queries, self.cache.obj = self.session(entry, self.session.tensor(ids), pos, self.cache.obj)
        self.cache.end()
        self._queries = to_numpy(queries)  # [layers, rows, heads, dim]
        return to_numpy(logits)

    _queries: np.ndarray | None = None

    def _make_room(self, req: Request, adding: int) -> None:
        """Evict ``req``'s least-attended entries (TOVA) if ``adding`` more would exceed the budget."""
        assert self.budget is not None and self._kv is not None and self.cache is not None
        held = req.position - req.evicted
        if held + adding <= self.budget.tokens:
            return
        assert req.queries is not None, "a sequence over its budget has run a token before"
        dropped = self._kv.evict(self.cache.obj, req.seq_id, req.queries, self.budget)
        req.evicted += dropped
        self.counters.evicted_tokens += dropped
        self.counters.evictions += 1

    def _prefill_budget(self, req: Request, start: int) -> np.ndarray:
        """Prefill from ``start`` under the budget: whole chunks while it fits, then ``step``-sized
        pieces, each after an eviction scored by the previous piece's last queries."""
        assert self.budget is not None
        logits = None
        s = start
        while s < len(req.prompt):
            remaining = len(req.prompt) - s
            n = piece(min(remaining, self.budget.tokens - (req.position - req.evicted)), self.prefill_chunk)
            if n < min(self.budget.step, remaining):  # full: evict, then a step-sized piece
                n = piece(min(self.budget.step, remaining), self.prefill_chunk)
                self._make_room(req, n)
            chunk = req.prompt[s : s + n]
            positions = list(range(req.position, req.position + len(chunk)))
            logits = self._forward_at("prefill_at", [req.seq_id], np.asarray([chunk], dtype=np.int32), positions)
            assert self._queries is not None
            req.queries = self._queries[:, 0]
            req.position += len(chunk)
            req.kv_tokens.extend(chunk)
            s += len(chunk)
        assert logits is not None
        return logits[0, -1]

    def _setup(self, req: Request) -> None:
        """Give a new request its sequence (forked from its longest cached prefix), stats, sampler, emitter."""
        assert self.cache is not None
        req.seq_id = next(self._ids)
        entry, matched = self.prefix_cache.lookup(req.prompt) if self.prefix_cache.max_tokens else (None, 0)
        if self.budget is not None and matched > self.budget.keep:  # no queries yet to evict by
            entry, matched = None, 0
        if self.local and matched >= self.page_size and len(req.prompt) + req.max_tokens > self.local["window"]:
            # TVM attends to a forked sequence block by block and measures a sliding window from
            # the end of each block, not from the query: exact while every position of the
            # sequence is inside the window, wrong past it (docs/serving.md, Gemma 3). A fork
            # inside the first page is a copy, a sequence of its own: exact at any length.
            matched = self.page_size - 1
        if entry is not None:
            self.cache.fork(entry.seq_id, req.seq_id, matched)
        else:
            self.cache.add(req.seq_id)
        req.kv_tokens = list(req.prompt[:matched])
        req.position = matched
        req.stats = GenerationStats(prompt_tokens=len(req.prompt), cached_tokens=matched)
        c = self.counters
        c.prompt_tokens += len(req.prompt)
        c.prefill_tokens += len(req.prompt) - matched
        c.prefix_hit_tokens += matched
        req.sampler = Sampler(req.sampling)
        req.emitter = TokenEmitter(self.tokenizer, req.prompt, req.stats, req.max_tokens, req.stop)

    def _start(self, reqs: list[Request]) -> None:
        """Prefill requests admitted together and emit their first tokens (or queue them for the next step)."""
        ready: list[Request] = []
        for req in reqs:
            self._guarded(self._setup, req)
            if req.seq_id >= 0:
                ready.append(req)
        if not ready or self.mixed:  # mixed: their prompts run in the next steps' passes (`_mixed_step`)
            return
        t0 = time.perf_counter()
        if self.budget is not None:
            for req in ready:
                self._guarded(lambda r: self._accept(r, self._sample(r, self._prefill_budget(r, r.position))), req)
        else:
            try:
                self._prefill_together(ready)
            except Exception as exc:
                for req in ready:
                    self._fail(req, f"prefill failed: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0
        self.counters.phase_seconds["prefill"] += seconds
        for req in ready:
            req.stats.prefill_seconds = seconds

    def _prefill_together(self, reqs: list[Request]) -> None:
        """The prompts of ``reqs`` in as few passes as their tokens need: one pass takes pieces of
        several sequences (TVM's cache begins a forward over many sequences, each its own length).

        The ``prefill`` entry returns the logits of a pass's last token only: the last request's
        first token comes from them; every other request holds its last prompt token back and
        runs it in the next decode step, beside the running sequences (a row of that pass).
        """
        last = reqs[-1]
        todo: deque[tuple[Request, list[int]]] = deque()
        for req in reqs:
            stop = len(req.prompt) if req is last else len(req.prompt) - 1
            if req is not last:
                req.next_token = req.prompt[-1]
            if stop > req.position:
                todo.append((req, req.prompt[req.position : stop]))
        total = sum(len(ids) for _, ids in todo)
        logits = None
        while total:
            size = piece(total, self.prefill_chunk)  # a pass of a bounded shape (see `piece`)
            seq_ids: list[int] = []
            lengths: list[int] = []
            ids: list[int] = []
            while len(ids) < size:
                req, rest = todo.popleft()
                take = rest[: size - len(ids)]
                if len(take) < len(rest):
                    todo.appendleft((req, rest[len(take) :]))
                seq_ids.append(req.seq_id)
                lengths.append(len(take))
                ids.extend(take)
                req.kv_tokens.extend(take)
                req.position += len(take)
            t = time.perf_counter()
            logits = self._forward("prefill", seq_ids, np.asarray([ids], dtype=np.int32), lengths)
            self._count_pass("prefill", 0, time.perf_counter() - t, len(ids))
            self.counters.prefill_passes += 1
            total -= size
        assert logits is not None  # the last request has at least one token to run (see PrefixCache.lookup)
        row = logits[0, -1]
        self._guarded(lambda r: self._accept(r, self._sample(r, row)), last)

    def _decode_step(self) -> None:
        """Every active sequence's pending token in one batched pass (or row by row without ``batch_decode``)."""
        rows = list(self._active)
        t0 = time.perf_counter()
        try:
            ids = np.asarray([[r.next_token] for r in rows], dtype=np.int32)
            if self.budget is not None:
                for r in rows:
                    self._make_room(r, 1)
                positions = [r.position for r in rows]
                logits = self._forward_at("batch_decode_at", [r.seq_id for r in rows], ids, positions)[:, 0]
                assert self._queries is not None
                for i, r in enumerate(rows):
                    r.queries = self._queries[:, i]
            elif self.batched:
                logits = self._forward("batch_decode", [r.seq_id for r in rows], ids)[:, 0]
            else:
                logits = np.stack(
                    [self._forward("decode", [r.seq_id], ids[i : i + 1])[0, 0].copy() for i, r in enumerate(rows)]
                )
        except Exception as exc:
            for r in rows:
                self._fail(r, f"decode failed: {type(exc).__name__}: {exc}")
            return
        now = self._tick("decode", t0)
        self._count_pass("decode", len(rows), now - t0, len(rows))
        self._decoded(rows, now - t0, now)
        self._take(rows, logits, now)

    def _decoded(self, rows: list[Request], seconds: float, now: float) -> None:
        """Count a pass that ran each of ``rows``' pending token."""
        with self._cond:
            self._rate.append((now, len(rows)))
        self.counters.decode_steps += 1
        self.counters.decode_rows += len(rows)
        for r in rows:
            r.kv_tokens.append(r.next_token)
            r.position += 1
            r.stats.decode_step_seconds.append(seconds)

    def _take(self, reqs: list[Request], logits: np.ndarray, now: float) -> None:
        """Each request's next token from its row of ``logits`` [rows, vocab]: sample, send, finish."""
        # Greedy rows without a repetition penalty (the common case) take one argmax over the
        # batch's logits at once; the others go through their sampler row by row.
        plain = [i for i, r in enumerate(reqs) if r.sampling.greedy and r.sampling.repetition_penalty == 1.0]
        tokens: dict[int, int] = {}
        if plain:
            picked = (logits if len(plain) == len(reqs) else logits[plain]).argmax(axis=1)
            tokens = dict(zip(plain, picked.tolist(), strict=True))
        self._tick("sample", now)
        for i, r in enumerate(reqs):
            self._guarded(lambda q, i=i: self._accept(q, tokens[i] if i in tokens else self._sample(q, logits[i])), r)

    def _mixed_step(self) -> None:
        """One ragged pass: every decoding sequence's pending token and the next chunk of the waiting
        prompts (FIFO), at most ``step_tokens`` in all (a whole prefill chunk when nobody decodes).

        Each sequence is a piece of its own length (a decoding one's is 1 token); ``prefill_rows``
        returns the logits of each decoding row and of each prompt's last token when it is in the
        pass (that request's first token).

        The pass has a bounded set of shapes (see `piece`; the warm-up runs each): up to
        ``2 * max_batch`` tokens any size; beyond, without decoding rows, a power of two or the
        whole chunk; with them, every waiting token that fits, padded up to a multiple of
        ``PAD_TO`` by a scratch sequence removed after the pass (its tokens change nobody's
        attention), so a short prompt beside the batch takes one pass, not one per power of two.
        """
        rows = [r for r in self._active if r.next_token >= 0]
        filling = [r for r in self._active if r.next_token < 0]
        waiting = sum(len(r.prompt) - r.position for r in filling)
        total = min(len(rows) + waiting, self.step_tokens if rows else self.prefill_chunk)
        pad = 0
        if total <= 2 * self.max_batch:
            size = total
        elif not rows:
            size = piece(total, self.prefill_chunk)
        else:
            assert self.cache is not None
            size = total
            padded = min(-(-total // PAD_TO) * PAD_TO, self.step_tokens)
            # The scratch takes a page that the pass's own tokens must not be short of (at most a
            # page per sequence beyond what their tokens fill).
            needed = 1 + len(self._active) + -(-total // self.page_size)
            if padded > total and self.cache.total_pages - self.cache.pages_in_use >= needed:
                pad = padded - total
        seq_ids = [r.seq_id for r in rows]
        lengths = [1] * len(rows)
        ids = [r.next_token for r in rows]
        gather = list(range(len(rows)))
        takes: list[tuple[Request, list[int]]] = []
        firsts: list[Request] = []
        for req in filling:
            room = size - len(ids)
            if room <= 0:
                break
            take = req.prompt[req.position : req.position + min(room, self.piece_cap)]
            seq_ids.append(req.seq_id)
            lengths.append(len(take))
            ids.extend(take)
            takes.append((req, take))
            if req.position + len(take) == len(req.prompt):
                gather.append(len(ids) - 1)
                firsts.append(req)
        scratch = -1
        if pad:
            assert self.cache is not None
            scratch = next(self._ids)
            self.cache.add(scratch)
            seq_ids.append(scratch)
            lengths.append(pad)
            ids.extend([0] * pad)
        t0 = time.perf_counter()
        try:
            logits = self._forward(
                "prefill_rows", seq_ids, np.asarray([ids], dtype=np.int32), lengths, gather or [len(ids) - 1]
            )[0]
        except Exception as exc:
            for r in [*rows, *(q for q, _ in takes)]:
                self._fail(r, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        finally:
            if scratch >= 0:
                assert self.cache is not None
                self.cache.remove(scratch)
        now = self._tick("mixed" if rows else "prefill", t0)
        c = self.counters
        self._count_pass("mixed" if rows else "prefill", len(rows), now - t0, len(ids), pad)
        c.prefill_passes += 1
        for req, take in takes:
            req.kv_tokens.extend(take)
            req.position += len(take)
            req.stats.prefill_seconds += now - t0
        if rows:
            c.mixed_passes += 1
            self._decoded(rows, now - t0, now)
        self._take([*rows, *firsts], logits, now)

    def _count_pass(self, kind: str, rows: int, seconds: float, tokens: int, pad: int = 0) -> None:
        """Count a model pass (/metrics) and put it on the step's trace line."""
        self.counters.count_pass(kind, rows, seconds, tokens)
        if self.trace is not None:
            self.trace.pass_done(kind, rows, tokens, pad, seconds)

    def _sample(self, req: Request, logits: np.ndarray) -> int:
        assert req.sampler is not None and req.emitter is not None
        t = time.perf_counter()
        token = req.sampler(logits, req.emitter.history)
        self._tick("sample", t)
        return token

    def _accept(self, req: Request, token: int) -> None:
        """Take ``token`` as ``req``'s next one: send its text, and finish the request when it ends."""
        assert req.emitter is not None
        t = time.perf_counter()
        for _ in req.emitter.emit([token]):
            self.counters.generated_tokens += 1
        t = self._tick("detokenize", t)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            self._observe_ttft(req.first_token_at - req.submitted)
        if not req.emitter.done and self.budget is None and len(req.kv_tokens) + 1 > self.context_length:
            req.stats.stop_reason = "context_full"
        self._send_text(req)
        if req.emitter.done:
            self._finish(req)
        else:
            req.next_token = token
        self._tick("send", t)

    def _send_text(self, req: Request) -> None:
        """Send new text, cut at a stop string; a tail that may begin a stop string waits."""
        assert req.emitter is not None
        text = req.emitter.text
        end = len(text)
        if req.stats.stop_reason == "stop_string":
            end = min(i for i in (text.find(s) for s in req.stop) if i >= 0)
        elif not req.emitter.done:
            for s in req.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        if end > req.sent:
            self._emit(req, ("text", text[req.sent : end]))
            req.sent = end

    def _observe_ttft(self, seconds: float) -> None:
        c = self.counters
        c.ttft_sum += seconds
        c.ttft_count += 1
        for bound in c.ttft_buckets:
            if seconds <= bound:
                c.ttft_buckets[bound] += 1

    def _finish(self, req: Request) -> None:
        req.stats.decode_seconds = sum(req.stats.decode_step_seconds)
        self._release(req, keep_prefix=True)
        self.counters.finished += 1
        self._emit(req, ("done", FINISH_REASONS.get(req.stats.stop_reason, "stop")))

    def _release(self, req: Request, keep_prefix: bool) -> None:
        """Take ``req`` out of the batch; its sequence becomes a cached prefix (whole pages) or is removed."""
        assert self.cache is not None
        if req in self._active:
            self._active.remove(req)
        if req.seq_id < 0:
            return
        keep = len(req.kv_tokens) // self.page_size * self.page_size
        cache = self.prefix_cache
        # A sequence that lost entries to the budget no longer holds the KV of its tokens' prefix.
        cacheable = keep_prefix and req.evicted == 0 and cache.max_tokens >= keep > 0
        if cacheable and not cache.covered(req.kv_tokens[:keep]):
            self.cache.popn(req.seq_id, len(req.kv_tokens) - keep)
            cache.add(req.seq_id, req.kv_tokens[:keep])
            while cache.over_bound() and self._evict_one():
                pass
        else:
            self.cache.remove(req.seq_id)
        req.seq_id = -1
