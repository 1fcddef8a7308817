"""The signed manifest of an image, and the Ed25519 keys that sign it.

The manifest is the only file of an image that changes. It names the root
catalog (and so, through catalog and object names, every byte of the
revision), the traces index when the revision carries launch traces
(traces.py; "" when it does not, and absent from manifests written before
traces: their readers ignore the field), a revision number that only grows, how long clients may keep it
(TTL) and when it stops being valid (expiry: a stolen or stale image cannot
be replayed for ever). It is written last by the publisher, so a publish
killed at any point leaves the previous revision served and complete.

File form: a header line, the base64 signature, then the signed JSON:

    rez-lazyfs-manifest 1
    <base64 Ed25519 signature of DOMAIN + the JSON bytes>
    {"expires": ..., "format": 1, "published": ..., "revision": ..., "root": "...",
     "traces": "...", "ttl": ...}
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import LazyFSError
from .objects import check_name

MANIFEST_PATH = "manifest"
FORMAT = 1
_HEADER = b"rez-lazyfs-manifest 1"
_DOMAIN = b"rez-lazyfs manifest signature\0"  # a signature over anything else never verifies here
_SECRET_HEADER = "rez-lazyfs-ed25519-secret-key"
_PUBLIC_HEADER = "rez-lazyfs-ed25519-public-key"
DEFAULT_TTL = 61        # squid does not cache what expires within 60 s (notes/http.md)
DEFAULT_VALIDITY = 30 * 86400


class BadManifest(LazyFSError):
    """A manifest that is not signed by the key, damaged, expired or older than one seen."""


class BadKey(ValueError):
    pass


@dataclass(frozen=True)
class Manifest:
    revision: int
    root: str          # the root catalog's object name
    ttl: int           # seconds a client may use it before asking again
    published: int     # unix time
    expires: int       # unix time after which it is refused
    format: int = FORMAT
    traces: str = ""   # the traces index's object name (traces.py); "" for none

    def encode(self, key: Ed25519PrivateKey) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        signature = base64.b64encode(key.sign(_DOMAIN + body))
        return b"\n".join([_HEADER, signature, body]) + b"\n"

    @classmethod
    def decode(cls, blob: bytes, public_key: Ed25519PublicKey, *, now: float | None = None) -> Manifest:
        """The manifest, if signed by `public_key`, well-formed and not expired."""
        try:
            header, signature, body = blob.rstrip(b"\n").split(b"\n", 2)
        except ValueError:
            raise BadManifest("not a rez-lazyfs manifest") from None
        if header != _HEADER:
            raise BadManifest("not a rez-lazyfs manifest (or of an unknown format)")
        try:
            public_key.verify(base64.b64decode(signature, validate=True), _DOMAIN + body)
        except (InvalidSignature, binascii.Error, ValueError):
            raise BadManifest("the manifest's signature does not verify with the public key") from None
        try:
            raw = json.loads(body)
            manifest = cls(**{k: raw[k] for k in ("revision", "root", "ttl", "published",
                                                  "expires", "format")},
                           traces=raw.get("traces", ""))
        except (ValueError, KeyError, TypeError) as e:
            raise BadManifest(f"signed but malformed manifest ({e})") from None
        if manifest.format != FORMAT or not all(
                type(v) is int for v in (manifest.revision, manifest.ttl, manifest.published,
                                         manifest.expires)) or manifest.ttl < 0:
            raise BadManifest("signed but malformed manifest (field types)")
        check_name(manifest.root)
        if manifest.traces != "":
            check_name(manifest.traces)
        now = time.time() if now is None else now
        if manifest.expires < now:
            raise BadManifest(f"the manifest (revision {manifest.revision}) expired on "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(manifest.expires))} UTC: "
                              "publish again")
        return manifest


def generate_key(path: str) -> None:
    """Write a new private key to `path` (mode 0600, never over an existing
    file) and its public key to `path`.pub."""
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    public = key.public_key().public_bytes_raw()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_SECRET_HEADER}\n{base64.b64encode(raw).decode()}\n")
    with open(path + ".pub", "x") as f:
        f.write(f"{_PUBLIC_HEADER} {base64.b64encode(public).decode()}\n")


def load_private_key(path: str) -> Ed25519PrivateKey:
    text = _read_key_file(path)
    header, _, rest = text.partition("\n")
    if header != _SECRET_HEADER:
        raise BadKey(f"{path} is not a rez-lazyfs signing key (made by `rez-lazyfs keygen`)")
    return Ed25519PrivateKey.from_private_bytes(_raw_key(rest, path))


def load_public_key(path: str) -> Ed25519PublicKey:
    text = _read_key_file(path)
    header, _, rest = text.partition(" ")
    if header != _PUBLIC_HEADER:
        raise BadKey(f"{path} is not a rez-lazyfs public key (the .pub file `rez-lazyfs keygen` wrote)")
    return Ed25519PublicKey.from_public_bytes(_raw_key(rest, path))


def _read_key_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("ascii")
    except UnicodeDecodeError:
        raise BadKey(f"{path} is not a key file") from None
    except OSError as e:
        raise BadKey(f"cannot read the key {path}: {e.strerror}") from None


def _raw_key(text: str, path: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise BadKey(f"{path} holds a damaged key")
    return raw
