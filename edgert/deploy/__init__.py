"""Links to devices: one agent (`agent.py`) on the device, reached by a device URI
(`links.py`: local, board://, ssh://, adb://, rpc://, serial://) from the host (`client.py`)."""

from __future__ import annotations

from typing import Any

from edgert.deploy.local import LocalDevice

__all__ = ["LocalDevice", "parse_device"]


def parse_device(uri: str, timeout: float = 3600.0) -> Any:
    """Open the device ``uri`` names (see `edgert.deploy.links`)."""
    from edgert.deploy.links import parse_device as _parse

    return _parse(uri, timeout)
