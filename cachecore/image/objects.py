"""Content-addressed objects: named by the BLAKE3-256 of their bytes, stored
compressed with zstd (level 3: ~4x zlib's speed at a similar ratio,
../shared/notes/http.md) unless that does not make them smaller.

An object file is one kind byte and the payload: b"Z" + a zstd frame, or
b"R" + the raw bytes. Whatever arrives over the network is decoded here and
its name checked against its bytes before anything uses it.
"""
from __future__ import annotations

import json
import re

import blake3
import zstandard

from ..errors import LazyFSError

NAME_LENGTH = 64  # hex digits of a 256-bit BLAKE3
_NAME = re.compile(r"^[0-9a-f]{64}$")
_COMPRESSED, _RAW = b"Z", b"R"
# A chunk decompresses to at most this (the largest chunk a publisher makes,
# with room); a bomb is refused, not expanded.
MAX_OBJECT_SIZE = 64 * 2**20


class DamagedObject(LazyFSError):
    """An object whose bytes do not match its name (or do not decode)."""


def object_name(data) -> str:
    return blake3.blake3(data).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DamagedObject(f"not an object name: {str(name)[:80]!r}")
    return name


def object_path(name: str) -> str:
    """Where an object lives, relative to the image root (and its URL)."""
    check_name(name)
    return f"objects/{name[:2]}/{name}"


def encode_object(data: bytes, compressor: zstandard.ZstdCompressor | None = None) -> bytes:
    packed = (compressor or zstandard.ZstdCompressor(level=3)).compress(data)
    if len(packed) + 1 < len(data) + 1:
        return _COMPRESSED + packed
    return _RAW + data


def decode_object(name: str, blob: bytes) -> bytes:
    """The object's bytes, verified against its name."""
    kind, payload = blob[:1], memoryview(blob)[1:]
    if kind == _RAW:
        data = bytes(payload)
    elif kind == _COMPRESSED:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_OBJECT_SIZE)
        except zstandard.ZstdError as e:
            raise DamagedObject(f"object {name} does not decompress: {e}") from None
    else:
        raise DamagedObject(f"object {name} is not an image object")
    if object_name(data) != name:
        raise DamagedObject(f"object {name} does not match its name")
    return data


def json_document(data: bytes, fmt: str, version: int, error: type[Exception], what: str) -> dict:
    """An object's bytes as the JSON document of format `fmt` and `version`
    (traces index, pack list), or `error` saying why not."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"damaged {what}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt or doc.get("version") != version:
        raise error(f"not a {what} (or of an unknown version)")
    return doc
