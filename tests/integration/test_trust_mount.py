"""Trust and liveness (issue 15) on real mounts, the mount's own part: what
other users of an --allow-other mount may see and read (permissions that
change in the store, POSIX ACLs, the mount's xattrs), payload directories
listed while a release was still being copied (and `rez-lazyfs forget`),
and the daemon's memory with many open directory handles and big walks.

Multi-user cases run as a throwaway unprivileged user created by the test
(tests/helpers/users.py), on a mount under a directory that user can reach.
Each test records rows for the fault report (tests/helpers/faults.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

from helpers.faults import (
    daemon_pid,
    lazyfs_cli_fixture,
    lazyfs_mount_at_fixture,
    report_fixture,
    scratch_mounts_fixture,
)
from helpers.trees import KiB, deterministic_bytes, write_file
from helpers.users import public_tmp_fixture, throwaway_user_fixture

# pytest finds these fixtures here (report is autouse).
FIXTURES = (report_fixture, lazyfs_cli_fixture, lazyfs_mount_at_fixture, scratch_mounts_fixture,
            public_tmp_fixture, throwaway_user_fixture)

AREAS = {
    "test_permissions": "trust: permissions (allow_other)",
    "test_xattrs": "trust: mount xattrs (allow_other)",
    "test_mid_release": "liveness: payload listed mid-release",
    "test_forget": "liveness: payload listed mid-release",
    "test_memory": "memory",
}

BLOCK = 64 * KiB
PERMISSION_TTL = 2.0
MARGIN = 3.0  # seconds on top of a stated bound (2 cores shared with other test runs)
RSS_BOUND_MIB = 256


def shared_store(root: Path) -> Path:
    """A store other users can traverse (every directory 0755)."""
    write_file(root / "fam/1.0/package.py", "name = 'fam'\nversion = '1.0'\n")
    write_file(root / "fam/1.0/lib/secret.txt", "released, then restricted\n", 0o644)
    write_file(root / "fam/1.0/lib/other.txt", "a neighbour\n", 0o644)
    for d in (root, root / "fam", root / "fam/1.0", root / "fam/1.0/lib"):
        d.chmod(0o755)
    return root


def outcome(result: subprocess.CompletedProcess) -> str:
    """'ok' or the error a command as the user ended with (its last words)."""
    if result.returncode == 0:
        return "ok"
    text = result.stderr.decode(errors="replace").strip()
    return text.rsplit(": ", 1)[-1] if text else f"exit {result.returncode}"


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


# -- permissions --------------------------------------------------------------------------

def test_permissions_chmod_000_reaches_other_users_within_permission_ttl(
        public_tmp, throwaway_user, report, lazyfs_mount_at):
    """#6: permissions seen once were kept forever (a chmod 000 after the first
    listing still let other users read, across remounts)."""
    store = shared_store(public_tmp / "store")
    mp = public_tmp / "mnt"
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=public_tmp / "cache",
                           extra_args=("--allow-other", "--permission-ttl", str(PERMISSION_TTL)))
    secret = mp / "main/fam/1.0/lib/secret.txt"
    first = throwaway_user.run(["cat", secret])
    assert first.returncode == 0 and first.stdout == b"released, then restricted\n", first

    (store / "fam/1.0/lib/secret.txt").chmod(0o000)
    changed = time.monotonic()
    while (seen := outcome(throwaway_user.run(["cat", secret]))) == "ok" and \
            time.monotonic() - changed < PERMISSION_TTL + 30:
        time.sleep(0.1)
    took = time.monotonic() - changed
    report.row(f"another user reads a payload file through an --allow-other mount "
               f"(--permission-ttl {PERMISSION_TTL:g}), then the file is chmod 000 in the store",
               f"first read: ok; after the chmod: '{seen}' {took:.1f}s later "
               f"(bound: permission_ttl {PERMISSION_TTL:g}s + {MARGIN:g}s)")
    assert seen == "Permission denied", seen
    assert took <= PERMISSION_TTL + MARGIN, f"denied only after {took:.1f}s"
    assert secret.read_bytes() == b"released, then restricted\n"  # root still reads it

    # Across a remount: a listing older than permission_ttl in the index is
    # revalidated before use.
    m.unmount()
    (store / "fam/1.0/lib").chmod(0o700)
    time.sleep(PERMISSION_TTL + 0.5)
    m.remount()
    other = mp / "main/fam/1.0/lib/other.txt"
    read_after = outcome(throwaway_user.run(["cat", other]))
    list_after = outcome(throwaway_user.run(["ls", other.parent]))
    report.row("the payload directory is chmod 0700 in the store while unmounted; "
               f"remounted {PERMISSION_TTL + 0.5:g}s later (its listing, in the index, is older "
               "than permission_ttl)",
               f"another user's first read of a file in it: '{read_after}'; ls: '{list_after}'")
    assert read_after == "Permission denied", read_after
    assert list_after == "Permission denied", list_after


def test_permissions_acl_denying_a_user_holds_through_the_mount(
        public_tmp, throwaway_user, report, lazyfs_mount_at):
    """#6: ACLs were ignored: the daemon reads as root and default_permissions
    sees only mode bits, so a file whose ACL denies a user was readable by
    that user through an --allow-other mount."""
    store = shared_store(public_tmp / "store")
    denied = store / "fam/1.0/lib/acl.txt"
    write_file(denied, "not for that user\n", 0o644)
    subprocess.run(["setfacl", "-m", f"u:{throwaway_user.name}:---", str(denied)], check=True)
    in_store = outcome(throwaway_user.run(["cat", denied]))
    assert in_store == "Permission denied", f"control: the ACL does not deny the user: {in_store}"
    mp = public_tmp / "mnt"
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=public_tmp / "cache",
                           extra_args=("--allow-other",))
    m.expect_log("POSIX ACLs")
    through = outcome(throwaway_user.run(["cat", mp / "main/fam/1.0/lib/acl.txt"]))
    neighbour = outcome(throwaway_user.run(["cat", mp / "main/fam/1.0/lib/other.txt"]))
    shown = oct(os.stat(mp / "main/fam/1.0/lib/acl.txt").st_mode & 0o777)
    logged = [line for line in m.log_lines() if b"POSIX ACLs" in line]
    report.row("a 0644 store file with the ACL u:USER:--- (setfacl); USER reads it through an "
               "--allow-other mount",
               f"in the store: '{in_store}'; through the mount: '{through}' (listed as {shown}: "
               f"group/other bounded by the ACL); a file without ACL beside it: '{neighbour}'; "
               f"log lines about ACLs: {len(logged)}")
    assert through == "Permission denied", through
    assert neighbour == "ok", neighbour
    assert shown == "0o600", shown
    assert (mp / "main/fam/1.0/lib/acl.txt").read_bytes() == b"not for that user\n"  # root
    assert len(logged) == 1, logged


# -- xattrs -------------------------------------------------------------------------------

def test_xattrs_of_the_mount_answer_only_its_owner(public_tmp, throwaway_user, report,
                                                   lazyfs_mount_at):
    """#7: on --allow-other mounts every user could read store_path and the stats."""
    store = shared_store(public_tmp / "store")
    mp = public_tmp / "mnt"
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=public_tmp / "cache",
                           extra_args=("--allow-other",))
    target = mp / "main/fam/1.0/lib/secret.txt"
    assert throwaway_user.run(["cat", target]).returncode == 0
    seen = {}
    for name, path in (("user.rezlazyfs.store_path", target), ("user.rezlazyfs.policy", target),
                       ("user.rezlazyfs.cached", target), ("user.rezlazyfs.stats", mp),
                       ("user.rezlazyfs.stats.total", mp), ("user.rezlazyfs.config", mp),
                       ("user.rezlazyfs.flush", mp),
                       ("user.rezlazyfs.forget", mp / "main/fam/1.0")):
        seen[name] = outcome(throwaway_user.run(["getfattr", "--only-values", "-n", name, path]))
    dump = throwaway_user.run(["getfattr", "-d", "-m", "-", target])
    listed = [line for line in dump.stdout.decode().splitlines() if "rezlazyfs" in line]
    owner = os.getxattr(target, "user.rezlazyfs.store_path").decode()
    forgot = [line for line in m.log_lines() if b"forgot" in line]
    report.row("another user reads the mount's xattrs (store_path, policy, cached, stats, "
               "stats.total, config, flush, forget) with getfattr on an --allow-other mount",
               f"{sorted(set(seen.values()))} for all {len(seen)}; getfattr -d lists "
               f"{len(listed)} of ours; the owner (root) still reads store_path "
               f"({owner.replace(str(public_tmp), 'TMP')}); forgets done for the user: {len(forgot)}")
    assert set(seen.values()) == {"Permission denied"}, seen
    assert not listed, dump.stdout
    assert owner == str(store / "fam/1.0/lib/secret.txt")
    assert not forgot


# -- payload listed mid-release -----------------------------------------------------------

def test_mid_release_listing_is_relisted_when_a_read_finds_the_file_changed(
        tmp_path, report, lazyfs_mount, lazyfs_cli):
    """#11: a payload directory listed while files were still being copied
    stayed frozen: the grown file answered EIO forever, new files never
    appeared, across remounts and cleans."""
    store = tmp_path / "store"
    final = deterministic_bytes(5 * BLOCK + 123, seed=1511)
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(store / "fam/1.0/lib/big.bin", final[:2 * BLOCK])  # the copy is half done
    m = lazyfs_mount({"main": store})
    lib = m.repo_path("main") / "fam/1.0/lib"
    assert os.listdir(lib) == ["big.bin"]
    assert (lib / "big.bin").stat().st_size == 2 * BLOCK
    assert not (lib / "new.py").exists()  # a miss the kernel may cache for a day
    with open(store / "fam/1.0/lib/big.bin", "ab") as f:  # the copy finishes...
        f.write(final[2 * BLOCK:])
    write_file(store / "fam/1.0/lib/new.py", "print('new')\n")  # ...and another file arrives

    m.expect_log("changed in the store")
    try:
        first = "read %d bytes" % len((lib / "big.bin").read_bytes())
    except OSError as e:
        first = errno.errorcode[e.errno]
    deadline = time.monotonic() + 5
    while True:
        try:
            data = (lib / "big.bin").read_bytes()
        except OSError as e:
            data = errno.errorcode[e.errno].encode()
        names = sorted(os.listdir(lib))
        if (data == final and names == ["big.bin", "new.py"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    report.row("a payload directory listed while a file was half copied (2 of 5 blocks) and "
               "before another file arrived; then the copy finishes",
               f"first read of the grown file: {first}; on reopen: {len(data)} of {len(final)} "
               f"bytes, {'right' if data == final else 'WRONG'}; listing: {names}; no remount")
    assert data == final, f"{len(data)} bytes after reopen"
    assert names == ["big.bin", "new.py"]
    assert (lib / "new.py").read_text() == "print('new')\n"

    m.unmount()
    cleaned = lazyfs_cli.run("clean", "--cache", m.cache, "--max-size", "0")
    assert cleaned.returncode == 0, cleaned.output
    m.remount()
    after = (lib / "big.bin").read_bytes()
    report.row("then unmounted, `clean --max-size 0`, remounted",
               f"the file: {len(after)} bytes, {'right' if after == final else 'WRONG'}; "
               f"listing: {sorted(os.listdir(lib))}")
    assert after == final and sorted(os.listdir(lib)) == ["big.bin", "new.py"]


def test_forget_lists_a_version_again_in_a_mount_and_in_a_cache(tmp_path, report, lazyfs_mount,
                                                                lazyfs_cli):
    """#11: a user command to forget a directory or a package version."""
    store = tmp_path / "store"
    write_file(store / "fam/1.0/package.py", "name = 'fam'\n")
    write_file(store / "fam/1.0/lib/a.py", "a = 1\n")
    m = lazyfs_mount({"main": store})
    lib = m.repo_path("main") / "fam/1.0/lib"
    assert os.listdir(lib) == ["a.py"] and not (lib / "late.py").exists()
    write_file(store / "fam/1.0/lib/late.py", "late = 1\n")  # nothing read: nothing notices

    told = lazyfs_cli.run("forget", "--mount", m.path, "fam-1.0")
    deadline = time.monotonic() + 5
    while not (lib / "late.py").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    report.row("a file added to a payload directory after it was listed (a cached miss too); "
               "`rez-lazyfs forget --mount MP fam-1.0`",
               f"{told.summary()}; then the file: "
               f"{'there' if (lib / 'late.py').exists() else 'MISSING'}, listing {sorted(os.listdir(lib))}")
    assert told.returncode == 0 and "forgot" in told.stdout, told.output
    assert sorted(os.listdir(lib)) == ["a.py", "late.py"]

    by_path = lazyfs_cli.run("forget", lib)
    assert by_path.returncode == 0 and "forgot" in by_path.stdout, by_path.output

    m.unmount()
    write_file(store / "fam/1.0/lib/later.py", "later = 1\n")
    in_cache = lazyfs_cli.run("forget", "--cache", m.cache, "--repo", f"main={store}", "fam-1.0")
    m.remount()
    listed = sorted(os.listdir(lib))
    unknown = lazyfs_cli.run("forget", "--cache", m.cache, "--repo", f"main={store}", "nope-9")
    report.row("unmounted, a file added, `rez-lazyfs forget --cache C --repo main=STORE fam-1.0`, "
               "remounted; then a version the cache never saw",
               f"{in_cache.summary().replace(str(tmp_path), 'TMP')}; listing after remount: "
               f"{listed}; unknown version: {unknown.summary()}")
    assert in_cache.returncode == 0 and "forgot" in in_cache.stdout, in_cache.output
    assert listed == ["a.py", "late.py", "later.py"]
    assert unknown.returncode == 1 and "nope-9" in unknown.one_line_error()


# -- memory -------------------------------------------------------------------------------

def make_flat_tree(directory: Path, count: int) -> list[str]:
    """`count` empty files in one directory, fast (mknod)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"f{i:06d}.py" for i in range(count)]
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mknod(name, dir_fd=fd)
    finally:
        os.close(fd)
    return names


def test_memory_40_handles_on_a_100k_entry_directory(tmp_path, report, lazyfs_mount):
    """#12: every open directory handle copied the whole listing (40 handles on
    a 100k-entry directory took the daemon to 1,052 MiB)."""
    store = tmp_path / "store"
    names = make_flat_tree(store / "fam/1.0/big", 100_000)
    m = lazyfs_mount({"main": store})
    big = m.repo_path("main") / "fam/1.0/big"
    assert sorted(os.listdir(big)) == names
    pid = daemon_pid(m)
    before = status_kib(pid, "VmRSS")
    handles = []
    try:
        for _ in range(40):
            handle = os.scandir(big)  # one open directory each, read one batch in
            next(handle)
            handles.append(handle)
        held = status_kib(pid, "VmRSS")
        whole = sum(1 for _ in handles[-1]) + 1  # one handle read to its end
    finally:
        for handle in handles:
            handle.close()
    report.row("40 directory handles held open (each read one batch in) on a 100,000-entry "
               "payload directory",
               f"daemon RSS {mib(before)} before, {mib(held)} with the 40 handles "
               f"(bound {RSS_BOUND_MIB} MiB); one handle read to its end: {whole} entries")
    assert held < RSS_BOUND_MIB * 1024, mib(held)
    assert whole == 100_000


def test_memory_500k_entry_walk_stays_bounded_and_drop_caches_frees_it(
        tmp_path, report, scratch_mounts, lazyfs_mount):
    """#12: a 500k-entry walk reached ~340 MiB RSS and stayed there after drop_caches."""
    store = scratch_mounts.tmpfs(tmp_path / "store", size="64m")
    started = time.monotonic()
    for d in range(500):
        make_flat_tree(store / f"fam/1.0/d{d:03d}", 1000)
    built = time.monotonic() - started
    m = lazyfs_mount({"main": store})
    pid = daemon_pid(m)
    started = time.monotonic()
    walk = subprocess.run(["find", m.repo_path("main"), "-type", "f"], capture_output=True,
                          timeout=300, check=True)
    walked = time.monotonic() - started
    found = walk.stdout.count(b"\n")
    peak = status_kib(pid, "VmHWM")
    nodes = os.statvfs(m.path).f_files  # the daemon's inode table
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: the kernel FORGETs
    deadline = time.monotonic() + 30
    while (left := os.statvfs(m.path).f_files) > nodes // 100 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = status_kib(pid, "VmRSS")
    report.row("`find` over 500,000 payload files (500 directories of 1,000; store on tmpfs, "
               f"built in {built:.1f}s), then drop_caches (2)",
               f"walked {found} files in {walked:.1f}s; daemon peak RSS {mib(peak)} "
               f"(bound {RSS_BOUND_MIB} MiB) with {nodes} inodes held; after drop_caches: "
               f"{left} inodes, RSS {mib(after)}")
    assert found == 500_000
    assert peak < RSS_BOUND_MIB * 1024, mib(peak)
    assert left <= nodes // 100, f"the kernel forgot, the daemon still holds {left} inodes"
    assert after < RSS_BOUND_MIB * 1024, mib(after)
