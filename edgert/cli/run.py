"""`edgert run` and `edgert chat`: generate from a prompt (locally, or on a device), run a graph on
.npz inputs, talk with a model keeping its KV cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgert.cli.common import (
    AllowUnsignedOpt,
    ArtifactArg,
    ContextOpt,
    DeviceKindOpt,
    DeviceOpt,
    ThreadsOpt,
    err,
    sampling,
    upload,
)
from edgert.errors import EdgertError

KVBudgetOpt = Annotated[
    int | None,
    typer.Option(
        "--kv-budget",
        help="Keep at most N tokens of KV, evicting the least-attended entries (TOVA) instead of stopping "
        "at the context; needs an artifact compiled with --evictable-kv.",
    ),
]


def run(
    artifact: ArtifactArg,
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
    device_kind: DeviceKindOpt = None,
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
            help="Lossless speculative decoding: lookup[:k=15,ngram=1] (copies what followed the longest earlier "
            "match in the context; each pass verifies only the drafts expected to pay), recycle[:k=15,tree=1] (lookup, "
            "else the model's own earlier top choices, verified as a token tree; tree=0: a chain), "
            "self:k=4 (layer-skipping draft; ,skip=3-9 or ,exit=16) or model:DRAFT.edgert:k=4 "
            "(a smaller build drafts). Off by default.",
        ),
    ] = None,
    exit_policy: Annotated[
        str | None,
        typer.Option(
            "--exit",
            help="Early exit: static:N, confidence[:P], entropy[:H], patience[:K], state[:P] (the calibrated "
            "state probe), budget:N; join with + (confidence:0.9+budget:24). A name alone takes the calibrated "
            "point, stored only where it is faster than the full model.",
        ),
    ] = None,
    kv_budget: KVBudgetOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Generate text from a prompt (LLM artifacts), or run a graph artifact on --inputs into -o."""
    from edgert.families.registry import load
    from edgert.runtime.graph_io import GraphInterface
    from edgert.runtime.speculative import adaptive_decoder

    if inputs is not None or outputs is not None:
        _run_graph(artifact, inputs, outputs, threads, device_kind)
        return
    params = sampling(temperature, top_k, top_p, repetition_penalty, seed)  # before the slow load
    if threads is not None and device is None:
        from edgert.runtime.session import check_threads

        check_threads(threads)
    if speculative and exit_policy:
        raise EdgertError("--speculative and --exit are separate modes; pick one")
    if device is not None and (speculative or exit_policy):
        raise EdgertError("--speculative and --exit run locally only (not over --device yet)")
    if kv_budget is not None:
        if device is not None or speculative or exit_policy:
            raise EdgertError("--kv-budget runs locally, without --speculative or --exit")
        _run_budgeted(artifact, kv_budget, threads, prompt, raw, max_tokens, params, stop or [], as_json)
        return
    if device is not None:
        _run_on_device(
            artifact,
            device,
            as_json,
            prompt=prompt,
            max_tokens=max_tokens,
            sampling={
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
            },
            stop=stop or [],
            raw=raw,
            threads=threads,
            context=context,
        )
        return
    model = load(artifact, threads=threads, context_length=context, device_kind=device_kind)
    if isinstance(model, GraphInterface):
        raise EdgertError(f"{artifact} is a graph: run it with --inputs IN.npz --output OUT.npz")
    text = prompt if prompt is not None else model.artifact.manifest.get("defaults", {}).get("prompt", "Hello!")
    chat = not raw and model.tokenizer.has_chat_template
    pieces, ids = [], []
    runner = adaptive_decoder(model, speculative, exit_policy, lambda path: load(path, threads=threads))
    for tok in runner.generate(text, max_tokens=max_tokens, sampling=params, stop=stop or (), chat=chat):
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
        f"({_where(model.session)}, stop: {stats.stop_reason})[/]",
        soft_wrap=True,
    )
    _adaptive_report(stats)
    note = getattr(getattr(runner, "drafter", None), "note", "")
    if note:
        err.print(f"[dim]{note}[/]")


def _run_budgeted(
    artifact: Path,
    kv_budget: int,
    threads: int | None,
    prompt: str | None,
    raw: bool,
    max_tokens: int,
    params: Any,
    stop: list[str],
    as_json: bool,
) -> None:
    """`run --kv-budget`: one generation through the serving engine, which evicts (TOVA)."""
    from edgert.serve.local import BudgetedModel

    model = BudgetedModel(artifact, kv_budget, threads)
    try:
        manifest = model.engine.artifact.manifest
        text = prompt if prompt is not None else manifest.get("defaults", {}).get("prompt", "Hello!")
        ids = model.encode(text, chat=not raw and model.engine.tokenizer.has_chat_template)
        pieces = []
        for piece in model.stream(ids, max_tokens, params, stop):
            pieces.append(piece)
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        stats = model.stats
        if as_json:
            out = {"prompt": text, "text": "".join(pieces), "stats": stats.to_dict()}
            print(json.dumps({**out, "evicted_tokens": model.evicted_tokens}))
            return
        print()
        err.print(
            f"[dim]{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated at "
            f"{stats.decode_tokens_per_second:.1f} tok/s; {model.evicted_tokens} KV entries evicted "
            f"(budget {kv_budget}; stop: {stats.stop_reason})[/]",
            soft_wrap=True,
        )
    finally:
        model.close()


def _where(session: Any) -> str:
    """Where the kernels ran, for the run's summary line."""
    if getattr(session, "on_gpu", False):
        from edgert.runtime import opencl

        name = opencl.find_device()
        note = "; PoCL emulates OpenCL on the CPU: its speed says nothing about a GPU's" if "PoCL" in name else ""
        return f"OpenCL: {name}; host code on {session.threads} threads{note}"
    return f"{session.threads} threads"


def _adaptive_report(stats: Any) -> None:
    """The speculative or early-exit counts of a run, when it used one."""
    extra = stats.to_dict()
    if "acceptance_rate" in extra:
        err.print(
            f"[dim]speculative: {extra['drafted']} drafted, acceptance {extra['acceptance_rate']:.1%}, "
            f"{extra['tokens_per_round']:.2f} tokens per verify pass, {extra['plain_steps']} plain steps[/]"
        )
    if "mean_layers" in extra:
        err.print(f"[dim]early exit: {extra['mean_layers']:.2f} of {extra['num_layers']} layers per token (mean)[/]")


def _run_graph(
    artifact: Path, inputs: Path | None, outputs: Path | None, threads: int | None, device_kind: str | None = None
) -> None:
    from edgert.runtime.graph import run_npz

    if inputs is None or outputs is None:
        raise EdgertError("a graph artifact runs with --inputs IN.npz and --output OUT.npz")
    result = run_npz(artifact, inputs, outputs, threads, device_kind=device_kind)
    for name, value in result.items():
        err.print(f"{name}: {value.dtype} {list(value.shape)}")
    err.print(f"[green]wrote[/] {outputs}")


def _run_on_device(artifact: Path, uri: str, as_json: bool, **options: Any) -> None:
    from edgert.deploy import remote

    result = remote.run(artifact, uri, deploy=upload, **options)
    if as_json:
        print(json.dumps(result))
        return
    print(result["text"])
    st = result["stats"]
    err.print(
        f"[dim]{st['prompt_tokens']} prompt tokens at {st['prefill_tokens_per_second']:.1f} tok/s, "
        f"{st['generated_tokens']} generated at {st['decode_tokens_per_second']:.1f} tok/s "
        f"({result['threads']} threads on {result['device']['name']} via {result['device']['link']}, "
        f"stop: {st['stop_reason']})[/]",
        soft_wrap=True,
        highlight=False,
    )


def chat(
    artifact: ArtifactArg,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 512,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
    free_window: Annotated[
        bool,
        typer.Option(
            "--free-window-kv",
            help="Gemma 3: keep only the window of the sliding-window layers' KV (less memory in long "
            "chats; prompt tokens past the first window run one at a time).",
        ),
    ] = False,
    kv_budget: KVBudgetOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Talk with the model; the conversation's KV cache is kept between turns (/reset, /exit)."""
    from edgert.errors import ContextLengthError
    from edgert.families.registry import load

    params = sampling(temperature, top_k, top_p, repetition_penalty, seed)  # before the slow load
    if threads is not None:
        from edgert.runtime.session import check_threads

        check_threads(threads)
    if kv_budget is not None:
        _chat_budgeted(artifact, kv_budget, threads, system, max_tokens, params)
        return
    model = load(artifact, threads=threads, context_length=context)
    if free_window:
        if not hasattr(model, "use_free_window"):
            raise typer.BadParameter("--free-window-kv is for language models", param_hint="--free-window-kv")
        model.use_free_window()

    def turn(session: Any, line: str) -> str | None:
        try:
            for tok in session.send(line, max_tokens=max_tokens, sampling=params):
                sys.stdout.write(tok.text)
                sys.stdout.flush()
        except ContextLengthError as exc:
            err.print(f"[red]{exc}[/] — /reset to start a new conversation")
            return None
        s = model.stats
        return (
            f"[dim]{s.prompt_tokens - s.cached_tokens} new prompt tokens ({s.cached_tokens} cached), "
            f"{s.generated_tokens} generated at {s.decode_tokens_per_second:.1f} tok/s[/]"
        )

    _repl(model.artifact.manifest["name"], lambda: model.chat(system), turn)


def _repl(name: str, new_session: Any, turn: Any) -> None:
    """The chat loop: a line in, ``turn(session, line)`` streams the reply and gives its summary line;
    /reset takes a new session, /exit, /quit and Ctrl-D end it."""
    session = new_session()
    err.print(f"[dim]{name} — /reset starts over, /exit or Ctrl-D quits[/]")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            session = new_session()
            continue
        if line.strip():
            summary = turn(session, line)
            if summary is not None:
                print()
                err.print(summary)


def _chat_budgeted(
    artifact: Path, kv_budget: int, threads: int | None, system: str | None, max_tokens: int, params: Any
) -> None:
    """`chat --kv-budget`: each turn holds at most ``kv_budget`` KV entries (TOVA), never a full context."""
    from edgert.serve.local import BudgetedChat, BudgetedModel

    model = BudgetedModel(artifact, kv_budget, threads)
    try:

        def turn(session: Any, line: str) -> str:
            for piece in session.send(line, max_tokens, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
            s = model.stats
            return (
                f"[dim]{s.prompt_tokens - s.cached_tokens} new prompt tokens ({s.cached_tokens} cached), "
                f"{s.generated_tokens} generated; {model.evicted_tokens} KV entries evicted so far[/]"
            )

        _repl(model.engine.artifact.manifest["name"], lambda: BudgetedChat(model, system), turn)
    finally:
        model.close()
