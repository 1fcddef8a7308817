"""The persistent metadata index: one record per visited store directory.

A directory is listed in the store once; the record then answers every lookup,
getattr, readdir and readlink in it (negative lookups included), across
remounts and across processes sharing the cache directory. diskcache gives a
process-safe SQLite index; PlainDisk keeps it free of pickles.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from urllib.parse import quote

import diskcache

from .model import Attr, OutdatedListing, decode_listing, display_path, encode_listing
from .plaindisk import PlainDisk
from .trace import BadTrace, decode, encode, merge, record_key

log = logging.getLogger(__name__)
DB_NAME = "cache.db"  # diskcache's database file in a Cache directory
# Pins written as a bare list of keys (before pins named their holder) were
# all made by bake and seed, named "context:" + the context file's real path.
_LEGACY_CONTEXT_PIN = "context:"


def pin_record(file_keys, holder: tuple[str, tuple[int, ...]] | None = None, **rest) -> dict:
    """A pin's record in the ledger (MetadataIndex.pin_records says what the fields are)."""
    record: dict = {"keys": sorted(set(file_keys)), **rest}
    if holder is not None:
        record["holder"] = {"path": holder[0], "identity": list(holder[1])}
    return record


class MetadataIndex:
    """Blocking (SQLite); callers run it in worker threads. `directory` is
    a checked cache directory (cachedir.check_tree)."""

    def __init__(self, directory: str, *, create: bool = True):
        self._db = self._open(directory)
        # The ledger: small records that get enumerated (file versions with
        # blocks and when each was last used, pins, per-mount totals). Kept
        # apart from the listings so walking them does not walk every listing.
        ledger = os.path.join(directory, "ledger")
        try:
            self._ledger = self._open(ledger)
        except sqlite3.DatabaseError as e:
            if not create:
                raise
            self._ledger = self._open(self._set_aside(ledger, e))

    @staticmethod
    def _set_aside(ledger: str, error: Exception) -> str:
        """A damaged ledger holds bookkeeping only (when files were used, pins,
        totals), nothing the mount serves: keep it aside for a look, start afresh."""
        aside = f"{ledger}.damaged-{int(time.time())}"
        os.rename(ledger, aside)
        os.mkdir(ledger, 0o700)
        log.warning("the index's ledger %s is damaged (%s): moved to %s and started afresh "
                    "(usage times, pins and totals are lost; cached data is not)", ledger, error, aside)
        return ledger

    @staticmethod
    def _open(directory: str) -> diskcache.Cache:
        # eviction 'none': metadata is small and must never vanish behind our
        # back; the block cache is what gets evicted.
        return diskcache.Cache(directory, disk=PlainDisk, eviction_policy="none",
                               size_limit=2**62, statistics=False, timeout=60)

    def close(self) -> None:
        self._db.close()
        self._ledger.close()

    @staticmethod
    def _listing_key(store_id: str, relpath: bytes) -> bytes:
        return b"L\0" + os.fsencode(store_id) + b"\0" + relpath

    def get_listing(self, store_id: str, relpath: bytes) -> tuple[dict[bytes, Attr], float] | None:
        """(entries, fetched_at) or None. A damaged record reads as absent."""
        blob = self._db.get(self._listing_key(store_id, relpath))
        if blob is None:
            return None
        try:
            return decode_listing(blob)
        except OutdatedListing:
            return None
        except ValueError as e:
            log.warning("index record for %s is damaged (%s); relisting",
                        display_path(store_id, relpath), e)
            return None

    def put_listing(self, store_id: str, relpath: bytes, entries: dict[bytes, Attr],
                    fetched_at: float) -> None:
        self._db.set(self._listing_key(store_id, relpath), encode_listing(entries, fetched_at))

    def forget_tree(self, store_id: str, relpath: bytes) -> set[bytes]:
        """Delete the listing records of `relpath` and of every directory below
        it that the index knows (walked through the records themselves, so the
        cost is the tree's, not the index's). Returns the directories dropped."""
        dropped, stack = set(), [relpath]
        while stack:
            directory = stack.pop()
            found = self.get_listing(store_id, directory)
            if self._db.delete(self._listing_key(store_id, directory)):
                dropped.add(directory)
            prefix = directory + b"/" if directory else b""
            stack.extend(prefix + name for name, attr in (found[0] if found else {}).items()
                         if attr.is_dir)
        return dropped

    def get_root(self, store_id: str) -> tuple[Attr, float] | None:
        found = self.get_listing(store_id, b"\0root")
        if not found:
            return None
        entries, fetched_at = found
        return entries[b"."], fetched_at

    def put_root(self, store_id: str, attr: Attr, fetched_at: float) -> None:
        self.put_listing(store_id, b"\0root", {b".": attr}, fetched_at)

    def get_text(self, key: str) -> str | None:
        """Small JSON-ish records (recorded repositories, pins) under a plain key."""
        value = self._db.get(b"T\0" + key.encode())
        return value if isinstance(value, str) else None

    def set_text(self, key: str, value: str) -> None:
        self._db.set(b"T\0" + key.encode(), value)

    def get_object(self, name: str) -> bytes | None:
        """A published image's object kept here (catalogs): its encoded bytes,
        which the reader verifies against the name again."""
        value = self._db.get(b"O\0" + name.encode())
        return value if isinstance(value, bytes) else None

    def put_object(self, name: str, blob: bytes) -> None:
        self._db.set(b"O\0" + name.encode(), blob)

    def set_record(self, kind: str, name: str, text: str) -> None:
        self._ledger.set(f"{kind}:{name}", text)

    def records(self, kind: str) -> dict[str, str]:
        prefix = kind + ":"
        return {key[len(prefix):]: value for key in self._ledger.iterkeys()
                if key.startswith(prefix) and (value := self._ledger.get(key)) is not None}

    def put_trace(self, store_id: str, trace) -> None:
        """Keep a variant's trace (cachecore/trace.py) for the store: merged
        into the one kept, if any."""
        known = self.get_trace(store_id, trace.root)
        self.set_record("t", record_key(store_id, trace.root),
                        encode([merge(known, trace) if known else trace]).decode())

    def get_trace(self, store_id: str, root: bytes):
        text = self._ledger.get("t:" + record_key(store_id, root))
        if not isinstance(text, str):
            return None
        try:
            return decode(text.encode())[0]
        except (BadTrace, IndexError) as e:
            log.warning("ignoring the damaged trace of %s in the index: %s",
                        os.fsdecode(root), e)
            return None

    def trace_roots(self, store_id: str) -> set[bytes]:
        return {root for store, root in self.traced() if store == store_id}

    def traced(self) -> set[tuple[str, bytes]]:
        """(store, variant root) of every trace kept."""
        found = set()
        for key in self._ledger.iterkeys():
            if key.startswith("t:"):
                try:
                    store, root = json.loads(key[2:])
                except (ValueError, TypeError):
                    continue
                if isinstance(store, str) and isinstance(root, str):
                    found.add((store, os.fsencode(root)))
        return found

    def pin(self, name: str, file_keys: list[str],
            holder: tuple[str, tuple[int, ...]] | None = None) -> None:
        """Blocks of these file versions are never evicted while the pin exists.

        *holder* is the file the pin is for (a baked context), by path and
        identity (clean.holder_identity): the pin lasts only while that file
        does (clean.release_orphaned_pins)."""
        self.set_record("p", name, json.dumps(pin_record(file_keys, holder)))

    def unpin(self, name: str) -> None:
        self._ledger.delete("p:" + name)

    def pins(self) -> dict[str, set[str]]:
        """Pin name -> the file keys it names itself (clean.PinnedFiles adds
        those below its paths)."""
        return {name: set(record["keys"]) for name, record in self.pin_records().items()}

    def pin_holders(self) -> dict[str, tuple[str, tuple[int, ...] | None]]:
        """Pin name -> (path, identity) of the file it is for; identity None
        when only the path is known (a pin written before holders were)."""
        holders = {}
        for name, record in self.pin_records().items():
            if "holder" in record:
                holder = record["holder"]
                holders[name] = (holder["path"],
                                 None if holder["identity"] is None else tuple(holder["identity"]))
        return holders

    def pin_records(self) -> dict[str, dict]:
        """Pin name -> its record: "keys" (file keys), and where present
        "holder" (the file it lasts with), "paths" ([store, path] whose
        listed files it keeps, clean.PinnedFiles), "pin", "kind" and "from"
        (what `rez-lazyfs pin` was given, and by which list files or the
        command line: mount/pins.py)."""
        records = {}
        for name, text in self.records("p").items():
            record = json.loads(text)
            if isinstance(record, list):  # before pins named their holder: its list of keys
                record = {"keys": record}
                if name.startswith(_LEGACY_CONTEXT_PIN):
                    record["holder"] = {"path": name[len(_LEGACY_CONTEXT_PIN):], "identity": None}
            records[name] = record
        return records

    def change_pins(self, change) -> None:
        """change(pin_records()) -> {name: new record, or None to unpin},
        read and written in one transaction: two commands changing pins at
        once cannot lose each other's changes."""
        with self._ledger.transact():
            for name, record in change(self.pin_records()).items():
                if record is None:
                    self.unpin(name)
                else:
                    self.set_record("p", name, json.dumps(record, sort_keys=True))

    def record_uses(self, uses: list[tuple[str, dict, int]]) -> None:
        """(file key, file info, when used) for file versions read: one transaction."""
        with self._ledger.transact():
            for key, info, when in uses:
                self._ledger.add("f:" + key, json.dumps(info))
                self._ledger.set("u:" + key, int(when))

    def file_records(self):
        """Yields (file key, info, last used) for every file version with blocks."""
        for key in self._ledger.iterkeys():
            if key.startswith("f:"):
                info = self._ledger.get(key)
                if info is not None:
                    yield key[2:], json.loads(info), self._ledger.get("u:" + key[2:], 0)

    def forget_file(self, key: str) -> None:
        self._ledger.delete("f:" + key)
        self._ledger.delete("u:" + key)

    def knows_store(self, store_id: str) -> bool:
        return self._db.get(self._listing_key(store_id, b"\0root")) is not None


class ReadOnlyDiskcache:
    """The read side of a diskcache.Cache directory that cannot be written.

    diskcache itself cannot open one: it writes its settings and switches the
    database to WAL on every open. Values go through PlainDisk, so a pickle is
    refused here exactly as in the daemon's own index.
    """

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, DB_NAME))

    def __init__(self, directory: str):
        self._disk = PlainDisk(directory)
        self._path = os.path.join(directory, DB_NAME)
        self._warned = False

    def _connect(self) -> sqlite3.Connection:
        # While a writer (the host's daemon) has it open, the database is in
        # WAL mode and SQLite reads it read-only through the existing WAL
        # files. With no writer they are gone, cannot be created on a
        # read-only mount, and not needed: the main file is then complete.
        how = "mode=ro" if os.path.exists(self._path + "-wal") else "immutable=1"
        return sqlite3.connect(f"file:{quote(self._path)}?{how}", uri=True, timeout=10)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        if not os.path.exists(self._path):
            return []  # a cache older than this part of the index
        # One connection per query: queries come from several worker threads,
        # and only a fresh one picks the right mode if the writer came or went.
        try:
            with contextlib.closing(self._connect()) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            if not self._warned:
                log.warning("shared cache index %s is unreadable (%s); using the other layers",
                            self._path, e)
                self._warned = True
            return []

    def get(self, key, default=None):
        db_key, raw = self._disk.put(key)
        rows = self._query("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = ? "
                           "AND (expire_time IS NULL OR expire_time > ?)", (db_key, raw, time.time()))
        if not rows:
            return default
        try:
            return self._disk.fetch(*rows[0], False)
        except OSError:  # a large value's file, replaced by its writer meanwhile
            return default

    def iterkeys(self):
        for db_key, raw in self._query("SELECT key, raw FROM Cache ORDER BY rowid"):
            yield self._disk.get(db_key, raw)

    def close(self) -> None:
        pass
