"""Liveness (issue 15, findings 8, 9, 10 and two of 15): a stalled cache disk,
a stopped daemon, a directory slower to list than the store timeout, a mount
at a non-ASCII path, a store path at or inside the mount point. Each with
real mounts and real processes: the stalls are FUSE servers (FaultFS, and
FaultDisk as the cache directory) or the daemon itself, frozen with SIGSTOP.
Every command and every request must return within a stated bound and say
what it found in one line. Rows go to the fault report (tests/helpers/faults.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from helpers.faults import (
    daemon_pid,
    fault_store_fixture,
    in_child,
    lazyfs_cli_fixture,
    lazyfs_mount_at_fixture,
    log_text,
    report_fixture,
    wait_gone,
)
from helpers.mounts import is_mounted
from helpers.trees import KiB, deterministic_bytes, write_file
from mount.mounts import PROBE_TIMEOUT

# pytest finds these fixtures here (report is autouse); the names they go by
# in tests are report, fault_store, lazyfs_cli and lazyfs_mount_at.
FIXTURES = (report_fixture, fault_store_fixture, lazyfs_cli_fixture, lazyfs_mount_at_fixture)

AREAS = {
    "test_cache_disk": "liveness: cache disk stalls",
    "test_daemon_stopped": "liveness: daemon stopped",
    "test_slow_directory": "liveness: slow directory",
    "test_stats": "liveness: mount table",
    "test_store_path": "liveness: store path and mount point",
}

BLOCK = 64 * KiB  # the lazyfs_mount fixture mounts with --block-size 64K
STORE_TIMEOUT = 2.0
SLACK = 1.5  # seconds allowed on top of a timeout (process start, a loaded machine)
# A command facing a mount that does not answer: one probe, then its answer.
COMMAND_BOUND = PROBE_TIMEOUT + 5.0
PROMPT = 1.0  # seconds for a request the daemon answers from memory


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- 8. the cache disk stalls ------------------------------------------------------------

def test_cache_disk_stalls(tmp_path, report, fault_store, lazyfs_mount, lazyfs_cli):
    """The cache directory on a FUSE filesystem whose server is SIGSTOPped (as a
    home directory on NFS or sshfs stalls): cached reads fall back to the store,
    other requests are answered meanwhile, and umount returns."""
    timeout = 4.0  # --store-timeout, which bounds cache-disk calls too
    store = tmp_path / "store"
    files = {
        "fam/1.0.0/package.py": b"name = 'fam'\nversion = '1.0.0'\n",
        "fam/1.0.0/lib/small.bin": deterministic_bytes(5000, seed=800),  # one block
        "fam/1.0.0/lib/big.bin": deterministic_bytes(3 * BLOCK + 7, seed=801),
        "fam/1.0.0/lib/other.bin": b"never looked at before the stall\n",
    }
    for rel, content in files.items():
        write_file(store / rel, content)
    disk_source = tmp_path / "disk"
    disk_source.mkdir(mode=0o700)
    disk = fault_store(disk_source, writable=True)
    # The log stays where it is by default, on the disk that stalls: its
    # records are written by a thread of their own, so logging waits for no one.
    m = lazyfs_mount({"main": store}, cache=disk.path, store_timeout=timeout)
    m.expect_log("did not answer within")
    lib = m.repo_path("main") / "fam/1.0.0/lib"
    for name in ("small.bin", "big.bin"):
        assert in_child("read", lib / name, timeout=30)[0] == sha(files[f"fam/1.0.0/lib/{name}"])
    fetched = m.stats()["store_reads"]
    assert in_child("read", lib / "small.bin", timeout=30)[0] == sha(files["fam/1.0.0/lib/small.bin"])
    assert m.stats()["store_reads"] == fetched, "small.bin is not served from the cache"
    pid = daemon_pid(m)

    def ended(op, path):
        outcome, took = in_child(op, path, timeout=30)
        return outcome, took, time.monotonic()

    disk.freeze()
    try:
        results = {}
        reader = threading.Thread(target=lambda: results.update(small=ended("read", lib / "small.bin")))
        reader.start()
        time.sleep(1.0)  # the read is waiting on the disk by now (it waits `timeout`)
        stat_started = time.monotonic()
        stat_outcome, stat_t, _ = ended("stat", lib / "other.bin")
        statfs_outcome, statfs_t, statfs_ended = ended("statfs", m.path)
        reader.join()
        small, small_t, small_ended = results["small"]
        big, big_t, _ = ended("read", lib / "big.bin")
        report.row("cache directory on a FUSE filesystem whose server is SIGSTOPped; a cached "
                   "one-block file read, meanwhile a stat of a file never stat'd and a statfs",
                   f"one-block read: {'sha256 ok' if small == sha(files['fam/1.0.0/lib/small.bin']) else small} "
                   f"in {small_t:.2f}s (from the store after the {timeout:g}s cache timeout); "
                   f"stat {stat_outcome} in {stat_t:.3f}s and statfs {statfs_outcome} in {statfs_t:.3f}s "
                   f"while it waited; then a 4-block cached file: "
                   f"{'sha256 ok' if big == sha(files['fam/1.0.0/lib/big.bin']) else big} in {big_t:.2f}s")
        assert small == sha(files["fam/1.0.0/lib/small.bin"]), f"cached read with the disk stalled: {small}"
        assert small_t <= timeout + SLACK, f"cached read took {small_t:.2f}s"
        assert small_ended - small_t <= stat_started and statfs_ended <= small_ended, \
            "stat and statfs did not run while the read waited on the disk: the test proves nothing"
        assert stat_outcome == "ok" and stat_t <= PROMPT, f"stat: {stat_outcome} in {stat_t:.2f}s"
        assert statfs_outcome == "ok" and statfs_t <= PROMPT, f"statfs: {statfs_outcome} in {statfs_t:.2f}s"
        assert big == sha(files["fam/1.0.0/lib/big.bin"]), f"multi-block read: {big}"
        assert big_t <= timeout + SLACK, f"multi-block read took {big_t:.2f}s"
    finally:
        disk.thaw()
    time.sleep(0.5)  # the log's writer thread catches up once the disk answers
    lines = [line for line in log_text(m.log_path).splitlines() if "did not answer within" in line]
    assert len(lines) == 1 and str(disk.path) in lines[0], f"log lines about the stall: {lines}"
    assert "on a filesystem that can stall" in log_text(m.log_path), \
        "the daemon did not classify a FUSE cache directory as one that can stall"

    # Back: after one cache timeout the cache answers again, and serves.
    time.sleep(timeout)
    fetched = m.stats()["store_reads"]
    again, _ = in_child("read", lib / "small.bin", timeout=30)
    again, _ = in_child("read", lib / "small.bin", timeout=30)
    assert again == sha(files["fam/1.0.0/lib/small.bin"])
    assert "answers again" in log_text(m.log_path)
    refetched = m.stats()["store_reads"] - fetched

    disk.freeze()
    try:
        result, took = timed(lazyfs_cli.run, "umount", m.path, timeout=60, track=False)
        unmounted = not is_mounted(m.path)
        report.row("`rez-lazyfs umount` with the cache disk stalled",
                   f"{result.summary()} in {took:.2f}s; {'unmounted' if unmounted else 'STILL MOUNTED'}")
        assert result.returncode == 0, result.output
        assert unmounted
        assert took <= COMMAND_BOUND, f"umount took {took:.2f}s"
        m.mounted = False
    finally:
        disk.thaw()
    wait_gone(pid, 15)
    report.row("the cache disk answers again (SIGCONT)",
               f"one line 'answers again' in the log; the next reads from the cache "
               f"({refetched} store read(s) for 2 reads); the daemon exited after the unmount")
    assert refetched <= 1


# -- 9. the daemon stopped ---------------------------------------------------------------

def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rez-lazyfs: "), \
        f"expected one rez-lazyfs line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.output
    return lines[0]


def test_daemon_stopped_stats_mount_umount(tmp_path, report, lazyfs_mount, lazyfs_cli):
    store = tmp_path / "store"
    write_file(store / "fam/1.0.0/package.py", "name = 'fam'\n")
    m = lazyfs_mount({"main": store}, store_timeout=STORE_TIMEOUT, metadata_ttl=1.0)
    assert os.listdir(m.repo_path("main") / "fam") == ["1.0.0"]
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the kernel's cached attributes of the mount root expire
        said = f"daemon pid {pid} is stopped"

        stats, took = timed(lazyfs_cli.run, "stats", "--cache", m.cache, timeout=60)
        line = _one_line(stats)
        report.row("`rez-lazyfs stats` with the mount's daemon SIGSTOPped",
                   f"exit {stats.returncode} in {took:.2f}s: {line}; the table lists the mount with "
                   "its last saved figures")
        assert stats.returncode == 0 and took <= COMMAND_BOUND, (stats.output, took)
        assert "does not answer" in line and said in line, line
        assert f"mount:{m.path}" in stats.stdout and "(running)" not in stats.stdout

        again, took = timed(lazyfs_cli.run, "mount", m.path, "--repo", f"main={store}",
                            "--cache", tmp_path / "cache2", timeout=60, track=False)
        line = _one_line(again)
        report.row("a second `rez-lazyfs mount` at the same path", f"exit {again.returncode} in "
                   f"{took:.2f}s: {line}")
        assert again.returncode == 1 and took <= COMMAND_BOUND, (again.output, took)
        assert line.startswith("rez-lazyfs: error: ") and said in line and "umount" in line, line

        umount, took = timed(lazyfs_cli.run, "umount", m.path, timeout=60, track=False)
        line = _one_line(umount)
        unmounted = not is_mounted(m.path)
        report.row("`rez-lazyfs umount`", f"exit {umount.returncode} in {took:.2f}s: {line}; "
                   f"{'unmounted' if unmounted else 'STILL MOUNTED'}")
        assert umount.returncode == 0 and took <= COMMAND_BOUND, (umount.output, took)
        assert said in line and "unmounted it anyway" in line, line
        assert unmounted
        m.mounted = False
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_gone(pid, 15)
    report.row("the daemon continued (SIGCONT) after the unmount", "it exited")


def test_daemon_stopped_busy_umount_then_lazy(tmp_path, report, lazyfs_mount, lazyfs_cli):
    store = tmp_path / "store"
    write_file(store / "fam/1.0.0/package.py", "name = 'fam'\n")
    m = lazyfs_mount({"main": store}, store_timeout=STORE_TIMEOUT)
    # A process whose working directory is in the mount keeps it busy.
    holder = subprocess.Popen(["sleep", "120"], cwd=m.repo_path("main") / "fam")
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)
        plain, took = timed(lazyfs_cli.run, "umount", m.path, timeout=60, track=False)
        line = _one_line(plain)
        report.row("`rez-lazyfs umount` of a busy mount whose daemon is SIGSTOPped",
                   f"exit {plain.returncode} in {took:.2f}s: {line}")
        assert plain.returncode == 1 and took <= COMMAND_BOUND, (plain.output, took)
        assert "busy" in line.lower() and "--lazy" in line and "is stopped" in line, line
        assert is_mounted(m.path)

        lazy, took = timed(lazyfs_cli.run, "umount", "--lazy", m.path, timeout=60, track=False)
        line = _one_line(lazy)
        unmounted = not is_mounted(m.path)
        report.row("`rez-lazyfs umount --lazy`", f"exit {lazy.returncode} in {took:.2f}s: {line}; "
                   f"{'detached' if unmounted else 'STILL MOUNTED'}")
        assert lazy.returncode == 0 and took <= COMMAND_BOUND, (lazy.output, took)
        assert "unmounted it lazily anyway" in line, line
        assert unmounted
        m.mounted = False
    finally:
        holder.kill()
        holder.wait()
        os.kill(pid, signal.SIGCONT)
    wait_gone(pid, 15)


# -- 10. a directory slower to list than the store timeout ------------------------------------

def test_slow_directory_listing_finishes(tmp_path, report, fault_store, lazyfs_mount):
    source = tmp_path / "source"
    write_file(source / "fam/1.0.0/package.py", "name = 'fam'\n")
    big = [f"module{i:03d}.py" for i in range(60)]
    for name in big:
        write_file(source / "fam/1.0.0/python/big" / name, f"# {name}\n")
    small = ["a.py", "b.py", "c.py"]
    for name in small:
        write_file(source / "fam/1.0.0/python/small" / name, f"# {name}\n")
    fs = fault_store(source)
    m = lazyfs_mount({"main": fs.path}, store_timeout=STORE_TIMEOUT)
    m.expect_log(str(fs.path))
    python = m.repo_path("main") / "fam/1.0.0/python"
    assert sorted(os.listdir(python)) == ["big", "small"]
    pid = daemon_pid(m)
    threads_before = thread_count(pid)
    listings_before = m.stats()["store_listings"]

    # Each lookup and getattr of the store answers in 40 ms: listing 60
    # entries takes ~5 s (two requests each), each step well within the timeout.
    delay = 0.04
    fs.set(delay=delay, slow_ops=["lookup", "getattr"])
    results, threads = {}, []
    lister = threading.Thread(target=lambda: results.update(
        big=in_child("list", python / "big", timeout=60), big_ended=time.monotonic()))
    lister.start()
    time.sleep(1.0)
    small_outcome, small_t = in_child("list", python / "small", timeout=30)
    small_ended = time.monotonic()
    while lister.is_alive():
        threads.append(thread_count(pid))
        time.sleep(0.1)
    lister.join()
    fs.set()
    big_outcome, big_t = results["big"]
    threads_after = thread_count(pid)
    listings = m.stats()["store_listings"] - listings_before
    report.row(f"a {len(big)}-entry store directory whose entries answer in {delay * 1000:.0f} ms "
               f"each (store timeout {STORE_TIMEOUT:g}s); a 3-entry one listed meanwhile",
               f"the big listing: {'all names' if big_outcome.split(',') == big else big_outcome} "
               f"in {big_t:.1f}s; the small one: "
               f"{'all names' if small_outcome.split(',') == small else small_outcome} in {small_t:.2f}s; "
               f"{listings} store listings; daemon threads {threads_before} before, at most "
               f"{max(threads)} during, {threads_after} after")
    assert big_outcome.split(",") == big, f"the slow listing: {big_outcome} after {big_t:.1f}s"
    assert big_t > STORE_TIMEOUT, f"the listing took {big_t:.1f}s: the test proves nothing"
    assert small_outcome.split(",") == small, f"the small listing: {small_outcome}"
    assert small_t <= STORE_TIMEOUT, f"the small listing took {small_t:.2f}s"
    assert results["big_ended"] - big_t <= small_ended - small_t and small_ended <= results["big_ended"], \
        "the small listing did not run while the big one was listed: the test proves nothing"
    assert listings == 2, f"{listings} listings completed: the slow one was restarted"
    # One store thread for each listing and one for the index; trio keeps idle ones.
    assert max(threads) <= threads_before + 3, (threads_before, threads)

    m.remount(offline=True)
    offline = sorted(os.listdir(m.repo_path("main") / "fam/1.0.0/python/big"))
    report.row("remounted --offline (the store is never asked)",
               f"the slow directory is listed from the index: {len(offline)} names")
    assert offline == big


# -- 15. the mount table, store paths -----------------------------------------------------------

def test_stats_sees_a_mount_at_a_non_ascii_path(tmp_path, report, lazyfs_mount_at, lazyfs_cli):
    store = tmp_path / "store"
    write_file(store / "fam/1.0.0/package.py", "name = 'fam'\n")
    mp = tmp_path / "mnt é ü 🐍"
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=tmp_path / "cache")
    assert (m.repo_path("main") / "fam/1.0.0/package.py").read_bytes().startswith(b"name")
    result, took = timed(lazyfs_cli.run, "stats", "--cache", m.cache, "--json", timeout=60)
    sources = {s["name"]: s for s in json.loads(result.stdout)["sources"]}
    running = sources.get(f"mount:{mp}", {}).get("running")
    report.row("`rez-lazyfs stats` with a running mount at a path with spaces and non-ASCII "
               "characters", f"exit {result.returncode} in {took:.2f}s; the mount is listed "
               f"{'as running' if running else 'as NOT running'}; bytes served: "
               f"{sources.get(f'mount:{mp}', {}).get('bytes_served')}")
    assert result.returncode == 0, result.output
    assert running, f"not recognised as running: {sources}"
    assert sources[f"mount:{mp}"]["bytes_served"] > 0  # asked live: the read is counted


@pytest.mark.parametrize("case", ["the mount point", "inside the mount point",
                                  "containing the mount point"])
def test_store_path_and_mount_point_overlap(tmp_path, report, lazyfs_cli, case):
    """Each overlap was accepted, and served a tree without end (the mount
    listing itself as its store)."""
    store = tmp_path / "store"
    write_file(store / "fam/1.0.0/package.py", "name = 'fam'\n")
    mp = tmp_path / "mp"
    cache = tmp_path / "cache"
    mp.mkdir()
    if case == "the mount point":
        repo = mp
    elif case == "inside the mount point":
        # A store the cache knows, gone from MP/main before MP is mounted: the
        # mount would serve what is cached, then list itself as the store.
        repo = mp / "main"
        store.rename(repo)
        (tmp_path / "elsewhere").mkdir()
        first = lazyfs_cli.run("mount", tmp_path / "elsewhere", "--repo", f"main={repo}",
                               "--cache", cache)
        assert first.returncode == 0, first.output
        assert os.listdir(tmp_path / "elsewhere/main") == ["fam"]
        assert lazyfs_cli.run("umount", tmp_path / "elsewhere").returncode == 0
        repo.rename(store)
    else:
        mp.rmdir()
        mp = store / "mnt"
        mp.mkdir()
        repo = store
    cache_existed = cache.exists()
    result, took = timed(lazyfs_cli.run, "mount", mp, "--repo", f"main={repo}", "--cache", cache,
                         timeout=60)
    report.row(f"--repo main=STORE with STORE {case}"
               + (" (a store the cache knows, now missing)" if cache_existed else ""),
               f"{result.summary()} in {took:.2f}s")
    assert result.returncode == 1, f"accepted: {result.output}"
    line = result.one_line_error()
    assert ("would serve itself" if case != "containing the mount point"
            else "in its own tree") in line, line
    assert not is_mounted(mp)
    assert cache.exists() == cache_existed, "the refused mount created its cache directory"
    assert took <= COMMAND_BOUND
