"""`edgert serve`: artifacts behind an OpenAI-compatible HTTP API (`edgert.serve`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from edgert.cli.common import AllowUnsignedOpt, ThreadsOpt, note
from edgert.errors import EdgertError


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    artifacts: Annotated[
        list[Path], typer.Argument(help="Artifacts to serve: llama (chat, completions), whisper, graph (embeddings).")
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; not loopback only with --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="EDGERT_API_KEY", help="Every request must send 'Bearer KEY'.")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Sequences decoded together in one pass.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting beyond the batch (then 429).")] = 16,
    kv_tokens: Annotated[
        int | None,
        typer.Option(
            "--kv-tokens", help="KV cache size in tokens over all sequences (default: a context per batch row)."
        ),
    ] = None,
    prefix_cache: Annotated[
        int | None,
        typer.Option("--prefix-cache", help="Tokens of earlier prompts kept for reuse (default: one context; 0: off)."),
    ] = None,
    kv_budget: Annotated[
        int | None,
        typer.Option(
            "--kv-budget",
            help="Keep at most N tokens of KV per sequence, evicting the least-attended entries (TOVA) "
            "instead of refusing long prompts; needs an artifact compiled with --evictable-kv.",
        ),
    ] = None,
    warm_up: Annotated[
        bool,
        typer.Option(
            "--warm-up/--no-warm-up",
            help="Write the whole KV pool and run each pass shape once at start, so memory stays at its start level.",
        ),
    ] = True,
    step_tokens: Annotated[
        int | None,
        typer.Option(
            "--step-tokens",
            help="Tokens of a step that prefills a prompt beside decoding sequences (their rows plus a "
            "prompt chunk; default 64): smaller keeps decoding smooth, larger prefills faster.",
        ),
    ] = None,
    mixed_steps: Annotated[
        bool,
        typer.Option(
            "--mixed-steps/--no-mixed-steps",
            help="Prefill a prompt in the same pass as the decoding sequences' next tokens (default), "
            "or in passes of its own before them.",
        ),
    ] = True,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Append the scheduler's timeline to FILE, a JSON line per step: its model passes (kind, rows, "
            "tokens, seconds), the Python around them and the event loop's CPU (tools/serve_timeline.py reads it).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Serve ARTIFACTS over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/embeddings, /v1/audio/transcriptions, /health, /metrics)."""
    if not is_loopback(host) and not api_key:
        raise EdgertError(f"--host {host} is reachable from other machines: give --api-key too (or bind 127.0.0.1)")
    missing = [str(a) for a in artifacts if not a.exists()]
    if missing:
        raise EdgertError(f"artifact not found: {', '.join(missing)}")
    import uvicorn

    from edgert.serve.app import create_app
    from edgert.serve.models import load_models

    models = load_models(
        artifacts,
        threads,
        max_batch=max_batch,
        max_queue=max_queue,
        kv_tokens=kv_tokens,
        prefix_cache_tokens=prefix_cache,
        kv_budget=kv_budget,
        warm=warm_up,
        step_tokens=step_tokens,
        mixed_steps=mixed_steps,
        **({"trace": str(trace)} if trace else {}),
    )
    note(f"serving {', '.join(f'{m.name} ({m.kind})' for m in models.values())} on http://{host}:{port}/v1")
    uvicorn.run(create_app(models, api_key), host=host, port=port, log_level="warning")
