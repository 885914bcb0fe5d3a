"""What the command modules share: the consoles, common options, the progress bar, deploying with one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from edgert.errors import EdgertError

out = Console()
err = Console(stderr=True)

ArtifactArg = Annotated[Path, typer.Argument(help="A compiled .edgert artifact.")]


def _positive_threads(value: int | None) -> int | None:
    """--threads below 1 is refused before anything loads (the upper bound, the CPU count, is
    checked where the model runs: here, or on the device)."""
    if value is not None and value < 1:
        raise EdgertError(f"--threads {value}: give a number from 1 to the CPUs of the machine")
    return value


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", "-t", help="Worker threads (default: the target's big cores).", callback=_positive_threads
    ),
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
DeviceKindOpt = Annotated[
    str | None,
    typer.Option(
        "--device-kind",
        help="cpu or gpu: run the kernels there (a GPU artifact runs on the first OpenCL device); "
        "an artifact built for the other kind is refused.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def allow_unsigned(allow: bool) -> bool:
    """Apply ``--allow-unsigned`` to this process (see `edgert.artifact.signing`); the option's callback,
    so that every command declaring `AllowUnsignedOpt` honours it before it loads anything."""
    if allow:
        from edgert.artifact.signing import allow_unsigned as allow_in_process

        allow_in_process(True)
    return allow


AllowUnsignedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unsigned",
        help="Load native code from an artifact that is unsigned or signed by a key this machine does not trust.",
        callback=allow_unsigned,
    ),
]
# The commands that load an artifact's native code in this process (with --device: the device's agent
# decides, by its own --allow-unsigned); tests/test_security.py checks each one declares the option.
LOADING_COMMANDS = ("run", "chat", "bench", "profile", "transcribe", "serve", "calibrate", "codec encode",
                    "codec decode", "codec roundtrip")  # fmt: skip


def sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None) -> Any:
    """The sampling parameters of `run` and `chat`, a bad value refused as an edgert error."""
    from edgert.runtime.sampling import SamplingParams

    try:
        return SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as exc:
        raise EdgertError(str(exc)) from exc


@contextmanager
def stages(first: str) -> Iterator[Callable[[str, float | None], None]]:
    """A transient progress bar on stderr; yields the ``progress(stage, fraction)`` callback the library takes."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task(first, total=None)

        def progress(stage: str, fraction: float | None) -> None:
            bar.update(task, description=stage, total=None if fraction is None else 1.0, completed=fraction or 0)

        yield progress


def upload(dev: Any, artifact: Path) -> dict[str, Any]:
    """Deploy ``artifact`` to ``dev`` with a progress bar of bytes sent."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err
    ) as bar:
        task = bar.add_task(f"deploy {artifact.name}", total=artifact.stat().st_size)
        return dev.deploy(artifact, progress=lambda done, total: bar.update(task, completed=done, total=total))


def note(message: str) -> None:
    """A dim line of progress on stderr (plain text, not markup)."""
    from rich.markup import escape

    err.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)
