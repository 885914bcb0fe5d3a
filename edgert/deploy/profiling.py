"""Profile an artifact on a device: deploy it if needed, measure there, write the report here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.deploy.remote import ship_gpu_runtime
from edgert.errors import OutputPathError
from edgert.profile.report import write_report


def profile_on_device(
    artifact: str | Path, uri: str, report: str | Path, progress: Any = None, **options: Any
) -> dict[str, Path]:
    """Deploy ``artifact`` to device ``uri`` if needed, profile it there, write the report files."""
    from edgert.deploy.links import parse_device

    artifact, report = Path(artifact), Path(report)
    if not report.parent.is_dir():
        raise OutputPathError(f"cannot write the report {report}: folder {report.parent} does not exist")
    with parse_device(uri) as dev:
        if not dev.holds(artifact):
            dev.deploy(artifact, progress=progress)
        else:
            ship_gpu_runtime(dev, artifact)
        result = dev.profile(artifact.name, **{k: v for k, v in options.items() if v is not None})
        result["link"] = {"uri": uri, "kind": dev.link}
    return write_report(result, report)
