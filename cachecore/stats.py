"""Counters the running mount keeps, and a latency histogram that merges.

A snapshot is plain ints (and a bucket list) so it can be stored as JSON in
the index and added to the totals of earlier runs: the histogram has fixed
log-spaced buckets, so percentiles survive restarts and can be summed over
mounts.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

# Bucket upper bounds in seconds: 25 us .. ~105 s, four buckets per doubling.
LATENCY_BOUNDS = [25e-6 * 2 ** (i / 4) for i in range(89)]
PERCENTILES = (0.5, 0.95, 0.99)  # of fetch latency, as `stats` shows them


@dataclass
class Counters:
    cache_hits: int = 0       # blocks served from the local block cache
    cache_misses: int = 0     # blocks a reader had to wait for the store for
    prefetch_blocks: int = 0  # blocks fetched ahead of any reader
    store_reads: int = 0      # block reads issued to the store
    store_bytes: int = 0      # bytes those reads returned
    store_listings: int = 0   # directory listings fetched from the store
    bytes_served: int = 0     # bytes returned to readers
    errors: int = 0           # requests that failed with a store error
    replay_blocks: int = 0    # blocks a trace replay fetched from the store
    replay_bytes: int = 0     # bytes those fetches returned
    replay_useful: int = 0    # replayed blocks a reader then read
    replay_skipped: int = 0   # traced files skipped: changed or gone in the store
    fetch_time_us: int = 0    # microseconds the fetches in fetch_latency took, summed
    fetch_latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))

    def record_latency(self, seconds: float) -> None:
        self.fetch_latency[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.fetch_time_us += round(seconds * 1e6)

    def snapshot(self) -> dict[str, int]:
        """The plain counters (what the live stats xattr shows)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fetch_latency"}
        # replayed blocks no reader has read (yet): the replay's waste
        plain["replay_waste"] = self.replay_blocks - self.replay_useful
        return plain

    def to_record(self) -> dict:
        return {**self.snapshot(), "fetch_latency": list(self.fetch_latency)}

    @classmethod
    def from_record(cls, record: dict) -> Counters:
        c = cls()
        for f in fields(cls):
            if f.name in record:
                setattr(c, f.name, list(record[f.name]) if f.name == "fetch_latency"
                        else int(record[f.name]))
        if len(c.fetch_latency) != len(LATENCY_BOUNDS) + 1:
            c.fetch_latency = [0] * (len(LATENCY_BOUNDS) + 1)
        return c

    def __add__(self, other: Counters) -> Counters:
        total = Counters()
        for f in fields(self):
            if f.name == "fetch_latency":
                total.fetch_latency = [a + b for a, b in zip(self.fetch_latency, other.fetch_latency)]
            else:
                setattr(total, f.name, getattr(self, f.name) + getattr(other, f.name))
        return total

    @property
    def hit_ratio(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None

    def latency_percentile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-th quantile (seconds), or None."""
        total = sum(self.fetch_latency)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.fetch_latency):
            seen += n
            if seen >= rank and n:
                return LATENCY_BOUNDS[min(i, len(LATENCY_BOUNDS) - 1)]
        return LATENCY_BOUNDS[-1]

    def summary(self) -> dict:
        """Everything `rez-lazyfs stats` shows, for the table and for --json."""
        p = {f"fetch_p{int(q * 100)}_ms": (None if (v := self.latency_percentile(q)) is None
                                            else round(v * 1000, 3))
             for q in PERCENTILES}
        ratio = self.hit_ratio
        return {**self.snapshot(), "hit_ratio": None if ratio is None else round(ratio, 4), **p}
