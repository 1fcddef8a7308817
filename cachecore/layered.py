"""A tiered cache: a private writable cache layered over shared read-only ones.

The container case: the host's cache directory is bind-mounted read-only into
a container, which runs its own mount. A cache directory cannot be used
read-only as such (the daemon writes its log, SQLite's WAL files, usage
records and totals, and fetched blocks), so the container gets a private
cache of its own and reads the host's through it:

* blocks: the private cache, then each shared one, then the store (when
  reachable); fetched blocks are written to the private cache;
* metadata: the private index first; a shared index only for what the
  private one does not hold, and a shared record dated in the future is
  taken as of unknown age, so a shared layer can fill gaps but never outrank
  what this mount saw itself nor claim a listing fresh for ever; every write
  goes to the private index;
* usage records, pins, totals and eviction concern the private cache alone:
  a shared cache is never written, evicted or repaired from here (and is
  best mounted read-only besides).

Trust (SECURITY.md): a shared cache is checked like our own (owned by the
mount's user, nobody else able to write it or a directory above it), and its
blocks verify only with its own secret, so whoever cannot write that cache
cannot put bytes into this mount through it. Blocks are named by the file's
identity and the block size, so a block found in any layer is the right one
or is ignored; layers must share a block size, as a cache keeps one for life.

`open_cache` in mount/daemon.py opens a LayeredCache when shared caches are
configured (`--shared-cache DIR`, or `shared_caches = [...]` in the config).
"""
from __future__ import annotations

import os
import time

from .blocks import BlockCache
from .cache import CACHE_SUBDIRS, BlockSizeMismatch, LocalCache, open_blocks
from .cachedir import UntrustedCache, check_tree
from .index import MetadataIndex, ReadOnlyDiskcache


class NotACache(UntrustedCache):
    """A shared cache directory that holds no rez-lazyfs cache."""


class SharedIndex(MetadataIndex):
    """Another cache's metadata index, read-only."""

    def __init__(self, directory: str):
        if not ReadOnlyDiskcache.exists(directory):
            raise NotACache(f"{os.path.dirname(directory)} is not a rez-lazyfs cache (no {directory})")
        super().__init__(directory, create=False)

    @staticmethod
    def _open(directory: str) -> ReadOnlyDiskcache:
        return ReadOnlyDiskcache(directory)


class SharedBlocks(BlockCache):
    """Another cache's blocks, read-only."""

    def write(self, key: str, index: int, data: bytes) -> None:
        raise PermissionError(f"the shared cache {self.blocks_dir} is not written to")


def _clamped(found, now: float):
    """A shared record; one dated in the future is taken as of unknown age
    (time 0: revalidated at first use), never as fresh for ever."""
    return None if found is None else (found[0], found[1] if found[1] <= now else 0.0)


class LayeredIndex:
    """Reads: the private index, else the newest shared record (times in the future: 0).
    Everything else (writes, usage records, pins, totals): the private index alone."""

    def __init__(self, private: MetadataIndex, shared: list[SharedIndex], clock=time.time):
        self.private = private
        self.shared = shared
        self._clock = clock

    def __getattr__(self, name):
        return getattr(self.private, name)

    def _first(self, read, *args):
        found = read(self.private, *args)
        if found is not None:
            return found
        now = self._clock()
        shared = (_clamped(read(layer, *args), now) for layer in self.shared)
        return max(filter(None, shared), key=lambda value_and_time: value_and_time[1], default=None)

    def get_listing(self, store_id: str, relpath: bytes):
        return self._first(MetadataIndex.get_listing, store_id, relpath)

    def get_root(self, store_id: str):
        return self._first(MetadataIndex.get_root, store_id)

    def get_text(self, key: str) -> str | None:
        return next((text for layer in (self.private, *self.shared)
                     if (text := layer.get_text(key)) is not None), None)

    def knows_store(self, store_id: str) -> bool:
        return any(layer.knows_store(store_id) for layer in (self.private, *self.shared))

    def close(self) -> None:
        for layer in (self.private, *self.shared):
            layer.close()


class LayeredBlocks(BlockCache):
    """The private block cache, whose reads fall through to shared ones.
    Everything but reading (writing, paths, eviction's directory) concerns
    the private cache alone; `read` is BlockCache's, on top of `read_many`."""

    def __init__(self, directory: str, block_size: int, mac, *, create: bool = True,
                 shared: list[SharedBlocks]):
        super().__init__(directory, block_size, mac, create=create)
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

    def close(self) -> None:
        for cache in (super(), *self.shared):
            cache.close()

    def present(self, key: str, size: int) -> list[int]:
        layers = [super().present(key, size), *(layer.present(key, size) for layer in self.shared)]
        return sorted(set().union(*layers))


class LayeredCache(LocalCache):
    """A LocalCache in `directory` that also reads the caches in `shared_dirs`."""

    def __init__(self, directory: str, block_size: int | None, shared_dirs: list[str]):
        for d in shared_dirs:
            check_tree(d, CACHE_SUBDIRS[:2], create=False)
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
        try:
            shared_blocks = [open_blocks(d, size, create=False, kind=SharedBlocks)
                             for d in shared_dirs]
        except FileNotFoundError as e:
            self.close()
            raise NotACache(f"{e.filename} is missing, so the shared cache's blocks cannot be "
                            "verified (a cache of an earlier release? drop it, or mount it as "
                            "a cache of its own once)") from None
        self.index = LayeredIndex(self.index, shared_indexes)
        self.blocks = open_blocks(directory, size, kind=LayeredBlocks, shared=shared_blocks)
