"""The cache directory as a whole: index + block cache, and the repositories
built on them. The daemon and the offline commands (bake, populate, seed)
open it the same way, so they share every rule."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass

import trio

from .blocks import BlockCache, BlockMac
from .cachedir import cache_secret, check_tree
from .clean import clean_cache, scan_cache
from .errors import CacheUnavailable
from .fetcher import Fetcher
from .index import MetadataIndex
from .replay import IndexTraces, TraceDirectory
from .repository import RepoPolicy, Repository
from .stats import Counters
from .stores import Store, open_store

log = logging.getLogger(__name__)
DEFAULT_BLOCK_SIZE = 128 * 1024  # measured: tests/bench/results/block_size.md
# When the cache passes its limit, clean down to this fraction of it, so the
# next clean is not due after a few more blocks.
CLEAN_TARGET = 0.9

class BlockSizeMismatch(ValueError):
    pass


@dataclass(frozen=True)
class RepoSpec:
    alias: str
    path: str              # a store directory or a published image's URL (stores/__init__.py)
    mutable: bool = False
    public_key: str = ""   # published images
    proxy: str = ""
    traces: str = ""       # a directory of launch traces (cachecore/replay.py)


# The directories of a cache, checked (cachedir.py) before anything in them is read.
CACHE_SUBDIRS = ("index", os.path.join("index", "ledger"), "blocks")


def open_blocks(directory: str, block_size: int, *, create: bool = True,
                kind: type[BlockCache] = BlockCache, **extra) -> BlockCache:
    """The block cache (of `kind`) of a checked cache directory, keyed with its secret."""
    return kind(directory, block_size, BlockMac(cache_secret(directory, create=create)),
                create=create, **extra)


class LocalCache:
    def __init__(self, directory: str, block_size: int | None = None):
        """block_size None: the size the cache was created with (else the default).
        A cache keeps one block size for life: blocks of another size would
        all miss, so asking for a different one is an error, not a silent miss.
        A directory that others could have written is refused (UntrustedCache)."""
        self.directory = directory
        check_tree(directory, CACHE_SUBDIRS, create=True)
        self.index = MetadataIndex(os.path.join(directory, "index"))
        recorded = self.index.get_text("block_size")
        if recorded is None:
            recorded = str(block_size or DEFAULT_BLOCK_SIZE)
            self.index.set_text("block_size", recorded)
        if block_size and block_size != int(recorded):
            self.index.close()
            raise BlockSizeMismatch(f"the cache {directory} uses {int(recorded) // 1024}K blocks, "
                                    f"not {block_size // 1024}K (use another cache directory "
                                    "for another block size)")
        self.blocks = open_blocks(directory, int(recorded))
        try:
            self.blocks.check_shards()
        except BaseException:
            self.close()
            raise
        self.counters = Counters()
        self.fetcher: Fetcher | None = None
        self._stores: list[Store] = []

    def close(self) -> None:
        self.index.close()
        self.blocks.close()

    # -- totals kept across restarts -------------------------------------------
    def stored_totals(self) -> dict[str, dict]:
        """Per mount (or command): {"counters": ..., "pid": ..., "updated": ...}."""
        return {name: json.loads(text) for name, text in self.index.records("s").items()}

    def totals_of(self, name: str) -> Counters:
        record = self.stored_totals().get(name)
        return Counters.from_record(record["counters"]) if record else Counters()

    async def flush(self, name: str, base: Counters) -> None:
        """Write noted uses and the totals (earlier runs + this one) to the index.

        Bookkeeping only: on a full or broken cache disk it logs and carries on
        (the uses are lost; clean falls back to file times)."""
        record = json.dumps({"counters": (base + self.counters).to_record(),
                             "pid": os.getpid(), "updated": time.time()})
        try:
            if self.fetcher is not None:
                await self.fetcher.flush_uses(self.index)
                await self.fetcher.call_local(self.index.set_record, "s", name, record)
            else:
                await trio.to_thread.run_sync(self.index.set_record, "s", name, record)
        except CacheUnavailable:
            pass  # said once by the fetcher; written by a later flush
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot record usage and totals in the index: %s", e)

    async def maintain(self, name: str, base: Counters, cache_limit: int,
                       interval: float = 2.0) -> None:
        """Runs for the life of a mount: flushes usage and totals, and cleans
        the cache when it grows past its limit."""
        limiter = trio.CapacityLimiter(1)  # one clean at a time, beside the read threads
        if cache_limit:
            await self._measure(cache_limit, limiter)
        while True:
            await trio.sleep(interval)
            await self.flush(name, base)
            for holder in (*self._stores, self.blocks):
                # Abandoned at unmount: a close can wait on a stalled store or cache disk.
                await trio.to_thread.run_sync(holder.close_idle, abandon_on_cancel=True)
            if cache_limit and self._room() < 0:
                report = await trio.to_thread.run_sync(
                    lambda: clean_cache(self.blocks, self.index,
                                        max_size=int(cache_limit * CLEAN_TARGET)),
                    limiter=limiter)
                self._sized = (cache_limit, report.size_after, self.counters.store_bytes)

    async def _measure(self, cache_limit: int, limiter) -> None:
        fetched = self.counters.store_bytes
        size = await trio.to_thread.run_sync(
            lambda: sum(f.bytes for f in scan_cache(self.blocks, self.index).values()),
            limiter=limiter)
        self._sized = (cache_limit, size, fetched)
        if self.fetcher is not None:
            self.fetcher.cache_room = self._room

    def _room(self) -> int:
        """Bytes left below the limit: the size measured, plus what was fetched since."""
        limit, size, fetched = self._sized
        return limit - size - (self.counters.store_bytes - fetched)

    def repositories(self, specs: list[RepoSpec], *, metadata_ttl: float, store_timeout: float,
                     store_threads: int = 16, offline: bool = False,
                     prefetch_max_size: int = 0,
                     cache_may_stall: bool = False,
                     permission_ttl: float = 0.0,
                     stores: dict[str, Store] | None = None) -> dict[str, Repository]:
        """One Repository per spec, sharing one fetcher. Call inside trio.run.
        cache_may_stall: see Fetcher. stores: by alias, stores the caller
        opened itself (one under a transparent mount is reached by a
        descriptor: cachecore/store.py), used instead of opening the spec's."""
        fetcher = self.fetcher = Fetcher(self.blocks, self.counters,
                          store_limiter=trio.CapacityLimiter(store_threads),
                          local_limiter=trio.CapacityLimiter(8),
                          store_timeout=store_timeout, cache_may_stall=cache_may_stall)
        repos = {}
        for s in specs:
            store = (stores or {}).get(s.alias) or open_store(
                s, offline=offline, index=self.index, timeout=store_timeout)
            repos[s.alias] = Repository(
                s.alias, store, self.index, fetcher,
                RepoPolicy(metadata_ttl, s.mutable, prefetch_max_size=prefetch_max_size,
                           permission_ttl=permission_ttl),
                trace_sources=self._trace_sources(s, store))
        self._stores = [r.store for r in repos.values()]
        return repos

    def _trace_sources(self, spec: RepoSpec, store: Store) -> list:
        """Where a repository's launch traces come from (cachecore/replay.py)."""
        sources = [IndexTraces(self.index, store.root)]
        if spec.traces:
            sources.append(TraceDirectory(spec.traces))
        if (own := store.traces()) is not None:
            sources.append(own)
        return sources

    def recorded_repos(self) -> list[RepoSpec]:
        """The repositories this cache has served, so an offline mount needs no --repo."""
        raw = self.index.get_text("repos")
        return [RepoSpec(**r) for r in json.loads(raw)] if raw else []

    def record_repos(self, specs: list[RepoSpec]) -> None:
        known = {s.alias: s for s in self.recorded_repos()}
        known.update({s.alias: s for s in specs})
        self.index.set_text("repos", json.dumps([vars(s) for s in known.values()]))
