"""The `edgert` command: one thin module per command or group, each over a function of the Python API.

compile (`compile`), run and chat (`run`), inspect (`inspect`), targets and models (`catalog`),
bench (`bench`), deploy and profile (`deploy`), board (`board`), farm (`farm`), keys (`keys`), transcribe
(`audio`), codec (`codec`), calibrate (`calibrate`), serve (`serve`); shared consoles and options in `common`.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from edgert.cli import audio, bench, board, calibrate, catalog, codec, deploy, farm, inspect, keys, run, serve
from edgert.cli import compile as compile_command
from edgert.cli.common import err
from edgert.errors import EdgertError

app = typer.Typer(
    help="Compile sequence models ahead of time with Apache TVM and run them on devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (
    compile_command.compile,
    run.run,
    run.chat,
    inspect.inspect,
    catalog.targets,
    catalog.models,
    bench.bench,
    deploy.deploy,
    deploy.profile,
    audio.transcribe,
    calibrate.calibrate,
    serve.serve,
):
    app.command()(command)
app.add_typer(board.app, name="board")
app.add_typer(codec.app, name="codec")
app.add_typer(keys.app, name="keys")
app.add_typer(farm.app, name="farm")


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
