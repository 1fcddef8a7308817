"""The persistent metadata index: one record per visited store directory.

A directory is listed in the store once; the record then answers every lookup,
getattr, readdir and readlink in it (negative lookups included), across
remounts and across processes sharing the cache directory. diskcache gives a
process-safe SQLite index; PlainDisk keeps it free of pickles.
"""
from __future__ import annotations

import json
import logging
import os

import diskcache

from .model import Attr, OutdatedListing, decode_listing, display_path, encode_listing
from .plaindisk import PlainDisk

log = logging.getLogger(__name__)


class MetadataIndex:
    """Blocking (SQLite); callers run it in worker threads."""

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # eviction 'none': metadata is small and must never vanish behind our
        # back; the block cache is what gets evicted.
        self._db = self._open(directory)
        # The ledger: small records that get enumerated (file versions with
        # blocks and when each was last used, pins, per-mount totals). Kept
        # apart from the listings so walking them does not walk every listing.
        self._ledger = self._open(os.path.join(directory, "ledger"))

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

    def set_record(self, kind: str, name: str, text: str) -> None:
        self._ledger.set(f"{kind}:{name}", text)

    def records(self, kind: str) -> dict[str, str]:
        prefix = kind + ":"
        return {key[len(prefix):]: value for key in self._ledger.iterkeys()
                if key.startswith(prefix) and (value := self._ledger.get(key)) is not None}

    def pin(self, name: str, file_keys: list[str]) -> None:
        """Blocks of these file versions are never evicted while the pin exists."""
        self.set_record("p", name, json.dumps(sorted(set(file_keys))))

    def pins(self) -> dict[str, set[str]]:
        return {name: set(json.loads(text)) for name, text in self.records("p").items()}

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
