"""`rez-lazyfs forget`: have a directory or a package version listed from the store again.

A payload directory is listed once and kept forever (DESIGN.md: released
payloads never change). When one did change anyway (a release listed while
it was still being copied, a payload repaired in place), `forget` drops the
listings at and below it from the cache's index, and from the memory of
every running mount of that cache, which also has the kernel drop what it
cached there; the next use lists the store again. Blocks need no
forgetting: their keys carry each file's identity.

A running mount is told through a read of its `user.rezlazyfs.forget`
xattr on the directory (fusefs/operations.py): it answers only its owner
and root, and every such read is bounded in time, so a stopped daemon
cannot hang the command.
"""
from __future__ import annotations

import errno
import json
import os
import threading

from .config import Settings
from .errors import UserError

FORGET_XATTR = "user.rezlazyfs.forget"
STORE_PATH_XATTR = "user.rezlazyfs.store_path"
ASK_TIMEOUT = 10.0  # seconds a mount has to answer


def _within(seconds: float, fn, *args):
    """fn(*args) in a thread: ("ok", value), ("error", OSError) or ("timeout", None)."""
    outcome: list = []

    def run():
        try:
            outcome.append(("ok", fn(*args)))
        except OSError as e:
            outcome.append(("error", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else ("timeout", None)


def _in_a_mount(path: str) -> bool | None:
    """Whether `path` is served by a rez-lazyfs mount this user owns (None: no answer)."""
    kind, _ = _within(ASK_TIMEOUT, os.getxattr, path, STORE_PATH_XATTR)
    return None if kind == "timeout" else kind == "ok"


def _tell_mount(path: str) -> str:
    """Have the mount serving `path` forget it; a line saying what happened."""
    kind, value = _within(ASK_TIMEOUT, os.getxattr, path, FORGET_XATTR)
    if kind == "timeout":
        raise UserError(f"the mount serving {path} did not answer within {ASK_TIMEOUT:g}s "
                        "(is its daemon stopped?)")
    if kind == "error":
        if value.errno == errno.EACCES:
            raise UserError(f"{path}: only the mount's owner (or root) can make it forget")
        raise UserError(f"{path}: {value.strerror}")
    listings = json.loads(value)["listings"]
    return f"the mount serving {path} forgot {listings} listing(s) at and below it"


def _store_targets(target: str, repos) -> list[tuple[str, bytes]]:
    """(store path, relpath) pairs TARGET names: a path inside a store, or
    FAMILY-VERSION (or FAMILY) in every repository."""
    from cachecore.paths import BadPath, relpath_from_text

    if "/" in target:
        path = os.path.abspath(target)
        for repo in repos:
            if path == repo.path or path.startswith(repo.path.rstrip("/") + "/"):
                return [(repo.path, os.fsencode(os.path.relpath(path, repo.path))
                         if path != repo.path else b"")]
        raise UserError(f"{path} is neither in a rez-lazyfs mount of yours nor in a "
                        f"repository's store ({', '.join(r.path for r in repos) or 'none known'})")
    family, _, version = target.partition("-")
    try:
        relpath = relpath_from_text(f"{family}/{version}" if version else family)
    except BadPath as e:
        raise UserError(f"{target!r} is not FAMILY-VERSION: {e}") from None
    return [(repo.path, relpath) for repo in repos]


def forget(settings: Settings, target: str, mountpoint: str | None = None) -> list[str]:
    """Forget TARGET (a path in a mount or a store, or FAMILY-VERSION); lines to print."""
    if mountpoint:
        return _forget_in_mount(os.path.abspath(mountpoint), target)
    if "/" in target:
        inside = _in_a_mount(os.path.abspath(target))
        if inside is None:
            raise UserError(f"{target} did not answer within {ASK_TIMEOUT:g}s")
        if inside:
            return [_tell_mount(os.path.abspath(target))]
    return _forget_in_cache(settings, target)


def _forget_in_mount(mountpoint: str, target: str) -> list[str]:
    running = _within(ASK_TIMEOUT, os.getxattr, mountpoint, "user.rezlazyfs.stats")
    if running[0] == "timeout":
        raise UserError(f"the mount {mountpoint} did not answer within {ASK_TIMEOUT:g}s "
                        "(is its daemon stopped?)")
    if running[0] != "ok":
        raise UserError(f"{mountpoint} is not a running rez-lazyfs mount of yours")
    if "/" in target:
        path = os.path.abspath(target) if os.path.isabs(target) else os.path.join(mountpoint, target)
        if not (path + "/").startswith(mountpoint.rstrip("/") + "/"):
            raise UserError(f"{path} is not inside the mount {mountpoint}")
        return [_tell_mount(path)]
    kind, aliases = _within(ASK_TIMEOUT, os.listdir, mountpoint)
    if kind != "ok":
        raise UserError(f"cannot list the mount {mountpoint}: "
                        + ("no answer" if kind == "timeout" else aliases.strerror))
    family, _, version = target.partition("-")
    lines = []
    for alias in sorted(aliases):
        path = os.path.join(mountpoint, alias, family, version)
        if _within(ASK_TIMEOUT, os.path.isdir, path) == ("ok", True):
            lines.append(_tell_mount(path))
    if not lines:
        raise UserError(f"no repository of the mount {mountpoint} holds {target}")
    return lines


def _forget_in_cache(settings: Settings, target: str) -> list[str]:
    from .daemon import open_cache
    from .over import local_root

    if not os.path.isdir(os.path.join(settings.cache_dir, "index")):
        raise UserError(f"no rez-lazyfs cache at {settings.cache_dir}")
    cache = open_cache(settings)
    try:
        repos = settings.repos or cache.recorded_repos()
        targets = _store_targets(target, repos)
        dropped = {t: cache.index.forget_tree(*t) for t in targets}
        mounts = [name[len("mount:"):] for name in cache.stored_totals()
                  if name.startswith("mount:")]
    finally:
        cache.close()
    lines = [f"forgot {len(n)} listing(s) of {os.path.join(store, os.fsdecode(relpath))} "
             f"in the cache {settings.cache_dir}" for (store, relpath), n in dropped.items() if n]
    # Running mounts of this cache keep listings in memory too.
    for mp in mounts:
        for repo in repos:
            path = local_root(mp, repo)
            for store, relpath in targets:
                if store == repo.path and _in_a_mount(os.path.join(path, os.fsdecode(relpath))):
                    lines.append(_tell_mount(os.path.join(path, os.fsdecode(relpath))))
    if not lines:
        raise UserError(f"the cache {settings.cache_dir} knows nothing of {target}")
    return lines
