"""Where bytes come from: a Rez repository directory on shared storage.

Every method blocks (it may be an NFS round trip); callers run them in worker
threads (several at once: the methods are thread-safe). Paths are walked one
component at a time from a fresh open of the store root with O_NOFOLLOW, so
nothing in the store (a symlink planted where a directory was) can make us
read outside the store root.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from .blocks import file_key
from .errors import NotADirectory, NotFound, StoreFileChanged, StoreUnavailable
from .model import Attr, display_path, identity_of_stat
from .openfiles import OpenFiles
from .paths import split_path

# Directories are walked with O_PATH: a lookup (served from the kernel's
# dentry cache) rather than an open, which on NFS or sshfs costs a round trip
# to open and another to close. Only a directory being listed is opened.
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class FilesystemStore:
    """A store that is a directory on a (network) filesystem."""

    def __init__(self, root: str, offline: bool = False):
        self.root = root
        self.offline = offline
        # Scattered reads of one big file would otherwise open it for every
        # block, a round trip each; an open file keeps the store's filesystem
        # busy, so not for long.
        self._files = OpenFiles(max_idle=64, idle_seconds=2.0)

    def __repr__(self):
        return f"FilesystemStore({self.root!r})"

    def close_idle(self) -> None:
        self._files.close_idle()

    @contextmanager
    def _open_dir(self, relpath: bytes, for_listing: bool = False):
        if self.offline:
            raise StoreUnavailable(f"{self.root}: offline mode, store not consulted")
        components = split_path(relpath)
        root_flags = _LIST_FLAGS & ~os.O_NOFOLLOW if for_listing and not components else \
            os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(self.root, root_flags)  # the root itself may be a symlink
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
            yield fd
        finally:
            os.close(fd)

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
            return Attr.from_stat(os.stat(self.root))
        except OSError as e:
            raise StoreUnavailable(f"store {self.root} unavailable: {e.strerror}") from None

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
                return entries
            except OSError as e:
                raise self._error(relpath, e) from None

    def root_is_empty(self) -> bool:
        """An empty repository root means the store's filesystem is not mounted
        (its mount point shows through), not that every package was deleted."""
        with self._open_dir(b"", for_listing=True) as fd:
            with os.scandir(fd) as entries:
                return next(entries, None) is None

    def file_key(self, relpath: bytes, attr: Attr, block_size: int) -> str:
        return file_key(self.root, relpath, attr.identity, block_size)

    def read(self, relpath: bytes, identity: tuple[int, ...], offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the file, which must still have `identity`
        (Attr.identity: size, mtime, ctime, inode)."""
        key = (relpath, identity)
        fd = self._files.acquire(key, lambda: self._open_file(relpath))
        keep = True
        try:
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
            self._files.release(key, fd, keep)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != size:
            raise StoreFileChanged(
                f"{display_path(self.root, relpath)}: short read from the store")
        return data

    def _open_file(self, relpath: bytes) -> int:
        parts = split_path(relpath)
        with self._open_dir(b"/".join(parts[:-1])) as dfd:
            try:
                return os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
            except OSError as e:
                raise self._error(relpath, e) from None


def _is_link(st) -> bool:
    return (st.st_mode & 0o170000) == 0o120000
