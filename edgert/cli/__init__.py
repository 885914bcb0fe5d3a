"""The `edgert` command: compile, run, chat, inspect, bench, and list targets and models."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from edgert.errors import EdgertError

app = typer.Typer(
    help="Compile sequence models ahead of time with Apache TVM and run them on devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", "-t", help="Worker threads (default: the target's big cores).")
]
ContextOpt = Annotated[
    int | None, typer.Option("--context", help="Context length in tokens (default: the compiled one).")
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", "-d", help="Device URI: local, board://HOST:PORT, ssh://, adb://, rpc://, serial:// (see README)."
    ),
]


def _sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None) -> Any:
    from edgert.runtime.sampling import SamplingParams

    try:
        return SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as exc:
        raise EdgertError(str(exc)) from exc


@app.command()
def compile(
    model: Annotated[str, typer.Argument(help="A model recipe name (see `edgert models`) or a .gguf file.")],
    target: Annotated[str, typer.Option("--target", help="Target device (see `edgert targets`).")] = "host",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Artifact to write (default: NAME.edgert).")
    ] = None,
    weight_dtype: Annotated[str | None, typer.Option("--weight-dtype", help="Weight storage: f16 or f32.")] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="Weights: source (keep the file's Q4_0/Q4_1/Q8_0 blocks; default for GGUF), q4, q8 "
            "(group-wise, 32 per group), f16 or f32 (default for ONNX/TFLite graphs).",
        ),
    ] = None,
    context: ContextOpt = None,
    threads: ThreadsOpt = None,
    as_dir: Annotated[bool, typer.Option("--dir", help="Write the artifact as a folder instead of one file.")] = False,
    input_shape: Annotated[
        list[str] | None, typer.Option("--input-shape", help="Fix a graph input's shape: NAME=1,128 (repeatable).")
    ] = None,
    activations: Annotated[
        str | None,
        typer.Option(
            "--activations",
            help="GGUF models: f32 (default) or int8 (decode activations quantized to int8, integer dot "
            "products with the q4/q8 weights; x86 AVX2, aarch64 dotprod or i8mm).",
        ),
    ] = None,
    audio_ctx: Annotated[
        int | None,
        typer.Option(
            "--audio-ctx",
            help="Whisper models: encoder window in 20 ms positions (default 1500 = 30 s, as trained); "
            "e.g. 300 = 6 s encodes about 7x faster on short clips, accuracy can drop.",
        ),
    ] = None,
    chunk_ms: Annotated[
        float | None,
        typer.Option(
            "--chunk-ms",
            help="Codecs: the streaming chunk compiled with fixed shapes (default 80 ms); chunks of "
            "this length stream fastest, others run through the general entry points.",
        ),
    ] = None,
) -> None:
    """Compile MODEL (a recipe, .gguf, .onnx or .tflite file) for TARGET into an .edgert artifact."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgert.families.compile import compile_model

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("starting", total=None)

        def progress(stage: str, fraction: float | None) -> None:
            bar.update(task, description=stage, total=None if fraction is None else 1.0, completed=fraction or 0)

        shapes = None
        if input_shape:
            from edgert.families.graph.build import parse_input_shapes

            shapes = parse_input_shapes(input_shape)
        result = compile_model(
            model,
            target=target,
            output=output,
            as_dir=as_dir,
            progress=progress,
            weight_dtype=weight_dtype,
            quant=quant,
            context_length=context,
            threads=threads,
            input_shapes=shapes,
            activations=activations,
            audio_ctx=audio_ctx,
            chunk_ms=chunk_ms,
        )
    size = sum(f["size"] for f in result.manifest["files"].values())
    t = result.manifest["target"]
    err.print(
        f"[green]wrote[/] {result.path} ({size / 1e6:.1f} MB) for {t['name']} ({t['arch']}, {t['cpu']}) "
        f"in {sum(result.seconds.values()):.1f} s"
    )


@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The prompt (default: the model's demo prompt).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop when this text appears (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
    device: DeviceOpt = None,
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="Graph artifacts: an .npz of the inputs by name.")
    ] = None,
    outputs: Annotated[
        Path | None, typer.Option("--output", "-o", help="Graph artifacts: the .npz to write the outputs to.")
    ] = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Lossless speculative decoding: self:k=4 (layer-skipping draft; ,skip=3-9 or ,exit=16) "
            "or model:DRAFT.edgert:k=4 (a smaller build drafts).",
        ),
    ] = None,
    exit_policy: Annotated[
        str | None,
        typer.Option(
            "--exit",
            help="Early exit: static:N, confidence[:P], entropy[:H], patience[:K], budget:N; join with + "
            "(confidence:0.9+budget:24).",
        ),
    ] = None,
) -> None:
    """Generate text from a prompt (LLM artifacts), or run a graph artifact on --inputs into -o."""
    from edgert.families.registry import load
    from edgert.runtime import GraphModel

    if inputs is not None or outputs is not None:
        _run_graph(artifact, inputs, outputs, threads)
        return
    sampling = _sampling(temperature, top_k, top_p, repetition_penalty, seed)  # before the slow load
    if speculative and exit_policy:
        raise EdgertError("--speculative and --exit are separate modes; pick one")
    if device is not None and (speculative or exit_policy):
        raise EdgertError("--speculative and --exit run locally only (not over --device yet)")
    if device is not None:
        options = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "sampling": {
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
            },
            "stop": stop or [],
            "raw": raw,
            "threads": threads,
            "context": context,
        }
        _run_on_device(artifact, device, options, as_json)
        return
    model = load(artifact, threads=threads, context_length=context)
    if isinstance(model, GraphModel):
        raise EdgertError(f"{artifact} is a graph: run it with --inputs IN.npz --output OUT.npz")
    text = prompt if prompt is not None else model.artifact.manifest.get("defaults", {}).get("prompt", "Hello!")
    chat = not raw and model.tokenizer.has_chat_template
    pieces, ids = [], []
    runner = _adaptive_runner(model, speculative, exit_policy, threads)
    for tok in runner.generate(text, max_tokens=max_tokens, sampling=sampling, stop=stop or (), chat=chat):
        ids.append(tok.id)
        pieces.append(tok.text)
        if not as_json:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    stats = runner.stats
    if as_json:
        print(json.dumps({"prompt": text, "text": "".join(pieces), "tokens": ids, "stats": stats.to_dict()}))
        return
    print()
    err.print(
        f"[dim]{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_second:.1f} tok/s, "
        f"{stats.generated_tokens} generated at {stats.decode_tokens_per_second:.1f} tok/s "
        f"({model.session.threads} threads, stop: {stats.stop_reason})[/]",
        soft_wrap=True,
    )
    _adaptive_report(stats)


def _adaptive_runner(model: Any, speculative: str | None, exit_policy: str | None, threads: int | None) -> Any:
    """The model itself, or a speculative / early-exit decoder over it (`edgert run --speculative/--exit`)."""
    if speculative:
        from edgert.families.registry import load
        from edgert.runtime.speculative import SpeculativeDecoder, parse_speculative

        drafter, k = parse_speculative(speculative, model, lambda path: load(path, threads=threads))
        return SpeculativeDecoder(model, drafter, k)
    if exit_policy:
        from edgert.runtime.exits import EarlyExitDecoder, parse_exit_policy

        return EarlyExitDecoder(model, parse_exit_policy(exit_policy, model))
    return model


def _adaptive_report(stats: Any) -> None:
    """The speculative or early-exit counts of a run, when it used one."""
    extra = stats.to_dict()
    if "acceptance_rate" in extra:
        err.print(
            f"[dim]speculative: {extra['drafted']} drafted, acceptance {extra['acceptance_rate']:.1%}, "
            f"{extra['tokens_per_round']:.2f} tokens per verify pass[/]"
        )
    if "mean_layers" in extra:
        err.print(f"[dim]early exit: {extra['mean_layers']:.2f} of {extra['num_layers']} layers per token (mean)[/]")


def _run_graph(artifact: Path, inputs: Path | None, outputs: Path | None, threads: int | None) -> None:
    import numpy as np

    from edgert.runtime import GraphModel, open_artifact

    if inputs is None or outputs is None:
        raise EdgertError("a graph artifact runs with --inputs IN.npz and --output OUT.npz")
    art = open_artifact(artifact)
    if art.family != "graph":
        raise EdgertError(f"{artifact} is a '{art.family}' model; --inputs/--output run graph artifacts")
    try:
        with np.load(inputs, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise EdgertError(f"cannot read inputs {inputs}: not an .npz file of arrays ({exc})") from exc
    model = GraphModel(art, threads=threads)
    result = model(feeds)
    if not outputs.absolute().parent.is_dir():
        from edgert.errors import OutputPathError

        raise OutputPathError(f"cannot write {outputs}: the folder {outputs.parent} does not exist")
    with outputs.open("wb") as fh:  # a file object keeps numpy from appending .npz to the name
        np.savez(fh, **result)
    for name, value in result.items():
        err.print(f"{name}: {value.dtype} {list(value.shape)}")
    err.print(f"[green]wrote[/] {outputs}")


@app.command()
def chat(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")],
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 512,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
) -> None:
    """Talk with the model; the conversation's KV cache is kept between turns (/reset, /exit)."""
    from edgert.errors import ContextLengthError
    from edgert.families.registry import load

    sampling = _sampling(temperature, top_k, top_p, repetition_penalty, seed)  # before the slow load
    model = load(artifact, threads=threads, context_length=context)
    session = model.chat(system)
    err.print(f"[dim]{model.artifact.manifest['name']} — /reset starts over, /exit or Ctrl-D quits[/]")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            session = model.chat(system)
            continue
        if not line.strip():
            continue
        try:
            for tok in session.send(line, max_tokens=max_tokens, sampling=sampling):
                sys.stdout.write(tok.text)
                sys.stdout.flush()
        except ContextLengthError as exc:
            err.print(f"[red]{exc}[/] — /reset to start a new conversation")
            continue
        s = model.stats
        print()
        err.print(
            f"[dim]{s.prompt_tokens - s.cached_tokens} new prompt tokens ({s.cached_tokens} cached), "
            f"{s.generated_tokens} generated at {s.decode_tokens_per_second:.1f} tok/s[/]"
        )


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Verify an artifact and show its manifest (target, entry points, KV cache, files)."""
    from edgert.artifact.reader import open_artifact

    art = open_artifact(artifact, check_host=False, trust_stamp=False)  # always hash every member here
    m = art.manifest
    if as_json:
        print(json.dumps(m, indent=2))
        return
    t, kv, model = m["target"], m.get("kv_cache"), m.get("model", {})
    out.print(
        f"[bold]{m['name']}[/] ({m['family']}), format version {m['format_version']}, "
        f"{m['created_by']}, TVM {m['tvm_version']}"
    )
    out.print(f"target    {t['name']}: {t['arch']} {t['triple']} cpu={t['cpu']} flags={','.join(t['cpu_flags'])}")
    if m["family"] == "codec":  # no KV cache: the streaming facts instead
        out.print(f"codec     {json.dumps(m['codec'])}", soft_wrap=True, highlight=False)
    elif kv is None:
        _inspect_graph(art)
        return
    else:
        out.print(
            f"model     {model.get('num_layers')} layers, d={model.get('hidden_size')}, "
            f"{model.get('num_heads')} heads / {model.get('num_kv_heads')} KV heads, vocab {model.get('vocab_size')}"
        )
        out.print(
            f"kv cache  {kv['kind']}, context {kv['context_length']}, page {kv['page_size']}, "
            f"prefill chunk {kv['prefill_chunk_size']}"
        )
    out.print(
        f"weights   {m['weights']['dtype']}, layout {m['weights']['layout']}, {len(m['weights']['order'])} tensors"
    )
    table = Table("entry point", "inputs", "outputs")
    for name, ep in m["entry_points"].items():
        table.add_row(name, json.dumps(ep["inputs"]), json.dumps(ep["outputs"]))
    out.print(table)
    files = Table("member", "bytes", "sha256")
    for name, f in m["files"].items():
        files.add_row(name, f"{f['size']:,}", f["sha256"][:16] + "…")
    out.print(files)
    out.print("[green]all members match their sha256[/]")


def _inspect_graph(art: Any) -> None:
    m = art.manifest
    w = m["weights"]
    src = m["source"]
    out.print(f"source    {src['file']} ({src['format']}), weights {w['quant']}, {len(w['order'])} tensors")
    table = Table("entry point", "inputs", "outputs")
    for name, ep in m["entry_points"].items():
        fmt = ", ".join  # one "name dtype[shape]" per tensor
        table.add_row(
            name,
            fmt(f"{i['name']} {i['dtype']}{i['shape']}" for i in ep["inputs"]),
            fmt(f"{o['name']} {o['dtype']}{o['shape']}" for o in ep["outputs"]),
        )
    out.print(table)
    files = Table("member", "bytes", "sha256")
    for name, f in m["files"].items():
        files.add_row(name, f"{f['size']:,}", f["sha256"][:16] + "…")
    out.print(files)
    out.print("[green]all members match their sha256[/]")


@app.command()
def targets() -> None:
    """List the target devices edgert compiles for."""
    from edgert.targets import list_targets

    table = Table(Column("target", no_wrap=True), "arch", "cpu", "features", "threads", "link", "description")
    for t in list_targets():
        table.add_row(t.name, t.arch, t.cpu, " ".join(t.features), str(t.default_threads()), t.link, t.description)
    out.print(table)


@app.command()
def models() -> None:
    """List the model recipes and whether their weights are installed."""
    from edgert.recipes import list_recipes

    table = Table("model", "family", "source", "installed", "description")
    for r in list_recipes():
        try:
            r.source_path()
            installed = "yes"
        except EdgertError:
            installed = f"no: {r.source.get('install', '')}"
        table.add_row(r.name, r.family, r.source.get("file", ""), installed, r.description)
    out.print(table)


@app.command()
def bench(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")],
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prefill length.")] = 128,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Decode steps per run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Runs; medians are reported.")] = 5,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure load time, prefill and decode tokens/s (medians) and peak memory."""
    from edgert.profile import bench_generator

    result = bench_generator(artifact, prompt_tokens, gen_tokens, repeats, threads)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("metric", "value")
    for key in (
        "target",
        "threads",
        "load_seconds",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
        "peak_rss_mb",
    ):
        table.add_row(key, str(result[key]))
    out.print(table)


# -- devices: deploy, run --device, profile, the emulated board --------------------------------------


def _upload(dev: Any, artifact: Path) -> dict[str, Any]:
    """Deploy ``artifact`` to ``dev`` with a progress bar of bytes sent."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err
    ) as bar:
        task = bar.add_task(f"deploy {artifact.name}", total=artifact.stat().st_size)
        return dev.deploy(artifact, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _ensure_deployed(dev: Any, artifact: Path) -> None:
    """Deploy ``artifact`` unless the device holds the same bytes under its name already."""
    if not dev.holds(artifact):
        _upload(dev, artifact)


def _run_on_device(artifact: Path, uri: str, options: dict[str, Any], as_json: bool) -> None:
    from edgert.deploy import parse_device

    with parse_device(uri) as dev:
        _ensure_deployed(dev, artifact)
        result = dev.run(artifact.name, **options)
        result["device"] = {"uri": uri, "name": dev.name, "link": dev.link}
    result.pop("ok", None)
    if as_json:
        print(json.dumps(result))
        return
    print(result["text"])
    st = result["stats"]
    err.print(
        f"[dim]{st['prompt_tokens']} prompt tokens at {st['prefill_tokens_per_second']:.1f} tok/s, "
        f"{st['generated_tokens']} generated at {st['decode_tokens_per_second']:.1f} tok/s "
        f"({result['threads']} threads on {result['device']['name']} via {dev.link}, stop: {st['stop_reason']})[/]",
        soft_wrap=True,
        highlight=False,
    )


@app.command()
def deploy(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact (one file).")],
    device: Annotated[str, typer.Option("--device", "-d", help="Device URI (see `edgert run --help`).")],
) -> None:
    """Upload ARTIFACT to a device: verified by sha256 there, renamed over the old copy only when whole."""
    from edgert.deploy import parse_device

    with parse_device(device) as dev:
        reply = _upload(dev, artifact)
        name = dev.name  # asked before the link closes
    err.print(
        f"[green]deployed[/] {artifact.name} to {escape(name)} ({device}): {reply['size'] / 1e6:.1f} MB, "
        f"sha256 {reply['sha256'][:16]}… verified",
        highlight=False,
    )


@app.command()
def profile(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")],
    device: Annotated[str, typer.Option("--device", "-d", help="Device URI (see `edgert run --help`).")] = "local",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt (default: the model's).")] = None,
    runs: Annotated[int, typer.Option("--runs", "-r", help="Prefill + decode runs.")] = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Decode steps per run.")] = 32,
    report: Annotated[Path, typer.Option("--report", help="HTML report to write (.json and .csv beside it).")] = Path(
        "profile.html"
    ),
    threads: ThreadsOpt = None,
) -> None:
    """Measure on the device: load, prefill, per-token decode p50/p90/p99, per-operator time, peak memory."""
    from edgert.deploy.profiling import profile_on_device

    options = {"prompt": prompt, "runs": runs, "max_tokens": max_tokens, "threads": threads}
    paths = profile_on_device(artifact, device, report, **options)
    result = json.loads(paths["json"].read_text())
    d, pre = result["decode_ms"], result["prefill_ms"]
    err.print(
        f"{escape(result['title'])}: load {result['load_seconds']:.2f} s, prefill p50 {pre['p50']:.1f} ms, "
        f"decode p50/p90/p99 {d['p50']:.2f}/{d['p90']:.2f}/{d['p99']:.2f} ms per token, "
        f"peak {result['peak_rss_mb']:.0f} MB",
        highlight=False,
        soft_wrap=True,
    )
    err.print(f"[green]wrote[/] {paths['html']}, {paths['json'].name}, {paths['csv'].name}", highlight=False)


board_app = typer.Typer(help="The emulated arm64 board (qemu-aarch64-static + a cached Debian rootfs).")
app.add_typer(board_app, name="board")


@board_app.command("start")
def board_start(
    target: Annotated[str, typer.Option("--target", help="Board to emulate (an aarch64 target).")] = "rpi5",
    port: Annotated[int, typer.Option("--port", help="Agent's TCP port on 127.0.0.1 (0: any free one).")] = 0,
) -> None:
    """Build (first time, cached) and start the emulated board; print its device URIs."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgert.deploy import board

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("emulated board", total=None)

        def progress(stage: str, fraction: float | None) -> None:
            bar.update(task, description=stage, total=None if fraction is None else 1.0, completed=fraction or 0)

        state = board.start(target, port, progress=progress)
    err.print(f"[green]running[/] {escape(state['name'])}, pid {state['pid']}", highlight=False)
    for uri in state["uris"].values():
        print(uri)


@board_app.command("status")
def board_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Say whether the emulated board runs, and how to reach it."""
    from edgert.deploy import board

    state = board.status()
    if as_json:
        print(json.dumps(state))
        return
    if state is None:
        print("no emulated board is running")
        raise typer.Exit(1)
    print(f"running: {state['name']}, pid {state['pid']}, up {time.time() - state['started']:.0f} s")
    for uri in state["uris"].values():
        print(uri)


@board_app.command("stop")
def board_stop() -> None:
    """Stop the emulated board."""
    from edgert.deploy import board

    print("stopped" if board.stop() else "no emulated board was running")


@app.command()
def transcribe(
    artifact: Annotated[Path, typer.Argument(help="A compiled Whisper .edgert artifact.")],
    audio: Annotated[Path, typer.Argument(help="A WAV file (any rate; mixed down to mono, resampled to 16 kHz).")],
    beam: Annotated[
        int | None, typer.Option("--beam", "-b", help="Beam size (1: greedy; default: the model's, 5).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (segments, text, stats).")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Feed the file in chunks through VAD, printing partial and final text.")
    ] = False,
    realtime: Annotated[
        bool, typer.Option("--realtime/--fast", help="With --stream: at the audio's own pace, or as fast as possible.")
    ] = False,
    chunk: Annotated[float, typer.Option("--chunk", help="With --stream: seconds of audio per chunk.")] = 1.0,
    vad: Annotated[
        Path | None,
        typer.Option("--vad", help="With --stream: a compiled silero-vad artifact (default: compiled once, cached)."),
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Greedy decoding drafted by the decoder's own layers: self:k=4, self:k=4,skip=2 or self:k=3,exit=2.",
        ),
    ] = None,
    exit_policy: Annotated[
        str | None,
        typer.Option("--exit", help="Early exit in the decoder's greedy steps: confidence:0.9, entropy:0.5, static:3."),
    ] = None,
) -> None:
    """Transcribe speech in AUDIO with a Whisper artifact, printing timestamped segments."""
    from edgert.families.whisper.transcriber import Transcriber, TranscriptionStats
    from edgert.runtime.audio import read_wav

    if device is not None:
        if speculative or exit_policy:
            raise EdgertError("--speculative and --exit run on this machine only; drop --device to use them")
        _transcribe_on_device(artifact, audio, device, beam, stream, as_json, threads)
        return
    beam_size = beam
    audio_read = read_wav(audio)  # Whisper hears 16 kHz; bad audio fails here, before the model loads
    transcriber = Transcriber(artifact, threads=threads, speculative=speculative, exit=exit_policy)
    if beam_size is None:
        beam_size = (
            1
            if speculative or exit_policy
            else int(transcriber.artifact.manifest.get("defaults", {}).get("beam_size", 1))
        )
    loaded = transcriber.load_audio(audio_read)
    if loaded.resampled:
        err.print(f"[dim]resampled {loaded.source_rate} Hz -> {loaded.sample_rate} Hz with soxr[/]")
    if loaded.source_channels > 1:
        err.print(f"[dim]mixed {loaded.source_channels} channels down to mono[/]")
    if stream:
        _transcribe_stream(transcriber, loaded.samples, vad, chunk, realtime, as_json)
        return
    stats = TranscriptionStats()
    segments = []
    for seg in transcriber.segments(loaded, beam_size=beam_size, stats=stats):
        segments.append(seg)
        if not as_json:
            print(f"[{seg.start:7.2f} -> {seg.end:7.2f}] {seg.text.strip()}", flush=True)
    text = "".join(s.text for s in segments).strip()
    if as_json:
        print(
            json.dumps(
                {
                    "text": text,
                    "segments": [s.to_dict() for s in segments],
                    "beam_size": beam_size,
                    "resampled_from": loaded.source_rate if loaded.resampled else None,
                    "stats": stats.to_dict(),
                    **({"speculative": transcriber.speculative.stats.to_dict()} if transcriber.speculative else {}),
                    **({"early_exit": transcriber.early_exit.stats()} if transcriber.early_exit else {}),
                }
            )
        )
        return
    if transcriber.speculative is not None:
        s = transcriber.speculative.stats
        err.print(
            f"[dim]speculative: {s.accepted}/{s.drafted} drafts accepted "
            f"({s.acceptance_rate:.2f}), {s.rounds} rounds[/]"
        )
    if transcriber.early_exit is not None:
        e = transcriber.early_exit
        err.print(
            f"[dim]early exit {e.policy.name}: {e.mean_layers:.2f} of {e.layers.num_layers} decoder layers per token[/]"
        )
    err.print(
        f"[dim]{stats.audio_seconds:.1f} s of audio in {stats.total_seconds:.2f} s "
        f"(real-time factor {stats.real_time_factor:.3f}; encoder {stats.encode_seconds:.2f} s, "
        f"decoder {stats.decode_seconds:.2f} s, beam {beam_size}, {transcriber.model.session.threads} threads)[/]",
        soft_wrap=True,
    )


def _silero_vad_artifact(vad: Path | None) -> Path:
    """The given VAD artifact, or silero-vad (from the `silero-vad` package) compiled once into the cache."""
    if vad is not None:
        return vad
    import importlib.util

    from edgert.families.compile import compile_model
    from edgert.paths import cache_dir

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise EdgertError("--stream needs silero-vad: pip install --no-deps silero-vad, or pass --vad ARTIFACT")
    onnx = Path(spec.origin).parent / "data" / "silero_vad_openvino_16k.onnx"
    out = cache_dir() / "vad" / "silero_vad_openvino_16k.edgert"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        err.print("[dim]compiling silero-vad for this host (once) ...[/]")
        compile_model(str(onnx), target="host", output=out)
    return out


def _transcribe_stream(
    transcriber: Any, samples: Any, vad: Path | None, chunk: float, realtime: bool, as_json: bool
) -> None:
    from edgert.families.registry import load
    from edgert.families.whisper.streaming import StreamingTranscriber, stream_file
    from edgert.runtime.vad import VoiceActivity

    streamer = StreamingTranscriber(transcriber, VoiceActivity(load(_silero_vad_artifact(vad))))
    finals = []
    for event in stream_file(streamer, samples, chunk, realtime):
        if as_json:
            print(json.dumps(event.to_dict()), flush=True)
        elif event.kind == "final":
            finals.append(event)
            print(f"[{event.start:7.2f} -> {event.end:7.2f}] {event.text}  (latency {event.latency:.2f} s)", flush=True)
        elif event.kind == "commit":
            err.print(f"[green]+ {escape(event.text.strip())}[/]", highlight=False)
        else:
            err.print(f"[dim]~ {escape(event.text.strip())}[/]", highlight=False)
    s = streamer.stats
    if as_json:
        print(json.dumps({"kind": "stats", **s.to_dict()}))
        return
    med = sorted(s.latencies)[len(s.latencies) // 2] if s.latencies else 0.0
    err.print(
        f"[dim]{len(finals)} utterances, {s.audio_seconds:.1f} s of audio, real-time factor {s.real_time_factor:.3f}, "
        f"latency end of speech -> final text median {med:.2f} s, max {max(s.latencies, default=0.0):.2f} s, "
        f"{s.decodes} decodes ({s.reused_finals} finals without one) "
        f"({'real-time pace' if realtime else 'as fast as possible'}, {chunk:g} s chunks)[/]",
        soft_wrap=True,
    )


codec_app = typer.Typer(help="Neural audio codecs: encode speech to codes and back, streaming.", no_args_is_help=True)
app.add_typer(codec_app, name="codec")
BandwidthOpt = Annotated[
    float | None, typer.Option("--bandwidth", "-b", help="Bitrate in kbit/s (default: all codebooks).")
]


def _load_audio(path: Path, codec: Any) -> Any:
    from edgert.runtime.audio import load_wav, resample

    audio, rate = load_wav(path)
    if rate != codec.sample_rate:
        err.print(f"[dim]resampling {path} from {rate} Hz to {codec.sample_rate} Hz (libsoxr)[/]", highlight=False)
        audio = resample(audio, rate, codec.sample_rate)
    return audio


def _codec_report(codec: Any, stream: Any, books: int, samples: int, streamed: bool, what: str) -> None:
    st = stream.stats
    latency = codec.algorithmic_latency(streamed)
    err.print(
        f"[dim]{what}: {samples / codec.sample_rate:.2f} s of audio, {books} codebooks = "
        f"{codec.bandwidth_kbps(books):g} kbit/s at {codec.frame_rate:g} frames/s; real-time factor "
        f"{st.real_time_factor:.4f} ({st.calls} calls, {codec.session.threads} threads); algorithmic latency "
        f"{latency} samples ({1000 * latency / codec.sample_rate:.1f} ms)[/]",
        highlight=False,
        soft_wrap=True,
    )


@codec_app.command("encode")
def codec_encode(
    artifact: Annotated[Path, typer.Argument(help="A compiled codec artifact.")],
    audio: Annotated[Path, typer.Argument(help="A WAV file (resampled to the codec's rate if needed).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Codes file to write.")],
    bandwidth: BandwidthOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Encode AUDIO into a codes file."""
    from edgert.families.codec.stream import CodesFile, load_codec

    codec = load_codec(artifact, threads)
    books = codec.codebooks_for(bandwidth)
    signal = _load_audio(audio, codec)
    enc = codec.encoder(books)
    enc.chunk_min = 0
    codes = enc.push(signal, final=True)
    CodesFile(
        codec.name, codec.codec_id, codec.sample_rate, codec.hop_length, codec.codebook_size, codes, len(signal)
    ).save(output)
    _codec_report(codec, enc, books, len(signal), False, "encoded")
    err.print(f"[green]wrote[/] {output} ({len(codes)} frames x {books} codebooks)", highlight=False)


@codec_app.command("decode")
def codec_decode(
    artifact: Annotated[Path, typer.Argument(help="A compiled codec artifact.")],
    codes: Annotated[Path, typer.Argument(help="A codes file written by `edgert codec encode`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="WAV file to write.")],
    threads: ThreadsOpt = None,
) -> None:
    """Decode a codes file into a WAV file."""
    from edgert.families.codec.stream import CodesFile, load_codec
    from edgert.runtime.audio import write_wav

    data = CodesFile.load(codes)
    codec = load_codec(artifact, threads)
    codec.check_codes(data, codes)
    dec = codec.decoder()
    signal = dec.push(data.codes, final=True)[: data.num_samples]
    write_wav(output, signal, codec.sample_rate)
    _codec_report(codec, dec, data.codes.shape[1], len(signal), False, "decoded")
    err.print(f"[green]wrote[/] {output}", highlight=False)


@codec_app.command("roundtrip")
def codec_roundtrip(
    artifact: Annotated[Path, typer.Argument(help="A compiled codec artifact.")],
    audio: Annotated[Path, typer.Argument(help="A WAV file (resampled to the codec's rate if needed).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="WAV file to write.")],
    stream: Annotated[
        bool, typer.Option("--stream", help="Encode and decode in chunks, as a live link would.")
    ] = False,
    chunk_ms: Annotated[float, typer.Option("--chunk-ms", help="Chunk length when streaming.")] = 80.0,
    bandwidth: BandwidthOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Encode and decode AUDIO (whole, or streamed in chunks); print bitrate, quality and speed."""
    import numpy as np

    from edgert.families.codec.stream import load_codec
    from edgert.runtime.audio import write_wav

    if device is not None:
        _codec_roundtrip_on_device(artifact, audio, output, device, stream, chunk_ms, bandwidth, threads)
        return
    codec = load_codec(artifact, threads)
    books = codec.codebooks_for(bandwidth)
    signal = _load_audio(audio, codec)
    enc, dec = codec.encoder(books), codec.decoder()
    if stream:
        step = max(1, int(chunk_ms * codec.sample_rate / 1000))
        pieces = []
        for start in range(0, len(signal), step):
            last = start + step >= len(signal)
            pieces.append(dec.push(enc.push(signal[start : start + step], final=last), final=last))
        pieces.append(dec.flush())
        result = np.concatenate(pieces)
    else:
        enc.chunk_min = 0
        result = dec.push(enc.push(signal, final=True), final=True)
    result = result[: len(signal)]
    write_wav(output, result, codec.sample_rate)
    _codec_report(codec, enc, books, len(signal), stream, "encode")
    _codec_report(codec, dec, books, len(signal), stream, "decode")
    err.print(f"[green]wrote[/] {output}: {_against_input(result, signal, codec.sample_rate)}", highlight=False)


# -- speech and codecs on a device (--device) --------------------------------------------------------


def _transcribe_on_device(
    artifact: Path, audio: Path, uri: str, beam: int | None, stream: bool, as_json: bool, threads: int | None
) -> None:
    """`edgert transcribe --device`: the host reads and resamples the audio, the device does the rest."""
    from edgert.deploy import parse_device
    from edgert.runtime.audio import read_wav

    if stream:
        raise EdgertError("--stream runs on this machine only; drop --device, or transcribe the whole file on it")
    loaded = read_wav(audio, 16000)
    if loaded.resampled:
        err.print(f"[dim]resampled {loaded.source_rate} Hz -> {loaded.sample_rate} Hz with soxr[/]")
    options = {k: v for k, v in {"beam_size": beam, "threads": threads}.items() if v is not None}
    with parse_device(uri) as dev:
        _ensure_deployed(dev, artifact)
        result = dev.transcribe(artifact.name, loaded.samples, loaded.sample_rate, **options)
        result["device"] = {"uri": uri, "name": dev.name, "link": dev.link}
    result.pop("ok", None)
    result.pop("id", None)
    if as_json:
        print(json.dumps(result))
        return
    for seg in result["segments"]:
        print(f"[{seg['start']:7.2f} -> {seg['end']:7.2f}] {seg['text'].strip()}", flush=True)
    st = result["stats"]
    err.print(
        f"[dim]{st['audio_seconds']:.1f} s of audio in {st['total_seconds']:.2f} s on {result['device']['name']} "
        f"via {dev.link} (real-time factor {st['real_time_factor']:.3f}; encoder {st['encode_seconds']:.2f} s, "
        f"decoder {st['decode_seconds']:.2f} s, beam {result['beam_size']}, {result['threads']} threads)[/]",
        soft_wrap=True,
        highlight=False,
    )


def _codec_roundtrip_on_device(
    artifact: Path,
    audio: Path,
    output: Path,
    uri: str,
    stream: bool,
    chunk_ms: float,
    bandwidth: float | None,
    threads: int | None,
) -> None:
    """`edgert codec roundtrip --device`: the host reads the audio, the device encodes and decodes it."""
    from edgert.artifact.reader import open_artifact
    from edgert.deploy import parse_device
    from edgert.runtime.audio import load_wav, resample, write_wav

    rate = int(open_artifact(artifact, check_host=False).manifest["codec"]["sample_rate"])
    signal, source_rate = load_wav(audio)
    if source_rate != rate:
        err.print(f"[dim]resampling {audio} from {source_rate} Hz to {rate} Hz (libsoxr)[/]", highlight=False)
        signal = resample(signal, source_rate, rate)
    options = {"stream": stream, "chunk_ms": chunk_ms, "bandwidth": bandwidth, "threads": threads}
    with parse_device(uri) as dev:
        _ensure_deployed(dev, artifact)
        facts, codes, result = dev.codec_roundtrip(artifact.name, signal, **options)
        name = dev.name
    write_wav(output, result, rate)
    for what in ("encode", "decode"):
        st = facts[what]
        err.print(
            f"[dim]{what} on {escape(name)} via {dev.link}: {len(signal) / rate:.2f} s of audio, "
            f"{facts['codebooks']} codebooks = {facts['bandwidth_kbps']:g} kbit/s; real-time factor "
            f"{st['real_time_factor']:.4f} ({st['calls']} calls, {facts['threads']} threads); algorithmic latency "
            f"{facts['algorithmic_latency']} samples ({1000 * facts['algorithmic_latency'] / rate:.1f} ms)[/]",
            highlight=False,
            soft_wrap=True,
        )
    err.print(f"[green]wrote[/] {output}: {len(codes)} frames, {_against_input(result, signal, rate)}", highlight=False)


def _against_input(result: Any, signal: Any, rate: int) -> str:
    """SI-SNR and mel distance of a round trip against its input, after the codec's delay (up to 20 ms)."""
    from edgert.profile.audio_quality import delay_of, mel_distance, si_snr

    lag = delay_of(result, signal, rate // 50)
    out, ref = result[lag:], signal[: len(signal) - lag]
    return (
        f"SI-SNR {si_snr(out, ref):.2f} dB, mel distance {mel_distance(out, ref, rate):.3f} against the input "
        f"(output {lag} samples behind it)"
    )


def main() -> None:
    """Entry point: run the CLI, printing edgert's errors as one line without a traceback."""
    try:
        app(standalone_mode=False)
    except (EdgertError, ValueError) as exc:  # ValueError: bad values the runtime rejects (empty prompt, ...)
        # The message is text, not markup (paths may hold brackets), and stays on one line when piped.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # Usage errors: recent typer (0.29 here) raises its own copy of click's exceptions (click may not
        # be installed at all); older typer raises click's.
        usage: tuple[type, ...] = (getattr(typer, "TyperException", ()),)
        leave: tuple[type, ...] = (typer.Exit,)
        abort: tuple[type, ...] = (typer.Abort,)
        try:
            import click
        except ImportError:
            pass
        else:
            usage, leave, abort = (*usage, click.ClickException), (*leave, click.exceptions.Exit), (*abort, click.Abort)
        if isinstance(exc, usage) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, leave):
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
