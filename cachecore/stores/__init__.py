"""Where bytes come from: one module per kind of store, behind one small interface.

Every store answers the same blocking calls (callers run them in worker
threads, under the fetcher's limiter and timeout), so the repository, the
index, the fetcher and the mount never ask which kind they have:

    root                 the store's name in logs, keys and the index (a path or a URL)
    stat_root()          the repository root's attributes
    list_dir(relpath, progress)
                         {name: Attr} of a directory; progress() is called as it
                         advances (a slow listing that advances is not timed out)
    root_is_empty()      whether the root lists nothing (an NFS mount point left empty)
    read(relpath, identity, offset, size)
                         bytes of a file that must still have `identity` (Attr.identity),
                         else StoreFileChanged
    file_key(relpath, attr, block_size)
                         the name of the file version's blocks in the cache
    close_idle()         let go of descriptors or connections not used lately
    counters()           traffic the store counts itself ({} if none): a published
                         image's requests, bytes on the wire, failovers, per proxy
    traces()             the launch traces the store itself carries (a published
                         image's), as a replay.TraceSource, or None

Kinds: a directory on a (network) filesystem (cachecore/store.py), a
published image over HTTP (http.py). `open_store` picks one from a spec.
"""
from __future__ import annotations

from typing import Protocol

from ..model import Attr


class Store(Protocol):
    root: str

    def stat_root(self) -> Attr: ...
    def list_dir(self, relpath: bytes, progress=lambda: None) -> dict[bytes, Attr]: ...
    def root_is_empty(self) -> bool: ...
    def read(self, relpath: bytes, identity: tuple[int, ...], offset: int, size: int) -> bytes: ...
    def file_key(self, relpath: bytes, attr: Attr, block_size: int) -> str: ...
    def close_idle(self) -> None: ...
    def counters(self) -> dict: ...
    def traces(self): ...


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _kind(location: str):
    if is_url(location):
        from .http import HttpStore

        return HttpStore
    from ..store import FilesystemStore

    return FilesystemStore


def block_key(location: str, relpath: bytes, identity: tuple[int, ...], block_size: int) -> str:
    """The cache key of a file version's blocks in the store at `location`,
    without opening the store (seed writes blocks a context brought)."""
    return _kind(location).key_of(location, relpath, identity, block_size)


def store_id(location: str) -> str:
    """The `root` the store at `location` will have (its name in the index)."""
    return _kind(location).id_of(location)


def open_store(spec, *, offline: bool, index, timeout: float) -> Store:
    """The store a RepoSpec names: a published image if its path is a URL,
    else a directory."""
    return _kind(spec.path).from_spec(spec, offline=offline, index=index, timeout=timeout)
