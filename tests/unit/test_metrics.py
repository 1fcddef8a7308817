"""The fetch latency histogram of `stats --prometheus`, from counters whose
observations are known: each bucket holds exactly the fetches at or below
its bound (what the Prometheus `le` means), the sum is the time they took.
(tests/integration/test_metrics.py compares every figure with `--json` on
real mounts.)"""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachecore.stats import Counters
from mount.admin import StatsSource
from mount.metrics import StatsCollector


def test_latency_buckets_hold_the_fetches_at_or_below_their_bound():
    fetches = [20e-6, 25e-6, 26e-6, 0.0004, 0.00041, 1.0, 200.0]  # bounds included: le
    counters = Counters()
    for seconds in fetches:
        counters.record_latency(seconds)
    registry = CollectorRegistry()
    registry.register(StatsCollector("/cache", {"mount:/m": StatsSource(counters, True, 1.0, {})}))
    [latency] = [f for f in text_string_to_metric_families(generate_latest(registry).decode())
                 if f.name == "rez_lazyfs_fetch_latency_seconds"]
    assert latency.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in latency.samples}
    buckets = {le: v for (name, le), v in samples.items() if name.endswith("_bucket")}
    assert len(buckets) == 24  # one per doubling from 25 us to ~105 s, and +Inf
    assert {le: buckets[le] for le in ("2.5e-05", "5e-05", "0.0002", "0.0004", "0.0008",
                                       "0.8192", "1.6384", "104.8576", "+Inf")} == {
        "2.5e-05": 2, "5e-05": 3, "0.0002": 3, "0.0004": 4, "0.0008": 5,
        "0.8192": 5, "1.6384": 6, "104.8576": 6, "+Inf": 7}
    assert samples[("rez_lazyfs_fetch_latency_seconds_count", None)] == len(fetches)
    assert samples[("rez_lazyfs_fetch_latency_seconds_sum", None)] == pytest.approx(sum(fetches))
