"""Counters the running mount keeps; a snapshot is plain ints for JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    cache_hits: int = 0       # blocks served from the local block cache
    cache_misses: int = 0     # blocks that had to come from the store
    store_reads: int = 0      # block reads issued to the store
    store_bytes: int = 0      # bytes those reads returned
    store_listings: int = 0   # directory listings fetched from the store
    bytes_served: int = 0     # bytes returned to readers of the mount
    errors: int = 0           # requests that failed with a store error

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
