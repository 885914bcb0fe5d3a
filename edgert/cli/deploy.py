"""`edgert deploy` and `edgert profile`: put an artifact on a device, measure it there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgert.cli.common import AllowUnsignedOpt, ArtifactArg, ThreadsOpt, err, upload


def deploy(
    artifact: Annotated[Path, typer.Argument(help="A compiled .edgert artifact (one file).")],
    device: Annotated[str, typer.Option("--device", "-d", help="Device URI (see `edgert run --help`).")],
) -> None:
    """Upload ARTIFACT to a device: verified by sha256 there, renamed over the old copy only when whole."""
    from edgert.deploy import parse_device

    with parse_device(device) as dev:
        reply = upload(dev, artifact)
        name = dev.name  # asked before the link closes
    err.print(
        f"[green]deployed[/] {artifact.name} to {escape(name)} ({device}): {reply['size'] / 1e6:.1f} MB, "
        f"sha256 {reply['sha256'][:16]}… verified",
        highlight=False,
    )


def profile(
    artifact: ArtifactArg,
    device: Annotated[str, typer.Option("--device", "-d", help="Device URI (see `edgert run --help`).")] = "local",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt (default: the model's).")] = None,
    runs: Annotated[
        int | None, typer.Option("--runs", "-r", help="Prefill + decode runs (default 3); graph calls (default 20).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Decode steps per run.")] = 32,
    report: Annotated[Path, typer.Option("--report", help="HTML report to write (.json and .csv beside it).")] = Path(
        "profile.html"
    ),
    threads: ThreadsOpt = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option("--input-shape", help="A graph: an input's size for its symbolic dims, NAME=1,128 (repeatable)."),
    ] = None,
    tracker: Annotated[
        str | None, typer.Option("--tracker", help="HOST:PORT of a TVM RPC tracker: profile a fleet of devices.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="With --tracker: the devices' key (target name).")] = None,
    devices: Annotated[str, typer.Option("--devices", help="With --tracker: how many devices, or 'all' free.")] = "all",
    secret: Annotated[
        str | None, typer.Option("--secret", help="With --tracker: the devices' secret name (default farm-KEY).")
    ] = None,
    call_timeout: Annotated[
        float, typer.Option("--call-timeout", help="With --tracker: seconds a call may take before the device is hung.")
    ] = 900.0,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Measure on the device: load, prefill, per-token decode p50/p90/p99, per-operator time, peak memory;
    for a GPU artifact also each OpenCL kernel's device time (OpenCL events) and the device memory.
    With --tracker and --key: lease the devices, profile them in parallel and write one fleet report."""
    from edgert.deploy.profiling import profile_on_device

    options: dict = {"prompt": prompt, "runs": runs, "max_tokens": max_tokens, "threads": threads}
    if input_shape:
        from edgert.families.graph.build import parse_input_shapes

        options["input_shapes"] = parse_input_shapes(input_shape)
    if tracker is not None or key is not None:
        _fleet(artifact, tracker, key, devices, secret, report, {**options, "call_timeout": call_timeout})
        return
    paths = profile_on_device(artifact, device, report, **options)
    result = json.loads(paths["json"].read_text())
    if result.get("kind") == "graph":
        from edgert.profile.report import graph_summary

        err.print(f"{escape(result['title'])}: load {result['load_seconds']:.2f} s", highlight=False, soft_wrap=True)
        for line in graph_summary(result):
            err.print(escape(line), highlight=False, soft_wrap=True)
        err.print(f"[green]wrote[/] {paths['html']}, {paths['json'].name}, {paths['csv'].name}", highlight=False)
        return
    d, pre = result["decode_ms"], result["prefill_ms"]
    err.print(
        f"{escape(result['title'])}: load {result['load_seconds']:.2f} s, prefill p50 {pre['p50']:.1f} ms, "
        f"decode p50/p90/p99 {d['p50']:.2f}/{d['p90']:.2f}/{d['p99']:.2f} ms per token, "
        f"peak {result['peak_rss_mb']:.0f} MB",
        highlight=False,
        soft_wrap=True,
    )
    if result.get("gpu"):
        from edgert.profile.report import gpu_summary

        for line in gpu_summary(result["gpu"]):
            err.print(escape(line), highlight=False, soft_wrap=True)
    err.print(f"[green]wrote[/] {paths['html']}, {paths['json'].name}, {paths['csv'].name}", highlight=False)


def _fleet(
    artifact: Path, tracker: str | None, key: str | None, devices: str, secret: str | None, report: Path, options: dict
) -> None:
    from edgert.deploy.farm import fleet_profile
    from edgert.errors import DeviceError

    if tracker is None or not key:
        raise DeviceError("a fleet profile needs both --tracker HOST:PORT and --key KEY")
    if devices != "all" and not (devices.isdigit() and int(devices) > 0):
        raise DeviceError(f"--devices must be a positive number or 'all', not '{devices}'")
    count: int | str = devices if devices == "all" else int(devices)

    def log(line: str) -> None:
        err.print(escape(line), highlight=False)

    paths = fleet_profile(artifact, tracker, key, report, devices=count, secret=secret, log=log, **options)
    doc = json.loads(paths["json"].read_text())
    from edgert.profile.report import fleet_headlines

    for line in fleet_headlines(doc):
        err.print(escape(line), highlight=False)
    for failure in doc["failures"]:
        err.print(f"[red]failed[/] {escape(failure['device'])}: {escape(failure['error'])}", highlight=False)
    err.print(f"[green]wrote[/] {paths['html']}, {paths['json'].name}, {paths['csv'].name}", highlight=False)
