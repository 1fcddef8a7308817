"""`rez-lazyfs stats --prometheus`: the figures of `stats --json` in the
Prometheus text format, for node_exporter's textfile collector.

prometheus_client formats them, from one collector over what
admin.stats_sources gathered, so they are the numbers `--json` shows. Every
series is labelled with the cache directory and the source (the name `stats`
gives it: "mount:MOUNTPOINT", "bake", "populate"), so the files written for
two caches on one node never hold the same series. The total row of `stats`
is not exported: it is sum() over the sources, which PromQL does.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cachecore.stats import LATENCY_BOUNDS, PERCENTILES

from .admin import StatsSource, stats_sources
from .config import Settings
from .errors import UserError

PREFIX = "rez_lazyfs_"
LABELS = ["cache", "source"]

# Counters fields, as Prometheus counters: metric name (before _total), help.
COUNTERS = {
    "cache_hits": ("cache_hits", "Blocks read from the local block cache."),
    "cache_misses": ("cache_misses", "Blocks readers had to wait for the store for."),
    "prefetch_blocks": ("prefetch_blocks", "Blocks fetched ahead of any reader."),
    "store_reads": ("store_reads", "Block reads from the store."),
    "store_bytes": ("store_bytes", "Bytes the block reads from the store returned."),
    "store_listings": ("store_listings", "Directory listings fetched from the store."),
    "bytes_served": ("served_bytes", "Bytes returned to readers."),
    "errors": ("errors", "Requests that failed with a store error."),
    "replay_blocks": ("replay_blocks", "Blocks launch trace replays fetched from the store."),
    "replay_bytes": ("replay_bytes", "Bytes those replayed fetches returned."),
    "replay_useful": ("replay_useful_blocks", "Replayed blocks a reader then read."),
    "replay_skipped": ("replay_skipped_files",
                       "Traced files replays skipped: changed or gone in the store."),
}

# A published image's own counters (stats --json: sources[].stores[ALIAS]).
HTTP_COUNTERS = {
    "requests": ("http_requests", "HTTP requests sent for a published image."),
    "bytes": ("http_bytes", "Bytes received for a published image, headers and bodies."),
    "failures": ("http_failures", "HTTP requests that failed."),
    "failovers": ("http_failovers", "Requests that moved on to another proxy or the origin."),
    "joined": ("http_joined", "Gets that waited for another's transfer of the same object."),
    "unavailable": ("http_unavailable", "Gets that no proxy nor the origin answered."),
}
ROUTE_COUNTERS = {  # the same per route: a proxy, or DIRECT
    "requests": ("http_route_requests", "HTTP requests sent through this route."),
    "bytes": ("http_route_bytes", "Bytes received through this route."),
    "failures": ("http_route_failures", "HTTP requests through this route that failed."),
}

# The histogram's buckets, one per doubling: every fourth of the bounds the
# counters keep (four per doubling), so each bucket's count is exact, at a
# quarter of the series per source.
BUCKETS = range(0, len(LATENCY_BOUNDS), 4)


class StatsCollector:
    """The figures of one cache's sources as metric families."""

    def __init__(self, cache_dir: str, sources: dict[str, StatsSource]):
        self.cache_dir, self.sources = cache_dir, sources

    def collect(self):
        def counter(name, help_text, labels=LABELS):
            return CounterMetricFamily(PREFIX + name, help_text, labels=labels)

        def gauge(name, help_text, labels=LABELS):
            return GaugeMetricFamily(PREFIX + name, help_text, labels=labels)

        counters = {field: counter(*spec) for field, spec in COUNTERS.items()}
        store_labels = [*LABELS, "repo"]
        http = {key: counter(*spec, store_labels) for key, spec in HTTP_COUNTERS.items()}
        route_labels = [*store_labels, "route"]
        routes = {key: counter(*spec, route_labels) for key, spec in ROUTE_COUNTERS.items()}
        backoff = gauge("http_route_backoff_seconds",
                        "Seconds this route stays passed over after failing (0: in use).",
                        route_labels)
        waste = gauge("replay_waste_blocks", "Replayed blocks no reader has read (yet).")
        ratio = gauge("hit_ratio", "Block cache hits over hits and misses.")
        percentiles = gauge("fetch_latency_percentile_seconds",
                            "Fetch latency percentiles over the source's life (bucket upper "
                            "bounds), as `stats` shows them.", [*LABELS, "quantile"])
        latency = HistogramMetricFamily(PREFIX + "fetch_latency_seconds",
                                        "Seconds block reads from the store took.",
                                        labels=LABELS)
        running = gauge("running", "1 if the source is a running mount (figures asked live).")
        saved = gauge("saved_timestamp_seconds", "When the source's figures were last saved.")
        for name, source in self.sources.items():
            labels = [self.cache_dir, name]
            c = source.counters
            snapshot = c.snapshot()
            for field, family in counters.items():
                family.add_metric(labels, snapshot[field])
            waste.add_metric(labels, snapshot["replay_waste"])
            if c.hit_ratio is not None:
                ratio.add_metric(labels, c.hit_ratio)
            for q in PERCENTILES:
                if (seconds := c.latency_percentile(q)) is not None:
                    percentiles.add_metric([*labels, str(q)], seconds)
            latency.add_metric(labels, [(repr(LATENCY_BOUNDS[i]), sum(c.fetch_latency[:i + 1]))
                                        for i in BUCKETS] + [("+Inf", sum(c.fetch_latency))],
                               c.fetch_time_us / 1e6)
            running.add_metric(labels, int(source.running))
            if source.updated is not None:
                saved.add_metric(labels, source.updated)
            for alias, traffic in sorted(source.stores.items()):
                for key, family in http.items():
                    family.add_metric([*labels, alias], traffic[key])
                for route, figures in sorted(traffic["routes"].items()):
                    for key, family in routes.items():
                        family.add_metric([*labels, alias, route], figures[key])
                    backoff.add_metric([*labels, alias, route], figures["backoff_left"])
        families = [*counters.values(), waste, ratio, latency, percentiles, running, saved,
                    *http.values(), *routes.values(), backoff]
        yield from (f for f in families if f.samples)


def stats_registry(settings: Settings) -> tuple[CollectorRegistry, list[str]]:
    """A registry holding the cache's figures, gathered now, and the warnings
    about mounts that did not answer (their figures are their last saved)."""
    sources, warnings = stats_sources(settings)
    registry = CollectorRegistry()
    registry.register(StatsCollector(settings.cache_dir, sources))
    return registry, warnings


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """The exposition written to PATH.PID.TID, then renamed over PATH: the
    textfile collector, which reads *.prom only, never sees half a file."""
    try:
        write_to_textfile(path, registry)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
