"""Issue 15, the cache as a trust boundary: caches, shared caches and cache files
that someone else could have written never make the mount serve their bytes.

Each test plays the attack on a real mount (a throwaway unprivileged user for
the multi-user ones) and asserts the safe outcome; rows go to the fault report.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from helpers.faults import lazyfs_cli_fixture, lazyfs_mount_at_fixture, report_fixture
from helpers.mounts import is_mounted
from helpers.trees import deterministic_bytes, write_file
from helpers.users import public_tmp_fixture, throwaway_user_fixture

FIXTURES = (report_fixture, lazyfs_cli_fixture, lazyfs_mount_at_fixture, throwaway_user_fixture,
            public_tmp_fixture)
BLOCK = 64 * 1024  # the test mounts' block size (helpers.mounts.MountOptions)
TOOL = "fam/1.0/bin/tool"
TOOL_BYTES = deterministic_bytes(3 * BLOCK + 100, seed=15)


def make_store(root: Path) -> Path:
    write_file(root / TOOL, TOOL_BYTES, 0o755)
    write_file(root / "fam/1.0/package.py", "name = 'fam'\nversion = '1.0'\n")
    for d in (root, root / "fam", root / "fam/1.0", root / "fam/1.0/bin"):
        d.chmod(0o755)
    return root


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cache_file_of(cache: Path, store: Path, rel: str) -> Path:
    """Where the documented key rule puts `rel`'s cache file."""
    from cachecore.blocks import file_key
    from cachecore.model import identity_of_stat

    key = file_key(str(store), rel.encode(), identity_of_stat(os.lstat(store / rel)), BLOCK)
    return cache / "blocks" / key[:2] / key


def old_public_trailer(data: bytes, key: str, index: int) -> bytes:
    """The trailer of the earlier release: xxh3 seeded from public facts only,
    which anyone can compute (the attack of finding 1)."""
    import xxhash

    seed = (int(key[:16], 16) + index) % 2**64
    return xxhash.xxh3_64_intdigest(data, seed=seed).to_bytes(8, "little")


def world_writable(public_tmp: Path) -> Path:
    """A /tmp-like directory (1777) where any user can make things."""
    path = public_tmp / "tmp"
    path.mkdir()
    path.chmod(0o1777)
    return path


# -- 1. a cache someone else can write -------------------------------------------
def test_trust_a_cache_directory_another_user_made_is_refused(public_tmp, throwaway_user, lazyfs_cli,
                                                               report):
    store = make_store(public_tmp / "store")
    planted = world_writable(public_tmp) / "their-cache"
    made = throwaway_user.run(["mkdir", "-m", "0700", planted])
    assert made.returncode == 0, made.stderr
    mp = public_tmp / "mnt"
    mp.mkdir()
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", planted)
    line = result.one_line_error()
    report.row("the cache directory was made by another user (uid "
               f"{throwaway_user.uid}), then root mounts with it", line)
    assert result.returncode != 0 and not result.mounted and not is_mounted(mp)
    assert "not owned by" in line
    assert os.listdir(planted) == [], "something was written into the other user's directory"


ATTACK = r"""
import os, sys
victim, inside, key = sys.argv[1:4]
data = sys.stdin.buffer.read()
os.rename(victim, victim + "-moved")
if inside == ".":
    target = victim
else:
    target = os.path.join(victim, inside)
    os.makedirs(os.path.dirname(target), mode=0o700)
with open(target, "wb") as f:
    f.write(data)
"""


@pytest.mark.parametrize("where", ["cache", "blocks", "shard", "parent"])
def test_trust_a_cache_writable_by_others_is_refused(public_tmp, throwaway_user, lazyfs_cli,
                                                      lazyfs_mount_at, report, where):
    store = make_store(public_tmp / "store")
    parent = public_tmp / "home"
    parent.mkdir(mode=0o755)
    cache = parent / "cache"
    mp = public_tmp / "mnt"
    mp.mkdir()
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=cache)
    assert (mp / "main" / TOOL).read_bytes() == TOOL_BYTES
    m.unmount()
    shard = cache_file_of(cache, store, TOOL).parent
    target = {"cache": cache, "blocks": cache / "blocks", "shard": shard, "parent": parent}[where]
    target.chmod(0o777)  # what an umask slip or a careless chmod leaves behind
    for above in ([cache] if where == "blocks" else [cache, cache / "blocks"] if where == "shard" else []):
        above.chmod(0o711)  # traversable (allowed: nobody else can write it), so the hole is reachable
    # The attacker's move, where that directory lets them: put their own
    # directory (or file) in place of ours, holding a block whose trailer is
    # computed from public facts (the earlier release's rule).
    block_file = cache_file_of(cache, store, TOOL)
    victim = {"cache": cache / "blocks", "blocks": block_file.parent, "shard": block_file,
              "parent": cache}[where]
    evil = b"#!/bin/sh\necho owned\n".ljust(BLOCK, b"\n")
    forged = throwaway_user.run([sys.executable, "-c", ATTACK, victim, block_file.relative_to(victim)
                                 if victim != block_file else ".", block_file.name],
                                input=evil + old_public_trailer(evil, block_file.name, 0))
    assert forged.returncode == 0, forged.stderr
    m.expect_log("refusing the cache")  # the daemon's own line, before it reports the error
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache,
                            "--block-size", "64K")
    line = result.one_line_error()
    report.row(f"the {where} directory of a cache made group/other-writable (0777), "
               "another user plants a block with a publicly computable trailer", line)
    assert result.returncode != 0 and not is_mounted(mp)
    assert "writable by group or others" in line


def test_trust_a_planted_block_is_treated_as_absent(tmp_path, lazyfs_mount_at, report):
    """Bytes in a slot that the cache's key did not sign never reach a reader,
    however they got there (here: written by root, as an attacker with write
    access for a while would, with the trailer the earlier release used)."""
    store = make_store(tmp_path / "store")
    cache = tmp_path / "cache"
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=cache)
    assert (mp / "main" / TOOL).read_bytes() == TOOL_BYTES
    m.unmount()
    path = cache_file_of(cache, store, TOOL)
    key = path.name
    evil = b"#!/bin/sh\necho owned\n".ljust(BLOCK, b"\n")
    with open(path, "r+b") as f:
        f.write(evil + old_public_trailer(evil, key, 0))
    m.mount()
    drop_caches()
    served = (mp / "main" / TOOL).read_bytes()
    m.expect_log("is damaged; refetching")
    logged = [line for line in m.log_lines() if b"damaged" in line]
    report.row("a block planted in the cache file with a trailer from public facts "
               "(store path, size, mtime, block size), page cache dropped, file read",
               f"served {'the store bytes' if served == TOOL_BYTES else 'OTHER BYTES'}; "
               f"log: {logged[0].decode(errors='replace').split(': ', 1)[-1] if logged else 'nothing'}")
    assert served == TOOL_BYTES
    assert logged, "the planted block was not reported"


VICTIM_BYTES = b"root's file\n"


def mounted_with_a_victim(tmp_path: Path, lazyfs_mount_at):
    """A store, a cache and a mount of them, and a root-only file the cache must never touch."""
    store = make_store(tmp_path / "store")
    cache = tmp_path / "cache"
    victim = tmp_path / "root-only"
    victim.write_bytes(VICTIM_BYTES)
    victim.chmod(0o600)
    mp = tmp_path / "mnt"
    mp.mkdir()
    return store, cache, victim, mp, lazyfs_mount_at.at(mp, {"main": store}, cache=cache)


def test_trust_a_block_file_replaced_by_a_symlink_is_not_followed(tmp_path, lazyfs_mount_at, report):
    store, cache, victim, mp, m = mounted_with_a_victim(tmp_path, lazyfs_mount_at)
    os.stat(mp / "main" / TOOL)  # listed, not read
    m.unmount()
    path = cache_file_of(cache, store, TOOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.symlink_to(victim)
    m.mount()
    served = (mp / "main" / TOOL).read_bytes()
    m.expect_log("is a symlink; refusing it")
    report.row("a block file replaced by a symlink to a root-only file, then the file is read",
               f"{'store bytes served' if served == TOOL_BYTES else 'WRONG BYTES'}; the target "
               f"{'is unchanged' if victim.read_bytes() == VICTIM_BYTES else 'WAS WRITTEN'} "
               f"({victim.stat().st_size} bytes)")
    assert served == TOOL_BYTES
    assert victim.read_bytes() == VICTIM_BYTES
    assert path.is_symlink()


def test_trust_a_log_replaced_by_a_symlink_is_refused(tmp_path, lazyfs_mount_at, lazyfs_cli, report):
    store, cache, victim, mp, m = mounted_with_a_victim(tmp_path, lazyfs_mount_at)
    m.unmount()
    log = cache / "logs" / "daemon.log"
    log.unlink()
    log.symlink_to(victim)
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache,
                            "--block-size", "64K")
    line = result.one_line_error()
    report.row("logs/daemon.log replaced by a symlink to a root-only file, then mount", line)
    assert result.returncode != 0 and not is_mounted(mp)
    assert victim.read_bytes() == VICTIM_BYTES
    assert "symlink" in line


def test_trust_the_cache_key_is_private(tmp_path, lazyfs_mount_at, report):
    store = make_store(tmp_path / "store")
    cache = tmp_path / "cache"
    mp = tmp_path / "mnt"
    mp.mkdir()
    lazyfs_mount_at.at(mp, {"main": store}, cache=cache)
    secret = cache / "secret"
    mode = stat.S_IMODE(secret.stat().st_mode)
    report.row("the per-cache MAC key after the first mount",
               f"{secret.stat().st_size} bytes, mode {mode:04o}, cache dir mode "
               f"{stat.S_IMODE(cache.stat().st_mode):04o}")
    assert mode == 0o600 and secret.stat().st_size == 32
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


# -- 2. a shared cache someone else wrote ----------------------------------------------
FORGE_INDEX = r"""
import sys, diskcache
from cachecore.model import Attr, encode_listing
from cachecore.plaindisk import PlainDisk
index, store, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = diskcache.Cache(index, disk=PlainDisk)
db.set(b"T\0block_size", "65536")
# The store's version directory, as the attacker wishes it: a root-only file
# shown world-readable and owned by the attacker, fresh for ever.
entries = {b"secret.txt": Attr(0o100644, 7, 1, 1, 1, 1, uid, uid, ino=1),
           b"package.py": Attr(0o100644, 30, 1, 1, 1, 1, uid, uid, ino=2)}
db.set(b"L\0" + store.encode() + b"\0fam/1.0", encode_listing(entries, 4.0e9))
db.close()
diskcache.Cache(index + "/ledger", disk=PlainDisk).close()
"""


def test_trust_a_shared_cache_another_user_wrote_is_refused(public_tmp, throwaway_user, lazyfs_cli,
                                                             report):
    store = make_store(public_tmp / "store")
    write_file(store / "fam/1.0/secret.txt", "secret\n", 0o600)
    shared = world_writable(public_tmp) / "host-cache"
    forged = throwaway_user.run(["mkdir", "-m", "0755", shared])
    assert forged.returncode == 0
    forged = throwaway_user.run([sys.executable, "-c", FORGE_INDEX, shared / "index", store,
                                 str(throwaway_user.uid)],
                                env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert forged.returncode == 0, forged.stderr
    mp = public_tmp / "mnt"
    mp.mkdir()
    result = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", public_tmp / "mine",
                            "--shared-cache", shared, "--allow-other")
    line = result.one_line_error()
    read = throwaway_user.run(["cat", mp / "main/fam/1.0/secret.txt"])
    report.row("--shared-cache names an index forged by another user with plain diskcache "
               "(a 0600 store file shown 0644, fetched_at in 2096), mounted --allow-other",
               f"{line}; the user's cat: {read.stderr.decode().strip().split(': ')[-1] or 'READ'}")
    assert result.returncode != 0 and not is_mounted(mp)
    assert "not owned by" in line
    assert read.returncode != 0


def test_trust_a_shared_layer_never_outranks_the_private_index(tmp_path, lazyfs_mount_at, report):
    """A trusted shared cache (ours) fills gaps only: what the private index
    holds wins, and a shared record's time is clamped to the present, so a
    volatile listing from it is revalidated after the TTL like any other."""
    store = make_store(tmp_path / "store")
    shared = tmp_path / "host-cache"
    mp = tmp_path / "mnt"
    mp.mkdir()
    # The host lists the version dir and reads the tool.
    host = lazyfs_mount_at.at(mp, {"main": store}, cache=shared)
    assert (mp / "main" / TOOL).read_bytes() == TOOL_BYTES
    host.unmount()
    # Its record of the family directory is then dated far in the future.
    from cachecore.model import decode_listing, encode_listing

    db = sqlite3.connect(shared / "index" / "cache.db")
    rows = db.execute("SELECT rowid, key, value FROM Cache").fetchall()
    future = 0
    for rowid, key, value in rows:
        if key == b"L\0" + os.fsencode(store) + b"\0fam":
            entries, _ = decode_listing(value)
            db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (encode_listing(entries, 4.0e9), rowid))
            future += 1
    db.commit()
    db.close()
    assert future == 1
    write_file(store / "fam/2.0/package.py", "name = 'fam'\nversion = '2.0'\n")
    os.chmod(store / "fam/2.0", 0o755)
    container = lazyfs_mount_at.at(mp, {"main": store}, cache=tmp_path / "private",
                                   extra_args=("--shared-cache", str(shared)), metadata_ttl=1)
    import time

    time.sleep(2.5)  # past the TTL: the family listing is revalidated, not trusted for ever
    versions = sorted(os.listdir(mp / "main" / "fam"))
    served = (mp / "main" / TOOL).read_bytes()
    stats = container.stats()
    report.row("a shared layer whose listing of a family claims fetched_at in 2096; a version added "
               "to the store; read through a private cache layered over it (metadata_ttl 1 s)",
               f"fam lists {versions}; tool served {'correctly' if served == TOOL_BYTES else 'WRONG'} "
               f"with {stats['store_reads']} store reads (blocks from the shared layer)")
    assert versions == ["1.0", "2.0"]
    assert served == TOOL_BYTES
    assert stats["store_reads"] == 0


# -- 5. a store file rewritten in place, size and mtime restored ----------------------
def test_trust_a_file_rewritten_in_place_with_its_old_mtime_is_never_mixed(tmp_path, lazyfs_mount_at,
                                                                           report):
    store = make_store(tmp_path / "store")
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=tmp_path / "cache")
    with open(mp / "main" / TOOL, "rb") as f:
        first_block = f.read(BLOCK)
    assert first_block == TOOL_BYTES[:BLOCK]
    st = os.stat(store / TOOL)
    new = deterministic_bytes(len(TOOL_BYTES), seed=99)
    with open(store / TOOL, "r+b") as f:  # in place: same inode
        f.write(new)
    os.utime(store / TOOL, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(store / TOOL).st_size == st.st_size
    assert os.stat(store / TOOL).st_mtime_ns == st.st_mtime_ns
    m.remount()
    drop_caches()
    try:
        served = (mp / "main" / TOOL).read_bytes()
        outcome = ("the old version" if served == TOOL_BYTES else
                   "the new version" if served == new else "A MIX OF VERSIONS")
    except OSError as e:
        served, outcome = None, f"{e.strerror}"
    m.expect_log("changed in the store")
    report.row("a store file rewritten in place after its first block was cached, size and "
               "mtime restored with utime, remounted, page cache dropped, read whole", outcome)
    assert served in (None, TOOL_BYTES, new), "old and new blocks were mixed"


# -- 15. a damaged ledger ----------------------------------------------------------
def test_trust_a_damaged_ledger_is_set_aside_not_fatal(tmp_path, lazyfs_mount_at, report):
    store = make_store(tmp_path / "store")
    cache = tmp_path / "cache"
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = lazyfs_mount_at.at(mp, {"main": store}, cache=cache)
    assert (mp / "main" / TOOL).read_bytes() == TOOL_BYTES
    m.unmount()
    ledger_db = cache / "index" / "ledger" / "cache.db"
    for extra in ("-wal", "-shm"):
        Path(str(ledger_db) + extra).unlink(missing_ok=True)
    ledger_db.write_bytes(b"this is not a database" * 100)
    m.expect_log("ledger")
    m.mount()
    served = (mp / "main" / TOOL).read_bytes()
    aside = sorted(p.name for p in (cache / "index").iterdir() if p.name.startswith("ledger.damaged-"))
    warning = [line for line in m.log_lines() if b"ledger" in line]
    report.row("the ledger (usage records, pins, totals) overwritten with garbage, then mount",
               f"mounted; tool {'served' if served == TOOL_BYTES else 'WRONG'}; set aside as {aside}; "
               f"log: {warning[0].decode(errors='replace').split(': ', 1)[-1][:120] if warning else 'nothing'}")
    assert served == TOOL_BYTES and aside and warning
