"""Refuse to compile a real model (a recipe, or a model file a package or `models/` ships) in a test
that does not carry ``@pytest.mark.slow``: such a compile takes minutes, and `-m "not slow"` must stay quick."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def is_real_model(model: Any) -> bool:
    """A recipe name, or a file or folder inside an installed package or the checkout's `models/`."""
    from edgert.paths import MODELS_DIR
    from edgert.recipes import find_recipe

    if find_recipe(str(model)) is not None:
        return True
    path = Path(str(model)).resolve()
    return "site-packages" in path.parts or MODELS_DIR.resolve() in path.parents


def install(test: str) -> None:
    """Wrap `edgert.families.compile.compile_model` so that a real model fails when it reaches TVM's
    compile (errors found before that, such as a bad target or output path, still surface), naming ``test``."""
    from edgert.compiler import compile as build_module
    from edgert.families import compile as compile_module

    original = compile_module.compile_model
    if getattr(original, "_guarded", False):
        return
    real: list[str] = []

    def guarded(model: Any, *args: Any, **kwargs: Any) -> Any:
        if is_real_model(model):
            real.append(str(model))
        try:
            return original(model, *args, **kwargs)
        finally:
            real.clear()

    def compile_guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if real:
            message = f"{test} compiles the real model '{real[0]}' but is not marked @pytest.mark.slow"
            print(message, file=sys.stderr)
            raise AssertionError(message)
        return compile_original(self, *args, **kwargs)

    compile_original = build_module.Build.compile
    guarded._guarded = True  # type: ignore[attr-defined]
    compile_module.compile_model = guarded
    build_module.Build.compile = compile_guarded
