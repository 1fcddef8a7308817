"""Deep contexts: bake, seed, populate and export (DESIGN.md, "Deep contexts").

rez re-reads each variant's package definition from its handle's location
whenever a context is sourced (docs/rxt-format.md). Baking points those
locations at the mount and makes sure that what rez reads there (the
repository, family and version directory listings, the definition files, a
hashed variant's `_v` links) is in the local cache, pinned, and embedded in
the baked file so another machine can seed its own cache from the file alone.
Everything goes through cachecore, so the store is consulted only for what
the cache lacks.

A baked file is input like any other, and whoever seeds or populates it need
not be whoever wrote it (a render node seeding the contexts users submit).
So its embedded section is checked whole before anything is written (the
type of every field, every path through cachecore/paths.py), and only what
bake embeds is accepted: definition files in the version directories of the
section's variants, location files at their repository locations, and
listings on the variants' paths (the repository root down to the version
directory, its `_v` directory, each variant root and the directories in it).
When the store answers, those listings and files are taken from the store
instead (the section names what to take) and differences are reported; only
when it does not answer is the section's own data used, unchecked, and the
command says so. Seeding never changes what the cache records as the store
path of an alias: --repo or the config decide, then the cache's record, and
the section's path only when neither names the alias.

A pin lasts as long as its context file (cachecore/clean.py); a context that
embeds what not everyone may read in the store is written mode 0600.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

from cachecore.model import (
    ROOT_NAME,
    Attr,
    decode_listing,
    display_path,
    encode_listing,
)
from cachecore.paths import BadPath, check_name, relpath_from_text
from cachecore.trace import BadTrace, VariantTrace

from .config import Settings, is_url
from .errors import UserError
from .rxt import context_variants, load_context, rebase_context, write_context

EMBED_KEY = "rez_lazyfs"
EMBED_FORMAT = 2  # 2: a file's identity is size, mtime, ctime and inode
# What rez reads in a version directory when it loads a package (docs/rxt-format.md).
DEFINITION_FILES = (b"package.py", b"package.yaml", b".metadata", b"release.yaml")
# ... and at the repository location.
LOCATION_FILES = (b"settings.yaml",)
HASHED_VARIANTS_DIR = b"_v"


# -- what a context needs ------------------------------------------------------
@dataclass
class DeepData:
    """The embedded section of a baked context, in memory."""

    mountpoint: str
    repos: dict[str, str]                                   # alias -> store path
    roots: dict[str, Attr] = field(default_factory=dict)    # alias -> repository root
    listings: dict[tuple[str, bytes], dict[bytes, Attr]] = field(default_factory=dict)
    # (alias, path) -> (Attr.identity, bytes)
    files: dict[tuple[str, bytes], tuple[tuple[int, ...], bytes]] = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)      # repo, name, version, root
    traces: list = field(default_factory=list)              # trace.VariantTrace, repo = alias
    # alias -> the path of its transparent mount (its store's own: mount/over.py)
    over: dict[str, str] = field(default_factory=dict)

    def local_root(self, alias: str) -> str | None:
        """Where the context finds the repository: MOUNTPOINT/ALIAS, or the
        store's own path under a transparent mount."""
        if alias in self.over:
            return self.over[alias]
        return os.path.join(self.mountpoint, alias) if self.mountpoint else None

    def locate(self, location: str) -> tuple[str, bytes]:
        """(alias, path inside the repository) of a location the baked context
        names; alias '' for a location in no mirrored repository."""
        found = ("", b"")
        best = -1
        for alias in self.repos:
            root = self.local_root(alias)
            if root is None:
                continue
            rel = os.path.relpath(location, root)
            if rel != os.pardir and not rel.startswith(os.pardir + os.sep) and len(root) > best:
                found, best = (alias, b"" if rel == os.curdir else os.fsencode(rel)), len(root)
        return found

    @property
    def destination(self) -> str:
        """Where the variants were baked onto, for people."""
        return ", ".join(filter(None, [self.mountpoint, *sorted(self.over.values())]))

    def to_json(self) -> dict:
        b64 = lambda data: base64.b64encode(data).decode()
        return {
            "format": EMBED_FORMAT, "mountpoint": self.mountpoint, "repos": self.repos,
            "roots": {alias: b64(encode_listing({ROOT_NAME: attr}, 0.0))
                      for alias, attr in self.roots.items()},
            "listings": [{"repo": a, "path": os.fsdecode(p),
                          "entries": b64(encode_listing(entries, 0.0))}
                         for (a, p), entries in sorted(self.listings.items())],
            "files": [{"repo": a, "path": os.fsdecode(p), "identity": list(identity),
                       "data": b64(data)}
                      for (a, p), (identity, data) in sorted(self.files.items())],
            "variants": self.variants,
            **({"traces": [t.to_json() for t in self.traces]} if self.traces else {}),
            **({"over": self.over} if self.over else {}),
        }

    @classmethod
    def from_context(cls, doc: dict, path: str) -> DeepData:
        """The section of a baked context, every field checked: a UserError
        names the first that is wrong, before anything is done with any."""
        raw = doc.get(EMBED_KEY)
        if not isinstance(raw, dict):
            raise UserError(f"{path} was not baked by rez-lazyfs (run rez-lazyfs bake first)")
        if raw.get("format") != EMBED_FORMAT:
            raise UserError(f"{path}: unsupported rez-lazyfs section format {raw.get('format')!r}")
        try:
            return _parse_section(raw)
        except _Damaged as e:
            raise UserError(f"{path}: damaged rez-lazyfs section: {e}") from None


# -- reading a section: nothing in it is used before all of it is checked ------
class _Damaged(ValueError):
    """What is wrong with one field of a section, and where."""


_KINDS = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return _KINDS.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _want(value, kind: type, where: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Damaged(f"{where} is {_kind(value)}, not {_KINDS[kind]}")
    return value


def _member(obj: dict, key: str, kind: type, where: str = ""):
    if key not in obj:
        raise _Damaged(f"{where or 'the section'} has no {key!r}")
    return _want(obj[key], kind, f"{where}.{key}" if where else key)


def _bytes(text, where: str) -> bytes:
    try:
        return base64.b64decode(_want(text, str, where), validate=True)
    except ValueError:
        raise _Damaged(f"{where} is not base64") from None


def _entries(text, where: str) -> dict[bytes, Attr]:
    blob = _bytes(text, where)
    try:
        return decode_listing(blob)[0]
    except ValueError as e:
        raise _Damaged(f"{where}: {e}") from None


def _relpath(text, where: str) -> bytes:
    try:
        return relpath_from_text(text)
    except BadPath as e:
        raise _Damaged(f"{where}: {e}") from None


def _parse_section(raw: dict) -> DeepData:
    repos = {}
    for alias, store in _member(raw, "repos", dict).items():
        where = f"repos[{alias!r}]"
        try:
            check_name(os.fsencode(alias))
        except BadPath as e:
            raise _Damaged(f"{where}: the alias is not a plain name ({e})") from None
        if not (os.path.isabs(_want(store, str, where)) or is_url(store)) or "\0" in store:
            raise _Damaged(f"{where} is not an absolute path or a published image's URL")
        repos[alias] = store
    deep = DeepData(_member(raw, "mountpoint", str), repos)

    def known(alias, where: str) -> str:
        if alias not in repos:
            raise _Damaged(f"{where} names repository {alias!r}, which repos lacks")
        return alias

    for alias, root in (_member(raw, "over", dict) if "over" in raw else {}).items():
        where = f"over[{alias!r}]"
        if not os.path.isabs(_want(root, str, where)) or "\0" in root:
            raise _Damaged(f"{where} is not an absolute path")
        deep.over[known(alias, where)] = root
    for alias, text in _member(raw, "roots", dict).items():
        where = f"roots[{alias!r}]"
        entries = _entries(text, where)
        if list(entries) != [ROOT_NAME] or not entries[ROOT_NAME].is_dir:
            raise _Damaged(f"{where} is not the record of a repository root")
        deep.roots[known(alias, where)] = entries[ROOT_NAME]
    for i, x in enumerate(_member(raw, "listings", list)):
        where = f"listings[{i}]"
        key = (known(_member(_want(x, dict, where), "repo", str, where), f"{where}.repo"),
               _relpath(_member(x, "path", str, where), f"{where}.path"))
        entries = _entries(_member(x, "entries", str, where), f"{where}.entries")
        if ROOT_NAME in entries:
            raise _Damaged(f"{where}.entries holds an entry named '.'")
        if key in deep.listings:
            raise _Damaged(f"{where} lists {display_path(*key)} a second time")
        deep.listings[key] = entries
    for i, x in enumerate(_member(raw, "files", list)):
        where = f"files[{i}]"
        key = (known(_member(_want(x, dict, where), "repo", str, where), f"{where}.repo"),
               _relpath(_member(x, "path", str, where), f"{where}.path"))
        identity = _member(x, "identity", list, where)
        if len(identity) not in (4, 5):
            raise _Damaged(f"{where}.identity holds {len(identity)} numbers, not 4 "
                           "(size, mtime, ctime, inode) or 5 (and a published content id)")
        for n, number in enumerate(identity):
            _want(number, int, f"{where}.identity[{n}]")
        data = _bytes(_member(x, "data", str, where), f"{where}.data")
        if len(data) != identity[0]:
            raise _Damaged(f"{where}.data holds {len(data)} bytes, its identity says {identity[0]}")
        parent, _, name = key[1].rpartition(b"/")
        entry = deep.listings.get((key[0], parent), {}).get(name)
        if entry is None or not entry.is_file or entry.identity != tuple(identity):
            raise _Damaged(f"{where} ({display_path(*key)}) is not the file its directory's "
                           "listing in the section names")
        if key in deep.files:
            raise _Damaged(f"{where} embeds {display_path(*key)} a second time")
        deep.files[key] = (tuple(identity), data)
    for i, v in enumerate(_member(raw, "variants", list)):
        where = f"variants[{i}]"
        _want(v, dict, where)
        record = {"repo": known(_member(v, "repo", str, where), f"{where}.repo")}
        record.update((k, _member(v, k, str, where)) for k in ("name", "version", "root"))
        _relpath(record["root"], f"{where}.root")
        if _layout(record) is None:
            raise _Damaged(f"{where}.root {record['root']!r} is not in a directory "
                           f"{record['name']}/{record['version']}".rstrip("/"))
        deep.variants.append(record)
    roots = {(v["repo"], os.fsencode(v["root"])) for v in deep.variants}
    for i, entry in enumerate(_member(raw, "traces", list) if "traces" in raw else []):
        where = f"traces[{i}]"
        try:
            t = VariantTrace.from_json(entry)
        except BadTrace as e:
            raise _Damaged(f"{where}: {e}") from None
        if (known(t.repo, f"{where}.repo"), t.root) not in roots:
            raise _Damaged(f"{where} is the trace of {os.fsdecode(t.root)}, not of a variant "
                           "of the section")
        deep.traces.append(t)
    return deep


@dataclass(frozen=True)
class _Layout:
    """Where one variant's package lives in its repository."""

    location: bytes      # the repository location: the directory of its family
    version_dir: bytes   # where rez reads its definition
    root: bytes          # the variant root: the version directory or below it


def _layout(variant: dict) -> _Layout | None:
    """'loc/maya/2024.2/python-3' (maya, 2024.2) -> loc, loc/maya/2024.2, the root;
    None if the root is not in a NAME/VERSION directory."""
    parts = variant["root"].split("/") if variant["root"] else []
    head = [variant["name"], variant["version"]] if variant["version"] else [variant["name"]]
    for i in range(len(parts) - len(head), -1, -1):
        if parts[i:i + len(head)] == head:
            return _Layout(os.fsencode("/".join(parts[:i])),
                           os.fsencode("/".join(parts[:i + len(head)])),
                           os.fsencode(variant["root"]))
    return None


def _check_embedded_paths(deep: DeepData, path: str) -> None:
    """Refuse whatever bake would not have embedded (the module docstring)."""
    listable, definition_dirs, locations = set(), set(), set()
    roots: dict[str, set[bytes]] = {}
    for v in deep.variants:
        alias, layout = v["repo"], _layout(v)
        parts = layout.version_dir.split(b"/")
        listable.update((alias, b"/".join(parts[:n])) for n in range(len(parts) + 1))
        listable.add((alias, layout.version_dir + b"/" + HASHED_VARIANTS_DIR))
        definition_dirs.add((alias, layout.version_dir))
        locations.add((alias, layout.location))
        roots.setdefault(alias, set()).add(layout.root)

    for alias, relpath in deep.listings:
        if (alias, relpath) not in listable and not any(
                relpath == root or relpath.startswith(root + b"/") for root in roots.get(alias, ())):
            raise UserError(f"{path}: the rez-lazyfs section embeds a listing of "
                            f"{display_path(alias, relpath)}, which is not on the path of any "
                            "of its variants: refused")
    for alias, relpath in deep.files:
        parent, _, name = relpath.rpartition(b"/")
        if not ((alias, parent) in definition_dirs and name in DEFINITION_FILES
                or (alias, parent) in locations and name in LOCATION_FILES):
            raise UserError(f"{path}: the rez-lazyfs section embeds {display_path(alias, relpath)}, "
                            "which is not a definition file of any of its variants: refused")


def load_baked(ctx_path: str) -> tuple[DeepData, tuple[str, tuple[int, ...]]]:
    """The checked section of a baked context, and the context file as a pin holder."""
    deep = DeepData.from_context(load_context(ctx_path), ctx_path)
    _check_embedded_paths(deep, ctx_path)
    return deep, _holder(ctx_path)


def _holder(ctx_path: str) -> tuple[str, tuple[int, ...]]:
    from cachecore.clean import holder_identity

    real = os.path.realpath(ctx_path)
    try:
        return real, holder_identity(os.stat(real))
    except OSError as e:
        raise UserError(f"cannot stat {ctx_path}: {e.strerror}") from None


# -- baking -------------------------------------------------------------------
async def _collect(repos, handles, deep: DeepData) -> None:
    """Read through the cache everything rez reads to source these variants."""
    from cachecore.errors import LazyFSError, NotFound

    async def listing(alias: str, relpath: bytes) -> dict:
        entries = deep.listings[(alias, relpath)] = await repos[alias].listing(relpath)
        return entries

    async def whole_file(alias: str, relpath: bytes) -> None:
        repo = repos[alias]
        version = await repo.open(relpath)
        data = bytes(await repo.read(version, 0, version.size))
        deep.files[(alias, relpath)] = (version.identity, data)

    for alias, repo in repos.items():
        deep.roots[alias] = await repo.root_attr()
    for handle in handles:
        v = handle["variables"]
        alias, location = deep.locate(v["location"])
        qualified = f"{v['name']}-{v.get('version', '')}".rstrip("-")
        parts = [p for p in location.split(b"/") if p]
        try:
            for depth in range(len(parts) + 1):
                entries = await listing(alias, b"/".join(parts[:depth]))
            for name in LOCATION_FILES:
                if name in entries:
                    await whole_file(alias, b"/".join(parts + [name]))
            family = b"/".join(parts + [os.fsencode(v["name"])])
            version_dir = family + b"/" + os.fsencode(v["version"]) if v.get("version") else family
            await listing(alias, family)
            entries = await listing(alias, version_dir)
            found = [n for n in DEFINITION_FILES if n in entries]
            if not any(n in entries for n in (b"package.py", b"package.yaml")):
                raise NotFound(f"no package definition in {version_dir.decode(errors='replace')}")
            for name in found:
                await whole_file(alias, version_dir + b"/" + name)
            if HASHED_VARIANTS_DIR in entries and entries[HASHED_VARIANTS_DIR].is_dir:
                await listing(alias, version_dir + b"/" + HASHED_VARIANTS_DIR)
        except NotFound as e:
            raise UserError(f"the context names {qualified}, which the store "
                            f"{repos[alias].store.root} lacks ({e})") from None
        except LazyFSError as e:
            raise UserError(f"cannot read {qualified} from the store or the cache: {e}") from None


async def _collect_trees(repos, deep: DeepData) -> None:
    """The listings of every directory of every variant: with them, a context
    sourced offline from an unpopulated cache finds every file and fails on
    content alone, with an EIO naming the file, rather than on lookups.
    Walked with a stack, not recursion: a tree may be deeper than Python's stack."""
    from cachecore.errors import LazyFSError

    for v in deep.variants:
        alias, pending = v["repo"], [os.fsencode(v["root"])]
        try:
            while pending:
                relpath = pending.pop()
                entries = deep.listings[(alias, relpath)] = await repos[alias].listing(relpath)
                pending.extend(relpath + b"/" + name if relpath else name
                               for name, attr in entries.items() if attr.is_dir)
        except LazyFSError as e:
            raise UserError(f"cannot list {v['name']}-{v['version']}: {e}") from None


async def _first_private(repos, deep: DeepData) -> str | None:
    """An embedded listing or file that not everyone may read in the store,
    or None: the baked file then must not be readable by everyone either.

    A directory's listing is readable by everyone if it and every directory
    above it are searchable by others and it is readable by others; a file
    if its directory is searchable that way and it is readable by others."""
    searchable: dict[tuple[str, bytes], bool] = {}

    async def attr(alias: str, relpath: bytes) -> Attr:
        return await repos[alias].getattr(relpath)

    async def everyone_searches(alias: str, relpath: bytes) -> bool:
        chain = [relpath]
        while chain[-1] and (alias, chain[-1]) not in searchable:
            chain.append(chain[-1].rpartition(b"/")[0])
        for directory in reversed(chain):
            if (alias, directory) not in searchable:
                above = not directory or searchable[(alias, directory.rpartition(b"/")[0])]
                searchable[(alias, directory)] = above and bool(
                    (await attr(alias, directory)).mode & stat.S_IXOTH)
        return searchable[(alias, relpath)]

    for alias, relpath in deep.listings:
        if not (await everyone_searches(alias, relpath)
                and (await attr(alias, relpath)).mode & stat.S_IROTH):
            return display_path(deep.repos[alias], relpath)
    for alias, relpath in deep.files:
        if not (await everyone_searches(alias, relpath.rpartition(b"/")[0])
                and (await attr(alias, relpath)).mode & stat.S_IROTH):
            return display_path(deep.repos[alias], relpath)
    return None


def _variant_roots(baked: dict, deep: DeepData, mirrored: list[dict],
                   store_locations: list[str | None]) -> list[tuple[dict, bool]]:
    """Each mirrored variant's root, relative to its repository, and whether
    rez would cache it (mount/localisable.py), computed by rez itself.

    rez evaluates package.py to find a variant's subpath; we let it do so on a
    private replica of the collected definitions, so neither the store nor a
    running mount is needed. *store_locations*: where each variant's
    repository is in its store (None: a published image).
    """
    from .localisable import as_from_their_repositories

    with tempfile.TemporaryDirectory(prefix="rez-lazyfs-bake-") as tmp:
        replica = os.path.realpath(tmp)
        for (alias, relpath), (_identity, data) in deep.files.items():
            path = os.path.join(os.fsencode(replica), os.fsencode(alias), relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        for (alias, relpath), entries in deep.listings.items():
            if relpath.endswith(b"/" + HASHED_VARIANTS_DIR):
                directory = os.path.join(os.fsencode(replica), os.fsencode(alias), relpath)
                os.makedirs(directory, exist_ok=True)
                for name, attr in entries.items():
                    if attr.is_link:
                        os.symlink(attr.target, os.path.join(directory, name))
        local = {**baked, "resolved_packages": []}
        locations: dict[str, list[str]] = {}  # replica location -> the real ones
        for handle, store_location in zip(mirrored, store_locations):
            copy = json.loads(json.dumps(handle))
            alias, relpath = deep.locate(handle["variables"]["location"])
            copy["variables"]["location"] = os.path.normpath(
                os.path.join(replica, alias, os.fsdecode(relpath)))
            locations[copy["variables"]["location"]] = [
                *filter(None, [store_location]), handle["variables"]["location"]]
            local["resolved_packages"].append(copy)
        with as_from_their_repositories(locations):
            variants = context_variants(local)
        records = []
        for handle, variant in zip(mirrored, variants):
            alias, _ = deep.locate(handle["variables"]["location"])
            root = os.path.relpath(variant.root, os.path.join(replica, alias))
            records.append(({"repo": alias, "name": variant.name, "version": variant.version,
                             "root": "" if root == "." else root}, variant.cachable))
        return records


def _left_in_store(handle: dict, variant: dict, store_location: str | None, warn) -> bool:
    """Point a variant rez would not cache back at its store (REP-003: not
    localisable); False if it has no store path (a published image's)."""
    name = f"{variant['name']}-{variant['version']}".rstrip("-")
    if store_location is None:
        warn(f"rez would not cache {name} (cachable or relocatable is False, or a "
             "default_cachable* setting says so), but its repository is a published image, "
             "which has no store path to leave it at: baked onto the mount")
        return False
    handle["variables"]["location"] = store_location
    warn(f"rez would not cache {name} (cachable or relocatable is False, or a "
         f"default_cachable* setting says so): left at its store path {store_location} "
         "(--force bakes it onto the mount)")
    return True


def _store_location(original: str, deep: DeepData, repos: dict[str, str]) -> str | None:
    """Where a repository the context names (by its location before baking)
    is in its store; None for a published image, which has no such path."""
    alias, inside = deep.locate(original)
    if not alias:
        return original  # the context was resolved against the store itself
    if is_url(repos[alias]):
        return None
    return os.path.normpath(os.path.join(os.path.realpath(repos[alias]), os.fsdecode(inside)))


def bake_context(in_path: str, out_path: str, settings: Settings, *, strict: bool = False,
                 force: bool = False, traces: list | None = None,
                 warn=lambda message: None) -> DeepData:
    """Write a deep copy of IN pointing at the mount; pin its definitions in the cache.
    Variants rez would not cache (mount/localisable.py) stay at their store
    path, with a warning, unless *force*. `traces` (trace.VariantTrace):
    those of the context's variants are embedded and kept in the cache too."""
    import trio

    from . import over
    from .daemon import open_cache, repo_specs
    from .mounts import canonical

    if not settings.repos:
        raise UserError("no repositories configured: give --repo ALIAS=PATH")
    repos = {r.alias: r.path for r in settings.repos}
    # Repositories under transparent mounts keep their paths (their own
    # mount's, canonical as the mount table has it); no repository lives
    # below a transparent mount's path, so `--mount STORE` names only that one.
    transparent = {r.alias: canonical(r.path) for r in settings.repos
                   if r.over or r.path == settings.mountpoint}
    mountpoint = "" if settings.mountpoint in repos.values() else settings.mountpoint
    if not mountpoint and not transparent:
        raise UserError("no mount point: give --mount or set mountpoint in the config")
    doc = load_context(in_path)
    baked, unmapped = rebase_context(doc, repos, mountpoint, transparent)
    if unmapped and strict:
        raise UserError(f"not in any mirrored repository: {', '.join(unmapped)}")
    for name in unmapped:
        warn(f"not in any mirrored repository, left as it is: {name}")
    deep = DeepData(mountpoint=os.path.realpath(mountpoint) if mountpoint else "", repos=repos,
                    over=transparent)
    mirrored, store_locations = [], []
    for h, original in zip(baked["resolved_packages"], doc["resolved_packages"]):
        if (h["variables"].get("repository_type") == "filesystem"
                and deep.locate(h["variables"]["location"])[0]):
            mirrored.append(h)
            store_locations.append(_store_location(original["variables"]["location"], deep,
                                                   repos))
    cache = open_cache(settings)
    try:
        specs = repo_specs(settings, cache)

        async def collect() -> str | None:
            live = over.repositories(cache, specs, metadata_ttl=settings.metadata_ttl,
                                     store_timeout=settings.store_timeout)
            await _collect(live, mirrored, deep)
            # rez evaluates package.py files: a thread, not the event loop.
            found = await trio.to_thread.run_sync(_variant_roots, baked, deep, mirrored,
                                                  store_locations)
            kept = []
            for h, where, (record, cachable) in zip(mirrored, store_locations, found):
                if not (cachable or force) and _left_in_store(h, record, where, warn):
                    continue
                kept.append((h, record))
            if len(kept) < len(mirrored):  # embed only what the variants baked need
                deep.roots.clear()
                deep.listings.clear()
                deep.files.clear()
                await _collect(live, [h for h, _ in kept], deep)
            deep.variants = [record for _, record in kept]
            await _collect_trees(live, deep)
            private = await _first_private(live, deep)
            await cache.flush("bake", cache.totals_of("bake"))
            return private

        private = trio.run(collect)
        deep.traces = _traces_of_variants(deep, traces or [], warn)
        baked[EMBED_KEY] = deep.to_json()
        if private:
            warn(f"{private} is not readable by everyone, and {out_path} embeds it: "
                 "written mode 0600")
        write_context(baked, out_path, mode=0o600 if private else 0o644)
        holder = _holder(out_path)
        cache.index.pin(_pin_name(holder[0]), _file_keys(deep, cache.blocks.block_size), holder)
        _record_variants(cache.index, deep)
        _keep_traces(cache, deep)
    finally:
        cache.close()
    return deep


def _traces_of_variants(deep: DeepData, traces: list, warn) -> list:
    """The traces whose root is a variant of the context (under its alias here:
    a trace recorded under another alias, or with none, matches by root)."""
    from cachecore.trace import merge_all

    by_root: dict[bytes, list[str]] = {}
    for v in deep.variants:
        by_root.setdefault(os.fsencode(v["root"]), []).append(v["repo"])
    kept = []
    for t in traces:
        aliases = by_root.get(t.root, [])
        if not aliases:
            warn(f"the trace of {os.fsdecode(t.root)} is of no variant of the context: left out")
            continue
        kept.append(replace(t, repo=t.repo if t.repo in aliases else aliases[0]))
    merged: dict = {}
    for t in kept:
        merged.setdefault(t.repo, []).append(t)
    return [t for alias in merged for t in merge_all(merged[alias]).values()]


def _record_variants(index, deep: DeepData) -> None:
    """Which subdirectory of a version is a variant: status shows it."""
    for v in deep.variants:
        layout = _layout(v)
        if layout is None:  # not where rez-build puts variants: nothing to show
            continue
        version_dir = os.fsdecode(layout.version_dir)
        index.set_record("v", f"{deep.repos[v['repo']]}:{v['root']}", json.dumps(
            {"store": deep.repos[v["repo"]], "version_dir": version_dir,
             "subpath": v["root"][len(version_dir) + 1:]}))


def _pin_name(ctx_path: str) -> str:
    return "context:" + os.path.realpath(ctx_path)


def _file_keys(deep: DeepData, block_size: int) -> list[str]:
    from cachecore.stores import block_key

    return [block_key(deep.repos[alias], relpath, identity, block_size)
            for (alias, relpath), (identity, _) in deep.files.items()]


# -- seeding ------------------------------------------------------------------
@dataclass
class _Seeding:
    """What seeding writes for one repository, and whether its store vouched for it."""

    store: str
    verified: bool
    root: Attr | None
    listings: dict[bytes, dict[bytes, Attr]]
    files: dict[bytes, tuple[tuple[int, ...], bytes]]


def seed_context(ctx_path: str, settings: Settings, *, warn=lambda message: None) -> tuple[int, int]:
    """Put a baked context's definitions and listings into the cache, checked
    against the store when it answers (the module docstring).

    Blocks are keyed by file identity, so a seeded block can never stand for
    other bytes. Returns (listings written, files written)."""
    from .daemon import open_cache

    deep, holder = load_baked(ctx_path)
    cache = open_cache(settings)
    try:
        return _seed(cache, deep, holder, settings, warn)[1]
    finally:
        cache.close()


def _seed(cache, deep: DeepData, holder, settings: Settings, warn) -> tuple[DeepData, tuple[int, int]]:
    """Seed the cache; returns the section with this machine's store paths, and counts."""
    import trio

    deep = replace(deep, repos=store_paths(deep, settings, cache, warn))
    seedings = trio.run(_gather, cache, deep, settings, warn)
    listings, keys = _write_seedings(cache, seedings)
    cache.index.pin(_pin_name(holder[0]), keys, holder)
    _keep_traces(cache, deep)
    return deep, (listings, len(keys), len(deep.traces))


def _keep_traces(cache, deep: DeepData) -> None:
    """The section's launch traces, into the index for the stores of this machine."""
    from cachecore.stores import store_id

    for t in deep.traces:
        cache.index.put_trace(store_id(deep.repos[t.repo]), t)


def store_paths(deep: DeepData, settings: Settings, cache, warn) -> dict[str, str]:
    """alias -> the store path seeding files the section's data under.

    What this machine says (--repo, the config, then what the cache records)
    outranks what the section names: the section cannot repoint an alias the
    cache knows, and is never recorded as the cache's repositories."""
    given = {r.alias: (r.path, "--repo/the config") for r in settings.repos}
    recorded = {s.alias: (s.path, "this cache's record") for s in cache.recorded_repos()}
    chosen = {}
    for alias, named in deep.repos.items():
        path, source = given.get(alias) or recorded.get(alias) or (named, "")
        if path != named:
            warn(f"repository {alias!r}: the context was baked against {named}; "
                 f"using {path} ({source})")
        chosen[alias] = path
    return chosen


async def _gather(cache, deep: DeepData, settings: Settings, warn) -> list[_Seeding]:
    """Per repository, what to seed: what its store holds of what the section
    names if the store answers, else the section's own data."""
    from cachecore.errors import LazyFSError

    from . import over

    repos = over.repositories(cache, _specs(deep, settings, cache),
                              metadata_ttl=settings.metadata_ttl,
                              store_timeout=settings.store_timeout,
                              store_threads=settings.store_threads)
    seedings = []
    for alias, path in deep.repos.items():
        embedded = _Seeding(path, False, deep.roots.get(alias),
                            {rel: e for (a, rel), e in deep.listings.items() if a == alias},
                            {rel: f for (a, rel), f in deep.files.items() if a == alias})
        if not embedded.listings and not embedded.files:
            continue  # a repository the baking machine had but the context does not use
        store = repos[alias].store
        try:
            root = await cache.fetcher.call_store(store, path, store.stat_root)
            if await cache.fetcher.call_store(store, path, store.root_is_empty):
                raise LazyFSError(f"{path} is empty: its filesystem is probably not mounted")
        except LazyFSError as e:
            warn(f"repository {alias!r}: {e}; seeded what the context embeds, unchecked")
            seedings.append(embedded)
            continue
        seedings.append(await _from_store(cache.fetcher, store, root, embedded,
                                          settings.store_threads, warn))
    return seedings


async def _from_store(fetcher, store, root: Attr, embedded: _Seeding, workers: int,
                      warn) -> _Seeding:
    """The store's own versions of the listings and files *embedded* names."""
    from cachecore.errors import LazyFSError, NotADirectory, NotFound

    checked = _Seeding(embedded.store, True, root, {}, {})
    differ, gone = [], []

    async def list_dir(relpath: bytes) -> None:
        try:
            entries = await fetcher.call_store(store, display_path(store.root, relpath),
                                               store.list_dir, relpath)
        except (NotFound, NotADirectory):
            gone.append(relpath)
            return
        checked.listings[relpath] = entries
        if _without_atimes(entries) != _without_atimes(embedded.listings[relpath]):
            differ.append(relpath)

    async def read_file(relpath: bytes) -> None:
        parent, _, name = relpath.rpartition(b"/")
        attr = checked.listings.get(parent, {}).get(name)
        if attr is None or not attr.is_file:
            gone.append(relpath)
            return
        data = await fetcher.call_store(store, display_path(store.root, relpath),
                                        store.read, relpath, attr.identity, 0, attr.size)
        checked.files[relpath] = (attr.identity, data)
        if checked.files[relpath] != embedded.files[relpath]:
            differ.append(relpath)

    try:
        await _each(embedded.listings, list_dir, workers)
        await _each(embedded.files, read_file, workers)  # after: they need the listings
    except LazyFSError as e:
        raise UserError(f"the store failed while seeding from it, so nothing was written "
                        f"(run the command again): {e}") from None
    if differ or gone:
        first = display_path(store.root, sorted(differ or gone)[0])
        warn(f"{len(differ)} listing(s) or file(s) the context embeds differ from the store "
             f"{store.root} and {len(gone)} are no longer in it (first: {first}); "
             "seeded what the store holds")
    return checked


def _without_atimes(entries: dict[bytes, Attr]) -> dict[bytes, Attr]:
    # Reading a file or listing a directory may move its atime (bake itself
    # reads the definitions): not a difference in what the store holds.
    return {name: attr._replace(atime_ns=0) for name, attr in entries.items()}


async def _each(items, work, workers: int) -> None:
    """await work(item) for each item, *workers* at a time; the first
    LazyFSError stops the rest and is raised."""
    import trio

    from cachecore.errors import LazyFSError

    pending = iter(list(items))
    failed: list[LazyFSError] = []

    async def worker() -> None:
        for item in pending:
            try:
                await work(item)
            except LazyFSError as e:
                failed.append(e)
            if failed:
                return

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    if failed:
        raise failed[0]


def _write_seedings(cache, seedings: list[_Seeding]) -> tuple[int, list[str]]:
    """Write what was gathered; returns (listings written, file keys written).

    What a store vouched for replaces what the index holds; a section's own
    data only fills gaps, with a time of 0 so that directories revalidated
    by metadata_ttl are relisted as soon as the store answers."""
    from cachecore.blocks import unverified_key
    from cachecore.stores import block_key

    index, blocks, bs = cache.index, cache.blocks, cache.blocks.block_size
    now = time.time()
    listings, keys = 0, []
    for s in seedings:
        fetched_at = now if s.verified else 0.0
        if s.root is not None and (s.verified or index.get_root(s.store) is None):
            index.put_root(s.store, s.root, fetched_at)
        for relpath, entries in s.listings.items():
            if s.verified or index.get_listing(s.store, relpath) is None:
                index.put_listing(s.store, relpath, entries, fetched_at)
                listings += 1
        for relpath, (identity, data) in s.files.items():
            key = block_key(s.store, relpath, identity, bs)
            if not s.verified:
                key = unverified_key(key)  # never taken for the store's bytes
            for n, offset in enumerate(range(0, len(data), bs)):
                if blocks.read(key, n, min(bs, len(data) - offset)) is None:
                    blocks.write(key, n, data[offset:offset + bs])
            keys.append(key)
    return listings, keys


def _specs(deep: DeepData, settings: Settings, cache) -> list:
    """The section's repositories as this machine reaches them: with the
    public key and proxies the settings (else the cache's record) give a
    published image."""
    from cachecore.cache import RepoSpec

    known = {(r.alias, r.path): RepoSpec(r.alias, r.path, r.mutable, r.public_key, r.proxy)
             for r in settings.repos}
    for spec in cache.recorded_repos():
        known.setdefault((spec.alias, spec.path), spec)
    return [known.get((alias, path), RepoSpec(alias, path)) for alias, path in deep.repos.items()]


# -- populating ---------------------------------------------------------------
def populate_context(ctx_path: str, settings: Settings, *, progress: bool | None = None,
                     warn=lambda message: None) -> dict:
    """Seed, then fetch every payload block of every variant of a baked context.
    Resumable: blocks already cached are skipped. Returns counts."""
    from .daemon import open_cache

    deep, holder = load_baked(ctx_path)
    cache = open_cache(settings)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        specs, roots = seed_for_populating(cache, deep, holder, settings, warn)
        return populate_trees(cache, specs, roots, settings, show=show, what="the context")
    finally:
        cache.close()


def seed_for_populating(cache, deep: DeepData, holder, settings: Settings,
                        warn) -> tuple[list, set[tuple[str, bytes]]]:
    """Seed a loaded baked context (load_baked); returns its repositories as
    this machine reaches them, and its variant roots: what populate_trees takes."""
    deep, _ = _seed(cache, deep, holder, settings, warn)
    return (_specs(deep, settings, cache),
            {(v["repo"], os.fsencode(v["root"])) for v in deep.variants})


def populate_trees(cache, specs, roots: set[tuple[str, bytes]], settings: Settings, *,
                   show: bool, what: str) -> dict:
    """Fetch every block of every file below *roots* ((alias, path) in the
    repositories *specs* name) that the cache lacks. *what* they are, for
    the refusal when they do not fit. Returns counts."""
    import trio

    return trio.run(_populate, cache, specs, roots, settings, show, what)


async def _populate(cache, specs, roots: set[tuple[str, bytes]], settings: Settings, show: bool,
                    what: str) -> dict:
    import click
    import trio

    from cachecore.errors import LazyFSError

    from . import over

    repos = over.repositories(cache, specs, metadata_ttl=settings.metadata_ttl,
                              store_timeout=settings.store_timeout,
                              store_threads=settings.store_threads)
    files = []  # (repo, FileVersion)
    try:
        for alias, root in sorted(roots):
            repo, pending = repos[alias], [root]
            while pending:  # a stack, not recursion: a tree may be deeper than Python's stack
                relpath = pending.pop()
                for name, attr in (await repo.readdir(relpath)).items():
                    child = relpath + b"/" + name if relpath else name
                    if attr.is_dir:
                        pending.append(child)
                    elif attr.is_file:
                        files.append((repo, await repo.open(child)))
    except LazyFSError as e:
        raise UserError(f"cannot list the files of {what}: {e}") from None

    bs = cache.blocks.block_size
    missing = []  # (repo, version, block index, length)
    for repo, version in files:
        present = set(cache.blocks.present(version.key, version.size))
        for index, offset in enumerate(range(0, version.size, bs)):
            if index not in present:
                missing.append((repo, version, index, min(bs, version.size - offset)))
    needed = sum(m[3] for m in missing)
    _check_room(settings, cache, needed, what)

    fetched = {"files": len(files), "blocks_fetched": 0, "bytes_fetched": 0,
               "blocks_already_cached": sum(-(-v.size // bs) for _, v in files) - len(missing)}
    bar = click.progressbar(length=needed, label="populating", file=sys.stderr,
                            show_pos=True, item_show_func=None) if show else None
    limiter = trio.CapacityLimiter(settings.store_threads)
    errors: list[str] = []

    async def fetch(repo, version, index, length):
        async with limiter:
            try:
                await repo.fetcher.fetch_block(version, index)
            except LazyFSError as e:
                errors.append(str(e))
                return
        fetched["blocks_fetched"] += 1
        fetched["bytes_fetched"] += length
        if bar is not None:
            bar.update(length)

    async with trio.open_nursery() as nursery:
        for item in missing:
            nursery.start_soon(fetch, *item)
    if bar is not None:
        bar.render_finish()
    await cache.flush("populate", cache.totals_of("populate"))
    if errors:
        raise UserError(f"{len(errors)} block(s) could not be fetched (run populate again to "
                        f"resume); first: {errors[0]}")
    return fetched


def _check_room(settings: Settings, cache, needed: int, what: str) -> None:
    free = shutil.disk_usage(cache.directory).free
    if needed > free:
        raise UserError(f"{what} needs {_human(needed)} more in the cache but "
                        f"{cache.directory} has only {_human(free)} free")
    if settings.cache_limit:
        from cachecore.clean import scan_cache

        used = sum(f.bytes for f in scan_cache(cache.blocks, cache.index).values())
        if used + needed > settings.cache_limit:
            raise UserError(f"{what} needs {_human(needed)} more in the cache, which holds "
                            f"{_human(used)} of its {_human(settings.cache_limit)} limit")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# -- exporting ----------------------------------------------------------------
def export_context(in_path: str, out_dir: str, settings: Settings, *, warn=lambda m: None) -> dict:
    """REP-003's standalone context: DIR/context.rxt plus DIR/cache holding exactly
    its variants, populated, and DIR/rez-lazyfs.toml to mount it offline."""
    out_dir = os.path.abspath(out_dir)
    created = not os.path.exists(out_dir)
    if not created and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir} exists and is not an empty directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror}") from None
    own = replace(settings, cache_dir=os.path.join(out_dir, "cache"), cache_limit=0,
                  log_file=os.path.join(out_dir, "cache", "logs", "daemon.log"))
    context = os.path.join(out_dir, "context.rxt")
    try:
        bake_context(in_path, context, own, warn=warn)
        counts = populate_context(context, own, warn=warn)
        with open(os.path.join(out_dir, "rez-lazyfs.toml"), "w") as f:
            f.write(f"# Mount this standalone context with no store and no network:\n"
                    f"#   rez-lazyfs mount {own.mountpoint} --config {out_dir}/rez-lazyfs.toml\n"
                    f"#   rez-env --input {context} -- CMD\n"
                    f"cache = \"cache\"\noffline = true\nmountpoint = {json.dumps(own.mountpoint)}\n\n"
                    f"[repos]\n" + "".join(_exported_repo(r, out_dir) for r in own.repos))
    except BaseException:
        shutil.rmtree(out_dir) if created else _empty(out_dir)
        raise
    return counts


def _exported_repo(r, out_dir: str) -> str:
    """The config line of one repository of an export; a published image's
    public key travels with it (offline mounts still check what they load)."""
    if not is_url(r.path):
        return f"{r.alias} = {json.dumps(r.path)}\n"
    key = f"{r.alias}.pub"
    shutil.copyfile(r.public_key, os.path.join(out_dir, key))
    return f"{r.alias} = {{ url = {json.dumps(r.path)}, public_key = {json.dumps(key)} }}\n"


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
