"""`rez-lazyfs publish` and `keygen`: a Rez repository written as a static,
signed image (cachecore/image) for any web server, CDN or bucket to serve.

The image is the filesystem store's view of the repository, byte for byte:
the tree is read through FilesystemStore (lstat attributes, symlinks
verbatim and never followed, every path walked with O_NOFOLLOW), and each
file's identity (size, mtime, ctime, inode) is checked against its listing
before its first byte is read and after its last, so a file that changes
while it is published fails the publish rather than being cut into chunks
of two versions.

Order of writes, which is what makes a publish killed at any point leave the
previous revision served and complete:
  1. objects (file chunks, then catalogs), each written under a temporary
     name in its final directory and renamed, so no object name ever holds
     half an object; objects are immutable and content-addressed, so what a
     killed publish left behind is either reused by the next one or never
     referenced;
  2. one syncfs of the image's filesystem, so every object is on disk before
     anything names it;
  3. the manifest, via a temporary file, fsync and rename.

Publishing again is incremental: a file whose identity equals the previous
revision's is not read again (its chunk list is reused, once its objects are
checked present), and only objects not there yet are written, so a new
version that mostly equals an older one adds only its changed bytes.

Launch traces (`--trace`, cachecore/image/traces.py) go into the image with
each traced file's identity translated to the one the image gives it (the
content id added), after checking it against the file published: a file
that changed since the trace was recorded is left out of the trace, with a
warning, so an image's trace never names a version it does not hold. A
trace given replaces the previous revision's trace of its variant; every
other variant keeps its previous trace, checked the same way against what
is published now; a variant no longer in the tree loses its trace.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import zstandard

from cachecore.errors import NotADirectory, NotFound, StoreFileChanged, StoreUnavailable
from cachecore.image import packs
from cachecore.image.catalog import (
    DEFAULT_CHUNK_SIZE,
    Catalog,
    DamagedCatalog,
    FileChunks,
    content_id,
)
from cachecore.image.manifest import (
    DEFAULT_TTL,
    DEFAULT_VALIDITY,
    MANIFEST_PATH,
    BadKey,
    BadManifest,
    Manifest,
    generate_key,
    load_private_key,
)
from cachecore.image.objects import (
    MAX_OBJECT_SIZE,
    DamagedObject,
    decode_object,
    encode_object,
    object_name,
    object_path,
)
from cachecore.image.traces import (
    DamagedTraceIndex,
    decode_trace_index,
    decode_trace_object,
    encode_trace_index,
)
from cachecore.model import Attr, display_path
from cachecore.store import FilesystemStore
from cachecore.trace import BadTrace, VariantTrace, encode, merge_all, same_version

from .errors import UserError

OBJECTS_DIR = "objects"
LOCK_NAME = ".publish-lock"  # dot names: the sync commands in the README leave them out
_TEMP_PREFIX = ".tmp-"
_FILE_MODE, _DIR_MODE = 0o644, 0o755  # an image is public by design: the web server must read it
# The smallest object file there can be: the kind byte and one byte (no
# object is empty: an empty file has no chunks, a catalog has its magic). A
# shorter one is what a crash can leave of a renamed but unsynced file.
_MIN_OBJECT_FILE = 2
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class PublishFailed(Exception):
    """Something in the repository stops this publish; nothing is published."""


# -- keygen -------------------------------------------------------------------
def keygen(path: str) -> None:
    """A new key pair: `path` (secret, 0600) and `path`.pub; never over an existing file."""
    for p in (path, path + ".pub"):
        if os.path.lexists(p):
            raise UserError(f"{p} already exists: not overwritten (a key in use signs an image; "
                            "choose another name)")
    try:
        generate_key(path)
    except OSError as e:
        # The secret key written without its public half would be refused
        # next time as "already exists": take it back (only if we made it).
        if e.filename != path and os.path.lexists(path):
            os.unlink(path)
        raise UserError(f"cannot write the key {e.filename or path}: {e.strerror}") from None


# -- options ------------------------------------------------------------------
def parse_duration(text: str) -> int:
    """Seconds, from "90", "45m", "12h", "30d" or "2w"."""
    match = _DURATION.match(str(text))
    if not match or int(match.group(1)) <= 0:
        raise UserError(f"invalid duration {text!r} (expected e.g. 30d, 12h, 90m or 3600s)")
    return int(match.group(1)) * _UNITS[match.group(2)]


# -- the report ---------------------------------------------------------------
@dataclass
class PublishReport:
    """What a publish did (what `--json` prints). Objects count each distinct
    object the revision references once, catalogs included."""

    revision: int = 0
    files: int = 0             # regular files in the revision
    bytes: int = 0             # their total size
    files_read: int = 0        # read this time (the rest reused the previous revision's chunks)
    objects_new: int = 0       # written by this publish
    objects_existing: int = 0  # already in the image
    bytes_new: int = 0         # bytes of the objects written (compressed, on disk)
    catalogs: int = 0
    traces: int = 0            # variants with a launch trace in the revision
    packs: int = 0             # trace packs (image/packs.py) the revision names
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def line(self, repo: str, dest: str) -> str:
        return (f"published revision {self.revision} of {display_path(repo)} to {display_path(dest)}: "
                f"{self.files} file(s), "
                f"{_mib(self.bytes)}; {self.objects_new} new object(s) ({_mib(self.bytes_new)}), "
                f"{self.objects_existing} already there; {self.catalogs} catalog(s); "
                + (f"{self.traces} trace(s) in {self.packs} pack(s); " if self.traces else "")
                + f"{self.seconds:.1f} s")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class TerminalProgress:
    """One status line on a terminal (stderr), rewritten at most 10 times a second."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._shown = 0.0

    def __call__(self, report: PublishReport) -> None:
        now = time.monotonic()
        if now - self._shown < 0.1:
            return
        self._shown = now
        self.stream.write(f"\r\x1b[Kfiles {report.files}, {_mib(report.bytes)}; objects "
                          f"{report.objects_new} new, {report.objects_existing} already there")
        self.stream.flush()

    def __enter__(self) -> TerminalProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    def clear(self) -> None:
        """Take the status line away, for the summary, an error or a warning
        (the next call shows it again)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = 0.0


# -- the image directory --------------------------------------------------------
class ObjectDir:
    """DEST/objects: which objects are there, and writing the missing ones.

    Scanned once when opened (under the publish lock, so nobody else adds
    objects meanwhile): the names present, less files too short to be an
    object; temporaries a killed publish left are removed; the 256 shard
    directories made. Written from one thread: writer threads measured no
    faster on this 2-core machine (tests/bench/results/levers.md)."""

    def __init__(self, dest: str):
        self.root = os.path.join(dest, OBJECTS_DIR)
        self.present: set[str] = set()
        self.bytes_written = 0
        self._compressor = zstandard.ZstdCompressor(level=3)
        for shard in [""] + [f"{n:02x}" for n in range(256)]:
            directory = os.path.join(self.root, shard)
            if not os.path.isdir(directory):
                os.mkdir(directory)
                os.chmod(directory, _DIR_MODE)  # whatever the umask: the web server reads it
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(_TEMP_PREFIX):
                    os.unlink(entry.path)
                elif entry.stat(follow_symlinks=False).st_size >= _MIN_OBJECT_FILE:
                    self.present.add(entry.name)

    def put(self, name: str, data: bytes) -> bool:
        """Store `data` as object `name` unless it is there; True if written."""
        if name in self.present:
            return False
        blob = encode_object(data, self._compressor)
        _write_replacing(os.path.join(self.root, name[:2], name), blob)
        self.present.add(name)
        self.bytes_written += len(blob)
        return True

    def read(self, name: str) -> bytes | None:
        """An object of the image, verified; None if absent or damaged."""
        found = self._verified(name)
        return found[1] if found else None

    def stored(self, name: str) -> bytes | None:
        """An object's file as stored (kind byte and payload), verified; None
        if absent or damaged."""
        found = self._verified(name)
        return found[0] if found else None

    def _verified(self, name: str) -> tuple[bytes, bytes] | None:
        try:
            with open(os.path.join(os.path.dirname(self.root), object_path(name)), "rb") as f:
                blob = f.read()
            return blob, decode_object(name, blob)
        except (OSError, DamagedObject):
            return None


def _write_replacing(path: str, data: bytes, *, fsync: bool = False) -> None:
    """`path` holds `data`, or what it held before: written under a temporary
    name in the same directory, then renamed over it."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f"{_TEMP_PREFIX}{name[:16]}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)  # whatever the umask
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _sync_filesystem(path: str) -> None:
    """Everything written on `path`'s filesystem reaches the disk (syncfs:
    this filesystem only, unlike sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the previous revision --------------------------------------------------------
class PreviousRevision:
    """The catalogs of the revision the image serves now, loaded as the
    publish reaches them; a catalog missing or damaged only means its files
    are read again."""

    def __init__(self, objects: ObjectDir, manifest: Manifest | None):
        self.objects = objects
        self.manifest = manifest
        self.root = self.load(manifest.root) if manifest else None

    def load(self, name: str | None) -> Catalog | None:
        blob = self.objects.read(name) if name else None
        if blob is None:
            return None
        try:
            return Catalog.decode(blob)
        except DamagedCatalog:
            return None

    def child(self, catalog: Catalog | None, path: bytes) -> Catalog | None:
        return self.load(catalog.children.get(path)) if catalog else None

    def traces(self, warn) -> dict[bytes, VariantTrace]:
        """The revision's launch traces, by variant root; one whose object is
        missing or damaged is said (`warn`) and left out."""
        name = self.manifest.traces if self.manifest else ""
        if not name:
            return {}
        blob = self.objects.read(name)
        try:
            index = decode_trace_index(blob) if blob is not None else None
        except DamagedTraceIndex:
            index = None
        if index is None:
            warn(f"the previous revision's traces index {name} is missing or damaged: "
                 "its traces are left out")
            return {}
        traces = {}
        for root, trace_name in index.items():
            data = self.objects.read(trace_name)
            try:
                if data is None:
                    raise BadTrace(f"its object {trace_name} is missing or damaged")
                traces[root] = decode_trace_object(root, data)
            except BadTrace as e:
                warn(f"the previous revision's trace of {os.fsdecode(root)} is left out: {e}")
        return traces


def _read_manifest(dest: str, key, key_path: str) -> Manifest | None:
    path = os.path.join(dest, MANIFEST_PATH)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        blob = f.read(1 << 20)
    try:
        # An expired manifest is still the revision to follow: publishing
        # again is how an image stops being expired.
        return Manifest.decode(blob, key.public_key(), now=0)
    except BadManifest as e:
        raise UserError(f"{path} does not verify with the key {key_path} ({e}): signed by another "
                        "key, or damaged; publish with the key that signed it, or into a new "
                        "directory") from None


# -- publishing -------------------------------------------------------------------
class Publisher:
    """One publish of REPO_DIR into an image directory (see the module docstring).

    traces: variant root -> (the trace to publish, what to call it in warnings)."""

    def __init__(self, repo: str, objects: ObjectDir, previous: PreviousRevision,
                 chunk_size: int, progress=None,
                 traces: dict[bytes, tuple[VariantTrace, str]] | None = None,
                 warn=lambda message: None):
        self.repo = repo
        self.store = FilesystemStore(repo)
        self.objects = objects
        self.previous = previous
        self.chunk_size = chunk_size
        self.progress = progress
        self.report = PublishReport()
        self._referenced: set[str] = set()
        self.traces = traces or {}
        self.warn = warn
        # The published entries the traces name, noted as the tree is listed.
        self._traced_paths = {_under(root, p) for root, (t, _) in self.traces.items()
                              for p in [b"", *t.dirs, *(path for path, _ in t.files)]}
        self._traced_attrs: dict[bytes, Attr] = {}
        self._traced_chunks: dict[bytes, FileChunks] = {}

    def run(self) -> tuple[str, str]:
        """Write every object of the new revision; the names of the root
        catalog and of the traces index ("" when no trace is left)."""
        root_attr = _published_attr(self._store_call(b"", self.store.stat_root))
        root_catalog = Catalog(root=root_attr)
        prev_root = self.previous.root
        root_entries = self._add_listing(root_catalog, b"", prev_root)
        for family in _subdirs(b"", root_entries):
            family_catalog = Catalog()
            prev_family = self.previous.child(prev_root, family)
            for version in _subdirs(family, self._add_listing(family_catalog, family, prev_family)):
                version_entries = self._add_listing(family_catalog, version, prev_family)
                prev_payload = self.previous.child(prev_family, version)
                family_catalog.children[version] = self._payload_catalog(
                    version, version_entries, prev_payload)
            root_catalog.children[family] = self._write_catalog(family, family_catalog)
        return self._write_catalog(b"", root_catalog), self._write_traces()

    def _payload_catalog(self, version: bytes, entries: dict[bytes, Attr],
                         previous: Catalog | None) -> str:
        """The catalog of everything below a version directory (iterative:
        no depth limit)."""
        catalog = Catalog()
        pending = _subdirs(version, entries)
        while pending:
            directory = pending.pop()
            pending += _subdirs(directory, self._add_listing(catalog, directory, previous))
        return self._write_catalog(version, catalog)

    def _add_listing(self, catalog: Catalog, directory: bytes,
                     previous: Catalog | None) -> dict[bytes, Attr]:
        """List `directory` into `catalog`, with the chunks of its files; the store's entries."""
        entries = self._store_call(directory, self.store.list_dir, directory)
        published = {}
        for name, attr in entries.items():
            if attr.is_file:
                path = _join(directory, name)
                chunks = self._reused_chunks(path, attr, previous) or self._read_chunks(path, attr)
                catalog.files[path] = FileChunks(self.chunk_size, chunks)
                attr = attr._replace(content=content_id(self.chunk_size, chunks))
                self.report.files += 1
                self.report.bytes += attr.size
                if self.progress:
                    self.progress(self.report)
            published[name] = _published_attr(attr)
            if self._traced_paths and _join(directory, name) in self._traced_paths:
                self._traced_attrs[_join(directory, name)] = published[name]
                if attr.is_file:
                    self._traced_chunks[_join(directory, name)] = catalog.files[path]
        catalog.listings[directory] = published
        return entries

    def _reused_chunks(self, path: bytes, attr: Attr, previous: Catalog | None) -> list[str] | None:
        """The previous revision's chunks of this file, if the file is the
        same (identity) and all its objects are in the image."""
        if previous is None or path not in previous.files:
            return None
        parent, _, name = path.rpartition(b"/")
        before = previous.listings[parent][name]
        chunks = previous.files[path]
        # The previous entry carries its content id, which a published
        # file's identity includes; the store's listing has none yet.
        if (before._replace(content=b"").identity != attr.identity
                or chunks.chunk_size != self.chunk_size
                or not all(c in self.objects.present for c in chunks.chunks)):
            return None
        for c in chunks.chunks:
            self._reference(c, new=False)
        return chunks.chunks

    def _read_chunks(self, path: bytes, attr: Attr) -> list[str]:
        if attr.size == 0:
            return []
        self.report.files_read += 1
        chunks = []
        for offset in range(0, attr.size, self.chunk_size):
            data = self._store_call(path, self.store.read, path, attr.identity, offset,
                                    min(self.chunk_size, attr.size - offset))
            name = object_name(data)
            self._reference(name, new=self.objects.put(name, data))
            chunks.append(name)
        # A read of nothing is one more check of the file's identity, now
        # that its last byte was read: a write during the last chunk shows.
        self._store_call(path, self.store.read, path, attr.identity, attr.size, 0)
        return chunks

    def _reference(self, name: str, new: bool) -> None:
        if name in self._referenced:
            return
        self._referenced.add(name)
        if new:
            self.report.objects_new += 1
        else:
            self.report.objects_existing += 1

    def _write_catalog(self, directory: bytes, catalog: Catalog) -> str:
        data = catalog.encode()
        if len(data) > MAX_OBJECT_SIZE:
            raise PublishFailed(
                f"the catalog of {display_path(self.repo, directory)} would be "
                f"{len(data) >> 20} MiB, over the {MAX_OBJECT_SIZE >> 20} MiB a mount accepts")
        name = object_name(data)
        self._reference(name, new=self.objects.put(name, data))
        self.report.catalogs += 1
        return name

    def _write_traces(self) -> str:
        """The trace objects of what is left of each trace once checked against
        the tree published, and the traces index naming them."""
        names, packs = {}, {}
        for root, (trace, what) in sorted(self.traces.items()):
            published = self._published_trace(trace, what)
            if published is None:
                continue
            data = encode([published])
            if len(data) > MAX_OBJECT_SIZE:
                self.warn(f"{what} is left out: {len(data) >> 20} MiB, over the "
                          f"{MAX_OBJECT_SIZE >> 20} MiB a mount accepts")
                continue
            names[root] = self._write_object(data)
            if pack_list := self._write_packs(published):
                packs[root] = pack_list
        self.report.traces = len(names)
        if not names:
            return ""
        return self._write_object(encode_trace_index(names, packs))

    def _write_packs(self, trace: VariantTrace) -> str | None:
        """The packs of the chunks a (published) trace reads, in first-touch
        order, and the name of their pack list (image/packs.py); None if it
        reads nothing. A chunk whose object does not check out is left out
        (a mount fetches it alone, and fails on it as it would without packs).
        The objects are read twice (for their lengths, then into their pack)
        rather than held: a trace may read gigabytes."""
        members: dict[str, int] = {}  # in first-touch order
        for f, b in trace.reads:
            path, identity = trace.files[f]
            chunks = self._traced_chunks[_under(trace.root, path)]
            start = b * trace.block_size
            for i in chunks.covering(start, min(trace.block_size, identity[0] - start)):
                name = chunks.chunks[i]
                if name not in members and (blob := self.objects.stored(name)) is not None:
                    members[name] = len(blob)
        written = []
        for planned in packs.plan(list(members.items())):
            blobs = [self.objects.stored(name) for name, _ in planned]
            if all(blob is not None and len(blob) == length
                   for blob, (_, length) in zip(blobs, planned)):
                written.append(packs.Pack(self._write_object(b"".join(blobs)), tuple(planned)))
        self.report.packs += len(written)
        return self._write_object(packs.encode_pack_list(written)) if written else None

    def _write_object(self, data: bytes) -> str:
        name = object_name(data)
        self._reference(name, new=self.objects.put(name, data))
        return name

    def _published_trace(self, trace: VariantTrace, what: str) -> VariantTrace | None:
        """`trace` with each file's identity the image's, less the files that
        are not (any more) the version it was recorded on; None if nothing is left."""
        attrs = self._traced_attrs
        root = attrs.get(trace.root)
        if root is None or not root.is_dir:
            self.warn(f"{what} is left out: {os.fsdecode(trace.root)} is not a directory "
                      f"in {display_path(self.repo)}")
            return None
        out = VariantTrace(trace.root, trace.block_size, trace.repo,
                           [d for d in trace.dirs
                            if (a := attrs.get(_under(trace.root, d))) is not None and a.is_dir])
        kept: dict[int, int] = {}
        changed = []
        for i, (path, identity) in enumerate(trace.files):
            attr = attrs.get(_under(trace.root, path))
            # Recorded on the repository itself (no content id) or on a mount
            # of an earlier revision of this image (with one).
            if attr is not None and attr.is_file and same_version(identity, attr.identity):
                kept[i] = len(out.files)
                out.files.append((path, attr.identity))
            else:
                changed.append(os.fsdecode(path))
        out.reads = [(kept[f], b) for f, b in trace.reads if f in kept]
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            self.warn(f"{what}: {len(changed)} file(s) changed or gone since it was recorded, "
                      f"left out of it: {', '.join(changed[:3])}{more}")
        if not out.reads and not out.dirs:
            self.warn(f"{what} is left out: nothing it names is in the tree published")
            return None
        return out

    def _store_call(self, path: bytes, fn, *args):
        """A store request; what the repository did to stop it, as PublishFailed."""
        try:
            return fn(*args)
        except (StoreFileChanged, NotFound, NotADirectory):
            raise PublishFailed(f"{display_path(self.repo, path)} changed while it was published; "
                                "publish again") from None
        except StoreUnavailable as e:
            raise PublishFailed(str(e)) from None


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory else name


def _under(root: bytes, path: bytes) -> bytes:
    """A path relative to a variant root (b"": the root itself), relative to the repository."""
    return root + b"/" + path if path else root


def _subdirs(directory: bytes, entries: dict[bytes, Attr]) -> list[bytes]:
    return [_join(directory, name) for name, attr in entries.items() if attr.is_dir]


def _published_attr(attr: Attr) -> Attr:
    """An entry as the image keeps it: the store's attributes, but the access
    time pinned to the modification time. Publishing reads every file, and
    listing every directory, which moves their access times (relatime): kept
    as they are, every publish would make new catalogs for unchanged versions,
    and every mount would fetch them again."""
    return attr._replace(atime_ns=attr.mtime_ns)


def _check_directories(repo: str, dest: str) -> None:
    try:
        st = os.stat(repo)
    except OSError as e:
        raise UserError(f"cannot publish {display_path(repo)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"cannot publish {display_path(repo)}: not a directory")
    real_repo, real_dest = os.path.realpath(repo), os.path.realpath(dest)
    if real_dest == real_repo or real_dest.startswith(real_repo.rstrip("/") + "/"):
        raise UserError(f"the image directory {display_path(dest)} is inside the repository "
                        f"{display_path(repo)}: it would publish itself")
    try:
        if not os.path.lexists(dest):
            os.makedirs(dest)
            os.chmod(dest, _DIR_MODE)  # whatever the umask: the web server reads it
        entries = set(os.listdir(dest))
    except OSError as e:
        raise UserError(f"cannot use {display_path(dest)} as the image directory: "
                        f"{e.strerror}") from None
    leftovers = {e for e in entries if e.startswith(_TEMP_PREFIX)}  # of a killed publish
    if MANIFEST_PATH not in entries and entries - leftovers - {OBJECTS_DIR, LOCK_NAME}:
        raise UserError(f"{display_path(dest)} holds files but no image: publish into an "
                        "empty or new directory, or into an image's directory")


def _remove_temporaries(dest: str) -> None:
    """What a killed publish left in `dest` itself (a manifest being written);
    ObjectDir does the same in the object directories. Only under the lock."""
    for name in os.listdir(dest):
        if name.startswith(_TEMP_PREFIX):
            os.unlink(os.path.join(dest, name))


def _lock(dest: str) -> int:
    path = os.path.join(dest, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
    except OSError as e:
        raise UserError(f"cannot write in {display_path(dest)}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another publish into {display_path(dest)} is running") from None
    return fd


def publish(repo: str, dest: str, key_path: str, *, ttl: int = DEFAULT_TTL,
            valid_for: int = DEFAULT_VALIDITY, chunk_size: int = DEFAULT_CHUNK_SIZE,
            traces: Iterable[VariantTrace] = (), progress=None,
            warn=lambda message: None) -> PublishReport:
    """Publish the repository at `repo` as the next revision of the image in
    `dest`, with launch `traces` of its variants; `progress(report)` is called
    as files are done, `warn(message)` for each trace (or part of one) left out."""
    started = time.monotonic()
    if ttl < 0:
        raise UserError(f"invalid TTL {ttl} (seconds, 0 or more)")
    if not 0 < chunk_size <= MAX_OBJECT_SIZE:
        raise UserError(f"invalid chunk size {chunk_size}")
    try:
        key = load_private_key(key_path)
    except BadKey as e:
        raise UserError(str(e)) from None
    _check_directories(repo, dest)
    lock = _lock(dest)
    try:
        previous = _read_manifest(dest, key, key_path)
        unchanged = (f"{display_path(dest)} still serves revision {previous.revision}" if previous
                     else f"{display_path(dest)} has no revision yet")
        try:
            _remove_temporaries(dest)
            objects = ObjectDir(dest)
            revision = PreviousRevision(objects, previous)
            given = merge_all(list(traces))
            to_publish = {root: (t, f"the previous revision's trace of {os.fsdecode(root)}")
                          for root, t in revision.traces(warn).items() if root not in given}
            to_publish.update((root, (t, f"the trace of {os.fsdecode(root)}"))
                              for root, t in given.items())
            publisher = Publisher(repo, objects, revision, chunk_size, progress, to_publish, warn)
            root, traces_index = publisher.run()
            _sync_filesystem(dest)
            report = publisher.report
            report.revision = (previous.revision if previous else 0) + 1
            report.bytes_new = objects.bytes_written
            now = int(time.time())
            manifest = Manifest(revision=report.revision, root=root, ttl=ttl, published=now,
                                expires=now + valid_for, traces=traces_index)
            _write_replacing(os.path.join(dest, MANIFEST_PATH), manifest.encode(key), fsync=True)
            _fsync_dir(dest)
        except PublishFailed as e:
            raise UserError(f"{e} (nothing published: {unchanged})") from None
        except OSError as e:
            where = display_path(os.fsdecode(e.filename)) if e.filename else display_path(dest)
            raise UserError(f"cannot write the image: {where}: {e.strerror or e} (nothing "
                            f"published: {unchanged})") from None
    finally:
        os.close(lock)
    report.seconds = round(time.monotonic() - started, 3)
    return report
