"""`edgert keys generate|show|trust|list`: the Ed25519 key that signs this user's artifacts, and the
public keys this machine trusts (`edgert.artifact.signing`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgert.cli.common import err

app = typer.Typer(help="Signing keys: yours (signs every artifact you compile) and the ones this machine trusts.")


@app.command("generate")
def generate() -> None:
    """Create your signing key if there is none (compiling does it too); print its public key."""
    from edgert.artifact import signing
    from edgert.paths import config_dir

    _, created = signing.ensure_key()
    public = signing.own_public_key()
    assert public is not None
    where = config_dir() / signing.PRIVATE_KEY
    err.print(f"{'created' if created else 'kept the existing key'} {where} (0600)", highlight=False)
    print(public.hex())


@app.command("show")
def show() -> None:
    """Print your public key (64 hex digits): give it to `edgert keys trust` on other machines."""
    from edgert.artifact import signing
    from edgert.errors import EdgertError

    public = signing.own_public_key()
    if public is None:
        raise EdgertError("no signing key yet: `edgert keys generate` (or compile a model) creates one")
    print(public.hex())


@app.command("trust")
def trust(
    key: Annotated[str, typer.Argument(help="A public key (64 hex digits) or a file holding one.")],
) -> None:
    """Trust artifacts signed by KEY on this machine (and on the devices you deploy to from it)."""
    from edgert.artifact import signing

    text = Path(key).read_text() if Path(key).is_file() else key
    public = signing.parse_public_key(text)
    path = signing.trust(public)
    err.print(f"trusted {signing.fingerprint(public)} ({path})", highlight=False)


@app.command("list")
def list_keys() -> None:
    """The public keys this machine trusts: fingerprint, key, and whose."""
    from edgert.artifact import signing

    own = signing.own_public_key()
    for fp, public in signing.trusted_keys().items():
        print(f"{fp}  {public.hex()}  {'yours' if public == own else 'trusted'}")
