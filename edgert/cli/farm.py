"""`edgert farm start|status|stop`: a device farm on TVM's RPC tracker (`edgert.deploy.farm`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from edgert.cli.common import JsonOpt, err

app = typer.Typer(help="A device farm: TVM's RPC tracker, with devices registered by key (their target name).")
TrackerOpt = Annotated[
    str | None, typer.Option("--tracker", help="HOST:PORT of the tracker (default: the one started here).")
]


def _tracker(tracker: str | None) -> str:
    from edgert.deploy import farm
    from edgert.errors import DeviceError

    if tracker is not None:
        return tracker
    state = farm.tracker_state()
    if state is None:
        raise DeviceError("no tracker was started here: `edgert farm start`, or give --tracker HOST:PORT")
    return f"{state['host']}:{state['port']}"


@app.command("start")
def start(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (loopback unless a trusted network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Tracker port.")] = 9190,
) -> None:
    """Start TVM's RPC tracker in the background; print its address for agents and clients."""
    from edgert.deploy import farm

    state = farm.start_tracker(host, port)
    err.print(f"[green]tracker running[/], pid {state['pid']} (log {state['log']})", highlight=False)
    print(f"{state['host']}:{state['port']}")


@app.command("status")
def status(tracker: TrackerOpt = None, as_json: JsonOpt = False) -> None:
    """List the devices registered with the tracker by key: free or leased (the tracker's summary)."""
    from edgert.deploy import farm

    where = _tracker(tracker)
    keys = farm.summary(where)
    if as_json:
        print(json.dumps({"tracker": where, "keys": keys}))
        return
    if not keys:
        print(f"tracker {where}: no devices registered")
        return
    print(f"tracker {where}")
    for key, entry in sorted(keys.items()):
        print(
            f"{key}: {len(entry['devices'])} devices, {entry['free']} free, {entry['leased']} leased, "
            f"{entry['pending']} waiting"
        )
        for device in entry["devices"]:
            print(f"  {device}")


@app.command("stop")
def stop() -> None:
    """Stop the tracker started here."""
    from edgert.deploy import farm

    print("stopped" if farm.stop_tracker() else "no tracker was running")
