"""Where bytes come from: a Rez repository directory on shared storage.

Every method blocks (it may be an NFS round trip); callers run them in worker
threads. Paths are walked one component at a time from a fresh open of the
store root with O_NOFOLLOW, so nothing in the store (a symlink planted where a
directory was) can make us read outside the store root.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from .errors import NotADirectory, NotFound, StoreFileChanged, StoreUnavailable
from .model import Attr

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def split_path(relpath: bytes) -> list[bytes]:
    return [c for c in relpath.split(b"/") if c] if relpath else []


class FilesystemStore:
    """A store that is a directory on a (network) filesystem."""

    def __init__(self, root: str, offline: bool = False):
        self.root = root
        self.offline = offline

    def __repr__(self):
        return f"FilesystemStore({self.root!r})"

    @contextmanager
    def _open_dir(self, relpath: bytes):
        if self.offline:
            raise StoreUnavailable(f"{self.root}: offline mode, store not consulted")
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreUnavailable(f"store {self.root} unavailable: {e.strerror}") from None
        try:
            for component in split_path(relpath):
                try:
                    child = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise self._error(relpath, e) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _error(self, relpath: bytes, e: OSError):
        where = os.path.join(self.root, os.fsdecode(relpath))
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

    def list_dir(self, relpath: bytes) -> dict[bytes, Attr]:
        """Every entry of a store directory with its lstat attributes, sorted by name."""
        with self._open_dir(relpath) as fd:
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
                entries = {}
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        target = os.readlink(name, dir_fd=fd) if _is_link(st) else b""
                    except FileNotFoundError:
                        continue  # removed between listdir and stat
                    entries[name] = Attr.from_stat(st, target)
                return entries
            except OSError as e:
                raise self._error(relpath, e) from None

    def read(self, relpath: bytes, identity: tuple[int, int], offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the file, which must still have `identity`."""
        parts = split_path(relpath)
        parent, name = b"/".join(parts[:-1]), parts[-1]
        with self._open_dir(parent) as dfd:
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
            except OSError as e:
                raise self._error(relpath, e) from None
        try:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != identity:
                raise StoreFileChanged(
                    f"{os.path.join(self.root, os.fsdecode(relpath))}: changed in the store "
                    f"(size/mtime {st.st_size}/{st.st_mtime_ns}, indexed {identity[0]}/{identity[1]})")
            chunks, done = [], 0
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as e:
            raise self._error(relpath, e) from None
        finally:
            os.close(fd)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != size:
            raise StoreFileChanged(
                f"{os.path.join(self.root, os.fsdecode(relpath))}: short read from the store")
        return data


def _is_link(st) -> bool:
    return (st.st_mode & 0o170000) == 0o120000
