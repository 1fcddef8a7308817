"""status, stats, clean and logs: what is cached, how well it works, keeping it bounded.

Each returns plain data (what `--json` prints); the CLI renders the same data
as a table, so the two never disagree.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Settings, parse_size
from .errors import UserError
from .mounts import PROBE_TIMEOUT, NoAnswer, ask, mount_table, silence

if TYPE_CHECKING:
    from cachecore.stats import Counters

TOTALS_XATTR = "user.rezlazyfs.stats.total"


def _open_existing(settings: Settings):
    from .daemon import open_cache

    if not os.path.isdir(os.path.join(settings.cache_dir, "index")):
        raise UserError(f"no rez-lazyfs cache at {settings.cache_dir}")
    return open_cache(settings)


def _live_mounts() -> set[str]:
    """Mount points of running rez-lazyfs mounts (from the mount table: asks no mount)."""
    return {m.path for m in mount_table() if m.fstype == "fuse.rez-lazyfs"}


def _flush_running_mounts(settings: Settings, cache) -> list[str]:
    """Have the running mounts of this cache write the uses they noted, so a
    file read a moment ago is attributed (mount/running.py); warnings."""
    from .running import flush_mounts_of

    recorded = {name[len("mount:"):] for name in cache.stored_totals() if name.startswith("mount:")}
    return flush_mounts_of(settings.cache_dir, recorded & _live_mounts())


# -- status -------------------------------------------------------------------
def cache_status(settings: Settings) -> dict:
    from cachecore.clean import pinned_files, release_orphaned_pins, scan_cache

    from .pins import pins_held

    cache = _open_existing(settings)
    try:
        warnings = _flush_running_mounts(settings, cache)
        held = release_orphaned_pins(cache.index)  # so PINNED shows what is pinned
        pinned = pinned_files(cache.index, cache.blocks.block_size)
        files = scan_cache(cache.blocks, cache.index, pins=pinned)

        def cached_bytes(f) -> int:
            return _payload_bytes(cache.blocks, f) if f.info else f.bytes

        repos = {r.path: r.alias for r in cache.recorded_repos()}
        mounts = sorted(((rec.get("updated", 0), name[len("mount:"):])
                         for name, rec in cache.stored_totals().items() if name.startswith("mount:")),
                        reverse=True)
        # A mount at a store's own path is that store's transparent mount.
        over = {mp for _, mp in mounts if mp in repos}
        mountpoint = next((mp for _, mp in mounts if mp not in over), None)
        variants = {}
        for text in cache.index.records("v").values():
            v = json.loads(text)
            variants.setdefault((v["store"], v["version_dir"]), set()).add(v["subpath"] or "-")
        rows: dict[tuple[str, str, str], dict] = {}
        traced: dict[tuple[str, str], set[str]] = {}  # (store, version dir) -> variants traced
        for store, root in cache.index.traced():
            family, version, *subpath = os.fsdecode(root).split("/")
            traced.setdefault((store, f"{family}/{version}"), set()).add("/".join(subpath) or "-")
            rows.setdefault((store, family, version), _empty_row())
        for f in files.values():
            if f.info is None:
                key = ("", "(unattributed)", "")
            else:
                parts = f.info["path"].split("/")
                key = (f.info["store"], parts[0], parts[1] if len(parts) > 2 else "")
            row = rows.setdefault(key, _empty_row())
            row["bytes_cached"] += cached_bytes(f)
            row["files_cached"] += 1
            row["last_used"] = max(row["last_used"], f.last_used)
            row["pinned"] |= f.pinned
        for store, path in pinned.by_path:  # a pinned package version shows, cached or not
            if cache.index.get_listing(store, os.fsencode(path)) is not None:  # a directory
                family, _, below = path.partition("/")
                rows.setdefault((store, family, below.partition("/")[0]),
                                _empty_row())["pinned"] = True
        out = []
        for (store, family, version), row in sorted(rows.items()):
            relpath = f"{family}/{version}" if version else family
            files_total, bytes_total, complete = _indexed_size(cache.index, store, relpath)
            alias = repos.get(store)
            out.append({
                "package": family, "version": version,
                "variants": sorted(variants.get((store, relpath), {"-"})),
                "traces": sorted(traced.get((store, relpath), ())),
                "store_path": os.path.join(store, relpath) if store else "",
                "local_path": os.path.join(store, relpath) if store in over else
                os.path.join(mountpoint, alias, relpath) if mountpoint and alias else "",
                **row, "files_total": files_total, "bytes_total": bytes_total,
                "totals_complete": complete,
            })
        return {"cache_dir": settings.cache_dir,
                "size_bytes": sum(f.bytes for f in files.values()),
                "limit_bytes": settings.cache_limit or None, "variants": out,
                "released_pins": len(held.released), "unanswered_pins": len(held.unanswered),
                "warnings": warnings,
                "pins": pins_held(cache.index, pinned, files, cached_bytes)}
    finally:
        cache.close()


def _empty_row() -> dict:
    return {"bytes_cached": 0, "files_cached": 0, "last_used": 0.0, "pinned": False}


def _payload_bytes(blocks, f) -> int:
    """Bytes of the store file held in its cache file (not allocation, not trailers)."""
    size, bs = f.info["size"], blocks.block_size
    return sum(min(bs, size - i * bs) for i in blocks.present(f.key, size))


def _indexed_size(index, store: str, relpath: str) -> tuple[int, int, bool]:
    """Files and bytes below relpath as far as the index knows; complete is
    False if some directory below it was never listed."""
    files = size = 0
    complete = True
    stack = [os.fsencode(relpath)]
    while stack:
        directory = stack.pop()
        found = index.get_listing(store, directory)
        if found is None:
            complete = False
            continue
        for name, attr in found[0].items():
            if attr.is_dir:
                stack.append(directory + b"/" + name)
            elif attr.is_file:
                files += 1
                size += attr.size
    return files, size, complete


# -- stats --------------------------------------------------------------------
@dataclass
class StatsSource:
    """One mount's (or command's) figures, as `stats` shows them."""

    counters: Counters       # every run of it, in total
    running: bool            # asked live: exact to the last read
    updated: float | None    # when they were last saved in the cache
    stores: dict             # a running mount's stores' own counters, per alias


def stats_sources(settings: Settings) -> tuple[dict[str, StatsSource], list[str]]:
    """The figures of each mount (and of each command that fetched), by name
    ("mount:MOUNTPOINT", "bake", ...), and warnings about mounts that did not answer.

    A running mount is asked directly (its totals xattr), so its figures are
    exact to the last read; others come from what they stored in the cache.
    """
    from cachecore.stats import Counters

    cache = _open_existing(settings)
    try:
        stored = cache.stored_totals()
    finally:
        cache.close()
    live = _live_mounts()
    sources = {}
    warnings = []
    for name, record in sorted(stored.items()):
        counters = Counters.from_record(record["counters"])
        running = False
        traffic = {}  # published images count their own requests
        mountpoint = name[len("mount:"):]
        if name.startswith("mount:") and mountpoint in live:
            try:
                live_record = json.loads(ask(PROBE_TIMEOUT, os.getxattr, mountpoint, TOTALS_XATTR))
                counters, running = Counters.from_record(live_record), True
                traffic = live_record.get("stores", {})
            except NoAnswer:
                warnings.append(f"{silence(mountpoint, PROBE_TIMEOUT)}; its figures are "
                                "from its last save")
            except OSError:
                pass  # another mount at that path, or it just went away
        sources[name] = StatsSource(counters, running, record.get("updated"), traffic)
    return sources, warnings


def cache_stats(settings: Settings) -> dict:
    """Totals per mount (and per command that fetched), and over all of them."""
    from cachecore.stats import Counters

    sources, warnings = stats_sources(settings)
    total = Counters()
    for source in sources.values():
        total = total + source.counters
    return {"cache_dir": settings.cache_dir,
            "sources": [{"name": name, "running": s.running, "updated": s.updated,
                         **s.counters.summary(), **({"stores": s.stores} if s.stores else {})}
                        for name, s in sources.items()],
            "total": total.summary(), "warnings": warnings}


# -- clean --------------------------------------------------------------------
def clean(settings: Settings, *, max_size: str | None, max_days: float | None,
          dry_run: bool, progress: bool | None = None) -> dict:
    import click

    from cachecore.clean import clean_cache, scan_cache

    limit = parse_size(max_size) if max_size is not None else (settings.cache_limit or None)
    if limit is None and max_days is None:
        raise UserError("nothing to clean to: give --max-size and/or --max-days "
                        "(or set cache_limit in the config)")
    if max_days is not None and max_days < 0:
        raise UserError("--max-days must be >= 0")
    cache = _open_existing(settings)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        warnings = _flush_running_mounts(settings, cache)
        if show:
            size = sum(f.bytes for f in scan_cache(cache.blocks, cache.index).values())
            with click.progressbar(length=max(size - (limit or 0), 0) or 1, label="cleaning",
                                   file=sys.stderr) as bar:
                report = clean_cache(cache.blocks, cache.index, max_size=limit,
                                     max_days=max_days, dry_run=dry_run, progress=bar.update)
        else:
            report = clean_cache(cache.blocks, cache.index, max_size=limit,
                                 max_days=max_days, dry_run=dry_run)
    finally:
        cache.close()
    result = vars(report)
    result["limit_bytes"] = limit
    result["warnings"] = warnings
    if limit is not None and report.size_after > limit:
        result["warning"] = (f"still over the limit: {report.pinned_bytes} bytes are pinned "
                             "(`rez-lazyfs status --json` lists the pins)")
    return result


# -- logs ---------------------------------------------------------------------
def show_logs(settings: Settings, follow: bool, out=sys.stdout) -> None:
    path = settings.log_file
    if not os.path.exists(path):
        raise UserError(f"no log at {path} (has a mount run with this cache?)")
    f = open(path, errors="replace")
    try:
        out.write(f.read())
        out.flush()
        while follow:
            line = f.readline()
            if line:
                out.write(line)
                out.flush()
                continue
            time.sleep(0.5)
            try:
                rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False  # between rotation's rename and the new file
            if rotated:
                f.close()
                f = open(path, errors="replace")
    except KeyboardInterrupt:
        pass
    finally:
        f.close()
