"""Errors cachecore raises; fusefs maps each to one errno."""
import errno


class LazyFSError(Exception):
    """Base class. `errno` is what a FUSE request failing with it answers."""

    errno = errno.EIO


class NotFound(LazyFSError):
    errno = errno.ENOENT


class NotADirectory(LazyFSError):
    errno = errno.ENOTDIR


class StoreUnavailable(LazyFSError):
    """The store could not answer (gone, denied, timed out, offline) and the
    cache does not hold what was asked for."""


class StoreFileChanged(StoreUnavailable):
    """A file's size or mtime in the store differs from the indexed identity:
    its cached blocks belong to another version, so nothing is served from a mix."""


class UnsafeValue(LazyFSError):
    """The index holds a value of a kind it never writes (e.g. a pickle)."""


class CacheUnavailable(LazyFSError):
    """The cache disk did not answer in time (a stalled NFS or FUSE filesystem
    under the cache directory): callers read from the store instead."""
