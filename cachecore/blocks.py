"""The local block cache: one file per block of one exact file version.

A block file is the block's bytes followed by their CRC32. It is written under
a temporary name and renamed into place, so its presence is the "present"
mark and a reader in any process sees a whole block or none (write, then mark
present). The CRC catches blocks damaged on disk or lost in a machine crash
(we do not fsync each block); a block that fails it is deleted and refetched.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib

log = logging.getLogger(__name__)
_CRC = struct.Struct("<I")


def file_key(store_id: str, relpath: bytes, identity: tuple[int, int], block_size: int) -> str:
    """Names the blocks of one version of one store file (DESIGN: Identity).

    The block size is part of it: block i of a 64K cache and of a 128K cache
    cover different bytes, and a cache reused with another size must miss,
    never serve one for the other."""
    h = hashlib.sha256()
    h.update(os.fsencode(store_id) + b"\0" + relpath + b"\0")
    h.update(b"%d\0%d\0%d" % (*identity, block_size))
    return h.hexdigest()


class BlockCache:
    """Blocking (local disk); callers run it in worker threads."""

    def __init__(self, directory: str, block_size: int):
        self.block_size = block_size
        self.blocks_dir = os.path.join(directory, "blocks")
        self._tmp = os.path.join(directory, "tmp")
        for d in (directory, self.blocks_dir, self._tmp):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def path(self, key: str, index: int) -> str:
        return os.path.join(self.blocks_dir, key[:2], f"{key}-{index:x}")

    def read(self, key: str, index: int, length: int) -> bytes | None:
        """The block if present and intact, else None."""
        path = self.path(key, index)
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read(length + _CRC.size + 1)
        except FileNotFoundError:
            return None
        if len(raw) == length + _CRC.size:
            data = raw[:length]
            if zlib.crc32(data) == _CRC.unpack_from(raw, length)[0]:
                return data
        log.warning("cached block %s is damaged (%d bytes, expected %d); refetching",
                    path, len(raw), length + _CRC.size)
        self.discard(key, index)
        return None

    def write(self, key: str, index: int, data: bytes) -> None:
        path = self.path(key, index)
        tmp = os.path.join(self._tmp, f"{key}-{index:x}.{os.getpid()}.{id(data):x}")
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(data)
                f.write(_CRC.pack(zlib.crc32(data)))
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def discard(self, key: str, index: int) -> None:
        try:
            os.unlink(self.path(key, index))
        except FileNotFoundError:
            pass
