"""What the block cache holds, and evicting from it.

The unit of eviction is one file version (all its blocks): last-used times are
kept per file, and a DCC that used a file will want all of it again. Pinned
file versions are never evicted. A pin names file keys (the definitions of a
baked context), paths in stores (`rez-lazyfs pin` of a package version or a
context: every file listed at or below them, when the clean runs, so blocks
fetched after pinning are kept too), or both (PinnedFiles). A pin for a file
lasts only while that file does: one whose context file is gone, or is
another file now, is released (release_orphaned_pins) before each clean.

Eviction only unlinks cache files. A reader that already opened one still
reads whole blocks from it; one that looks next finds it missing and fetches
again, so cleaning while mounts are reading never serves wrong bytes.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import filelock

from .blocks import BlockCache, unverified_key
from .index import MetadataIndex
from .stores import block_key

log = logging.getLogger(__name__)
# Seconds the files holding pins get, all together, to answer a stat: a
# context file may live on a hung NFS, and clean (or status) must still finish.
HOLDER_TIMEOUT = 5.0
HOLDER_THREADS = 16


@dataclass
class CachedFile:
    key: str
    path: str
    bytes: int = 0                                     # allocated on disk
    last_used: float = 0.0
    info: dict | None = None                          # store, path, size, ... if recorded
    pinned: bool = False


@dataclass
class CleanReport:
    size_before: int
    size_after: int
    evicted_files: int
    evicted_bytes: int
    pinned_bytes: int
    dry_run: bool
    released_pins: int = 0    # pins whose context file is gone or replaced
    unanswered_pins: int = 0  # kept: their context file did not answer in time
    pins: int = 0             # pins held, whose files were kept


@dataclass
class HeldPins:
    released: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)


def holder_identity(st) -> tuple[int, int, int]:
    """What makes a pin's holder the same file: size, mtime and inode.

    Not the change time, nor the device: a chmod of a context does not make
    it another context, and an NFS device number can change across
    remounts; releasing such a pin would cost an offline context its
    definitions. A rewrite (bake writes a new file and renames it) changes
    the inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def release_orphaned_pins(index: MetadataIndex, *, dry_run: bool = False,
                          timeout: float = HOLDER_TIMEOUT) -> HeldPins:
    """Release every pin whose holder file is gone or is another file now.

    A holder that does not answer within *timeout* (all together), or answers
    with an error other than "no such file", keeps its pin: a cache may miss,
    so a pin released wrongly costs a refetch, but an offline context
    depends on it."""
    holders = index.pin_holders()
    answers = _stat_within({path for path, _ in holders.values()}, timeout)
    held = HeldPins()
    for name, (path, identity) in sorted(holders.items()):
        if path not in answers:
            held.unanswered.append(name)
        elif answers[path] is _GONE or (identity is not None and answers[path] is not _UNKNOWN
                                        and answers[path] != identity):
            held.released.append(name)
    if not dry_run:
        for name in held.released:
            index.unpin(name)
    if held.released:
        log.info("%s %d pin(s) whose context file is gone or replaced",
                 "would release" if dry_run else "released", len(held.released))
    if held.unanswered:
        log.info("kept %d pin(s) whose context file did not answer within %gs",
                 len(held.unanswered), timeout)
    return held


_GONE, _UNKNOWN = object(), object()
# Holder paths whose stat has not returned, in this process: a path stuck on a
# hung NFS is not asked again until it answers, so a mount that cleans every
# few seconds leaves one thread behind per hung path, not one per clean.
_asking: set[str] = set()
_asking_lock = threading.Lock()


def _stat_within(paths: set[str], timeout: float) -> dict:
    """path -> holder_identity, _GONE or _UNKNOWN, for the paths that answered
    within *timeout*. Daemon threads: one stuck in a hung NFS call cannot be
    interrupted and is left behind; the others carry on with the rest."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    with _asking_lock:
        for path in paths - _asking:
            todo.put(path)
    answers: dict = {}
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                path = todo.get_nowait()
            except queue.Empty:
                return
            with _asking_lock:
                if path in _asking:
                    continue
                _asking.add(path)
            try:
                answer = holder_identity(os.stat(path))
            except (FileNotFoundError, NotADirectoryError):
                answer = _GONE
            except OSError:
                answer = _UNKNOWN
            with _asking_lock:
                _asking.discard(path)
                answers[path] = answer

    threads = [threading.Thread(target=worker, daemon=True, name="pin-holder-stat")
               for _ in range(min(HOLDER_THREADS, todo.qsize()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with _asking_lock:
        return dict(answers)


@dataclass
class PinnedFiles:
    """What the pins keep, as of now."""

    by_key: dict[str, set[str]]                # file key -> names of the pins keeping it
    by_path: dict[tuple[str, str], set[str]]   # (store, path) -> names of the pins at it
    names: set[str]                            # every pin held

    def pins_of(self, f: CachedFile) -> set[str]:
        """The pins keeping *f*: by its key, or by the store path its use
        was recorded under (a file whose listing the index lost meanwhile,
        a `forget`, is kept all the same)."""
        names = set(self.by_key.get(f.key, ()))
        if f.info is not None and self.by_path:
            parts = f.info["path"].split("/")
            for depth in range(1, len(parts) + 1):
                names |= self.by_path.get((f.info["store"], "/".join(parts[:depth])), set())
        return names


def pinned_files(index: MetadataIndex, block_size: int,
                 released: frozenset[str] = frozenset()) -> PinnedFiles:
    """What the pins (but those named in *released*) keep: their own keys,
    and the key of every file the index lists at or below their paths, with
    the key its blocks have when seeded unconfirmed (blocks.unverified_key)."""
    pinned = PinnedFiles({}, {}, set())
    listed: dict[tuple[str, str], set[str]] = {}
    for name, record in index.pin_records().items():
        if name in released:
            continue
        pinned.names.add(name)
        keys = set(record["keys"])
        for store, path in record.get("paths", ()):
            if (store, path) not in listed:
                listed[(store, path)] = _listed_keys(index, store, os.fsencode(path), block_size)
            keys |= listed[(store, path)]
            pinned.by_path.setdefault((store, path), set()).add(name)
        for key in keys:
            pinned.by_key.setdefault(key, set()).add(name)
    return pinned


def _listed_keys(index: MetadataIndex, store: str, relpath: bytes, block_size: int) -> set[str]:
    """Keys of the files the index lists at *relpath* (a directory tree, or a
    file) in *store*. Walked with a stack: a tree may be deeper than Python's stack."""
    keys: set[str] = set()
    pending = [relpath] if index.get_listing(store, relpath) is not None else []
    if not pending:  # a file, if its directory's listing names one
        parent, _, name = relpath.rpartition(b"/")
        found = index.get_listing(store, parent)
        attr = found[0].get(name) if found else None
        if attr is not None and attr.is_file:
            keys.update(_keys_of(store, relpath, attr, block_size))
    while pending:
        directory = pending.pop()
        listing = index.get_listing(store, directory)
        for name, attr in (listing[0] if listing else {}).items():
            path = directory + b"/" + name
            if attr.is_dir:
                pending.append(path)
            elif attr.is_file:
                keys.update(_keys_of(store, path, attr, block_size))
    return keys


def _keys_of(store: str, relpath: bytes, attr, block_size: int) -> tuple[str, str]:
    """A file version's block keys: from the store, and seeded unconfirmed."""
    key = block_key(store, relpath, attr.identity, block_size)
    return key, unverified_key(key)


def scan_cache(blocks: BlockCache, index: MetadataIndex,
               released: frozenset[str] = frozenset(),
               pins: PinnedFiles | None = None) -> dict[str, CachedFile]:
    """Every file version with blocks on disk, by key, marked pinned by
    *pins* (else by what the pins keep now, but those named in *released*:
    a dry run's).

    Last used is the later of the recorded use and the cache file's mtime
    (its last block written), so files nobody recorded (a daemon killed
    before it flushed, a seed) are still aged sensibly.
    """
    files: dict[str, CachedFile] = {}
    for shard in _scandir(blocks.blocks_dir):
        if not shard.is_dir(follow_symlinks=False):
            continue
        for entry in _scandir(shard.path):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted meanwhile by another process
            files[entry.name] = CachedFile(entry.name, entry.path, st.st_blocks * 512,
                                           st.st_mtime)
    for key, info, last_used in index.file_records():
        if key in files:
            files[key].info = info
            files[key].last_used = max(files[key].last_used, last_used)
    if pins is None:
        pins = pinned_files(index, blocks.block_size, released)
    for f in files.values():
        f.pinned = bool(pins.pins_of(f))
    return files


def _scandir(path: str):
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []


def clean_cache(blocks: BlockCache, index: MetadataIndex, *, max_size: int | None = None,
                max_days: float | None = None, dry_run: bool = False,
                progress=lambda n: None, now: float | None = None) -> CleanReport:
    """Evict least recently used file versions until the cache is at or under
    max_size bytes, and every one not used for max_days. One clean at a time
    per cache directory (a file lock); mounts keep reading meanwhile. Pins
    whose context file is gone or replaced are released first."""
    lock = filelock.FileLock(os.path.join(os.path.dirname(blocks.blocks_dir), "clean.lock"))
    with lock:
        held = release_orphaned_pins(index, dry_run=dry_run)
        pins = pinned_files(index, blocks.block_size, frozenset(held.released))
        files = scan_cache(blocks, index, pins=pins)
        size = sum(f.bytes for f in files.values())
        now = time.time() if now is None else now
        candidates = sorted((f for f in files.values() if not f.pinned), key=lambda f: f.last_used)
        victims, remaining = [], size
        for f in candidates:
            too_old = max_days is not None and f.last_used < now - max_days * 86400
            too_big = max_size is not None and remaining > max_size
            if too_old or too_big:
                victims.append(f)
                remaining -= f.bytes
        if not dry_run:
            for f in victims:
                try:
                    os.unlink(f.path)
                except FileNotFoundError:
                    pass
                index.forget_file(f.key)
                progress(f.bytes)
        evicted = sum(f.bytes for f in victims)
        if victims and not dry_run:
            log.info("cleaned %d file version(s), %d bytes; cache now %d bytes",
                     len(victims), evicted, size - evicted)
        return CleanReport(size, size - evicted, len(victims), evicted,
                           sum(f.bytes for f in files.values() if f.pinned), dry_run,
                           len(held.released), len(held.unanswered), len(pins.names))
