"""Deep contexts: bake, seed, populate and export (DESIGN.md, "Deep contexts").

rez re-reads each variant's package definition from its handle's location
whenever a context is sourced (docs/rxt-format.md). Baking points those
locations at the mount and makes sure that what rez reads there (the
repository, family and version directory listings, the definition files, a
hashed variant's `_v` links) is in the local cache, pinned, and embedded in
the baked file so another machine can seed its own cache from the file alone.
Everything goes through cachecore, so the store is consulted only for what
the cache lacks.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace

from .config import Settings
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
    roots: dict[str, bytes] = field(default_factory=dict)   # alias -> encoded root attr
    listings: dict[tuple[str, bytes], bytes] = field(default_factory=dict)  # encoded entries
    # (alias, path) -> (Attr.identity, bytes)
    files: dict[tuple[str, bytes], tuple[tuple[int, ...], bytes]] = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)      # repo, name, version, root

    def to_json(self) -> dict:
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return {
            "format": EMBED_FORMAT, "mountpoint": self.mountpoint, "repos": self.repos,
            "roots": {alias: b64(blob) for alias, blob in self.roots.items()},
            "listings": [{"repo": a, "path": os.fsdecode(p), "entries": b64(blob)}
                         for (a, p), blob in sorted(self.listings.items())],
            "files": [{"repo": a, "path": os.fsdecode(p), "identity": list(identity),
                       "data": b64(data)}
                      for (a, p), (identity, data) in sorted(self.files.items())],
            "variants": self.variants,
        }

    @classmethod
    def from_context(cls, doc: dict, path: str) -> DeepData:
        raw = doc.get(EMBED_KEY)
        if not isinstance(raw, dict):
            raise UserError(f"{path} was not baked by rez-lazyfs (run rez-lazyfs bake first)")
        if raw.get("format") != EMBED_FORMAT:
            raise UserError(f"{path}: unsupported rez-lazyfs section format {raw.get('format')!r}")
        try:
            dec = base64.b64decode
            return cls(
                mountpoint=raw["mountpoint"], repos=dict(raw["repos"]),
                roots={a: dec(v) for a, v in raw["roots"].items()},
                listings={(x["repo"], os.fsencode(x["path"])): dec(x["entries"])
                          for x in raw["listings"]},
                files={(x["repo"], os.fsencode(x["path"])): (tuple(x["identity"]), dec(x["data"]))
                       for x in raw["files"]},
                variants=list(raw["variants"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: damaged rez-lazyfs section ({e})") from None


def _repo_relative(location: str, mount_root: str) -> tuple[str, bytes]:
    """(alias, path inside the repository) of a location under the mount; alias
    is '' for a location elsewhere."""
    rel = os.path.relpath(location, mount_root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return "", b""
    alias, _, rest = rel.partition(os.sep)
    return alias, os.fsencode(rest)


async def _collect(repos, handles, mount_root: str, deep: DeepData) -> None:
    """Read through the cache everything rez reads to source these variants."""
    from cachecore.errors import LazyFSError, NotFound
    from cachecore.model import encode_listing

    async def listing(alias: str, relpath: bytes) -> dict:
        entries = await repos[alias].listing(relpath)
        deep.listings[(alias, relpath)] = encode_listing(entries, 0.0)
        return entries

    async def whole_file(alias: str, relpath: bytes) -> None:
        repo = repos[alias]
        version = await repo.open(relpath)
        data = bytes(await repo.read(version, 0, version.size))
        deep.files[(alias, relpath)] = (version.identity, data)

    for alias, repo in repos.items():
        deep.roots[alias] = encode_listing({b".": await repo.root_attr()}, 0.0)
    for handle in handles:
        v = handle["variables"]
        alias, location = _repo_relative(v["location"], mount_root)
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
    content alone, with an EIO naming the file, rather than on lookups."""
    from cachecore.errors import LazyFSError
    from cachecore.model import encode_listing

    async def walk(alias: str, relpath: bytes) -> None:
        entries = await repos[alias].listing(relpath)
        deep.listings[(alias, relpath)] = encode_listing(entries, 0.0)
        for name, attr in entries.items():
            if attr.is_dir:
                await walk(alias, relpath + b"/" + name if relpath else name)

    for v in deep.variants:
        try:
            await walk(v["repo"], os.fsencode(v["root"]))
        except LazyFSError as e:
            raise UserError(f"cannot list {v['name']}-{v['version']}: {e}") from None


def _variant_roots(baked: dict, deep: DeepData, mirrored: list[dict]) -> list[dict]:
    """Each mirrored variant's root, relative to its repository, computed by rez itself.

    rez evaluates package.py to find a variant's subpath; we let it do so on a
    private replica of the collected definitions, so neither the store nor a
    running mount is needed.
    """
    with tempfile.TemporaryDirectory(prefix="rez-lazyfs-bake-") as tmp:
        replica = os.path.realpath(tmp)
        for (alias, relpath), (_identity, data) in deep.files.items():
            path = os.path.join(os.fsencode(replica), os.fsencode(alias), relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        from cachecore.model import decode_listing
        for (alias, relpath), blob in deep.listings.items():
            if relpath.endswith(b"/" + HASHED_VARIANTS_DIR):
                directory = os.path.join(os.fsencode(replica), os.fsencode(alias), relpath)
                os.makedirs(directory, exist_ok=True)
                for name, attr in decode_listing(blob)[0].items():
                    if attr.is_link:
                        os.symlink(attr.target, os.path.join(directory, name))
        local = {**baked, "resolved_packages": []}
        for handle in mirrored:
            copy = json.loads(json.dumps(handle))
            copy["variables"]["location"] = os.path.join(
                replica, os.path.relpath(handle["variables"]["location"], deep.mountpoint))
            local["resolved_packages"].append(copy)
        records = []
        for handle, variant in zip(mirrored, context_variants(local)):
            alias, _ = _repo_relative(handle["variables"]["location"], deep.mountpoint)
            root = os.path.relpath(variant.root, os.path.join(replica, alias))
            records.append({"repo": alias, "name": variant.name, "version": variant.version,
                            "root": "" if root == "." else root})
        return records


def bake_context(in_path: str, out_path: str, settings: Settings, *, strict: bool = False,
                 warn=lambda message: None) -> DeepData:
    """Write a deep copy of IN pointing at the mount; pin its definitions in the cache."""
    import trio

    from .daemon import open_cache, repo_specs

    if not settings.mountpoint:
        raise UserError("no mount point: give --mount or set mountpoint in the config")
    if not settings.repos:
        raise UserError("no repositories configured: give --repo ALIAS=PATH")
    doc = load_context(in_path)
    repos = {r.alias: r.path for r in settings.repos}
    baked, unmapped = rebase_context(doc, repos, settings.mountpoint)
    if unmapped and strict:
        raise UserError(f"not in any mirrored repository: {', '.join(unmapped)}")
    for name in unmapped:
        warn(f"not in any mirrored repository, left as it is: {name}")
    mount_root = os.path.realpath(settings.mountpoint)
    mirrored = [h for h in baked["resolved_packages"]
                if h["variables"].get("repository_type") == "filesystem"
                and _repo_relative(h["variables"]["location"], mount_root)[0] in repos]
    deep = DeepData(mountpoint=mount_root, repos=repos)
    cache = open_cache(settings)
    try:
        specs = repo_specs(settings, cache)

        async def collect():
            live = cache.repositories(specs, metadata_ttl=settings.metadata_ttl,
                                      store_timeout=settings.store_timeout)
            await _collect(live, mirrored, mount_root, deep)
            # rez evaluates package.py files: a thread, not the event loop.
            deep.variants = await trio.to_thread.run_sync(_variant_roots, baked, deep, mirrored)
            await _collect_trees(live, deep)
            await cache.flush("bake", cache.totals_of("bake"))

        trio.run(collect)
        baked[EMBED_KEY] = deep.to_json()
        write_context(baked, out_path)
        cache.index.pin(_pin_name(out_path), _file_keys(deep, cache.blocks.block_size))
        _record_variants(cache.index, deep)
    finally:
        cache.close()
    return deep


def _record_variants(index, deep: DeepData) -> None:
    """Which subdirectory of a version is a variant: status shows it."""
    for v in deep.variants:
        version_dir, subpath = _split_variant_root(v["root"], v["name"], v["version"])
        index.set_record("v", f"{deep.repos[v['repo']]}:{v['root']}", json.dumps(
            {"store": deep.repos[v["repo"]], "version_dir": version_dir, "subpath": subpath}))


def _split_variant_root(root: str, name: str, version: str) -> tuple[str, str]:
    """'loc/maya/2024.2/python-3' -> ('loc/maya/2024.2', 'python-3')."""
    parts = root.split("/")
    head = [name, version] if version else [name]
    for i in range(len(parts) - len(head), -1, -1):
        if parts[i:i + len(head)] == head:
            return "/".join(parts[:i + len(head)]), "/".join(parts[i + len(head):])
    return root, ""


def _pin_name(ctx_path: str) -> str:
    return "context:" + os.path.realpath(ctx_path)


def _file_keys(deep: DeepData, block_size: int) -> list[str]:
    from cachecore.blocks import file_key

    return [file_key(deep.repos[alias], relpath, identity, block_size)
            for (alias, relpath), (identity, _) in deep.files.items()]


# -- seeding ------------------------------------------------------------------
def seed_context(ctx_path: str, settings: Settings) -> tuple[int, int]:
    """Put a baked context's embedded definitions into the cache.

    Listings already in the cache are kept (they may be newer); blocks are
    keyed by file identity, so a seeded block can never stand for other bytes.
    Returns (listings added, files added).
    """
    from cachecore.blocks import file_key
    from cachecore.cache import RepoSpec
    from cachecore.model import decode_listing

    from .daemon import open_cache

    deep = DeepData.from_context(load_context(ctx_path), ctx_path)
    cache = open_cache(settings)
    added_listings = added_files = 0
    try:
        cache.record_repos([RepoSpec(a, p) for a, p in deep.repos.items()])
        for alias, blob in deep.roots.items():
            if cache.index.get_root(deep.repos[alias]) is None:
                cache.index.put_root(deep.repos[alias], decode_listing(blob)[0][b"."], 0.0)
        for (alias, relpath), blob in deep.listings.items():
            store = deep.repos[alias]
            if cache.index.get_listing(store, relpath) is None:
                cache.index.put_listing(store, relpath, decode_listing(blob)[0], 0.0)
                added_listings += 1
        bs = cache.blocks.block_size
        for (alias, relpath), (identity, data) in deep.files.items():
            size = identity[0]
            if len(data) != size:
                raise UserError(f"{ctx_path}: embedded {os.fsdecode(relpath)} is damaged")
            key = file_key(deep.repos[alias], relpath, identity, bs)
            for index, offset in enumerate(range(0, size, bs)):
                if cache.blocks.read(key, index, min(bs, size - offset)) is None:
                    cache.blocks.write(key, index, data[offset:offset + bs])
            added_files += 1
        cache.index.pin(_pin_name(ctx_path), _file_keys(deep, bs))
    finally:
        cache.close()
    return added_listings, added_files


# -- populating ---------------------------------------------------------------
def populate_context(ctx_path: str, settings: Settings, *, progress: bool | None = None) -> dict:
    """Fetch every payload block of every variant of a baked context. Resumable:
    blocks already cached are skipped. Returns counts."""
    import trio

    from cachecore.cache import RepoSpec

    from .daemon import open_cache

    seed_context(ctx_path, settings)
    deep = DeepData.from_context(load_context(ctx_path), ctx_path)
    specs = [RepoSpec(a, p) for a, p in deep.repos.items()]
    cache = open_cache(settings)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        return trio.run(_populate, cache, specs, deep, settings, show)
    finally:
        cache.close()


async def _populate(cache, specs, deep: DeepData, settings: Settings, show: bool) -> dict:
    import click
    import trio

    from cachecore.errors import LazyFSError

    repos = cache.repositories(specs, metadata_ttl=settings.metadata_ttl,
                               store_timeout=settings.store_timeout,
                               store_threads=settings.store_threads)
    files = []  # (repo, FileVersion)
    seen = set()

    async def walk(repo, relpath: bytes):
        for name, attr in (await repo.readdir(relpath)).items():
            child = relpath + b"/" + name if relpath else name
            if attr.is_dir:
                await walk(repo, child)
            elif attr.is_file:
                files.append((repo, await repo.open(child)))

    try:
        for v in deep.variants:
            root = (v["repo"], v["root"])
            if root not in seen:
                seen.add(root)
                await walk(repos[v["repo"]], os.fsencode(v["root"]))
    except LazyFSError as e:
        raise UserError(f"cannot list the context's variants: {e}") from None

    bs = cache.blocks.block_size
    missing = []  # (repo, version, block index, length)
    for repo, version in files:
        present = set(cache.blocks.present(version.key, version.size))
        for index, offset in enumerate(range(0, version.size, bs)):
            if index not in present:
                missing.append((repo, version, index, min(bs, version.size - offset)))
    needed = sum(m[3] for m in missing)
    _check_room(settings, cache, needed)

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


def _check_room(settings: Settings, cache, needed: int) -> None:
    free = shutil.disk_usage(cache.directory).free
    if needed > free:
        raise UserError(f"the context needs {_human(needed)} more in the cache but "
                        f"{cache.directory} has only {_human(free)} free")
    if settings.cache_limit:
        from cachecore.clean import scan_cache

        used = sum(f.bytes for f in scan_cache(cache.blocks, cache.index).values())
        if used + needed > settings.cache_limit:
            raise UserError(f"the context needs {_human(needed)} more in the cache, which holds "
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
        counts = populate_context(context, own)
        with open(os.path.join(out_dir, "rez-lazyfs.toml"), "w") as f:
            f.write(f"# Mount this standalone context with no store and no network:\n"
                    f"#   rez-lazyfs mount {own.mountpoint} --config {out_dir}/rez-lazyfs.toml\n"
                    f"#   rez-env --input {context} -- CMD\n"
                    f"cache = \"cache\"\noffline = true\nmountpoint = {json.dumps(own.mountpoint)}\n\n"
                    f"[repos]\n" + "".join(f"{alias} = {json.dumps(path)}\n"
                                          for alias, path in
                                          ((r.alias, r.path) for r in own.repos)))
    except BaseException:
        shutil.rmtree(out_dir) if created else _empty(out_dir)
        raise
    return counts


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
