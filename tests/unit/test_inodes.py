"""fusefs's inode table, and LazyOperations called directly (no kernel, no
FUSE mock): a real Repository over a store directory in tmp_path."""
from __future__ import annotations

import sys
import threading

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from cachecore.store import FilesystemStore
from fusefs.inodes import InodeTable
from fusefs.operations import LazyOperations

from .test_cachecore import BS, Clock, make_repo, store_root  # noqa: F401 (a fixture)

ROOT = pyfuse3.ROOT_INODE


def test_nodes_rebuild_paths_and_go_when_the_kernel_forgets_them():
    t = InodeTable()
    repo = t.acquire_child(ROOT, b"main")
    fam = t.acquire_child(repo, b"fam")
    tool = t.acquire_child(fam, b"tool")
    assert t.key(tool) == ("main", b"fam/tool") and t.key(repo) == ("main", b"")
    assert t.key(ROOT) == (None, b"") and t.parent(tool) == fam and t.parent(ROOT) == ROOT
    assert t.find("main", b"fam/tool") == tool and t.find("main", b"fam/nope") is None
    assert t.acquire_child(fam, b"tool") == tool  # the same name keeps its inode
    # The kernel forgets the directories first: they stay while a child is held.
    t.forget(fam, 1)
    t.forget(repo, 1)
    assert t.key(tool) == ("main", b"fam/tool") and len(t) == 4
    t.forget(tool, 2)
    assert len(t) == 1 and t.find("main", b"") is None  # only the mount root is left
    t.forget(ROOT, 5)
    assert t.key(ROOT) == (None, b"")  # never goes away


def test_a_retired_inode_lives_until_forgotten_while_its_name_gets_a_new_one():
    t = InodeTable()
    repo = t.acquire_child(ROOT, b"main")
    lib = t.acquire_child(repo, b"lib")
    old = t.acquire_child(lib, b"a.py")
    t.retire(old)  # a file that changed while the kernel held it
    new = t.acquire_child(lib, b"a.py")
    assert new != old and t.child(lib, b"a.py") == new
    assert t.key(old) == t.key(new) == ("main", b"lib/a.py")  # the old one still reads
    t.forget(old, 1)
    assert old not in t and t.child(lib, b"a.py") == new
    t.forget(new, 1)
    t.retire(lib)  # a forgotten directory, with nothing below it held any more
    t.forget(lib, 1)
    t.forget(repo, 1)
    assert len(t) == 1  # nothing left behind


def test_a_table_the_kernel_mostly_forgot_gives_its_memory_back():
    t = InodeTable()
    repo = t.acquire_child(ROOT, b"main")
    inodes = [t.acquire_child(repo, b"f%d" % i) for i in range(50_000)]
    grown = sys.getsizeof(t._nodes)
    for inode in inodes:
        t.forget(inode, 1)
    assert len(t) == 2 and sys.getsizeof(t._nodes) < grown / 10, (grown, sys.getsizeof(t._nodes))


class GatedStore(FilesystemStore):
    """The real store; while `gated`, a listing waits (in its worker thread) for `release`."""

    def __init__(self, root):
        super().__init__(str(root))
        self.gated = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def list_dir(self, relpath, *progress):
        if self.gated:
            self.entered.set()
            assert self.release.wait(10)
        return super().list_dir(relpath, *progress)


def test_a_forget_arriving_while_a_lookup_awaits_does_not_drop_the_inode(tmp_path, store_root):
    """#15: the lookup count is taken before the await. A FORGET of the
    kernel's earlier reference, processed while a second lookup of the same
    name waits for the store, must leave the inode the lookup returns alive."""
    store = GatedStore(store_root)
    clock = Clock()
    repo, counters, _ = make_repo(tmp_path, store, clock=clock)

    async def main():
        ops = LazyOperations({"main": repo}, counters, BS)
        main_inode = (await ops.lookup(ROOT, b"main")).st_ino
        fam = (await ops.lookup(main_inode, b"fam")).st_ino  # the kernel holds one reference
        clock.now += 3600  # the repository root's listing is due: the next lookup lists the store
        store.gated = True
        found = {}

        async def look_up_again():
            found["entry"] = await ops.lookup(main_inode, b"fam")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_up_again)
            assert await trio.to_thread.run_sync(store.entered.wait, 10)
            await ops.forget([(fam, 1)])  # the kernel drops its first reference meanwhile
            store.release.set()
        assert found["entry"].st_ino == fam
        assert ops.inodes.key(fam) == ("main", b"fam")  # held: the second lookup's reference
        assert (await ops.getattr(fam)).st_ino == fam
        await ops.forget([(fam, 1)])
        with pytest.raises(FUSEError):
            await ops.getattr(fam)  # now it is gone (ESTALE)

    trio.run(main)


def test_a_failed_lookup_leaves_no_reference_behind(tmp_path, store_root):
    repo, counters, _ = make_repo(tmp_path, FilesystemStore(str(store_root)))

    async def main():
        ops = LazyOperations({"main": repo}, counters, BS)
        main_inode = (await ops.lookup(ROOT, b"main")).st_ino
        version = (await ops.lookup((await ops.lookup(main_inode, b"fam")).st_ino, b"1.0")).st_ino
        payload = (await ops.lookup(version, b"bin")).st_ino
        before = len(ops.inodes)
        negative = await ops.lookup(payload, b"missing")  # immutable: a cached miss
        assert negative.st_ino == 0
        with pytest.raises(FUSEError):
            await ops.lookup(version, b"missing")  # volatile: ENOENT
        assert len(ops.inodes) == before

    trio.run(main)


def test_without_open_requests_reads_take_the_version_at_the_first_and_keep_a_bounded_few(
        tmp_path, store_root):
    for n in range(5):
        (store_root / "fam/1.0/bin" / f"data{n}").write_bytes(b"%d" % n * (BS + n))
    repo, counters, _ = make_repo(tmp_path, FilesystemStore(str(store_root)))

    async def main():
        ops = LazyOperations({"main": repo}, counters, BS, no_open=True)
        ops.max_versions = 3
        inode = ROOT
        for name in (b"main", b"fam", b"1.0", b"bin"):
            inode = (await ops.lookup(inode, name)).st_ino
        files = [(await ops.lookup(inode, b"data%d" % n)).st_ino for n in range(5)]
        for _ in range(2):  # the second time, the first ones are taken again
            for n, f in enumerate(files):
                assert bytes(await ops.read(f, BS, 100)) == b"%d" % n * min(100, n)
                assert len(ops._versions) <= 3
        assert set(ops._versions) == set(files[-3:])
        await ops.forget([(files[-1], 1)])  # the kernel forgets: so does the daemon
        assert set(ops._versions) == set(files[-3:-1])

    trio.run(main)
