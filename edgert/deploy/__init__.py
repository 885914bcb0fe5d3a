"""Links to devices. `local` is the machine itself; the board, ssh, adb, rpc and serial links
are tracked in the ARM-boards issue."""

from edgert.deploy.local import LocalDevice, parse_device

__all__ = ["LocalDevice", "parse_device"]
