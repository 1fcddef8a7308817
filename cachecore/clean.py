"""What the block cache holds, and evicting from it.

The unit of eviction is one file version (all its blocks): last-used times are
kept per file, and a DCC that used a file will want all of it again. Pinned
file versions (definitions of baked contexts) are never evicted.

Eviction only unlinks cache files. A reader that already opened one still
reads whole blocks from it; one that looks next finds it missing and fetches
again, so cleaning while mounts are reading never serves wrong bytes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import filelock

from .blocks import BlockCache
from .index import MetadataIndex

log = logging.getLogger(__name__)


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


def scan_cache(blocks: BlockCache, index: MetadataIndex) -> dict[str, CachedFile]:
    """Every file version with blocks on disk, by key.

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
    pinned = set().union(*index.pins().values())
    for key in pinned & files.keys():
        files[key].pinned = True
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
    per cache directory (a file lock); mounts keep reading meanwhile."""
    lock = filelock.FileLock(os.path.join(os.path.dirname(blocks.blocks_dir), "clean.lock"))
    with lock:
        files = scan_cache(blocks, index)
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
                           sum(f.bytes for f in files.values() if f.pinned), dry_run)
