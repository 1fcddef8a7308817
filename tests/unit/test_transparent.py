"""Transparent mode's pieces without a mount: a store reached by a descriptor
of its root (the path covered since), and the inode layout where the mount
root is one repository's root. The mounted behaviour is
tests/integration/test_transparent.py."""
from __future__ import annotations

import json
import os

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from cachecore.errors import LazyFSError
from cachecore.store import FilesystemStore
from fusefs.inodes import InodeTable
from fusefs.operations import STATS_XATTR, STORE_PATH_XATTR, LazyOperations

from .test_cachecore import BS, make_repo, store_root  # noqa: F401 (a fixture)

ROOT = pyfuse3.ROOT_INODE


def test_a_store_reached_by_its_descriptor_never_walks_its_path(tmp_path, store_root):
    """Once the path names something else (here: a directory put in its
    place, as a mount over it would), the store still reads the directory
    the descriptor was opened on, under its path's name."""
    fd = os.open(store_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        store = FilesystemStore(str(store_root), root_fd=fd)
        data = (store_root / "fam/1.0/bin/tool").read_bytes()
        os.rename(store_root, tmp_path / "beneath")
        (store_root / "decoy/1.0").mkdir(parents=True)
        assert store.root == str(store_root)
        assert set(store.list_dir(b"")) == {b"fam"}
        attr = store.list_dir(b"fam/1.0/bin")[b"tool"]
        assert store.read(b"fam/1.0/bin/tool", attr.identity, 0, attr.size) == data
        assert store.stat_root().is_dir and not store.root_is_empty()
        with pytest.raises(LazyFSError):  # symlinks are still not followed
            store.read(b"fam/1.0/bin/link", (6, 0, 0, 0), 0, 6)
    finally:
        os.close(fd)


def test_the_inode_table_of_a_transparent_mount_starts_at_the_repository():
    t = InodeTable(root_alias="main")
    fam = t.acquire_child(ROOT, b"fam")
    tool = t.acquire_child(t.acquire_child(fam, b"1.0"), b"tool")
    assert t.key(ROOT) == ("main", b"") and t.key(fam) == ("main", b"fam")
    assert t.key(tool) == ("main", b"fam/1.0/tool")
    assert t.find("main", b"") == ROOT and t.find("main", b"fam/1.0/tool") == tool
    assert t.find("other", b"fam") is None and t.children(ROOT) == [b"fam"]


def test_operations_serve_one_repository_at_the_mount_root(tmp_path, store_root):
    repo, counters, _ = make_repo(tmp_path, FilesystemStore(str(store_root)))

    async def main():
        ops = LazyOperations({"main": repo}, counters, BS, root_alias="main")
        root = await ops.getattr(ROOT)
        assert root.st_mode == os.stat(store_root).st_mode  # the store's root, not a made-up one
        fh = await ops.opendir(ROOT)
        assert list(ops._open_dirs[fh].entries) == [b"fam"]
        with pytest.raises(FUSEError):
            await ops.lookup(ROOT, b"main")  # no alias level
        fam = (await ops.lookup(ROOT, b"fam")).st_ino
        version = (await ops.lookup(fam, b"1.0")).st_ino
        tool = (await ops.lookup((await ops.lookup(version, b"bin")).st_ino, b"tool")).st_ino
        assert await ops.getxattr(tool, STORE_PATH_XATTR) == \
            os.fsencode(store_root) + b"/fam/1.0/bin/tool"
        # The root is the repository's and carries the mount's xattrs.
        assert await ops.getxattr(ROOT, STORE_PATH_XATTR) == os.fsencode(store_root)
        assert "cache_hits" in json.loads(await ops.getxattr(ROOT, STATS_XATTR))
        assert STATS_XATTR in await ops.listxattr(ROOT) and \
            STORE_PATH_XATTR in await ops.listxattr(ROOT)
        assert STATS_XATTR not in await ops.listxattr(fam)
        with pytest.raises(FUSEError):
            await ops.getxattr(fam, STATS_XATTR)
        # Forgetting the whole repository drops the entries in the root.
        await repo.forget(b"")
        queued = []
        while True:
            try:
                queued.append(ops._invalidations.receive_nowait())
            except trio.WouldBlock:
                break
        assert [(q.func, q.args) for q in queued] == [(pyfuse3.invalidate_entry, (ROOT, b"fam"))]

    trio.run(main)


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'cache = "{tmp_path / "cache"}"\n' + text)
    return str(path)


def test_the_config_names_the_repositories_mounted_over_their_paths(tmp_path):
    from mount.config import load_settings

    config = _config(tmp_path, 'over = ["/svr/farm"]\n[repos]\n'
                               'main = "/svr/packages"\nsite = { path = "/svr/site", over = true }\n')
    everything = load_settings(config=config)
    assert {r.alias: r.over for r in everything.repos} == {"main": False, "site": True,
                                                            "farm": True}
    farm = load_settings(config=config, over="/svr/farm")
    assert farm.over and farm.mountpoint == "/svr/farm"
    assert [(r.alias, r.path) for r in farm.repos] == [("farm", "/svr/farm")]
    # A store no repository names: one named after it.
    other = load_settings(config=config, over="/svr/other-pkgs/")
    assert [(r.alias, r.path) for r in other.repos] == [("other-pkgs", "/svr/other-pkgs")]


@pytest.mark.parametrize("over, config, says", [
    ("http://pkgs.example/main", "", "not a URL"),
    ("/svr/main", '[repos]\nmain = "/elsewhere"\n', "'main' is taken"),
    ("/svr/packages", "", "give no MOUNTPOINT"),
])
def test_the_config_refuses_what_cannot_be_mounted_over(tmp_path, over, config, says):
    from mount.config import load_settings
    from mount.errors import UserError

    with pytest.raises(UserError, match=says):
        load_settings("/rez/lazy" if "MOUNTPOINT" in says else None,
                      config=_config(tmp_path, config), over=over)
