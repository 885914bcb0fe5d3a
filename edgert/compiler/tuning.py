"""Where MetaSchedule tuning databases live: ``targets/tuning/<target>/<model hash>/``.

`tools/tune.py` writes them; `compile_graph` applies one when it exists for the same target and
the same model file (by content hash), so a default compile never waits for tuning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgert.paths import TARGETS_DIR


def model_hash(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a model file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def database_dir(target: str, model: str | Path) -> Path:
    """The folder of the tuning database for ``model`` on ``target`` (may not exist)."""
    return TARGETS_DIR / "tuning" / target / model_hash(model)


def database_for(target: str, model: str | Path) -> Path | None:
    """The tuning database folder for ``model`` on ``target`` if one has been stored."""
    folder = database_dir(target, model)
    return folder if (folder / "database_workload.json").is_file() else None
