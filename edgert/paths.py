"""Where edgert finds its data folders (`targets/`, `models/`) and keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("EDGERT_HOME", Path(__file__).resolve().parent.parent))
TARGETS_DIR = ROOT / "targets"
MODELS_DIR = ROOT / "models"


def cache_dir() -> Path:
    """The user's cache folder for edgert (``$EDGERT_CACHE`` or ``~/.cache/edgert``)."""
    base = os.environ.get("EDGERT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgert"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path
