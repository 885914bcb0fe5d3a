"""Language models: edgert vs llama.cpp (llama-cpp-python) on the same GGUF and thread count.

Per engine, in a fresh subprocess each (so peak RSS is that engine's alone): load to first
token, in total and in its three parts (import of the runtime: numpy and TVM, or libllama;
the model load; the first prefill of the prompt and its token), prefill tokens/s over the
prompt and decode tokens/s over ``--llm-gen-tokens`` greedy steps, as medians of
``--repeats`` runs, and peak RSS. The RSS while decoding is given twice against the weights
plus the KV cache: as the process total, and as the growth over the runtime's own baseline
(the process with the runtime imported, before the model loads). Both engines get the same
token ids and the same context length. The compile time and artifact size of edgert stand
beside the GGUF's size. The decode row
carries the roofline bound: the bytes each token reads (the weights, and the keys and values of
the positions so far) over the read bandwidth measured here with the same threads (a parallel
sum over a buffer far above the last-level cache, compiled with TVM; the best of 30 passes, the
median beside it as the spread), and the decode's fraction of it.

With ``--background N``, both engines run again beside N busy processes (`edgert.profile.background`)
and the contended decode row stands beside the quiet one: edgert with its default threads (they
follow the free cores), llama.cpp with ``--threads``, as each is used out of the box.

    python tools/bench_peers.py --only llm --threads 2
    python tools/bench_peers.py --only llm --threads 2 --background 1
    python tools/peers/llm.py roofline ARTIFACT [THREADS [ROUNDS]]   (decode against the roofline alone)
    python tools/peers/llm.py worker edgert ARTIFACT ...   (internal: one engine's run)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script (a worker): make `peers` and `edgert` importable
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from peers import Row  # noqa: E402 (after the path set-up above)

NAME = "llm"
HELP = "SmolLM2 and Gemma 3 270M (GGUF) decode/prefill vs llama.cpp"
PEER = "llama.cpp"


def add_arguments(group: Any) -> None:
    """Options of this section."""
    group.add_argument(
        "--llm-model",
        default="smollm2-135m,gemma3-270m",
        help="model recipes (models/*.toml) or .gguf files, comma-separated: one set of rows each",
    )
    group.add_argument("--llm-artifact", type=Path, help="an artifact compiled already (skips the compile)")
    group.add_argument("--llm-prompt-tokens", type=int, default=128, help="prefill length")
    group.add_argument("--llm-gen-tokens", type=int, default=128, help="decode steps per run")
    group.add_argument("--llm-context", type=int, default=512, help="context length given to both engines")
    group.add_argument("--llm-rounds", type=int, default=1, help="alternate the two engines this many times")
    group.add_argument(
        "--llama-cpp-path",
        type=Path,
        help="a folder holding another build of llama-cpp-python, put first on the llama.cpp worker's path "
        "(tools/setup.sh builds a portable one, AVX2 at most; for the CPU's own: CMAKE_ARGS=-DGGML_NATIVE=ON "
        "pip install --no-cache-dir --no-deps --target DIR llama-cpp-python)",
    )


# -- workers: one engine, one process ----------------------------------------------------------
def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MiB.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a worker would
    report its parent's peak whenever the parent was larger.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_now_mb() -> float:
    """Resident memory of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rates(n: int, seconds: list[float]) -> list[float]:
    return [round(n / s, 2) for s in seconds]


def _timings(t0: float, t1: float, t2: float, t3: float) -> dict:
    """Seconds of the import of the runtime, the model load, the first prefill, and all of it."""
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_prefill_s": t3 - t2, "load_to_first_token_s": t3 - t0}


def worker_edgert(artifact: str, ids: list[int], gen: int, repeats: int, threads: int, context: int) -> dict:
    """Time edgert on ``ids``: import, load, first token, then prefill and greedy decode runs."""
    t0 = time.perf_counter()
    import numpy as np

    import edgert
    import edgert.families.registry
    import edgert.runtime
    from edgert.runtime import tvm_runtime

    tvm_runtime.ffi()  # the TVM runtime library, as `edgert.load` loads it
    t1 = time.perf_counter()
    rss_base = _rss_now_mb()  # python + numpy + the TVM runtime: the process before any model
    model = edgert.load(artifact, threads=threads or None, context_length=context)  # 0: the default
    t2 = time.perf_counter()
    logits = model.prefill(ids)
    int(np.argmax(logits))
    t3 = time.perf_counter()
    prefill, decode = [], []
    for _ in range(repeats):
        model.reset()
        t = time.perf_counter()
        logits = model.prefill(ids)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(gen):
            logits = model.step([int(np.argmax(logits))])
        decode.append(time.perf_counter() - t)
    return {
        **_timings(t0, t1, t2, t3),
        "prefill_tps": _rates(len(ids), prefill),
        "decode_tps": _rates(gen, decode),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_decoding_mb": _rss_now_mb(),
        "rss_before_load_mb": rss_base,
        "threads": model.session.threads,
    }


def worker_llama_cpp(gguf: str, ids: list[int], gen: int, repeats: int, threads: int, context: int) -> dict:
    """Time llama.cpp on ``ids`` the same way (its default f16 KV cache, batch = the prompt)."""
    t0 = time.perf_counter()
    import llama_cpp
    import numpy as np

    t1 = time.perf_counter()
    rss_base = _rss_now_mb()  # python + numpy + libllama: the process before any model
    llm = llama_cpp.Llama(
        gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=len(ids), verbose=False
    )
    t2 = time.perf_counter()
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # logits of the last evaluated token (llama.cpp keeps only those)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    llm.eval(ids)
    int(np.argmax(last_logits()))
    t3 = time.perf_counter()
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(gen):
            llm.eval([int(np.argmax(last_logits()))])
        decode.append(time.perf_counter() - t)
    features = llama_cpp.llama_print_system_info().decode()
    return {
        **_timings(t0, t1, t2, t3),
        "prefill_tps": _rates(len(ids), prefill),
        "decode_tps": _rates(gen, decode),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_decoding_mb": _rss_now_mb(),
        "rss_before_load_mb": rss_base,
        # What the build uses ("AVX2 = 1 | AVX512 = 1 ..."): a portable build leaves AVX-512 unused.
        "isa": " ".join(part.split("=")[0].strip() for part in features.split("|") if part.strip().endswith("= 1")),
        "module": llama_cpp.__file__,
    }


# -- the section ----------------------------------------------------------------------------------
def _run_worker(engine: str, path: Path, ids_file: Path, args: Any, threads: int | None = None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker",
        engine,
        str(path),
        str(ids_file),
        str(args.llm_gen_tokens),
        str(args.repeats),
        str(args.threads if threads is None else threads),
        str(args.llm_context),
    ]
    # edgert runs as on a device: the TVM runtime library only, not the compiler.
    env = {**os.environ, **({"TVM_USE_RUNTIME_LIB": "1"} if engine == "edgert" else {})}
    env.pop("TVM_NUM_THREADS", None)  # the thread count is the argument above (0: edgert's default)
    if engine == "llama_cpp" and args.llama_cpp_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(args.llama_cpp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _l3_bytes() -> int:
    """The largest CPU cache of this machine (sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


MAX_PROBE_MIB = 2048  # the bandwidth probe's buffer: 4x even a 480 MiB cache, and memory to spare


class BandwidthProbe:
    """Read bandwidth of this machine with ``threads`` threads (TVM's pool, as the decode uses it):
    a parallel sum over a buffer of ``mbytes`` MiB (default: 16x the last-level cache, at least
    512 and at most `MAX_PROBE_MIB`: a server CPU's 480 MiB L3 asked for 7.5 GiB, and its numpy
    copy took a 2-core VM's memory), each thread with 8 independent vector accumulators so the
    loads, not the adds' latency, set the pace (one accumulator read about half as fast)."""

    def __init__(self, threads: int, mbytes: int | None = None):
        import numpy as np
        import tvm
        from tvm.script import tirx as T
        from tvm.target import codegen

        mbytes = mbytes or max(512, min(MAX_PROBE_MIB, 16 * _l3_bytes() // 2**20))
        lanes, accs = 16, 8
        chunks = 64 * threads
        per = (mbytes * 2**20 // 4) // (chunks * lanes * accs) * (lanes * accs)  # floats per chunk
        n = per * chunks

        @T.prim_func
        def stream_sum(a: T.Buffer((n,), "float32"), out: T.Buffer((chunks, lanes), "float32")):
            T.func_attr({"global_symbol": "stream_sum", "tirx.noalias": True})
            for c in T.parallel(chunks):
                acc = T.alloc_buffer((accs, lanes), "float32", scope="local")
                for u in T.unroll(accs):
                    for v in T.vectorized(lanes):
                        acc[u, v] = T.float32(0)
                for i in range(per // (lanes * accs)):
                    for u in T.unroll(accs):
                        for v in T.vectorized(lanes):
                            acc[u, v] = acc[u, v] + a[c * per + (i * accs + u) * lanes + v]
                for v in T.vectorized(lanes):
                    out[c, v] = T.float32(0)
                for u in range(accs):
                    for v in T.vectorized(lanes):
                        out[c, v] = out[c, v] + acc[u, v]

        saved = os.environ.get("TVM_NUM_THREADS")
        os.environ["TVM_NUM_THREADS"] = str(threads)  # sizes this process's pool; given back below
        try:
            target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads})
            self._f = tvm.compile(tvm.IRModule({"stream_sum": stream_sum}), target=target)["stream_sum"]
            self._a = tvm.runtime.tensor(np.ones(n, np.float32))
            self._out = tvm.runtime.tensor(np.zeros((chunks, lanes), np.float32))
            self._f(self._a, self._out)  # pages in, pool started
        finally:
            if saved is None:  # left set, it would fix the thread count of every later worker (the busy rows')
                os.environ.pop("TVM_NUM_THREADS")
            else:
                os.environ["TVM_NUM_THREADS"] = saved
        if abs(float(self._out.numpy().sum()) - n) > n * 1e-3:  # the kernel read every element once
            raise RuntimeError("the bandwidth kernel summed the wrong count")
        self.bytes, self.threads = n * 4, threads

    def rates(self, repeats: int) -> list[float]:
        """GB/s of ``repeats`` passes, in order."""
        return [self.bytes / _timed(lambda: self._f(self._a, self._out)) / 1e9 for _ in range(repeats)]


def memory_bandwidth(threads: int, mbytes: int | None = None, repeats: int = 30) -> dict[str, float]:
    """The best of ``repeats`` passes of `BandwidthProbe` in GB/s, with the median and the worst as its
    spread (another process on a core shows there)."""
    probe = BandwidthProbe(threads, mbytes)
    rates = sorted(probe.rates(repeats))
    return {
        "best_gbs": round(rates[-1], 2),
        "median_gbs": round(statistics.median(rates), 2),
        "worst_gbs": round(rates[0], 2),
        "buffer_mib": probe.bytes // 2**20,
        "threads": threads,
        "repeats": repeats,
    }


def memory_bandwidth_gbs(threads: int, mbytes: int | None = None, repeats: int = 30) -> float:
    """The best read bandwidth of `memory_bandwidth`, GB/s."""
    return memory_bandwidth(threads, mbytes, repeats)["best_gbs"]


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _weight_bytes_per_token(artifact: Path) -> tuple[int, int]:
    """(bytes of weights read per token, bytes of all weights): all but an untied embedding table."""
    from edgert.runtime import open_artifact

    art = open_artifact(artifact)
    arrays = art.weights()
    total = sum(a.nbytes for a in arrays.values())
    gathered = sum(a.nbytes for n, a in arrays.items() if n.startswith("embed_tokens."))
    return total - gathered, total


def _kv_bytes(artifact: Path, context: int) -> int:
    from edgert.runtime import open_artifact

    kv = open_artifact(artifact).manifest["kv_cache"]
    return 2 * context * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4  # float32 K and V


def token_bytes(artifact: Path, prompt_tokens: int, gen: int) -> dict[str, int]:
    """What a decode step reads, on average over a run of ``gen`` steps after ``prompt_tokens``: every
    weight but a gathered (untied) embedding table, and the keys and values of the positions so far."""
    weights, _ = _weight_bytes_per_token(artifact)
    kv = _kv_bytes(artifact, prompt_tokens + (gen - 1) // 2)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def roofline(artifact: Path, threads: int, prompt_tokens: int = 128, gen: int = 64, rounds: int = 7) -> dict[str, Any]:
    """Decode speed against the roofline (the bytes a token reads over the measured read bandwidth),
    in one process with the same threads: each round a burst of bandwidth passes (their best) and a
    greedy decode run, in alternation, so that another process's load meets both alike. The
    fraction per round, its median and spread, and the best decode over the best bandwidth."""
    import numpy as np

    import edgert
    from edgert.profile.bench import BENCH_TEXT

    probe = BandwidthProbe(threads)
    model = edgert.load(artifact, threads=threads)
    base = model.tokenizer.encode(BENCH_TEXT)
    ids = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    reads = token_bytes(artifact, prompt_tokens, gen)
    bandwidth, decode, fractions = [], [], []
    for _ in range(rounds + 1):  # the first round warms up, dropped
        bw = max(probe.rates(5))
        model.reset()
        logits = model.prefill(ids)
        t = time.perf_counter()
        for _ in range(gen):
            logits = model.step([int(np.argmax(logits))])
        tps = gen / (time.perf_counter() - t)
        bandwidth.append(bw)
        decode.append(tps)
        fractions.append(tps * reads["total"] / (bw * 1e9))
    bandwidth, decode, fractions = bandwidth[1:], decode[1:], fractions[1:]
    return {
        "artifact": str(artifact),
        "threads": threads,
        "buffer_mib": probe.bytes // 2**20,
        "bytes_per_token": reads,
        "bandwidth_gbs": {
            "best": round(max(bandwidth), 1),
            "median": round(statistics.median(bandwidth), 1),
            "worst": round(min(bandwidth), 1),
        },
        "decode_tps": {
            "best": round(max(decode), 1),
            "median": round(statistics.median(decode), 1),
            "worst": round(min(decode), 1),
        },
        "fraction": {
            "median": round(statistics.median(fractions), 3),
            "min": round(min(fractions), 3),
            "max": round(max(fractions), 3),
        },
        "fraction_of_bests": round(max(decode) * reads["total"] / (max(bandwidth) * 1e9), 3),
        "rounds": rounds,
    }


def run(args: Any) -> list[Row]:
    """Each model of ``--llm-model`` in turn (``--llm-artifact`` belongs to a single model)."""
    import argparse

    models = [m.strip() for m in args.llm_model.split(",") if m.strip()]
    if args.llm_artifact is not None and len(models) != 1:
        raise SystemExit("--llm-artifact needs a single --llm-model")
    return [row for m in models for row in _run_model(argparse.Namespace(**{**vars(args), "llm_model": m}))]


def _run_model(args: Any) -> list[Row]:
    """Compile (unless given an artifact), run both engines, and compare."""
    from edgert.profile.bench import BENCH_TEXT
    from edgert.recipes import load_recipe
    from edgert.runtime import open_artifact
    from edgert.runtime.tokenizer import TextTokenizer

    is_file = args.llm_model.endswith(".gguf")
    gguf = Path(args.llm_model) if is_file else load_recipe(args.llm_model).source_path()
    rows: list[Row] = []
    label = gguf.stem if is_file else args.llm_model
    case = f"{label} (GGUF {gguf.stem.rsplit('.', 1)[-1]}, {args.threads} threads)"
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        artifact = args.llm_artifact
        compile_s = None
        if artifact is None:
            artifact = Path(tmp) / "model.edgert"
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "edgert.cli", "compile", args.llm_model, "-o", str(artifact)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            compile_s = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"edgert compile failed: {proc.stderr[-2000:]}")
        art = open_artifact(artifact)
        tokenizer = TextTokenizer(art.read_text(art.manifest["tokenizer"]["file"]), art.manifest["tokenizer"])
        base = tokenizer.encode(BENCH_TEXT)
        ids = (base * (args.llm_prompt_tokens // len(base) + 1))[: args.llm_prompt_tokens]
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))

        results: dict[str, list[dict]] = {"edgert": [], "llama_cpp": []}
        for _ in range(args.llm_rounds):
            print("   edgert ...", file=sys.stderr, flush=True)
            results["edgert"].append(_run_worker("edgert", artifact, ids_file, args))
            print("   llama.cpp ...", file=sys.stderr, flush=True)
            results["llama_cpp"].append(_run_worker("llama_cpp", gguf, ids_file, args))
        ours, theirs = _merge(results["edgert"]), _merge(results["llama_cpp"])
        busy: dict[str, dict] = {}
        if getattr(args, "background", 0):
            from edgert.profile.background import busy_processes

            for engine, path, threads in (("edgert", artifact, 0), ("llama_cpp", gguf, args.threads)):
                print(f"   {engine} beside {args.background} busy processes ...", file=sys.stderr, flush=True)
                with busy_processes(args.background) as bg:
                    busy[engine] = _run_worker(engine, path, ids_file, args, threads)
                busy[engine]["background_cpu_s"] = bg.cpu_seconds

        probe = memory_bandwidth(args.threads)
        bandwidth = probe["best_gbs"]
        _, total = _weight_bytes_per_token(artifact)
        reads = token_bytes(artifact, args.llm_prompt_tokens, args.llm_gen_tokens)
        per_token = reads["total"]
        bound = bandwidth * 1e9 / per_token
        kv = _kv_bytes(artifact, args.llm_context)
        size = sum(f["size"] for f in art.manifest["files"].values())

    def row(metric: str, unit: str, a: float | None, b: float | None, higher: bool = True, **extra: Any) -> None:
        rows.append(Row(NAME, case, metric, unit, a, b, PEER, higher, extra))

    row(
        "decode",
        "tok/s",
        ours["decode"],
        theirs["decode"],
        roofline=f"{bound:.0f} tok/s ({per_token / 1e6:.1f} MB/token at {bandwidth:.1f} GB/s)",
        # The spread: the fraction at the median bandwidth of the probe's passes (the machine's load).
        of_roofline=f"{ours['decode'] / bound:.2f} ({ours['decode'] * per_token / (probe['median_gbs'] * 1e9):.2f})",
        bytes_per_token=reads,
        bandwidth_gbs={k: probe[k] for k in ("best_gbs", "median_gbs", "worst_gbs")},
        runs=ours["decode_runs"],
        peer_runs=theirs["decode_runs"],
        edgert_isa=" ".join(art.manifest["target"].get("cpu_flags", [])) or art.manifest["target"]["cpu"],
        peer_isa=results["llama_cpp"][0].get("isa", "?"),
    )
    if busy:
        a, b = (statistics.median(busy[e]["decode_tps"]) for e in ("edgert", "llama_cpp"))
        row(
            f"decode beside {args.background} busy processes",
            "tok/s",
            a,
            b,
            edgert_threads=f"{busy['edgert']['threads']} (default: the free cores)",
            peer_threads=args.threads,
            edgert_vs_quiet=round(a / ours["decode"], 2),
            peer_vs_quiet=round(b / theirs["decode"], 2),
            runs=busy["edgert"]["decode_tps"],
            peer_runs=busy["llama_cpp"]["decode_tps"],
        )
    row("prefill", "tok/s", ours["prefill"], theirs["prefill"], runs=ours["prefill_runs"])
    wkv = total + kv
    row(
        "load to first token (total)",
        "s",
        ours["first"],
        theirs["first"],
        higher=False,
        prompt_tokens=len(ids),
        what="import of the runtime + model load + first prefill and token",
    )
    row("load: import of the runtime", "s", ours["import"], theirs["import"], higher=False, what="edgert: numpy + TVM")
    row("load: model load", "s", ours["load"], theirs["load"], higher=False, what="open, verify, map weights, KV cache")
    row(
        "load: first prefill and token",
        "s",
        ours["first_prefill"],
        theirs["first_prefill"],
        higher=False,
        prompt_tokens=len(ids),
    )
    row("peak RSS", "MiB", ours["rss"], theirs["rss"], higher=False)
    row(
        "RSS while decoding (total)",
        "MiB",
        ours["rss_decoding"],
        theirs["rss_decoding"],
        higher=False,
        weights_plus_kv_mib=round(wkv / 2**20, 1),
        edgert_over_weights_plus_kv=round(ours["rss_decoding"] * 2**20 / wkv, 2),
    )
    growth, peer_growth = ours["rss_decoding"] - ours["rss_base"], theirs["rss_decoding"] - theirs["rss_base"]
    row(
        "RSS while decoding (growth over the runtime's baseline)",
        "MiB",
        growth,
        peer_growth,
        higher=False,
        edgert_baseline_mib=round(ours["rss_base"], 1),
        peer_baseline_mib=round(theirs["rss_base"], 1),
        edgert_growth_over_weights_plus_kv=round(growth * 2**20 / wkv, 2),
        peer_growth_over_weights_plus_kv=round(peer_growth * 2**20 / wkv, 2),
    )
    row("model size", "MB", size / 1e6, gguf.stat().st_size / 1e6, higher=False, peer_file=gguf.name)
    if compile_s is not None:
        row("compile", "s", compile_s, None, higher=False)
    return rows


def _merge(runs: list[dict]) -> dict:
    decode = [x for r in runs for x in r["decode_tps"]]
    prefill = [x for r in runs for x in r["prefill_tps"]]
    return {
        "decode": statistics.median(decode),
        "prefill": statistics.median(prefill),
        "decode_runs": decode,
        "prefill_runs": prefill,
        "first": statistics.median(r["load_to_first_token_s"] for r in runs),
        "import": statistics.median(r["import_s"] for r in runs),
        "load": statistics.median(r["load_s"] for r in runs),
        "first_prefill": statistics.median(r["first_prefill_s"] for r in runs),
        "rss": max(r["peak_rss_mb"] for r in runs),
        "rss_decoding": max(r["rss_decoding_mb"] for r in runs),
        "rss_base": statistics.median(r["rss_before_load_mb"] for r in runs),
    }


def _worker_main(argv: list[str]) -> int:
    engine, path, ids_file, gen, repeats, threads, context = argv
    ids = json.loads(Path(ids_file).read_text())
    fn = worker_edgert if engine == "edgert" else worker_llama_cpp
    result = fn(path, ids, int(gen), int(repeats), int(threads), int(context))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    if len(sys.argv) > 2 and sys.argv[1] == "roofline":  # roofline ARTIFACT [THREADS [ROUNDS]]
        threads, rounds = [int(x) for x in sys.argv[3:5]] + [os.cpu_count() or 1, 7][len(sys.argv[3:5]) :]
        print(json.dumps(roofline(Path(sys.argv[2]), threads, rounds=rounds), indent=1))
        sys.exit(0)
    print(__doc__)
    sys.exit(2)
