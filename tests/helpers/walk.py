"""A byte-exact walk of a tree, used on the store and on the mount alike."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

KiB = 1024
MiB = 1024 * KiB

# Files larger than this are hashed over sampled ranges instead of in full.
# Why: the tricky tree has a >4 GiB sparse file; hashing it through the mount
# would push 4 GiB through FUSE (tens of seconds on 2 cores) and fill the
# block cache with 4 GiB of zeros, for no extra coverage. The samples cover
# both ends and the 2**31 / 2**32 boundaries, where 32-bit offset bugs show,
# and the size is compared exactly; the tree writes distinct data at each of
# those places, so a wrapped or shifted offset changes the sampled digest.
FULL_HASH_LIMIT = 64 * MiB
SAMPLE_RADIUS = 128 * KiB
SAMPLE_CENTRES = (0, 2**31, 2**32)


class Entry(NamedTuple):
    relpath: bytes  # relative to the walked root; b"." for the root itself
    type: str  # "dir", "file", "symlink" or "other"
    mode: int  # permission bits (stat.S_IMODE)
    size: int | None  # None for directories: their st_size is fs-specific
    target: bytes | None  # symlink target, verbatim
    sha256: str | None  # of the content; "sampled:<hex>" for big files


def sha256_file(path: Path | bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """Merged (start, end) ranges around each of SAMPLE_CENTRES and EOF."""
    raw = sorted(
        (max(0, c - SAMPLE_RADIUS), min(size, c + SAMPLE_RADIUS))
        for c in (*SAMPLE_CENTRES, size)
        if c <= size
    )
    merged: list[tuple[int, int]] = []
    for start, end in raw:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def sampled_sha256(path: Path | bytes, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for start, end in sample_ranges(size):
            digest.update(b"%d:%d:" % (start, end))
            data = os.pread(f.fileno(), end - start, start)
            if len(data) != end - start:
                raise AssertionError(f"short read of {path!r} at {start}: {len(data)} of {end - start} bytes")
            digest.update(data)
    return "sampled:" + digest.hexdigest()


def _entry(path: bytes, relpath: bytes) -> Entry:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Entry(relpath, "dir", mode, None, None, None)
    if stat.S_ISLNK(st.st_mode):
        return Entry(relpath, "symlink", mode, st.st_size, os.readlink(path), None)
    if stat.S_ISREG(st.st_mode):
        if st.st_size > FULL_HASH_LIMIT:
            digest = sampled_sha256(path, st.st_size)
        else:
            digest = sha256_file(path)
        return Entry(relpath, "file", mode, st.st_size, None, digest)
    return Entry(relpath, "other", mode, st.st_size, None, None)


def walk(root: Path | bytes) -> list[Entry]:
    """Every entry below *root* (and root itself), sorted by relpath.

    Uses bytes paths throughout so names that are not valid UTF-8 survive
    untouched, never follows symlinks, and - unlike os.walk - never swallows
    an error: a directory the mount fails to list must fail the test.
    """
    broot = os.fsencode(root)
    entries = [_entry(broot, b".")]
    pending = [b""]
    while pending:
        reldir = pending.pop()
        with os.scandir(os.path.join(broot, reldir) if reldir else broot) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel = os.path.join(reldir, name) if reldir else name
            entry = _entry(os.path.join(broot, rel), rel)
            entries.append(entry)
            if entry.type == "dir":
                pending.append(rel)
    entries.sort()
    return entries


class StoreSnapshot(NamedTuple):
    entry: Entry
    mtime_ns: int
    ctime_ns: int  # bumped by any chmod/chown/setxattr/rename, even a no-op one
    xattrs: tuple[tuple[str, bytes], ...]


def store_snapshot(root: Path | bytes) -> dict[bytes, StoreSnapshot]:
    """walk() plus timestamps and xattrs: proof that nothing at all changed in
    the store (only meaningful on the store side, not through the mount)."""
    broot = os.fsencode(root)
    snapshot = {}
    for entry in walk(broot):
        path = broot if entry.relpath == b"." else os.path.join(broot, entry.relpath)
        st = os.lstat(path)
        follow = entry.type != "symlink"
        names = sorted(os.listxattr(path, follow_symlinks=follow))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=follow)) for n in names)
        snapshot[entry.relpath] = StoreSnapshot(entry, st.st_mtime_ns, st.st_ctime_ns, xattrs)
    return snapshot


def describe_tree_differences(expected: list[Entry], actual: list[Entry], limit: int = 20) -> str:
    """A short, readable account of how two walks differ ('' if they don't).
    pytest's own diff of two 20,000-entry lists would be unreadable."""
    exp = {e.relpath: e for e in expected}
    act = {e.relpath: e for e in actual}
    lines = []
    for rel in sorted(exp.keys() - act.keys()):
        lines.append(f"missing from mount: {rel!r}")
    for rel in sorted(act.keys() - exp.keys()):
        lines.append(f"not in store:       {rel!r}")
    for rel in sorted(exp.keys() & act.keys()):
        if exp[rel] != act[rel]:
            show = lambda f, v: oct(v) if f == "mode" else repr(v)  # noqa: E731
            fields = [
                f"{f}: store={show(f, getattr(exp[rel], f))} mount={show(f, getattr(act[rel], f))}"
                for f in Entry._fields
                if getattr(exp[rel], f) != getattr(act[rel], f)
            ]
            lines.append(f"differs {rel!r}: " + "; ".join(fields))
    if not lines:
        return ""
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{len(lines)} differences:\n" + "\n".join(lines[:limit]) + more


def assert_same_tree(expected: list[Entry], actual: list[Entry]) -> None:
    differences = describe_tree_differences(expected, actual)
    assert not differences, differences
