"""An independent witness of store reads, based on inotify.

The daemon's stats say what the daemon *thinks* it did; the kernel's
IN_ACCESS events on the store file say what it actually did. The kernel
queues IN_ACCESS inside the daemon's read(2)/pread(2) of the store file,
i.e. before the daemon can answer the FUSE read that caused it, so once a
read through the mount has returned, its store reads are already countable:
no sleeping needed.

Two limits, both on the safe side for "was the store read at all?":
* identical consecutive unread events are merged by the kernel, so the count
  is a lower bound on the number of read calls ("> 0" and "== 0" are exact);
* reads through mmap(2) of the store file raise no IN_ACCESS at all; tests
  therefore also assert the witness saw the *first* read, which proves the
  daemon reads the store in a way this witness can see.
"""

from __future__ import annotations

import os
from pathlib import Path

from inotify_simple import INotify, flags


class StoreReadWitness:
    """Counts IN_ACCESS events on one store file since the last take()."""

    def __init__(self, store_file: Path | bytes):
        self.path = store_file
        self._inotify = INotify()
        try:
            self._inotify.add_watch(os.fsencode(store_file), flags.ACCESS | flags.Q_OVERFLOW)
        except BaseException:
            self._inotify.close()
            raise

    def take(self) -> int:
        """Number of store reads (IN_ACCESS events) queued since the previous
        call; never blocks."""
        events = list(self._inotify.read(timeout=0))
        if any(e.mask & flags.Q_OVERFLOW for e in events):
            raise AssertionError("inotify queue overflowed: read count unknown")
        return sum(1 for e in events if e.mask & flags.ACCESS)

    def close(self) -> None:
        self._inotify.close()

    def __enter__(self) -> StoreReadWitness:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
