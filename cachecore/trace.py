"""Launch traces: what a start-up read, per variant, in first-touch order.

A trace is recorded once (`rez-lazyfs trace record`: the daemon notes what
one process tree reads, `Recording`), split per variant root and kept in a
trace file, a baked context, a published image or a studio's trace
directory. On the first access to a traced variant the mount fetches the
trace's missing blocks ahead of the application (cachecore/replay.py).

The file, JSON:

    {"format": "rez-lazyfs-trace", "version": 1, "variants": [
        {"repo": "main", "root": "maya/2024.2/platform-linux", "block_size": 131072,
         "dirs": ["", "bin", "python/maya"],            # listed, in first-touch order
         "files": [{"path": "bin/maya", "identity": [size, mtime_ns, ctime_ns, ino]}],
         "reads": [0, 0, 3, 1, 12, 1]}]}               # runs: file, first block, count

Paths are relative to the variant root. A file's identity is its
Attr.identity when it was recorded; a replay uses a file only while the
store still holds that exact version, so a trace can never make the mount
fetch (let alone serve) other bytes than a reader would. Traces arrive from
other people (contexts, shared directories) and are checked whole on
decoding: every path (cachecore/paths.py), every identity, every block
inside its file, and sizes bounded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .paths import BadPath, relpath_from_text

FORMAT = "rez-lazyfs-trace"
VERSION = 1
MAX_FILES = 200_000          # per variant
# Blocks per variant trace, and per recording: ~120 bytes each in memory, so
# at most ~60 MiB (a start-up reading 60 GiB of 128K blocks is not a launch).
MAX_BLOCKS = 500_000
MAX_DIRS = 200_000


class BadTrace(ValueError):
    """A trace (or recording) that is not well formed: the message says where."""


@dataclass
class VariantTrace:
    """One variant's trace. `reads` holds (file index, block) in first-touch order."""

    root: bytes                       # the variant root, relative to the repository
    block_size: int
    repo: str = ""                    # the alias it was recorded under (informational)
    dirs: list[bytes] = field(default_factory=list)
    files: list[tuple[bytes, tuple[int, ...]]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)

    def blocks(self) -> int:
        return len(self.reads)

    def payload_bytes(self) -> int:
        """The bytes its blocks hold (a file's last block is short)."""
        bs = self.block_size
        return sum(min(bs, self.files[f][1][0] - b * bs) for f, b in self.reads)

    def to_json(self) -> dict:
        runs: list[int] = []
        for f, b in self.reads:
            if runs and runs[-3] == f and runs[-2] + runs[-1] == b:
                runs[-1] += 1
            else:
                runs += [f, b, 1]
        return {"repo": self.repo, "root": os.fsdecode(self.root), "block_size": self.block_size,
                "dirs": [os.fsdecode(d) for d in self.dirs],
                "files": [{"path": os.fsdecode(p), "identity": list(i)} for p, i in self.files],
                "reads": runs}

    @classmethod
    def from_json(cls, raw) -> VariantTrace:
        where = "variant"
        if not isinstance(raw, dict):
            raise BadTrace("a variant must be an object")
        root = _path(raw.get("root"), "root", allow_empty=False)
        where = f"variant {os.fsdecode(root)}"
        if root.count(b"/") < 1:
            raise BadTrace(f"{where}: a variant root is at least family/version")
        block_size = raw.get("block_size")
        if not _int(block_size) or block_size < 4096 or block_size & (block_size - 1):
            raise BadTrace(f"{where}: block_size must be a power of two of at least 4096")
        repo = raw.get("repo", "")
        if not isinstance(repo, str):
            raise BadTrace(f"{where}: repo must be a string")
        dirs, files, runs = raw.get("dirs", []), raw.get("files", []), raw.get("reads", [])
        if not all(isinstance(x, list) for x in (dirs, files, runs)):
            raise BadTrace(f"{where}: dirs, files and reads must be lists")
        if len(dirs) > MAX_DIRS or len(files) > MAX_FILES:
            raise BadTrace(f"{where}: more than {MAX_DIRS} directories or {MAX_FILES} files")
        trace = cls(root, block_size, repo,
                    list(dict.fromkeys(_path(d, f"{where}: a directory") for d in dirs)))
        seen = set()
        for entry in files:
            if not isinstance(entry, dict):
                raise BadTrace(f"{where}: a file must be an object")
            path = _path(entry.get("path"), f"{where}: a file", allow_empty=False)
            identity = entry.get("identity")
            if (not isinstance(identity, list) or len(identity) not in (4, 5)
                    or not all(_int(v) and v >= 0 for v in identity)):
                raise BadTrace(f"{where}: {os.fsdecode(path)}: identity must be 4 or 5 "
                               "non-negative integers")
            if path in seen:
                raise BadTrace(f"{where}: {os.fsdecode(path)} is named twice")
            seen.add(path)
            trace.files.append((path, tuple(identity)))
        if len(runs) % 3 or not all(_int(v) and v >= 0 for v in runs):
            raise BadTrace(f"{where}: reads must be runs of three non-negative integers")
        read = set()
        for i in range(0, len(runs), 3):
            f, first, count = runs[i:i + 3]
            if f >= len(trace.files) or count == 0:
                raise BadTrace(f"{where}: a read names no file")
            path, identity = trace.files[f]
            if (first + count - 1) * block_size >= max(identity[0], 1):
                raise BadTrace(f"{where}: a read of {os.fsdecode(path)} lies past its end")
            if len(trace.reads) + count > MAX_BLOCKS:
                raise BadTrace(f"{where}: more than {MAX_BLOCKS} blocks")
            for b in range(first, first + count):
                if (f, b) not in read:
                    read.add((f, b))
                    trace.reads.append((f, b))
        return trace


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path(text, where: str, allow_empty: bool = True) -> bytes:
    if not isinstance(text, str):
        raise BadTrace(f"{where}: a path must be a string")
    if text == "" and allow_empty:
        return b""
    try:
        return relpath_from_text(text)
    except BadPath as e:
        raise BadTrace(f"{where}: {e}") from None


def same_version(traced: tuple[int, ...], current: tuple[int, ...]) -> bool:
    """Whether a traced file is the version the store holds now, as far as a
    trace can tell: the same size and mtime, and the same content id when
    both name one (a published file).

    Inode numbers and change times are left out on purpose: some stores
    renumber inodes at every mount (sshfs numbers them in lookup order, so
    every trace would miss after a remount), and a trace must travel between
    machines. What a looser match can cost is waste, never a wrong byte: a
    file rewritten in place with its mtime put back has its current bytes
    fetched ahead, and every store read still checks the full identity."""
    if traced[:2] != current[:2]:
        return False
    return len(traced) < 5 or len(current) < 5 or traced[4] == current[4]


def merge(old: VariantTrace, new: VariantTrace) -> VariantTrace:
    """The union of two traces of one variant, `old`'s first-touch order first.
    A file recorded at another version in `new` (it changed since) takes the
    new version, and the old version's reads are dropped."""
    if old.block_size != new.block_size:
        new = rescaled(new, old.block_size)
    newer = dict(new.files)
    out = VariantTrace(old.root, old.block_size, new.repo or old.repo,
                       list(dict.fromkeys([*old.dirs, *new.dirs])))
    index: dict[bytes, int] = {}

    def file_index(path: bytes, identity) -> int:
        if path not in index:
            index[path] = len(out.files)
            out.files.append((path, newer.get(path, identity)))  # the latest recorded
        return index[path]

    seen = set()
    for source, keep in ((old, lambda p, i: same_version(newer.get(p, i), i)),
                         (new, lambda p, i: True)):
        for f, b in source.reads:
            path, identity = source.files[f]
            if keep(path, identity):
                key = (file_index(path, identity), b)
                if key not in seen:
                    seen.add(key)
                    out.reads.append(key)
    return out


def rescaled(trace: VariantTrace, block_size: int) -> VariantTrace:
    """The same trace in blocks of another size (a cache with another block size)."""
    out = VariantTrace(trace.root, block_size, trace.repo, list(trace.dirs), list(trace.files))
    seen = set()
    for f, b in trace.reads:
        start = b * trace.block_size
        end = min(start + trace.block_size, trace.files[f][1][0])
        for nb in range(start // block_size, (max(end, start + 1) - 1) // block_size + 1):
            if (f, nb) not in seen:
                seen.add((f, nb))
                out.reads.append((f, nb))
    return out


# -- trace files ---------------------------------------------------------------
def encode(traces: list[VariantTrace]) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION,
                       "variants": [t.to_json() for t in traces]},
                      separators=(",", ":")).encode()


def decode(blob: bytes) -> list[VariantTrace]:
    """The traces of a trace file; BadTrace names what is wrong."""
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadTrace(f"not JSON: {e}") from None
    if not is_trace_document(doc):
        raise BadTrace("not a rez-lazyfs trace")
    if doc.get("version") != VERSION:
        raise BadTrace(f"unsupported trace version {doc.get('version')!r}")
    variants = doc.get("variants")
    if not isinstance(variants, list):
        raise BadTrace("variants must be a list")
    traces: dict[bytes, VariantTrace] = {}
    for raw in variants:
        t = VariantTrace.from_json(raw)
        traces[t.root] = merge(traces[t.root], t) if t.root in traces else t
    return list(traces.values())


def record_key(store_id: str, root: bytes) -> str:
    """The name a store's trace of a variant is kept under in the index."""
    return json.dumps([store_id, os.fsdecode(root)])


def is_trace_document(doc) -> bool:
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def merge_all(traces: list[VariantTrace]) -> dict[bytes, VariantTrace]:
    """One trace per variant root: traces of the same root merged in order."""
    out: dict[bytes, VariantTrace] = {}
    for t in traces:
        out[t.root] = merge(out[t.root], t) if t.root in out else t
    return out


# -- recording -------------------------------------------------------------------
class ProcessTree:
    """Whether a process descends from `root` (or is it), from /proc.

    Answers are remembered per pid: a process's parent chain is read once
    (its ancestors stay known even after they exit). A pid reused by an
    unrelated process during one recording would be misattributed; pids
    are not reused that fast."""

    def __init__(self, root: int, proc: str = "/proc"):
        self.root = root
        self._proc = proc
        self._known: dict[int, bool] = {root: True, 0: False, 1: root == 1}

    def __contains__(self, pid: int) -> bool:
        chain = []
        while pid not in self._known:
            chain.append(pid)
            pid = self._parent(pid)
            if len(chain) > 4096:
                pid = 0
        answer = self._known[pid]
        for p in chain:
            self._known[p] = answer
        if len(self._known) > 100_000:
            self._known = {self.root: True, 0: False, 1: self.root == 1}
        return answer

    def _parent(self, pid: int) -> int:
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return 0  # gone: not one of ours as far as we can tell
        # the name (field 2) may hold spaces and parentheses: ppid follows the last ")"
        return int(stat[stat.rindex(b")") + 2:].split()[1])


class Recording:
    """What one process tree read on a mount, in first-touch order.

    Fed by the FUSE handlers (on the event loop) for requests of the tree's
    processes: directories looked in or listed, and blocks read. Bounded:
    past MAX_BLOCKS reads it stops noting and says so (`truncated`)."""

    def __init__(self, tree: ProcessTree, block_size: int, repos: dict[str, str]):
        self.tree = tree
        self.block_size = block_size
        self.repos = repos  # alias -> store root, for the record
        self.dirs: dict[tuple[str, bytes], None] = {}
        self.files: dict[tuple[str, bytes], tuple[int, tuple[int, ...]]] = {}
        self.reads: dict[tuple[int, int], None] = {}
        self.truncated = False
        self.stopped = False

    def note_dir(self, alias: str, relpath: bytes) -> None:
        if not self.stopped:
            self.dirs.setdefault((alias, relpath))

    def note_read(self, alias: str, relpath: bytes, identity: tuple[int, ...],
                  first: int, last: int) -> None:
        if self.stopped:
            return
        known = self.files.get((alias, relpath))
        if known is None or known[1] != identity:
            known = self.files[(alias, relpath)] = (len(self.files), identity)
        for b in range(first, last + 1):
            if len(self.reads) >= MAX_BLOCKS:
                self.truncated = True
                return
            self.reads.setdefault((known[0], b))

    def to_json(self) -> bytes:
        paths = sorted(self.files.items(), key=lambda item: item[1][0])
        return json.dumps({
            "format": "rez-lazyfs-recording", "block_size": self.block_size,
            "repos": self.repos, "truncated": self.truncated,
            "dirs": [[a, os.fsdecode(p)] for a, p in self.dirs],
            "files": [[a, os.fsdecode(p), list(identity)] for (a, p), (_, identity) in paths],
            "reads": [x for pair in self.reads for x in pair],
        }, separators=(",", ":")).encode()


def traces_from_recording(blob: bytes, roots: dict[str, list[bytes]]) -> list[VariantTrace]:
    """Split what the daemon recorded into one trace per variant root.

    roots: alias -> the variant roots of the context. A file or directory
    under none of them belongs to its version directory (family/version) when
    it is below one; anything higher (repository and family listings, which
    change) is left out."""
    try:
        doc = json.loads(blob)
        block_size, files, dirs, reads = (doc["block_size"], doc["files"], doc["dirs"],
                                          doc["reads"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadTrace(f"not a recording: {e}") from None
    by_alias = {a: sorted(rs, key=len, reverse=True) for a, rs in roots.items()}

    def owner(alias: str, relpath: bytes) -> tuple[bytes, bytes] | None:
        for root in by_alias.get(alias, ()):
            if relpath == root or relpath.startswith(root + b"/"):
                return root, relpath[len(root) + 1:]
        parts = relpath.split(b"/")
        if len(parts) >= 2 and all(parts[:2]):
            root = b"/".join(parts[:2])
            return root, relpath[len(root) + 1:]
        return None

    traces: dict[tuple[str, bytes], VariantTrace] = {}

    def trace_of(alias: str, root: bytes) -> VariantTrace:
        if (alias, root) not in traces:
            traces[(alias, root)] = VariantTrace(root, block_size, alias)
        return traces[(alias, root)]

    for alias, text in dirs:
        relpath = os.fsencode(text)
        if (found := owner(alias, relpath)) is not None:
            trace_of(alias, found[0]).dirs.append(found[1])
    placed: dict[int, tuple[VariantTrace, int]] = {}
    for n, (alias, text, identity) in enumerate(files):
        found = owner(alias, os.fsencode(text))
        if found is not None and found[1]:
            t = trace_of(alias, found[0])
            placed[n] = (t, len(t.files))
            t.files.append((found[1], tuple(identity)))
    for i in range(0, len(reads), 2):
        if (where := placed.get(reads[i])) is not None:
            where[0].reads.append((where[1], reads[i + 1]))
    out = []
    for t in traces.values():
        t.dirs = list(dict.fromkeys(t.dirs))
        if t.reads or t.dirs:
            out.append(VariantTrace.from_json(t.to_json()))  # checked like any trace
    return out
