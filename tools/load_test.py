"""Load test of an OpenAI-compatible server on this machine (loopback only, bounded in requests and time).

N concurrent clients send a mix of streamed chat, streamed completions and whole completions with
prompts and replies of mixed lengths; the table gives throughput, time to first token (p50, p99,
streamed requests) and errors, and for an edgert server the KV pages still in use afterwards.
A server this tool starts (``--serve``, ``--peer``) first gets a warm-up round (``--warmup``
requests); its resident memory (VmRSS of /proc/PID/status) after the warm-up and after the run
is in the table, with the growth in percent. Request n's kind, prompt and reply length depend on n
alone, so runs with different client counts send the same requests; ``--scaling R`` runs them with
1 client and with ``--clients``, alternated R times, and prints the ratio of their tokens/s.

  python tools/load_test.py --serve smollm2.edgert --clients 4 --requests 40
  python tools/load_test.py --serve smollm2.edgert --clients 4 --requests 40 --scaling 3
  python tools/load_test.py --url http://127.0.0.1:8080 --model smollm2
  python tools/load_test.py --serve smollm2.edgert --peer llama-cpp --gguf SmolLM2.gguf --threads 2

``--peer llama-cpp`` runs llama.cpp's server (``python -m llama_cpp.server``, from
``pip install 'llama-cpp-python[server]'``) on the GGUF with the same threads and the same load.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = "the a model runs on small boards and phones with paged caches batching tokens quickly".split()


@dataclass
class Result:
    """One request's outcome."""

    kind: str
    status: int
    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    error: str = ""
    prompt_tokens: int = 0


@dataclass
class Report:
    """What a run measured."""

    results: list[Result] = field(default_factory=list)
    wall_seconds: float = 0.0
    started: float = 0.0  # time.perf_counter() at the start (CLOCK_MONOTONIC: a server's trace has the same clock)
    after: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if r.status != 200 or r.error]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    def ttft_percentile(self, q: float) -> float | None:
        values = sorted(r.ttft for r in self.results if r.ttft is not None)
        if not values:
            return None
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.ttft_percentile(50), self.ttft_percentile(99)
        status: dict[str, int] = {}
        for r in self.errors:
            status[str(r.status)] = status.get(str(r.status), 0) + 1
        return {
            "requests": len(self.results),
            "errors": len(self.errors),
            "errors_by_status": status,
            "server_errors_5xx": sum(1 for r in self.results if r.status >= 500),
            "generated_tokens": self.tokens,
            "wall_seconds": round(self.wall_seconds, 2),
            "tokens_per_second": round(self.tokens / self.wall_seconds, 2) if self.wall_seconds else 0.0,
            "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttft_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "window": [round(self.started, 6), round(self.started + self.wall_seconds, 6)],
            **self.after,
        }


def check_loopback(url: str) -> urllib.parse.SplitResult:
    """The URL split, refused unless its host is this machine (the tool never loads another host)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = False
    if not loop:
        raise SystemExit(f"error: {url} is not a loopback address; this tool loads servers on this machine only")
    return parts


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Mix:
    """The requests' shapes: prompt lengths in words and reply lengths in tokens, drawn at random;
    ``system``: a chat system prompt every chat request starts with."""

    words: tuple[int, ...] = (8, 40, 120)
    max_tokens: tuple[int, ...] = (16, 48)
    system: str = ""


def one_request(
    base: urllib.parse.SplitResult,
    model: str,
    kind: str,
    rng: random.Random,
    api_key: str | None,
    timeout: float,
    mix: Mix | None = None,
) -> Result:
    """Send one request of ``kind`` (chat-stream, completion-stream, completion) and time it."""
    mix = mix or Mix()
    words = rng.choice(mix.words)
    max_tokens = rng.choice(mix.max_tokens)
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if kind == "chat-stream":
        path = "/v1/chat/completions"
        system = [{"role": "system", "content": mix.system}] if mix.system else []
        body["messages"] = [*system, {"role": "user", "content": _prompt(rng, words)}]
    else:
        path = "/v1/completions"
        body["prompt"] = _prompt(rng, words)
    stream = kind.endswith("stream")
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            return Result(kind, resp.status, seconds=time.perf_counter() - t0, error=text[:200])
        if not stream:
            data = json.loads(resp.read())
            tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
            return Result(kind, 200, tokens, None, time.perf_counter() - t0)
        ttft, chunks, usage_tokens, prompt_tokens = None, 0, None, 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj:
                return Result(kind, 200, chunks, ttft, time.perf_counter() - t0, error=str(obj["error"])[:200])
            if obj.get("usage"):
                usage_tokens = int(obj["usage"].get("completion_tokens", 0))
                prompt_tokens = int(obj["usage"].get("prompt_tokens", 0))
            for c in obj.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                if piece:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
        tokens = usage_tokens if usage_tokens is not None else chunks
        return Result(kind, 200, tokens, ttft, time.perf_counter() - t0, prompt_tokens=prompt_tokens)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Result(kind, 0, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def run_load(
    url: str,
    model: str,
    clients: int = 4,
    requests: int = 40,
    max_seconds: float = 120.0,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 120.0,
    mix: Mix | None = None,
) -> Report:
    """``clients`` threads send ``requests`` requests in all (fewer if ``max_seconds`` runs out)."""
    base = check_loopback(url)
    kinds = ("chat-stream", "completion-stream", "completion")
    report = Report()
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + max_seconds

    def client(i: int) -> None:
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    return
                n = issued[0]
                issued[0] += 1
            # Request n's kind, prompt and reply length depend on n alone, not on which client sends
            # it: runs with 1 and with N clients send the same requests, so their tokens/s compare.
            rng = random.Random(seed * 1_000_003 + n)
            result = one_request(base, model, kinds[n % len(kinds)], rng, api_key, timeout, mix)
            with lock:
                report.results.append(result)

    t0 = report.started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_seconds = time.perf_counter() - t0
    report.after = server_gauges(base, api_key)
    return report


def repeated_prefix_ttft(url: str, model: str, words: int, api_key: str | None = None) -> dict[str, Any]:
    """Time to first token of two streamed chats with the same ``words``-word system prompt (new
    to the server) and different questions: the second may reuse the first's prompt KV."""
    base = check_loopback(url)
    system = _prompt(random.Random(os.urandom(8)), words)
    mix = Mix(words=(6,), max_tokens=(4,), system=system)
    got = []
    for question in (1, 2):  # the same system prompt, then a different question
        r = one_request(base, model, "chat-stream", random.Random(question), api_key, 300.0, mix)
        if r.status != 200 or r.error or r.ttft is None:
            raise SystemExit(f"error: the repeated-prefix request failed: {r.status} {r.error}")
        got.append(r)
    first, second = got
    return {
        "prefix_prompt_tokens": first.prompt_tokens,
        "ttft_first_ms": round(first.ttft * 1000, 1),
        "ttft_second_ms": round(second.ttft * 1000, 1),
        "ttft_ratio": round(first.ttft / second.ttft, 2),
    }


def server_gauges(base: urllib.parse.SplitResult, api_key: str | None) -> dict[str, float]:
    """An edgert server's KV pages in use, active sequences and cached prefix tokens (empty for others)."""
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace") if resp.status == 200 else ""
    except OSError:
        return {}
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("edgert_kv_pages_in_use", "edgert_active_sequences", "edgert_prefix_cache_pages"):
            if line.startswith(name + "{"):
                out[name.removeprefix("edgert_")] = float(line.rsplit(" ", 1)[1])
    if "kv_pages_in_use" in out and out.get("active_sequences") == 0:
        # Idle, only cached prefixes may hold pages (their count is an upper bound: forked
        # prefixes share pages); more in use means a sequence was never freed.
        out["kv_pages_leaked"] = max(0.0, out["kv_pages_in_use"] - out.get("prefix_cache_pages", 0.0))
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid``'s threads by name: ``main`` is the first
    thread (uvicorn's event loop), the others by their OS name (the engine names its scheduler
    ``edgert-sched``; TVM's pool workers take the name of the thread that started them)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "main" if int(task.name) == pid else comm
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def scheduler_phases(url: str, api_key: str | None = None) -> dict[str, float]:
    """An edgert server's scheduler seconds by phase (/metrics' edgert_scheduler_seconds_total) and its
    model passes by kind and decoding rows (``passes decode/4``, ``pass-seconds decode/4``,
    ``pass-tokens decode/4``: edgert_model_pass*_total)."""
    base = check_loopback(url)
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        text = conn.getresponse().read().decode(errors="replace")
    except OSError:
        return {}
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edgert_scheduler_seconds_total{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            out[phase] = out.get(phase, 0.0) + float(line.rsplit(" ", 1)[1])
        for metric, prefix in PASS_METRICS.items():
            if line.startswith(metric + "{"):
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                rows = line.split('rows="', 1)[1].split('"', 1)[0]
                key = f"{prefix} {kind}/{rows}"
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


PASS_METRICS = {
    "edgert_model_passes_total": "passes",
    "edgert_model_pass_seconds_total": "pass-seconds",
    "edgert_model_pass_tokens_total": "pass-tokens",
}


def measured_run(
    url: str, model: str, pid: int, warmup: int, clients: int, requests: int, max_seconds: float, **kw: Any
) -> dict[str, Any]:
    """`run_load` after a warm-up round, with process ``pid``'s RSS after each (the run's summary)."""
    if warmup:
        run_load(url, model, clients, warmup, max_seconds, seed=99, **kw)
    warm = rss_mib(pid)
    cpu0, phases0, own0 = thread_cpu(pid), scheduler_phases(url, kw.get("api_key")), os.times()
    summary = run_load(url, model, clients, requests, max_seconds, **kw).summary()
    after = rss_mib(pid)
    cpu1, phases1, own1 = thread_cpu(pid), scheduler_phases(url, kw.get("api_key")), os.times()
    summary.update(
        rss_warm_mib=round(warm, 1), rss_after_mib=round(after, 1), rss_growth_pct=round(100 * (after / warm - 1), 2)
    )
    # Where the run's time went: the server's threads, the scheduler's phases, and this tool's
    # own clients (they share the machine's cores with the server).
    summary["cpu_seconds"] = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) > 0}
    summary["cpu_seconds"]["load-test clients"] = round((own1.user + own1.system) - (own0.user + own0.system), 2)
    delta = {k: v - phases0.get(k, 0.0) for k, v in phases1.items()}
    summary["scheduler_seconds"] = {k: round(v, 3) for k, v in delta.items() if " " not in k}
    # Model passes by kind and decoding rows: count, seconds, tokens (padding included).
    summary["passes"] = {
        k.split(" ", 1)[1]: [
            round(v),
            round(delta.get("pass-seconds " + k.split(" ", 1)[1], 0.0), 3),
            round(delta.get("pass-tokens " + k.split(" ", 1)[1], 0.0)),
        ]
        for k, v in sorted(delta.items())
        if k.startswith("passes ") and v > 0
    }
    return summary


def scaling_run(
    url: str, model: str, warmup: int, clients: int, requests: int, max_seconds: float, rounds: int, **kw: Any
) -> dict[str, Any]:
    """The same ``requests`` requests sent by 1 client and by ``clients`` clients, alternated for
    ``rounds`` rounds (the order swapped every other round, so a slow spell of the machine falls on
    both); per round the ratio of their tokens/s, and the median of those ratios."""
    if warmup:
        run_load(url, model, clients, warmup, max_seconds, seed=99, **kw)
    runs: dict[int, list[dict[str, Any]]] = {1: [], clients: []}
    for r in range(rounds):
        for n in (1, clients) if r % 2 == 0 else (clients, 1):
            summary = run_load(url, model, n, requests, max_seconds, **kw).summary()
            if summary["requests"] < requests or summary["errors"]:
                raise SystemExit(
                    f"error: the {n}-client run sent {summary['requests']} of {requests} requests with "
                    f"{summary['errors']} errors (raise --max-seconds?); its tokens/s would not compare"
                )
            runs[n].append(summary)
    ratios = [m["tokens_per_second"] / o["tokens_per_second"] for o, m in zip(runs[1], runs[clients], strict=True)]
    return {
        "clients": clients,
        "requests": requests,
        "one_client_tokens_per_second": [o["tokens_per_second"] for o in runs[1]],
        "clients_tokens_per_second": [m["tokens_per_second"] for m in runs[clients]],
        "generated_tokens": [[o["generated_tokens"] for o in runs[1]], [m["generated_tokens"] for m in runs[clients]]],
        "windows": [[o["window"] for o in runs[1]], [m["window"] for m in runs[clients]]],
        "ratios": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, seconds: float = 300.0) -> None:
    """Wait until the server on ``port`` answers /v1/models (or its process dies)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode} before it answered (log: {proc.log})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status in (200, 401):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"error: no answer on port {port} within {seconds:.0f} s")


def start_edgert(artifact: Path, threads: int | None, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "edgert.cli", "serve", str(artifact), "--port", str(port), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = spawn(cmd, "edgert")
    wait_ready(port, proc)
    return proc, port


def stop_all(procs: Sequence[subprocess.Popen]) -> None:
    """Stop the servers this tool started (killed after 20 s without exiting)."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def spawn(cmd: list[str], name: str) -> subprocess.Popen:
    """Start a server with its output in a log file (a pipe nobody reads would block it once full)."""
    log = Path(tempfile.mkdtemp(prefix="load_test-")) / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def start_llama_cpp(gguf: Path, threads: int | None, model: str, context: int) -> tuple[subprocess.Popen, int]:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"error: llama.cpp's server needs pip install 'llama-cpp-python[server]' ({exc})") from None
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(context),
    ]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    proc = spawn(cmd, "llama-cpp")
    wait_ready(port, proc)
    return proc, port


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    keys = [
        "requests",
        "errors",
        "server_errors_5xx",
        "generated_tokens",
        "wall_seconds",
        "tokens_per_second",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "kv_pages_in_use",
        "kv_pages_leaked",
        "active_sequences",
        "rss_warm_mib",
        "rss_after_mib",
        "rss_growth_pct",
    ]
    print(f"{'server':<12}" + "".join(f"{k:>19}" for k in keys))
    for name, s in rows.items():
        print(f"{name:<12}" + "".join(f"{s.get(k, '-')!s:>19}" for k in keys))
    for name, s in rows.items():
        for key in ("cpu_seconds", "scheduler_seconds"):
            if s.get(key):
                print(f"{name} {key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
        if s.get("passes"):
            print(
                f"{name} model passes (kind/rows: passes, seconds, tokens): "
                + ", ".join(f"{k} {n} {sec} s {tok}" for k, (n, sec, tok) in s["passes"].items())
            )
        if "ttft_first_ms" in s:
            print(
                f"{name} repeated {s['prefix_prompt_tokens']}-token prompt: first token after "
                f"{s['ttft_first_ms']} ms, then {s['ttft_second_ms']} ms ({s['ttft_ratio']}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (loopback only), e.g. http://127.0.0.1:8080")
    where.add_argument("--serve", type=Path, help="start `edgert serve ARTIFACT` on a free port for the run")
    parser.add_argument("--model", help="model name (default: the artifact's stem with --serve)")
    parser.add_argument("--serve-args", default="", help="more `edgert serve` options: --serve-args='--no-warm-up'")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40, help="requests in all (at most 2000)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this (at most 1800)")
    parser.add_argument("--api-key", default=os.environ.get("EDGERT_API_KEY"))
    parser.add_argument("--threads", type=int, help="server threads (both servers)")
    parser.add_argument("--peer", choices=["llama-cpp"], help="also load llama.cpp's server the same way")
    parser.add_argument("--gguf", type=Path, help="the GGUF for --peer llama-cpp")
    parser.add_argument("--context", type=int, default=2048, help="context for --peer llama-cpp")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up requests before a started server's run")
    parser.add_argument("--words", default="8,40,120", help="prompt lengths in words, drawn at random")
    parser.add_argument("--max-tokens", default="16,48", help="reply lengths in tokens, drawn at random")
    parser.add_argument("--system-prompt", type=int, default=0, help="WORDS of system prompt shared by every chat")
    parser.add_argument(
        "--prefix-ttft",
        type=int,
        default=0,
        metavar="WORDS",
        help="after the run, time the first token of two chats sharing a new WORDS-word system prompt",
    )
    parser.add_argument(
        "--scaling",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: send the same --requests with 1 client and with --clients clients, alternated for "
        "ROUNDS rounds, and print the ratio of their tokens/s",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    try:
        mix = Mix(
            tuple(int(w) for w in args.words.split(",")),
            tuple(int(t) for t in args.max_tokens.split(",")),
            _prompt(random.Random(5), args.system_prompt) if args.system_prompt else "",
        )
    except ValueError:
        parser.error("--words and --max-tokens take comma-separated integers, e.g. 8,40,120")
    requests, max_seconds = min(args.requests, 2000), min(args.max_seconds, 1800.0)
    model = args.model or (args.serve.name.removesuffix(".edgert") if args.serve else None)
    if not model:
        parser.error("--model is needed with --url")
    if args.peer and not args.gguf:
        parser.error("--peer llama-cpp needs --gguf")
    rows: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen] = []
    if args.scaling:
        return scaling_main(args, model, requests, max_seconds, mix)
    try:
        if args.serve:
            proc, port = start_edgert(args.serve, args.threads, shlex.split(args.serve_args))
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            rows["edgert"] = measured_run(
                url, model, proc.pid, args.warmup, args.clients, requests, max_seconds, mix=mix
            )
        else:
            url = args.url
            rows["edgert"] = run_load(url, model, args.clients, requests, max_seconds, args.api_key, mix=mix).summary()
        if args.prefix_ttft:
            rows["edgert"].update(repeated_prefix_ttft(url, model, args.prefix_ttft, args.api_key))
        if args.peer:
            proc, port = start_llama_cpp(args.gguf, args.threads, model, args.context)
            procs.append(proc)
            peer = f"http://127.0.0.1:{port}"
            rows["llama.cpp"] = measured_run(
                peer, model, proc.pid, args.warmup, args.clients, requests, max_seconds, mix=mix
            )
            if args.prefix_ttft:
                rows["llama.cpp"].update(repeated_prefix_ttft(peer, model, args.prefix_ttft))
    finally:
        stop_all(procs)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


def scaling_main(args: argparse.Namespace, model: str, requests: int, max_seconds: float, mix: Mix) -> None:
    """``--scaling``: `scaling_run` on edgert's server (and llama.cpp's with ``--peer``), one table."""
    out: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen] = []

    def measure(url: str, api_key: str | None) -> dict[str, Any]:
        clients, rounds = args.clients, args.scaling
        return scaling_run(url, model, args.warmup, clients, requests, max_seconds, rounds, api_key=api_key, mix=mix)

    try:
        if args.serve:
            proc, port = start_edgert(args.serve, args.threads, shlex.split(args.serve_args))
            procs.append(proc)
            out["edgert"] = measure(f"http://127.0.0.1:{port}", args.api_key)
        else:
            out["edgert"] = measure(args.url, args.api_key)
        if args.peer:
            proc, port = start_llama_cpp(args.gguf, args.threads, model, args.context)
            procs.append(proc)
            out["llama.cpp"] = measure(f"http://127.0.0.1:{port}", None)
    finally:
        stop_all(procs)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, s in out.items():
        print(
            f"{name}: the same {s['requests']} requests, 1 client {s['one_client_tokens_per_second']} tok/s, "
            f"{s['clients']} clients {s['clients_tokens_per_second']} tok/s; per round {s['ratios']}; "
            f"median {s['median_ratio']}x"
        )


if __name__ == "__main__":
    main()
