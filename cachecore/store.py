"""Where bytes come from: a Rez repository directory on shared storage.

Every method blocks (it may be an NFS round trip); callers run them in worker
threads (several at once: the methods are thread-safe). Paths are walked one
component at a time from a fresh open of the store root with O_NOFOLLOW, so
nothing in the store (a symlink planted where a directory was) can make us
read outside the store root; files are opened in directories so walked to
(kept for the next file there, `_dirs`) and served only while they still
have their indexed identity.

A store under a transparent mount (`mount --over`, mount/over.py) is reached
through a descriptor of its root opened before the mount hid it: its path
names the mount from then on, and walking it would ask the mount, that is
ourselves (a deadlock in the daemon). Such a store keeps its path as its
name (`root`: keys, index, logs) and opens its root by the descriptor's
/proc/self/fd link, the one difference; the link is the descriptor's own
directory, whatever is mounted on the path since. A fresh open per walk
(rather than the descriptor itself) keeps one code path, and gives each
listing of the root its own file position.

POSIX ACLs: the kernel checks access to the mount against the mode bits we
list (default_permissions), and mode bits cannot say "everyone but carol".
An entry with an access ACL is therefore listed with group and other bits
that grant only what every class of user the ACL names is granted
(`acl_bounded_mode`): through the mount nobody gets more than the store
would give them; some users the ACL grants more get less (SECURITY.md).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from contextlib import contextmanager

from .blocks import file_key
from .errors import NotADirectory, NotFound, StoreFileChanged, StoreUnavailable
from .model import Attr, display_path, identity_of_stat
from .openfiles import OpenFiles
from .paths import split_path

log = logging.getLogger(__name__)

# Directories are walked with O_PATH: a lookup (served from the kernel's
# dentry cache) rather than an open, which on NFS or sshfs costs a round trip
# to open and another to close. Only a directory being listed is opened.
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

DIR_AGE = 1.0  # seconds a directory walked to serves further opens (FilesystemStore._dirs)

ACL_XATTR = "system.posix_acl_access"
# The xattr's binary form (linux/posix_acl_xattr.h): a version, then
# (tag, permission, id) entries. Tags:
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = \
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20
# What a filesystem without ACLs (or without xattrs: NFSv4, many FUSE stores) answers.
_NO_ACLS = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def acl_bounded_mode(mode: int, acl: bytes) -> int:
    """The mode to list for an entry whose access ACL is `acl`.

    The owner's bits are the ACL's owner entry already. Group and other bits
    become what every other entry grants (named users, groups and the owning
    group through the mask, and others): whichever class the kernel puts a
    user in, it grants no more than the ACL would. An ACL that cannot be read
    grants nothing to group and others."""
    body = acl[4:]
    if len(acl) < 4 or struct.unpack_from("<I", acl)[0] != _ACL_VERSION or len(body) % 8:
        return mode & ~0o077
    mask, masked, other = 0o7, [], 0
    for tag, perm, _ in struct.iter_unpack("<HHI", body):
        if tag == _ACL_MASK:
            mask = perm & 0o7
        elif tag == _ACL_OTHER:
            other = perm & 0o7
        elif tag in (_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP):
            masked.append(perm & 0o7)
        elif tag != _ACL_USER_OBJ:
            return mode & ~0o077
    common = other
    for perm in masked:
        common &= perm & mask
    return (mode & ~0o077) | common << 3 | common


class FilesystemStore:
    """A store that is a directory on a (network) filesystem."""

    def __init__(self, root: str, offline: bool = False, root_fd: int | None = None):
        """root_fd: a descriptor of the root (O_PATH will do) to reach it by
        instead of its path, which a transparent mount now covers. The
        store does not close it: it is held for the life of the process."""
        self.root = root
        self.offline = offline
        self._root_path = root if root_fd is None else f"/proc/self/fd/{root_fd}"
        self._acls = True  # until the store's filesystem shows it has none
        self._acl_noted = False
        # Scattered reads of one big file would otherwise open it for every
        # block, a round trip each; an open file keeps the store's filesystem
        # busy, so not for long.
        self._files = OpenFiles(max_idle=64, idle_seconds=2.0)
        # The directories files were opened in, walked to at most every
        # DIR_AGE seconds (O_PATH): a start-up opens thousands of files in a
        # few hundred directories, and a walk from the root costs two system
        # calls per component, each a wait for the GIL among the store
        # threads (a replay's daemon CPU 3.57 -> 2.94 s, replay_alone.py). A
        # kept descriptor may name a directory the store has moved or
        # replaced since (a release symlink flipped): what is opened through
        # it is served only with the indexed identity (read()), so it is the
        # very file the index lists, wherever its directory went; a file that
        # is not is looked for again by a fresh walk; and the path is walked
        # again within DIR_AGE seconds, as a listing would (`metadata_ttl`).
        self._dirs = OpenFiles(max_idle=256, idle_seconds=DIR_AGE, max_age=DIR_AGE)

    def __repr__(self):
        return f"FilesystemStore({self.root!r})"

    def traces(self):
        return None  # traces of a filesystem repository: its `traces` directory

    def close_idle(self) -> None:
        self._files.close_idle()
        self._dirs.close_idle()

    @contextmanager
    def _open_dir(self, relpath: bytes, for_listing: bool = False):
        fd = self._walk(relpath, for_listing)
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(self, relpath: bytes, for_listing: bool = False) -> int:
        """A descriptor of the directory (opened for listing, or O_PATH)."""
        if self.offline:
            raise StoreUnavailable(f"{self.root}: offline mode, store not consulted")
        components = split_path(relpath)
        root_flags = _LIST_FLAGS & ~os.O_NOFOLLOW if for_listing and not components else \
            os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(self._root_path, root_flags)  # the root itself may be a symlink
        except OSError as e:
            raise StoreUnavailable(f"store {self.root} unavailable: {e.strerror}") from None
        try:
            for n, component in enumerate(components):
                last = n == len(components) - 1
                try:
                    child = os.open(component, _LIST_FLAGS if last and for_listing else _WALK_FLAGS,
                                    dir_fd=fd)
                except OSError as e:
                    raise self._error(relpath, e) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _error(self, relpath: bytes, e: OSError):
        where = display_path(self.root, relpath)
        if e.errno == errno.ENOTDIR or e.errno == errno.ELOOP:
            return NotADirectory(f"{where}: not a directory in the store")
        if e.errno == errno.ENOENT:
            return NotFound(f"{where}: no longer in the store")
        return StoreUnavailable(f"{where}: {e.strerror}")

    def stat_root(self) -> Attr:
        if self.offline:
            raise StoreUnavailable(f"{self.root}: offline mode, store not consulted")
        try:
            attr = Attr.from_stat(os.stat(self._root_path))
        except OSError as e:
            raise StoreUnavailable(f"store {self.root} unavailable: {e.strerror}") from None
        # (the root may be a symlink: its target's ACL is the one that counts)
        return self._bounded_by_acls({b"": attr}, os.fsencode(self._root_path), b"",
                                     follow=True)[b""]

    def list_dir(self, relpath: bytes, progress=lambda: None) -> dict[bytes, Attr]:
        """Every entry of a store directory with its lstat attributes, sorted by name.

        `progress()` is called after each name read and each entry stat'd: a
        big or slow directory takes long as a whole, each step does not
        (Fetcher.call_store bounds the steps)."""
        with self._open_dir(relpath, for_listing=True) as fd:
            progress()
            try:
                names = []
                with os.scandir(fd) as found:
                    for entry in found:
                        names.append(os.fsencode(entry.name))
                        progress()
                entries = {}
                for name in sorted(names):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        target = os.readlink(name, dir_fd=fd) if _is_link(st) else b""
                    except FileNotFoundError:
                        continue  # removed between listdir and stat
                    entries[name] = Attr.from_stat(st, target)
                    progress()
                return self._bounded_by_acls(entries, b"/proc/self/fd/%d/" % fd, relpath)
            except OSError as e:
                raise self._error(relpath, e) from None

    def _bounded_by_acls(self, entries: dict[bytes, Attr], where: bytes, relpath: bytes,
                         follow: bool = False) -> dict[bytes, Attr]:
        """`entries` (names in the directory `where`: a path, with a slash unless
        the name is empty), files' and directories' modes bounded by their
        access ACLs. A listxattr per entry (~4.5 us on a local disk, beside
        ~3 us for its lstat; cheaper than a getxattr that fails), none once
        the filesystem has said it keeps no xattrs."""
        for name, attr in entries.items():
            if not self._acls:
                break
            if not (attr.is_file or attr.is_dir):
                continue  # a symlink's own mode is never checked; devices are refused
            path = where + name
            try:
                if ACL_XATTR not in os.listxattr(path, follow_symlinks=follow):
                    continue
                acl = os.getxattr(path, ACL_XATTR, follow_symlinks=follow)
            except OSError as e:
                if e.errno in _NO_ACLS:
                    self._acls = False
                if e.errno in (errno.ENODATA, errno.ENOENT, *_NO_ACLS):
                    continue
                acl = b""  # unreadable: grant group and others nothing
            mode = acl_bounded_mode(attr.mode, acl)
            if mode != attr.mode:
                entries[name] = attr._replace(mode=mode)
                self._note_acl(relpath + b"/" + name if relpath else name, attr.mode, mode)
        return entries

    def _note_acl(self, relpath: bytes, listed: int, shown: int) -> None:
        if not self._acl_noted:
            self._acl_noted = True
            log.warning("%s has POSIX ACLs that its mode bits do not express (first: %s, "
                        "%s shown as %s): such entries give group and others only what "
                        "every user the ACL names is granted", display_path(self.root),
                        display_path(self.root, relpath), stat.filemode(listed),
                        stat.filemode(shown))

    def root_is_empty(self) -> bool:
        """An empty repository root means the store's filesystem is not mounted
        (its mount point shows through), not that every package was deleted."""
        with self._open_dir(b"", for_listing=True) as fd:
            with os.scandir(fd) as entries:
                return next(entries, None) is None

    def counters(self) -> dict:
        return {}  # its traffic is the fetcher's (Counters.store_reads, store_bytes, ...)

    @classmethod
    def from_spec(cls, spec, *, offline: bool, index, timeout: float) -> FilesystemStore:
        return cls(spec.path, offline=offline)

    @staticmethod
    def id_of(location: str) -> str:
        return location

    @staticmethod
    def key_of(root: str, relpath: bytes, identity: tuple[int, ...], block_size: int) -> str:
        return file_key(root, relpath, identity, block_size)

    def file_key(self, relpath: bytes, attr: Attr, block_size: int) -> str:
        return self.key_of(self.root, relpath, attr.identity, block_size)

    def read(self, relpath: bytes, identity: tuple[int, ...], offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the file, which must still have `identity`
        (Attr.identity: size, mtime, ctime, inode)."""
        key = (relpath, identity)
        fd = self._files.acquire(key, lambda: self._open_file(relpath))
        keep = True
        try:
            now = identity_of_stat(os.fstat(fd))
            if now != identity:
                # Opened through a kept directory the store has since replaced?
                # Then the path, walked afresh, may still name the indexed file.
                self._files.forget(key)  # closed once its other users let go
                self._files.release(key, fd)
                fd = None
                self._dirs.forget(parent_of(relpath))
                fd = self._files.acquire(key, lambda: self._open_file(relpath))
                now = identity_of_stat(os.fstat(fd))
            if now != identity:
                keep = False
                raise StoreFileChanged(
                    f"{display_path(self.root, relpath)}: changed in the store "
                    f"(size/mtime/ctime/inode {'/'.join(map(str, now))}, "
                    f"indexed {'/'.join(map(str, identity))})")
            chunks, done = [], 0
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as e:
            keep = False
            raise self._error(relpath, e) from None
        finally:
            if fd is not None:
                self._files.release(key, fd, keep)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != size:
            raise StoreFileChanged(
                f"{display_path(self.root, relpath)}: short read from the store")
        return data

    def _open_file(self, relpath: bytes) -> int:
        parts = split_path(relpath)
        parent = parent_of(relpath)
        for attempt in range(2):
            dfd = self._dirs.acquire(parent, lambda: self._walk(parent))
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
            except OSError as e:
                self._dirs.release(parent, dfd, keep=False)
                if attempt:
                    raise self._error(relpath, e) from None
                # A kept directory may be gone or stale (moved, replaced, an
                # NFS handle gone): walk to it afresh once before failing.
                self._dirs.forget(parent)
                continue
            self._dirs.release(parent, dfd)
            return fd


def parent_of(relpath: bytes) -> bytes:
    return b"/".join(split_path(relpath)[:-1])


def _is_link(st) -> bool:
    return (st.st_mode & 0o170000) == 0o120000
