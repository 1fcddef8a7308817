"""What the index knows of a store entry, and the compact binary form it is kept in."""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one store entry, as lstat() saw them."""

    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    nlink: int
    uid: int
    gid: int
    target: bytes = b""  # symlink target, verbatim; empty for anything else

    @classmethod
    def from_stat(cls, st, target: bytes = b"") -> Attr:
        return cls(st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   st.st_atime_ns, st.st_nlink, st.st_uid, st.st_gid, target)

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
    def identity(self) -> tuple[int, int]:
        """What makes two versions of a file different (DESIGN: Identity)."""
        return self.size, self.mtime_ns


# mode, size, mtime, ctime, atime, nlink, uid, gid, name length, target length
_ENTRY = struct.Struct("<IQqqqIIIHI")
_HEADER = struct.Struct("<4sdI")  # magic, fetched_at (unix time), entry count
_MAGIC = b"RLL1"


def encode_listing(entries: dict[bytes, Attr], fetched_at: float) -> bytes:
    parts = [_HEADER.pack(_MAGIC, fetched_at, len(entries))]
    for name, a in entries.items():
        parts.append(_ENTRY.pack(a.mode, a.size, a.mtime_ns, a.ctime_ns, a.atime_ns,
                                 a.nlink, a.uid, a.gid, len(name), len(a.target)))
        parts.append(name)
        parts.append(a.target)
    return b"".join(parts)


def decode_listing(blob: bytes) -> tuple[dict[bytes, Attr], float]:
    """Inverse of encode_listing. Raises ValueError on anything malformed."""
    try:
        magic, fetched_at, count = _HEADER.unpack_from(blob, 0)
        if magic != _MAGIC:
            raise ValueError("not a listing record")
        pos = _HEADER.size
        entries = {}
        for _ in range(count):
            *fields, name_len, target_len = _ENTRY.unpack_from(blob, pos)
            pos += _ENTRY.size
            name = blob[pos:pos + name_len]
            target = blob[pos + name_len:pos + name_len + target_len]
            pos += name_len + target_len
            entries[name] = Attr(*fields, target=target)
    except struct.error as e:
        raise ValueError(f"truncated listing record: {e}") from None
    if pos != len(blob):
        raise ValueError("trailing bytes after listing record")
    return entries, fetched_at
