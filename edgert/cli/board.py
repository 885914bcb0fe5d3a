"""`edgert board start|status|stop`: the emulated arm64 board (`edgert.deploy.board`)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape

from edgert.cli.common import JsonOpt, err, stages

app = typer.Typer(help="The emulated arm64 board (qemu-aarch64-static + a cached Debian rootfs).")


@app.command("start")
def start(
    target: Annotated[str, typer.Option("--target", help="Board to emulate (an aarch64 target).")] = "rpi5",
    port: Annotated[int, typer.Option("--port", help="Agent's TCP port on 127.0.0.1 (0: any free one).")] = 0,
) -> None:
    """Build (first time, cached) and start the emulated board; print its device URIs."""
    from edgert.deploy import board

    with stages("emulated board") as progress:
        state = board.start(target, port, progress=progress)
    err.print(f"[green]running[/] {escape(state['name'])}, pid {state['pid']}", highlight=False)
    if "secret_created" in state:  # shown once: the host keeps it in its config folder
        from edgert.deploy.device_secrets import secret_path

        err.print(f"device secret {state['secret_created']} (kept in {secret_path('board')}, 0600)", highlight=False)
    for uri in state["uris"].values():
        print(uri)


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
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


@app.command("stop")
def stop() -> None:
    """Stop the emulated board."""
    from edgert.deploy import board

    print("stopped" if board.stop() else "no emulated board was running")
