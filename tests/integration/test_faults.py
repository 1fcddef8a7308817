"""Faults rez-lazyfs must survive (issue 6), each with real mounts and real
processes: a store that vanishes, hangs, is slow, denies access or fails
some reads; the daemon SIGKILLed mid-read; a damaged cache; a full cache
disk; a file changed under an immutable repository; 32 cold readers of one
file. Every test records what it observed in docs/faults.md (see
tests/helpers/faults.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from cachecore.store import DIR_AGE
from helpers.faults import (
    LazyfsCli,
    drop_page_cache,
    fault_store_fixture,
    in_child,
    lazyfs_cli_fixture,
    log_problems,
    log_text,
    report_fixture,
    scratch_mounts_fixture,
    wait_gone,
)
from helpers.mounts import STATS_XATTR, is_mounted
from helpers.trees import KiB, MiB, deterministic_bytes, write_file
from helpers.walk import sha256_file

# pytest finds these fixtures here (report is autouse); the names they go by
# in tests are report, fault_store, lazyfs_cli and scratch_mounts.
FIXTURES = (report_fixture, fault_store_fixture, lazyfs_cli_fixture, scratch_mounts_fixture)

AREAS = {
    "test_store_": "1. store unavailable / slow / flaky",
    "test_sigkill": "2. daemon SIGKILLed",
    "test_damaged": "3. damaged cache",
    "test_crc": "3. damaged cache",
    "test_index": "3. damaged cache",
    "test_cache_disk": "4. cache disk full",
    "test_file_changed": "5. file changed in the store",
    "test_thirty_two": "6. 32 cold readers",
}

BLOCK = 64 * KiB  # the lazyfs_mount fixture mounts with --block-size 64K
STORE_TIMEOUT = 2.0  # --store-timeout of the outage tests
TTL = 1.0  # --metadata-ttl of the outage tests
EIO_SLACK = 1.5  # seconds allowed on top of --store-timeout
LIMIT = STORE_TIMEOUT + EIO_SLACK


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_fully(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stats(mountpoint) -> dict:
    return json.loads(os.getxattr(mountpoint, STATS_XATTR))


def block_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blocks").glob("*/*") if p.is_file())


# 1. the store unavailable, slow or flaky ------------------------------------------------

CACHED = "fam/1.0.0/lib/cached.bin"
UNCACHED = "fam/1.0.0/lib/uncached.bin"
UNCACHED2 = "fam/1.0.0/lib/uncached2.bin"


def outage_files(root: Path) -> dict[str, bytes]:
    files = {
        "fam/1.0.0/package.py": b"name = 'fam'\nversion = '1.0.0'\n",
        CACHED: deterministic_bytes(3 * BLOCK + 11, seed=100),
        UNCACHED: deterministic_bytes(3 * BLOCK + 13, seed=101),
        UNCACHED2: deterministic_bytes(2 * BLOCK + 17, seed=102),
    }
    for rel, content in files.items():
        write_file(root / rel, content)
    return files


class Outage:
    """The script every "store unavailable" test follows, on mount *m*:
    prime() while the store is fine, during() while it is broken,
    after() once it is back. Each step asserts and records a row."""

    def __init__(self, report, m, files: dict[str, bytes], store_path: Path):
        self.report, self.m, self.files = report, m, files
        self.repo = m.repo_path("main")
        m.expect_log(UNCACHED)
        m.expect_log(UNCACHED2)
        m.expect_log(str(store_path))

    def prime(self) -> None:
        assert sha256_file(self.repo / CACHED) == sha(self.files[CACHED])
        os.stat(self.repo / UNCACHED)  # metadata known, content never read
        os.stat(self.repo / UNCACHED2)
        self.family_listing = sorted(os.listdir(self.repo / "fam"))

    def during(self, case: str, uncached: str = UNCACHED) -> None:
        # Volatile listings expire, and so do the store directories files were
        # opened in: the next lookups and opens ask the broken store.
        time.sleep(max(TTL, DIR_AGE))
        cached_outcome, cached_t = in_child("read", self.repo / CACHED, timeout=LIMIT + 10)
        uncached_outcome, uncached_t = in_child("read", self.repo / uncached, timeout=LIMIT + 10)
        listing, listing_t = in_child("list", self.repo / "fam", timeout=LIMIT + 10)
        self.report.row(case, f"cached file: {'sha256 ok' if cached_outcome == sha(self.files[CACHED]) else cached_outcome} "
                              f"in {cached_t:.2f}s; uncached file: {uncached_outcome} in {uncached_t:.2f}s; "
                              f"family listing: {'stale listing served' if listing.split(',') == self.family_listing else listing} "
                              f"in {listing_t:.2f}s")
        assert cached_outcome == sha(self.files[CACHED]), f"cached file during the outage: {cached_outcome}"
        assert cached_t <= LIMIT, f"cached read took {cached_t:.2f}s"
        assert uncached_outcome == "EIO", f"uncached file during the outage: {uncached_outcome} after {uncached_t:.2f}s"
        assert uncached_t <= LIMIT, f"EIO took {uncached_t:.2f}s (limit {LIMIT}s)"
        assert listing.split(",") == self.family_listing, f"listing during the outage: {listing}"
        assert listing_t <= LIMIT, f"listing took {listing_t:.2f}s"

    def after(self, case: str, uncached: str = UNCACHED, new_version: str | None = None) -> None:
        """The store is back: reads (and a new version, if given) work again
        without a remount, within one store timeout + one TTL."""
        restored = time.monotonic()
        deadline = restored + STORE_TIMEOUT + TTL + EIO_SLACK
        outcomes = []
        while True:
            outcome, _ = in_child("read", self.repo / uncached, timeout=LIMIT + 10)
            outcomes.append(outcome)
            listed = new_version is None or new_version in os.listdir(self.repo / "fam")
            if (outcome == sha(self.files[uncached]) and listed) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        took = time.monotonic() - restored
        ok = outcome == sha(self.files[uncached]) and listed
        self.report.row(case, (f"uncached file reads correctly {took:.1f}s after the store came back, no remount"
                               if ok else f"still failing {took:.1f}s after the store came back: {outcomes[-3:]}")
                        + (f"; new version {new_version} listed" if new_version and listed else ""))
        assert outcome == sha(self.files[uncached]), f"after the store came back: {outcomes}"
        assert listed, f"{new_version} not listed {took:.1f}s after the store came back"
        assert self.m.stats()["store_reads"] > 0
        assert sha256_file(self.repo / CACHED) == sha(self.files[CACHED])


def primed_outage(report, lazyfs_mount, files: dict, store: Path) -> Outage:
    """A mount of `store` with the outage files, the cached ones read: ready for a fault."""
    m = lazyfs_mount({"main": store}, store_timeout=STORE_TIMEOUT, metadata_ttl=TTL)
    outage = Outage(report, m, files, store)
    outage.prime()
    return outage


def primed_fault_store(tmp_path, report, fault_store, lazyfs_mount):
    """(fault store, outage): the outage files behind a FUSE layer that can misbehave."""
    source = tmp_path / "source"
    files = outage_files(source)
    fs = fault_store(source)
    return fs, primed_outage(report, lazyfs_mount, files, fs.path)


def test_store_directory_renamed_away(tmp_path, report, lazyfs_mount):
    store = tmp_path / "store"
    outage = primed_outage(report, lazyfs_mount, outage_files(store), store)
    away = tmp_path / "store-away"
    store.rename(away)
    try:
        outage.during("store directory renamed away while mounted")
        write_file(away / "fam/2.0.0/package.py", "name = 'fam'\nversion = '2.0.0'\n")
    finally:
        away.rename(store)
    outage.after("store directory renamed back (with a new version 2.0.0 added meanwhile)",
                 new_version="2.0.0")


def test_store_mount_gone(tmp_path, report, scratch_mounts, lazyfs_mount):
    # The store is a (bind) mount, like an NFS mount: unmounting it leaves
    # an empty directory where the repository was.
    real = tmp_path / "filer"
    files = outage_files(real)
    store = scratch_mounts.bind(real, tmp_path / "store")
    outage = primed_outage(report, lazyfs_mount, files, store)
    scratch_mounts.umount(store)
    try:
        outage.during("store mount unmounted (store path now an empty directory)")
    finally:
        scratch_mounts.bind(real, store)
    outage.after("store mounted again")


def test_store_permission_denied(tmp_path, report, fault_store, lazyfs_mount):
    # Root ignores file modes, so the denial comes from a FUSE layer that
    # answers EACCES to every request, like an NFS server that stops exporting to us.
    fs, outage = primed_fault_store(tmp_path, report, fault_store, lazyfs_mount)
    fs.set("eacces")
    try:
        outage.during("every store request answers EACCES (permission denied)")
    finally:
        fs.set("ok")
    outage.after("store permissions restored")


def test_store_hangs(tmp_path, report, fault_store, lazyfs_mount):
    fs, outage = primed_fault_store(tmp_path, report, fault_store, lazyfs_mount)
    fs.freeze()
    try:
        outage.during("store hangs (its FUSE server SIGSTOPped: every request blocks)")
    finally:
        fs.thaw()
    outage.after("store answers again (SIGCONT)")


def test_store_slow(tmp_path, report, fault_store, lazyfs_mount):
    fs, outage = primed_fault_store(tmp_path, report, fault_store, lazyfs_mount)
    m, files = outage.m, outage.files

    # Slow but within the timeout: reads succeed, and a slow read does not
    # hold up a cached one.
    delay = 1.0
    fs.set(delay=delay)
    results = {}
    slow = threading.Thread(target=lambda: results.update(slow=in_child("read", m.repo_path("main") / UNCACHED2, timeout=30)))
    slow.start()
    time.sleep(0.2)
    cached_outcome, cached_t = in_child("read", m.repo_path("main") / CACHED, timeout=30)
    slow.join()
    slow_outcome, slow_t = results["slow"]
    report.row(f"every store read delayed {delay:g}s (timeout {STORE_TIMEOUT:g}s)",
               f"uncached file: {'sha256 ok' if slow_outcome == sha(files[UNCACHED2]) else slow_outcome} in {slow_t:.2f}s; "
               f"a cached file read meanwhile: {'sha256 ok' if cached_outcome == sha(files[CACHED]) else cached_outcome} in {cached_t:.2f}s")
    assert slow_outcome == sha(files[UNCACHED2])
    assert slow_t >= delay, "the delay did not apply: the test proves nothing"
    assert cached_outcome == sha(files[CACHED])
    assert cached_t < delay, f"a cached read waited {cached_t:.2f}s behind a slow store read"

    fs.set(delay=4 * STORE_TIMEOUT)
    try:
        outage.during(f"every store read delayed {4 * STORE_TIMEOUT:g}s (timeout {STORE_TIMEOUT:g}s)")
    finally:
        fs.set()
    outage.after("store fast again")


def test_store_flaky(tmp_path, report, fault_store, lazyfs_mount):
    source = tmp_path / "source"
    files = {f"fam/1.0.0/lib/part{i}.bin": deterministic_bytes(4 * BLOCK + i, seed=110 + i) for i in range(6)}
    files[CACHED] = deterministic_bytes(3 * BLOCK + 11, seed=100)
    for rel, content in files.items():
        write_file(source / rel, content)
    fs = fault_store(source)
    m = lazyfs_mount({"main": fs.path}, store_timeout=STORE_TIMEOUT, metadata_ttl=TTL)
    repo = m.repo_path("main")
    for rel in files:
        m.expect_log(rel)
        os.stat(repo / rel)
    assert read_fully(repo / CACHED) == files[CACHED]

    fraction = 0.5
    fs.set("flaky", fraction=fraction, seed=1)
    outcomes: dict[str, list[str]] = {rel: [] for rel in files if rel != CACHED}
    cached_ok = cached_reads = 0
    for attempt in range(40):
        pending = [rel for rel, seen in outcomes.items() if not seen or seen[-1] != "ok"]
        if not pending:
            break
        for rel in pending:
            drop_page_cache(repo / rel)
            try:
                data = read_fully(repo / rel)
            except OSError as e:
                outcomes[rel].append(errno.errorcode[e.errno])
            else:
                outcomes[rel].append("ok" if data == files[rel] else "WRONG BYTES")
        drop_page_cache(repo / CACHED)
        cached_reads += 1
        try:
            cached_ok += read_fully(repo / CACHED) == files[CACHED]
        except OSError:
            pass
    counts = fs.counts()
    fs.set()
    flat = [o for seen in outcomes.values() for o in seen]
    report.row(f"a random {fraction:.0%} of store reads fail with EIO",
               f"store: {counts['failed']} of {counts['reads']} reads failed; through the mount "
               f"{flat.count('ok')} whole-file reads ok, {flat.count('EIO')} EIO, "
               f"{len(flat) - flat.count('ok') - flat.count('EIO')} other; "
               f"every uncached file correct after at most {max(len(s) for s in outcomes.values())} attempts "
               f"(no remount); cached file read ok {cached_ok}/{cached_reads} times")
    assert set(flat) <= {"ok", "EIO"}, outcomes
    assert all(seen[-1] == "ok" for seen in outcomes.values()), outcomes
    assert "EIO" in flat, "no read failed: the flaky store was not exercised"
    assert cached_ok == cached_reads, "a cached file failed while the store was flaky"


# 2. SIGKILL during heavy parallel reading ----------------------------------------------------

KILLS = 54  # in all, over LANES independent mounts killed side by side
LANES = 3  # a killed daemon's mount takes ~0.1-0.9s to go stale; two lanes keep the test short
READERS = 2  # per lane

READER = r"""
import hashlib, json, os, random, sys, time
repo, store, manifest, out, stop = sys.argv[1:6]
mode = sys.argv[6]  # "whole": sha256 of whole files; "ranges": random preads vs the store's bytes
expected = json.load(open(manifest))
names = sorted(expected)
content = {}
if mode == "ranges":
    for rel in names:
        with open(os.path.join(store, rel), "rb") as f:
            content[rel] = f.read()
rng = random.Random(os.getpid())
ok = errors = 0
bad = []
while not os.path.exists(stop):
    rel = rng.choice(names)
    try:
        fd = os.open(os.path.join(repo, rel), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if mode == "whole":
                h = hashlib.sha256()
                while chunk := os.read(fd, rng.choice((4096, 65536, 200000, 1 << 20))):
                    h.update(chunk)
                good = h.hexdigest() == expected[rel]
            else:
                good = True
                for _ in range(8):
                    off = rng.randrange(len(content[rel]))
                    data = os.pread(fd, rng.choice((1, 4096, 70000, 300000)), off)
                    # a short read is allowed (the mount may die mid-read); wrong bytes are not
                    good = good and len(data) > 0 and data == content[rel][off:off + len(data)]
        finally:
            os.close(fd)
    except OSError:
        errors += 1
        time.sleep(0.005)
        continue
    if good:
        ok += 1
    else:
        bad.append(rel)
json.dump({"ok": ok, "errors": errors, "bad": bad}, open(out, "w"))
"""


def kill_lane(lane: int, root: Path, kills: int, seed: int) -> dict:
    """One mount, READERS reader processes, *kills* SIGKILLs of its daemon,
    each followed by `rez-lazyfs mount` at the same (dead) mountpoint and a
    check of every file's sha256 through the new mount."""
    rng = random.Random(seed)
    store = root / "store"
    files = {}
    for i in range(10):  # ~2 MiB per lane: multi-block files, block edges, partial blocks
        size = rng.choice((BLOCK, 2 * BLOCK, rng.randrange(1, 8 * BLOCK)))
        files[f"fam/1.0.0/lib/f{i:02d}.bin"] = deterministic_bytes(size, seed=seed * 100 + i)
    for rel, content in files.items():
        write_file(store / rel, content)
    expected = {rel: sha(c) for rel, c in files.items()}
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(expected))
    mp, cache = root / "mnt", root / "cache"
    mp.mkdir()
    cli = LazyfsCli(root / "cli")
    mount_args = ("mount", mp, "--repo", f"main={store}", "--cache", cache, "--block-size", "64K")
    log = cache / "logs" / "daemon.log"
    out = {"kills": 0, "stale": 0, "files": len(files), "bytes": sum(map(len, files.values())),
           "log": log, "cache": cache}

    def mount(what: str) -> None:
        result = cli.run(*mount_args)
        assert result.returncode == 0, f"lane {lane}: {what} failed: {result.summary()}\n{log_text(log)[-2000:]}"
        assert is_mounted(mp)

    def verify(i: int) -> None:
        for rel, digest in expected.items():
            got = sha256_file(mp / "main" / rel)
            assert got == digest, f"lane {lane}, after kill {i}: {rel} reads back wrong (sha256 {got})"

    stop = root / "stop"
    readers = []
    try:
        mount("mount")
        verify(0)
        for r in range(READERS):
            readers.append(subprocess.Popen(
                [sys.executable, "-c", READER, mp / "main", store, manifest, root / f"reader{r}.json", stop,
                 "whole" if r % 2 == 0 else "ranges"], cwd="/"))
        for i in range(1, kills + 1):
            present = [p for p in cache.joinpath("blocks").glob("*/*") if p.is_file()]
            for p in rng.sample(present, k=int(len(present) * rng.choice((0.3, 1.0)))):
                p.unlink(missing_ok=True)  # keep the readers fetching, not just hitting the cache
            time.sleep(rng.uniform(0.0, 0.2))
            pids = cli.daemons()
            assert len(pids) == 1, f"lane {lane}: daemons {pids}"
            os.kill(pids[0], signal.SIGKILL)
            out["kills"] += 1
            wait_gone(pids[0])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the kernel aborts the connection once /dev/fuse is closed
                try:
                    os.stat(mp)
                except OSError as e:
                    out["stale"] += e.errno == errno.ENOTCONN
                    break
                time.sleep(0.01)
            mount(f"mount after kill {i}")  # must clear the dead mount itself
            verify(i)
    finally:
        stop.touch()
        for p in readers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        cli.run("umount", mp)
        problems = cli.teardown()
    assert not problems, problems
    results = [json.loads((root / f"reader{r}.json").read_text()) for r in range(READERS)]
    out["ok"] = sum(r["ok"] for r in results)
    out["failed"] = sum(r["errors"] for r in results)
    out["bad"] = [rel for r in results for rel in r["bad"]]
    return out


def test_sigkill_during_parallel_reads(tmp_path, report):
    lanes: list[dict | BaseException] = [None] * LANES

    def run(lane):
        try:
            lanes[lane] = kill_lane(lane, tmp_path / f"lane{lane}", KILLS // LANES, seed=lane + 1)
        except BaseException as e:  # reported below
            lanes[lane] = e

    threads = [threading.Thread(target=run, args=(lane,)) for lane in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in lanes if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    kills = sum(r["kills"] for r in lanes)
    stale = sum(r["stale"] for r in lanes)
    ok = sum(r["ok"] for r in lanes)
    failed = sum(r["failed"] for r in lanes)
    bad = [rel for r in lanes for rel in r["bad"]]
    leftovers = sum(len(list((r["cache"] / "tmp").iterdir())) if (r["cache"] / "tmp").is_dir() else 0
                    for r in lanes)
    problems = [p for r in lanes for p in log_problems(r["log"])]
    damaged = [p for p in problems if "damaged" in p]
    others = [p for p in problems if "damaged" not in p]
    report.row(f"SIGKILL of the daemon at {kills} random moments ({LANES} mounts side by side, "
               f"{READERS} reader processes each, {lanes[0]['files']} files of up to 8 blocks per mount, "
               f"cache partly or wholly deleted before each kill)",
               f"{kills}/{kills} `rez-lazyfs mount` runs cleared the dead mount ({stale} seen as ENOTCONN first) "
               f"and served every file with the store's sha256; readers: {ok} good reads, {failed} failed reads "
               f"(dead mount), {len(bad)} wrong; {leftovers} orphaned files in CACHE/tmp; "
               f"{len(damaged)} 'damaged block' warnings (detected and refetched), {len(others)} other warnings/errors")
    assert kills >= 50
    assert not bad, f"readers got wrong bytes from {bad}"
    assert ok > 0 and failed > 0, "the kills did not land during reading"
    assert not others, "\n".join(others[:20])


# 3. damaged cache ------------------------------------------------------------------

# Eight files with distinct sizes (one per kind of damage) and two of the
# same size (for the swap). Whatever the cache's file layout (one file per
# block or one per file version), each store file has its own cache file(s).
DAMAGE_FILES = {f"fam/1.0.0/lib/d{i}.bin": deterministic_bytes(4 * BLOCK + 100 * i + 1, seed=300 + i) for i in range(8)}
DAMAGE_FILES.update({f"fam/1.0.0/lib/twin{i}.bin": deterministic_bytes(4 * BLOCK, seed=320 + i) for i in range(2)})


def primed_cache(tmp_path, lazyfs_mount):
    """A store, and a mount whose cache holds every block of it; unmounted."""
    store = tmp_path / "store"
    for rel, content in DAMAGE_FILES.items():
        write_file(store / rel, content)
    m = lazyfs_mount({"main": store})
    for rel, content in DAMAGE_FILES.items():
        assert read_fully(m.repo_path("main") / rel) == content
    m.unmount()
    return store, m


def cache_files_of(m, rel: str) -> list[Path]:
    """The cache file(s) holding *rel*'s blocks, block 0's first. Found by the
    documented key rule (cachecore.blocks.file_key: store, path, size, mtime,
    ctime, inode, block size); CACHE/blocks/<2 hex>/<key>[-<block index>]."""
    from cachecore.blocks import file_key
    from cachecore.model import identity_of_stat

    store = m.options.repos["main"]
    st = os.stat(store / rel)
    key = file_key(str(store), rel.encode(), identity_of_stat(st), BLOCK)
    found = sorted((m.cache / "blocks" / key[:2]).glob(key + "*"), key=lambda p: (len(p.name), p.name))
    assert found, f"no cache file for {rel} (key {key}) under {m.cache / 'blocks'}"
    return found


def verify_all(m) -> list[str]:
    """Every file through the mount; returns the wrong ones (EIO raises)."""
    return [rel for rel, content in DAMAGE_FILES.items() if read_fully(m.repo_path("main") / rel) != content]


def test_damaged_block_files_are_refetched(tmp_path, report, lazyfs_mount):
    store, m = primed_cache(tmp_path, lazyfs_mount)
    rng = random.Random(3)

    def truncate(n):
        return lambda p: os.truncate(p, n(p.stat().st_size))

    def overwrite(offset_of, data_of):
        def damage(p):
            size = p.stat().st_size
            with open(p, "r+b") as f:
                f.seek(offset_of(size))
                f.write(data_of(size))
        return damage

    damages = {
        "truncated to 0 bytes": truncate(lambda n: 0),
        "truncated to half its length": truncate(lambda n: n // 2),
        "last byte cut off (checksum trailer torn)": truncate(lambda n: n - 1),
        "overwritten with garbage (same length)": overwrite(lambda n: 0, lambda n: rng.randbytes(n)),
        "one bit flipped in block 0's data": overwrite(lambda n: 1000, lambda n: bytes([rng.randrange(1, 256)])),
        "last 8 bytes (a checksum trailer) replaced by garbage": overwrite(lambda n: n - 8, lambda n: rng.randbytes(8)),
        "garbage appended": lambda p: p.write_bytes(p.read_bytes() + b"garbage!"),
        "deleted": lambda p: p.unlink(),
    }
    targets = {}
    for n, (what, damage) in enumerate(damages.items()):
        rel = f"fam/1.0.0/lib/d{n}.bin"
        target = cache_files_of(m, rel)[0]
        before = target.read_bytes()
        damage(target)
        assert not target.exists() or target.read_bytes() != before, f"{what}: the damage changed nothing"
        targets[what] = (rel, target)
    m.expect_log("damaged")
    mark = m.log_mark()
    m.remount()
    wrong = verify_all(m)
    s = m.stats()
    logged = m.log_lines(since=mark)
    for what, (rel, target) in targets.items():
        named = any(target.name[:64].encode() in line for line in logged)
        report.row(f"cache file of block 0 {what} (while unmounted)",
                   ("WRONG BYTES SERVED" if rel in wrong else "sha256 ok")
                   + ("; log names the damaged cache file" if named else "; nothing logged"))
    report.row("all eight damages at once: counters",
               f"store_reads {s['store_reads']} (>= {len(damages)}: every damaged file refetched), "
               f"cache_hits {s['cache_hits']}; wrong files: {wrong or 'none'}")
    assert not wrong, f"wrong bytes served for {wrong}"
    assert s["store_reads"] >= len(damages), s


def test_damaged_cache_files_swapped(tmp_path, report, lazyfs_mount):
    # Two cache files swapped while unmounted, each whole with valid
    # checksums but holding the other file's bytes (a misdirected write, a
    # file restored under the wrong name, a cache copied from elsewhere).
    # This shows whether the damage check binds the bytes to *which* file
    # version and block they are, not only to themselves.
    store, m = primed_cache(tmp_path, lazyfs_mount)
    a, b = (cache_files_of(m, f"fam/1.0.0/lib/twin{i}.bin")[0] for i in range(2))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) == len(data_b) and data_a != data_b
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    m.expect_log("damaged")
    m.remount()
    wrong = verify_all(m)
    report.row("block-0 cache files of two same-size store files swapped (both whole, valid checksums)",
               "detected, refetched, sha256 ok" if not wrong else
               f"WRONG BYTES SERVED for {', '.join(r.rsplit('/', 1)[1] for r in wrong)}: each file read back "
               "(part of) the other's content; the checksum is not bound to the file version")
    assert not wrong, f"cache files swapped between two file versions were served as their own: {wrong}"


def test_index_removed(tmp_path, report, lazyfs_mount):
    store, m = primed_cache(tmp_path, lazyfs_mount)
    import shutil

    shutil.rmtree(m.cache / "index")
    m.remount()
    assert not verify_all(m)
    s = m.stats()
    report.row("index directory deleted (while unmounted)",
               f"mount rebuilt the index from the store; sha256 ok; store_reads {s['store_reads']} "
               f"(blocks {'reused' if s['store_reads'] == 0 else 'refetched'})")


def test_index_record_garbage(tmp_path, report, lazyfs_mount):
    import diskcache

    store, m = primed_cache(tmp_path, lazyfs_mount)
    key = b"L\0" + os.fsencode(str(store)) + b"\0" + b"fam/1.0.0/lib"
    with diskcache.Cache(str(m.cache / "index")) as db:
        assert db.get(key) is not None, "the listing record key changed; update this test"
        db.set(key, b"RLL1 this is not a listing record")
    m.expect_log("damaged")
    m.remount()
    assert not verify_all(m)
    damaged = [line for line in m.log_lines() if b"damaged" in line]
    report.row("a listing record in the index replaced by garbage bytes",
               "record refused, directory relisted from the store, sha256 ok"
               + ("; logged" if damaged else "; NOT logged"))


def sqlite_damage_header(db: Path) -> str:
    with open(db, "r+b") as f:
        f.write(random.Random(1).randbytes(100))
    return "SQLite header (first 100 bytes) overwritten with garbage"


def sqlite_damage_middle(db: Path) -> str:
    size = db.stat().st_size
    page = 4096
    middle = (size // page // 2) * page
    with open(db, "r+b") as f:
        f.seek(middle)
        f.write(random.Random(2).randbytes(2 * page))
    return f"2 pages in the middle of the SQLite file overwritten with garbage (offset {middle} of {size})"


def sqlite_damage_all_but_header(db: Path) -> str:
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(random.Random(3).randbytes(size - 4096))
    return f"every SQLite page but the first overwritten with garbage ({size} bytes)"


@pytest.mark.parametrize("damage", [sqlite_damage_header, sqlite_damage_middle, sqlite_damage_all_but_header],
                         ids=["header", "middle", "all-but-header"])
def test_index_sqlite_corrupted(tmp_path, report, lazyfs_mount, lazyfs_cli, damage):
    store, m = primed_cache(tmp_path, lazyfs_mount)
    db = m.cache / "index" / "cache.db"
    assert db.exists(), sorted(p.name for p in (m.cache / "index").iterdir())
    what = damage(db) + " (while unmounted)"
    m.expect_log("cache index")  # the daemon logs the refusal it reports
    mp = tmp_path / "mnt-after"
    mp.mkdir()
    mark = m.log_mark()
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", m.cache, "--block-size", "64K")
    if result.returncode != 0:
        outcome = f"mount refused, {result.summary()}"
        report.row(what, outcome)
        assert not is_mounted(mp)
        line = result.one_line_error()
        assert "Traceback" not in result.output
        assert "index" in line or "cache" in line, line
        problems = [p for p in log_problems(m.log_path, since=mark) if "Traceback" in p]
        assert not problems, problems
        return
    wrong, failed = [], []
    for rel, content in DAMAGE_FILES.items():
        try:
            if read_fully(mp / "main" / rel) != content:
                wrong.append(rel)
        except OSError as e:
            failed.append(f"{rel}: {errno.errorcode[e.errno]}")
    assert lazyfs_cli.run("umount", mp).returncode == 0
    time.sleep(0.5)
    problems = log_problems(m.log_path, since=mark, expected=("damaged", "corrupt", "malformed", "unusable"))
    report.row(what, f"mounted; {len(DAMAGE_FILES) - len(wrong) - len(failed)}/{len(DAMAGE_FILES)} files read "
                     f"correctly, {len(wrong)} wrong, failures: {failed or 'none'}; "
                     f"log problems: {problems[:2] or 'none'}")
    assert not wrong, f"wrong bytes served from {wrong}"
    assert not failed, f"the mount came up but reads fail: {failed}\n" + "\n".join(problems[:10])
    assert not problems, "\n".join(problems[:20])


def test_crc_cost_on_the_warm_read_path(tmp_path, report, lazyfs_mount):
    """What verifying every cached block costs on the warm read path: a
    64 MiB file read through the mount with the block cache warm (every
    block read from the cache and verified by the daemon), against the
    checksum alone over the same bytes in the same blocks."""
    import cachecore.blocks

    source = Path(cachecore.blocks.__file__).read_text()
    in_use = "xxh3_64" if "xxh3" in source else "CRC32" if "crc32" in source else "unknown"
    size = 64 * MiB
    store = tmp_path / "store"
    content = deterministic_bytes(size, seed=400)
    write_file(store / "fam/1.0.0/big.bin", content)
    m = lazyfs_mount({"main": store})
    path = m.repo_path("main") / "fam/1.0.0/big.bin"
    assert sha256_file(path) == sha(content)  # cold: fills the block cache

    def timed(fn, runs=3):
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    def warm_read():
        drop_page_cache(path)  # every byte from the daemon, out of its block cache
        with open(path, "rb") as f:
            while f.read(MiB):
                pass

    before = m.stats()
    warm = timed(warm_read)
    after = m.stats()
    assert after["store_reads"] == before["store_reads"], "the warm read went to the store"
    assert after["cache_hits"] - before["cache_hits"] >= 3 * size // BLOCK, "the warm read did not reach the daemon"
    blocks = [content[i:i + BLOCK] for i in range(0, size, BLOCK)]
    checksums = {"CRC32 (zlib.crc32)": lambda: [zlib.crc32(b) for b in blocks]}
    try:
        import xxhash

        checksums["xxh3_64 (xxhash)"] = lambda: [xxhash.xxh3_64_intdigest(b, seed=i) for i, b in enumerate(blocks)]
    except ImportError:
        pass
    cache_files = [p for p in (m.cache / "blocks").glob("*/*") if p.is_file()]

    def read_cache_files():
        for p in cache_files:
            with open(p, "rb", buffering=0) as f:
                while f.read(4 * MiB):
                    pass
    local = timed(read_cache_files)
    report.measure("warm read of a 64 MiB file through the mount (page cache dropped, block cache warm, "
                   "64K blocks), best of 3", f"{warm * 1000:.0f} ms = {size / MiB / warm:.0f} MiB/s")
    report.measure("plain read of the cache files holding those blocks (page cache warm), best of 3",
                   f"{local * 1000:.0f} ms = {size / MiB / local:.0f} MiB/s")
    report.measure("block checksum in use (cachecore/blocks.py)", in_use)
    parts = []
    for name, fn in checksums.items():
        t = timed(fn)
        share = t / warm * 100
        report.measure(f"{name} over the same 64 MiB in 64K blocks, best of 3",
                       f"{t * 1000:.1f} ms = {size / MiB / t:.0f} MiB/s = {share:.1f}% of the warm read")
        parts.append(f"{name}: {size / MiB / t:.0f} MiB/s = {share:.1f}% of it")
    report.row(f"cost of verifying each block on the warm read path (checksum in use: {in_use})",
               f"warm read through the mount {size / MiB / warm:.0f} MiB/s; " + "; ".join(parts))


# 4. the cache disk fills up -----------------------------------------------------------------

def big_store(root: Path, count: int = 8, size: int = 4 * MiB) -> dict[str, bytes]:
    """count files of size bytes, each in its own package version, so later
    versions are first listed when the cache disk is already full."""
    files = {f"fam/{i}.0.0/lib/payload.bin": deterministic_bytes(size, seed=500 + i) for i in range(count)}
    for rel, content in files.items():
        write_file(root / rel, content)
    return files


def test_cache_disk_fills_up(tmp_path, report, scratch_mounts, lazyfs_mount):
    store = tmp_path / "store"
    files = big_store(store)
    cache = scratch_mounts.tmpfs(tmp_path / "cache-disk", size="8m")
    m = lazyfs_mount({"main": store}, cache=cache / "cache")
    m.expect_log("cannot write to the block cache")
    m.expect_log("cannot save metadata in the index")
    m.expect_log("cannot record usage and totals in the index")
    repo = m.repo_path("main")
    outcomes = {}
    for attempt in ("first", "second"):  # the second pass: some blocks cached, the rest from the store
        for rel, content in files.items():
            try:
                if attempt == "second":
                    drop_page_cache(repo / rel)
                got = read_fully(repo / rel)
                outcome = "ok" if got == content else "WRONG BYTES"
            except OSError as e:
                outcome = errno.errorcode[e.errno]
            outcomes.setdefault(outcome, []).append(f"{attempt} read of {rel.split('/')[1]}")
    time.sleep(3)  # a few seconds more of the daemon's own background work on the full disk
    alive = bool(m.daemon_pids()) and is_mounted(m.path)
    text = log_text(m.log_path)
    warned = [line.split(" ", 3)[-1][:110] for line in text.splitlines() if " WARNING " in line]
    errors = [line.split(" ", 3)[-1][:110] for line in text.splitlines() if " ERROR " in line]
    df = os.statvfs(cache)
    report.row("cache on an 8 MiB tmpfs, 8 files of 4 MiB (each in its own version directory) read twice; "
               "log inside the cache dir",
               "; ".join(f"{k}: {len(v)} reads" + ("" if k == "ok" else f" ({v[0]}...)") for k, v in outcomes.items())
               + f"; daemon {'alive' if alive else 'DEAD'}; cache disk {df.f_bavail * df.f_bsize // KiB} KiB free; "
               f"WARNINGs: {warned[:1] or 'none'}; ERRORs: {errors[:2] or 'none'}")
    failed = [f"{what} ({outcome})" for outcome, reads in outcomes.items() if outcome != "ok" for what in reads]
    assert not failed, f"{len(failed)} reads failed with the cache disk full: {', '.join(failed[:3])}..."
    assert alive, "the daemon died"
    assert warned, "no WARNING saying why the cache is not used"


def test_cache_disk_full_before_new_directories_are_visited(tmp_path, report, scratch_mounts, lazyfs_mount):
    # The disk is full to the last byte before anything below the repository
    # root was visited, so the index (SQLite) cannot record new listings
    # either. The log lives elsewhere, so it can say why.
    store = tmp_path / "store"
    files = big_store(store, count=3, size=1 * MiB)
    cache = scratch_mounts.tmpfs(tmp_path / "cache-disk", size="8m")
    m = lazyfs_mount({"main": store}, cache=cache / "cache", log_file=tmp_path / "daemon.log")
    os.listdir(m.repo_path("main"))
    with open(cache / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    for chunk in (4096, 512, 1):  # the last partial pages too
        try:
            with open(cache / "filler", "ab", buffering=0) as f:
                while True:
                    f.write(b"\0" * chunk)
        except OSError:
            pass
    m.expect_log("cannot write")
    m.expect_log("full")
    results = {}
    for rel, content in files.items():
        outcome, elapsed = in_child("read", m.repo_path("main") / rel, timeout=30)
        results[rel] = "sha256 ok" if outcome == sha(content) else outcome
    time.sleep(3)  # a few seconds more of the daemon's own background work on the full disk
    alive = bool(m.daemon_pids()) and is_mounted(m.path)
    text = log_text(m.log_path)
    warned = [line.split(" ", 3)[-1][:120] for line in text.splitlines()
              if " WARNING " in line or " ERROR " in line]
    report.row("cache disk 100% full (filler file) before package directories are first listed",
               f"reads: {sorted(set(results.values()))}; daemon {'alive' if alive else 'DEAD'}; "
               f"log: {warned[:2] or 'nothing'}")
    assert alive, "the daemon died"
    assert all(v == "sha256 ok" for v in results.values()), results
    assert any("WARNING" in line for line in text.splitlines()), "no WARNING saying why"


# 5. a file changes in the store under an immutable repository --------------------------------

def test_file_changed_in_the_store(tmp_path, report, lazyfs_mount):
    store = tmp_path / "store"
    size = 8 * BLOCK + 5
    cases = {
        "whole file cached, then rewritten in place (same size, new mtime)": ("all", "same"),
        "first block cached, then rewritten in place (same size, new mtime)": ("first", "same"),
        "first block cached, then replaced (new file, same size, new mtime)": ("first", "replace"),
        "first block cached, then rewritten with a different size": ("first", "grow"),
        "nothing cached (stat only), then rewritten with a different size": ("none", "shrink"),
    }
    old, new = {}, {}
    for n, case in enumerate(cases):
        rel = f"fam/1.0.0/lib/changing{n}.bin"
        old[case] = deterministic_bytes(size, seed=600 + n)
        write_file(store / rel, old[case])
    m = lazyfs_mount({"main": store})
    repo = m.repo_path("main")
    for n, (case, (cached, change)) in enumerate(cases.items()):
        rel = f"fam/1.0.0/lib/changing{n}.bin"
        m.expect_log(rel)
        if cached == "all":
            assert read_fully(repo / rel) == old[case]
        elif cached == "first":
            before = m.stats()["cache_misses"]
            with open(repo / rel, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
                assert os.pread(f.fileno(), 100, 0) == old[case][:100]
            assert m.stats()["cache_misses"] - before == 1, "more than the first block was fetched"
        else:
            os.stat(repo / rel)
    time.sleep(0.05)  # a new mtime even on a coarse clock
    for n, (case, (cached, change)) in enumerate(cases.items()):
        rel = f"fam/1.0.0/lib/changing{n}.bin"
        path = store / rel
        new_size = {"same": size, "replace": size, "grow": size + 3 * BLOCK, "shrink": 2 * BLOCK + 1}[change]
        new[case] = deterministic_bytes(new_size, seed=700 + n)
        if change == "replace":
            write_file(path.with_name(path.name + ".new"), new[case])
            os.replace(path.with_name(path.name + ".new"), path)
        else:
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(new[case])
    mark = m.log_mark()
    bad = []
    for n, case in enumerate(cases):
        rel = f"fam/1.0.0/lib/changing{n}.bin"
        drop_page_cache(repo / rel)
        try:
            data = read_fully(repo / rel)
            outcome = ("old version, whole" if data == old[case] else
                       "new version, whole" if data == new[case] else
                       f"MIXED/WRONG BYTES ({len(data)} bytes)")
        except OSError as e:
            outcome = errno.errorcode[e.errno]
        logged = [line for line in m.log_lines(since=mark) if rel.encode() in line]
        report.row(case, outcome + ("; log names the file: " + logged[0].decode(errors="replace").split(": ", 1)[-1][:110]
                                    if logged else "; no log line names the file"))
        if outcome not in ("old version, whole", "new version, whole", "EIO"):
            bad.append(f"{case}: {outcome}")
        elif outcome == "EIO" and not logged:
            bad.append(f"{case}: EIO but no log line names {rel}")
    assert not bad, "\n".join(bad)


# 6. 32 processes read the same cold file ----------------------------------------------------

READERS_32 = 32
# 128 MiB rather than the 1 GiB: on 2 cores 1 GiB takes minutes
# through the Python daemon and proves nothing more -- what is tested is
# that concurrent requests for the same blocks are fetched once (2048 blocks).
BIG = 128 * MiB

COLD_READER = r"""
import hashlib, os, sys, time
path, direct = sys.argv[1], sys.argv[2] == "direct"
print("ready", flush=True)
sys.stdin.read(1)
start = time.monotonic()
h = hashlib.sha256()
if direct:  # O_DIRECT: every read goes to the daemon, none is answered by the page cache
    import mmap
    buf = mmap.mmap(-1, 1 << 20)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    while n := os.readv(fd, [buf]):
        h.update(buf[:n])
    os.close(fd)
else:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
print(h.hexdigest(), time.monotonic() - start)
"""


def test_thirty_two_processes_read_one_cold_file(tmp_path, report, lazyfs_mount):
    store = tmp_path / "store"
    rel = "fam/1.0.0/lib/big.bin"
    content = deterministic_bytes(BIG, seed=800)
    write_file(store / rel, content)
    expected = sha(content)
    del content
    m = lazyfs_mount({"main": store})
    path = m.repo_path("main") / rel
    os.stat(path)
    before = m.stats()
    direct = 4  # of the 32 bypass the page cache, so the daemon sees truly concurrent requests
    procs = [subprocess.Popen([sys.executable, "-c", COLD_READER, path, "direct" if i < direct else "buffered"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
             for i in range(READERS_32)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for p in procs:  # go, all at once
            p.stdin.close()
        outs = [p.stdout.read().split() for p in procs]
        wall = time.monotonic() - start
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe and not pipe.closed:
                    pipe.close()
    after = m.stats()
    delta = {k: after[k] - before[k] for k in ("store_reads", "cache_misses", "cache_hits", "store_bytes")}
    nblocks = -(-BIG // BLOCK)
    good = sum(1 for o in outs if o and o[0] == expected)
    report.row(f"{READERS_32} processes ({direct} with O_DIRECT) read one cold {BIG // MiB} MiB file at once ({nblocks} blocks)",
               f"{good}/{READERS_32} got the right sha256 in {wall:.1f}s; store_reads {delta['store_reads']}, "
               f"cache_misses {delta['cache_misses']}, cache_hits {delta['cache_hits']}, "
               f"store_bytes {delta['store_bytes']} (file {BIG})")
    assert good == READERS_32, outs
    assert delta["store_reads"] == nblocks, delta
    assert delta["cache_misses"] == nblocks, delta
    assert delta["store_bytes"] == BIG, delta
