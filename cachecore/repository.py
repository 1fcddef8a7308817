"""One mirrored Rez repository: metadata policy on top of store, index and fetcher.

The policy is DESIGN.md's immutability rule. Released variant payloads never
change, so directories below a version directory are listed once and kept
forever. The repository root, family and version directories can gain entries
(new versions, new variants), and package definition files live in them, so
those listings are revalidated after `metadata_ttl`. A mutable repository
revalidates everything that way.

Two things reopen a payload listing. On a mount other users reach, the
kernel checks their access against the modes and owners listed, so payload
listings are revalidated after `permission_ttl` (a `chmod` in the store then
takes effect). And a payload directory listed while a release was still
being copied holds files that later grew: a read that finds its file
changed relists the directory, so a reopen reads the whole file and new
files appear. Whoever shows listings (fusefs: the kernel's caches) hears of
every relisting that changed something through `on_change`, and `forget`
drops what is known of a tree on request.

Listings are replaced, never changed in place: readers (open directory
handles) hold a listing's dict while they walk it.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .blocks import unverified_key
from .errors import (
    CacheUnavailable,
    LazyFSError,
    NotADirectory,
    NotFound,
    StoreFileChanged,
    StoreUnavailable,
)
from .fetcher import Fetcher, FileVersion
from .index import MetadataIndex
from .model import Attr, display_path
from .replay import replay
from .singleflight import SingleFlight
from .stores import Store
from .trace import BadTrace, merge

log = logging.getLogger(__name__)

# Depth of the directories whose listings can change in a released repository:
# 0 the repository root, 1 a family, 2 a version.
VOLATILE_DEPTH = 2


@dataclass(frozen=True)
class RepoPolicy:
    metadata_ttl: float = 60.0
    mutable: bool = False
    # When a file of a payload directory is first opened (first read, without
    # open requests), fetch its siblings with the same suffix of at most this
    # size in the background: a start-up that imports one module of a package
    # imports most of them (one round trip each if not overlapped), while a
    # walk or an `ls` opens nothing and fetches nothing. 0 turns it off.
    prefetch_max_size: int = 0
    prefetch_max_files: int = 2000
    # Payload listings are kept forever unless this is set (seconds): then
    # every listing is revalidated after it at most, for the modes and owners
    # other users' access is checked against (allow_other mounts; SECURITY.md).
    permission_ttl: float = 0.0

    def listing_ttl(self, volatile: bool) -> float:
        """Seconds a listing of a volatile (or payload) directory is used for
        before it is listed again; the kernel keeps its entries as long."""
        ttl = self.metadata_ttl if volatile else math.inf
        return min(ttl, self.permission_ttl) if self.permission_ttl else ttl


class _Listing(dict):
    """A directory's entries (name -> Attr) and until when they are used.

    Weakly referenceable: a listing still held by a reader (an open
    directory handle) after it left the memory is found again rather than
    decoded once more, so any number of handles share one copy."""

    __slots__ = ("__weakref__", "valid_until", "verified")

    def __init__(self, entries: dict[bytes, Attr], valid_until: float, verified: bool = True):
        super().__init__(entries)
        self.valid_until = valid_until  # wall clock; +inf for immutable directories
        # False for a listing seeded from a context file that the store never
        # confirmed (fetched_at 0): its files' blocks are keyed apart
        # (blocks.unverified_key), and it is relisted as soon as the store answers.
        self.verified = verified


def version_dir_of(relpath: bytes) -> bytes:
    """family/version of a path at or below a version directory (else shorter)."""
    return b"/".join(relpath.split(b"/", 2)[:2])


def parent_and_name(relpath: bytes) -> tuple[bytes, bytes]:
    head, _, tail = relpath.rpartition(b"/")
    return head, tail


# Told (directory, names whose entries changed) after a relisting changed
# something, or (directory, None) when everything at and below it was forgotten.
ChangeListener = Callable[[bytes, "set[bytes] | None"], None]


def _shown(attr: Attr) -> tuple:
    """What a kernel may have cached of an entry (atime aside: it moves on reads)."""
    return attr.mode, attr.uid, attr.gid, attr.nlink, attr.target, attr.identity


def changed_names(old: dict[bytes, Attr], new: dict[bytes, Attr]) -> set[bytes]:
    return {name for name in old.keys() | new.keys()
            if name not in old or name not in new or _shown(old[name]) != _shown(new[name])}


class Repository:
    def __init__(self, alias: str, store: Store, index: MetadataIndex,
                 fetcher: Fetcher, policy: RepoPolicy, *, memory_entries: int = 100_000,
                 clock=time.time, trace_sources=()):
        self.alias = alias
        self.store = store
        self.store_id = store.root
        self.index = index
        self.fetcher = fetcher
        self.policy = policy
        self._clock = clock
        # Decoded listings, most recently used last. An entry costs ~390 bytes
        # (its Attr's ten fields are mostly big ints): 100k entries ~38 MiB,
        # a sixth of the daemon's 256 MiB; the index answers the rest.
        self._memory: OrderedDict[bytes, _Listing] = OrderedDict()
        self._held: weakref.WeakValueDictionary[bytes, _Listing] = weakref.WeakValueDictionary()
        self._memory_entries = 0
        self._memory_limit = memory_entries
        self._root: _Listing | None = None
        self._flights = SingleFlight()
        self._index_writable = True
        self._prefetched: set[bytes] = set()  # directories whose siblings were prefetched
        self._listeners: list[ChangeListener] = []
        # Launch traces (cachecore/replay.py): where they come from, and the
        # traced variant roots not yet accessed, by version directory.
        self.trace_sources: list = list(trace_sources)
        self._untriggered: dict[bytes, set[bytes]] = {}
        self._triggered: set[bytes] = set()

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _changed(self, relpath: bytes, names: set[bytes] | None) -> None:
        for listener in self._listeners:
            listener(relpath, names)

    # -- policy -------------------------------------------------------------
    def is_volatile_dir(self, relpath: bytes) -> bool:
        # Its depth alone (asked on every lookup): the paths asked about are
        # the kernel's names and listings' names, checked where they came in
        # (paths.py); a policy answer walks nothing.
        return self.policy.mutable or (relpath.count(b"/") + 1 if relpath else 0) <= VOLATILE_DEPTH

    def is_volatile(self, relpath: bytes) -> bool:
        """Whether the entry's attributes (and, for a file, its contents) may change."""
        return relpath == b"" or self.is_volatile_dir(parent_and_name(relpath)[0])

    def _valid_until(self, relpath: bytes, fetched_at: float) -> float:
        # A record from the future (a clock that jumped, a forged shared
        # index) is as old as the present, never valid for longer.
        fetched_at = min(fetched_at, self._clock())
        return fetched_at + self.policy.listing_ttl(self.is_volatile_dir(relpath))

    def _display(self, relpath: bytes) -> str:
        return display_path(self.store.root, relpath)

    # -- metadata -----------------------------------------------------------
    async def root_attr(self) -> Attr:
        if self._root is None or self._root.valid_until <= self._clock():
            self._root = await self._flights.run(None, self._load_root)
        return self._root[b"."]

    async def _load_root(self) -> _Listing:
        known = self._root
        if known is None:
            found = await self._from_index(self.index.get_root, self.store_id)
            if found:
                known = _Listing({b".": found[0]}, self._valid_until(b"", found[1]))
                if known.valid_until > self._clock():
                    return known
        try:
            attr = await self.fetcher.call_store(self.store, self.store.root,
                                                 self.store.stat_root)
        except StoreUnavailable as e:
            if known is None:
                raise
            log.info("serving cached attributes of %s: %s", self.store.root, e)
            known.valid_until = self._clock() + self.policy.metadata_ttl
            return known
        now = self._clock()
        await self._save(self.index.put_root, self.store_id, attr, now)
        return _Listing({b".": attr}, self._valid_until(b"", now))

    async def _from_index(self, lookup, *args):
        """An index lookup; None (not cached) while the cache disk does not answer."""
        try:
            return await self.fetcher.call_local(lookup, *args)
        except CacheUnavailable:
            return None

    async def _save(self, write, *args) -> None:
        """Write to the index; on a full or broken cache disk, serve from memory
        and say so once (and once more when writing works again). A cache disk
        that does not answer is said once by the fetcher."""
        try:
            await self.fetcher.call_local(write, *args)
        except CacheUnavailable:
            return
        except (OSError, sqlite3.Error) as e:
            if self._index_writable:
                log.warning("cannot save metadata in the index (%s); serving it from memory", e)
            self._index_writable = False
            return
        if not self._index_writable:
            log.info("the index is writable again")
        self._index_writable = True

    def _known(self, relpath: bytes) -> _Listing | None:
        known = self._memory.get(relpath)
        return known if known is not None else self._held.get(relpath)

    async def listing(self, relpath: bytes) -> dict[bytes, Attr]:
        """Every entry of a directory, from memory, the index or the store."""
        known = self._known(relpath)
        if known is not None and known.valid_until > self._clock():
            if relpath in self._memory:
                self._memory.move_to_end(relpath)
            else:
                self._remember(relpath, known)
            return known
        listing = await self._flights.run(relpath, lambda: self._load_listing(relpath, known))
        self._remember(relpath, listing)
        return listing

    async def _load_listing(self, relpath: bytes, known: _Listing | None,
                            relist: bool = False) -> _Listing:
        """From the index if it holds a valid listing (unless `relist`), else the store."""
        if known is None:
            found = await self._from_index(self.index.get_listing, self.store_id, relpath)
            if found is not None:
                entries, fetched_at = found
                verified = fetched_at > 0
                known = _Listing(entries, self._valid_until(relpath, fetched_at) if verified
                                 else 0.0, verified)
                if known.valid_until > self._clock() and not relist:
                    return known
        try:
            entries = await self.fetcher.call_store(self.store, self._display(relpath),
                                                    self.store.list_dir, relpath, progress=True)
            if known is not None and known and (
                    not entries if relpath == b"" else False):
                raise StoreUnavailable(f"{self.store.root} is empty: its filesystem is "
                                       "probably not mounted")
        except NotFound:
            # A directory its parent's listing names, gone from the store: gone,
            # unless the whole store is (an empty root: its filesystem is not
            # mounted), and then the store cannot say (EIO), whatever is cached.
            if not await self.fetcher.call_store(self.store, self.store.root,
                                                 self.store.root_is_empty):
                raise
            e = StoreUnavailable(f"{self.store.root} is empty: its filesystem is probably "
                                 "not mounted")
            if known is None:
                raise StoreUnavailable(f"{e} (and {self._display(relpath)} is not cached)") \
                    from None
            log.info("serving cached listing of %s: %s", self._display(relpath), e)
            known.valid_until = self._clock() + self.policy.metadata_ttl
            return known
        except StoreUnavailable as e:
            if known is None:
                raise StoreUnavailable(f"{e} (and not cached)") from None
            # Stale beats nothing while the store is away; retry after one TTL
            # rather than on every request, which would make each one wait.
            log.info("serving cached listing of %s: %s", self._display(relpath), e)
            known.valid_until = self._clock() + self.policy.metadata_ttl
            return known
        self.fetcher.counters.store_listings += 1
        now = self._clock()
        await self._save(self.index.put_listing, self.store_id, relpath, entries, now)
        if known is not None and (changed := changed_names(known, entries)):
            self._changed(relpath, changed)
        return _Listing(entries, self._valid_until(relpath, now))

    async def _relist(self, relpath: bytes) -> None:
        """List the directory from the store now (joining a listing under way)."""
        listing = await self._flights.run(
            relpath, lambda: self._load_listing(relpath, self._known(relpath), relist=True))
        self._remember(relpath, listing)

    async def forget(self, relpath: bytes) -> int:
        """Drop every listing at and below `relpath`, in memory and in the index,
        so they are listed from the store again when next used. Returns how
        many directories were forgotten."""
        below = relpath + b"/" if relpath else b""
        dropped = {p for p in [*self._memory, *self._held] if p == relpath or p.startswith(below)}
        for p in dropped:
            self._held.pop(p, None)
            if p in self._memory:
                self._memory_entries -= len(self._memory.pop(p))
        self._prefetched -= dropped
        if relpath == b"":
            self._root = None
        dropped.update(await self.fetcher.call_local(self.index.forget_tree, self.store_id,
                                                     relpath))
        self._changed(relpath, None)
        log.info("forgot %d listing(s) at and below %s", len(dropped), self._display(relpath))
        return len(dropped)

    def _prefetch_siblings(self, relpath: bytes) -> None:
        parent, name = parent_and_name(relpath)
        if (parent in self._prefetched or self.is_volatile_dir(parent)
                or parent not in self._memory):
            return
        if len(self._prefetched) > 100_000:
            self._prefetched.clear()
        self._prefetched.add(parent)
        suffix = os.path.splitext(name)[1]
        siblings = [(n, a) for n, a in self._memory[parent].items()
                    if n != name and a.is_file and 0 < a.size <= self.policy.prefetch_max_size
                    and os.path.splitext(n)[1] == suffix]
        if len(siblings) > self.policy.prefetch_max_files:
            return  # a data directory, not a code one: leave it to readers
        prefix = parent + b"/" if parent else b""
        self.fetcher.prefetch([self._version(prefix + n, a) for n, a in siblings])

    def _remember(self, relpath: bytes, listing: _Listing) -> None:
        old = self._memory.pop(relpath, None)
        if old is not None:
            self._memory_entries -= len(old)
        self._memory[relpath] = self._held[relpath] = listing
        self._memory_entries += len(listing)
        while self._memory_entries > self._memory_limit and len(self._memory) > 1:
            _, evicted = self._memory.popitem(last=False)
            self._memory_entries -= len(evicted)

    # -- launch traces ----------------------------------------------------------
    async def refresh_traces(self) -> None:
        """Ask every trace source which variants it has a trace of (a variant
        accessed already in this run is not replayed again)."""
        roots: set[bytes] = set()
        for source in self.trace_sources:
            try:
                roots |= await self._ask(source, source.roots)
            except LazyFSError as e:
                log.info("cannot read the traces of %s: %s", self.store.root, e)
        waiting: dict[bytes, set[bytes]] = {}
        for root in roots - self._triggered:
            waiting.setdefault(version_dir_of(root), set()).add(root)
        self._untriggered = waiting

    def traced_roots(self) -> set[bytes]:
        return self._triggered | {r for roots in self._untriggered.values() for r in roots}

    async def _ask(self, source, fn, *args):
        what = getattr(source, "path", self.store.root)
        if source.local:
            return await self.fetcher.call_local(fn, *args)
        return await self.fetcher.call_store(self.store, what, fn, *args)

    def _touch(self, relpath: bytes) -> None:
        """A lookup at or below a traced variant root that is the first starts
        its replay, in the background."""
        roots = self._untriggered.get(version_dir_of(relpath))
        if not roots:
            return
        for root in [r for r in roots if relpath == r or relpath.startswith(r + b"/")]:
            if self.fetcher.start_background(self._replay, root):
                roots.discard(root)
                self._triggered.add(root)

    async def _replay(self, root: bytes) -> None:
        found = None
        for source in self.trace_sources:
            try:
                trace = await self._ask(source, source.trace, root)
            except (LazyFSError, BadTrace) as e:
                log.info("cannot read the trace of %s: %s", self._display(root), e)
                continue
            if trace is not None:
                found = trace if found is None else merge(found, trace)
        if found is not None:
            await replay(self, found)

    async def getattr(self, relpath: bytes) -> Attr:
        attr = await self.find(relpath)
        if attr is None:
            raise NotFound(self._display(relpath))
        return attr

    async def find(self, relpath: bytes) -> Attr | None:
        """The entry's attributes; None if its directory lists no such name
        (NotFound if the directory itself is not there). A lookup's miss is
        common (imports probe names): no exception, no message for it."""
        if self._untriggered:
            self._touch(relpath)
        if relpath == b"":
            return await self.root_attr()
        parent, name = parent_and_name(relpath)
        return (await self.listing(parent)).get(name)

    async def lookup(self, parent: bytes, name: bytes) -> Attr:
        return await self.getattr(parent + b"/" + name if parent else name)

    async def readdir(self, relpath: bytes) -> dict[bytes, Attr]:
        attr = await self.getattr(relpath)
        if not attr.is_dir:
            raise NotADirectory(self._display(relpath))
        return await self.listing(relpath)

    # -- contents -----------------------------------------------------------
    async def open(self, relpath: bytes) -> FileVersion:
        """The file version a reader opens (which starts the sibling prefetch)."""
        version = await self.version(relpath)
        if self.policy.prefetch_max_size:
            self._prefetch_siblings(relpath)
        return version

    async def version(self, relpath: bytes) -> FileVersion:
        """The file version, for looking at it only: nothing is fetched."""
        return self._version(relpath, await self.getattr(relpath))

    def file_version(self, relpath: bytes, attr: Attr) -> FileVersion:
        """The version of the file at `relpath` whose attributes are `attr`."""
        return self._version(relpath, attr)

    def _version(self, relpath: bytes, attr: Attr) -> FileVersion:
        key = self.store.file_key(relpath, attr, self.fetcher.blocks.block_size)
        listed_in = self._known(parent_and_name(relpath)[0])
        if listed_in is not None and not listed_in.verified:
            key = unverified_key(key)
        return FileVersion(self.store, relpath, attr.size, attr.identity, key)

    async def read(self, f: FileVersion, offset: int, size: int) -> bytes:
        try:
            return await self.fetcher.read(f, offset, size)
        except StoreFileChanged:
            await self._relist_changed(f)
            raise  # this version is gone; a reopen gets the one just listed

    async def _relist_changed(self, f: FileVersion) -> None:
        """The store holds another version of `f` than its directory's listing
        says (a payload directory listed while a release was still being
        copied): list it again, once however many readers found out."""
        parent, name = parent_and_name(f.relpath)
        known = self._known(parent)
        listed = known.get(name) if known is not None else None
        if known is not None and (listed is None or listed.identity != f.identity):
            return  # relisted already; this reader holds an older version
        try:
            await self._relist(parent)
        except StoreUnavailable as e:
            log.info("cannot relist %s: %s", self._display(parent), e)

    async def cached_bytes(self, f: FileVersion) -> int:
        return await self.fetcher.call_local(self.fetcher.cached_bytes, f)
