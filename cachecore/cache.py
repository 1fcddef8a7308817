"""The cache directory as a whole: index + block cache, and the repositories
built on them. The daemon and the offline commands (bake, populate, seed)
open it the same way, so they share every rule."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import trio

from .blocks import BlockCache
from .fetcher import Fetcher
from .index import MetadataIndex
from .repository import RepoPolicy, Repository
from .stats import Counters
from .store import FilesystemStore

@dataclass(frozen=True)
class RepoSpec:
    alias: str
    path: str
    mutable: bool = False


class LocalCache:
    def __init__(self, directory: str, block_size: int):
        self.directory = directory
        self.index = MetadataIndex(os.path.join(directory, "index"))
        self.blocks = BlockCache(directory, block_size)
        self.counters = Counters()

    def close(self) -> None:
        self.index.close()

    def repositories(self, specs: list[RepoSpec], *, metadata_ttl: float, store_timeout: float,
                     store_threads: int = 16, offline: bool = False) -> dict[str, Repository]:
        """One Repository per spec, sharing one fetcher. Call inside trio.run."""
        fetcher = Fetcher(self.blocks, self.counters,
                          store_limiter=trio.CapacityLimiter(store_threads),
                          local_limiter=trio.CapacityLimiter(8),
                          store_timeout=store_timeout)
        return {s.alias: Repository(s.alias, FilesystemStore(s.path, offline=offline), self.index,
                                    fetcher, RepoPolicy(metadata_ttl, s.mutable))
                for s in specs}

    def recorded_repos(self) -> list[RepoSpec]:
        """The repositories this cache has served, so an offline mount needs no --repo."""
        raw = self.index.get_text("repos")
        return [RepoSpec(**r) for r in json.loads(raw)] if raw else []

    def record_repos(self, specs: list[RepoSpec]) -> None:
        known = {s.alias: s for s in self.recorded_repos()}
        known.update({s.alias: s for s in specs})
        self.index.set_text("repos", json.dumps([vars(s) for s in known.values()]))
