"""Cache management, end to end (issue 4): `status`, `stats`, `clean` and
`logs` of the real CLI, run against caches filled by real mounts, and the
extended attributes inside the mount.

Every figure is predicted from the workload that made it: reads are issued
so that the daemon sees exactly the blocks scripted (helpers.workload), and
the block cache is also measured from the outside (its files on disk).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cachecore.store import DIR_AGE
from helpers.mounts import LazyMount
from helpers.rezrepo import Rez, build_store
from helpers.trees import KiB
from helpers.workload import (
    MAINTENANCE_INTERVAL,
    HashingReader,
    LazyfsCommands,
    assert_size_shows,
    blocks_of,
    disk_usage,
    drop_page_cache,
    parse_table,
    read_range,
    read_whole,
    row_of,
    sha256,
    size_on_disk_kind,
    source_named,
    write_payload,
)


BLOCK = 64 * KiB  # the lazyfs_mount fixture mounts with --block-size 64K
ALIAS = "main"


def commands_for(tmp_path: Path, m: LazyMount, **env) -> LazyfsCommands:
    return LazyfsCommands(tmp_path / "commands", m.cache, env or None)


def mount_source(m: LazyMount) -> str:
    """The name `stats` gives a mount's figures."""
    return f"mount:{m.path}"


def assert_counters(figures: dict, **expected: int) -> None:
    assert {k: figures[k] for k in expected} == expected, figures


# 1. status and stats report exactly what a workload did -----------------------

# Two packages; alpha is listed completely by reading one file, beta has a
# directory nobody opens (its totals stay incomplete).
A = "alpha/1.0/data/a.bin"
B = "beta/2.0/lib/b.bin"
WORKLOAD_STORE = {
    "alpha/1.0/package.py": 60,
    A: 4 * BLOCK + 1000,  # a partial last block
    "alpha/1.0/data/unread.bin": 2 * KiB,
    "beta/2.0/package.py": 70,
    B: 6 * BLOCK,
    "beta/2.0/docs/readme.txt": 300,
}


def test_status_and_stats_report_exactly_what_the_workload_did(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    content = write_payload(store, WORKLOAD_STORE)
    size_a, size_b = len(content[A]), len(content[B])
    blocks_a, half_b = blocks_of(size_a, BLOCK), blocks_of(size_b, BLOCK) // 2
    m = lazyfs_mount({ALIAS: store})
    cli = commands_for(tmp_path, m)
    repo = m.repo_path(ALIAS)

    # Run 1: A whole (all misses), the first half of B, A again from the
    # daemon's block cache (page cache dropped, so the kernel cannot answer).
    assert read_whole(repo / A) == content[A]
    assert read_range(repo / B, 0, half_b * BLOCK) == content[B][:half_b * BLOCK]
    drop_page_cache(repo / A)
    assert read_whole(repo / A) == content[A]
    run1 = dict(cache_hits=blocks_a, cache_misses=blocks_a + half_b, store_reads=blocks_a + half_b,
                store_bytes=size_a + half_b * BLOCK, bytes_served=2 * size_a + half_b * BLOCK, errors=0)

    assert_counters(m.stats(), **run1)
    status = cli.status_when_flushed()
    # A running mount is read live (what it flushed may be older).
    live = cli.stats()
    assert source_named(live, mount_source(m))["running"] is True
    assert_counters(source_named(live, mount_source(m)), **run1)
    assert_counters(live["total"], **run1)

    alpha, beta = row_of(status, "alpha", "1.0"), row_of(status, "beta", "2.0")
    alpha_files = [p for p in WORKLOAD_STORE if p.startswith("alpha/")]
    assert alpha == {
        "package": "alpha", "version": "1.0", "variants": ["-"], "traces": [],
        "bytes_cached": size_a, "files_cached": 1,
        "bytes_total": sum(WORKLOAD_STORE[p] for p in alpha_files), "files_total": len(alpha_files),
        "totals_complete": True, "pinned": False, "last_used": alpha["last_used"],
        "store_path": f"{store}/alpha/1.0", "local_path": f"{m.path}/{ALIAS}/alpha/1.0",
    }
    assert time.time() - 60 < alpha["last_used"] <= time.time() + 1
    # beta/2.0/docs was never listed: the totals say so, and count what is known.
    assert {k: beta[k] for k in ("bytes_cached", "files_cached", "bytes_total", "files_total",
                                 "totals_complete")} == {
        "bytes_cached": half_b * BLOCK, "files_cached": 1,
        "bytes_total": WORKLOAD_STORE["beta/2.0/package.py"] + size_b, "files_total": 2,
        "totals_complete": False}
    assert len(status["variants"]) == 2, status["variants"]
    size_on_disk_kind(status["size_bytes"], m.cache)

    # Stopped: the figures it stored at exit.
    m.unmount()
    stopped = source_named(cli.stats(), mount_source(m))
    assert stopped["running"] is False
    assert_counters(stopped, **run1)

    # Run 2 adds to them: the rest of B (misses), A again (hits: a new
    # mount has an empty page cache).
    m.remount()
    rest = size_b - half_b * BLOCK
    assert read_range(repo / B, half_b * BLOCK, rest) == content[B][half_b * BLOCK:]
    assert read_whole(repo / A) == content[A]
    run2 = dict(cache_hits=blocks_a, cache_misses=half_b, store_reads=half_b, store_bytes=rest,
                bytes_served=size_a + rest, errors=0)
    both = {k: run1[k] + run2[k] for k in run1}

    assert_counters(m.stats(), **run2)  # this run only
    assert_counters(source_named(cli.stats(), mount_source(m)), **both)
    assert row_of(cli.status_when_flushed(), "beta", "2.0")["bytes_cached"] == size_b
    m.unmount()
    assert_counters(source_named(cli.stats(), mount_source(m)), **both)


def test_stats_lists_a_running_mount_before_its_first_flush(tmp_path, lazyfs_mount):
    # A mount writes its figures to the cache every MAINTENANCE_INTERVAL;
    # `stats` must still show a running mount (read live) before that.
    store = tmp_path / "store"
    content = write_payload(store, {A: 2 * BLOCK})
    started = time.monotonic()  # the mount's maintenance clock starts inside this call
    m = lazyfs_mount({ALIAS: store})
    assert read_whole(m.repo_path(ALIAS) / A) == content[A]

    stats = commands_for(tmp_path, m).stats()

    if time.monotonic() - started >= MAINTENANCE_INTERVAL:
        pytest.skip("the machine was too slow to ask before the mount's first flush")
    assert [s["name"] for s in stats["sources"]] == [mount_source(m)], stats
    assert_counters(source_named(stats, mount_source(m)), cache_misses=2, store_bytes=2 * BLOCK)
    assert_counters(stats["total"], cache_misses=2, store_bytes=2 * BLOCK)


# 2. clean: to a size limit, least recently used first, pins kept, readers safe --

def test_clean_to_a_size_limit_evicts_least_recently_used_files_while_mounted(tmp_path, lazyfs_mount):
    sizes = {f"pkg{i}/1.0/payload.bin": 3 * BLOCK - 100 * i for i in range(6)}
    store = tmp_path / "store"
    content = write_payload(store, sizes)
    older, newer = sorted(sizes)[:3], sorted(sizes)[3:]
    m = lazyfs_mount({ALIAS: store})
    cli = commands_for(tmp_path, m)
    repo = m.repo_path(ALIAS)
    for rel in older:
        read_whole(repo / rel)
    older_usage = disk_usage(m.cache)
    time.sleep(1.1)  # last-used times are kept to the second
    for rel in newer:
        read_whole(repo / rel)
    size_before = cli.status_when_flushed()["size_bytes"]  # uses recorded
    kind = size_on_disk_kind(size_before, m.cache)
    older_on_disk = older_usage.of_kind(kind)
    # Room for the newer files and a little more, not for one older file.
    limit = size_before - older_on_disk + 1000

    report = cli.clean("--max-size", limit)

    assert report["size_before"] == size_before
    assert report["evicted_files"] == len(older)
    assert report["evicted_bytes"] == older_on_disk
    assert report["size_after"] == size_before - older_on_disk <= limit
    assert "warning" not in report
    status = cli.status()
    assert status["size_bytes"] == disk_usage(m.cache).of_kind(kind) == report["size_after"]
    assert sorted(f"{v['package']}/{v['version']}" for v in status["variants"]) == \
        sorted(rel.rsplit("/", 1)[0] for rel in newer)
    # The mount goes on: evicted files come back from the store, whole.
    for rel in sizes:
        drop_page_cache(repo / rel)
        assert read_whole(repo / rel) == content[rel], rel


# A Rez repository for a baked context: a tool with payload on PATH, and a
# library the tool's context also resolves.
REZ_STORE = {
    "tool/1.0/package.py": """
        name = "tool"
        version = "1.0"
        def commands():
            env.PATH.prepend("{root}/bin")
    """,
    "tool/1.0/bin/hello": """
        #!/bin/sh
        echo hello
    """,
    "tool/1.0/share/big.bin": b"\x5a" * (3 * BLOCK + 5),
    "lib/2.0/package.py": """
        name = "lib"
        version = "2.0"
    """,
}
DEFINITIONS = ["tool/1.0/package.py", "lib/2.0/package.py"]
UNPINNED_PAYLOAD = ["tool/1.0/bin/hello", "tool/1.0/share/big.bin"]


def test_clean_keeps_what_a_baked_context_pinned_and_it_still_sources_offline(tmp_path, lazyfs_mount):
    store = tmp_path / "svr" / "packages"
    build_store(store, REZ_STORE)
    rez = Rez(tmp_path)
    context = rez.resolve(["tool", "lib"], [store], tmp_path / "shot.rxt")
    m = lazyfs_mount({ALIAS: store})
    cli = commands_for(tmp_path, m, **rez.environ([tmp_path / "no-packages-here"]))
    baked = tmp_path / "shot.lazy.rxt"
    cli.run("bake", context, "-o", baked, "--mount", m.path, "--repo", f"{ALIAS}={store}")
    for rel in UNPINNED_PAYLOAD:
        read_whole(m.repo_path(ALIAS) / rel)
    definition_sizes = {rel: (store / rel).stat().st_size for rel in DEFINITIONS}
    files_before = disk_usage(m.cache).files

    report = cli.clean("--max-size", 0)

    # Everything but the definitions went; they stay, over the limit, and
    # the user is told why.
    assert report["pinned_bytes"] == report["size_after"] > 0
    assert report["evicted_files"] == len(UNPINNED_PAYLOAD), report
    assert report["size_before"] > report["size_after"], report
    assert "pinned" in report["warning"], report
    size_on_disk_kind(report["size_after"], m.cache)
    # Each definition is smaller than a block, so it is one cache file
    # whatever the layout (a file per block or per file version).
    assert disk_usage(m.cache).files == len(DEFINITIONS) < files_before
    status = cli.status()
    for rel, size in definition_sizes.items():
        package, version, _ = rel.split("/")
        row = row_of(status, package, version)
        assert (row["bytes_cached"], row["files_cached"], row["pinned"]) == (size, 1, True), row
    assert len(status["variants"]) == len(DEFINITIONS), status["variants"]

    # Offline (the store renamed away), the pinned definitions alone source the context.
    store.rename(store.with_name("moved-away"))
    m.expect_log(str(store))
    m.remount(store_timeout=2)
    result = rez.source(baked, ["sh", "-c", 'echo "$REZ_TOOL_ROOT $REZ_LIB_ROOT"'])
    assert result.returncode == 0, result.stderr
    repo = f"{os.path.realpath(m.path)}/{ALIAS}"
    assert result.stdout.split() == [f"{repo}/tool/1.0", f"{repo}/lib/2.0"]


CLEANS_DURING_READS = 6


def test_readers_see_only_correct_bytes_while_cleans_evict_under_them(tmp_path, lazyfs_mount):
    sizes = {
        "big/1.0/data.bin": 7 * BLOCK + 3,
        "big/1.0/exact.bin": 4 * BLOCK,
        "small/2.0/one.bin": BLOCK - 1,
        "small/2.0/two.bin": 2 * BLOCK + BLOCK // 2,
        "small/2.0/tiny.txt": 17,
    }
    store = tmp_path / "store"
    content = write_payload(store, sizes)
    m = lazyfs_mount({ALIAS: store})
    cli = commands_for(tmp_path, m)
    repo = m.repo_path(ALIAS)
    expected = {repo / rel: sha256(data) for rel, data in content.items()}
    total_blocks = sum(blocks_of(size, BLOCK) for size in sizes.values())

    with HashingReader(tmp_path / "reader", expected) as reader:
        deadline = time.monotonic() + 10
        while m.stats()["cache_misses"] < total_blocks:  # a first round is cached
            assert time.monotonic() < deadline, "the reader does not read"
            time.sleep(0.05)
        evicted = [cli.clean("--max-size", 0)["evicted_files"] for _ in range(CLEANS_DURING_READS)]
        seen = reader.stop()

    assert seen["errors"] == [] and seen["mismatches"] == [], seen
    assert seen["rounds"] >= 2, seen
    # The cleans really raced the reader: they kept finding refetched files.
    assert sum(1 for n in evicted if n) >= CLEANS_DURING_READS // 2, evicted
    assert m.stats()["cache_misses"] > total_blocks  # ... and the reader refetched
    for path, digest in expected.items():
        drop_page_cache(path)
        assert sha256(read_whole(path)) == digest, path


def test_status_attributes_files_read_again_after_a_clean(tmp_path, lazyfs_mount):
    # A mount notes each file's use once a minute (flushed every 2 s); a
    # clean forgets evicted files, so a file read again right after must be
    # recorded again, or its blocks sit in the cache belonging to nothing.
    store = tmp_path / "store"
    content = write_payload(store, {A: 2 * BLOCK + 5})
    m = lazyfs_mount({ALIAS: store})
    cli = commands_for(tmp_path, m)
    path = m.repo_path(ALIAS) / A
    read_whole(path)
    assert row_of(cli.status_when_flushed(), "alpha", "1.0")["bytes_cached"] == len(content[A])
    assert cli.clean("--max-size", 0)["evicted_files"] == 1
    assert cli.status()["variants"] == []

    drop_page_cache(path)
    assert read_whole(path) == content[A]

    assert row_of(cli.status_when_flushed(), "alpha", "1.0")["bytes_cached"] == len(content[A])


# 3. two mounts sharing one cache ------------------------------------------------

# Two packages, files of assorted block counts (a partial last block, an
# exact multiple, one smaller than a block).
SHARED_TREE = {
    "maya/2024.2/bin/maya.bin": 5 * BLOCK + 11,
    "maya/2024.2/lib/libfoundation.so": 3 * BLOCK,
    "maya/2024.2/python/site.py": 900,
    "maya/2024.2/plug-ins/bifrost.so": 2 * BLOCK + 1,
    "houdini/20.0/bin/hython": 4 * BLOCK - 7,
    "houdini/20.0/dso/fx.so": BLOCK,
    "houdini/20.0/houdini/otls/tools.hda": 6 * BLOCK + 300,
    "houdini/20.0/toolkit/include/UT.h": 12 * KiB,
}


def read_files(m: LazyMount, relpaths: list[str]) -> dict[str, bytes]:
    return {rel: read_whole(m.repo_path(ALIAS) / rel) for rel in relpaths}


def read_in_parallel(*jobs: tuple[LazyMount, list[str]]) -> list[dict[str, bytes]]:
    """Each (mount, files) read by its own thread, all at once."""
    results: list[dict[str, bytes] | BaseException] = [None] * len(jobs)

    def run(i, m, relpaths):
        try:
            results[i] = read_files(m, relpaths)
        except BaseException as e:  # re-raised by the test below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a reader through the mount hangs"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def stats_when_listed(cli: LazyfsCommands, names: list[str], timeout: float = 3 * MAINTENANCE_INTERVAL) -> dict:
    """`stats --json` once every source in *names* is listed (a mount is
    listed from its first flush on)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = cli.stats()
        if set(names) <= {s["name"] for s in stats["sources"]} or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_two_mounts_on_one_cache_fetch_every_block_once_in_total(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    content = write_payload(store, SHARED_TREE)
    shared = tmp_path / "shared-cache"
    first, second = lazyfs_mount({ALIAS: store}, cache=shared), lazyfs_mount({ALIAS: store}, cache=shared)
    files = sorted(SHARED_TREE)
    halves = files[::2], files[1::2]  # each half takes from both packages
    blocks = [sum(blocks_of(SHARED_TREE[rel], BLOCK) for rel in half) for half in halves]

    read_one = read_in_parallel((first, halves[0]), (second, halves[1]))
    read_other = read_in_parallel((first, halves[1]), (second, halves[0]))

    for seen in (*read_one, *read_other):
        assert seen == {rel: content[rel] for rel in seen}
    figures = first.stats(), second.stats()
    # Every block came from the store once, to whichever mount read it first;
    # the other mount found it in the shared cache.
    assert sum(f["cache_misses"] for f in figures) == sum(blocks)
    assert sum(f["store_reads"] for f in figures) == sum(blocks)
    assert sum(f["store_bytes"] for f in figures) == sum(SHARED_TREE.values())
    assert_counters(figures[0], cache_misses=blocks[0], cache_hits=blocks[1])
    assert_counters(figures[1], cache_misses=blocks[1], cache_hits=blocks[0])

    cli = commands_for(tmp_path, first)
    stats = stats_when_listed(cli, [mount_source(first), mount_source(second)])
    for m, f in zip((first, second), figures):
        shown = source_named(stats, mount_source(m))
        assert_counters(shown, **{k: f[k] for k in ("cache_hits", "cache_misses", "store_bytes")})
    assert_counters(stats["total"], cache_misses=sum(blocks), cache_hits=sum(blocks),
                    store_bytes=sum(SHARED_TREE.values()))
    status = cli.status_when_flushed()
    assert sum(v["bytes_cached"] for v in status["variants"]) == sum(SHARED_TREE.values())
    assert sum(v["files_cached"] for v in status["variants"]) == len(SHARED_TREE)


# 4. --json carries the same numbers as the tables ---------------------------------

STATUS_COLUMNS = ["PACKAGE", "VERSION", "VARIANTS", "CACHED", "FILES", "LAST USED", "PINNED", "TRACE", "STORE",
                  "LOCAL"]
STATS_COLUMNS = ["SOURCE", "HITS", "MISSES", "HIT RATIO", "SERVED", "FETCHED", "STORE REQS",
                 "P50 MS", "P95 MS", "P99 MS", "ERRORS"]


def split_fraction(cell: str, complete: bool) -> tuple[str, str]:
    """'X / Y', with a '+' after Y when the total is incomplete."""
    assert cell.endswith("+") != complete, f"{cell!r}: '+' must mark an incomplete total"
    done, total = cell.rstrip("+").split(" / ")
    return done, total


def assert_status_table_matches(text: str, data: dict) -> None:
    lines = text.splitlines()
    head = re.fullmatch(r"cache (.+): (.+) on disk, limit (.+)", lines[0])
    assert head, lines[0]
    assert head[1] == data["cache_dir"]
    assert_size_shows(head[2], data["size_bytes"])
    if data["limit_bytes"] is None:
        assert head[3] == "none"
    else:
        assert_size_shows(head[3], data["limit_bytes"])
    rows = parse_table(lines[1:], STATUS_COLUMNS)
    assert len(rows) == len(data["variants"]), (rows, data["variants"])
    for row, v in zip(rows, data["variants"]):
        assert [row["PACKAGE"], row["VERSION"], row["VARIANTS"], row["PINNED"], row["TRACE"], row["STORE"],
                row["LOCAL"]] == [
            v["package"], v["version"], ",".join(v["variants"]), "yes" if v["pinned"] else "no",
            ",".join(v["traces"]) or "no", v["store_path"], v["local_path"] or "-"]
        cached, total = split_fraction(row["CACHED"], v["totals_complete"])
        assert_size_shows(cached, v["bytes_cached"])
        assert_size_shows(total, v["bytes_total"])
        assert split_fraction(row["FILES"], v["totals_complete"]) == (str(v["files_cached"]), str(v["files_total"]))
        assert row["LAST USED"] == "just now" and time.time() - v["last_used"] < 60, (row, v)


def assert_stats_table_matches(text: str, data: dict) -> None:
    rows = parse_table(text.splitlines(), STATS_COLUMNS)
    expected = [(s["name"] + (" (running)" if s["running"] else ""), s) for s in data["sources"]]
    expected.append(("total", data["total"]))
    assert [row["SOURCE"] for row in rows] == [name for name, _ in expected]
    for row, (_, s) in zip(rows, expected):
        assert [row["HITS"], row["MISSES"], row["STORE REQS"], row["ERRORS"]] == [
            str(s["cache_hits"]), str(s["cache_misses"]), str(s["store_reads"] + s["store_listings"]),
            str(s["errors"])], (row, s)
        assert_size_shows(row["SERVED"], s["bytes_served"])
        assert_size_shows(row["FETCHED"], s["store_bytes"])
        assert_shown_as(row["HIT RATIO"], None if s["hit_ratio"] is None else 100 * s["hit_ratio"], "%", 0.05)
        for q in ("50", "95", "99"):
            assert_shown_as(row[f"P{q} MS"], s[f"fetch_p{q}_ms"], "", 0.005)


def assert_shown_as(cell: str, value: float | None, suffix: str, precision: float) -> None:
    """*cell* shows *value* to *precision* ("-" for none)."""
    if value is None:
        assert cell == "-", cell
    else:
        assert cell.endswith(suffix), (cell, value)
        assert abs(float(cell.removesuffix(suffix)) - value) <= precision + 1e-9, (cell, value)


CLEAN_LINE = re.compile(r"(would evict|evicted) (\d+) file\(s\), (.+); cache (.+) -> (.+) \((.+) pinned\)")


def assert_clean_line_matches(text: str, report: dict) -> None:
    m = CLEAN_LINE.fullmatch(text.strip())
    assert m, text
    assert m[1] == ("would evict" if report["dry_run"] else "evicted")
    assert int(m[2]) == report["evicted_files"]
    for shown, key in zip(m.groups()[2:], ("evicted_bytes", "size_before", "size_after", "pinned_bytes")):
        assert_size_shows(shown, report[key])


def without_updated(sources: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "updated"} for s in sources]


def test_json_output_carries_the_same_numbers_as_the_tables(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    content = write_payload(store, WORKLOAD_STORE)
    # One stopped source and one running, on one cache.
    stopped = lazyfs_mount({ALIAS: store})
    read_whole(stopped.repo_path(ALIAS) / A)
    read_range(stopped.repo_path(ALIAS) / B, 0, 2 * BLOCK)
    stopped.unmount()
    running = lazyfs_mount({ALIAS: store}, cache=stopped.cache)
    assert read_whole(running.repo_path(ALIAS) / A) == content[A]
    read_whole(running.repo_path(ALIAS) / "alpha/1.0/data/unread.bin")
    cli = commands_for(tmp_path, running)
    stats = stats_when_listed(cli, [mount_source(stopped), mount_source(running)])
    status = cli.status_when_flushed()

    assert_status_table_matches(cli.run("status"), status)
    assert {v["totals_complete"] for v in status["variants"]} == {True, False}  # both shapes shown
    assert_stats_table_matches(cli.run("stats"), stats)
    # Nothing moved meanwhile (but the running mount's flush time).
    assert without_updated(cli.stats()["sources"]) == without_updated(stats["sources"])
    assert {s["running"] for s in stats["sources"]} == {True, False}

    limit = status["size_bytes"] // 2
    dry_run = cli.clean("--max-size", limit, "--dry-run")
    assert_clean_line_matches(cli.run("clean", "--max-size", limit, "--dry-run"), dry_run)
    report = cli.clean("--max-size", limit)
    assert report["evicted_files"] > 0
    assert {**report, "dry_run": True} == dry_run  # did what it said it would
    assert_clean_line_matches(cli.run("clean", "--max-size", limit), {**report, "evicted_files": 0,
                                                                         "evicted_bytes": 0,
                                                                         "size_before": report["size_after"]})


# logs -------------------------------------------------------------------------------


def eio_lines_naming(text: str, path: str) -> list[str]:
    return [line for line in text.splitlines() if path in line and " ERROR " in line]


def wait_for_text(path: Path, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{needle!r} not in {path} after {timeout}s:\n{text}"
        time.sleep(0.1)
    return text


def test_logs_name_each_file_whose_fetch_failed(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    data = "alpha/1.0/data"
    content = write_payload(store, {f"{data}/cached.bin": 2 * BLOCK, f"{data}/lost.bin": BLOCK + 1,
                                    f"{data}/later.bin": 100})
    m = lazyfs_mount({ALIAS: store}, store_timeout=2)
    cli = commands_for(tmp_path, m)
    mounted = m.repo_path(ALIAS) / data
    assert read_whole(mounted / "cached.bin") == content[f"{data}/cached.bin"]
    # Now the store goes away (for real: renamed); the directory was listed,
    # so the mount still knows the files, not their contents.
    store.rename(store.with_name("store-moved-away"))
    # A directory walked to in the last DIR_AGE seconds still serves the files
    # the index lists (by their identity); after that the path is walked again.
    time.sleep(DIR_AGE)
    for name in ("lost.bin", "later.bin"):
        m.expect_log(f"{store}/{data}/{name}")

    with pytest.raises(OSError) as failed:
        read_whole(mounted / "lost.bin")
    assert failed.value.errno == errno.EIO

    lost = eio_lines_naming(cli.run("logs"), f"{store}/{data}/lost.bin")
    assert lost, cli.run("logs")
    # (The kernel may retry a failed read: one error, and one line, per request.)
    assert m.stats()["errors"] == len(lost)
    drop_page_cache(mounted / "cached.bin")
    assert read_whole(mounted / "cached.bin") == content[f"{data}/cached.bin"]  # cached: still served

    # -f prints what is there, then follows.
    followed = tmp_path / "logs-f.out"
    with open(followed, "wb") as out:
        follower = subprocess.Popen(cli.argv("logs", "-f"), env=cli.environ(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_text(followed, f"{data}/lost.bin")
        with pytest.raises(OSError):
            read_whole(mounted / "later.bin")
        text = wait_for_text(followed, f"{data}/later.bin")
        assert eio_lines_naming(text, f"{store}/{data}/later.bin"), text
    finally:
        follower.send_signal(signal.SIGINT)  # how a user stops it: Ctrl-C
        follower.wait(timeout=10)
    assert follower.returncode == 0


# automatic clean at cache_limit -----------------------------------------------------

LIMIT = 1024 * KiB
ROUND_FILES = 3  # files read per round: 15 blocks, most of the limit
LIMITED_TREE = {f"pkg{i // 3}/1.0/file{i % 3}.bin": 5 * BLOCK - i for i in range(12)}


def test_a_mount_keeps_its_cache_under_its_limit_during_a_bigger_workload(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    content = write_payload(store, LIMITED_TREE)
    assert sum(LIMITED_TREE.values()) > 3 * LIMIT
    config = tmp_path / "limited.toml"
    config.write_text(f'cache_limit = "{LIMIT // KiB}K"\n')
    m = lazyfs_mount({ALIAS: store}, extra_args=("--config", str(config)))
    cli = commands_for(tmp_path, m)
    assert cli.json("status", "--config", config)["limit_bytes"] == LIMIT
    files = sorted(LIMITED_TREE)

    for start in range(0, len(files), ROUND_FILES):
        for rel in files[start:start + ROUND_FILES]:
            assert read_whole(m.repo_path(ALIAS) / rel) == content[rel], rel
        # Each round starts under the limit and may end over it, for at most
        # one check interval.
        size = size_when_at_most(cli, LIMIT, timeout=2 * MAINTENANCE_INTERVAL + 1)
        assert size <= LIMIT, f"cache at {size} bytes, over its {LIMIT}-byte limit, after round {start}"
        assert disk_usage(m.cache).of_kind(size_on_disk_kind(size, m.cache)) <= LIMIT

    assert m.stats()["store_bytes"] == sum(LIMITED_TREE.values())  # all of it went through
    assert any(b"cleaned" in line for line in m.log_lines()), "the mount never cleaned"
    for rel in files:  # evicted or not, every file reads right
        drop_page_cache(m.repo_path(ALIAS) / rel)
        assert read_whole(m.repo_path(ALIAS) / rel) == content[rel], rel


def size_when_at_most(cli: LazyfsCommands, limit: int, timeout: float) -> int:
    """The cache's size once at most *limit* (or when *timeout* runs out)."""
    deadline = time.monotonic() + timeout
    while (size := cli.status()["size_bytes"]) > limit and time.monotonic() < deadline:
        time.sleep(0.2)
    return size


# extended attributes inside the mount --------------------------------------------------

XATTR = "user.rezlazyfs."


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path)}


def test_xattrs_tell_where_a_file_comes_from_and_how_much_is_cached(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    payload = "pkg/1.0/lib/python/data.bin"
    content = write_payload(store, {payload: 3 * BLOCK + 10, "pkg/1.0/package.py": 40})
    size = len(content[payload])
    m = lazyfs_mount({ALIAS: store}, metadata_ttl=30)
    cli = commands_for(tmp_path, m)
    repo = m.repo_path(ALIAS)

    def cached(path: Path) -> bytes:
        return os.getxattr(path, XATTR + "cached")

    assert xattrs(repo / payload) == {
        XATTR + "store_path": f"{store}/{payload}".encode(),
        XATTR + "policy": b"immutable",  # released payload
        XATTR + "cached": f"0/{size}".encode(),
    }
    # Definitions and version directories can change: revalidated.
    assert os.getxattr(repo / "pkg/1.0/package.py", XATTR + "policy") == b"revalidated after 30s"
    # A directory has no "cached"; one below a version directory is immutable.
    assert xattrs(repo / "pkg/1.0/lib/python") == {
        XATTR + "store_path": f"{store}/pkg/1.0/lib/python".encode(), XATTR + "policy": b"immutable"}
    assert sorted(os.listxattr(m.path)) == [XATTR + "config", XATTR + "stats", XATTR + "stats.total"]

    read_range(repo / payload, 0, BLOCK)
    assert cached(repo / payload) == f"{BLOCK}/{size}".encode()
    read_whole(repo / payload)
    assert cached(repo / payload) == f"{size}/{size}".encode()
    cli.clean("--max-size", 0)
    assert cached(repo / payload) == f"0/{size}".encode()
