"""What a path inside a repository may look like, whoever supplies it.

Paths reach cachecore from the kernel (one name at a time, already sane), but
also from files other people write: baked contexts, embedded listings, traces,
and later published catalogs. Every such path is checked here before it is
walked, looked up or stored, so that no input can name `..`, an absolute
path, a NUL byte or an over-long name (SECURITY.md, "Paths").
"""
from __future__ import annotations

import os

from .errors import LazyFSError

NAME_MAX = 255


class BadPath(LazyFSError, ValueError):
    """A path or name from an input that no repository can contain."""


def is_bad_name(name: bytes) -> bool:
    """Whether check_name refuses the bytes `name`, without a message: the test
    for loops over many names (decoding a listing record)."""
    return name in (b"", b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX


def check_name(name: bytes) -> bytes:
    """One directory entry name: not empty, '.', '..', no '/' or NUL, at most 255 bytes."""
    if not isinstance(name, bytes):
        raise BadPath(f"a path component must be bytes, not {type(name).__name__}")
    if not is_bad_name(name):
        return name
    # which rule, for the message
    if name in (b"", b".", b".."):
        raise BadPath(f"invalid path component {name!r}")
    if b"/" in name or b"\0" in name:
        raise BadPath(f"path component {name[:80]!r} holds '/' or NUL")
    raise BadPath(f"path component of {len(name)} bytes (at most {NAME_MAX})")


def split_path(relpath: bytes) -> list[bytes]:
    """The components of a repository-relative path, each checked.

    b"" is the repository root. A leading '/', an empty component ('a//b'),
    '.' or '..' anywhere is refused rather than normalised: a path that needs
    normalising did not come from a listing."""
    if not isinstance(relpath, bytes):
        raise BadPath(f"a path must be bytes, not {type(relpath).__name__}")
    if not relpath:
        return []
    if relpath.startswith(b"/"):
        raise BadPath(f"absolute path {relpath[:80]!r} where a relative one belongs")
    return [check_name(c) for c in relpath.split(b"/")]


def check_relpath(relpath: bytes) -> bytes:
    split_path(relpath)
    return relpath


def relpath_from_text(text: str) -> bytes:
    """A path from a JSON document (a context, a trace), checked."""
    if not isinstance(text, str):
        raise BadPath(f"a path must be a string, not {type(text).__name__}")
    try:
        relpath = os.fsencode(text)
    except UnicodeEncodeError:  # JSON can hold surrogates no file name decodes to
        raise BadPath(f"path {text[:80]!r} is not a file name") from None
    return check_relpath(relpath)
