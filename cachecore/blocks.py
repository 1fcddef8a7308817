"""The local block cache: one sparse file per version of a store file.

Block i of a file version lives in slot i of its cache file, at offset
i * (block_size + 8): the block's bytes, then an 8-byte trailer, a MAC of
those bytes (keyed BLAKE3 with the cache's secret, over the file key, i and
the bytes). The data is written first and the trailer second, so a slot is
present only once it is whole (write, then mark present), for readers in any
process. A hole (never written) reads as zeros and is absent; a slot whose
trailer does not match (torn by a crash, the cache disk damaged, bytes in the
wrong slot, bytes planted by someone without the key) is reported and
refetched, which rewrites it. Consecutive blocks are contiguous on disk, so
sequential reads of the cache file get the kernel's readahead.

Files are opened relative to descriptors of the checked shard directories,
never following a symlink (cachedir.py), so nothing planted in the cache can
redirect a read or a write elsewhere.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading

import blake3

from .cachedir import UntrustedCache, open_owned, trusted_directory
from .openfiles import OpenFiles

log = logging.getLogger(__name__)
TRAILER_SIZE = 8
_ABSENT = bytes(TRAILER_SIZE)
_INDEX = struct.Struct("<Q")


def file_key(store_id: str, relpath: bytes, identity: tuple[int, ...], block_size: int) -> str:
    """Names the cache file of one version of one store file (DESIGN: Identity).

    The block size is part of it: block i of a 64K cache and of a 128K cache
    cover different bytes, so they must never be taken for each other."""
    numbers = "\0".join(map(str, (*identity, block_size))).encode()
    return hashlib.sha256(b"%b\0%b\0%b" % (os.fsencode(store_id), relpath, numbers)).hexdigest()


def content_key(content: bytes, size: int, block_size: int) -> str:
    """Names the cache file of a published file by its content id
    (image/catalog.py), whatever its path or repository: a file that two
    versions or two repositories share is fetched and stored once."""
    return hashlib.sha256(b"content\0" + content + b"\0%d\0%d" % (size, block_size)).hexdigest()


def unverified_key(key: str) -> str:
    """The key of a file version's blocks that came from a context file while
    the store could not confirm them (an offline seed): kept apart from the
    store's, so they serve only listings of the same unconfirmed origin and
    are never taken for the store's bytes once it answers (SECURITY.md)."""
    return hashlib.sha256(b"unverified\0" + key.encode()).hexdigest()


class BlockMac:
    """The trailer of a slot: a MAC only the holder of the cache's secret can
    compute, bound to the file version and the slot, so whole, valid-looking
    bytes from another file, another slot or another cache do not verify.
    BLAKE3, keyed: ~22 us per 128K block here (xxh3, unkeyed: ~2 us)."""

    def __init__(self, secret: bytes):
        self._keyed = blake3.blake3(key=secret)

    def __call__(self, data, key: str, index: int) -> bytes:
        h = self._keyed.copy()
        h.update(key.encode() + _INDEX.pack(index))
        h.update(data)
        return h.digest(TRAILER_SIZE)


class BlockCache:
    """Blocking (local disk); callers run it in worker threads."""

    def __init__(self, directory: str, block_size: int, mac: BlockMac, *, create: bool = True):
        """`directory` is a checked cache directory (cachedir.check_tree);
        `create` False for a cache that is only read (a shared layer)."""
        self.block_size = block_size
        self.blocks_dir = os.path.join(directory, "blocks")
        self._mac = mac
        self._create = create
        # Reads of one file version share a descriptor, so sequential reads
        # get the kernel's read-ahead on the cache disk (a fresh descriptor
        # per read gets none: warm sequential 650 -> ~1,000 MB/s).
        self._readers = OpenFiles(max_idle=256, idle_seconds=2.0)
        self._shards: dict[str, int] = {}  # "ab" -> descriptor of blocks/ab, checked once
        self._shards_lock = threading.Lock()

    def close_idle(self) -> None:
        self._readers.close_idle()

    def close(self) -> None:
        self._readers.close_idle(max_age=0)
        with self._shards_lock:
            shards, self._shards = self._shards, {}
        for fd in shards.values():
            os.close(fd)

    def path(self, key: str) -> str:
        return os.path.join(self.blocks_dir, key[:2], key)

    def _shard(self, key: str, create: bool) -> int:
        """The checked descriptor of the key's shard directory (FileNotFoundError if none)."""
        name = key[:2]
        fd = self._shards.get(name)
        if fd is not None:
            return fd
        with self._shards_lock:
            fd = self._shards.get(name)
            if fd is None:
                if create and self._create:
                    blocks = trusted_directory(self.blocks_dir, create=True)
                    try:
                        fd = trusted_directory(name, create=True, dir_fd=blocks)
                    finally:
                        os.close(blocks)
                else:
                    fd = trusted_directory(os.path.join(self.blocks_dir, name), create=False)
                self._shards[name] = fd
            return fd

    def check_shards(self) -> None:
        """Check every shard directory there is now (UntrustedCache if one is
        not ours), so a tampered cache is refused when it is opened, not
        block by block later; shards made afterwards are checked as they come."""
        try:
            names = os.listdir(self.blocks_dir)
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == 2:
                self._shard(name, create=False)

    def _open(self, key: str, flags: int) -> int:
        return open_owned(key, flags, dir_fd=self._shard(key, bool(flags & os.O_CREAT)))

    def _slot(self, index: int) -> int:
        return index * (self.block_size + TRAILER_SIZE)

    def read_many(self, key: str, blocks: list[tuple[int, int]]) -> dict[int, memoryview | None]:
        """{index: the block's bytes (a view) or None} for (index, length) pairs of one file version."""
        try:
            fd = self._current_reader(key)
        except FileNotFoundError:
            return {index: None for index, _ in blocks}
        except UntrustedCache as e:
            log.warning("not reading the cache: %s", e)  # absent; the fetch says more
            return {index: None for index, _ in blocks}
        try:
            return {index: self._read_slot(fd, key, index, length) for index, length in blocks}
        finally:
            self._readers.release(key, fd)

    def _current_reader(self, key: str) -> int:
        """A kept descriptor of the key's cache file; pair with _readers.release."""
        opened = []

        def opener():
            opened.append(True)
            return self._open(key, os.O_RDONLY)

        fd = self._readers.acquire(key, opener)
        # One just opened by its name is the current file. One kept from an
        # earlier read may be of a file a clean (here or in another process)
        # evicted since: let it go, so the eviction frees its space, and read
        # the current file, which may have been fetched again.
        if opened or os.fstat(fd).st_nlink:
            return fd
        self._readers.release(key, fd, keep=False)
        self._readers.forget(key)
        return self._readers.acquire(key, opener)

    def read(self, key: str, index: int, length: int) -> memoryview | None:
        return self.read_many(key, [(index, length)])[index]

    def _read_slot(self, fd: int, key: str, index: int, length: int,
                   again: bool = True) -> memoryview | None:
        raw = os.pread(fd, length + TRAILER_SIZE, self._slot(index))
        if len(raw) == length + TRAILER_SIZE:
            data = memoryview(raw)[:length]
            trailer = raw[length:]
            if trailer == self._mac(data, key, index):
                return data  # no copy: the reply to the kernel is the one that counts
            if trailer == _ABSENT:
                return None
        elif not raw.strip(b"\0"):
            return None  # beyond the end of a sparse file: never written
        else:
            # The file ends inside the slot: a write cut short (a full disk, a
            # crash, a kill) that never reached its trailer. Absent, not damage.
            log.info("cached block %d of %s was never completed; refetching",
                     index, self.path(key))
            return None
        if again:
            # A read racing a write of the same slot (by a fetch here or in
            # another process) can see part old, part new: look once more.
            return self._read_slot(fd, key, index, length, again=False)
        # Absent, not cleared: clearing could undo a writer that just finished;
        # the refetch that follows rewrites the slot anyway.
        log.warning("cached block %d of %s is damaged; refetching", index, self.path(key))
        return None

    def present(self, key: str, size: int) -> list[int]:
        """Indices of the blocks of a `size`-byte file version whose slot looks
        written (trailer set); read() verifies them. One open, one pread each."""
        try:
            fd = self._open(key, os.O_RDONLY)
        except (FileNotFoundError, UntrustedCache):
            return []
        try:
            found = []
            for index in range(-(-size // self.block_size)):
                length = min(self.block_size, size - index * self.block_size)
                trailer = os.pread(fd, TRAILER_SIZE, self._slot(index) + length)
                if len(trailer) == TRAILER_SIZE and trailer != _ABSENT:
                    found.append(index)
            return found
        finally:
            os.close(fd)

    def write(self, key: str, index: int, data: bytes) -> None:
        self.write_many(key, [(index, data)])

    def write_many(self, key: str, blocks: list[tuple[int, bytes]]) -> None:
        """Write (index, bytes) blocks of one file version, each slot's bytes
        and then its mark in one call: the kernel copies them in file order,
        so the mark never lands before the bytes it vouches for (and a reader
        that catches a slot half written finds a mark that does not match)."""
        try:
            fd = self._open(key, os.O_WRONLY)
        except FileNotFoundError:
            fd = self._open(key, os.O_WRONLY | os.O_CREAT)
            self._readers.forget(key)  # a kept reader may hold an evicted predecessor
        try:
            for index, data in blocks:
                _write_all(fd, [data, self._mac(data, key, index)], self._slot(index))
        finally:
            os.close(fd)


def _write_all(fd: int, parts: list, offset: int) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]
