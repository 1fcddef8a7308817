"""What the index knows of a store entry, and the compact binary form it is kept in."""
from __future__ import annotations

import math
import os
import stat
import struct
from typing import NamedTuple

from .paths import BadPath, check_name, is_bad_name


def display_path(root: str, relpath: bytes = b"") -> str:
    """A store path for messages and logs, on one line whatever its name holds:
    control characters are escaped and undecodable bytes shown as \\xNN, so a
    file named "x\\nERROR ..." cannot forge a log line."""
    text = os.path.join(root, os.fsdecode(relpath)) if relpath else root
    return "".join(c if c.isprintable() and not 0xDC80 <= ord(c) <= 0xDCFF else _escaped(c)
                   for c in text)


def _escaped(c: str) -> str:
    if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape").decode("ascii")


class Attr(NamedTuple):
    """The attributes of one store entry, as lstat() saw them. A named tuple,
    not a frozen dataclass: a warm walk decodes every listing it meets from
    the index, and one is made per entry (0.3 against 1.2 us)."""

    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    nlink: int
    uid: int
    gid: int
    target: bytes = b""  # symlink target, verbatim; empty for anything else
    ino: int = 0  # the store's inode number: part of a file's identity
    # A published file's content id (cachecore/image/catalog.py: 32 bytes
    # naming its chunks); empty for files of a filesystem store.
    content: bytes = b""

    @classmethod
    def from_stat(cls, st, target: bytes = b"") -> Attr:
        return cls(st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   st.st_atime_ns, st.st_nlink, st.st_uid, st.st_gid, target, st.st_ino)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """What makes two versions of a file different (DESIGN: Identity).

        Size and mtime alone can be restored after an in-place rewrite
        (`touch -d`); the change time and the inode number cannot, so a file
        rewritten in place or replaced by another never passes for the old one.
        A published file's content id is part of it too."""
        base = (self.size, self.mtime_ns, self.ctime_ns, self.ino)
        return base + (int.from_bytes(self.content, "big"),) if self.content else base


def identity_of_stat(st) -> tuple[int, int, int, int]:
    """Attr.identity of what fstat/lstat returned."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


# mode, size, mtime, ctime, atime, nlink, uid, gid, ino, name length, target length,
# content id length (0 or CONTENT_ID_SIZE)
_ENTRY = struct.Struct("<IQqqqIIIQHIB")
CONTENT_ID_SIZE = 32
_HEADER = struct.Struct("<4sdI")  # magic, fetched_at (unix time), entry count
_MAGIC = b"RLL2"
_OLDER_MAGICS = (b"RLL1",)
ROOT_NAME = b"."  # the one entry of a record that holds a repository root's attributes  # written by earlier releases (no inode number): relisted


def encode_listing(entries: dict[bytes, Attr], fetched_at: float) -> bytes:
    parts = [_HEADER.pack(_MAGIC, fetched_at, len(entries))]
    for name, a in entries.items():
        parts.append(_ENTRY.pack(a.mode, a.size, a.mtime_ns, a.ctime_ns, a.atime_ns,
                                 a.nlink, a.uid, a.gid, a.ino, len(name), len(a.target),
                                 len(a.content)))
        parts.append(name)
        parts.append(a.target)
        parts.append(a.content)
    return b"".join(parts)


class OutdatedListing(ValueError):
    """A record in the format of an earlier release: not damaged, just relisted."""


def decode_listing(blob: bytes) -> tuple[dict[bytes, Attr], float]:
    """Inverse of encode_listing. Raises ValueError on anything malformed,
    names that no directory can hold included (cachecore/paths.py)."""
    if not isinstance(blob, bytes):
        raise ValueError(f"a listing record must be bytes, not {type(blob).__name__}")
    try:
        magic, fetched_at, count = _HEADER.unpack_from(blob, 0)
        if magic in _OLDER_MAGICS:
            raise OutdatedListing("a listing record of an earlier release")
        if magic != _MAGIC:
            raise ValueError("not a listing record")
        if not math.isfinite(fetched_at):
            raise ValueError("listing record with a non-finite time")
        pos = _HEADER.size
        end_of_blob = len(blob)
        unpack, entry_size, make = _ENTRY.unpack_from, _ENTRY.size, Attr._make
        a_root_record = count == 1
        entries = {}
        for _ in range(count):
            (mode, size, mtime_ns, ctime_ns, atime_ns, nlink, uid, gid, ino,
             name_len, target_len, content_len) = unpack(blob, pos)
            pos += entry_size
            end = pos + name_len + target_len + content_len
            if end > end_of_blob:
                raise ValueError("truncated listing record")
            name = blob[pos:pos + name_len]
            pos += name_len
            target = blob[pos:pos + target_len] if target_len else b""
            pos += target_len
            if content_len:
                if content_len != CONTENT_ID_SIZE:
                    raise ValueError(f"listing record with a content id of {content_len} bytes")
                content = blob[pos:end]
            else:
                content = b""
            pos = end
            # a root record (index.put_root) holds one entry, "."
            if is_bad_name(name) and not (name == ROOT_NAME and a_root_record):
                try:
                    check_name(name)
                except BadPath as e:
                    raise ValueError(f"listing record with an impossible name: {e}") from None
            if name in entries:
                raise ValueError("listing record names an entry twice")
            entries[name] = make((mode, size, mtime_ns, ctime_ns, atime_ns, nlink, uid, gid,
                                  target, ino, content))
    except struct.error as e:
        raise ValueError(f"truncated listing record: {e}") from None
    if pos != len(blob):
        raise ValueError("trailing bytes after listing record")
    return entries, fetched_at
