"""Transparent mode (issue 13): `rez-lazyfs mount --over STORE` puts the
cached view of the repository at the store's own path, over the store,
which the daemon keeps reading through a descriptor opened before it
mounted. Real mounts, real rez, real processes: the store is a FaultFS
mount (tests/helpers/faults.py: it counts every read that reaches it, and
fails or stalls on demand) or a bind mount standing for NFS, and the
transparent mount goes on top of it, as it would on top of a filer's mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.faults import (
    fault_store_fixture,
    in_child,
    lazyfs_cli_fixture,
    report_fixture,
    scratch_mounts_fixture,
    wait_gone,
)
from helpers.mounts import (
    LAZYFS,
    MountOptions,
    is_daemon,
    processes_with_marker,
)
from helpers.namespaces import mount_namespace  # noqa: F401 (a fixture)
from helpers.over import lazyfs_mounted_at, over_mount_fixture
from helpers.rezrepo import Rez, Symlink, build_store
from helpers.trees import KiB, deterministic_bytes, write_file

from .test_contexts import PROBE, REQUEST, ROOTS, STORE, files_the_context_uses

# (admin_namespace and supervise are fixtures: mount(8) in a namespace, a unit's ExecStart)
from .test_login import (  # noqa: F401
    admin_namespace,
    command_line,
    install_unit,
    supervise,
)

# pytest finds these fixtures here; tests use them as report, fault_store,
# scratch_mounts, lazyfs_cli and over_mount (requested last: torn down first).
FIXTURES = (report_fixture, fault_store_fixture, scratch_mounts_fixture, lazyfs_cli_fixture,
            over_mount_fixture)

AREAS = {
    "test_a_context": "transparent: contexts",
    "test_a_package": "transparent: absolute paths",
    "test_remounted": "transparent: store gone",
    "test_a_killed": "transparent: fail open",
    "test_refusals": "transparent: refusals",
    "test_bake": "transparent: cache commands",
    "test_umount": "transparent: umount",
    "test_a_hung": "transparent: fail open",
    "test_several": "transparent: several repositories",
    "test_the_unit": "transparent: fail open",
    "test_a_transparent_unit": "transparent: systemd unit",
    "test_an_fstab": "transparent: fstab",
}

BLOCK = 64 * KiB  # the fixtures mount with --block-size 64K
STORE_TIMEOUT = 2.0
SLACK = 1.5  # seconds on top of a bound (process start, a loaded machine)
# README, "Transparent mode": how long a path answers ENOTCONN after its
# daemon is killed (the supervisor detaches the mount the moment it dies;
# ~10 ms measured), and how long until a new daemon serves it again.
DEAD_FOR = 1.0
REMOUNTED_WITHIN = 15.0


def mount_entry(path: Path) -> list[str] | None:
    """The fields of the top mount at *path* in /proc/self/mountinfo after
    the separator (fstype, source, options), or None."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            if left.split(b" ")[4] == os.fsencode(path):
                found = right.decode().split(" ")
    return found


def wait_for(condition, timeout: float, step: float = 0.02) -> float:
    """Seconds until condition() held; fails after *timeout*."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {condition}"
        time.sleep(step)
    return time.monotonic() - start


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bypassing_page_cache(path: Path) -> bytes:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


# -- 1. a context resolved against the store runs unchanged -----------------------------------

def test_a_context_resolved_against_the_store_runs_unchanged_through_the_cache(
        tmp_path, report, fault_store, over_mount):
    source = tmp_path / "source"
    build_store(source, STORE)
    fs = fault_store(source)
    (tmp_path / "rez").mkdir()
    rez = Rez(tmp_path / "rez")
    context = rez.resolve(REQUEST, [fs.path], tmp_path / "shot.rxt")  # before any mount
    original = context.read_bytes()

    m = over_mount(fs.path)
    assert mount_entry(fs.path)[:2] == ["fuse.rez-lazyfs", "rez-lazyfs-over"]
    fs.set()  # count from here
    first = rez.source(context, [sys.executable, "-c", PROBE, *ROOTS])
    assert first.returncode == 0, first.stderr
    seen = json.loads(first.stdout)
    store = str(fs.path)
    assert seen["roots"] == {name: f"{store}/{root}" for name, root in ROOTS.items()}
    assert seen["lazyhello"] == f"lazyhello ran from {store}/tools/1.0/bin/lazyhello\n"
    assert seen["modules"] == {
        "lazymod": f"{store}/tools/1.0/python/lazymod.py",
        "plugin_variant": f"{store}/plugin/1.0/pyver-2/python/plugin_variant.py"}
    counts, stats = fs.counts(), m.stats()
    # Every read that reached the store was the daemon's: each file read from
    # the store is cached now, and no block of it was read twice.
    read_from_store = sorted(counts["by_file"])
    cached = {rel: os.getxattr(fs.path / rel, "user.rezlazyfs.cached").decode()
              for rel in read_from_store}
    assert read_from_store and all(not c.startswith("0/") for c in cached.values()), cached
    assert all(n == 1 for offsets in counts["by_file"].values() for n in offsets.values()), counts
    assert stats["store_reads"] >= len(read_from_store) and stats["bytes_served"] > 0

    fs.set()
    again = rez.source(context, [sys.executable, "-c", PROBE, *ROOTS])
    assert again.returncode == 0 and json.loads(again.stdout) == seen, again.stderr
    assert fs.counts()["reads"] == 0, fs.counts()
    assert m.stats()["store_reads"] == stats["store_reads"]
    assert context.read_bytes() == original, "the context was changed"
    report.row("a context resolved by rez-env against the store before the mount, sourced "
               "with rez-env --input through `mount --over STORE`",
               f"runs; every root is the store's own path; first run: {counts['reads']} reads "
               f"of {len(read_from_store)} files reached the store, all the daemon's (each "
               f"block once, each now cached); second run: 0 reads reached the store")


# -- 2. absolute self-references: a script exec'ing its own path, an absolute rpath --------------

LIB_C = r"""
const char *helper_message(void) { return "hello from libhelper"; }
"""
PROGRAM_C = r"""
#include <stdio.h>
const char *helper_message(void);
int main(void) { printf("%s\n", helper_message()); return 0; }
"""


def test_a_package_naming_its_own_store_path_runs_unchanged(tmp_path, report, over_mount):
    store = tmp_path / "svr" / "packages"
    version = store / "pkg" / "1.0"
    build_store(store, {
        "pkg/1.0/package.py": "name = 'pkg'\nversion = '1.0'\n",
        # A wrapper naming its package by absolute store path, as sites write them.
        "pkg/1.0/bin/tool": f"#!/bin/sh\nexec {version}/bin/helper \"$@\"\n",
        "pkg/1.0/bin/helper": "#!/bin/sh\necho \"helper ran as $0 with $*\"\n",
        "other/2.0/share/config.json": '{"from": "other"}\n',
        # A symlink into another package, by absolute store path.
        "pkg/1.0/share/config.json": Symlink(f"{store}/other/2.0/share/config.json"),
    })
    build = tmp_path / "build"
    build.mkdir()
    (build / "lib.c").write_text(LIB_C)
    (build / "prog.c").write_text(PROGRAM_C)
    (version / "lib").mkdir()
    for args in (["-shared", "-fPIC", "-o", version / "lib/libhelper.so", "lib.c"],
                 # An absolute rpath into its own package, as the build machine wrote it.
                 ["-o", version / "bin/prog", "prog.c", "-L", version / "lib", "-lhelper",
                  f"-Wl,-rpath,{version}/lib"]):
        done = subprocess.run(["gcc", *map(str, args)], cwd=build, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    m = over_mount(store)
    tool = subprocess.run([version / "bin/tool", "x"], capture_output=True, text=True, cwd="/")
    assert tool.returncode == 0 and tool.stdout == f"helper ran as {version}/bin/helper with x\n", \
        tool.stderr
    prog = subprocess.run([version / "bin/prog"], capture_output=True, text=True, cwd="/")
    assert prog.returncode == 0 and prog.stdout == "hello from libhelper\n", prog.stderr
    for write in (lambda: open(version / "bin/tool", "a"), lambda: (version / "new").mkdir()):
        with pytest.raises(OSError) as refused:
            write()
        assert refused.value.errno == errno.EROFS  # read-only, as any mount
    link = version / "share/config.json"
    assert os.readlink(link) == f"{store}/other/2.0/share/config.json"
    assert link.read_text() == '{"from": "other"}\n'
    assert os.getxattr(link, "user.rezlazyfs.store_path", follow_symlinks=True) == \
        os.fsencode(store / "other/2.0/share/config.json")
    # All of it came through the mount: each file is in its cache.
    cached = {rel: os.getxattr(version / rel, "user.rezlazyfs.cached").decode()
              for rel in ("bin/tool", "bin/helper", "bin/prog", "lib/libhelper.so")}
    sizes = {rel: (version / rel).stat().st_size for rel in cached}
    assert cached == {rel: f"{size}/{size}" for rel, size in sizes.items()}, cached
    assert m.stats()["store_reads"] >= len(cached)
    report.row("a wrapper exec'ing /STORE/pkg/1.0/bin/helper, a program linked with an "
               "absolute rpath into /STORE/pkg/1.0/lib, a symlink to /STORE/other/2.0/..., "
               "through `mount --over STORE`",
               "both run unchanged, the link reads the other package through the mount; the "
               "script, the helper, the program and its library are each cached whole")


# -- 3. the store goes away: the cache serves what was read, EIO for the rest ---------------------

def test_remounted_over_a_store_gone_or_failing_serves_what_was_read(
        tmp_path, report, fault_store, scratch_mounts, over_mount):
    source = tmp_path / "source"
    files = {
        "fam/1.0/package.py": b"name = 'fam'\nversion = '1.0'\n",
        "fam/1.0/lib/read.bin": deterministic_bytes(3 * BLOCK + 5, seed=1300),
        "fam/1.0/lib/unread.bin": deterministic_bytes(2 * BLOCK, seed=1301),
        "fam/1.0/data/unlisted/x.txt": b"in a directory never listed\n",
    }
    for rel, content in files.items():
        write_file(source / rel, content)
    # The store's filesystem: a bind mount standing for the filer's NFS mount.
    store = scratch_mounts.bind(source, tmp_path / "svr" / "packages")
    m = over_mount(store, store_timeout=STORE_TIMEOUT)
    lib = store / "fam/1.0/lib"
    assert read_bypassing_page_cache(lib / "read.bin") == files["fam/1.0/lib/read.bin"]
    assert sorted(os.listdir(lib)) == ["read.bin", "unread.bin"]
    assert os.listdir(store / "fam/1.0/data") == ["unlisted"]
    m.unmount()
    scratch_mounts.umount(store)  # the filer's mount goes: an empty directory is left
    assert os.listdir(store) == []

    m.expect_log(str(store))
    m.remount()
    assert mount_entry(store)[0] == "fuse.rez-lazyfs"
    outcome, took = in_child("read", lib / "read.bin", timeout=30)
    assert outcome == sha(files["fam/1.0/lib/read.bin"]), outcome
    assert sorted(os.listdir(lib)) == ["read.bin", "unread.bin"]
    unread, unread_t = in_child("read", lib / "unread.bin", timeout=30)
    unlisted, unlisted_t = in_child("list", store / "fam/1.0/data/unlisted", timeout=30)
    report.row("unmounted, the store's filesystem unmounted (an empty directory left), "
               "`mount --over` again from the cache",
               f"a file read before: {'sha256 ok' if outcome == sha(files['fam/1.0/lib/read.bin']) else outcome} "
               f"in {took:.2f}s; a file listed, never read: {unread} in {unread_t:.2f}s; a "
               f"directory never listed: {unlisted} in {unlisted_t:.2f}s")
    assert unread == "EIO" and unread_t <= STORE_TIMEOUT + SLACK, (unread, unread_t)
    assert unlisted == "EIO" and unlisted_t <= STORE_TIMEOUT + SLACK, (unlisted, unlisted_t)
    m.remount(offline=True)  # the store never asked: the same, from the cache alone
    offline = [in_child("read", lib / name, timeout=30)[0] for name in ("read.bin", "unread.bin")]
    assert offline == [sha(files["fam/1.0/lib/read.bin"]), "EIO"], offline
    m.unmount()

    # The same, with the store there but failing every request (a filer
    # answering EIO) while it is mounted over.
    fs = fault_store(source)
    failing = over_mount(fs.path, store_timeout=STORE_TIMEOUT, cache=tmp_path / "cache-failing")
    failing.expect_log(str(fs.path))
    flib = fs.path / "fam/1.0/lib"
    assert read_bypassing_page_cache(flib / "read.bin") == files["fam/1.0/lib/read.bin"]
    assert sorted(os.listdir(flib)) == ["read.bin", "unread.bin"]
    fs.set("eio")
    outcome, took = in_child("read", flib / "read.bin", timeout=30)
    unread, unread_t = in_child("read", flib / "unread.bin", timeout=30)
    report.row("mounted over a store that then fails every request with EIO",
               f"a file read before: {'sha256 ok' if outcome == sha(files['fam/1.0/lib/read.bin']) else outcome} "
               f"in {took:.2f}s; a file never read: {unread} in {unread_t:.2f}s")
    assert outcome == sha(files["fam/1.0/lib/read.bin"]) and took <= SLACK, (outcome, took)
    assert unread == "EIO" and unread_t <= STORE_TIMEOUT + SLACK, (unread, unread_t)
    fs.set()


# -- 4. the daemon is killed while a reader loops ----------------------------------------------------

READER = r"""
import errno, hashlib, json, os, sys, time
path, want, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
changes, counts, last = [], {}, None
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            outcome = "ok" if hashlib.sha256(f.read()).hexdigest() == want else "WRONG BYTES"
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e.errno))
    counts[outcome] = counts.get(outcome, 0) + 1
    if outcome != last:
        changes.append([time.monotonic(), outcome])
        last = outcome
    time.sleep(0.002)
print(json.dumps({"changes": changes, "counts": counts}))
"""


def test_a_killed_daemon_leaves_the_path_served(tmp_path, report, fault_store, over_mount):
    source = tmp_path / "source"
    data = deterministic_bytes(3 * BLOCK + 11, seed=1400)
    write_file(source / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(source / "fam/1.0/lib/big.bin", data)
    fs = fault_store(source)
    m = over_mount(fs.path, store_timeout=STORE_TIMEOUT)
    target = fs.path / "fam/1.0/lib/big.bin"
    assert read_bypassing_page_cache(target) == data
    [daemon] = m.daemons()
    [supervisor] = m.supervisors()
    m.expect_log("was killed by SIGKILL")

    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), sha(data), "12"],
                              stdout=subprocess.PIPE, text=True, cwd="/")
    time.sleep(2.0)
    fs.set()
    mark = m.log_mark()
    killed = time.monotonic()
    os.kill(daemon, signal.SIGKILL)
    remounted = wait_for(lambda: any(b"is served by the cache again" in line
                                     for line in m.log_lines(mark)), REMOUNTED_WITHIN)
    assert lazyfs_mounted_at(fs.path) and daemon not in m.daemons() and len(m.daemons()) == 1
    beneath_reads = fs.counts()["reads"]
    out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    changes = [(t - killed, outcome) for t, outcome in seen["changes"]]
    failing = [t for t, outcome in changes if outcome != "ok"]
    dead_for = 0.0
    if failing:
        back = [t for t, outcome in changes if outcome == "ok" and t > failing[0]]
        dead_for = (back[0] if back else 99.0) - failing[0]
    report.row("SIGKILL of a transparent mount's daemon while a reader re-reads a 4-block "
               "file through the path in a loop (page cache dropped each time)",
               f"outcomes: {seen['counts']}; errors for {dead_for * 1000:.0f} ms "
               f"({', '.join(f'{o} at +{t * 1000:.0f} ms' for t, o in changes if t > -1)}); "
               f"the store beneath served {beneath_reads} reads meanwhile; a new daemon "
               f"mounted {remounted:.1f}s after the kill")
    report.measure("transparent mount: errors at the path after a SIGKILL of its daemon",
                   f"{dead_for * 1000:.0f} ms")
    assert "WRONG BYTES" not in seen["counts"], seen
    assert dead_for <= DEAD_FOR, changes
    assert changes[-1][1] == "ok" and seen["counts"]["ok"] > 100, seen
    assert beneath_reads > 0, "the store beneath never served the path"
    assert m.supervisors() == [supervisor]
    # The new daemon serves from the cache: nothing more reaches the store.
    fs.set()
    assert read_bypassing_page_cache(target) == data
    assert fs.counts()["reads"] == 0
    assert m.stats()["cache_hits"] > 0


# -- 5. refusals -----------------------------------------------------------------------------------

def test_refusals(tmp_path, report, lazyfs_cli, over_mount):
    store = tmp_path / "svr" / "packages"
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    cache = tmp_path / "cache"
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "link").symlink_to(store)
    (cache / "sub").mkdir(parents=True, mode=0o700)
    os.chmod(cache, 0o700)
    write_file(tmp_path / "other/fam/1.0/package.py", "name = 'fam'\n")
    mounted = over_mount(tmp_path / "other", cache=tmp_path / "cache-other")
    cases = [
        ("a file", tmp_path / "a-file", (), "is not a directory"),
        ("a missing path", tmp_path / "nowhere", (), "does not exist"),
        ("a symlink", tmp_path / "link", (), "is a symlink"),
        ("a transparent mount already", mounted.path, (), "is already a rez-lazyfs mount"),
        ("inside a rez-lazyfs mount", mounted.path / "fam", (), "inside the rez-lazyfs mount"),
        ("inside the cache directory", cache / "sub", (), "inside the cache directory"),
        ("a store holding the cache directory", store, ("--cache", store / "cache"),
         "the cache directory"),
        ("a URL", "http://pkgs.example/main", (), "not a URL"),
    ]
    for what, path, extra, says in cases:
        result = lazyfs_cli.run("mount", "--over", path, *(extra or ("--cache", cache)))
        report.row(f"`mount --over` of {what}", result.summary())
        assert result.returncode == 1, (what, result.output)
        line = result.one_line_error()
        assert says in line, (what, line)
        assert not (isinstance(path, Path) and path != mounted.path and path.exists()
                    and lazyfs_mounted_at(path)), f"{what}: mounted anyway"
    assert not (store / "cache").exists(), "a refused mount created its cache"


# -- the cache commands with a transparent mount ------------------------------------------------

def test_bake_populate_status_stats_and_clean_with_a_transparent_mount(
        tmp_path, report, fault_store, over_mount):
    source = tmp_path / "source"
    build_store(source, STORE)
    fs = fault_store(source)
    (tmp_path / "rez").mkdir()
    rez = Rez(tmp_path / "rez")
    context = rez.resolve(REQUEST, [fs.path], tmp_path / "shot.rxt")
    m = over_mount(fs.path)
    store = str(fs.path)

    baked = tmp_path / "shot.lazy.rxt"
    done = rez.lazyfs("bake", context, "-o", baked, "--mount", fs.path,
                      "--repo", f"main={fs.path}", "--cache", m.cache)
    assert done.returncode == 0 and f"onto {store}:" in done.stdout, done.stderr
    doc, original = json.loads(baked.read_text()), json.loads(context.read_text())
    assert [h["variables"]["location"] for h in doc["resolved_packages"]] == \
        [h["variables"]["location"] for h in original["resolved_packages"]] == [store] * len(ROOTS)
    assert doc["package_paths"] == original["package_paths"] == [store]
    assert doc["package_caching"] is False and doc["rez_lazyfs"]["over"] == {"main": store}

    # populate reads the store beneath the mount (the daemon's descriptor), into
    # the mount's cache, under the keys the daemon reads: nothing is read twice.
    fs.set()
    done = rez.lazyfs("populate", baked, "--cache", m.cache)
    assert done.returncode == 0, done.stderr
    populated = fs.counts()["reads"]
    fs.set()
    used = files_the_context_uses(source)
    for rel in used:
        assert read_bypassing_page_cache(fs.path / rel) == (source / rel).read_bytes(), rel
    through_mount = fs.counts()["reads"]
    sourced = rez.source(baked, [sys.executable, "-c", PROBE, *ROOTS])
    assert sourced.returncode == 0, sourced.stderr
    assert json.loads(sourced.stdout)["roots"] == {n: f"{store}/{r}" for n, r in ROOTS.items()}
    assert through_mount == 0 and populated > 0, (populated, through_mount)

    status = json.loads(rez.lazyfs("status", "--json", "--cache", m.cache).stdout)
    rows = {(v["package"], v["version"]): v for v in status["variants"]}
    assert rows[("tools", "1.0")]["local_path"] == f"{store}/tools/1.0"
    assert rows[("tools", "1.0")]["pinned"] and rows[("tools", "1.0")]["files_cached"] > 1
    stats = json.loads(rez.lazyfs("stats", "--json", "--cache", m.cache).stdout)
    running = {s["name"]: s["running"] for s in stats["sources"]}
    assert running[f"mount:{store}"] is True, running

    forgot = rez.lazyfs("forget", "tools-1.0", "--cache", m.cache)
    assert f"the mount serving {store}/tools/1.0 forgot" in forgot.stdout, forgot.stderr
    cleaned = json.loads(rez.lazyfs("clean", "--max-size", "0", "--json", "--cache", m.cache).stdout)
    assert cleaned["evicted_files"] > 0
    fs.set()
    lazyhello = fs.path / "tools/1.0/bin/lazyhello"
    assert read_bypassing_page_cache(lazyhello) == (source / "tools/1.0/bin/lazyhello").read_bytes()
    report.row("bake, populate, status, stats and clean of a context resolved against the store, "
               "with `mount --over STORE` running",
               f"bake keeps every location and package path ({store}); populate read "
               f"{populated} blocks from the store beneath the mount, after which reading all "
               f"{len(used)} files of the context through the mount read {through_mount}; "
               f"status shows local paths under the store; stats shows the mount running; "
               f"forget tools-1.0 reached the mount; "
               f"clean evicted {cleaned['evicted_files']} files and the mount refetched what was "
               f"read next ({fs.counts()['reads']} reads)")


# -- umount, while files are open --------------------------------------------------------------

def test_umount_detaches_at_once_while_files_are_open(tmp_path, report, fault_store, over_mount):
    source = tmp_path / "source"
    data = deterministic_bytes(4 * BLOCK, seed=1500)
    write_file(source / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(source / "fam/1.0/lib/big.bin", data)
    fs = fault_store(source)
    m = over_mount(fs.path)
    target = fs.path / "fam/1.0/lib/big.bin"
    [daemon] = m.daemons()
    reader = open(target, "rb")
    holder = subprocess.Popen(["sleep", "120"], cwd=fs.path / "fam")
    try:
        assert reader.read(BLOCK) == data[:BLOCK]
        result = subprocess.run([str(LAZYFS), "umount", str(fs.path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and not result.stderr, result.stderr
        assert not lazyfs_mounted_at(fs.path)
        again = subprocess.run([str(LAZYFS), "umount", str(fs.path)], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 1 and "not a rez-lazyfs mount (it is fuse.faultfs)" in \
            again.stderr and mount_entry(fs.path)[0] == "fuse.faultfs", again.stderr
        fs.set()
        assert read_bypassing_page_cache(target) == data  # a new open: the store itself
        beneath = fs.counts()["reads"]
        assert beneath > 0
        rest = reader.read()  # the open file still reads through the daemon
        assert rest == data[BLOCK:] and m.daemons() == [daemon]
    finally:
        reader.close()
        holder.kill()
        holder.wait()
    let_go = time.monotonic()
    for pid in (daemon, *m.supervisors()):
        wait_gone(pid, 15)
    gone = time.monotonic() - let_go
    m.mounted = False
    report.row("`rez-lazyfs umount STORE` of a transparent mount with a file open and a "
               "process's working directory in it",
               f"exit 0 at once, detached: a new open reads the store ({beneath} reads); a "
               f"second umount refuses the store's own mount ({again.stderr.strip()}); the "
               f"open file read on to its end through the daemon; daemon and supervisor exited "
               f"{gone:.1f}s after the last user let go")


# -- a hung daemon ---------------------------------------------------------------------------------

def test_a_hung_daemon_is_detached_and_replaced(tmp_path, report, fault_store, over_mount):
    from mount.config import Settings
    from mount.supervisor import PROBE_INTERVAL, hang_after

    source = tmp_path / "source"
    data = deterministic_bytes(2 * BLOCK + 1, seed=1600)
    write_file(source / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(source / "fam/1.0/lib/f.bin", data)
    fs = fault_store(source)
    timeout = 1.0
    m = over_mount(fs.path, store_timeout=timeout)
    bound = hang_after(Settings(mountpoint="", repos=[], cache_dir="", store_timeout=timeout))
    target = fs.path / "fam/1.0/lib/f.bin"
    assert read_bypassing_page_cache(target) == data
    [daemon] = m.daemons()
    m.expect_log("has not answered for")
    time.sleep(PROBE_INTERVAL + 0.5)  # a probe answered just now
    stopped = time.monotonic()
    os.kill(daemon, signal.SIGSTOP)
    try:
        outcome, took = in_child("read", target, timeout=bound + 30)
        served_after = time.monotonic() - stopped
        again = wait_for(lambda: any(b"is served by the cache again" in line
                                     for line in m.log_lines(0)), REMOUNTED_WITHIN)
    finally:
        try:
            os.kill(daemon, signal.SIGCONT)
        except ProcessLookupError:
            pass
    report.row(f"the daemon of a transparent mount SIGSTOPped (store timeout {timeout:g}s: "
               f"hung after {bound:g}s without an answer); a read of the path meanwhile",
               f"the read waited, then: {'sha256 ok' if outcome == sha(data) else outcome} "
               f"{served_after:.1f}s after the stop; a new daemon served the path "
               f"{served_after + again:.1f}s after the stop")
    assert outcome in (sha(data), "ECONNABORTED", "ENOTCONN"), outcome
    assert served_after <= bound + PROBE_INTERVAL + 2 + SLACK, served_after
    assert read_bypassing_page_cache(target) == data
    assert daemon not in m.daemons() and len(m.daemons()) == 1


# -- several repositories, the unit and fstab forms ------------------------------------------------

def test_several_repositories_each_over_its_own_path(tmp_path, report, lazyfs_cli, over_mount):
    site, farm = tmp_path / "svr/site", tmp_path / "svr/farm"
    write_file(site / "sitepkg/1.0/package.py", "name = 'sitepkg'\n")
    write_file(farm / "farmpkg/2.0/package.py", "name = 'farmpkg'\n")
    cache = tmp_path / "cache"
    config = tmp_path / "rez-lazyfs.toml"
    # One in [repos] with over = true, one in the top-level list only.
    config.write_text(f'cache = "{cache}"\nblock_size = "64K"\nover = ["{farm}"]\n\n'
                      f'[repos]\nsite = {{ path = "{site}", over = true }}\n')
    mounts = [over_mount(path, config=config, cache=cache) for path in (site, farm)]
    assert (site / "sitepkg/1.0/package.py").read_text() == "name = 'sitepkg'\n"
    assert (farm / "farmpkg/2.0/package.py").read_text() == "name = 'farmpkg'\n"
    assert all(mount_entry(m.path)[:2] == ["fuse.rez-lazyfs", "rez-lazyfs-over"] for m in mounts)
    stats = json.loads(lazyfs_cli.run("stats", "--json", "--config", config).stdout)
    running = {s["name"] for s in stats["sources"] if s["running"]}
    assert running == {f"mount:{site}", f"mount:{farm}"}, stats
    # A mount point for the others: there are none.
    (tmp_path / "mnt").mkdir()
    plain = lazyfs_cli.run("mount", tmp_path / "mnt", "--config", config)
    assert plain.returncode == 1 and "mount each with `rez-lazyfs mount --over PATH`" in \
        plain.one_line_error(), plain.output
    report.row("a config with two repositories to mount over their own paths (over = true in "
               "[repos]; a top-level over list), each `mount --over PATH --config FILE`",
               f"both mounted at their store paths and listed running by stats; `mount MP` of "
               f"the same config: {plain.summary()}")


def test_the_unit_restarts_a_killed_daemon_and_stops_cleanly(tmp_path, report, supervise):
    store = tmp_path / "svr" / "packages"
    data = deterministic_bytes(BLOCK + 3, seed=1700)
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(store / "fam/1.0/lib/f.bin", data)
    cache = tmp_path / "cache"
    config = tmp_path / "rez-lazyfs.toml"
    config.write_text(f'cache = "{cache}"\nblock_size = "64K"\n\n[repos]\n'
                      f'main = {{ path = "{store}", over = true }}\n')
    units = tmp_path / "units"
    unit_path, unit, commands = install_unit(tmp_path, "--system", "--over", store,
                                             "--config", config, "--unit-dir", units)
    argv = command_line(unit["Service"]["ExecStart"])
    assert argv == [str(LAZYFS), "mount", "--over", str(store), "--foreground", "--config",
                    str(config), "--allow-other"]
    assert unit_path.name.endswith("svr-packages.service") and unit["Service"]["Restart"] == "on-failure"

    m = supervise(argv, store, cache)
    assert mount_entry(store)[1] == "rez-lazyfs-over" and "allow_other" in mount_entry(store)[2]
    assert read_bypassing_page_cache(store / "fam/1.0/lib/f.bin") == data
    [daemon] = [p for p in processes_with_marker(m._marker) if is_daemon(p)]
    m.expect_log("was killed by SIGKILL")
    os.kill(daemon, signal.SIGKILL)
    back = wait_for(lambda: "is served by the cache again" in m.journal.read_text(),
                    REMOUNTED_WITHIN)
    assert read_bypassing_page_cache(store / "fam/1.0/lib/f.bin") == data
    assert m.process.poll() is None, "the unit's process exited: systemd would restart it"

    # The whole unit killed (kill -9 of its cgroup, the OOM killer): the path is
    # dead until systemd restarts the unit, whose new daemon clears the dead mount.
    [daemon] = [p for p in processes_with_marker(m._marker) if is_daemon(p)]
    assert unit["Service"]["RestartSec"] == "1"
    for pid in (m.process.pid, daemon):
        os.kill(pid, signal.SIGKILL)
    m.process.wait()
    wait_for(lambda: not processes_with_marker(m._marker), 15)
    assert in_child("statfs", store, timeout=30)[0] in ("ENOTCONN", "ECONNABORTED")
    mark = m.log_mark()
    m.start()  # systemd's restart: the same ExecStart
    restarted = wait_for(lambda: any(b"mounted " + os.fsencode(store) in line
                                     for line in m.log_lines(mark)), REMOUNTED_WITHIN)
    assert any(b"cleared a dead rez-lazyfs mount" in line for line in m.log_lines(mark))
    m.wait_ready()
    assert read_bypassing_page_cache(store / "fam/1.0/lib/f.bin") == data

    stop = subprocess.run(command_line(unit["Service"]["ExecStop"]), capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert m.exit_status() == 0 and not lazyfs_mounted_at(store)
    m.mounted = False
    # Ready twice, once each start, from the supervisor: its daemons never speak.
    assert m.reported() == [{"READY": "1", "STATUS": f"serving {store}"}] * 2
    assert (store / "fam/1.0/lib/f.bin").read_bytes() == data  # the store itself again
    report.row("the system unit `service install --over STORE` writes, run as systemd runs "
               "it; its daemon SIGKILLed; then ExecStop",
               f"ExecStart: {' '.join(argv[1:5])} ...; the unit's process (the supervisor) "
               f"stayed up and a new daemon served the path {back:.1f}s after the kill; "
               f"the unit killed whole: the path is dead (ENOTCONN) until the unit's restart "
               f"(RestartSec=1), whose daemon cleared it and mounted {restarted:.1f}s after "
               "the restart; ExecStop unmounted and the process exited 0")
    uninstall = subprocess.run([str(LAZYFS), "service", "uninstall", "--over", str(store),
                                "--config", str(config), "--unit-dir", str(units)],
                               capture_output=True, text=True, timeout=60)
    assert uninstall.returncode == 0 and not unit_path.exists(), uninstall.stderr


def test_a_transparent_unit_stopped_by_sigterm_says_so_from_its_main_process(tmp_path, report,
                                                                             supervise):
    """systemctl stop without ExecStop's unmount (SIGTERM, as at shutdown): the
    supervisor says STOPPING=1 and ends its daemon, which never speaks to systemd."""
    store = tmp_path / "svr" / "packages"
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    config = tmp_path / "rez-lazyfs.toml"
    config.write_text(f'cache = "{tmp_path / "cache"}"\nblock_size = "64K"\n\n[repos]\n'
                      f'main = {{ path = "{store}", over = true }}\n')
    _, unit, _ = install_unit(tmp_path, "--system", "--over", store, "--config", config,
                              "--unit-dir", tmp_path / "units")
    assert unit["Service"]["Type"] == "notify"
    assert "WatchdogSec" not in unit["Service"]  # the supervisor watches its daemon itself
    m = supervise(command_line(unit["Service"]["ExecStart"]), store, tmp_path / "cache")
    assert (store / "fam/1.0/package.py").read_text() == "name = 'fam'\n"
    [daemon] = [p for p in processes_with_marker(m._marker) if is_daemon(p)]
    m.process.send_signal(signal.SIGTERM)
    assert m.exit_status() == 0 and not lazyfs_mounted_at(store)
    m.mounted = False
    wait_gone(daemon, 15)
    said = m.reported()
    assert said == [{"READY": "1", "STATUS": f"serving {store}"},
                    {"STOPPING": "1", "STATUS": f"unmounting {store}"}], said
    report.row("a transparent unit's process (the supervisor) sent SIGTERM, systemd's stop",
               "READY=1 once the path was served, STOPPING=1 on the signal, both from the "
               "unit's main process (its daemon, signalled in turn, said nothing); exit 0, "
               "the store's own path again")


def test_an_fstab_line_mounts_over_the_store(tmp_path, report, admin_namespace):
    store = tmp_path / "svr" / "packages"
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    cache = tmp_path / "cache"
    config = tmp_path / "rez-lazyfs.toml"
    config.write_text(f'cache = "{cache}"\nblock_size = "64K"\n\n[repos]\nmain = "{store}"\n')
    fstab = tmp_path / "fstab"
    fstab.write_text(f"rez-lazyfs {store} fuse.rez-lazyfs over,config={config},allow_other,"
                     "_netdev,nofail 0 0\n")
    m = admin_namespace.adopt_mount(["mount", "--fstab", fstab, store], store,
                                    MountOptions(repos={"main": store}, cache=cache))
    assert admin_namespace.is_mounted(store, b"fuse.rez-lazyfs")
    inside = admin_namespace.outside(store)
    assert (inside / "fam/1.0/package.py").read_text() == "name = 'fam'\n"
    assert os.getxattr(inside / "fam/1.0/package.py", "user.rezlazyfs.store_path") == \
        os.fsencode(store / "fam/1.0/package.py")
    m.unmount(["umount", store])
    report.row("an fstab line `rez-lazyfs STORE fuse.rez-lazyfs over,config=...`, mounted "
               "with mount(8) and unmounted with umount(8)",
               "mounted over the store at its own path (through mount.fuse3), served from the "
               "cache; unmounted, daemon and supervisor gone")
