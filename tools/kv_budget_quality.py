"""What a KV budget costs: greedy agreement with the full cache after a long chat (TOVA eviction).

A chat of about ``--chat-tokens`` tokens is built from the project's own text (README and docs
paragraphs as alternating user and assistant turns, then a last question). The full cache
answers it greedily for ``--next`` tokens: the reference. For each budget (the chat's length
divided by each ``--fractions`` value) the same artifact runs the chat keeping at most that many
KV entries per layer and KV head, as ``edgert serve --kv-budget`` does, and the table gives

  forced  top-1 agreement with the reference tokens when the reference is fed back (teacher
          forcing: every step sees the same history, so one early difference does not cascade);
  free    its own greedy tokens equal to the reference, position by position;
  prefix  how many of its first greedy tokens equal the reference before the first difference.

``--window`` adds the plain baseline that keeps the most recent entries (same budget, same steps).

``--engine`` also runs each budget through `edgert.serve.engine.LLMEngine` and checks that the
server's greedy tokens are the ones this tool's loop produced.

  python tools/kv_budget_quality.py smollm2-ev.edgert            (compile ... --evictable-kv --context 4096)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgert.artifact.reader import open_artifact  # noqa: E402
from edgert.runtime.kv_budget import KVBudget, SequenceKV, check_evictable  # noqa: E402
from edgert.runtime.session import Session  # noqa: E402
from edgert.runtime.tokenizer import TextTokenizer  # noqa: E402
from edgert.runtime.tvm_runtime import to_numpy  # noqa: E402


def project_paragraphs() -> list[str]:
    """Prose paragraphs of the README and docs (code blocks and tables left out), in order."""
    out: list[str] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for block in re.split(r"\n\s*\n", text):
            lines = [ln for ln in block.strip().splitlines() if not ln.lstrip().startswith(("|", "#"))]
            para = " ".join(ln.strip() for ln in lines).strip()
            if len(para) > 80:
                out.append(para)
    return out


def build_chat(tokenizer: TextTokenizer, target: int) -> list[int]:
    """Chat-template token ids of turns taken from the project's text, about ``target`` tokens long."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant for edgert users."}]
    question = {"role": "user", "content": "In one paragraph, what did we say about running models on small boards?"}
    for para in project_paragraphs():
        turn = {"role": "user" if len(messages) % 2 == 1 else "assistant", "content": para}
        trial = tokenizer.encode(tokenizer.apply_chat_template([*messages, turn, question]))
        if len(trial) > target:
            continue  # a shorter paragraph further on may still fit
        messages.append(turn)
    if messages[-1]["role"] == "user":
        messages.pop()
    return tokenizer.encode(tokenizer.apply_chat_template([*messages, question]))


class Runner:
    """One sequence of the artifact's paged KV cache fed as the server feeds it (under a budget or not)."""

    def __init__(self, session: Session, manifest: dict[str, Any], budget: KVBudget | None, window: bool = False):
        from edgert.serve.engine import BatchKVCache

        kv = manifest["kv_cache"]
        self.session, self.budget = session, budget
        self.chunk = int(kv["prefill_chunk_size"])
        self.cache = BatchKVCache(session, 1, int(kv["context_length"]), self.chunk, int(kv["page_size"]))
        self.cache.add(1)
        self.kv = SequenceKV()
        self.position = self.held = self.evictions = 0
        self.queries: np.ndarray | None = None
        self.window = window

    def _run(self, entry: str, ids: list[int]) -> np.ndarray:
        positions = np.arange(self.position, self.position + len(ids), dtype=np.int32)
        if entry == "prefill_at":
            tokens, lengths = np.asarray([ids], np.int32), [len(ids)]
        else:
            tokens, lengths = np.asarray([[ids[0]]], np.int32), [1]
        self.cache.begin([1], lengths)
        s = self.session
        logits, q, self.cache.obj = s(entry, s.tensor(tokens), s.tensor(positions), self.cache.obj)
        self.cache.end()
        self.queries = to_numpy(q)[:, 0]
        self.position += len(ids)
        self.held += len(ids)
        return to_numpy(logits).reshape(-1)

    def _room(self, adding: int) -> None:
        if self.budget is not None and self.held + adding > self.budget.tokens:
            assert self.queries is not None
            if self.window:  # the baseline: keep the most recent entries
                meta, k, v = self.kv.read(self.cache.obj, 1)
                keep = self.budget.keep
                self.kv.write(self.cache.obj, 1, meta, k[:, -keep:], v[:, -keep:])
                self.held = keep
            else:
                self.held -= self.kv.evict(self.cache.obj, 1, self.queries, self.budget)
            self.evictions += 1

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """The prompt in whole chunks while it fits, then ``step`` pieces after evictions (as the server)."""
        s, logits = 0, None
        limit = self.budget.tokens if self.budget else 1 << 30
        step = self.budget.step if self.budget else self.chunk
        while s < len(prompt):
            remaining = len(prompt) - s
            n = min(self.chunk, remaining, limit - self.held)
            if n < min(step, remaining):
                n = min(step, remaining)
                self._room(n)
            logits = self._run("prefill_at", prompt[s : s + n])
            s += n
        assert logits is not None
        return logits

    def step(self, token: int) -> np.ndarray:
        self._room(1)
        return self._run("batch_decode_at", [token])


def run_budget(
    session: Session,
    manifest: dict[str, Any],
    prompt: list[int],
    n: int,
    budget: KVBudget | None,
    forced: list[int],
    window: bool = False,
) -> dict[str, Any]:
    """Greedy tokens (free) and top-1 agreement with ``forced`` fed back (forced; empty: skip)."""
    out: dict[str, Any] = {}
    for mode in ("free", "forced") if forced else ("free",):
        r = Runner(session, manifest, budget, window)
        t0 = time.perf_counter()
        logits = r.prefill(prompt)
        tokens: list[int] = []
        for i in range(n):
            tokens.append(int(np.argmax(logits)))
            if i + 1 < n:
                logits = r.step(forced[i] if mode == "forced" else tokens[-1])
        out[mode] = tokens
        out[f"{mode}_seconds"] = round(time.perf_counter() - t0, 1)
        out["evictions"] = r.evictions
        out["max_held"] = r.held if budget is None else min(r.held, budget.tokens)
        r.cache.remove(1)
    return out


def engine_tokens(artifact: Path, prompt: list[int], n: int, budget: int | None, threads: int | None) -> list[int]:
    """The greedy tokens `edgert serve`'s engine generates (stop tokens ignored only by stopping there)."""
    from edgert.runtime.sampling import SamplingParams
    from edgert.serve.engine import LLMEngine

    engine = LLMEngine(open_artifact(artifact), threads, max_batch=1, prefix_cache_tokens=0, kv_budget=budget)
    done = threading.Event()
    try:
        req = engine.submit(prompt, lambda e: done.set() if e[0] != "text" else None, n, SamplingParams())
        done.wait(600)
        assert req.emitter is not None
        return req.emitter.history[len(prompt) :]
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an artifact compiled with --evictable-kv")
    parser.add_argument("--chat-tokens", type=int, default=2000)
    parser.add_argument("--fractions", default="4,8", help="budgets as the chat's length divided by each")
    parser.add_argument("--next", type=int, default=64, help="tokens compared after the chat")
    parser.add_argument("--per-layer", action="store_true", help="also TOVA's one choice per layer (heads averaged)")
    parser.add_argument("--engine", action="store_true", help="also check the server engine's greedy tokens")
    parser.add_argument("--window", action="store_true", help="also the baseline keeping the most recent entries")
    parser.add_argument("--step", type=int, default=16, help="entries dropped per eviction (the server's: 16)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    art = open_artifact(args.artifact)
    check_evictable(art.manifest)
    tokenizer = TextTokenizer(art.read_text(art.manifest["tokenizer"]["file"]), art.manifest["tokenizer"])
    prompt = build_chat(tokenizer, args.chat_tokens)
    context = int(art.manifest["kv_cache"]["context_length"])
    if len(prompt) + args.next > context:
        raise SystemExit(f"error: the chat ({len(prompt)} tokens) and --next {args.next} exceed the context {context}")
    session = Session(art, args.threads)
    full = run_budget(session, art.manifest, prompt, args.next, None, [])
    reference = full["free"]
    rows = [{"budget": "full", "tokens": len(prompt), "forced": 1.0, "free": 1.0, "prefix": args.next}]
    variants = [("", True, False)]
    variants += [(" per layer", False, False)] if args.per_layer else []
    variants += [(" window", True, True)] if args.window else []
    for f in (int(x) for x in args.fractions.split(",")):
        for label, per_head, window in variants:
            budget = KVBudget(len(prompt) // f, step=args.step, per_head=per_head)
            got = run_budget(session, art.manifest, prompt, args.next, budget, reference, window)
            free = got["free"]
            prefix = next((i for i, (a, b) in enumerate(zip(free, reference, strict=True)) if a != b), args.next)
            row = {
                "budget": f"1/{f}{label}",
                "tokens": budget.tokens,
                "forced": round(float(np.mean(np.asarray(got["forced"]) == np.asarray(reference))), 3),
                "free": round(float(np.mean(np.asarray(free) == np.asarray(reference))), 3),
                "prefix": prefix,
                "evictions": got["evictions"],
                "seconds": got["free_seconds"],
            }
            if args.engine and not label and args.step == 16:  # the engine evicts 16 at a time
                served = engine_tokens(args.artifact, prompt, args.next, budget.tokens, args.threads)
                row["engine_same"] = served == free[: len(served)] and len(served) > 0
            rows.append(row)
    reply = tokenizer.decode(reference)
    if args.json:
        print(json.dumps({"chat_tokens": len(prompt), "rows": rows, "reference": reply}, indent=2))
        return
    print(f"chat: {len(prompt)} tokens; next {args.next} greedy tokens; reference reply: {reply[:100]!r}")
    keys = ["budget", "tokens", "forced", "free", "prefix", "evictions", "seconds", "engine_same"]
    print("".join(f"{k:>14}" for k in keys))
    for row in rows:
        print("".join(f"{row.get(k, '-')!s:>14}" for k in keys))


if __name__ == "__main__":
    main()
