"""The pyfuse3 Operations of rez-lazyfs: guard, delegate to cachecore, map errors.

Every decision about data belongs to cachecore. Handlers here only translate
between inodes/file handles and repository paths, choose kernel cache
timeouts from the repository's immutability policy, and tell the kernel to
drop what it cached of entries a repository relisted or forgot.

Other users (an allow_other mount) see the tree, not the mount's workings:
the xattrs that say where an entry comes from, how much is cached and how
the mount is doing answer only the mount's owner and root (EACCES for
others, and listxattr lists none to them).
"""
from __future__ import annotations

import errno
import collections
import functools
import itertools
import json
import logging
import math
import os
import stat
from itertools import count

import pyfuse3
import trio
from pyfuse3 import FUSEError

from cachecore.errors import LazyFSError, NotFound, StoreUnavailable
from cachecore.fetcher import FileVersion
from cachecore.model import Attr
from cachecore.repository import Repository
from cachecore.stats import Counters
from cachecore.trace import ProcessTree, Recording

from .inodes import InodeTable

log = logging.getLogger(__name__)

STATS_XATTR = b"user.rezlazyfs.stats"              # this run's counters (mount root)
TOTALS_XATTR = b"user.rezlazyfs.stats.total"       # all runs of this mount, with latencies
STORE_PATH_XATTR = b"user.rezlazyfs.store_path"    # where an entry comes from
POLICY_XATTR = b"user.rezlazyfs.policy"            # immutable, or revalidated after N s
CACHED_XATTR = b"user.rezlazyfs.cached"            # "cached_bytes/size" of a file
# Reading it forgets every listing at and below the directory (`rez-lazyfs
# forget`): a read, because a read-only mount refuses setxattr before we see it.
FORGET_XATTR = b"user.rezlazyfs.forget"
# What the mount serves (JSON: mount point, cache directory, block size, log
# file, repositories), so commands given `--mount` use the same (mount/running.py).
CONFIG_XATTR = b"user.rezlazyfs.config"
# Reading it writes the uses noted in memory to the index now, rather than at
# the next periodic flush, so `status` and `clean` see the latest reads.
FLUSH_XATTR = b"user.rezlazyfs.flush"
# Launch trace recording (`rez-lazyfs trace record`), asked of the mount root:
#   start:PID      record what the process tree of PID reads; answers the recording's id
#   stop:ID        stop; answers {"bytes": N, "parts": P} (the recording, in parts)
#   part:ID:I      part I of the recording (JSON, cachecore/trace.py: Recording)
#   end:ID         forget the recording
TRACE_XATTR = b"user.rezlazyfs.trace."
TRACE_PART = 60_000  # bytes: below the 64K an xattr value can hold
MAX_RECORDINGS = 8
IMMUTABLE_TIMEOUT = 24 * 3600.0  # released payload never changes: let the kernel keep it
# Without opendir, where the kernel's listings stopped (a reader that stopped
# early, readers listing one directory at once): kept for this many at most.
MAX_DIR_CURSORS = 64
# Without open requests, the versions of files read, kept by inode for their
# next reads: at most this many (~550 bytes each); an older one is taken
# again from its listing if its file is read again.
MAX_VERSIONS = 20_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def error_boundary(handler):
    """Only FUSEError may leave a handler: anything else would kill the mount.
    Counts the requests each handler serves (the stats xattr shows them)."""
    name = handler.__name__

    @functools.wraps(handler)
    async def guarded(self, *args):
        self.requests[name] += 1
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


def _drop_kernel_caches(inodes: list[int]) -> None:
    """Have the kernel drop the attributes, pages and listings it holds of
    `inodes` (those it has forgotten already it says so: ENOENT). Blocking."""
    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


class _OpenDir:
    """An open directory: its listing (the repository's own dict, shared with
    every other handle, never copied: 40 handles on a 100k-entry directory
    once took 1 GiB) and where the kernel is in it."""

    __slots__ = ("_items", "_next", "entries", "inode", "position", "ttl")

    def __init__(self, inode: int, entries: dict, ttl: float):
        self.inode, self.entries, self.ttl = inode, entries, ttl
        self.position = 0
        self._items = iter(entries.items())
        self._next = None  # taken from _items, not yet accepted by the kernel

    def seek(self, position: int) -> None:
        if position != self.position:  # rewinddir/seekdir: rare, so a walk from the start
            self.position = position
            self._items = itertools.islice(iter(self.entries.items()), position, None)
            self._next = None

    def peek(self):
        """(name, attr) at `position`, or None at the end."""
        if self._next is None:
            self._next = next(self._items, None)
        return self._next

    def advance(self) -> None:
        self._next = None
        self.position += 1


class LazyOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    # The kernel keeps symlink targets (a changed one is dropped like a file's
    # pages), where pyfuse3 lets it (patches/): a walk or a path through a
    # link is otherwise a readlink request each time.
    enable_symlink_cache = True

    def __init__(self, repositories: dict[str, Repository], counters: Counters,
                 block_size: int, totals=None, config: dict | None = None, flush=None,
                 root_alias: str | None = None, no_open: bool = False):
        """config: what CONFIG_XATTR answers; flush: an async function writing
        the noted uses to the index (FLUSH_XATTR); root_alias: the one
        repository whose root is the mount root (a transparent mount,
        fusefs/inodes.py); the mount root keeps the mount's own xattrs (stats,
        trace recording, config, flush) either way. no_open: the kernel skips
        open/release and opendir/releasedir (a patched pyfuse3)."""
        super().__init__()
        # With a pyfuse3 that can (patches/), the kernel sends no open,
        # release, opendir or releasedir: half the requests of a start-up.
        # read and readdir then get the inode (pyfuse3 reads these two once,
        # at init); a file's version is taken at its first read, and the
        # kernel keeps the pages and listings it was given until told.
        self.no_open = self.no_opendir = no_open
        self.requests: collections.Counter[str] = collections.Counter()
        self.repos = repositories
        self.counters = counters
        self.totals = totals or (lambda: counters)
        self._config = json.dumps(config or {}, sort_keys=True).encode()
        self._flush_uses = flush  # not self.flush: that is FUSE's flush of a file handle
        self.block_size = block_size
        self.inodes = InodeTable(root_alias)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._handles = count(1)
        self._open_files = {}
        self._open_dirs: dict[int, _OpenDir] = {}
        # no_open: inode -> (repository, version) from its first read, until
        # the kernel forgets the inode or its directory is relisted changed.
        self._versions: dict[int, tuple[Repository, FileVersion]] = {}
        self.max_versions = MAX_VERSIONS
        # no_opendir: (inode, position) -> the listing a readdir stopped in.
        self._dir_cursors: dict[tuple[int, int], _OpenDir] = {}
        # Kernel cache invalidations, sent from a task of their own
        # (invalidate_kernel_caches): a handler must not wait for them, as the
        # kernel may wait for that very request to finish first.
        self._to_invalidate, self._invalidations = trio.open_memory_channel(math.inf)
        # Trace recordings under way (id -> Recording, its encoded form once
        # stopped), and the open files of recorded processes (fh -> recordings).
        self._recordings: dict[int, Recording] = {}
        self._recorded_output: dict[int, bytes] = {}
        self._recorded_files: dict[int, list[Recording]] = {}
        self._recording_ids = count(1)
        for alias, repo in repositories.items():
            repo.on_change(functools.partial(self._entries_changed, alias))

    # -- helpers ------------------------------------------------------------
    @staticmethod
    def _ttl(repo: Repository, volatile: bool) -> float:
        """How long the kernel may keep an entry: as long as the repository
        keeps its listing (a payload one for a day)."""
        return min(repo.policy.listing_ttl(volatile), IMMUTABLE_TIMEOUT)

    def _entry(self, inode: int, attr: Attr, ttl: float) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.generation = 0
        e.entry_timeout = e.attr_timeout = ttl
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
        return self._entry(pyfuse3.ROOT_INODE, attr, 1.0)

    async def _attr_of(self, inode: int, key) -> pyfuse3.EntryAttributes | None:
        """The attributes of `inode`, whose (alias, relpath) is `key`; None if its
        directory lists no such name (a miss is common: no exception for it)."""
        alias, relpath = key
        if alias is None:
            return self._mount_root_entry()
        repo = self.repos[alias]
        attr = await repo.find(relpath)
        if attr is None:
            return None
        return self._entry(inode, attr, self._ttl(repo, repo.is_volatile(relpath)))

    def _known(self, inode: int):
        try:
            return self.inodes.key(inode)
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _acquire(self, parent_inode: int, alias: str | None, name: bytes) -> int:
        """The inode `name` names in `parent_inode`, with one more kernel reference."""
        if name == b".":
            inode = parent_inode
        elif name == b"..":
            inode = self.inodes.parent(parent_inode)
        else:
            if alias is None and os.fsdecode(name) not in self.repos:
                raise FUSEError(errno.ENOENT)
            return self.inodes.acquire_child(parent_inode, name)
        self.inodes.acquire(inode)
        return inode

    def _for_owner(self, ctx) -> bool:
        """The mount's workings are its owner's (and root's) business."""
        return ctx is None or ctx.uid in (0, self._uid)

    # -- kernel caches --------------------------------------------------------
    def _entries_changed(self, alias: str, relpath: bytes, names: set[bytes] | None) -> None:
        """A repository relisted `relpath` and `names` changed (None: it forgot
        everything at and below it): have the kernel drop what it cached."""
        directory = self.inodes.find(alias, relpath)
        if directory is None:
            return  # the kernel holds nothing there
        children = {name: self.inodes.child(directory, name) for name in names or ()}
        if self.no_open:
            # An inode keeps the version it was read at, as an open file does
            # (a reader's next reads of a changed file fail, never mixing two
            # versions); the name gets a new inode, which reads the new one.
            # Forgotten, the directory does, and so everything below it.
            if names is None:
                self.inodes.retire(directory)
            for inode in children.values():
                if inode in self._versions:
                    self._versions[inode] = self._versions.pop(inode)  # the last to go
                    self.inodes.retire(inode)
        if names is None:
            if self.no_opendir:
                # Without opendir the kernel keeps listings: those of the
                # directories it still holds at and below (in use: a cwd, an
                # open handle) would outlive dropping their entries.
                for inode in self.inodes.directories(directory):
                    self._invalidate(pyfuse3.invalidate_inode, inode)
            self._drop_tree(directory)
            return
        for name, inode in children.items():  # a new name may be cached as a negative lookup
            self._invalidate(pyfuse3.invalidate_entry, directory, name)
            if inode is not None:  # attributes and pages of a file that changed
                self._invalidate(pyfuse3.invalidate_inode, inode)

    def _drop_tree(self, directory: int) -> None:
        """Have the kernel drop every entry at and below `directory`.

        Dropping a directory's entry drops every entry the kernel cached
        below it, negative lookups included; a file still open there is
        looked up afresh when next opened, and the kernel drops its pages if
        the new attributes differ. The mount root has no entry of its own:
        the entries in it are dropped."""
        if directory != pyfuse3.ROOT_INODE:
            self._invalidate(pyfuse3.invalidate_entry, self.inodes.parent(directory),
                             self.inodes.name(directory))
            return
        for name in self.inodes.children(directory):
            self._invalidate(pyfuse3.invalidate_entry, directory, name)

    def _invalidate(self, notify, *args) -> None:
        self._to_invalidate.send_nowait(functools.partial(notify, *args))

    async def invalidate_kernel_caches(self) -> None:
        """Runs for the life of the mount: sends the invalidations queued, one at
        a time, each in a worker thread (the kernel may make it wait for
        requests we are serving)."""
        async for invalidation in self._invalidations:
            if isinstance(invalidation, trio.Event):  # someone waits for those before it
                invalidation.set()
                continue
            try:
                await trio.to_thread.run_sync(invalidation)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel had forgotten it already
                    log.info("kernel cache invalidation %r failed: %s", invalidation, e)

    # -- metadata -----------------------------------------------------------
    @error_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        parent_key = self._known(parent_inode)
        alias, parent = parent_key
        if self._recordings and alias is not None:
            for recording in self._recording(ctx):
                recording.note_dir(alias, parent)
        inode = self._acquire(parent_inode, alias, name)
        # The child's path from its parent's: the table is walked once per lookup.
        key = (self.inodes.key(inode) if name in (b".", b"..")
               else self.inodes.child_key(parent_key, name))
        try:
            entry = await self._attr_of(inode, key)
        except NotFound:  # the directory itself is gone
            entry = None
        except BaseException:
            self.inodes.forget(inode, 1)
            raise
        if entry is not None:
            return entry
        self.inodes.forget(inode, 1)
        if alias is not None and not self.repos[alias].is_volatile_dir(parent):
            # Immutable directory: let the kernel cache the miss too
            # (Python imports probe many names that do not exist).
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self._ttl(self.repos[alias], False)
            return negative
        raise FUSEError(errno.ENOENT)

    @error_boundary
    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)
            if inode in self._versions and inode not in self.inodes:
                del self._versions[inode]

    @error_boundary
    async def getattr(self, inode, ctx=None):
        entry = await self._attr_of(inode, self._known(inode))
        if entry is None:
            raise FUSEError(errno.ENOENT)
        return entry

    @error_boundary
    async def readlink(self, inode, ctx=None):
        alias, relpath = self._known(inode)
        if alias is None:
            raise FUSEError(errno.EINVAL)
        attr = await self.repos[alias].getattr(relpath)
        if not attr.is_link:
            raise FUSEError(errno.EINVAL)
        return attr.target

    async def _listing(self, inode: int, recordings) -> _OpenDir:
        """The directory's listing as it is now, noted by `recordings`: a
        relisting replaces the repository's dict, never changes this one, so
        offsets stay stable while the kernel walks it."""
        alias, relpath = self._known(inode)
        if alias is None:
            entries = {os.fsencode(a): await self.repos[a].root_attr() for a in sorted(self.repos)}
            ttl = min(self._ttl(repo, True) for repo in self.repos.values()) if self.repos else 1.0
            return _OpenDir(inode, entries, ttl)
        repo = self.repos[alias]
        entries = await repo.readdir(relpath)
        for recording in recordings:
            recording.note_dir(alias, relpath)
        # Every entry's attributes come from this one listing, so they share
        # its policy: decided once here, not per entry in readdir.
        return _OpenDir(inode, entries, self._ttl(repo, repo.is_volatile_dir(relpath)))

    @error_boundary
    async def opendir(self, inode, ctx=None):
        d = await self._listing(inode, self._recording(ctx) if self._recordings else ())
        fh = next(self._handles)
        self._open_dirs[fh] = d
        return fh

    @error_boundary
    async def readdir(self, fh, start_id, token, ctx=None):
        if self.no_opendir:  # fh is the inode
            recordings = self._recording_no_open(fh, ctx) if self._recordings else ()
            d = self._dir_cursors.pop((fh, start_id), None) or await self._listing(fh, recordings)
        else:
            d = self._open_dirs[fh]
        d.seek(start_id)
        while (item := d.peek()) is not None:
            name, attr = item
            # readdirplus: the kernel holds the entry once it takes it
            inode = self.inodes.acquire_child(d.inode, name)
            if not pyfuse3.readdir_reply(token, name, self._entry(inode, attr, d.ttl),
                                         d.position + 1):
                self.inodes.forget(inode, 1)
                break
            d.advance()
        if self.no_opendir and d.position > start_id:
            # The kernel asks for the rest (or, at the end, for nothing more) from here.
            if len(self._dir_cursors) >= MAX_DIR_CURSORS:
                del self._dir_cursors[next(iter(self._dir_cursors))]
            self._dir_cursors[(fh, d.position)] = d

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
        keep_cache = not repo.is_volatile(relpath)
        if self._recordings and (recordings := self._recording(ctx)):
            # A recorded reader's reads must all reach us: without keep_cache
            # the kernel drops the pages it holds of the file on this open.
            self._recorded_files[fh] = recordings
            keep_cache = False
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @error_boundary
    async def read(self, fh, off, size, ctx=None):
        if self.no_open:  # fh is the inode
            repo, version = self._versions.get(fh) or await self._first_read(fh)
            recordings = self._recording_no_open(fh, ctx) if self._recordings else ()
        else:
            repo, version = self._open_files[fh]
            recordings = self._recorded_files.get(fh, ())
        if recordings and size:
            end = min(off + size, version.size)
            if off < end:
                for recording in recordings:
                    recording.note_read(repo.alias, version.relpath, version.identity,
                                        off // self.block_size, (end - 1) // self.block_size)
        return await repo.read(version, off, size)

    async def _first_read(self, inode: int) -> tuple[Repository, FileVersion]:
        """no_open: the version a file reads, taken where an open would take it
        (which starts the sibling prefetch). Only regular files are read."""
        alias, relpath = self._known(inode)
        repo = self.repos[alias]
        found = repo, await repo.open(relpath)
        while len(self._versions) >= self.max_versions:
            del self._versions[next(iter(self._versions))]  # the oldest
        self._versions[inode] = found
        return found

    @error_boundary
    async def release(self, fh):
        self._open_files.pop(fh, None)
        self._recorded_files.pop(fh, None)

    # -- extended attributes -------------------------------------------------
    @error_boundary
    async def getxattr(self, inode, name, ctx=None):
        alias, relpath = self._known(inode)
        mount_root = inode == pyfuse3.ROOT_INODE
        recording = mount_root and name.startswith(TRACE_XATTR)
        if not recording and name not in (STATS_XATTR, TOTALS_XATTR, STORE_PATH_XATTR,
                                          POLICY_XATTR, CACHED_XATTR, FORGET_XATTR,
                                          CONFIG_XATTR, FLUSH_XATTR):
            raise FUSEError(pyfuse3.ENOATTR)
        if not self._for_owner(ctx):
            raise FUSEError(errno.EACCES)
        if recording:
            return await self._trace_control(name[len(TRACE_XATTR):])
        if name == FORGET_XATTR:
            return await self._forget(alias, relpath)
        if mount_root and name == STATS_XATTR:
            return json.dumps({**self.counters.snapshot(), **self._store_traffic(),
                               "requests": self.requests}, sort_keys=True).encode()
        if mount_root and name == TOTALS_XATTR:
            return json.dumps({**self.totals().to_record(), **self._store_traffic()},
                              sort_keys=True).encode()
        if mount_root and name == CONFIG_XATTR:
            return self._config
        if mount_root and name == FLUSH_XATTR and self._flush_uses is not None:
            await self._flush_uses()
            return b"flushed"
        if alias is None:
            raise FUSEError(pyfuse3.ENOATTR)
        repo = self.repos[alias]
        if name == STORE_PATH_XATTR:
            return os.fsencode(repo.store.root) + (b"/" + relpath if relpath else b"")
        if name == POLICY_XATTR:
            return (f"revalidated after {repo.policy.metadata_ttl:g}s" if repo.is_volatile(relpath)
                    else "immutable").encode()
        if name == CACHED_XATTR and (await repo.getattr(relpath)).is_file:
            cached = await repo.cached_bytes(await repo.version(relpath))  # looking never fetches
            return f"{cached}/{(await repo.getattr(relpath)).size}".encode()
        raise FUSEError(pyfuse3.ENOATTR)

    # -- trace recording -------------------------------------------------------
    def _recording(self, ctx) -> list[Recording]:
        """The recordings whose process tree made this request."""
        pid = getattr(ctx, "pid", 0)
        return [r for r in self._recordings.values() if not r.stopped and pid in r.tree]

    def _recording_no_open(self, inode: int, ctx) -> list[Recording]:
        """The recordings whose process tree made this read (or listing) of
        `inode`. Without opens the kernel keeps what it is given for later
        readers: if a recording does not see this request, the kernel drops
        what it gives, so the recording's processes ask for it themselves."""
        recordings = self._recording(ctx)
        if len(recordings) < sum(not r.stopped for r in self._recordings.values()):
            self._invalidate(pyfuse3.invalidate_inode, inode)
        return recordings

    async def _trace_control(self, verb: bytes) -> bytes:
        """start:PID, stop:ID, part:ID:I, end:ID (TRACE_XATTR). Each answers the
        same when asked twice: a caller asks once for the size, once for the value."""
        try:
            command, *args = verb.decode("ascii").split(":")
            args = [int(a) for a in args]
        except (UnicodeDecodeError, ValueError):
            raise FUSEError(errno.EINVAL) from None
        if command == "start" and len(args) == 1 and args[0] > 1:
            for rid, r in self._recordings.items():
                if r.tree.root == args[0] and not r.stopped:
                    return str(rid).encode()
            self._drop_abandoned_recordings()
            if len(self._recordings) >= MAX_RECORDINGS:
                raise FUSEError(errno.EBUSY)
            rid = next(self._recording_ids)
            self._recordings[rid] = Recording(ProcessTree(args[0]), self.block_size,
                                              {a: r.store.root for a, r in self.repos.items()})
            # What the kernel holds of the tree it answers itself: drop it, so
            # the recorded processes' lookups reach us (with opens, their
            # pages are dropped as they open each file: no keep_cache for them).
            self._drop_tree(pyfuse3.ROOT_INODE)
            if self.no_open:
                # Without opens, the pages and listings of files and
                # directories still in use (open, mapped, a cwd) as well.
                self._invalidate(_drop_kernel_caches,
                                 [*self._versions, *self.inodes.directories()])
            await self._invalidations_sent()
            log.info("recording a trace of process %d (recording %d)", args[0], rid)
            return str(rid).encode()
        if not args or args[0] not in self._recordings:
            raise FUSEError(errno.ENOENT)
        rid, r = args[0], self._recordings[args[0]]
        if command == "stop" and len(args) == 1:
            if not r.stopped:
                r.stopped = True
                self._recorded_output[rid] = r.to_json()
                log.info("recording %d stopped: %d block(s) of %d file(s), %d directories",
                         rid, len(r.reads), len(r.files), len(r.dirs))
            size = len(self._recorded_output[rid])
            return json.dumps({"bytes": size, "parts": -(-size // TRACE_PART)}).encode()
        if command == "part" and len(args) == 2 and r.stopped:
            return self._recorded_output[rid][args[1] * TRACE_PART:(args[1] + 1) * TRACE_PART]
        if command == "end" and len(args) == 1:
            self._end_recording(rid)
            return b"ended"
        raise FUSEError(errno.EINVAL)

    def _drop_abandoned_recordings(self) -> None:
        """Recordings whose recorder has gone without ending them (killed)."""
        for rid, r in list(self._recordings.items()):
            try:
                os.kill(r.tree.root, 0)
            except ProcessLookupError:
                self._end_recording(rid)
            except PermissionError:
                pass  # alive, someone else's

    def _end_recording(self, rid: int) -> None:
        r = self._recordings.pop(rid)
        self._recorded_output.pop(rid, None)
        for fh, recordings in list(self._recorded_files.items()):
            if r in recordings:
                recordings.remove(r)
                if not recordings:
                    del self._recorded_files[fh]

    async def _invalidations_sent(self, wait: float = 2.0) -> None:
        """Wait (up to `wait` s) until the invalidations queued so far were sent."""
        done = trio.Event()
        self._to_invalidate.send_nowait(done)
        with trio.move_on_after(wait):
            await done.wait()

    def _store_traffic(self) -> dict:
        """{"stores": {alias: counters}} of the stores that keep their own
        (a published image's requests, bytes on the wire, failovers, per proxy)."""
        traffic = {alias: c for alias, repo in self.repos.items() if (c := repo.store.counters())}
        return {"stores": traffic} if traffic else {}

    async def _forget(self, alias: str | None, relpath: bytes) -> bytes:
        if alias is None:
            repos = [(repo, b"") for repo in self.repos.values()]
        else:
            attr = await self.repos[alias].getattr(relpath)
            # a file's attributes are its directory's listing
            repos = [(self.repos[alias], relpath if attr.is_dir else relpath.rpartition(b"/")[0])]
        listings = 0
        for repo, directory in repos:
            listings += await repo.forget(directory)
        return json.dumps({"listings": listings}).encode()

    @error_boundary
    async def listxattr(self, inode, ctx=None):
        alias, relpath = self._known(inode)
        if not self._for_owner(ctx):
            return []
        names = [STATS_XATTR, TOTALS_XATTR, CONFIG_XATTR] if inode == pyfuse3.ROOT_INODE else []
        if alias is None:
            return names
        names += [STORE_PATH_XATTR, POLICY_XATTR]
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
