"""The pyfuse3 Operations of rez-lazyfs: guard, delegate to cachecore, map errors.

Every decision about data belongs to cachecore. Handlers here only translate
between inodes/file handles and repository paths, and choose kernel cache
timeouts from the repository's immutability policy.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from itertools import count

import pyfuse3
from pyfuse3 import FUSEError

from cachecore.errors import LazyFSError, NotFound, StoreUnavailable
from cachecore.model import Attr
from cachecore.repository import Repository
from cachecore.stats import Counters

from .inodes import InodeTable

log = logging.getLogger(__name__)

STATS_XATTR = b"user.rezlazyfs.stats"              # this run's counters (mount root)
TOTALS_XATTR = b"user.rezlazyfs.stats.total"       # all runs of this mount, with latencies
STORE_PATH_XATTR = b"user.rezlazyfs.store_path"    # where an entry comes from
POLICY_XATTR = b"user.rezlazyfs.policy"            # immutable, or revalidated after N s
CACHED_XATTR = b"user.rezlazyfs.cached"            # "cached_bytes/size" of a file
IMMUTABLE_TIMEOUT = 24 * 3600.0  # released payload never changes: let the kernel keep it
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def error_boundary(handler):
    """Only FUSEError may leave a handler: anything else would kill the mount."""

    @functools.wraps(handler)
    async def guarded(self, *args):
        try:
            return await handler(self, *args)
        except FUSEError:
            raise
        except NotFound:
            raise FUSEError(errno.ENOENT) from None
        except StoreUnavailable as e:
            self.counters.errors += 1
            log.error("EIO: %s", e)
            raise FUSEError(errno.EIO) from None
        except LazyFSError as e:
            raise FUSEError(e.errno) from None
        except Exception:
            self.counters.errors += 1
            log.exception("unexpected error in %s%r; answering EIO", handler.__name__, args)
            raise FUSEError(errno.EIO) from None

    return guarded


def _read_only(*_args):
    raise FUSEError(errno.EROFS)


class LazyOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, repositories: dict[str, Repository], counters: Counters,
                 block_size: int, totals=None):
        super().__init__()
        self.repos = repositories
        self.counters = counters
        self.totals = totals or (lambda: counters)
        self.block_size = block_size
        self.inodes = InodeTable()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._handles = count(1)
        self._open_files = {}
        self._open_dirs = {}

    # -- helpers ------------------------------------------------------------
    def _entry(self, inode: int, attr: Attr, volatile: bool, ttl: float) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.generation = 0
        e.entry_timeout = e.attr_timeout = ttl if volatile else IMMUTABLE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = 0
        e.st_size = attr.size
        e.st_blksize = self.block_size
        e.st_blocks = (attr.size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _mount_root_entry(self) -> pyfuse3.EntryAttributes:
        attr = Attr(stat.S_IFDIR | 0o555, 0, 0, 0, 0, 2 + len(self.repos), self._uid, self._gid)
        return self._entry(pyfuse3.ROOT_INODE, attr, True, 1.0)

    async def _attr_of(self, inode: int) -> pyfuse3.EntryAttributes:
        alias, relpath = self.inodes.key(inode)
        if alias is None:
            return self._mount_root_entry()
        repo = self.repos[alias]
        attr = await repo.getattr(relpath)
        return self._entry(inode, attr, repo.is_volatile(relpath), repo.policy.metadata_ttl)

    def _known(self, inode: int):
        try:
            return self.inodes.key(inode)
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    # -- metadata -----------------------------------------------------------
    @error_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        alias, parent = self._known(parent_inode)
        if name == b".":
            key = (alias, parent)
        elif name == b"..":
            key = (alias, parent.rpartition(b"/")[0]) if parent else (None, b"")
        elif alias is None:
            if os.fsdecode(name) not in self.repos:
                raise FUSEError(errno.ENOENT)
            key = (os.fsdecode(name), b"")
        else:
            key = (alias, parent + b"/" + name if parent else name)
        inode = self.inodes.inode_for(key)
        try:
            entry = await self._attr_of(inode)
        except NotFound:
            self.inodes.drop_if_unused(inode)
            if alias is not None and not self.repos[alias].is_volatile_dir(parent):
                # Immutable directory: let the kernel cache the miss too
                # (Python imports probe many names that do not exist).
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = IMMUTABLE_TIMEOUT
                return negative
            raise
        except BaseException:
            self.inodes.drop_if_unused(inode)
            raise
        self.inodes.add_lookup(inode)
        return entry

    @error_boundary
    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    @error_boundary
    async def getattr(self, inode, ctx=None):
        self._known(inode)
        return await self._attr_of(inode)

    @error_boundary
    async def readlink(self, inode, ctx=None):
        alias, relpath = self._known(inode)
        if alias is None:
            raise FUSEError(errno.EINVAL)
        attr = await self.repos[alias].getattr(relpath)
        if not attr.is_link:
            raise FUSEError(errno.EINVAL)
        return attr.target

    @error_boundary
    async def opendir(self, inode, ctx=None):
        alias, relpath = self._known(inode)
        if alias is None:
            entries = [(os.fsencode(a), (a, b""), await self.repos[a].root_attr(), True,
                        self.repos[a].policy.metadata_ttl) for a in sorted(self.repos)]
        else:
            repo = self.repos[alias]
            listing = await repo.readdir(relpath)
            prefix = relpath + b"/" if relpath else b""
            # Every entry's attributes come from this one listing, so they share
            # its policy: decided once here, not per entry in readdir.
            volatile, ttl = repo.is_volatile_dir(relpath), repo.policy.metadata_ttl
            entries = [(name, (alias, prefix + name), attr, volatile, ttl)
                       for name, attr in listing.items()]
        fh = next(self._handles)
        self._open_dirs[fh] = entries  # a snapshot: offsets stay stable while listing
        return fh

    @error_boundary
    async def readdir(self, fh, start_id, token):
        entries = self._open_dirs[fh]
        for position in range(start_id, len(entries)):
            name, key, attr, volatile, ttl = entries[position]
            inode = self.inodes.inode_for(key)
            entry = self._entry(inode, attr, volatile, ttl)
            if not pyfuse3.readdir_reply(token, name, entry, position + 1):
                self.inodes.drop_if_unused(inode)
                return
            self.inodes.add_lookup(inode)  # readdirplus: the kernel now holds it

    @error_boundary
    async def releasedir(self, fh):
        self._open_dirs.pop(fh, None)

    @error_boundary
    async def statfs(self, ctx=None):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = self.block_size
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- contents -----------------------------------------------------------
    @error_boundary
    async def open(self, inode, flags, ctx=None):
        if flags & _WRITE_FLAGS:
            raise FUSEError(errno.EROFS)
        alias, relpath = self._known(inode)
        if alias is None:
            raise FUSEError(errno.EISDIR)
        repo = self.repos[alias]
        attr = await repo.getattr(relpath)
        if attr.is_dir:
            raise FUSEError(errno.EISDIR)
        if not attr.is_file:
            raise FUSEError(errno.EACCES)
        version = await repo.open(relpath)
        fh = next(self._handles)
        self._open_files[fh] = (repo, version)
        # keep_cache: the kernel may keep pages across opens of immutable files.
        return pyfuse3.FileInfo(fh=fh, keep_cache=not repo.is_volatile(relpath))

    @error_boundary
    async def read(self, fh, off, size):
        repo, version = self._open_files[fh]
        return await repo.read(version, off, size)

    @error_boundary
    async def release(self, fh):
        self._open_files.pop(fh, None)

    # -- extended attributes -------------------------------------------------
    @error_boundary
    async def getxattr(self, inode, name, ctx=None):
        alias, relpath = self._known(inode)
        if alias is None:
            if name == STATS_XATTR:
                return json.dumps(self.counters.snapshot(), sort_keys=True).encode()
            if name == TOTALS_XATTR:
                return json.dumps(self.totals().to_record(), sort_keys=True).encode()
            raise FUSEError(pyfuse3.ENOATTR)
        repo = self.repos[alias]
        if name == STORE_PATH_XATTR:
            return os.fsencode(repo.store.root) + (b"/" + relpath if relpath else b"")
        if name == POLICY_XATTR:
            return (f"revalidated after {repo.policy.metadata_ttl:g}s" if repo.is_volatile(relpath)
                    else "immutable").encode()
        if name == CACHED_XATTR and (await repo.getattr(relpath)).is_file:
            cached = await repo.cached_bytes(await repo.open(relpath))
            return f"{cached}/{(await repo.getattr(relpath)).size}".encode()
        raise FUSEError(pyfuse3.ENOATTR)

    @error_boundary
    async def listxattr(self, inode, ctx=None):
        alias, relpath = self._known(inode)
        if alias is None:
            return [STATS_XATTR, TOTALS_XATTR]
        names = [STORE_PATH_XATTR, POLICY_XATTR]
        if (await self.repos[alias].getattr(relpath)).is_file:
            names.append(CACHED_XATTR)
        return names

    # -- everything that would write ----------------------------------------
    async def setattr(self, *args):
        _read_only()

    async def mknod(self, *args):
        _read_only()

    async def mkdir(self, *args):
        _read_only()

    async def unlink(self, *args):
        _read_only()

    async def rmdir(self, *args):
        _read_only()

    async def symlink(self, *args):
        _read_only()

    async def rename(self, *args):
        _read_only()

    async def link(self, *args):
        _read_only()

    async def create(self, *args):
        _read_only()

    async def write(self, *args):
        _read_only()

    async def setxattr(self, *args):
        _read_only()

    async def removexattr(self, *args):
        _read_only()
