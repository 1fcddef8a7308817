"""A tiered cache: a private writable cache layered over shared read-only ones.

The container case: the host's cache directory is bind-mounted read-only into
a container, which runs its own mount. A cache directory cannot be used
read-only as such (the daemon writes its log, a probe file, SQLite's WAL
files, usage records and totals, and fetched blocks), so the container gets a
private cache of its own and reads the host's through it:

* blocks: the private cache, then each shared one, then the store (when
  reachable); fetched blocks are written to the private cache;
* metadata: the newest record among the private and the shared indexes (a
  listing's fetched_at says which); every write goes to the private index;
* usage records, pins, totals and eviction concern the private cache alone:
  a shared cache is never written, evicted or repaired from here (and is
  best mounted read-only besides).

Blocks are named by the file's identity and the block size and carry a
checksum, so a block found in any layer is the right one or is ignored;
layers must share a block size, as a cache keeps one for life.

`open_cache` in mount/daemon.py opens a LayeredCache when shared caches are
configured (`--shared-cache DIR`, or `shared_caches = [...]` in the config).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from urllib.parse import quote

from cachecore.blocks import BlockCache
from cachecore.cache import BlockSizeMismatch, LocalCache
from cachecore.index import MetadataIndex
from cachecore.plaindisk import PlainDisk

from .errors import UserError

log = logging.getLogger(__name__)
DB_NAME = "cache.db"  # diskcache's database file in a Cache directory


class ReadOnlyDiskcache:
    """The read side of a diskcache.Cache directory that cannot be written.

    diskcache itself cannot open one: it writes its settings and switches the
    database to WAL on every open. Values go through PlainDisk, so a pickle is
    refused here exactly as in the daemon's own index.
    """

    def __init__(self, directory: str):
        self._disk = PlainDisk(directory)
        self._path = os.path.join(directory, DB_NAME)
        self._warned = False

    def _connect(self) -> sqlite3.Connection:
        # While a writer (the host's daemon) has it open, the database is in
        # WAL mode and SQLite reads it read-only through the existing WAL
        # files. With no writer they are gone, cannot be created on a
        # read-only mount, and not needed: the main file is then complete.
        how = "mode=ro" if os.path.exists(self._path + "-wal") else "immutable=1"
        return sqlite3.connect(f"file:{quote(self._path)}?{how}", uri=True, timeout=10)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        if not os.path.exists(self._path):
            return []  # a cache older than this part of the index
        # One connection per query: queries come from several worker threads,
        # and only a fresh one picks the right mode if the writer came or went.
        try:
            with contextlib.closing(self._connect()) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            if not self._warned:
                log.warning("shared cache index %s is unreadable (%s); using the other layers",
                            self._path, e)
                self._warned = True
            return []

    def get(self, key, default=None):
        db_key, raw = self._disk.put(key)
        rows = self._query("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = ? "
                           "AND (expire_time IS NULL OR expire_time > ?)", (db_key, raw, time.time()))
        if not rows:
            return default
        try:
            return self._disk.fetch(*rows[0], False)
        except OSError:  # a large value's file, replaced by its writer meanwhile
            return default

    def iterkeys(self):
        for db_key, raw in self._query("SELECT key, raw FROM Cache ORDER BY rowid"):
            yield self._disk.get(db_key, raw)

    def close(self) -> None:
        pass


class SharedIndex(MetadataIndex):
    """Another cache's metadata index, read-only."""

    def __init__(self, directory: str):
        if not os.path.isfile(os.path.join(directory, DB_NAME)):
            raise UserError(f"{os.path.dirname(directory)} is not a rez-lazyfs cache (no {directory})")
        super().__init__(directory)

    @staticmethod
    def _open(directory: str) -> ReadOnlyDiskcache:
        return ReadOnlyDiskcache(directory)


class SharedBlocks(BlockCache):
    """Another cache's blocks, read-only."""

    def __init__(self, directory: str, block_size: int):
        try:
            super().__init__(directory, block_size)
        except OSError:
            pass  # a read-only cache that never held a block: every read misses

    def write(self, key: str, index: int, data: bytes) -> None:
        raise PermissionError(f"the shared cache {self.blocks_dir} is not written to")


class LayeredIndex:
    """Reads: the newest record among the layers. Everything else (writes,
    usage records, pins, totals): the private index alone."""

    def __init__(self, private: MetadataIndex, shared: list[SharedIndex]):
        self.private = private
        self.layers = [private, *shared]

    def __getattr__(self, name):
        return getattr(self.private, name)

    def get_listing(self, store_id: str, relpath: bytes):
        found = (layer.get_listing(store_id, relpath) for layer in self.layers)
        return max(filter(None, found), key=lambda entries_and_time: entries_and_time[1], default=None)

    def get_root(self, store_id: str):
        found = (layer.get_root(store_id) for layer in self.layers)
        return max(filter(None, found), key=lambda attr_and_time: attr_and_time[1], default=None)

    def get_text(self, key: str) -> str | None:
        return next((text for layer in self.layers if (text := layer.get_text(key)) is not None), None)

    def knows_store(self, store_id: str) -> bool:
        return any(layer.knows_store(store_id) for layer in self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()


class LayeredBlocks(BlockCache):
    """The private block cache, whose reads fall through to shared ones.
    Everything but reading (writing, paths, eviction's directory) concerns
    the private cache alone; `read` is BlockCache's, on top of `read_many`."""

    def __init__(self, directory: str, block_size: int, shared: list[SharedBlocks]):
        super().__init__(directory, block_size)
        self.shared = shared

    def read_many(self, key: str, blocks: list[tuple[int, int]]) -> dict[int, memoryview | None]:
        found = super().read_many(key, blocks)
        for layer in self.shared:
            missing = [(index, length) for index, length in blocks if found[index] is None]
            if not missing:
                break
            found.update(layer.read_many(key, missing))
        return found

    def close_idle(self) -> None:
        for cache in (super(), *self.shared):
            cache.close_idle()

    def present(self, key: str, size: int) -> list[int]:
        layers = [super().present(key, size), *(layer.present(key, size) for layer in self.shared)]
        return sorted(set().union(*layers))


class LayeredCache(LocalCache):
    """A LocalCache in `directory` that also reads the caches in `shared_dirs`."""

    def __init__(self, directory: str, block_size: int | None, shared_dirs: list[str]):
        shared_indexes = [SharedIndex(os.path.join(d, "index")) for d in shared_dirs]
        sizes = {int(text) for ix in shared_indexes if (text := ix.get_text("block_size"))}
        shared_size = next(iter(sizes), None)
        if len(sizes) > 1 or (block_size and shared_size and block_size != shared_size):
            raise BlockSizeMismatch(f"the shared caches {', '.join(shared_dirs)} and the block size "
                                    "asked for differ; layer caches of one block size only")
        # A new private cache takes the shared caches' block size; an existing
        # one of another size is refused by LocalCache.
        super().__init__(directory, block_size or shared_size)
        size = self.blocks.block_size
        self.index = LayeredIndex(self.index, shared_indexes)
        self.blocks = LayeredBlocks(directory, size, [SharedBlocks(d, size) for d in shared_dirs])
