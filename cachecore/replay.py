"""Trace replay: on the first access to a traced variant, fetch ahead what its
launch will read (cachecore/trace.py), in parallel, below the readers.

Where traces come from (`TraceSource`: two blocking calls, run in worker
threads): the cache's index (a seeded trace or a baked context's,
`IndexTraces`), a read-only directory of trace files a studio's CI fills
(`TraceDirectory`, config `traces = DIR`), and a published image
(stores/http.py). A variant traced in several is replayed from their union.

The replay (`replay`) loads the trace's directory listings and, beside
them, fetches the missing blocks in trace order, a batch of them per
store-thread call (`batches`), through the fetcher's single flight (a reader asking for
a block being replayed waits for that batch, never for a second fetch), at
most `background_limiter` batches at a time, so readers always find store
threads free. A traced file whose identity is
not the store's any more (changed, gone) is skipped, never read. It stops
when the store does not answer, when the cache reaches its limit, or with
the daemon (its task is cancelled: abandoned store calls return on their
own). Nothing waits for it: no open, read or lookup.
"""
from __future__ import annotations

import logging
import os
import stat
import time
from typing import Protocol

import trio

from .errors import (
    CacheUnavailable,
    NotADirectory,
    NotFound,
    StoreFileChanged,
    StoreUnavailable,
)
from .fetcher import FileVersion, block_length, runs_of
from .trace import BadTrace, VariantTrace, decode, merge, rescaled, same_version

log = logging.getLogger(__name__)
TRACE_SUFFIX = ".trace"
MAX_TRACE_FILES = 10_000       # in a trace directory
MAX_TRACE_FILE_SIZE = 64 * 2**20


class TraceSource(Protocol):
    local: bool  # True: answered from the cache disk; False: from the store's side

    def roots(self) -> set[bytes]: ...
    def trace(self, root: bytes) -> VariantTrace | None: ...


class IndexTraces:
    """The traces kept in the cache's index for one store."""

    local = True

    def __init__(self, index, store_id: str):
        self._index, self._store = index, store_id

    def roots(self) -> set[bytes]:
        return self._index.trace_roots(self._store)

    def trace(self, root: bytes) -> VariantTrace | None:
        return self._index.get_trace(self._store, root)


class TraceDirectory:
    """Every `*.trace` file below a directory (read-only; filled by a studio's CI),
    read again when it changes (size, mtime, inode)."""

    local = False

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, tuple[tuple[int, int, int], dict[bytes, VariantTrace]]] = {}

    def roots(self) -> set[bytes]:
        found = {}
        for top, dirs, names in os.walk(self.path):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(TRACE_SUFFIX) and len(found) < MAX_TRACE_FILES:
                    found[os.path.join(top, name)] = None
        for path in found:
            self._load(path)
        for gone in set(self._files) - set(found):
            del self._files[gone]
        return {root for _, traces in self._files.values() for root in traces}

    def _load(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                seen = (st.st_size, st.st_mtime_ns, st.st_ino)
                if path in self._files and self._files[path][0] == seen:
                    return
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TRACE_FILE_SIZE:
                    raise BadTrace(f"not a regular file of at most {MAX_TRACE_FILE_SIZE} bytes")
                traces = {t.root: t for t in decode(f.read())}
        except (OSError, BadTrace) as e:
            log.warning("ignoring trace file %s: %s", path, e)
            self._files.pop(path, None)
            return
        self._files[path] = (seen, traces)

    def trace(self, root: bytes) -> VariantTrace | None:
        found = None
        for _, traces in sorted(self._files.items()):
            t = traces[1].get(root)
            if t is not None:
                found = t if found is None else merge(found, t)
        return found


def batches(blocks: list[tuple[int, int]], sizes: list[int], block_size: int,
            workers: int) -> list[list]:
    """The (file, index) blocks in order (file n is `sizes[n]` bytes), cut into
    store-thread calls (`fetcher.runs_of`). A launch's blocks are mostly whole
    small files (.pyc): a call per block was mostly thread hand-offs and waits
    for the GIL (daemon CPU halved, replay_alone.py)."""
    return runs_of(blocks, [min(block_size, sizes[n] - index * block_size) for n, index in blocks],
                   workers)


def within(batch: list, room: int, block_size: int) -> list:
    """The first blocks of the batch that fit in `room` bytes."""
    for n, (version, index) in enumerate(batch):
        room -= block_length(version, index, block_size)
        if room < 0:
            return batch[:n]
    return batch


async def replay(repo, trace: VariantTrace) -> None:
    """Fetch ahead what `trace` read, for `repo` (a Repository). Never raises
    for store or cache trouble: it stops, says why in the log, and returns."""
    fetcher = repo.fetcher
    counters = fetcher.counters
    block_size = fetcher.blocks.block_size
    if trace.block_size != block_size:
        trace = rescaled(trace, block_size)
    name = f"{repo.alias}/{os.fsdecode(trace.root)}"
    workers = fetcher.background_limiter.total_tokens
    started = time.monotonic()

    def under_root(path: bytes) -> bytes:
        return trace.root + b"/" + path if path else trace.root

    async def each(items, work) -> None:
        """work(item) for every item, `workers` at a time, in order."""
        pending = iter(items)

        async def worker() -> None:
            for item in pending:
                async with fetcher.background_limiter:
                    await work(item)

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)

    changed: set[str] = set()
    stopped: list[str] = []
    versions: dict[int, FileVersion | None] = {}  # trace file -> its version now, None: skipped
    fetched_before = counters.replay_blocks

    async def list_dir(path: bytes) -> None:
        if stopped:
            return
        try:
            await repo.listing(under_root(path))
        except (NotFound, NotADirectory):
            pass  # gone since: nothing of it will be read
        except (StoreUnavailable, CacheUnavailable) as e:
            stopped.append(str(e))

    async def version_of(n: int) -> FileVersion | None:
        """The version of trace file n the store has now, if it is the traced one."""
        if n not in versions:
            path, identity = trace.files[n]
            try:
                attr = await repo.getattr(under_root(path))
            except (NotFound, NotADirectory):
                attr = None
            if n not in versions:  # not settled by another worker meanwhile
                if attr is None or not attr.is_file or not same_version(identity, attr.identity):
                    counters.replay_skipped += 1  # recorded on another version: never applied
                    versions[n] = None
                else:
                    versions[n] = repo.file_version(under_root(path), attr)
        return versions[n]

    async def fetch(batch) -> None:
        if stopped:
            return
        try:
            batch = [(version, index) for version, index in
                     [(await version_of(n), index) for n, index in batch]
                     if version is not None and version.key not in changed]
        except (StoreUnavailable, CacheUnavailable) as e:
            stopped.append(str(e))
            return
        if not batch:
            return
        room = fetcher.room()
        if room is not None:
            fits = within(batch, room, block_size)
            if len(fits) < len(batch):
                stopped.append("the cache is at its limit")
            if not fits:
                return
            batch = fits
        try:
            failed = await fetcher.fetch_ahead(batch)
        except StoreUnavailable as e:
            stopped.append(str(e))
            return
        for (key, _), e in failed.items():
            if isinstance(e, StoreFileChanged):
                if key not in changed:  # the reader that opens it next relists it
                    changed.add(key)
                    counters.replay_skipped += 1
            elif isinstance(e, StoreUnavailable):
                stopped.append(str(e))
            else:
                log.debug("trace replay of %s: %s", name, e)

    log.info("replaying the trace of %s: %d block(s) to fetch (those cached or changed "
             "since are passed over) from %d file(s)", name, len(trace.reads), len(trace.files))
    sizes = [identity[0] for _, identity in trace.files]
    # The listings load beside the fetches: a batch whose directories are not
    # listed yet lists them itself (one single flight with the listing task).
    async with trio.open_nursery() as nursery:
        nursery.start_soon(each, trace.dirs, list_dir)
        await each(batches(trace.reads, sizes, block_size, workers), fetch)
    fetched = counters.replay_blocks - fetched_before
    if stopped:
        log.info("trace replay of %s stopped after %d block(s): %s", name, fetched, stopped[0])
    else:
        log.info("replayed the trace of %s: %d block(s) fetched in %.2fs", name, fetched,
                 time.monotonic() - started)

