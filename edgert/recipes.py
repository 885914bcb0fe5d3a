"""Model recipes (`models/*.toml`): where a model's weights come from and how to compile it."""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.errors import ModelFileError
from edgert.paths import MODELS_DIR


@dataclass
class Recipe:
    """One model: its family, source file and default compile and run options."""

    name: str
    description: str
    family: str
    source: dict[str, Any]
    compile: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def source_path(self) -> Path:
        """The model file or folder: inside the Python package that ships it, or a path (relative
        paths are under `models/`)."""
        package = self.source.get("package")
        if not package:
            path = Path(self.source["path"])
            return path if path.is_absolute() else MODELS_DIR / path
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelFileError(
                f"model '{self.name}' comes from the Python package '{package}', which is not "
                f"installed: {self.source.get('install', f'pip install {package}')}"
            )
        if self.source.get("assemble"):
            return self._assembled(package)
        path = Path(spec.origin).parent / self.source["file"]
        if not path.is_file():
            raise ModelFileError(f"model '{self.name}': {path} is missing from package '{package}'")
        return path

    def _assembled(self, package: str) -> Path:
        """The file a package assembles from its chunk packages (its function named by ``assemble``),
        which checks the whole file's hash: a mismatched chunk is refused before any compile."""
        import importlib

        try:
            return Path(getattr(importlib.import_module(package), self.source["assemble"])())
        except (ImportError, OSError, ValueError) as exc:  # a missing chunk package or file, a bad hash
            raise ModelFileError(
                f"model '{self.name}': package '{package}' could not assemble {self.source.get('file')}: {exc} "
                f"({self.source.get('install', '')})"
            ) from None

    def missing(self) -> str | None:
        """None when the model's weights are installed, else how to install them (`edgert models`)."""
        try:
            self.source_path()
        except ModelFileError:
            return self.source.get("install", "")
        return None


def list_recipes() -> list[Recipe]:
    """All recipes in `models/`."""
    return [load_recipe(p.stem) for p in sorted(MODELS_DIR.glob("*.toml"))]


def find_recipe(name: str) -> Recipe | None:
    """The recipe called ``name``, or None."""
    path = MODELS_DIR / f"{name}.toml"
    return load_recipe(name) if path.is_file() else None


def load_recipe(name: str) -> Recipe:
    """Parse `models/<name>.toml`."""
    with (MODELS_DIR / f"{name}.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    return Recipe(name=name, **raw)
