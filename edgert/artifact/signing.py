"""Signed artifacts: an Ed25519 signature over the manifest, checked before any native code loads.

The manifest lists the sha256 and size of every other member, so signing its exact bytes signs
the whole artifact. The signature is the member ``manifest.sig`` (JSON: the signer's public key
and the signature, both hex); it lies outside the manifest, so it is not part of what it signs.
The signed message is ``b"edgert-artifact-manifest-v1\\0" + manifest.json`` (the prefix keeps a
signature from meaning anything in another context).

Keys live in the user's config folder (`edgert.paths.config_dir`): ``signing-key.pem`` (the
user's private key, 0600, created on first compile) and ``signing-key.pub``; ``trusted/*.pub``
(other keys this machine trusts, `edgert keys trust`). A device also trusts the keys shipped with
its runtime (``<EDGERT_HOME>/trusted-keys/*.pub``, written by `edgert deploy`'s bundle).

Signing and verifying use the `cryptography` package, on the host and on devices (the emulated
board's root file system carries its aarch64 wheel).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgert.errors import ArtifactError, EdgertError
from edgert.paths import ROOT, config_dir, create_private_file

SIGNATURE = "manifest.sig"
CONTEXT = b"edgert-artifact-manifest-v1\0"
PRIVATE_KEY = "signing-key.pem"
PUBLIC_KEY = "signing-key.pub"
TRUSTED = "trusted"
SHIPPED = "trusted-keys"  # beside the runtime on a device (EDGERT_HOME)
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")

# Whether unsigned artifacts may load native code in this process: only an explicit
# `--allow-unsigned` (edgert run, the agent's option) sets it.
_allow_unsigned = False
_extra_folders: list[Path] = []  # more folders of trusted keys (the agent's --trusted-keys)


class SignatureError(ArtifactError):
    """An artifact is unsigned, badly signed, or signed by a key this machine does not trust."""


def allow_unsigned(allow: bool = True) -> None:
    """Let (or stop letting) this process load native code from unsigned or untrusted artifacts."""
    global _allow_unsigned
    _allow_unsigned = allow


def trust_folder(folder: Path) -> None:
    """Also trust the ``*.pub`` keys in ``folder`` in this process."""
    _extra_folders.append(Path(folder))


def unsigned_allowed() -> bool:
    """True after `allow_unsigned` (an explicit ``--allow-unsigned``)."""
    return _allow_unsigned


def fingerprint(public: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public).hexdigest()[:16]


# -- keys ----------------------------------------------------------------------------------------


def _key_folder() -> Path:
    return config_dir()


def own_public_key() -> bytes | None:
    """The user's public key on this machine, or None before the first compile (`edgert keys generate`)."""
    try:
        return parse_public_key((_key_folder() / PUBLIC_KEY).read_text())
    except OSError:
        return None


def ensure_key() -> tuple[bytes, bool]:
    """The user's signing key (PKCS#8 PEM bytes), created if absent; (key, created).

    Two processes creating it at once agree: each writes a candidate beside it and links it into
    place, which only the first one does; the other reads the winner's key.
    """
    folder = _key_folder()
    path = folder / PRIVATE_KEY
    created = False
    if not path.is_file():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        created = create_private_file(path, pem)
    pem = path.read_bytes()
    public = _private(pem).public_key().public_bytes_raw()
    pub_path = folder / PUBLIC_KEY
    if own_public_key() != public:
        tmp = pub_path.with_name(f".{PUBLIC_KEY}.{os.getpid()}.part")
        tmp.write_text(public.hex() + "\n")
        os.replace(tmp, pub_path)
    return pem, created


def _private(pem: bytes):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgertError(f"{_key_folder() / PRIVATE_KEY} is not an Ed25519 key")
    return key


def parse_public_key(text: str) -> bytes:
    """A public key written as 64 hex digits (what `edgert keys show` prints)."""
    text = text.strip().lower()
    if not _HEX_KEY.match(text):
        raise EdgertError(f"not an Ed25519 public key (64 hex digits expected): '{text[:80]}'")
    return bytes.fromhex(text)


def trust(public: bytes) -> Path:
    """Trust ``public`` on this machine (``trusted/<fingerprint>.pub``)."""
    dest = _key_folder() / TRUSTED / f"{fingerprint(public)}.pub"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(public.hex() + "\n")
    return dest


def trusted_keys(extra: list[Path] | None = None) -> dict[str, bytes]:
    """Every public key this machine trusts, by fingerprint: the user's own, ``trusted/``, the
    keys shipped with the runtime, and those in the folders ``extra``."""
    keys: dict[str, bytes] = {}
    own = own_public_key()
    if own is not None:
        keys[fingerprint(own)] = own
    folders = [_key_folder() / TRUSTED, ROOT / SHIPPED, *_extra_folders, *(extra or [])]
    for folder in folders:
        for path in sorted(Path(folder).glob("*.pub")) if Path(folder).is_dir() else []:
            try:
                public = parse_public_key(path.read_text())
            except (OSError, EdgertError):
                continue  # a damaged key file trusts nothing
            keys[fingerprint(public)] = public
    return keys


# -- signing and checking ------------------------------------------------------------------------


def sign_manifest(manifest: bytes) -> bytes:
    """The ``manifest.sig`` member for ``manifest`` (the exact manifest.json bytes), signed with the user's key."""
    pem, _ = ensure_key()
    key = _private(pem)
    signature = key.sign(CONTEXT + manifest)
    public = key.public_key().public_bytes_raw()
    return json.dumps({"algorithm": "ed25519", "key": public.hex(), "signature": signature.hex()}).encode()


def _verify(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as err:
        raise SignatureError(
            "verifying an artifact's signature needs the 'cryptography' package: pip install cryptography"
        ) from err
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class SignatureStatus:
    """What the signature of one artifact says."""

    state: str  # "trusted", "untrusted" (a valid signature by an unknown key), "unsigned", "invalid"
    key: str | None = None  # the signer's fingerprint
    detail: str = ""

    @property
    def trusted(self) -> bool:
        """True for a valid signature by a trusted key."""
        return self.state == "trusted"

    def describe(self) -> str:
        """One line for `edgert inspect`."""
        if self.state == "trusted":
            return f"signed by {self.key} (trusted)"
        if self.state == "untrusted":
            return f"signed by {self.key}, a key this machine does not trust (`edgert keys trust`)"
        if self.state == "unsigned":
            return "unsigned"
        return f"invalid signature ({self.detail})"


def check_signature(manifest: bytes, sig: bytes | None, extra: list[Path] | None = None) -> SignatureStatus:
    """The status of ``sig`` (the ``manifest.sig`` bytes, None if absent) over ``manifest``."""
    if sig is None:
        return SignatureStatus("unsigned")
    try:
        doc = json.loads(sig)
        public, signature = bytes.fromhex(doc["key"]), bytes.fromhex(doc["signature"])
        if doc.get("algorithm") != "ed25519":
            return SignatureStatus("invalid", detail=f"algorithm '{doc.get('algorithm')}'")
    except (ValueError, TypeError, KeyError, AttributeError):
        return SignatureStatus("invalid", detail=f"{SIGNATURE} is damaged")
    if not _verify(public, CONTEXT + manifest, signature):
        return SignatureStatus("invalid", fingerprint(public), "it does not match the manifest")
    trusted = trusted_keys(extra)
    if trusted.get(fingerprint(public)) != public:
        return SignatureStatus("untrusted", fingerprint(public))
    return SignatureStatus("trusted", fingerprint(public))


def require_trusted(status: SignatureStatus, where: object) -> None:
    """Refuse to load native code from an artifact whose signature is not trusted, unless allowed."""
    if status.trusted or _allow_unsigned:
        return
    raise SignatureError(
        f"{where} is {status.describe()}: its native code is not loaded (pass --allow-unsigned to run it anyway)"
    )
