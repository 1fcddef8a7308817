"""A reader of published images for tests, built on cachecore.image alone.

It checks what a mount would (the manifest's signature with the .pub, every
catalog and object against its name) and gives the image's tree in the form
of helpers.walk, so a test compares an image with a walk of the store that
was published. It is deliberately not the HTTP store: a test of the
publisher must not depend on the reader it is meant to feed.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cachecore.image.catalog import Catalog, FileChunks
from cachecore.image.manifest import MANIFEST_PATH, Manifest, load_public_key
from cachecore.image.objects import decode_object, object_path
from cachecore.image.packs import Pack, decode_pack_list
from cachecore.image.traces import decode_pack_index, decode_trace_index, decode_trace_object
from cachecore.model import Attr
from cachecore.trace import VariantTrace

from helpers.walk import FULL_HASH_LIMIT, Entry, sample_ranges


@dataclass
class CatalogInfo:
    name: str
    level: str  # "root", "family" or "payload"
    catalog: Catalog


class ImageReader:
    def __init__(self, image: Path, public_key: Path):
        self.image = Path(image)
        self.manifest = Manifest.decode((self.image / MANIFEST_PATH).read_bytes(),
                                        load_public_key(str(public_key)))
        self.root: Attr | None = None
        self.attrs: dict[bytes, Attr] = {}       # relpath -> entry, every entry but the root
        self.listings: dict[bytes, list[bytes]] = {}
        self.files: dict[bytes, FileChunks] = {}
        self.catalogs: list[CatalogInfo] = []
        self._load()

    def object(self, name: str) -> bytes:
        return decode_object(name, (self.image / object_path(name)).read_bytes())

    def _load(self) -> None:
        pending = [(self.manifest.root, "root")]
        while pending:
            name, level = pending.pop()
            catalog = Catalog.decode(self.object(name))
            self.catalogs.append(CatalogInfo(name, level, catalog))
            if level == "root":
                assert catalog.root is not None, "the root catalog has no root attributes"
                self.root = catalog.root
            for directory, entries in catalog.listings.items():
                assert directory not in self.listings, f"{directory!r} listed by two catalogs"
                self.listings[directory] = list(entries)
                for entry, attr in entries.items():
                    self.attrs[directory + b"/" + entry if directory else entry] = attr
            self.files.update(catalog.files)
            child_level = {"root": "family", "family": "payload"}.get(level)
            for path, child in catalog.children.items():
                assert child_level, f"a payload catalog names another catalog ({path!r})"
                pending.append((child, child_level))
        missing = [d for d, a in self.attrs.items() if a.is_dir and d not in self.listings]
        assert not missing, f"directories without a listing in any catalog: {missing[:5]}"

    def read(self, relpath: bytes, offset: int, size: int) -> bytes:
        chunks = self.files[relpath]
        parts = [self.object(chunks.chunks[i]) for i in chunks.covering(offset, size)]
        start = offset - chunks.covering(offset, size).start * chunks.chunk_size if parts else 0
        return b"".join(parts)[start:start + size]

    def sha256(self, relpath: bytes) -> str:
        digest = hashlib.sha256()
        for name in self.files[relpath].chunks:
            digest.update(self.object(name))
        return digest.hexdigest()

    def _sampled_sha256(self, relpath: bytes, size: int) -> str:
        digest = hashlib.sha256()
        for start, end in sample_ranges(size):
            digest.update(b"%d:%d:" % (start, end))
            digest.update(self.read(relpath, start, end - start))
        return "sampled:" + digest.hexdigest()

    def walk(self) -> list[Entry]:
        """helpers.walk.walk() of the image's tree."""
        entries = [Entry(b".", "dir", stat.S_IMODE(self.root.mode), None, None, None)]
        for relpath, a in self.attrs.items():
            mode = stat.S_IMODE(a.mode)
            if a.is_dir:
                entries.append(Entry(relpath, "dir", mode, None, None, None))
            elif a.is_link:
                entries.append(Entry(relpath, "symlink", mode, a.size, a.target, None))
            elif a.is_file:
                digest = (self._sampled_sha256(relpath, a.size) if a.size > FULL_HASH_LIMIT
                          else self.sha256(relpath))
                entries.append(Entry(relpath, "file", mode, a.size, None, digest))
            else:
                entries.append(Entry(relpath, "other", mode, a.size, None, None))
        return sorted(entries)

    def walk_under(self, directory: bytes) -> list[Entry]:
        """walk() of one directory of the image, relative to it (as walk(REPO/directory))."""
        top = self.attrs[directory]
        entries = [Entry(b".", "dir", stat.S_IMODE(top.mode), None, None, None)]
        for e in self.walk():
            if e.relpath.startswith(directory + b"/"):
                entries.append(e._replace(relpath=e.relpath[len(directory) + 1:]))
        return sorted(entries)

    def trace_index(self) -> dict[bytes, str]:
        """{variant root: trace object name}; {} for a revision without traces."""
        name = self.manifest.traces
        return decode_trace_index(self.object(name)) if name else {}

    def traces(self) -> dict[bytes, VariantTrace]:
        return {root: decode_trace_object(root, self.object(name))
                for root, name in self.trace_index().items()}

    def pack_index(self) -> dict[bytes, str]:
        """{variant root: pack list object name}; {} for a revision without."""
        name = self.manifest.traces
        return decode_pack_index(self.object(name)) if name else {}

    def packs(self) -> dict[bytes, list[Pack]]:
        """Each traced variant's packs, each checked: its members, in order,
        are the objects it is made of."""
        out = {}
        for root, name in self.pack_index().items():
            out[root] = decode_pack_list(self.object(name))
            for pack in out[root]:
                members = pack.split(self.object(pack.name))
                assert {m: self.object(m) for m, _ in pack.members} == members
        return out

    def referenced_objects(self) -> set[str]:
        """Every object the revision names: its catalogs, all file chunks and
        its launch traces with their packs."""
        names = {c.name for c in self.catalogs}
        for chunks in self.files.values():
            names.update(chunks.chunks)
        if self.manifest.traces:
            names |= {self.manifest.traces, *self.trace_index().values(),
                      *self.pack_index().values()}
            names |= {pack.name for packs in self.packs().values() for pack in packs}
        return names


def image_objects(image: Path) -> set[str]:
    """The object files in an image directory (what a sync would upload)."""
    root = Path(image) / "objects"
    if not root.is_dir():
        return set()
    return {entry.name for shard in os.scandir(root) for entry in os.scandir(shard.path)}
