"""Reads byte ranges of store files through the block cache.

Present blocks come from local disk; missing blocks are fetched from the store
once (single-flight), written to the cache, then returned. Blocking work runs
in worker threads under our own capacity limiters, bounded in time: an
unreachable store fails a read, never hangs it, and a cache disk that does
not answer is treated as a cache that misses (CONCURRENCY.md, rules 1 and 2).
"""
from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .blocks import BlockCache
from .cachedir import UntrustedCache
from .errors import CacheUnavailable, LazyFSError, NotFound, StoreUnavailable
from .model import display_path
from .singleflight import SingleFlight
from .stats import Counters

log = logging.getLogger(__name__)
USE_RESOLUTION = 60.0  # seconds: last-used times are kept to about this precision
# A reader that has gone through this much of a file in order, fetching from
# the store, is streaming it: fetch STREAM_WINDOW ahead of it, in parallel.
# The kernel asks for one block at a time (128K read-ahead: larger would pull
# unread bytes around a launch's scattered reads), so without this a cold
# sequential read pays one store round trip per block. Loaders read a few
# MiB at a time and never get here.
STREAM_AFTER = 8 * 2**20
STREAM_WINDOW = 2 * 2**20
STREAMS = 256  # files followed at once
STREAM_RUN = 4  # blocks a stream fetches ahead in one store-thread call (at most its window)
# Fetches ahead of readers (a trace replay, a directory's siblings) take at
# most this much per store-thread call (`runs_of`); a reader that wants a
# block of one waits for the reads before it there.
BATCH_BLOCKS = 16
BATCH_BYTES = 2**20


@dataclass
class _Stream:
    start: int        # the first block of this run of reads in order
    next_index: int   # the block a sequential reader reads next
    ahead: int        # blocks before this one are fetched or being fetched


class _Heartbeat:
    """Given to a store call that reports progress (a listing, entry by entry):
    each call from its worker thread moves the call's deadline to `wait`
    seconds from now, so only a stretch without progress times out. The
    deadline is the event loop's, so it is moved there (run_sync_soon), at
    most every wait/16 seconds: a step may take 15/16 of `wait` at least."""

    def __init__(self, scope: trio.CancelScope, wait: float):
        self._token = trio.lowlevel.current_trio_token()
        self._scope, self._wait = scope, wait
        self._sent = time.monotonic()  # touched by the worker thread only

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._sent >= self._wait / 16:
            self._sent = now
            try:
                self._token.run_sync_soon(self._push)
            except trio.RunFinishedError:
                pass  # an abandoned call outliving the loop

    def _push(self) -> None:
        self._scope.deadline = max(self._scope.deadline, trio.current_time() + self._wait)


@dataclass(frozen=True)
class FileVersion:
    """One exact version of one store file: what a block belongs to."""

    store: object          # a Store (stores/__init__.py)
    relpath: bytes
    size: int
    identity: tuple[int, ...]  # Attr.identity
    key: str               # blocks.file_key(...)

    @property
    def display(self) -> str:
        return display_path(self.store.root, self.relpath)


def runs_of(blocks: list, lengths: list[int], workers: int) -> list[list]:
    """The blocks in order (block n is `lengths[n]` bytes), cut into runs of at
    most BATCH_BLOCKS blocks and BATCH_BYTES bytes, one store-thread call
    each, and into enough runs to keep `workers` busy to the end."""
    most = max(1, min(BATCH_BLOCKS, len(blocks) // (4 * workers)))
    out, run, size = [], [], 0
    for block, length in zip(blocks, lengths):
        if run and (len(run) == most or size + length > BATCH_BYTES):
            out.append(run)
            run, size = [], 0
        run.append(block)
        size += length
    if run:
        out.append(run)
    return out


def block_length(f: FileVersion, index: int, block_size: int) -> int:
    """The length of block `index` of the file version (its last may be short)."""
    return min(block_size, f.size - index * block_size)


class Fetcher:
    def __init__(self, blocks: BlockCache, counters: Counters, *,
                 store_limiter: trio.CapacityLimiter, local_limiter: trio.CapacityLimiter,
                 store_timeout: float, cache_may_stall: bool = False,
                 local_timeout: float | None = None, stream_after: int = STREAM_AFTER,
                 stream_window: int = STREAM_WINDOW):
        """cache_may_stall: the cache directory is on a filesystem whose calls can
        wait on another machine or process (NFS, FUSE, ...): then no cache-disk
        call runs on the event loop, not even a one-block read, and blocks are
        written in local calls of their own (CONCURRENCY.md, rule 1).
        local_timeout (default: store_timeout) bounds every local call."""
        self.blocks = blocks
        self.stream_after = stream_after
        self.stream_window = stream_window
        self.counters = counters
        self.store_limiter = store_limiter
        self.local_limiter = local_limiter
        self.store_timeout = store_timeout
        self.cache_may_stall = cache_may_stall
        self.local_timeout = local_timeout or store_timeout
        self._cache_silent_since: float | None = None  # when the cache disk last timed out
        self._flights = SingleFlight()
        self._cache_writable = True
        self._unresponsive: dict[str, float] = {}  # store root -> when it last timed out
        # Uses are noted in memory on the read path and written to the index
        # in batches by flush_uses(), off the hot path.
        self._uses: dict[str, tuple[FileVersion, float]] = {}
        self._noted: dict[str, float] = {}
        self._streams: OrderedDict[str, _Stream] = OrderedDict()  # file key -> reader
        # Prefetching runs in a nursery the owner provides (the daemon), with
        # its own limit so readers always find store threads free.
        self._background: trio.Nursery | None = None
        # Prefetches and trace replays share half the store threads: readers
        # always find the other half free, so they never wait behind them.
        self.background_limiter = trio.CapacityLimiter(max(1, store_limiter.total_tokens // 2))
        # Blocks a trace replay fetched that no reader has asked for yet
        # (file key, index): a read of one counts the replay as useful.
        self._replayed: set[tuple[str, int]] = set()
        self.cache_room = lambda: None  # set by the Cache that owns this fetcher

    def run_prefetches_in(self, nursery: trio.Nursery | None) -> None:
        self._background = nursery

    def prefetch(self, files: list[FileVersion]) -> None:
        """Fetch these whole files in the background (if a nursery was given:
        the daemon gives one; bake and populate fetch what they need anyway)."""
        if self._background is not None and files:
            self._background.start_soon(self._prefetch_files, files)

    async def _prefetch_files(self, files: list[FileVersion]) -> None:
        # Which blocks are here already (a look at each cache file, which also
        # brings a warm one into the page cache ahead of its reader).
        try:
            present = await self.call_local(
                lambda: {f.key: set(self.blocks.present(f.key, f.size)) for f in files})
        except CacheUnavailable:
            return  # nowhere to keep what would be fetched
        wanted = [(f, index) for f in files for index in range(-(-f.size // self.blocks.block_size))
                  if index not in present[f.key]]
        runs = runs_of(wanted, [self._block_length(f, index) for f, index in wanted],
                       self.background_limiter.total_tokens)
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._prefetch_run, run)

    async def _prefetch_run(self, blocks: list[tuple[FileVersion, int]]) -> None:
        """Fetch blocks ahead of their readers in one store-thread call (which
        looks in the cache first: no hop of its own for that)."""
        async with self.background_limiter:
            try:
                failed = list((await self.fetch_ahead(blocks, replay=False)).values())
            except LazyFSError as e:
                failed = [e]
        for e in failed:
            log.debug("prefetch of %s failed: %s", blocks[0][0].display, e)

    def start_background(self, fn, *args) -> bool:
        """Run `fn(*args)` as a background task of the daemon (False if there is
        no daemon nursery: bake, populate)."""
        if self._background is None:
            return False
        self._background.start_soon(fn, *args)
        return True

    async def fetch_ahead(self, blocks: list[tuple[FileVersion, int]], replay: bool = True) -> dict:
        """Fetch (file version, index) blocks of one store ahead of their readers,
        for a trace replay (counted as replayed) or a prefetch (a stream, a
        directory's siblings: counted as prefetched), in one store-thread call (the caller holds a
        background_limiter slot): those nobody is fetching already, in order.
        {(file key, index): the error} for the blocks that failed; raises what
        failed them all."""
        wanted = {(f.key, index): (f, index) for f, index in blocks}
        outcome = await self._flights.run_many(
            list(wanted),
            lambda led, settle: self._fetch_ahead_call([wanted[key] for key in led], settle, replay))
        return {key: e for key, e in outcome.items() if isinstance(e, Exception)}

    async def _fetch_ahead_call(self, blocks: list[tuple[FileVersion, int]], settle,
                                replay: bool) -> dict:
        """fetch_ahead's call: {(file key, index): bytes or the error}. Each block
        is settled (counted, its waiting readers woken) as soon as the worker
        thread has kept it, not at the end of the call; if the cache may
        stall, once the call has returned and a local call has kept them."""
        now = time.time()
        for f, _ in blocks:
            self._uses[f.key] = (f, now)  # as _fetch: status attributes them again
        outcome: dict = {}

        def arrived(n: int, got) -> None:  # on the event loop
            f, index = blocks[n]
            key = (f.key, index)
            if key in outcome:
                return  # reported from the thread already
            if not isinstance(got, Exception) and got[1] is None:
                got = got[0]  # in the cache already: kept by a reader or another process
            elif not isinstance(got, Exception):
                got, seconds = got
                self.counters.record_latency(seconds)
                self.counters.store_reads += 1
                self.counters.store_bytes += len(got)
                if not replay:
                    self.counters.prefetch_blocks += 1
                else:
                    self.counters.replay_blocks += 1
                    self.counters.replay_bytes += len(got)
                    if len(self._replayed) < 200_000:  # ~25 MiB; past it, useful reads go uncounted
                        self._replayed.add(key)
            outcome[key] = got
            settle(key, got)

        token = trio.lowlevel.current_trio_token()

        def report(n: int, got) -> None:  # in the worker thread: no waiting for the loop
            try:
                token.run_sync_soon(arrived, n, got)
            except trio.RunFinishedError:
                pass  # an abandoned call outliving the loop

        first = blocks[0][0]
        what = first.display if len(blocks) == 1 else f"{first.display} and {len(blocks) - 1} more"
        fetched = await self.call_store(first.store, what, self._fetch_many_sync, blocks,
                                        None if self.cache_may_stall else report, progress=True)
        if self.cache_may_stall:
            try:
                await self.call_local(self._keep_each, [
                    (f, index, got[0]) for (f, index), got in zip(blocks, fetched)
                    if not isinstance(got, Exception)])
            except CacheUnavailable:
                pass
        for n, got in enumerate(fetched):
            arrived(n, got)
        return outcome

    def _fetch_many_sync(self, blocks: list[tuple[FileVersion, int]], report, progress) -> list:
        """[(bytes, seconds reading the store, None if it was cached) or the
        error] per block, in order; each kept and given to report(n, ...) as
        it comes, unless report is None. A block is looked for in the cache
        first (a reader may have overtaken the replay: one local read in this
        thread, no hop). Blocks of a file that follow each other are read from
        the store in one call (the store's client can have them all in flight
        at once). A file found changed is not read further; a store that fails
        one read fails the rest of the call (blocking)."""
        fetched: list = []
        failed, down = {}, None

        def cached(n: int):
            f, index = blocks[n]
            return None if self.cache_may_stall else \
                self.blocks.read(f.key, index, self._block_length(f, index))

        n = 0
        while n < len(blocks):
            f, index = blocks[n]
            if down is not None or f.key in failed:
                fetched.append(down or failed[f.key])
                n += 1
                continue
            here = cached(n)
            if here is not None:
                fetched.append((here, None))
                if report is not None:
                    report(n, fetched[-1])
                n += 1
                continue
            run = 1  # blocks n.. of f, in order, none of them cached
            while (n + run < len(blocks) and blocks[n + run][0].key == f.key
                   and blocks[n + run][1] == index + run and cached(n + run) is None):
                run += 1
            lengths = [self._block_length(f, i) for i in range(index, index + run)]
            started = time.monotonic()
            try:
                data = self._read_store(f, index, sum(lengths))
                seconds = (time.monotonic() - started) / run
                got = []
                offset = 0
                for length in lengths:
                    got.append((data[offset:offset + length], seconds))
                    offset += length
            except StoreUnavailable as e:
                got = [e] * run
                down = e
            except LazyFSError as e:  # changed, short: this file only
                got = [e] * run
                failed[f.key] = e
            if report is not None and down is None and f.key not in failed:
                # kept, then reported: no refetch in between
                self._keep(f, [(index + k, block[0]) for k, block in enumerate(got)])
            for k, block in enumerate(got):
                fetched.append(block)
                if report is not None:
                    report(n + k, block)
            n += run
            progress()
        return fetched

    def room(self) -> int | None:
        """Bytes the cache may still take before its limit (None: no limit)."""
        return self.cache_room()

    def _follow(self, f: FileVersion, indices: range, missed: bool) -> None:
        """Note a read; if it continues a stream from the store, fetch ahead."""
        if self._background is None:
            return  # nowhere to fetch ahead in (bake, populate)
        stream = self._streams.pop(f.key, None)
        if stream is not None and indices[0] in (stream.next_index, stream.next_index - 1):
            stream.next_index = indices[-1] + 1
        else:
            stream = _Stream(indices[0], indices[-1] + 1, 0)
        self._streams[f.key] = stream
        if len(self._streams) > STREAMS:
            self._streams.popitem(last=False)
        bs = self.blocks.block_size
        # Keep going while the reader consumes what was fetched ahead, or
        # when it waited on the store; a warm file never starts it.
        if ((stream.next_index - stream.start) * bs < self.stream_after
                or not (missed or stream.ahead > indices[0])):
            return
        blocks = -(-f.size // bs)
        end = min(stream.next_index + self.stream_window // bs, blocks)
        start = max(stream.ahead, stream.next_index)
        # In runs of STREAM_RUN blocks, one store-thread call each: a call per
        # block was mostly thread wake-ups and waits for the GIL (a cold
        # sequential read, from a local store: ~1 ms of daemon CPU a block,
        # two thirds of it scheduling). The window is topped up once a run's
        # worth of it has been read, and a file's last blocks go at once.
        run = max(1, min(STREAM_RUN, self.stream_window // bs))
        if end - start < run and end < blocks:
            return
        for first in range(start, end, run):
            self._background.start_soon(
                self._prefetch_run, [(f, index) for index in range(first, min(first + run, end))])
        stream.ahead = max(stream.ahead, end)

    def _block_length(self, f: FileVersion, index: int) -> int:
        return block_length(f, index, self.blocks.block_size)

    def note_use(self, f: FileVersion) -> None:
        now = time.time()
        last = self._noted.get(f.key)
        if last is None or now - last > USE_RESOLUTION:
            if len(self._noted) > 100_000:
                self._noted.clear()
            self._noted[f.key] = now
            self._uses[f.key] = (f, now)

    async def flush_uses(self, index) -> None:
        """Write the noted uses to the index (status and clean read them)."""
        if not self._uses:
            return
        batch, self._uses = self._uses, {}
        try:
            await self.call_local(index.record_uses, [
                (key, {"store": f.store.root, "path": os.fsdecode(f.relpath), "size": f.size,
                       "mtime_ns": f.identity[1], "block_size": self.blocks.block_size},
                 int(when))
                for key, (f, when) in batch.items()])
        except CacheUnavailable:
            self._uses = {**batch, **self._uses}  # kept for the next flush
            raise

    async def read(self, f: FileVersion, offset: int, size: int) -> bytes | memoryview:
        """The bytes at [offset, offset + size) of `f`, clipped to its end (a view:
        bytes(...) it to keep it)."""
        self.note_use(f)
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        bs = self.blocks.block_size
        indices = range(offset // bs, (end - 1) // bs + 1)
        if len(indices) == 1 and not self.cache_may_stall:
            # One local pread: cheaper than the two thread wake-ups of a hop,
            # which a start-up's thousands of small sequential reads each
            # pay in full (CONCURRENCY.md, rule 1).
            found = self._read_local(f, indices)
        else:
            try:
                found = await self.call_local(self._read_local, f, indices)
            except CacheUnavailable:
                found = dict.fromkeys(indices)  # a miss: the store answers instead
        missing = [i for i in indices if found[i] is None]
        self.counters.cache_hits += len(indices) - len(missing)
        if self._replayed:
            self._note_replay_use(f, indices)
        self._follow(f, indices, bool(missing))
        if missing:
            errors: list[Exception] = []

            async def fetch_into(i):
                try:
                    found[i] = await self.fetch_block(f, i)
                except Exception as e:  # one error for the caller, not a group
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for i in missing:
                    nursery.start_soon(fetch_into, i)
            if errors:
                raise errors[0]
            if self._replayed:  # joined a replay's fetch under way
                self._note_replay_use(f, missing)
        start = offset - indices[0] * bs
        if len(indices) == 1:
            out = memoryview(found[indices[0]])[start:start + (end - offset)]  # no copy
        else:
            # one copy: the parts of each block the request covers, joined
            first, last = indices[0], indices[-1]
            out = b"".join(memoryview(found[i])[start if i == first else 0:
                                                (end - 1) % bs + 1 if i == last else bs]
                           for i in indices)
        self.counters.bytes_served += len(out)
        return out

    def _note_replay_use(self, f: FileVersion, indices) -> None:
        for i in indices:
            if (f.key, i) in self._replayed:
                self._replayed.discard((f.key, i))
                self.counters.replay_useful += 1

    def cached_bytes(self, f: FileVersion) -> int:
        """How much of the file version is in the block cache (blocking)."""
        return sum(self._block_length(f, i) for i in self.blocks.present(f.key, f.size))

    def _read_local(self, f: FileVersion, indices: range) -> dict[int, bytes | None]:
        return self.blocks.read_many(f.key, [(i, self._block_length(f, i)) for i in indices])

    async def fetch_block(self, f: FileVersion, index: int) -> bytes:
        """The block, fetched from the store unless another task already is."""
        self.note_use(f)
        return await self._flights.run((f.key, index), lambda: self._fetch(f, index))

    async def _fetch(self, f: FileVersion, index: int) -> bytes:
        data = None
        # Another process sharing the cache may have fetched it meanwhile.
        try:
            data = await self.call_local(self.blocks.read, f.key, index,
                                         self._block_length(f, index))
        except CacheUnavailable:
            pass
        if data is not None:
            self.counters.cache_hits += 1
            return data
        self.counters.cache_misses += 1
        # Recorded on every fetch, not just once a minute: a clean may have
        # just forgotten this file, and status must attribute it again.
        self._uses[f.key] = (f, time.time())
        started = trio.current_time()
        data = await self.call_store(f.store, f.display, self._fetch_sync, f, index)
        self.counters.record_latency(trio.current_time() - started)
        if self.cache_may_stall:
            # Written in a bounded call of its own: a stalled cache disk must
            # not hold a store thread or fail a read the store has answered.
            try:
                await self.call_local(self._keep_each, [(f, index, data)])
            except CacheUnavailable:
                pass
        # Counted here, on the event loop, so no two threads race on a counter.
        self.counters.store_reads += 1
        self.counters.store_bytes += len(data)
        return data

    async def call_store(self, store, what: str, fn, *args, progress: bool = False):
        """Run a blocking store call in a worker thread, bounded in time.

        On timeout the thread is abandoned (a hung NFS call cannot be
        interrupted) and keeps its limiter slot until it returns, so a dead
        store can tie up at most the limiter's worth of threads. A store that
        just timed out fails further calls at once until `store_timeout` has
        passed, so a reader whose request the kernel retries (readahead) waits
        one timeout, not several; the next call after that tries again.
        With `progress`, fn gets a callable as its last argument and calls it
        whenever it makes progress: then the limit applies to each stretch
        without progress, so a long listing that keeps answering finishes
        (and never marks the store as silent).
        `what` names the file or directory in errors and logs.
        """
        silent_since = self._unresponsive.get(store.root)
        if silent_since is not None:
            if trio.current_time() - silent_since < self.store_timeout:
                raise StoreUnavailable(f"{what}: the store did not answer within "
                                       f"{self.store_timeout:g}s moments ago")
            del self._unresponsive[store.root]
        try:
            done, result = await self._in_thread(fn, args, self.store_limiter,
                                                 self.store_timeout, progress)
        except LazyFSError as e:
            raise type(e)(e.args[0] if what in e.args[0] else f"{what}: {e.args[0]}") from None
        if done:
            return result
        self._unresponsive[store.root] = trio.current_time()
        raise StoreUnavailable(f"{what}: no answer from the store within {self.store_timeout:g}s")

    async def call_local(self, fn, *args):
        """Run blocking local work (index, block files) in a worker thread,
        bounded by `local_timeout`.

        A cache disk that does not answer in time (NFS or FUSE under the cache
        directory, stalled) raises CacheUnavailable, and keeps raising it at
        once for `local_timeout`, then one call tries again: callers treat it
        as a miss (read from the store), a lost write or lost bookkeeping.
        Said once in the log when it starts, once when it ends.
        """
        silent_since = self._cache_silent_since
        if silent_since is not None and trio.current_time() - silent_since < self.local_timeout:
            raise CacheUnavailable(f"the cache disk did not answer within "
                                   f"{self.local_timeout:g}s moments ago")
        done, result = await self._in_thread(fn, args, self.local_limiter, self.local_timeout)
        if done:
            if self._cache_silent_since is not None:
                self._cache_silent_since = None
                log.info("the cache disk at %s answers again", self._cache_dir)
            return result
        if self._cache_silent_since is None:
            log.warning("the cache disk at %s did not answer within %gs; serving from the "
                        "store until it does", self._cache_dir, self.local_timeout)
        self._cache_silent_since = trio.current_time()
        raise CacheUnavailable(f"the cache disk did not answer within {self.local_timeout:g}s")

    @property
    def _cache_dir(self) -> str:
        return os.path.dirname(self.blocks.blocks_dir)

    @staticmethod
    async def _in_thread(fn, args, limiter: trio.CapacityLimiter, wait: float,
                         progress: bool = False) -> tuple[bool, object]:
        """(True, fn(*args)) from a worker thread, or (False, None) once it has
        taken `wait` seconds (without progress, with `progress`): the thread
        is abandoned then, and keeps its limiter slot until it returns."""
        with trio.CancelScope(deadline=trio.current_time() + wait) as scope:
            if progress:
                args = (*args, _Heartbeat(scope, wait))
            return True, await trio.to_thread.run_sync(fn, *args, limiter=limiter,
                                                       abandon_on_cancel=True)
        return False, None

    def _fetch_sync(self, f: FileVersion, index: int) -> bytes:
        data = self._read_store(f, index)
        if not self.cache_may_stall:
            self._keep_each([(f, index, data)])  # in the same hop: a local disk answers
        return data

    def _read_store(self, f: FileVersion, index: int, size: int | None = None) -> bytes:
        """Block `index` of the file, or `size` bytes from its start on."""
        try:
            return f.store.read(f.relpath, f.identity, index * self.blocks.block_size,
                                self._block_length(f, index) if size is None else size)
        except NotFound as e:
            # The index lists this file, so the store lost it or is not mounted:
            # a read error (EIO), not "no such file" for a file just listed.
            raise StoreUnavailable(f"{e.args[0]} (it is in the index)") from None

    def _keep_each(self, blocks: list[tuple[FileVersion, int, bytes]]) -> None:
        """Write fetched blocks to the cache, a file's in one open (blocking)."""
        by_file: dict[str, tuple[FileVersion, list]] = {}
        for f, index, data in blocks:
            by_file.setdefault(f.key, (f, []))[1].append((index, data))
        for f, file_blocks in by_file.values():
            self._keep(f, file_blocks)

    def _keep(self, f: FileVersion, blocks: list[tuple[int, bytes]]) -> None:
        try:
            self.blocks.write_many(f.key, blocks)
            self._cache_writable = True
        except UntrustedCache as e:
            log.warning("not writing to the block cache (%s); serving %s from the store",
                        e, f.display)
        except OSError as e:
            # A full or broken cache disk must not fail the read: serve from the store.
            if self._cache_writable or e.errno != errno.ENOSPC:
                log.warning("cannot write to the block cache (%s); serving %s from the store",
                            e.strerror, f.display)
            self._cache_writable = False
