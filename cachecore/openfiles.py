"""File descriptors kept open across reads, shared by worker threads.

Used for store files (a scattered read of a big file would otherwise open it
for every block, a network round trip each) and for block-cache files (a
sequence of reads through one descriptor gets the kernel's read-ahead on the
cache disk; a fresh descriptor per read gets none).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict


class OpenFiles:
    """At most `max_idle` unused descriptors stay open, each for at most
    `idle_seconds`. A descriptor is closed only when no thread is using it,
    so no thread ever reads through an fd number closed and reused for
    another file.
    """

    def __init__(self, max_idle: int, idle_seconds: float, max_age: float | None = None):
        """max_age: a descriptor opened longer ago than this is not handed out
        again (the next acquire opens afresh), however busy it is."""
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.max_age = max_age
        self._lock = threading.Lock()
        self._open: dict = {}                        # key -> [fd, users, opened at]
        self._idle: OrderedDict = OrderedDict()      # key -> idle since
        self._detached: dict[int, int] = {}          # fd forgotten while in use -> users

    def acquire(self, key, opener) -> int:
        """An open fd for `key`, from `opener()` if none is open. Pair with release()."""
        if self.max_age is not None:
            with self._lock:
                entry = self._open.get(key)
                too_old = entry is not None and time.monotonic() - entry[2] > self.max_age
            if too_old:
                self.forget(key)
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                entry[1] += 1
                self._idle.pop(key, None)
                return entry[0]
        fd = opener()  # outside the lock: it may be a slow network call
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:  # another thread opened it meanwhile
                entry[1] += 1
                self._idle.pop(key, None)
                os.close(fd)
                return entry[0]
            self._open[key] = [fd, 1, time.monotonic()]
            return fd

    def release(self, key, fd: int, keep: bool = True) -> None:
        """Done with `fd` (from acquire); `keep=False` closes it once unused.
        Closes the files idle for too long too (close_idle)."""
        to_close = []
        with self._lock:
            now = time.monotonic()
            entry = self._open.get(key)
            if entry is None or entry[0] != fd:  # forgotten while we used it
                self._detached[fd] -= 1
                if not self._detached[fd]:
                    del self._detached[fd]
                    to_close.append(fd)
            else:
                entry[1] -= 1
                if entry[1] == 0:
                    if keep:
                        self._idle[key] = now
                    else:
                        del self._open[key]
                        to_close.append(fd)
            to_close += self._take_idle(now, self.idle_seconds)
        for fd in to_close:
            os.close(fd)

    def forget(self, key) -> None:
        """The next acquire(key) opens afresh (the file was replaced); an fd
        still in use is closed when its last user releases it."""
        with self._lock:
            entry = self._open.pop(key, None)
            if entry is None:
                return
            if key in self._idle:
                del self._idle[key]
                fd = entry[0]
            else:
                self._detached[entry[0]] = self._detached.get(entry[0], 0) + entry[1]
                return
        os.close(fd)

    def close_idle(self, max_age: float | None = None) -> None:
        """Close files idle for longer than max_age (default idle_seconds),
        and the oldest beyond max_idle."""
        with self._lock:
            to_close = self._take_idle(time.monotonic(),
                                       self.idle_seconds if max_age is None else max_age)
        for fd in to_close:
            os.close(fd)

    def _take_idle(self, now: float, max_age: float) -> list[int]:
        """(Under the lock) the descriptors close_idle closes, no longer kept."""
        taken = []
        while self._idle:
            oldest, since = next(iter(self._idle.items()))
            if len(self._idle) <= self.max_idle and now - since < max_age:
                break
            del self._idle[oldest]
            taken.append(self._open.pop(oldest)[0])
        return taken
