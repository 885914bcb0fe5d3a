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
    """Wrap `edgert.families.compile.compile_model` so that a real model fails, naming ``test``."""
    from edgert.families import compile as compile_module

    original = compile_module.compile_model
    if getattr(original, "_guarded", False):
        return

    def guarded(model: Any, *args: Any, **kwargs: Any) -> Any:
        if is_real_model(model):
            message = f"{test} compiles the real model '{model}' but is not marked @pytest.mark.slow"
            print(message, file=sys.stderr)
            raise AssertionError(message)
        return original(model, *args, **kwargs)

    guarded._guarded = True  # type: ignore[attr-defined]
    compile_module.compile_model = guarded
