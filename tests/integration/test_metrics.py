"""Issue 14, items 2 and 5: what a farm's monitoring sees of a mount.

* The daemon's process title names its mount and repositories (ps, top,
  systemctl status), its process name says rez-lazyfs, and commands still
  find the daemon serving a mount by it.
* `rez-lazyfs stats --prometheus` (and `--output FILE`, atomically) gives the
  numbers of `stats --json`, per source and, for published images, per
  repository and route, parsed back with prometheus_client's own parser.

Real mounts, real reads; for the image, real nginx and squid.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachecore.stats import LATENCY_BOUNDS
from helpers.faults import lazyfs_mount_at_fixture
from helpers.http import nginx_origin_fixture, squid_proxy_fixture
from helpers.mounts import LAZYFS, is_daemon
from helpers.trees import KiB, deterministic_bytes, write_file, write_rez_package
from helpers.workload import LazyfsCommands, read_whole, source_named
from mount.mounts import serving_process

FIXTURES = (lazyfs_mount_at_fixture, nginx_origin_fixture, squid_proxy_fixture)

# What --json calls each figure, and the Prometheus series that carries it.
COUNTERS = {
    "cache_hits": "rez_lazyfs_cache_hits_total",
    "cache_misses": "rez_lazyfs_cache_misses_total",
    "prefetch_blocks": "rez_lazyfs_prefetch_blocks_total",
    "store_reads": "rez_lazyfs_store_reads_total",
    "store_bytes": "rez_lazyfs_store_bytes_total",
    "store_listings": "rez_lazyfs_store_listings_total",
    "bytes_served": "rez_lazyfs_served_bytes_total",
    "errors": "rez_lazyfs_errors_total",
    "replay_blocks": "rez_lazyfs_replay_blocks_total",
    "replay_bytes": "rez_lazyfs_replay_bytes_total",
    "replay_useful": "rez_lazyfs_replay_useful_blocks_total",
    "replay_skipped": "rez_lazyfs_replay_skipped_files_total",
}
GAUGES = {"replay_waste": "rez_lazyfs_replay_waste_blocks", "running": "rez_lazyfs_running"}
PERCENTILES = {"fetch_p50_ms": "0.5", "fetch_p95_ms": "0.95", "fetch_p99_ms": "0.99"}
HTTP_COUNTERS = {
    "requests": "rez_lazyfs_http_requests_total",
    "bytes": "rez_lazyfs_http_bytes_total",
    "failures": "rez_lazyfs_http_failures_total",
    "failovers": "rez_lazyfs_http_failovers_total",
    "joined": "rez_lazyfs_http_joined_total",
    "unavailable": "rez_lazyfs_http_unavailable_total",
}
ROUTE_COUNTERS = {
    "requests": "rez_lazyfs_http_route_requests_total",
    "bytes": "rez_lazyfs_http_route_bytes_total",
    "failures": "rez_lazyfs_http_route_failures_total",
}
LATENCY = "rez_lazyfs_fetch_latency_seconds"


class Exposition:
    """A Prometheus text exposition, parsed by prometheus_client: each
    sample's value and its family's type, by sample name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.values: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.values, f"{sample} twice"
                self.values[key] = sample.value
                self.types[sample.name] = family.type

    def value(self, name: str, **labels) -> float | None:
        """The sample's value; None if there is none (a figure --json gives as null)."""
        return self.values.get((name, frozenset(labels.items())))

    def label_values(self, label: str) -> set[str]:
        return {dict(labels)[label] for _, labels in self.values if label in dict(labels)}


def prometheus(cli: LazyfsCommands) -> Exposition:
    return Exposition(cli.run("stats", "--prometheus"))


def assert_same_figures(shown: Exposition, stats: dict) -> None:
    """Every figure --json gives per source is the one the exposition gives."""
    assert shown.label_values("cache") == {stats["cache_dir"]}
    assert shown.label_values("source") == {s["name"] for s in stats["sources"]}
    for source in stats["sources"]:
        labels = {"cache": stats["cache_dir"], "source": source["name"]}
        for key, name in COUNTERS.items():
            assert shown.types[name] == "counter", name
            assert shown.value(name, **labels) == source[key], (name, source)
        for key, name in GAUGES.items():
            assert shown.types[name] == "gauge", name
            assert shown.value(name, **labels) == source[key], (name, source)
        ratio = shown.value("rez_lazyfs_hit_ratio", **labels)
        assert (ratio if ratio is None else round(ratio, 4)) == source["hit_ratio"], source
        for key, quantile in PERCENTILES.items():
            seconds = shown.value("rez_lazyfs_fetch_latency_percentile_seconds", **labels,
                                  quantile=quantile)
            assert (seconds if seconds is None else round(seconds * 1000, 3)) == source[key], \
                (key, seconds, source)
        assert_latency_histogram(shown, labels, source)
        for alias, traffic in source.get("stores", {}).items():
            for key, name in HTTP_COUNTERS.items():
                assert shown.value(name, **labels, repo=alias) == traffic[key], (name, traffic)
            for route, figures in traffic["routes"].items():
                for key, name in ROUTE_COUNTERS.items():
                    assert shown.value(name, **labels, repo=alias, route=route) == figures[key]
                assert shown.value("rez_lazyfs_http_route_backoff_seconds", **labels, repo=alias,
                                   route=route) == figures["backoff_left"]


def assert_latency_histogram(shown: Exposition, labels: dict, source: dict) -> None:
    """A real histogram: a bucket per doubling of the counted bounds, its
    count the store's block reads, its sum the fetch time, and the
    percentiles --json gives inside the buckets that hold those ranks."""
    assert shown.types[LATENCY + "_bucket"] == "histogram"
    bounds = [repr(b) for b in LATENCY_BOUNDS[::4]] + ["+Inf"]
    assert float(bounds[0]) == 25e-6 and 100 < float(bounds[-2]) < 110
    cumulative = [shown.value(LATENCY + "_bucket", **labels, le=le) for le in bounds]
    assert cumulative == sorted(cumulative)
    count = shown.value(LATENCY + "_count", **labels)
    assert count == cumulative[-1] == source["store_reads"]
    assert shown.value(LATENCY + "_sum", **labels) == pytest.approx(source["fetch_time_us"] / 1e6)
    for key, quantile in PERCENTILES.items() if count else ():
        rank = float(quantile) * count
        i = next(i for i, n in enumerate(cumulative) if n >= rank)
        seconds = source[key] / 1000
        assert (float(bounds[i - 1]) if i else 0) < seconds <= float(bounds[i]) * 1.001, \
            (key, source[key], bounds[i])


# 1. The process title -------------------------------------------------------------
def test_the_daemon_is_named_after_its_mount_and_repositories(tmp_path, lazyfs_mount_at):
    base = Path(os.path.realpath(tmp_path))
    main, dev = base / "store", base / "dev store"  # a space: written as the mount table does
    write_file(main / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(dev / "tool/2.0/package.py", "name = 'tool'\n")
    mountpoint = base / "lazy mount"
    m = lazyfs_mount_at.at(mountpoint, {"main": main, "dev": dev}, cache=base / "cache")
    # Found by the marker in its environment: setting the title left that as it was.
    [pid] = [p for p in m.daemon_pids() if is_daemon(p)]

    title = f"rez-lazyfs mount {base}/lazy\\040mount main={main} dev={base}/dev\\040store"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().rstrip(b"\0") == title.encode()
    ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True,
                        text=True, check=True)
    assert ps.stdout.strip() == title
    with open(f"/proc/{pid}/comm") as f:
        assert f.read() == "rez-lazyfs\n"  # what top shows, and the journal's _COMM

    # What commands say about a mount that does not answer names this daemon.
    found = serving_process(str(mountpoint), os.getpid())
    assert found is not None and found[0] == pid
    assert serving_process(str(base / "lazy"), os.getpid()) is None


# 2. The figures ---------------------------------------------------------------------
def test_prometheus_figures_are_the_json_figures(tmp_path, lazyfs_mount_at):
    store = tmp_path / "store"
    files = {f"fam/1.0/lib/f{i}.bin": deterministic_bytes(100 * KiB + i, seed=i) for i in range(4)}
    for rel, data in files.items():
        write_file(store / rel, data)
    cache = tmp_path / "cache"
    cli = LazyfsCommands(tmp_path / "commands", cache)

    first = lazyfs_mount_at.at(tmp_path / "first", {"main": store}, cache=cache)
    for rel in list(files)[:2]:
        assert read_whole(first.repo_path("main") / rel) == files[rel]
    first.unmount()  # its figures are the ones it saved
    second = lazyfs_mount_at.at(tmp_path / "second", {"main": store}, cache=cache)
    for rel, data in files.items():  # two from the cache, two from the store
        assert read_whole(second.repo_path("main") / rel) == data

    stats = cli.stats()
    assert {s["name"]: s["running"] for s in stats["sources"]} == {
        f"mount:{first.path}": False, f"mount:{second.path}": True}
    running = next(s for s in stats["sources"] if s["running"])
    assert running["cache_hits"] == 4 and running["cache_misses"] == 4, running
    shown = prometheus(cli)
    assert_same_figures(shown, stats)
    assert shown.value("rez_lazyfs_saved_timestamp_seconds", cache=str(cache),
                       source=f"mount:{first.path}") \
        == source_named(stats, f"mount:{first.path}")["updated"]

    # --output: the same text, written beside FILE and renamed over it.
    out = tmp_path / "textfile" / "rez_lazyfs.prom"
    out.parent.mkdir()
    out.write_text("old\n")
    replaced = out.stat().st_ino
    cli.run("stats", "--output", out)
    assert out.stat().st_ino != replaced, "FILE was written in place, not renamed over"
    assert os.listdir(out.parent) == [out.name]
    assert_same_figures(Exposition(out.read_text()), stats)


def test_prometheus_with_json_or_an_unwritable_file_is_one_line(tmp_path, lazyfs_mount_at):
    store = tmp_path / "store"
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    m = lazyfs_mount_at.at(tmp_path / "mnt", {"main": store}, cache=tmp_path / "cache")
    for args, said in ((["--prometheus", "--json"], "--json"),
                       (["--output", tmp_path / "missing/m.prom"], "cannot write")):
        result = subprocess.run([str(LAZYFS), "stats", "--cache", str(m.cache), *map(str, args)],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=60)
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.startswith("rez-lazyfs: error: ") and said in result.stderr, result
        assert len(result.stderr.splitlines()) == 1, result.stderr


# 3. A published image's own traffic, per repository and proxy -----------------------
def test_prometheus_figures_of_a_published_image(tmp_path, nginx_origin, squid_proxy,
                                                 lazyfs_mount_at):
    store = tmp_path / "store"
    files = {f"share/f{i}.bin": deterministic_bytes(80 * KiB + i, seed=20 + i) for i in range(6)}
    write_rez_package(store, "pkg", "1.0", files=files)
    origin, proxy = nginx_origin(), squid_proxy()
    key = tmp_path / "signing.key"
    for args in (["keygen", key], ["publish", store, origin.root, "--key", key]):
        subprocess.run([str(LAZYFS), *map(str, args)], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    origin.reload()
    # A long metadata TTL: no revalidation between the two `stats` runs.
    m = lazyfs_mount_at.at(tmp_path / "mnt", {"main": origin.url}, cache=tmp_path / "cache",
                           metadata_ttl=3600,
                           extra_args=("--public-key", f"{key}.pub", "--proxy", proxy.url))
    for rel, data in files.items():
        assert read_whole(m.repo_path("main") / "pkg/1.0" / rel) == data

    cli = LazyfsCommands(tmp_path / "commands", m.cache)
    stats = cli.stats()
    [source] = stats["sources"]
    traffic = source["stores"]["main"]
    assert traffic["requests"] > 0 and traffic["routes"][proxy.url]["requests"] > 0, traffic
    shown = prometheus(cli)
    assert_same_figures(shown, stats)
    assert shown.label_values("route") == {proxy.url}
    assert json.loads(os.getxattr(m.path, "user.rezlazyfs.stats"))["stores"]["main"]["requests"] \
        == traffic["requests"]
