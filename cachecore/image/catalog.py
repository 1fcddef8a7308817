"""Catalogs: what exists in a published image, level by level.

A catalog holds the listings of some directories (entries with the store's
modes, owners, sizes, times and symlink targets, in the index's own listing
records, model.encode_listing), the chunks of the files listed there, and,
for directories whose contents live in another catalog, that catalog's name:

* the root catalog: the repository root; a family catalog per family;
* a family catalog: the family directory and its version directories (the
  levels a release changes); a payload catalog per version directory;
* a payload catalog: every directory below one version directory, for ever.

A file's chunks are objects of `chunk_size` bytes (the last one shorter), on
the block grid, so a reader fetches only what it reads. Its content id, the
BLAKE3 of the chunk size and the chunk names, is in its listing entry
(`Attr.content`): the local cache keys blocks by it, so a file that two
versions or two repositories share is fetched and stored once.

Binary, so names are bytes as the store has them (newlines, invalid UTF-8)
and decoding is fast; everything decoded is checked (paths, listings, chunk
counts against sizes) before it is used.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

import blake3

from ..model import CONTENT_ID_SIZE, ROOT_NAME, Attr, decode_listing, encode_listing
from ..paths import BadPath, check_relpath
from .objects import NAME_LENGTH, check_name

DEFAULT_CHUNK_SIZE = 128 * 1024  # the block grid: tests/bench/results/chunk_size.md
_MAGIC = b"RLC1"
_COUNT = struct.Struct("<I")
_CHUNKS = struct.Struct("<II")  # chunk size, chunk count
_DIGEST = NAME_LENGTH // 2


class DamagedCatalog(ValueError):
    pass


def content_id(chunk_size: int, chunks: list[str]) -> bytes:
    h = blake3.blake3(b"rez-lazyfs content\0%d\0" % chunk_size)
    for name in chunks:
        h.update(bytes.fromhex(name))
    return h.digest(CONTENT_ID_SIZE)


@dataclass
class FileChunks:
    chunk_size: int
    chunks: list[str]  # object names, in order

    def covering(self, offset: int, size: int) -> range:
        """Indices of the chunks holding bytes [offset, offset + size)."""
        if size <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + size - 1) // self.chunk_size + 1)


@dataclass
class Catalog:
    listings: dict[bytes, dict[bytes, Attr]] = field(default_factory=dict)  # dir -> entries
    files: dict[bytes, FileChunks] = field(default_factory=dict)            # file -> chunks
    children: dict[bytes, str] = field(default_factory=dict)                # dir -> catalog name
    root: Attr | None = None  # the repository root's own attributes (root catalog only)

    def encode(self) -> bytes:
        root = encode_listing({ROOT_NAME: self.root}, 0.0) if self.root else b""
        parts = [_MAGIC, _COUNT.pack(len(root)), root, _COUNT.pack(len(self.listings))]
        for path, entries in sorted(self.listings.items()):
            blob = encode_listing(entries, 0.0)
            parts += [_COUNT.pack(len(path)), path, _COUNT.pack(len(blob)), blob]
        parts.append(_COUNT.pack(len(self.files)))
        for path, f in sorted(self.files.items()):
            parts += [_COUNT.pack(len(path)), path, _CHUNKS.pack(f.chunk_size, len(f.chunks))]
            parts += [bytes.fromhex(name) for name in f.chunks]
        parts.append(_COUNT.pack(len(self.children)))
        for path, name in sorted(self.children.items()):
            parts += [_COUNT.pack(len(path)), path, bytes.fromhex(name)]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes) -> Catalog:
        """Raises DamagedCatalog on anything malformed or inconsistent."""
        reader = _Reader(blob)
        try:
            if reader.take(4) != _MAGIC:
                raise DamagedCatalog("not a catalog")
            catalog = cls()
            root = reader.take(reader.count())
            if root:
                entries, _ = decode_listing(root)
                if list(entries) != [ROOT_NAME]:
                    raise DamagedCatalog("a root record with other entries")
                catalog.root = entries[ROOT_NAME]
            for _ in range(reader.count()):
                path = reader.path()
                entries, _ = decode_listing(reader.take(reader.count()))
                catalog.listings[path] = entries
            for _ in range(reader.count()):
                path = reader.path()
                chunk_size, n = _CHUNKS.unpack(reader.take(_CHUNKS.size))
                chunks = [reader.take(_DIGEST).hex() for _ in range(n)]
                catalog.files[path] = FileChunks(chunk_size, chunks)
            for _ in range(reader.count()):
                path = reader.path()
                catalog.children[path] = reader.take(_DIGEST).hex()
            if not reader.done():
                raise DamagedCatalog("trailing bytes after the catalog")
        except (ValueError, BadPath, struct.error) as e:
            raise DamagedCatalog(f"damaged catalog: {e}") from None
        catalog._check()
        return catalog

    def _check(self) -> None:
        for path, f in self.files.items():
            parent, _, name = path.rpartition(b"/")
            attr = self.listings.get(parent, {}).get(name)
            if attr is None or not stat.S_ISREG(attr.mode):
                raise DamagedCatalog(f"chunks for {path!r}, which is not a listed file")
            if f.chunk_size <= 0 or len(f.chunks) != -(-attr.size // f.chunk_size):
                raise DamagedCatalog(f"{path!r}: {len(f.chunks)} chunks of {f.chunk_size} "
                                     f"for {attr.size} bytes")
            if attr.content != content_id(f.chunk_size, f.chunks):
                raise DamagedCatalog(f"{path!r}: content id does not match its chunks")
        for path, name in self.children.items():
            check_name(name)
            parent, _, leaf = path.rpartition(b"/")
            attr = self.listings.get(parent, {}).get(leaf)
            if not path or attr is None or not stat.S_ISDIR(attr.mode):
                raise DamagedCatalog(f"a catalog for {path!r}, which is not a listed directory")


class _Reader:
    def __init__(self, blob: bytes):
        self._blob = blob
        self._pos = 0

    def take(self, n: int) -> bytes:
        chunk = self._blob[self._pos:self._pos + n]
        if len(chunk) != n:
            raise DamagedCatalog("truncated catalog")
        self._pos += n
        return chunk

    def count(self) -> int:
        return _COUNT.unpack(self.take(_COUNT.size))[0]

    def path(self) -> bytes:
        return check_relpath(self.take(self.count()))

    def done(self) -> bool:
        return self._pos == len(self._blob)
