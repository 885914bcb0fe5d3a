"""edgert: compile sequence models ahead of time with Apache TVM and run them on devices.

Importing it imports nothing else: a device imports only what `load` needs.
"""

from __future__ import annotations

from typing import Any

from edgert.version import __version__

__all__ = ["__version__", "compile", "load"]


def load(
    path: Any, threads: int | None = None, context_length: int | None = None, device_kind: str | None = None
) -> Any:
    """Load a compiled artifact with its family's runtime (see `edgert.families.registry.load`)."""
    from edgert.families.registry import load as _load

    return _load(path, threads=threads, context_length=context_length, device_kind=device_kind)


def compile(model: str, target: str = "host", output: Any = None, **options: Any) -> Any:
    """Compile a model recipe or file to an artifact (see `edgert.families.compile.compile_model`)."""
    from edgert.families.compile import compile_model

    return compile_model(model, target=target, output=output, **options)
