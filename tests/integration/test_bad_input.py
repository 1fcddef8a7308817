"""Bad input and security (issue 6): odd names, hostile symlinks, bad
mountpoints, caches and configs, unknown options; who can reach a mount,
mount options, cache permissions, a planted pickle. Each gets correct
behaviour or one clear error line and a non-zero exit -- never a traceback,
never a half-done mount. Rows go to docs/faults.md (tests/helpers/faults.py)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from helpers.faults import (
    lazyfs_cli_fixture,
    lazyfs_mount_at_fixture,
    mount_options,
    report_fixture,
    scratch_mounts_fixture,
    tree_modes,
)
from helpers.mounts import is_mounted, mounted_paths
from helpers.users import public_tmp_fixture
from helpers.trees import KiB, deterministic_bytes, write_file
from helpers.walk import assert_same_tree, walk

# pytest finds these fixtures here (report is autouse); the names they go by
# in tests are report, lazyfs_cli, lazyfs_mount_at and scratch_mounts.
FIXTURES = (report_fixture, lazyfs_cli_fixture, lazyfs_mount_at_fixture, scratch_mounts_fixture,
            public_tmp_fixture)

AREAS = {
    "test_names": "bad input: store names",
    "test_symlink": "bad input: symlinks",
    "test_store_path": "bad input: store path",
    "test_mountpoint": "bad input: mountpoint",
    "test_cache_dir": "bad input: cache directory",
    "test_config": "bad input: config file",
    "test_cli": "bad input: command line",
    "test_security": "security",
}

BLOCK = 64 * KiB
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def simple_store(root: Path) -> dict[str, bytes]:
    files = {
        "fam/1.0.0/package.py": b"name = 'fam'\nversion = '1.0.0'\n",
        "fam/1.0.0/lib/data.bin": deterministic_bytes(2 * BLOCK + 3, seed=900),
    }
    for rel, content in files.items():
        write_file(root / rel, content)
    return files


def nothing_left(cli, mp: Path) -> None:
    """After a refused mount: nothing mounted there, no daemon of ours alive."""
    assert not is_mounted(mp), f"{mp} is mounted after an error"
    deadline = time.monotonic() + 5
    while cli.daemons() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cli.daemons(), f"a daemon survived the error: {cli.daemons()}"


def mounts_below(path: Path) -> set[bytes]:
    """Mount points below *path* (the system-wide table also holds other people's)."""
    prefix = os.fsencode(path) + b"/"
    return {p for p in mounted_paths() if p.startswith(prefix)}


def refused(result, *, mentions: tuple[str, ...] = (), any_of: tuple[str, ...] = (), usage: bool = False) -> str:
    """Asserts one clear error (ours, or click's usage error) and no
    traceback, naming every word of *mentions* and one of *any_of*;
    returns the message for the report."""
    assert result.returncode != 0, f"accepted (exit 0), {'and mounted' if result.mounted else 'nothing mounted'}: {result.output}"
    last = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert "Traceback" not in result.output, f"traceback ending in {last!r}:\n{result.output}"
    if usage:
        assert result.returncode == 2 and "Error:" in result.stderr, result.output
        return result.stderr.strip().splitlines()[-1]
    line = result.one_line_error()
    for word in mentions:
        assert word in line, f"the error does not name {word!r}: {line}"
    assert not any_of or any(word in line for word in any_of), f"the error names none of {any_of}: {line}"
    return line


# -- names ----------------------------------------------------------------------------

ODD_NAMES = {
    "newline inside": b"new\nline.txt",
    "only a newline": b"\n",
    "trailing newline": b"trailing\n",
    "carriage return and tab": b"cr\rtab\t.txt",
    "invalid UTF-8 (0xff 0xfe)": b"bad-\xff\xfe-utf8",
    "invalid UTF-8 (truncated sequence)": b"cut-\xc3",
    "UTF-8-encoded surrogate": b"surrogate-\xed\xa0\x80",
    "overlong UTF-8 '/'": b"overlong-\xc0\xaf",
    "255 ASCII bytes": b"L" * 255,
    "255 bytes of invalid UTF-8": b"\xff" * 255,
    "255 bytes of 2-byte UTF-8": "é".encode() * 127 + b"x",
    "backslash and quote": b"back\\slash\"quote'",
    "leading dash and spaces": b"-rf  with  spaces ",
}


def test_names_newlines_invalid_utf8_and_255_bytes(tmp_path, report, lazyfs_mount):
    store = tmp_path / "store"
    version = os.fsencode(store / "fam/1.0.0")
    for n, (what, name) in enumerate(ODD_NAMES.items()):
        write_file(os.path.join(version, name), deterministic_bytes(BLOCK + n, seed=910 + n))
        # the same name as a directory, with a file in it, one level deeper
        write_file(os.path.join(version, b"dirs", name, b"inner.bin"), deterministic_bytes(n + 1, seed=930 + n))
    # and at the repository root (a volatile directory) too
    write_file(os.path.join(os.fsencode(store), b"\n" + b"X" * 254), b"root-level\n")
    expected = walk(store)
    m = lazyfs_mount({"main": store})
    got = walk(m.repo_path("main"))
    assert_same_tree(expected, got)
    for what, name in ODD_NAMES.items():
        path = os.path.join(os.fsencode(m.repo_path("main") / "fam/1.0.0"), name)
        assert name in os.listdir(os.path.dirname(path))
        report.row(f"file and directory named {what}: {name[:12]!r}{'...' if len(name) > 12 else ''}",
                   f"listed byte-exact, stat and sha256 identical to the store ({os.stat(path).st_size} bytes)")


FORGED = b"2026-01-01 00:00:00,000 1 CRITICAL forged.logger: this line was written by a file name"


def test_names_with_newlines_cannot_forge_log_lines(tmp_path, report, lazyfs_mount):
    # A store entry's name is data, not log structure: when the daemon logs
    # it (an EIO naming the file), it must stay inside one log line.
    store = tmp_path / "store"
    rel = b"fam/1.0.0/lib/evil\n" + FORGED
    write_file(os.path.join(os.fsencode(store), rel), deterministic_bytes(BLOCK, seed=940))
    m = lazyfs_mount({"main": store}, store_timeout=2)
    path = os.path.join(os.fsencode(m.repo_path("main")), rel)
    os.stat(path)
    m.unmount()
    store.rename(tmp_path / "store-away")  # the read must fail, and be logged
    m.expect_log("store-away")
    m.expect_log(str(store))
    m.expect_log("evil")
    m.expect_log("forged")  # judged below, not by the fixture
    m.remount(store_timeout=2)
    with pytest.raises(OSError) as e:
        with open(path, "rb") as f:
            f.read()
    m.unmount()
    lines = m.log_lines()
    forged = [line for line in lines if line.startswith(FORGED[:30])]
    naming = [line for line in lines if b"evil" in line]
    report.row("a file named 'evil\\n<a complete fake CRITICAL log line>' fails to read (store gone)",
               f"read: {errno.errorcode[e.value.errno]}; log lines naming it: {len(naming)}; "
               + (f"FORGED LINE IN THE LOG: {forged[0][:60].decode()}..." if forged
                  else "the name stayed inside its log line"))
    assert e.value.errno == errno.EIO
    assert naming, "no log line names the file"
    assert not forged, f"a store file name wrote a line of its own into the log: {forged[0]!r}"


# -- symlinks ---------------------------------------------------------------------------

def outside_witness(outside: Path) -> INotify:
    """Counts opens and reads of anything in *outside* (not recursive: files only)."""
    ino = INotify()
    ino.add_watch(outside, flags.OPEN | flags.ACCESS)
    return ino


def test_symlinks_outside_the_store_and_loops(tmp_path, report, lazyfs_mount):
    store, outside = tmp_path / "store", tmp_path / "outside"
    write_file(outside / "secret.txt", "secret outside the store\n")
    links = {
        "absolute, to a file outside the store": ("fam/1.0.0/abs-file", str(outside / "secret.txt")),
        "absolute, to a directory outside the store": ("fam/1.0.0/abs-dir", str(outside)),
        "relative, climbing out of the store": ("fam/1.0.0/rel-out", "../../../outside/secret.txt"),
        "to /": ("fam/1.0.0/root", "/"),
        "loop a -> b": ("fam/1.0.0/loop-a", "loop-b"),
        "loop b -> a": ("fam/1.0.0/loop-b", "loop-a"),
        "to itself": ("fam/1.0.0/self", "self"),
        "dangling": ("fam/1.0.0/dangling", "no/such/thing"),
        "1000-byte target": ("fam/1.0.0/long", "x/" * 499 + "yz"),
        "non-UTF-8 target": ("fam/1.0.0/bytes", os.fsdecode(b"caf\xe9/\xff")),
        "a directory symlink used as a path prefix": ("fam/1.0.0/lib", "../../outside"),
    }
    write_file(store / "fam/1.0.0/package.py", "name = 'fam'\n")
    for rel, target in links.values():
        os.symlink(target, store / rel)
    m = lazyfs_mount({"main": store})
    repo = m.repo_path("main")
    witness = outside_witness(outside)
    try:
        for what, (rel, target) in links.items():
            st = os.lstat(repo / rel)
            assert stat.S_ISLNK(st.st_mode), f"{what}: not shown as a symlink"
            assert os.readlink(os.fsencode(repo / rel)) == os.fsencode(target), what
        assert sorted(os.listdir(repo / "fam/1.0.0")) == sorted(os.listdir(store / "fam/1.0.0"))
        loops = {}
        for rel in ("fam/1.0.0/loop-a", "fam/1.0.0/self"):
            with pytest.raises(OSError) as e:
                os.stat(repo / rel)
            loops[rel] = errno.errorcode[e.value.errno]
        events = [e for e in witness.read(timeout=0)]
    finally:
        witness.close()
    for what, (rel, target) in links.items():
        report.row(f"symlink {what}", "shown as a symlink, readlink gives the target verbatim"
                   + (f"; following it: {loops[rel]} (kernel)" if rel in loops else ""))
    report.row("listing, lstat, readlink and stat of all the links above",
               f"{len(events)} opens/reads of anything outside the store (inotify)")
    assert set(loops.values()) == {"ELOOP"}, loops
    assert not events, f"something opened or read files outside the store: {events}"
    # Opening through a link is resolved by the kernel on the client's side,
    # to the link's target: not the daemon's business, recorded for the table.
    with open(repo / "fam/1.0.0/abs-file") as f:
        client_side = f.read()
    report.row("opening a file through the absolute link (client side)",
               "the kernel resolves the link to the file outside the mount: "
               + ("its content, as for any symlink" if client_side == "secret outside the store\n" else client_side))


def test_symlink_swapped_in_after_indexing(tmp_path, report, lazyfs_mount):
    # The index says "lib" is a directory and "data.bin" a file; then the
    # store replaces them with symlinks to look-alikes outside the store
    # (same size and mtime, so only refusing to follow links protects).
    store, outside = tmp_path / "store", tmp_path / "outside"
    files = {
        "fam/1.0.0/lib/payload.bin": deterministic_bytes(2 * BLOCK + 9, seed=950),
        "fam/1.0.0/bin/tool.bin": deterministic_bytes(2 * BLOCK + 9, seed=951),
    }
    for rel, content in files.items():
        write_file(store / rel, content)
    m = lazyfs_mount({"main": store})
    repo = m.repo_path("main")
    for rel in files:
        os.stat(repo / rel)  # indexed, never read
    m.expect_log("fam/1.0.0")
    secret = deterministic_bytes(2 * BLOCK + 9, seed=952)

    def look_alike(path: Path, original: Path) -> None:
        write_file(path, secret)
        st = os.stat(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    # a directory component swapped for a link to a directory outside
    look_alike(outside / "dir/payload.bin", store / "fam/1.0.0/lib/payload.bin")
    shutil.move(store / "fam/1.0.0/lib", tmp_path / "lib-moved")
    os.symlink(outside / "dir", store / "fam/1.0.0/lib")
    # the file itself swapped for a link to a file outside
    look_alike(outside / "tool.bin", store / "fam/1.0.0/bin/tool.bin")
    (store / "fam/1.0.0/bin/tool.bin").unlink()
    os.symlink(outside / "tool.bin", store / "fam/1.0.0/bin/tool.bin")

    witness = outside_witness(outside / "dir")
    witness.add_watch(outside, flags.OPEN | flags.ACCESS)
    outcomes = {}
    try:
        for what, rel in (("a directory on the path", "fam/1.0.0/lib/payload.bin"),
                          ("the file itself", "fam/1.0.0/bin/tool.bin")):
            try:
                data = (repo / rel).read_bytes()
                outcomes[what] = ("THE OUTSIDE FILE'S BYTES" if data == secret else
                                  "the original bytes" if data == files[rel] else "other bytes")
            except OSError as e:
                outcomes[what] = errno.errorcode[e.errno]
        events = witness.read(timeout=0)
    finally:
        witness.close()
    for what, outcome in outcomes.items():
        report.row(f"{what} replaced in the store by a symlink to a same-size, same-mtime file outside, "
                   "after indexing", f"read through the mount: {outcome}")
    report.row("... and the daemon's access outside the store meanwhile", f"{len(events)} opens/reads (inotify)")
    assert "THE OUTSIDE FILE'S BYTES" not in outcomes.values(), outcomes
    assert not events, f"the daemon opened or read outside the store: {events}"


# -- the store path ------------------------------------------------------------------------

def test_store_path_is_a_symlink(tmp_path, report, lazyfs_mount, lazyfs_cli):
    real = tmp_path / "filer" / "packages"
    simple_store(real)
    (tmp_path / "link1").symlink_to(real)
    (tmp_path / "link2").symlink_to(tmp_path / "link1")  # a chain of two
    m = lazyfs_mount({"main": tmp_path / "link2"})
    assert_same_tree(walk(real), walk(m.repo_path("main")))
    report.row("store path is a chain of two symlinks to the repository",
               "mounted; the mirror is byte-identical to the repository")

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    mp = tmp_path / "mnt-dangling"
    mp.mkdir()
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={tmp_path / 'dangling'}", "--cache", tmp_path / "c2")
    report.row("store path is a dangling symlink", result.summary())
    refused(result, mentions=("dangling",))
    nothing_left(lazyfs_cli, mp)

    (tmp_path / "a-file").write_text("not a directory\n")
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={tmp_path / 'a-file'}", "--cache", tmp_path / "c3")
    report.row("store path is a regular file", result.summary())
    refused(result, mentions=("a-file",))
    nothing_left(lazyfs_cli, mp)


# -- the mountpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "not empty", "a regular file", "already a rez-lazyfs mount",
                                  "already a tmpfs mount"])
def test_mountpoint_problems(tmp_path, report, scratch_mounts, lazyfs_mount, lazyfs_cli, case):
    store = tmp_path / "store"
    simple_store(store)
    mp = tmp_path / "mp"
    existing = None
    if case == "not empty":
        write_file(mp / "someone's file", "keep me\n")
    elif case == "a regular file":
        mp.write_text("a file\n")
    elif case == "already a rez-lazyfs mount":
        existing = lazyfs_mount({"main": store})
        mp = existing.path
    elif case == "already a tmpfs mount":
        scratch_mounts.tmpfs(mp, size="1m")
    before = mounts_below(tmp_path)
    cache = tmp_path / "fresh-cache"
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache,
                            track=existing is None and case != "already a tmpfs mount")
    report.row(f"mountpoint {case}", result.summary()
               + ("; no cache directory created" if not cache.exists() else "; a cache directory was created"))
    refused(result, mentions=(str(mp),))
    assert mounts_below(tmp_path) == before, "mounts below the test directory changed"
    assert not lazyfs_cli.daemons()
    assert not cache.exists(), "the refused mount created its cache directory"
    if case == "not empty":
        assert sorted(os.listdir(mp)) == ["someone's file"]
    if existing is not None:
        assert (existing.repo_path("main") / "fam/1.0.0/package.py").read_bytes().startswith(b"name")


# -- the cache directory -------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["on a read-only tmpfs", "to be created under a read-only tmpfs",
                                  "a populated cache, bind-mounted read-only", "a regular file",
                                  "log file on a read-only filesystem"])
def test_cache_dir_problems(tmp_path, report, scratch_mounts, lazyfs_cli, case):
    store = tmp_path / "store"
    simple_store(store)
    mp = tmp_path / "mp"
    mp.mkdir()
    extra = []
    if case == "on a read-only tmpfs":
        cache = scratch_mounts.tmpfs(tmp_path / "ro", size="1m", ro=True)
    elif case == "to be created under a read-only tmpfs":
        cache = scratch_mounts.tmpfs(tmp_path / "ro", size="1m", ro=True) / "cache"
    elif case == "a populated cache, bind-mounted read-only":
        real = tmp_path / "real-cache"
        populate = tmp_path / "mp-populate"
        populate.mkdir()
        assert lazyfs_cli.run("mount", populate, "--repo", f"main={store}", "--cache", real).returncode == 0
        (populate / "main/fam/1.0.0/lib/data.bin").read_bytes()
        assert lazyfs_cli.run("umount", populate).returncode == 0
        deadline = time.monotonic() + 10
        while lazyfs_cli.daemons() and time.monotonic() < deadline:
            time.sleep(0.05)
        cache = scratch_mounts.bind(real, tmp_path / "ro-cache", ro=True)
    elif case == "a regular file":
        cache = tmp_path / "cache-file"
        cache.write_text("not a directory\n")
    else:
        cache = tmp_path / "cache"
        extra = ["--log-file", scratch_mounts.tmpfs(tmp_path / "ro", size="1m", ro=True) / "logs" / "daemon.log"]
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache, *extra)
    report.row(f"cache directory {case}" if "log" not in case else case, result.summary())
    if case == "a regular file":
        assert result.returncode != 0 and "Traceback" not in result.output, result.output
    else:
        refused(result)
    nothing_left(lazyfs_cli, mp)


# -- the config file ------------------------------------------------------------------------------

REPOS = '[repos]\nmain = "{store}"\n'
CONFIGS = {
    # case: (config text, the error must name one of these (the key or the bad value), give --cache)
    "not TOML": ("this is = = not toml\n" + REPOS, ("TOML",), True),
    "not UTF-8": (b"# caf\xe9\n" + REPOS.encode(), ("config",), True),
    "unknown top-level key": ("frobnicate = 1\n" + REPOS, ("frobnicate",), True),
    "unknown key in a repository table": ('[repos.main]\npath = "{store}"\nmutible = true\n', ("mutible",), True),
    "repos is not a table": ("repos = 5\n", ("repos",), True),
    "a repository path is a number": ("[repos]\nmain = 3\n", ("main",), True),
    "store_timeout is a word": ('store_timeout = "fast"\n' + REPOS, ("store_timeout", "'fast'"), True),
    "block_size is a list": ("block_size = [64]\n" + REPOS, ("block_size", "[64]"), True),
    "store_threads is a word": ('store_threads = "many"\n' + REPOS, ("store_threads", "'many'"), True),
    "allow_other is the string \"false\"": ('allow_other = "false"\n' + REPOS, ("allow_other",), True),
    "offline is the string \"no\"": ('offline = "no"\n' + REPOS, ("offline",), True),
    "mutable is the string \"false\"": ('[repos.main]\npath = "{store}"\nmutable = "false"\n', ("mutable",), True),
    "cache is a number": ("cache = 7\n" + REPOS, ("cache",), False),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_file_malformed(tmp_path, report, lazyfs_cli, case):
    text, words, give_cache = CONFIGS[case]
    store = tmp_path / "store"
    simple_store(store)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    config = conf_dir / "config.toml"
    config.write_bytes(text.replace(b"{store}", os.fsencode(store)) if isinstance(text, bytes)
                       else text.replace("{store}", str(store)).encode())
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    args = ["mount", mp, "--config", config] + (["--cache", cache] if give_cache else [])
    before = set(os.listdir(tmp_path)), set(os.listdir(conf_dir))
    result = lazyfs_cli.run(*args)
    if result.returncode == 0:
        seen = []
        if is_mounted(mp):
            options = mount_options(mp)
            seen.append("mounted " + ("WITH allow_other" if "allow_other" in options else "without allow_other"))
            try:
                policy = os.getxattr(mp / "main/fam/1.0.0/lib/data.bin", "user.rezlazyfs.policy").decode()
                seen.append(f"payload policy: {policy}")
            except OSError:
                pass
        if (conf_dir / "7").exists():
            seen.append("cache created at conf/7")
        report.row(f"config: {case}", "ACCEPTED: " + "; ".join(seen or ["exit 0, nothing mounted"]))
    else:
        report.row(f"config: {case}", result.summary())
    refused(result, any_of=words)
    nothing_left(lazyfs_cli, mp)
    after = set(os.listdir(tmp_path)), set(os.listdir(conf_dir))
    stray = (after[0] - before[0] - {"cli"}) | (after[1] - before[1])
    assert not stray, f"a refused mount left files behind: {sorted(stray)}"


# -- the command line -----------------------------------------------------------------------------

CLI_CASES = {
    # case: (arguments after `mount MP --repo main=STORE --cache CACHE`, or a full command; usage error?; words)
    "unknown option --frobnicate": (["--frobnicate"], True, ()),
    "unknown option with a value --colour=red": (["--colour=red"], True, ()),
    "--block-size 100 (not a multiple of 4K)": (["--block-size", "100"], False, ("block size",)),
    "--block-size lots": (["--block-size", "lots"], False, ("lots",)),
    "--store-timeout soon": (["--store-timeout", "soon"], True, ()),
    "--store-timeout 0": (["--store-timeout", "0"], False, ("store_timeout",)),
    "--metadata-ttl -1": (["--metadata-ttl", "-1"], False, ("metadata_ttl",)),
    "--repo without '='": (["--repo", "noequals"], False, ("noequals",)),
    "--repo with an alias that is not a plain name": (["--repo", "bad/alias=/tmp"], False, ("bad/alias",)),
    "--repo to a path that does not exist": (["--repo", "other=/nonexistent/packages"], False, ("/nonexistent/packages",)),
    "--mutable naming no repository": (["--mutable", "nosuch"], False, ("nosuch",)),
    "--cache without its value": (["--cache"], True, ()),
    "no repository at all": (None, False, ("repositor",)),
    "unknown command": (["!frobnicate"], True, ()),
    "umount of something not mounted": (["!umount"], False, ("not mounted",)),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_options(tmp_path, report, lazyfs_cli, case):
    extra, usage, words = CLI_CASES[case]
    store = tmp_path / "store"
    simple_store(store)
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    if extra is None:
        args = ["mount", mp, "--cache", cache]
    elif extra[0] == "!frobnicate":
        args = ["frobnicate", mp]
    elif extra[0] == "!umount":
        args = ["umount", mp]
    else:
        args = ["mount", mp, "--repo", f"main={store}", "--cache", cache, *extra]
    result = lazyfs_cli.run(*args)
    shown = " ".join(str(a).replace(str(mp), "MP").replace(str(store), "STORE").replace(str(cache), "CACHE")
                     for a in args)
    report.row(f"{case}: `rez-lazyfs {shown}`", result.summary().replace(str(tmp_path), "..."))
    refused(result, mentions=words, usage=usage)
    nothing_left(lazyfs_cli, mp)
    if usage or "repo" in case or "block" in case or "timeout" in case or "ttl" in case:
        assert not cache.exists() or "--repo to a path" in case, "a refused mount created its cache directory"


# -- security --------------------------------------------------------------------------------------

def as_nobody(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *map(str, args)], capture_output=True, text=True, timeout=30, cwd="/")


def test_security_mount_reachable_by_its_user_only(public_tmp, tmp_path, report, lazyfs_mount_at):
    store = public_tmp / "store"
    write_file(store / "fam/1.0.0/public.txt", "for everyone\n", 0o644)
    write_file(store / "fam/1.0.0/private.txt", "for root only\n", 0o600)
    for d in (store, store / "fam", store / "fam/1.0.0"):
        d.chmod(0o755)
    control = as_nobody("cat", store / "fam/1.0.0/public.txt")
    assert control.returncode == 0, f"control: nobody cannot read the store itself: {control.stderr}"
    mp = public_tmp / "mnt"
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=public_tmp / "cache")
    options = mount_options(mp)
    stat_mp = as_nobody("stat", mp)
    read_public = as_nobody("cat", mp / "main/fam/1.0.0/public.txt")
    report.row("another user (nobody) on a mount made without --allow-other",
               f"stat of the mountpoint: {stat_mp.stderr.strip().split(': ')[-1] or 'ok'}; "
               f"cat of a 0644 file: {read_public.stderr.strip().split(': ')[-1] or 'ok'} "
               f"(the same file in the store: readable); options: {','.join(sorted(options & {'allow_other', 'default_permissions'})) or 'neither allow_other nor default_permissions'}")
    assert stat_mp.returncode != 0 and "Permission denied" in stat_mp.stderr, stat_mp
    assert read_public.returncode != 0 and "Permission denied" in read_public.stderr, read_public
    assert "allow_other" not in options

    m.remount(extra_args=("--allow-other",))
    options = mount_options(mp)
    read_public = as_nobody("cat", mp / "main/fam/1.0.0/public.txt")
    read_private = as_nobody("cat", mp / "main/fam/1.0.0/private.txt")
    root_private = (mp / "main/fam/1.0.0/private.txt").read_text()
    report.row("another user (nobody) on a mount made with --allow-other",
               f"0644 file: {'read' if read_public.stdout == 'for everyone' + chr(10) else read_public.stderr.strip()}; "
               f"0600 root file: {read_private.stderr.strip().split(': ')[-1] or 'READ'} "
               f"(root reads it); options include {','.join(sorted(options & {'allow_other', 'default_permissions'}))}")
    assert "allow_other" in options and "default_permissions" in options, options
    assert read_public.returncode == 0 and read_public.stdout == "for everyone\n", read_public
    assert read_private.returncode != 0 and "Permission denied" in read_private.stderr, read_private
    assert root_private == "for root only\n"


def test_security_nosuid_nodev(public_tmp, tmp_path, report, lazyfs_mount_at):
    store = public_tmp / "store"
    version = store / "fam/1.0.0"
    version.mkdir(parents=True)
    for d in (store, store / "fam", version):
        d.chmod(0o755)
    shutil.copy("/usr/bin/id", version / "suid-id")
    os.chmod(version / "suid-id", 0o4755)  # setuid root, like a hostile package could ship
    os.mknod(version / "null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        control = as_nobody(version / "suid-id", "-u")
        mp = public_tmp / "mnt"
        lazyfs_mount_at.at(mp, {"main": store}, cache=public_tmp / "cache", extra_args=("--allow-other",))
        options = mount_options(mp)
        mode = stat.S_IMODE(os.stat(mp / "main/fam/1.0.0/suid-id").st_mode)
        through = as_nobody(mp / "main/fam/1.0.0/suid-id", "-u")
        try:
            with open(mp / "main/fam/1.0.0/null-device", "rb") as f:
                device = f"OPENED ({f.read(1)!r})"
        except OSError as e:
            device = errno.errorcode[e.errno]
    finally:
        (version / "suid-id").unlink()  # no setuid binary left lying around in /tmp
    report.row("mount options", ", ".join(sorted(options & {"ro", "nosuid", "nodev", "default_permissions"})))
    report.row("a setuid-root executable in the store, run by nobody through the mount (--allow-other)",
               f"mode shown {mode:o}; runs as uid {through.stdout.strip() or through.stderr.strip()} "
               f"(the same file run from the store: uid {control.stdout.strip()})")
    report.row("a character device node (1,3) in the store, opened through the mount", device)
    assert {"ro", "nosuid", "nodev"} <= options, options
    assert through.stdout.strip() == "65534", through
    assert device != "OPENED" and not device.startswith("OPENED"), device


def test_security_cache_is_owner_only(tmp_path, report, lazyfs_mount):
    store = tmp_path / "store"
    files = simple_store(store)
    old = os.umask(0o022)  # a usual umask: what the daemon creates must not depend on it
    try:
        m = lazyfs_mount({"main": store})
        for rel, content in files.items():
            assert (m.repo_path("main") / rel).read_bytes() == content
        m.unmount()
    finally:
        os.umask(old)
    modes = tree_modes(m.cache)
    loose = {rel: f"{mode:04o}" for rel, mode in modes.items() if mode & 0o077}
    dirs = sum(1 for rel in modes if (m.cache / rel).is_dir())
    report.row("cache directory and everything in it, created under umask 022",
               f"{dirs} directories and {len(modes) - dirs} files checked; "
               + (f"readable by others: {loose}" if loose else "all owner-only (0700 dirs, 0600 files)"))
    assert not loose, f"group/other permission bits on: {loose}"


class Planted:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_security_planted_pickle_is_refused(tmp_path, report, lazyfs_mount, lazyfs_cli):
    import diskcache

    store = tmp_path / "store"
    files = simple_store(store)
    m = lazyfs_mount({"main": store})
    for rel, content in files.items():
        assert (m.repo_path("main") / rel).read_bytes() == content
    m.unmount()
    marker = tmp_path / "PWNED"
    sid = os.fsencode(str(store))
    planted = []
    for sub in ("index", "index/ledger"):
        directory = m.cache / sub
        if not (directory / "cache.db").exists():
            continue
        with diskcache.Cache(str(directory)) as db:  # stock diskcache pickles what it is given
            keys = list(db.iterkeys())
            targets = [k for k in keys if isinstance(k, bytes) and (k.endswith(b"fam/1.0.0/lib") or k.endswith(b"\0root")
                                                                    or k.startswith(b"T\0"))]
            targets += [k for k in keys if isinstance(k, str)][:3]
            for key in targets:
                db.set(key, Planted(str(marker)))
                planted.append(f"{sub}:{key!r}"[:60])
            db.set(b"L\0" + sid + b"\0fam", Planted(str(marker)))
            planted.append(f"{sub}:fam listing")
    assert planted
    mp = tmp_path / "mnt-after"
    mp.mkdir()
    mark = m.log_mark()
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", m.cache, "--block-size", "64K")
    exercised = {}
    if result.returncode == 0:
        for rel in ["", "fam", "fam/1.0.0", "fam/1.0.0/lib", *files]:
            path = mp / "main" / rel
            try:
                if path.is_dir():
                    os.listdir(path)
                    exercised[rel or "."] = "listed"
                else:
                    exercised[rel] = "read ok" if path.read_bytes() == files[rel] else "WRONG BYTES"
            except OSError as e:
                exercised[rel or "."] = errno.errorcode[e.errno]
        lazyfs_cli.run("umount", mp)
        time.sleep(0.3)
    logged = "\n".join(line.decode(errors="replace") for line in m.log_lines(since=mark))
    refusals = [line for line in logged.splitlines() if "pickle" in line.lower()]
    tracebacks = "Traceback" in logged
    report.row(f"pickled objects planted with stock diskcache under {len(planted)} index keys "
               "(listings, text records, ledger)",
               f"payload ran: {'YES' if marker.exists() else 'no'}; mount: "
               + (f"up; {exercised}" if result.returncode == 0 else result.summary())
               + f"; log lines about the pickle: {len(refusals)}; traceback in the log: {'YES' if tracebacks else 'no'}")
    assert not marker.exists(), "the planted pickle was executed"
    if result.returncode != 0:
        refused(result)
    else:
        assert "WRONG BYTES" not in exercised.values()
    m.expect_log("pickle")
    assert not tracebacks, "\n".join(logged.splitlines()[-30:])
