"""Plain graphs: edgert vs onnxruntime (ONNX) and LiteRT (TFLite) on the same file, inputs and threads.

Cases: the all-MiniLM-L6-v2 encoder (exported by tools/export_minilm_onnx.py) at one sequence
length, a transformer-sized feed-forward block as TFLite (written by tools/make_tiny_tflite.py),
silero-vad on one 512-sample chunk, and silero-vad streaming a whole recording with its state
carried. Each engine runs in its own child process (so peak RSS is its own); latency is
the median of ``--repeats`` timed calls after one warm-up.

The zoo (``--zoo``) runs both engines' processes side by side and alternates them: rounds of
``--zoo-block`` calls each (one untimed first, so the other engine's spinning workers have
stopped), the order swapped every round. A change of the machine's mode (on a 2-vCPU guest the
second core comes and goes minute by minute) then lands on both engines, and each model's ratio
is the median of the rounds' paired ratios, with its quartiles.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peers import Row, paired_ratio

NAME = "graph"
HELP = "ONNX graphs (MiniLM encoder, silero-vad) against onnxruntime, a TFLite graph against LiteRT"
ROOT = Path(__file__).resolve().parents[2]
VAD_ONNX = "silero_vad_openvino_16k.onnx"
# Pause before each engine's block in the alternated zoo runs, so that the other engine's workers
# have gone quiet. With 5 ms, edgert's 2-thread block right after onnxruntime's stalled in about
# half the rounds (block medians of 1-4 ms against 0.065; mobilenet, loaded); with 20 or 50 ms in
# none. Both engines get the pause, and an untimed call after it.
SETTLE_S = 0.05


def add_arguments(parser: Any) -> None:
    """This section's options."""
    parser.add_argument("--graph-seq", type=int, default=128, help="MiniLM sequence length (tokens)")
    parser.add_argument("--graph-audio-seconds", type=float, default=30.0, help="length of the streamed VAD recording")
    parser.add_argument("--graph-quant", default="f32", help="edgert --quant for the graphs (f32, f16, q8, q4)")
    parser.add_argument(
        "--zoo",
        type=Path,
        default=None,
        help="a folder written by tools/make_graph_zoo.py: run every model in it at 1 and 2 threads instead",
    )
    parser.add_argument(
        "--zoo-only", action="append", default=None, help="with --zoo: only these entries (NAME[.FORM])"
    )
    parser.add_argument(
        "--zoo-block",
        type=int,
        default=5,
        help="with --zoo: timed calls per engine per round (--repeats rounds, engines alternated)",
    )


def _rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _engine(kind: str, path: str, threads: int) -> Any:
    """A callable feeds -> {name: array} for ``kind`` (edgert artifact or onnxruntime model)."""
    if kind == "edgert":
        # As on a device: the TVM runtime library alone (smaller and faster to load).
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        sys.path.insert(0, str(ROOT))
        import edgert

        return edgert.load(path, threads=threads)
    if kind == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=path, num_threads=threads)
        interp.allocate_tensors()
        ins = {d["name"]: d["index"] for d in interp.get_input_details()}
        outs = {d["name"]: d["index"] for d in interp.get_output_details()}

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for name, value in feeds.items():
                interp.set_tensor(ins[name], value)
            interp.invoke()
            return {name: interp.get_tensor(index) for name, index in outs.items()}

        return run
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds), strict=True))


def _child(kind: str, path: str, threads: int, repeats: int, job: str, data: dict[str, Any], conn: Any) -> None:
    try:
        t = time.perf_counter()
        run = _engine(kind, path, threads)
        load_s = time.perf_counter() - t
        if job == "once":
            run(data)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                out = run(data)
                times.append(time.perf_counter() - t)
        else:  # stream: VAD chunks with state and context carried
            audio = data["audio"]
            times, out = [], {}
            for _ in range(max(1, repeats // 2)):
                state, context, probs = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32), []
                t = time.perf_counter()
                for i in range(0, len(audio) - 511, 512):
                    x = np.concatenate([context, audio[i : i + 512]])[None, :]
                    res = run({"input": x, "state": state})
                    state, context = res["stateN"], x[0, -64:]
                    probs.append(res["output"][0, 0])
                times.append(time.perf_counter() - t)
            out = {"probs": np.array(probs)}
        conn.send({"median_s": float(np.median(times)), "load_s": load_s, "rss_mb": _rss_mb(), "out": out})
    except Exception as exc:  # reported as a row note by the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _answer(conn: Any, proc: Any, kind: str) -> Any:
    """The child's next message; a RuntimeError naming the engine if the child ended without one
    (killed, out of memory, a failed start), instead of waiting on the pipe forever."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"{kind}: the benchmark process ended without an answer (exit code {proc.exitcode})")
    return conn.recv()


def measure(kind: str, path: Path, threads: int, repeats: int, job: str, data: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh child process and return its timings, peak RSS and outputs."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, str(path), threads, repeats, job, data, child))
    proc.start()
    result = _answer(parent, proc, kind)
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{kind}: {result['error']}")
    return result


def _server(kind: str, path: str, threads: int, data: dict[str, Any], conn: Any) -> None:
    """A child that loads one engine and then times blocks of calls on request.

    Requests: an int K (one untimed call, then K timed: their durations in seconds come back) or
    None (the last output and peak RSS come back, and the child ends).
    """
    try:
        t = time.perf_counter()
        run = _engine(kind, path, threads)
        load_s = time.perf_counter() - t
        out = run(data)
        conn.send({"load_s": load_s})
        while (block := conn.recv()) is not None:
            time.sleep(SETTLE_S)
            out = run(data)  # untimed: the other engine's workers stop spinning meanwhile
            times = []
            for _ in range(block):
                t = time.perf_counter()
                out = run(data)
                times.append(time.perf_counter() - t)
            conn.send(times)
        conn.send({"rss_mb": _rss_mb(), "out": out})
    except Exception as exc:  # reported as a row note by the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def measure_paired(
    engines: dict[str, tuple[str, Path]], threads: int, rounds: int, block: int, data: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Two (or more) engines, each in its own child process, alternated in rounds of ``block`` calls.

    ``engines`` maps a key to (kind, path). Round ``r`` runs them in turn, the order reversed on odd
    rounds, so that a slow minute of the machine falls on all of them. Returns per key the
    ``median_s`` of all its timed calls, ``load_s``, ``rss_mb``, ``out`` and ``rounds_s``: the
    median of each round's block (for paired ratios).
    """
    ctx = multiprocessing.get_context("spawn")
    procs, conns = {}, {}
    try:
        for key, (kind, path) in engines.items():
            parent, child = ctx.Pipe(duplex=True)
            procs[key] = ctx.Process(target=_server, args=(kind, str(path), threads, data, child))
            procs[key].start()
            conns[key] = parent
        results: dict[str, dict[str, Any]] = {}
        for key, conn in conns.items():
            first = _answer(conn, procs[key], engines[key][0])
            if "error" in first:
                raise RuntimeError(f"{engines[key][0]}: {first['error']}")
            results[key] = {**first, "times": [], "rounds_s": []}
        order = list(engines)
        for r in range(rounds):
            for key in order if r % 2 == 0 else order[::-1]:
                conns[key].send(block)
                times = _answer(conns[key], procs[key], engines[key][0])
                if isinstance(times, dict):
                    raise RuntimeError(f"{engines[key][0]}: {times['error']}")
                results[key]["times"] += times
                results[key]["rounds_s"].append(float(np.median(times)))
        for key, conn in conns.items():
            conn.send(None)
            last = _answer(conn, procs[key], engines[key][0])
            if "error" in last:
                raise RuntimeError(f"{engines[key][0]}: {last['error']}")
            results[key].update(last, median_s=float(np.median(results[key].pop("times"))))
        return results
    finally:
        for proc in procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


@dataclass
class PairedRow(Row):
    """A latency row whose ratio is the median of paired per-round ratios (``paired``: edgert /
    peer, so the ``ratio`` column, peer / edgert as in every row, is its inverse)."""

    paired: float | None = None
    # Each round's block medians in ms, [edgert, peer]; edgert ran first in the even rounds (JSON
    # only: a bimodal ratio can be split by round and order afterwards).
    rounds: list[list[float]] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """The peer's latency over edgert's, from the paired median (above 1: edgert ahead)."""
        return None if not self.paired else 1.0 / self.paired


def _compile(onnx_path: Path, out: Path, threads: int, quant: str, shapes: dict[str, list[int]]) -> tuple[float, int]:
    sys.path.insert(0, str(ROOT))
    import edgert

    t = time.perf_counter()
    result = edgert.compile(str(onnx_path), output=out, threads=threads, quant=quant, input_shapes=shapes)
    seconds = time.perf_counter() - t
    return seconds, sum(f["size"] for f in result.manifest["files"].values())


def _audio(seconds: float) -> np.ndarray:
    """A real recording when `useful-moonshine-onnx` is installed, else a voiced synthetic signal."""
    try:
        from edgert.paths import package_file

        wav = package_file("moonshine_onnx", "assets", "beckett.wav")
        import wave

        with wave.open(str(wav)) as fh:
            raw = np.frombuffer(fh.readframes(fh.getnframes()), np.int16).astype(np.float32) / 32768
            rate = fh.getframerate()
        if rate == 16000:
            reps = int(np.ceil(seconds * 16000 / len(raw)))
            return np.tile(raw, reps)[: int(seconds * 16000)]
    except Exception:  # no package, or another rate: the synthetic signal serves
        pass
    t = np.arange(int(16000 * seconds)) / 16000
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / 16000) / k for k in range(1, 8))
    gate = (np.sin(2 * np.pi * 0.5 * t) > 0).astype(np.float32)
    return (0.3 * gate * voiced + 0.01 * np.random.default_rng(0).standard_normal(t.shape)).astype(np.float32)


def _rows(
    case: str,
    ours: dict,
    peer: dict,
    compile_s: float,
    size: int,
    agree: float,
    extra: dict,
    peer_name: str = "onnxruntime",
) -> list[Row]:
    note = {"max_abs_diff": f"{agree:.2e}", **extra}
    return [
        Row(NAME, case, "latency", "ms", ours["median_s"] * 1e3, peer["median_s"] * 1e3, peer_name, False, note),
        Row(NAME, case, "peak RSS", "MB", ours["rss_mb"], peer["rss_mb"], peer_name, False),
        Row(NAME, case, "load", "s", ours["load_s"], peer["load_s"], peer_name, False),
        Row(NAME, case, "compile", "s", compile_s, None, "-", False),
        Row(NAME, case, "artifact", "MB", size / 1e6, None, "-", False),
    ]


def _zoo_feeds(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    sys.path.insert(0, str(ROOT / "tools"))
    from make_graph_zoo import sample_inputs

    return sample_inputs({k: (v["shape"], v["dtype"]) for k, v in entry["inputs"].items()}, 7)


def run_zoo(args: Any) -> list[Row]:
    """Every model of a zoo folder (tools/make_graph_zoo.py) at 1 and 2 threads, and the geometric means.

    Both engines run side by side, alternated (`measure_paired`): ``--repeats`` rounds of
    ``--zoo-block`` calls each. A latency row holds each engine's median over all its calls; its
    ratio is the median of the rounds' paired ratios (``paired``, edgert / onnxruntime, with the
    quartiles ``q1``-``q3`` in the note); the geometric-mean rows are those of the paired ratios.
    Outputs are compared with onnxruntime's on the same file: ``max_abs_diff`` and, relative to the
    largest output value, ``rel``. A model edgert refuses or fails on gets a row saying why.
    """
    import json

    index = json.loads((args.zoo / "zoo.json").read_text())
    rounds, block = max(5, args.repeats), max(1, getattr(args, "zoo_block", 5))
    rows: list[Row] = []
    ratios: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgert-peers-zoo-") as tmp:
        for name, entry in index.items():
            if args.zoo_only and name not in args.zoo_only:
                continue
            src = args.zoo / entry["file"]
            feeds = _zoo_feeds(entry)
            art = Path(tmp) / f"{name}.edgert"
            try:
                compile_s, size = _compile(src, art, 2, "f32", {})
            except Exception as exc:  # reported in the table: the zoo is meant to find what fails
                rows.append(Row(NAME, name, "compile", "s", None, None, "-", False, {"error": str(exc)[:120]}))
                continue
            rows.append(Row(NAME, name, "compile", "s", compile_s, None, "-", False, {"MB": f"{size / 1e6:.2f}"}))
            for threads in (1, 2):
                engines = {"edgert": ("edgert", art), "onnxruntime": ("onnxruntime", src)}
                try:
                    res = measure_paired(engines, threads, rounds, block, feeds)
                except RuntimeError as exc:
                    rows.append(
                        Row(NAME, name, f"latency t{threads}", "ms", None, None, "-", False, {"error": str(exc)[:120]})
                    )
                    continue
                ours, peer = res["edgert"], res["onnxruntime"]
                got, want = ours["out"]["output"], peer["out"]["output"]
                diff = float(np.abs(got.astype(np.float64) - want).max())
                rel = diff / max(float(np.abs(want).max()), 1e-30)
                med, q1, q3 = paired_ratio(ours["rounds_s"], peer["rounds_s"])
                # The paired median of the rounds in which edgert ran first, and second: the quiet
                # runs' wide quartiles at two threads (mobilenet.qdq 0.74-1.13) could be the order.
                first = paired_ratio(ours["rounds_s"][::2], peer["rounds_s"][::2])[0]
                second = paired_ratio(ours["rounds_s"][1::2], peer["rounds_s"][1::2])[0]
                note = {
                    "paired": f"{med:.3f}",
                    "q1-q3": f"{q1:.3f}-{q3:.3f}",
                    "first/second": f"{first:.3f}/{second:.3f}",
                    "max_abs_diff": f"{diff:.2e}",
                    "rel": f"{rel:.1e}",
                }
                e_ms, p_ms = ours["median_s"] * 1e3, peer["median_s"] * 1e3
                by_round = [[a * 1e3, b * 1e3] for a, b in zip(ours["rounds_s"], peer["rounds_s"], strict=True)]
                rows.append(
                    PairedRow(
                        NAME, name, f"latency t{threads}", "ms", e_ms, p_ms, "onnxruntime", False, note, med, by_round
                    )
                )
                kind = "int8" if "." in name else "float"
                ratios.setdefault((kind, threads), []).append((e_ms, p_ms, med))
    for (kind, threads), triples in sorted(ratios.items()):
        e = float(np.exp(np.mean(np.log([a for a, _, _ in triples]))))
        p = float(np.exp(np.mean(np.log([b for _, b, _ in triples]))))
        paired = float(np.exp(np.mean(np.log([c for _, _, c in triples]))))
        rows.append(
            PairedRow(
                NAME,
                f"geomean {kind} ({len(triples)})",
                f"latency t{threads}",
                "ms",
                e,
                p,
                "onnxruntime",
                False,
                {"paired": f"{paired:.3f}"},
                paired,
            )
        )
    try:
        load = os.getloadavg()
        rows.append(
            Row(
                NAME,
                "load average",
                "1/5/15 min",
                "-",
                None,
                None,
                "-",
                False,
                {"load": f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"},
            )
        )
    except OSError:
        pass
    return rows


def run(args: Any) -> list[Row]:
    """Compile the graphs, run both engines, return the rows."""
    if getattr(args, "zoo", None) is not None:
        return run_zoo(args)
    sys.path.insert(0, str(ROOT / "tools"))
    from export_minilm_onnx import export, tokenize

    from edgert.paths import package_file

    rows: list[Row] = []
    threads, repeats = args.threads, max(5, args.repeats)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="edgert-peers-graph-") as tmp:
        work = Path(tmp)
        # MiniLM at a fixed sequence length (both engines read the same ONNX file).
        onnx_path = export(work / "minilm.onnx")
        seq = args.graph_seq
        feeds = tokenize(["edgert compiles models ahead of time and runs them on small devices."], length=seq)
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        compile_s, size = _compile(onnx_path, work / "minilm.edgert", threads, args.graph_quant, shapes)
        ours = measure("edgert", work / "minilm.edgert", threads, repeats, "once", feeds)
        peer = measure("onnxruntime", onnx_path, threads, repeats, "once", feeds)
        diff = float(np.abs(ours["out"]["last_hidden_state"] - peer["out"]["last_hidden_state"]).max())
        rows += _rows(f"minilm seq{seq}", ours, peer, compile_s, size, diff, {"threads": threads})

        # A TFLite graph against LiteRT: a transformer-sized feed-forward block (64 tokens,
        # 384 -> 1536 -> 384, ReLU, softmax) written by the project's flatbuffer script.
        from make_tiny_tflite import build as build_tflite

        tfl = work / "ffn.tflite"
        tfl.write_bytes(build_tflite(rows=64, k=384, hidden=1536, n=384))
        compile_s, size = _compile(tfl, work / "ffn.edgert", threads, args.graph_quant, {})
        x = {"x": np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)}
        ours = measure("edgert", work / "ffn.edgert", threads, repeats, "once", x)
        peer = measure("litert", tfl, threads, repeats, "once", x)
        diff = float(np.abs(ours["out"]["probs"] - peer["out"]["probs"]).max())
        rows += _rows("tflite ffn 64x384x1536", ours, peer, compile_s, size, diff, {"threads": threads}, "LiteRT")

        # silero-vad: one chunk, then a whole recording streamed chunk by chunk.
        vad = package_file("silero_vad", "data", VAD_ONNX)
        compile_s, size = _compile(vad, work / "vad.edgert", threads, "f32", {})
        chunk = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32)}
        chunk["input"][0, 64:] = _audio(512 / 16000)[:512]
        ours = measure("edgert", work / "vad.edgert", threads, repeats, "once", chunk)
        peer = measure("onnxruntime", vad, threads, repeats, "once", chunk)
        diff = float(np.abs(ours["out"]["output"] - peer["out"]["output"]).max())
        rows += _rows("silero-vad 512 samples", ours, peer, compile_s, size, diff, {"threads": threads})
        audio = {"audio": _audio(args.graph_audio_seconds)}
        ours = measure("edgert", work / "vad.edgert", threads, repeats, "stream", audio)
        peer = measure("onnxruntime", vad, threads, repeats, "stream", audio)
        diff = float(np.abs(ours["out"]["probs"] - peer["out"]["probs"]).max())
        case = f"silero-vad {args.graph_audio_seconds:g} s streamed"
        rows.append(
            Row(
                NAME,
                case,
                "latency",
                "ms",
                ours["median_s"] * 1e3,
                peer["median_s"] * 1e3,
                "onnxruntime",
                False,
                {"max_abs_diff": f"{diff:.2e}", "chunks": len(ours["out"]["probs"])},
            )
        )
    return rows
