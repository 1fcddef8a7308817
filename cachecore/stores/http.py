"""A store that is a published image (cachecore/image) read over HTTP,
through proxy caches, verified at every step.

Trust runs down one chain: the manifest verifies with the repository's
public key (and is refused if it expired or is older than a revision already
seen here), it names the root catalog by hash, catalogs name catalogs and
chunks by hash, and every object's bytes are checked against its name before
use. A mismatch is fetched again once past the proxies' caches
(`Cache-Control: no-cache`), then through another proxy, then reported (EIO,
a log line naming the file, the URL and the proxy): a wrong byte is never
served.

Catalogs are kept (verified bytes) in the metadata index, so a remount does
not fetch them again; chunks land in the block cache through the fetcher,
keyed by the file's content id, so a file shared by two versions or two
repositories is fetched once. The manifest is asked for again after its TTL,
which is how new revisions appear without a remount.

Launch traces the image carries (image/traces.py) come down the same chain:
the manifest names the traces index, the index names each variant's trace
object (`ImageTraces`) and its pack list (image/packs.py). Once a trace is
read, a chunk it names is fetched with the rest of its pack: the replay of a
launch is a few dozen requests, not one a chunk. Every member out of a pack
is checked against its own name; a pack that fails is given up on, and its
members are fetched alone.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from ..blocks import content_key
from ..errors import NotADirectory, NotFound, StoreFileChanged, StoreUnavailable
from ..image.catalog import Catalog, DamagedCatalog
from ..image.manifest import MANIFEST_PATH, BadManifest, Manifest, load_public_key
from ..image.objects import DamagedObject, decode_object, object_path
from ..image.packs import DamagedPackList, Pack, decode_pack_list
from ..image.traces import decode_pack_index, decode_trace_index, decode_trace_object
from ..model import CONTENT_ID_SIZE, Attr, display_path
from ..paths import split_path
from ..singleflight import ThreadSingleFlight
from ..trace import VariantTrace

log = logging.getLogger(__name__)
_CATALOGS_IN_MEMORY = 256
_CHUNKS_IN_MEMORY = 16  # decoded chunks kept for the neighbouring blocks of one chunk
# Members of fetched packs not asked for yet (a replay asks for each soon
# after its pack came, in trace order): at most this many bytes, the oldest
# let go (fetched alone if they are wanted after all).
_PACKED_BYTES = 64 * 2**20
_KNOWN_PACK_MEMBERS = 500_000  # chunks known to be in a pack not fetched yet


class HttpStore:
    """Blocking and thread-safe, like every store (stores/__init__.py)."""

    def __init__(self, url: str, public_key, downloader, index, *, offline: bool = False,
                 clock=time.time):
        self.root = self.id_of(url)
        self.offline = offline
        self._key = public_key
        self._download = downloader
        self._index = index  # catalogs and the highest revision seen are kept there
        self._clock = clock
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._manifest_until = 0.0
        self._catalogs: OrderedDict[str, Catalog] = OrderedDict()
        self._chunks: OrderedDict[str, bytes] = OrderedDict()
        # the last traces index read: (its name, {root: trace}, {root: pack list})
        self._trace_index: tuple[str, dict[bytes, str], dict[bytes, str]] = ("", {}, {})
        self._pack_of: dict[str, Pack] = {}  # chunk -> the pack to fetch it with
        self._packed: OrderedDict[str, bytes] = OrderedDict()  # fetched with a pack, not asked for
        self._packed_bytes = 0
        self._pack_flights = ThreadSingleFlight()
        self._packs_fetched = self._pack_failures = 0

    @classmethod
    def from_spec(cls, spec, *, offline: bool, index, timeout: float) -> HttpStore:
        from .download import Downloader

        return cls(spec.path, load_public_key(spec.public_key),
                   Downloader(spec.path, spec.proxy, timeout=timeout), index, offline=offline)

    def __repr__(self):
        return f"HttpStore({self.root!r})"

    def traces(self) -> ImageTraces:
        return ImageTraces(self)

    def close_idle(self) -> None:
        pass

    def counters(self) -> dict:
        with self._lock:
            packs = {"trace_packs": self._packs_fetched, "trace_pack_failures": self._pack_failures}
        return {**self._download.counters(), **packs}

    # -- the chain of trust ------------------------------------------------------
    def _get(self, path: str, what: str, check):
        """GET `path` and `check` its bytes; on a mismatch once more past the
        caches, then through another proxy; then StoreUnavailable."""
        if self.offline:
            raise StoreUnavailable(f"{self.root}: offline mode, store not consulted")
        url = f"{self.root}/{path}"
        tried = []
        for attempt in ({}, {"no_cache": True}, {"no_cache": True, "exclude": tried}):
            got = self._download.get(path, **attempt)
            via = got.via
            try:
                return check(got.data)
            except (DamagedObject, DamagedCatalog, BadManifest) as e:
                log.warning("%s: %s from %s via %s%s", what, e, url, via,
                            "" if attempt else " (fetching it again past the caches)")
                tried.append(via)
                error = e
        raise StoreUnavailable(f"{what}: {url} kept failing verification "
                               f"(via {', '.join(tried)}): {error}")

    def _current_manifest(self) -> Manifest:
        with self._lock:
            if self._manifest is not None and self._clock() < self._manifest_until:
                return self._manifest
        seen = self._highest_revision()

        def check(blob: bytes) -> Manifest:
            manifest = Manifest.decode(blob, self._key, now=self._clock())
            if manifest.revision < seen:
                raise BadManifest(f"revision {manifest.revision} is older than revision {seen}, "
                                  "seen before: refusing to go back")
            return manifest

        manifest = self._get(MANIFEST_PATH, f"{self.root} (manifest)", check)
        if manifest.revision > seen:
            self._index.set_text(self._revision_key, str(manifest.revision))
        with self._lock:
            self._manifest = manifest
            self._manifest_until = self._clock() + manifest.ttl
        return manifest

    @property
    def _revision_key(self) -> str:
        return "revision:" + self.root

    def _highest_revision(self) -> int:
        text = self._index.get_text(self._revision_key)
        return int(text) if text and text.isdigit() else 0

    def _catalog(self, name: str, what: str) -> Catalog:
        with self._lock:
            catalog = self._catalogs.get(name)
            if catalog is not None:
                self._catalogs.move_to_end(name)
                return catalog
        stored = self._index.get_object(name)
        catalog = None
        if stored is not None:
            try:
                catalog = Catalog.decode(decode_object(name, stored))
            except (DamagedObject, DamagedCatalog) as e:
                log.warning("kept catalog %s of %s is damaged (%s); fetching it again", name,
                            self.root, e)
        if catalog is None:
            blobs = {}

            def check(blob: bytes) -> Catalog:
                decoded = Catalog.decode(decode_object(name, blob))
                blobs[name] = blob
                return decoded

            catalog = self._get(object_path(name), what, check)
            self._index.put_object(name, blobs[name])
        with self._lock:
            self._catalogs[name] = catalog
            while len(self._catalogs) > _CATALOGS_IN_MEMORY:
                self._catalogs.popitem(last=False)
        return catalog

    def _catalog_of(self, directory: bytes) -> Catalog:
        """The catalog that lists `directory`: the root catalog for the root,
        a family's catalog for the family and its versions, a version's
        payload catalog for everything below it."""
        parts = split_path(directory)
        catalog = self._catalog(self._current_manifest().root, f"{self.root} (root catalog)")
        if parts:
            catalog = self._child(catalog, parts[0], directory)
        if len(parts) > 2:
            catalog = self._child(catalog, parts[0] + b"/" + parts[1], directory)
        return catalog

    def _child(self, catalog: Catalog, path: bytes, wanted: bytes) -> Catalog:
        name = catalog.children.get(path)
        if name is None:
            raise self._missing(catalog, path, display_path(self.root, wanted))
        return self._catalog(name, f"{display_path(self.root, path)} (catalog)")

    def _missing(self, catalog: Catalog, relpath: bytes, where: str):
        parent, _, leaf = relpath.rpartition(b"/")
        attr = catalog.listings.get(parent, {}).get(leaf)
        if attr is not None and not attr.is_dir:
            return NotADirectory(f"{where}: not a directory in the image")
        return NotFound(f"{where}: not in the image")

    # -- launch traces (image/traces.py) ---------------------------------------------
    def trace_roots(self) -> set[bytes]:
        if self.offline:
            return set()  # nothing could be replayed: every fetch would be refused
        return set(self._trace_indexes()[0])

    def variant_trace(self, root: bytes) -> VariantTrace | None:
        """The variant's trace, or None; BadTrace if its object, though it
        matches its name, is not that trace (the replay logs it and goes without)."""
        traces, pack_lists = self._trace_indexes()
        name = traces.get(root)
        if name is None:
            return None
        where = display_path(self.root, root)
        data = self._get(object_path(name), f"{where} (trace)",
                         lambda blob: decode_object(name, blob))
        trace = decode_trace_object(root, data)
        if (packs := pack_lists.get(root)) is not None:
            try:
                self._know_packs(self._get(object_path(packs), f"{where} (trace packs)",
                                           lambda blob: decode_pack_list(decode_object(packs, blob))))
            except (StoreUnavailable, DamagedPackList) as e:
                log.warning("%s: the trace's packs cannot be read (%s); its chunks are fetched "
                            "one by one", where, e)
        return trace

    def _trace_indexes(self) -> tuple[dict[bytes, str], dict[bytes, str]]:
        """The current revision's {variant root: trace object name} and
        {variant root: pack list object name}."""
        name = self._current_manifest().traces
        if not name:
            return {}, {}
        with self._lock:
            known_name, traces, packs = self._trace_index
        if known_name == name:
            return traces, packs
        data = self._get(object_path(name), f"{self.root} (traces index)",
                         lambda blob: decode_object(name, blob))
        traces, packs = decode_trace_index(data), decode_pack_index(data)
        with self._lock:  # immutable: good until the manifest names another
            self._trace_index = (name, traces, packs)
        return traces, packs

    def _know_packs(self, packs: list[Pack]) -> None:
        with self._lock:
            for pack in packs:
                for member, _ in pack.members:
                    if len(self._pack_of) >= _KNOWN_PACK_MEMBERS:
                        return
                    self._pack_of.setdefault(member, pack)

    # -- the store interface -------------------------------------------------------
    def stat_root(self) -> Attr:
        root = self._catalog(self._current_manifest().root, f"{self.root} (root catalog)").root
        if root is None:
            raise StoreUnavailable(f"{self.root}: the root catalog has no root entry")
        return root

    def list_dir(self, relpath: bytes, progress=lambda: None) -> dict[bytes, Attr]:
        catalog = self._catalog_of(relpath)
        entries = catalog.listings.get(relpath)
        if entries is None:
            raise self._missing(catalog, relpath, display_path(self.root, relpath))
        return entries

    def root_is_empty(self) -> bool:
        return not self.list_dir(b"")

    @staticmethod
    def id_of(url: str) -> str:
        return url.rstrip("/")

    @staticmethod
    def key_of(root: str, relpath: bytes, identity: tuple[int, ...], block_size: int) -> str:
        """By content id (identity's last number), whatever the path or image."""
        content = identity[4].to_bytes(CONTENT_ID_SIZE, "big")
        return content_key(content, identity[0], block_size)

    def file_key(self, relpath: bytes, attr: Attr, block_size: int) -> str:
        return self.key_of(self.root, relpath, attr.identity, block_size)

    def read(self, relpath: bytes, identity: tuple[int, ...], offset: int, size: int) -> bytes:
        parent, _, name = relpath.rpartition(b"/")
        catalog = self._catalog_of(parent)
        where = display_path(self.root, relpath)
        attr = catalog.listings.get(parent, {}).get(name)
        chunks = catalog.files.get(relpath)
        if attr is None or chunks is None:
            raise NotFound(f"{where}: no longer in the image")
        if attr.identity != identity:
            raise StoreFileChanged(f"{where}: changed in the image since it was listed")
        parts = []
        for index in chunks.covering(offset, size):
            data = self._chunk(chunks.chunks[index], where)
            start = index * chunks.chunk_size
            parts.append(data[max(offset - start, 0):offset + size - start])
        data = b"".join(parts)
        if len(data) != size:
            raise StoreFileChanged(f"{where}: the image's chunks are shorter than the file")
        return data

    def _chunk(self, name: str, where: str) -> bytes:
        with self._lock:
            data = self._chunks.get(name)
            if data is not None:
                self._chunks.move_to_end(name)
                return data
            data = self._take_packed(name)
            pack = self._pack_of.get(name) if data is None else None
        if pack is not None:
            data = self._from_pack(pack, name, where)
        if data is None:
            data = self._get(object_path(name), where, lambda blob: decode_object(name, blob))
        with self._lock:
            self._chunks[name] = data
            while len(self._chunks) > _CHUNKS_IN_MEMORY:
                self._chunks.popitem(last=False)
        return data

    def _from_pack(self, pack: Pack, name: str, where: str) -> bytes | None:
        """The chunk, fetched with its pack (once, whoever asks first), or None
        if the pack failed: then nothing is fetched in packs of it again."""
        try:
            members = self._pack_flights.run(pack.name, lambda: self._fetch_pack(pack, where))
        except StoreUnavailable as e:
            with self._lock:
                mine = [member for member, _ in pack.members if self._pack_of.get(member) is pack]
                for member in mine:
                    del self._pack_of[member]
                first = bool(mine)  # the first of the pack's askers to hear of it
                if first:
                    self._pack_failures += 1
            if first:
                log.warning("%s: trace pack %s failed (%s); its chunks are fetched one by one",
                            where, pack.name, e)
            return None
        with self._lock:
            data = self._take_packed(name)
        return data if data is not None else members.get(name)

    def _take_packed(self, name: str) -> bytes | None:
        """A member of a fetched pack, no longer kept as one (hold the lock)."""
        data = self._packed.pop(name, None)
        if data is not None:
            self._packed_bytes -= len(data)
        return data

    def _fetch_pack(self, pack: Pack, where: str) -> dict[str, bytes]:
        members = self._get(object_path(pack.name), f"{where} (trace pack {pack.name})",
                            lambda blob: pack.split(decode_object(pack.name, blob)))
        with self._lock:
            self._packs_fetched += 1
            for member, data in members.items():
                if self._pack_of.get(member) is pack:
                    del self._pack_of[member]  # from now on alone, if wanted again
                if member not in self._packed:
                    self._packed[member] = data
                    self._packed_bytes += len(data)
            while self._packed_bytes > _PACKED_BYTES:
                _, dropped = self._packed.popitem(last=False)
                self._packed_bytes -= len(dropped)
        return members


class ImageTraces:
    """The launch traces of the image's current revision, as a
    replay.TraceSource (a revision without traces has none)."""

    local = False

    def __init__(self, store: HttpStore):
        self._store = store

    def roots(self) -> set[bytes]:
        return self._store.trace_roots()

    def trace(self, root: bytes) -> VariantTrace | None:
        return self._store.variant_trace(root)
