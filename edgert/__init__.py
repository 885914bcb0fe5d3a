"""edgert: compile sequence models ahead of time with Apache TVM and run them on devices."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, threads: int | None = None, context_length: int | None = None) -> Any:
    """Load a compiled artifact (see `edgert.runtime.load`)."""
    from edgert.runtime import load as _load

    return _load(path, threads=threads, context_length=context_length)


def compile(model: str, target: str = "host", output: Any = None, **options: Any) -> Any:
    """Compile a model recipe or GGUF file to an artifact (see `edgert.compiler.compile_model`)."""
    from edgert.compiler import compile_model

    return compile_model(model, target=target, output=output, **options)
