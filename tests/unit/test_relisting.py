"""cachecore: when a payload listing is listed again (a file found changed,
permissions due for revalidation, a forget), and the ACL bound on modes.
Real files, real SQLite, real threads; no FUSE."""
from __future__ import annotations

import logging
import os
import struct
import subprocess
import time

import pytest
import trio

from cachecore.errors import StoreFileChanged
from cachecore.repository import RepoPolicy, Repository
from cachecore.store import FilesystemStore, acl_bounded_mode

from .test_cachecore import BS, Clock, CountingStore, make_repo, store_root  # noqa: F401 (fixture)

TOOL = b"fam/1.0/bin/tool"


def test_a_read_that_finds_its_file_grown_relists_the_directory_once(tmp_path, store_root):
    """#11: a payload directory listed while a release was being copied."""
    store = CountingStore(str(store_root))
    repo, _, index = make_repo(tmp_path, store)
    tool = store_root / "fam/1.0/bin/tool"
    changes = []

    async def main():
        repo.on_change(lambda directory, names: changes.append((directory, names)))
        half = await repo.open(TOOL)
        with open(tool, "ab") as f:  # the copy finishes, another file arrives
            f.write(b"rest of the file" * 1000)
        (store_root / "fam/1.0/bin/new.py").write_text("print('new')\n")
        listings = store.listings
        with pytest.raises(StoreFileChanged):
            await repo.read(half, 0, BS)
        assert store.listings == listings + 1
        assert changes == [(b"fam/1.0/bin", {b"tool", b"new.py"})]
        with pytest.raises(StoreFileChanged):  # another reader of the old version
            await repo.read(half, BS, BS)
        assert store.listings == listings + 1, "relisted again for a version already replaced"
        whole = await repo.open(TOOL)
        assert whole.size == tool.stat().st_size
        assert bytes(await repo.read(whole, 0, whole.size)) == tool.read_bytes()
        assert (await repo.getattr(b"fam/1.0/bin/new.py")).is_file

    trio.run(main)
    # The index holds the new listing: a remount sees the whole file and the new one.
    entries, _ = index.get_listing(str(store_root), b"fam/1.0/bin")
    assert entries[b"tool"].size == tool.stat().st_size and b"new.py" in entries


def make_policy_repo(tmp_path, store, clock, permission_ttl):
    repo, counters, index = make_repo(tmp_path, store, clock=clock)
    repo.policy = RepoPolicy(60.0, permission_ttl=permission_ttl)
    return repo, index


def test_payload_permissions_are_revalidated_after_permission_ttl_and_across_restarts(
        tmp_path, store_root):
    """#6: an allow_other mount (permission_ttl set) sees a chmod in the store
    within permission_ttl, also from a listing an earlier run left in the index."""
    clock = Clock()
    store = CountingStore(str(store_root))
    tool = store_root / "fam/1.0/bin/tool"
    tool.chmod(0o644)
    repo, index = make_policy_repo(tmp_path, store, clock, 300.0)

    async def mode():
        return (await repo.getattr(TOOL)).mode & 0o777

    assert trio.run(mode) == 0o644
    tool.chmod(0o000)
    clock.now += 299
    assert trio.run(mode) == 0o644  # within permission_ttl: as listed
    clock.now += 2
    assert trio.run(mode) == 0o000
    # Across restarts: a listing in the index older than permission_ttl is relisted.
    tool.chmod(0o644)
    clock.now += 301
    repo = Repository("main", store, index, repo.fetcher, RepoPolicy(60.0, permission_ttl=300.0),
                      clock=clock)
    assert trio.run(mode) == 0o644
    # Without permission_ttl (no other users) a payload listing is kept forever.
    tool.chmod(0o000)
    clock.now += 10 * 365 * 86400
    repo = Repository("main", store, index, repo.fetcher, RepoPolicy(60.0), clock=clock)
    assert trio.run(mode) == 0o644


def test_a_listing_dated_in_the_future_is_as_old_as_the_present(tmp_path, store_root):
    clock = Clock()
    store = CountingStore(str(store_root))
    repo, index = make_policy_repo(tmp_path, store, clock, 300.0)
    entries = store.list_dir(b"fam/1.0/bin")
    index.put_listing(str(store_root), b"fam/1.0/bin", entries, clock.now + 10**9)
    listings = store.listings

    async def look():
        await repo.getattr(TOOL)

    trio.run(look)
    assert store.listings == listings
    clock.now += 301
    trio.run(look)
    assert store.listings == listings + 1


def test_forget_drops_a_tree_from_memory_and_index(tmp_path, store_root):
    store = CountingStore(str(store_root))
    repo, _, index = make_repo(tmp_path, store)
    changes = []
    root = str(store_root)

    async def main():
        repo.on_change(lambda directory, names: changes.append((directory, names)))
        for relpath in (b"fam/1.0", b"fam/1.0/bin", TOOL):
            await repo.getattr(relpath)
        assert index.get_listing(root, b"fam/1.0/bin") is not None
        (store_root / "fam/1.0/bin/late.py").write_text("")
        assert await repo.forget(b"fam/1.0") == 2  # fam/1.0 and fam/1.0/bin
        assert changes == [(b"fam/1.0", None)]
        assert index.get_listing(root, b"fam/1.0/bin") is None
        assert index.get_listing(root, b"fam") is not None  # above it: kept
        assert (await repo.getattr(b"fam/1.0/bin/late.py")).is_file

    trio.run(main)


# -- ACLs ----------------------------------------------------------------------------
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def acl(*entries) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident)
                                           for tag, perm, ident in entries)


@pytest.mark.parametrize("mode, entries, shown", [
    # u:carol:--- on a 0644 file: nobody but the owner may be granted anything
    (0o100644, [(USER_OBJ, 6, 0), (USER, 0, 1234), (GROUP_OBJ, 4, 0), (MASK, 4, 0),
                (OTHER, 4, 0)], 0o100600),
    # a default ACL giving a group write: everyone still reads (writes do not matter)
    (0o40775, [(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (GROUP, 7, 500), (MASK, 7, 0),
               (OTHER, 5, 0)], 0o40755),
    # the owning group denied, a named group allowed: mode bits would show the mask
    (0o100750, [(USER_OBJ, 7, 0), (GROUP_OBJ, 0, 0), (GROUP, 5, 500), (MASK, 5, 0),
                (OTHER, 0, 0)], 0o100700),
    # setuid and the owner's bits are kept
    (0o104755, [(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 1, 0)], 0o104711),
])
def test_acl_bounded_mode(mode, entries, shown):
    assert acl_bounded_mode(mode, acl(*entries)) == shown


def test_an_unreadable_acl_grants_group_and_others_nothing():
    assert acl_bounded_mode(0o100755, b"\x01\x00\x00\x00") == 0o100700
    assert acl_bounded_mode(0o100755, acl((0x40, 7, 0))) == 0o100700  # an unknown tag
    assert acl_bounded_mode(0o100755, b"\x02\x00") == 0o100700


def test_listing_bounds_modes_by_acls_and_says_so_once(tmp_path, store_root, caplog):
    tool = store_root / "fam/1.0/bin/tool"
    tool.chmod(0o644)
    other = store_root / "fam/1.0/bin/other"
    other.write_text("x")
    other.chmod(0o644)
    for path in (tool, other):
        subprocess.run(["setfacl", "-m", "u:65534:---", str(path)], check=True)
    store = FilesystemStore(str(store_root))
    with caplog.at_level(logging.WARNING, logger="cachecore.store"):
        entries = store.list_dir(b"fam/1.0/bin")
        store.list_dir(b"fam/1.0/bin")
    assert entries[b"tool"].mode & 0o777 == 0o600 and entries[b"other"].mode & 0o777 == 0o600
    assert entries[b"link"].is_link
    assert [r.message for r in caplog.records].__len__() == 1
    assert "POSIX ACLs" in caplog.records[0].message


def test_acl_check_cost_per_entry(tmp_path):
    """Measured, not asserted tightly: the getxattr per entry a listing pays."""
    big = tmp_path / "store/fam/1.0/big"
    big.mkdir(parents=True)
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(20_000):
            os.mknod(f"f{i:05d}", dir_fd=fd)
    finally:
        os.close(fd)
    store = FilesystemStore(str(tmp_path / "store"))
    entries = store.list_dir(b"fam/1.0/big")
    where = b"/proc/self/fd/%d/" % os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    start = time.perf_counter()
    store._bounded_by_acls(entries, where, b"fam/1.0/big")
    per_entry = (time.perf_counter() - start) / len(entries)
    print(f"ACL check: {per_entry * 1e6:.2f} us per entry")
    assert per_entry < 100e-6


def test_a_listing_held_by_a_reader_is_shared_after_it_left_the_memory(tmp_path, store_root):
    """#12: open directory handles share one copy of a listing, even one the
    repository's memory no longer holds (it would otherwise be decoded anew
    from the index for every handle)."""
    store = CountingStore(str(store_root))
    repo, _, _ = make_repo(tmp_path, store)
    repo._memory_limit = 1  # every new listing evicts the others

    async def main():
        held = await repo.readdir(b"fam/1.0/bin")
        await repo.listing(b"fam/1.0")
        await repo.listing(b"fam")
        assert b"fam/1.0/bin" not in repo._memory
        assert await repo.readdir(b"fam/1.0/bin") is held

    trio.run(main)
