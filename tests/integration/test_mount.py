"""rez-lazyfs mounted for real (FUSE, through the CLI), used the way Rez
users use it. Each test builds its own store under tmp_path; the
`lazyfs_mount` fixture (tests/conftest.py) guarantees unmounting and checks
the daemon log."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.mounts import PROBLEM_LEVEL, STATS_COUNTERS, VENV_BIN
from helpers.native import build_native_payload
from helpers.trees import KiB, build_tricky_tree, deterministic_bytes, write_file, write_rez_package
from helpers.walk import assert_same_tree, sha256_file, store_snapshot, walk
from helpers.witness import StoreReadWitness

BLOCK = 64 * KiB  # the fixture mounts with --block-size 64K
# The two ways the daemon serves: without open requests (the patched pyfuse3
# that .ci/setup installs), and with them (as with stock pyfuse3).
MODES = {"no-open": (), "open-requests": ("--open-requests",)}


def read_fully(path: Path | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def drop_page_cache(path: Path) -> None:
    """Evict *path* from the kernel page cache, so the next read must go to
    the daemon instead of being answered by the kernel."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in STATS_COUNTERS}


def run(args: list, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# 1. ---------------------------------------------------------------------------


def test_mount_mirrors_store_byte_for_byte(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    tree = build_tricky_tree(store)
    expected = walk(store)
    # Guard against a tree builder bug making the comparison vacuous.
    assert {e.type for e in expected} == {"dir", "file", "symlink"}
    assert len(expected) > tree.crowded_entries

    m = lazyfs_mount({"main": store})

    assert "main" in os.listdir(m.path)
    assert_same_tree(expected, walk(m.repo_path("main")))


# 2. ---------------------------------------------------------------------------


def test_scripts_python_and_native_programs_run_from_the_mount(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    mapped_bytes = deterministic_bytes(3 * BLOCK + 999, seed=21)
    version_dir = write_rez_package(
        store, "tools", "1.0.0",
        commands='env.PATH.prepend("{root}/bin")',
        files={
            # The script finds a sibling file relative to itself.
            "bin/greet.sh": '#!/bin/sh\n. "$(dirname "$0")/../etc/greet.conf"\necho "greet.sh: $GREETING $1"\n',
            "etc/greet.conf": 'GREETING="hello from greet.conf"\n',
            "python/toolpkg/__init__.py": "from .core import answer\n",
            "python/toolpkg/core.py": "def answer():\n    return 42\n",
            "python/toolpkg/blob.bin": deterministic_bytes(2 * BLOCK + 5, seed=20),
            # Only ever read through mmap, so its pages come in by page faults.
            "share/mapped.bin": mapped_bytes,
        },
        executables=("bin/greet.sh",),
    )
    native = build_native_payload(version_dir, tmp_path / "build", data=deterministic_bytes(3 * BLOCK + 7, seed=22))
    m = lazyfs_mount({"main": store})
    root = m.repo_path("main") / "tools" / "1.0.0"

    # A shell script, exec()ed through its #! line, with its cwd in the mount.
    result = run([root / "bin/greet.sh", "world"], cwd=root)
    assert result.stdout == "greet.sh: hello from greet.conf world\n"

    # A Python package imports from the mount and reads its package data.
    snippet = (
        "import hashlib, importlib.resources, toolpkg\n"
        "print(toolpkg.answer())\n"
        "print(toolpkg.__file__)\n"
        "print(hashlib.sha256(importlib.resources.files(toolpkg).joinpath('blob.bin').read_bytes()).hexdigest())\n"
    )
    result = run([sys.executable, "-c", snippet], env={**os.environ, "PYTHONPATH": str(root / "python")})
    assert result.stdout.splitlines() == [
        "42",
        str(root / "python/toolpkg/__init__.py"),
        sha256_file(version_dir / "python/toolpkg/blob.bin"),
    ]

    # A native program: exec, its library through the $ORIGIN rpath, a plugin
    # dlopen()ed relative to itself, and an mmap()ed data file.
    result = run([root / native.program])
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["exe"] == str(root / native.program)
    assert lines["linked"] == "hello from libgreet"
    assert os.path.normpath(lines["linked-from"]) == str(root / native.library)
    plugin_answer, plugin_path = lines["plugin"].split(" from ")
    assert plugin_answer == "42"
    assert os.path.normpath(plugin_path) == str(root / native.plugin)
    assert "mmap: " + lines["mmap"] == native.expected_mmap_line()

    # mmap from Python too, across block boundaries, on a file never read().
    with open(root / "share/mapped.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert len(mapped) == len(mapped_bytes)
        assert mapped[BLOCK - 10 : BLOCK + 10] == mapped_bytes[BLOCK - 10 : BLOCK + 10]
        assert mapped[:] == mapped_bytes


# 3. ---------------------------------------------------------------------------

PAYLOAD_SIZE = 3 * BLOCK + 1000  # four blocks, the last one partial
PAYLOAD_BLOCKS = 4


def single_file_store(tmp_path: Path) -> tuple[Path, str, bytes]:
    """A store holding one payload file and nothing else: the daemon's stats
    are global, so no other file may be there to be read or prefetched."""
    store = tmp_path / "store"
    relpath = "fam/1.0.0/lib/payload.bin"
    content = deterministic_bytes(PAYLOAD_SIZE, seed=3)
    write_file(store / relpath, content)
    return store, relpath, content


def read_from_store(m, mount_file: Path, content: bytes, witness: StoreReadWitness) -> None:
    """The first read of a file: it must reach the store, once per block."""
    before = m.stats()
    assert read_fully(mount_file) == content
    delta = stats_delta(before, m.stats())
    # This also proves the witness can see how the daemon reads the store.
    assert witness.take() > 0, "inotify saw no read of the store file on the first read"
    assert delta["store_reads"] >= 1, delta
    assert delta["cache_misses"] == PAYLOAD_BLOCKS, delta
    assert PAYLOAD_SIZE <= delta["store_bytes"] <= PAYLOAD_BLOCKS * BLOCK, delta


def read_from_block_cache(m, mount_file: Path, content: bytes, witness: StoreReadWitness) -> None:
    """A later read, after the kernel page cache was emptied: it must reach
    the daemon (cache_hits goes up) and never the store."""
    before = m.stats()
    assert read_fully(mount_file) == content
    delta = stats_delta(before, m.stats())
    assert witness.take() == 0, "inotify saw the store file read again"
    assert delta["store_reads"] == 0 and delta["store_bytes"] == 0 and delta["cache_misses"] == 0, delta
    # Every block had to come from the daemon again, out of its block cache;
    # had the kernel answered from its page cache, cache_hits would not move.
    assert delta["cache_hits"] >= PAYLOAD_BLOCKS, delta


def test_file_read_twice_reads_the_store_once(tmp_path, lazyfs_mount):
    store, relpath, content = single_file_store(tmp_path)
    m = lazyfs_mount({"main": store})
    mount_file = m.repo_path("main") / relpath
    os.stat(mount_file)  # metadata first: only content reads are counted below

    with StoreReadWitness(store / relpath) as witness:
        read_from_store(m, mount_file, content, witness)
        drop_page_cache(mount_file)
        read_from_block_cache(m, mount_file, content, witness)


def test_block_cache_survives_remount(tmp_path, lazyfs_mount):
    store, relpath, content = single_file_store(tmp_path)
    m = lazyfs_mount({"main": store})
    mount_file = m.repo_path("main") / relpath

    with StoreReadWitness(store / relpath) as witness:
        read_from_store(m, mount_file, content, witness)
        # A new mount has an empty page cache and a new daemon: only the
        # on-disk block cache carries over.
        m.remount()
        os.stat(mount_file)
        assert witness.take() == 0, "remount read the store file"
        read_from_block_cache(m, mount_file, content, witness)


# 4. ---------------------------------------------------------------------------

STORE_TIMEOUT = 2  # seconds; --store-timeout
EIO_SLACK = 1.5  # seconds allowed on top of it


def test_cached_files_outlive_the_store_and_uncached_ones_fail_fast(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    write_rez_package(
        store, "fam", "1.0.0",
        commands='env.PATH.prepend("{root}/bin")',
        files={
            "bin/tool": "#!/bin/sh\necho tool\n",
            "lib/big.bin": deterministic_bytes(4 * BLOCK + 5, seed=40),
            "data/read.bin": deterministic_bytes(100, seed=41),
            "data/unread.bin": deterministic_bytes(2 * BLOCK, seed=42),
        },
        executables=("bin/tool",),
    )
    read_before = ["fam/1.0.0/package.py", "fam/1.0.0/bin/tool", "fam/1.0.0/lib/big.bin", "fam/1.0.0/data/read.bin"]
    unread = "fam/1.0.0/data/unread.bin"
    expected = {rel: sha256_file(store / rel) for rel in read_before}

    m = lazyfs_mount({"main": store})
    repo = m.repo_path("main")
    for rel in read_before:
        assert sha256_file(repo / rel) == expected[rel], rel
    data_listing = sorted(os.listdir(repo / "fam/1.0.0/data"))
    os.stat(repo / unread)  # its metadata is known; its content was never read
    m.unmount()

    store.rename(tmp_path / "store-moved-away")
    # With the store gone, warnings naming it or the unreadable file are right.
    m.expect_log(str(store))
    m.expect_log(unread)
    log_mark = m.log_mark()
    m.remount(store_timeout=STORE_TIMEOUT)

    for rel in read_before:
        assert sha256_file(repo / rel) == expected[rel], rel
    assert sorted(os.listdir(repo / "fam/1.0.0/data")) == data_listing

    start = time.monotonic()
    with pytest.raises(OSError) as excinfo:
        read_fully(repo / unread)
    elapsed = time.monotonic() - start
    assert excinfo.value.errno == errno.EIO, f"expected EIO, got {excinfo.value!r}"
    assert elapsed <= STORE_TIMEOUT + EIO_SLACK, f"EIO took {elapsed:.2f}s"

    m.unmount()  # waits for the daemon to exit, so its log is complete
    naming = [line for line in m.log_lines(since=log_mark) if unread.encode() in line]
    assert any(PROBLEM_LEVEL.search(line) or b"EIO" in line for line in naming), (
        f"no WARNING/ERROR/EIO log line names {unread}; lines naming it: {naming}"
    )


READ_IN_CHILD = """
import errno, hashlib, os, sys, time
start = time.monotonic()
try:
    with open(sys.argv[1], "rb") as f:
        # Make sure the read reaches the daemon, not the kernel page cache.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        outcome = hashlib.sha256(f.read()).hexdigest()
except OSError as exc:
    outcome = errno.errorcode[exc.errno]
print(outcome, time.monotonic() - start)
"""


def read_in_child(path: Path, timeout: float) -> tuple[str, float]:
    """Read *path* in a child process: (sha256 or errno name, seconds). If
    the read hangs, only the child is stuck (FUSE waits are killable) and
    the test fails instead of hanging."""
    try:
        result = run([sys.executable, "-c", READ_IN_CHILD, path], timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung for more than {timeout}s")
    outcome, elapsed = result.stdout.split()
    return outcome, float(elapsed)


def test_uncached_read_fails_with_eio_when_the_store_hangs(tmp_path, lazyfs_mount):
    # A store that stops answering instead of vanishing, like a hard-mounted
    # NFS filer whose server went away: the store of `outer` is another
    # rez-lazyfs mount, `inner`, whose daemon is frozen with SIGSTOP.
    store = tmp_path / "store"
    cached, uncached = "fam/1.0.0/lib/cached.bin", "fam/1.0.0/lib/uncached.bin"
    write_file(store / cached, deterministic_bytes(2 * BLOCK + 1, seed=50))
    write_file(store / uncached, deterministic_bytes(2 * BLOCK + 1, seed=51))
    inner = lazyfs_mount({"main": store})
    outer = lazyfs_mount({"main": inner.repo_path("main")}, store_timeout=STORE_TIMEOUT)
    outer.expect_log(str(inner.repo_path("main")))
    repo = outer.repo_path("main")
    assert sha256_file(repo / cached) == sha256_file(store / cached)
    os.stat(repo / uncached)  # metadata known, content never read

    inner_pids = inner.daemon_pids()
    assert inner_pids, "cannot find the inner daemon"
    for pid in inner_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        limit = STORE_TIMEOUT + EIO_SLACK
        outcome, elapsed = read_in_child(repo / cached, timeout=limit + 10)
        assert outcome == sha256_file(store / cached), "cached file unreadable while the store hangs"
        assert elapsed <= limit, f"cached read took {elapsed:.2f}s while the store hangs"
        outcome, elapsed = read_in_child(repo / uncached, timeout=limit + 10)
        assert outcome == "EIO"
        assert elapsed <= limit, f"EIO took {elapsed:.2f}s"
    finally:
        for pid in inner_pids:
            os.kill(pid, signal.SIGCONT)


# 5. ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_kind_of_write_fails_with_erofs_and_changes_nothing(tmp_path, lazyfs_mount, mode):
    store = tmp_path / "store"
    tree = build_tricky_tree(store, crowded_entries=100)
    before = store_snapshot(store)
    m = lazyfs_mount({"main": store}, extra_args=MODES[mode])
    repo = m.repo_path("main")
    file = repo / "a/top.txt"
    other_file = repo / "a/b/c/d/deep.txt"
    readonly_file = repo / tree.files_by_mode[0o444].decode()
    symlink = repo / "links/relative-to-file"
    sparse = repo / tree.sparse_file.decode()
    new = repo / "a/new-name"

    attempts = {
        "open O_WRONLY": lambda: os.open(file, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(file, os.O_RDWR),
        "open O_WRONLY|O_APPEND": lambda: os.open(file, os.O_WRONLY | os.O_APPEND),
        "open O_RDONLY|O_TRUNC": lambda: os.open(file, os.O_RDONLY | os.O_TRUNC),
        "open O_WRONLY on a 0444 file": lambda: os.open(readonly_file, os.O_WRONLY),
        "create": lambda: os.open(new, os.O_CREAT | os.O_WRONLY, 0o644),
        "create O_EXCL|O_RDONLY": lambda: os.open(new, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o644),
        "mkdir": lambda: os.mkdir(new),
        "mkdir at the mount root": lambda: os.mkdir(m.path / "new-alias"),
        "mkfifo": lambda: os.mkfifo(new),
        "symlink": lambda: os.symlink("top.txt", new),
        "hard link": lambda: os.link(file, new),
        "unlink file": lambda: os.unlink(file),
        "unlink symlink": lambda: os.unlink(symlink),
        "rmdir empty dir": lambda: os.rmdir(repo / "empty-dir"),
        "rename file": lambda: os.rename(file, new),
        "rename file over another": lambda: os.replace(file, other_file),
        "rename dir": lambda: os.rename(repo / "a", repo / "renamed-a"),
        "chmod file": lambda: os.chmod(file, 0o777),
        "chmod dir": lambda: os.chmod(repo / "a", 0o777),
        "chown file": lambda: os.chown(file, 1, 1),
        "lchown symlink": lambda: os.chown(symlink, 1, 1, follow_symlinks=False),
        "utime file": lambda: os.utime(file, (0, 0)),
        "touch file": lambda: os.utime(file, None),
        "truncate to 0": lambda: os.truncate(file, 0),
        "truncate big sparse file": lambda: os.truncate(sparse, 10),
        "setxattr": lambda: os.setxattr(file, "user.test", b"x"),
        "setxattr stats on the root": lambda: os.setxattr(m.path, "user.rezlazyfs.stats", b"{}"),
        "removexattr": lambda: os.removexattr(file, "user.test"),
    }
    wrong = []
    for name, attempt in attempts.items():
        try:
            result = attempt()
        except OSError as exc:
            if exc.errno != errno.EROFS:
                wrong.append(f"{name}: {errno.errorcode.get(exc.errno, exc.errno)} ({exc})")
        else:
            wrong.append(f"{name}: succeeded")
            if isinstance(result, int):  # an fd from os.open
                os.close(result)
    assert not wrong, "writes that did not fail with EROFS:\n" + "\n".join(wrong)

    assert store_snapshot(store) == before, "the store changed"
    # ...and the mount shows no trace of the attempts either.
    assert_same_tree(sorted(s.entry for s in before.values()), walk(repo))


# 6. ---------------------------------------------------------------------------

HELLO_SCRIPT = """#!/bin/sh
echo "hello {version}"
echo "script=$0"
echo "root=$REZ_HELLO_ROOT"
"""


def test_rez_env_resolves_and_runs_a_package_from_the_mount(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    for version in ("0.9.0", "1.0.0"):
        write_rez_package(
            store, "hello", version,
            commands='env.PATH.prepend("{root}/bin")',
            files={"bin/hello": HELLO_SCRIPT.format(version=version)},
            executables=("bin/hello",),
        )
    m = lazyfs_mount({"main": store})
    repo = m.repo_path("main")

    # Nothing from the user's Rez setup may leak in: own config, own HOME.
    rez_home = tmp_path / "rez-home"
    rez_home.mkdir()
    rez_config = tmp_path / "rezconfig.py"
    rez_config.write_text(
        f"local_packages_path = {str(rez_home / 'packages')!r}\n"
        f"release_packages_path = {str(rez_home / 'release')!r}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_")}
    env.update(
        HOME=str(rez_home),
        REZ_CONFIG_FILE=str(rez_config),
        REZ_DISABLE_HOME_CONFIG="1",
        REZ_PACKAGES_PATH=str(repo),
    )
    # The pip-installed rez warns on stderr that it is not a production
    # install; only stdout is checked.
    result = run([VENV_BIN / "rez-env", "--norc", "hello", "--", "hello"], env=env, cwd=tmp_path)

    version_root = repo / "hello" / "1.0.0"
    assert result.stdout.splitlines() == [
        "hello 1.0.0",
        f"script={version_root / 'bin' / 'hello'}",
        f"root={version_root}",
    ], result.stderr


# Prefetching (a lever of the performance issue) ---------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_first_read_prefetches_same_suffix_siblings_so_imports_wait_for_no_fetch(
        tmp_path, lazyfs_mount, mode):
    """The prefetch starts at a file's first open, or without open requests
    at its first read."""
    store = tmp_path / "store"
    modules = {f"python/pkg/mod{n:02d}.py": f"VALUE = {n}\n" for n in range(40)}
    write_rez_package(store, "fam", "1.0.0", files={
        **modules, "python/pkg/__init__.py": "", "python/pkg/notes.txt": "not code\n",
        "python/pkg/blob.py": "#" * (128 * KiB)})  # same suffix, but too big to prefetch
    m = lazyfs_mount({"main": store}, prefetch="64K", extra_args=MODES[mode])
    pkg = m.repo_path("main") / "fam/1.0.0/python/pkg"

    os.listdir(pkg)  # listing alone fetches nothing: a walk or `ls` must stay cheap
    # Nor does looking at what is cached (getfattr over the package).
    assert os.getxattr(pkg / "mod01.py", "user.rezlazyfs.cached") == b"0/10"
    time.sleep(1.0)  # what an open starts in the background would be done by now
    assert m.stats()["prefetch_blocks"] == 0 and m.stats()["store_reads"] == 0
    assert read_fully(pkg / "mod00.py") == b"VALUE = 0\n"  # the first open starts it
    deadline = time.monotonic() + 30
    while m.stats()["prefetch_blocks"] < len(modules) - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.stats()["prefetch_blocks"] == len(modules) - 1  # the other .py modules

    result = subprocess.run([sys.executable, "-B", "-c",
                             "import pkg, importlib; print(sum(importlib.import_module("
                             f"f'pkg.mod{{n:02d}}').VALUE for n in range({len(modules)})))"],
                            env={**os.environ, "PYTHONPATH": str(pkg.parent)},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(sum(range(len(modules))))
    after = m.stats()
    # Only mod00 waited for the store; notes.txt and the big module were never fetched.
    assert after["cache_misses"] == 1
    assert after["store_reads"] == len(modules)


# Open requests (issue 16) ---------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_without_open_requests_the_kernel_keeps_pages_and_listings_across_opens(
        tmp_path, lazyfs_mount, mode):
    store = tmp_path / "store"
    write_rez_package(store, "fam", "1.0.0", files={
        f"python/pkg/mod{n}.py": f"VALUE = {n}\n" for n in range(5)})
    m = lazyfs_mount({"main": store}, extra_args=MODES[mode])
    pkg = m.repo_path("main") / "fam/1.0.0/python/pkg"
    names = sorted(f"mod{n}.py" for n in range(5))

    def listing_and_read() -> dict[str, int]:
        before = m.stats()["requests"]
        assert sorted(os.listdir(pkg)) == names
        assert read_fully(pkg / "mod3.py") == b"VALUE = 3\n"
        after = m.stats()["requests"]
        return {k: after[k] - before.get(k, 0) for k in after
                if after[k] != before.get(k, 0) and k != "getxattr"}  # the stats themselves

    first = listing_and_read()
    again = [listing_and_read() for _ in range(3)]
    served = [line for line in m.log_lines() if b"pyfuse3 " in line]
    assert first["readdir"] >= 1 and first["read"] == 1
    if mode == "no-open":
        assert b"the kernel sends no open, release, opendir or releasedir" in served[-1]
        assert not {"open", "release", "opendir", "releasedir"} & first.keys(), first
        # the kernel answers the same listing and read itself: nothing reaches the daemon
        assert again == [{}] * 3, again
    else:
        assert b"every open, release, opendir and releasedir reaches the daemon" in served[-1]
        assert b"open_requests is set" in served[-1]
        want = {"open": 1, "release": 1, "opendir": 1, "releasedir": 1,
                "readdir": first["readdir"]}  # immutable payload: its pages are kept (keep_cache)
        assert again == [want] * 3, again


@pytest.mark.parametrize("mode", MODES)
def test_a_directory_relisted_or_forgotten_is_listed_anew_by_the_kernel(
        tmp_path, lazyfs_mount, mode):
    """Without opendir the kernel keeps listings; a name that appears must
    still show up once the daemon lists the directory again, even where the
    store's directory time did not move (coarse timestamps) and in a
    directory still in use (a shell's cwd)."""
    store = tmp_path / "store"
    write_rez_package(store, "fam", "1.0", files={"lib/a.py": "a = 1\n"})
    m = lazyfs_mount({"main": store}, metadata_ttl=1, extra_args=MODES[mode])
    fam = m.repo_path("main") / "fam"
    lib = fam / "1.0/lib"

    def listed_soon(path, want: list[str]) -> list[str]:
        deadline = time.monotonic() + 5
        while (names := sorted(os.listdir(path))) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return names

    assert os.listdir(fam) == ["1.0"]
    family_times = os.stat(store / "fam").st_mtime_ns
    write_rez_package(store, "fam", "2.0")
    os.utime(store / "fam", ns=(family_times, family_times))  # a time that did not move
    time.sleep(1.2)  # past metadata_ttl
    assert not (fam / "3.0").exists()  # a lookup: the daemon lists the family again
    assert listed_soon(fam, ["1.0", "2.0"]) == ["1.0", "2.0"]

    held = os.open(lib, os.O_RDONLY)  # the directory in use: the kernel keeps its inode
    try:
        assert os.listdir(lib) == ["a.py"]
        lib_times = os.stat(store / "fam/1.0/lib").st_mtime_ns
        write_file(store / "fam/1.0/lib/late.py", "late = 1\n")
        os.utime(store / "fam/1.0/lib", ns=(lib_times, lib_times))
        run([VENV_BIN / "rez-lazyfs", "forget", "--mount", m.path, "fam-1.0"],
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
        assert listed_soon(lib, ["a.py", "late.py"]) == ["a.py", "late.py"]
    finally:
        os.close(held)


@pytest.mark.parametrize("mode", MODES)
def test_a_file_changed_in_the_store_reads_anew_when_reopened_while_another_holds_it(
        tmp_path, lazyfs_mount, mode):
    """A payload file listed while it was still being copied: a read finds it
    changed, the daemon lists its directory again, and a reopen reads the
    whole file, also while another process keeps the old one open (then the
    kernel keeps its inode, and the version read by that inode must change);
    likewise after `forget`."""
    store = tmp_path / "store"
    final = deterministic_bytes(3 * BLOCK + 5, seed=16)
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(store / "fam/1.0/lib/big.bin", final[:BLOCK])  # the copy is under way
    m = lazyfs_mount({"main": store}, extra_args=MODES[mode])
    big = m.repo_path("main") / "fam/1.0/lib/big.bin"
    with open(big, "rb") as held:
        assert os.fstat(held.fileno()).st_size == BLOCK
        with open(store / "fam/1.0/lib/big.bin", "ab") as f:  # the copy finishes
            f.write(final[BLOCK:])
        m.expect_log("changed in the store")
        deadline = time.monotonic() + 5
        while True:
            try:
                data = read_fully(big)
            except OSError as e:  # the read that found the change
                data = errno.errorcode[e.errno].encode()
            if data == final or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert data == final, f"{data[:20]!r}..., {len(data)} bytes"

        # Changed once more, and `rez-lazyfs forget`: the same again.
        write_file(store / "fam/1.0/lib/big.bin", final[::-1])
        run([VENV_BIN / "rez-lazyfs", "forget", "--mount", m.path, "fam-1.0"],
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
        deadline = time.monotonic() + 5
        while (data := read_fully(big)) != final[::-1] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert data == final[::-1], f"{data[:20]!r}..., {len(data)} bytes"


def test_the_kernel_keeps_symlink_targets_until_they_change(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    write_rez_package(store, "fam", "1.0", files={"lib/libfoo.so.1": "foo\n"})
    write_rez_package(store, "fam", "2.0")
    os.symlink("libfoo.so.1", store / "fam/1.0/lib/libfoo.so")
    os.symlink("1.0", store / "fam/latest")
    m = lazyfs_mount({"main": store}, metadata_ttl=1)
    fam = m.repo_path("main") / "fam"
    before = m.stats()["requests"].get("readlink", 0)
    for _ in range(3):
        assert os.readlink(fam / "1.0/lib/libfoo.so") == "libfoo.so.1"
        assert (fam / "1.0/lib/libfoo.so").read_bytes() == b"foo\n"
        assert os.readlink(fam / "latest") == "1.0"
        assert (fam / "latest/lib/libfoo.so.1").exists()
    assert m.stats()["requests"]["readlink"] - before == 2  # once per link
    assert any(b"the kernel keeps symlink targets" in line for line in m.log_lines())

    (store / "fam/latest").unlink()  # a link of a family directory moves on
    os.symlink("2.0", store / "fam/latest")
    deadline = time.monotonic() + 5
    while os.readlink(fam / "latest") != "2.0" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.readlink(fam / "latest") == "2.0"


def test_open_requests_can_be_set_in_the_config_file(tmp_path, lazyfs_mount):
    store = tmp_path / "store"
    write_rez_package(store, "fam", "1.0", files={"lib/a.py": "a = 1\n"})
    config = tmp_path / "config.toml"
    config.write_text("open_requests = true\n")
    m = lazyfs_mount({"main": store}, extra_args=("--config", str(config)))
    assert read_fully(m.repo_path("main") / "fam/1.0/lib/a.py") == b"a = 1\n"
    assert m.stats()["requests"]["open"] == 1
    assert any(b"every open, release, opendir and releasedir reaches the daemon "
               b"(open_requests is set)" in line for line in m.log_lines())
