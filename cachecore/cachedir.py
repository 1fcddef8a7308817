"""Who may write a cache directory, and opening files in it without being led astray.

Everything a mount serves from its cache was written into the cache directory
first, so whoever can write there decides what the mount serves: a cache is
trusted only if nobody but its owner (the daemon's own user) or root can have
written it. `trusted_directory` checks that of a directory and of every
directory above it (a writable parent lets anyone rename the cache away and
put their own in its place), the way OpenSSH checks the files it trusts.
Inside a trusted directory, files are created with O_EXCL and opened with
O_NOFOLLOW and checked with fstat, so a symlink or a file of someone else's,
however it got there, is refused rather than read or written through.

The per-cache secret keys the MAC in every block trailer (blocks.py): bytes
copied in from anywhere else (another cache, another machine, an attacker who
got write access for a while) do not verify without it. SECURITY.md says
what is trusted and why.
"""
from __future__ import annotations

import errno
import os
import stat

from .errors import LazyFSError

SECRET_NAME = "secret"
SECRET_SIZE = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedCache(LazyFSError):
    """A cache directory (or a file in it) that someone other than its owner could have written."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix  # what makes it trusted, where something safe does (`doctor` says it)


def _describe(st) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _check_owned(path: str, st, uid: int) -> None:
    if st.st_uid != uid:
        raise UntrustedCache(f"{path} is not owned by uid {uid} ({_describe(st)}): "
                             "a cache must belong to the user who runs the mount",
                             fix=f"mount as uid {st.st_uid}, its owner, or give a cache "
                                 "directory of your own (--cache DIR)")
    if st.st_mode & 0o022:
        raise UntrustedCache(f"{path} is writable by group or others ({_describe(st)}): "
                             f"chmod go-w {path}", fix=f"chmod go-w {path}")


def check_ancestors(path: str) -> None:
    """Every directory above `path` must be root's or ours and not writable by
    others, unless sticky (/tmp): there only its owner can rename `path` away."""
    uid = os.geteuid()
    current = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(current)
        except OSError as e:
            raise UntrustedCache(f"cannot check {current}: {e.strerror}") from None
        if st.st_uid not in (0, uid):
            raise UntrustedCache(f"{current}, above the cache, is owned by uid {st.st_uid}: "
                                 "its owner could replace the cache",
                                 fix="give a cache directory below directories of root's or "
                                     "your own (--cache DIR)")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UntrustedCache(f"{current}, above the cache, is writable by group or others "
                                 f"({_describe(st)}): anyone could replace the cache",
                                 fix=f"chmod go-w {current} (or chmod +t {current}, as /tmp)")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def trusted_directory(path: str, *, create: bool, dir_fd: int | None = None) -> int:
    """An O_DIRECTORY descriptor of `path` (relative to `dir_fd` if given)
    after checking it is ours and not group/other-writable; created mode 0700
    if missing and `create`. The caller closes it."""
    if create:
        try:
            os.mkdir(path, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UntrustedCache(f"{path} is a symlink or not a directory; a cache directory "
                                 "must be a real directory") from None
        raise
    try:
        _check_owned(path, os.fstat(fd), os.geteuid())
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_tree(directory: str, subdirs: tuple[str, ...], *, create: bool) -> None:
    """`directory`, its ancestors and the named subdirectories, all trusted."""
    check_ancestors(directory)
    for sub in ("", *subdirs):
        os.close(trusted_directory(os.path.join(directory, sub) if sub else directory,
                                   create=create))


def open_owned(path: str, flags: int, *, dir_fd: int | None = None, mode: int = 0o600) -> int:
    """Open a regular file of ours without following a symlink; O_CREAT
    creates it exclusively or opens the one another process just created."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if flags & os.O_CREAT:
            try:
                fd = os.open(path, flags | os.O_EXCL, mode, dir_fd=dir_fd)
            except FileExistsError:
                fd = os.open(path, flags & ~os.O_CREAT, dir_fd=dir_fd)
        else:
            fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedCache(f"{path} in the cache is a symlink; refusing it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedCache(f"{path} in the cache is not a regular file")
        if st.st_uid != os.geteuid():
            raise UntrustedCache(f"{path} in the cache is owned by uid {st.st_uid}, not by the "
                                 "cache's owner")
    except BaseException:
        os.close(fd)
        raise
    return fd


def cache_secret(directory: str, *, create: bool) -> bytes:
    """The cache's MAC key (SECRET_SIZE random bytes, mode 0600), made on first use.

    Published by link(2) from a complete temporary file, so a second process
    creating the same cache at the same moment reads the winner's whole key."""
    path = os.path.join(directory, SECRET_NAME)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        if not create:
            raise
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = open_owned(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, os.urandom(SECRET_SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: str) -> bytes:
    fd = open_owned(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UntrustedCache(f"{path} is readable by others ({_describe(st)}): the cache's "
                                 "key must be private (remove the cache and let it be made again)")
        key = os.read(fd, SECRET_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != SECRET_SIZE:
        raise UntrustedCache(f"{path} is not a cache key ({len(key)} bytes)")
    return key
