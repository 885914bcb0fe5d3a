"""Device secrets on the host: one per installed agent, in the user's config folder.

``<config>/devices/<name>.secret`` holds the secret as hex, mode 0600, created atomically (two
processes installing at once end up with the same secret). The agent keeps its own copy on the
device (``--secret-file``); the host proves knowledge of it on every connection.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgert.deploy.protocol import AuthError, new_secret, parse_secret
from edgert.paths import config_dir, create_private_file

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
ENV = "EDGERT_DEVICE_SECRET"  # a secret given directly (hex), for scripts and CI


def secret_path(name: str) -> Path:
    """Where the host keeps device ``name``'s secret."""
    if not _NAME.fullmatch(name):
        raise AuthError(f"device secret name '{name[:80]}' is refused: letters, digits, '.', '_', '-'")
    return config_dir() / "devices" / f"{name}.secret"


def load_secret(name: str) -> bytes | None:
    """Device ``name``'s secret, or None if this host has none."""
    path = secret_path(name)
    try:
        return parse_secret(path.read_text(), str(path))
    except FileNotFoundError:
        return None


def ensure_secret(name: str) -> tuple[bytes, bool]:
    """Device ``name``'s secret, created (32 random bytes) if absent; (secret, created now)."""
    path = secret_path(name)
    created = create_private_file(path, new_secret().hex().encode() + b"\n")
    secret = load_secret(name)
    assert secret is not None
    return secret, created


def write_agent_copy(secret: bytes, dest: Path) -> Path:
    """The agent's copy of ``secret`` at ``dest`` (0600, replaced atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    os.replace(tmp, dest)
    return dest


def from_environment() -> bytes | None:
    """The secret in ``$EDGERT_DEVICE_SECRET``, if set."""
    text = os.environ.get(ENV)
    return parse_secret(text, ENV) if text else None
