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
    count: Annotated[int, typer.Option("--count", help="Boards to start (more than one needs --tracker).")] = 1,
    tracker: Annotated[
        str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker the boards register with.")
    ] = None,
) -> None:
    """Build (first time, cached) and start the emulated board; print its device URIs.

    With --tracker, start --count boards that register with the tracker under the target's name
    (`edgert farm status`); they share the cached root file system and prove the secret farm-TARGET."""
    from edgert.deploy import board

    if tracker is not None:
        _start_fleet(target, count, tracker)
        return
    if count != 1:
        from edgert.errors import DeviceError

        raise DeviceError("--count N starts boards for a farm: give --tracker HOST:PORT (`edgert farm start`)")

    with stages("emulated board") as progress:
        state = board.start(target, port, progress=progress)
    err.print(f"[green]running[/] {escape(state['name'])}, pid {state['pid']}", highlight=False)
    if "secret_created" in state:  # shown once: the host keeps it in its config folder
        from edgert.deploy.device_secrets import secret_path

        err.print(f"device secret {state['secret_created']} (kept in {secret_path('board')}, 0600)", highlight=False)
    for uri in state["uris"].values():
        print(uri)


def _start_fleet(target: str, count: int, tracker: str) -> None:
    from edgert.deploy import board_fleet
    from edgert.deploy.device_secrets import secret_path

    with stages("emulated boards") as progress:
        states = board_fleet.start_fleet(target, count, tracker, progress=progress)
    for state in states:
        err.print(f"[green]running[/] {escape(state['name'])}, pid {state['pid']}", highlight=False)
        print(f"rpc://127.0.0.1:{state['rpc_port']} (registered with {tracker} as '{state['key']}')")
    err.print(f"the boards prove the secret farm-{target} ({secret_path(f'farm-{target}')})", highlight=False)


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
    """Stop the emulated board, and the farm's emulated boards."""
    from edgert.deploy import board, board_fleet

    fleet = board_fleet.stop_fleet()
    if fleet:
        print(f"stopped {fleet} fleet board{'s' if fleet > 1 else ''}")
    print("stopped" if board.stop() else "no emulated board was running")
