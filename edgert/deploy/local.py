"""The `local` device: artifacts copied into a folder atomically and run in this process."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgert.artifact.reader import open_artifact
from edgert.paths import cache_dir


class LocalDevice:
    """Deploys to a folder on this machine (default: the user's cache)."""

    def __init__(self, root: Path | None = None):
        self.root = root or cache_dir() / "deployed"
        self.root.mkdir(parents=True, exist_ok=True)

    def deploy(self, artifact: Path) -> Path:
        """Verify ``artifact``, copy it next to its destination, then rename over it."""
        open_artifact(artifact)  # refuse a corrupt or foreign artifact before copying
        dest = self.root / Path(artifact).name
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(artifact, tmp)
            open_artifact(tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return dest
