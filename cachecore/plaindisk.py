"""A diskcache Disk that stores only bytes, str and int and never unpickles.

diskcache pickles every other type by default and unpickles whatever it finds
(CVE-2025-69872). Our cache directory may be shared with containers or other
processes, so reading it must never be a way to run code in the daemon.
"""
from diskcache import Disk
from diskcache.core import MODE_PICKLE, UNKNOWN

from .errors import UnsafeValue

_PLAIN = (bytes, str, int)


class PlainDisk(Disk):
    def put(self, key):
        if type(key) not in _PLAIN:
            raise TypeError(f"index keys must be bytes, str or int, not {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise UnsafeValue("refusing a pickled key found in the index")
        return super().get(key, raw)

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) not in _PLAIN:
            raise TypeError(f"index values must be bytes, str or int, not {type(value).__name__}")
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            raise UnsafeValue("refusing a pickled value found in the index")
        return super().fetch(mode, filename, value, read)
