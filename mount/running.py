"""Commands given `--mount MP`: the settings of the mount running there.

A running mount knows what it serves: its mount point, cache directory,
block size, log file and repositories (with their mutable, public key,
proxy and trace settings). It says so through an xattr of its root,
`user.rezlazyfs.config` (fusefs/operations.py; its owner and root only),
and a command given `--mount` takes those rather than repeating `--repo`
and `--cache` as the mount was started, or guessing from config files.
An option given as well must agree with the mount: `--cache /a` for a
mount that uses /b would pin into, or report on, the wrong cache.

A running mount also writes the uses it notes (which file each cached
block belongs to, when it was last read) to the index only every few
seconds; `status` and `clean` first have the mounts of their cache flush
them (`user.rezlazyfs.flush`), so a file read a moment ago counts as read.

Every question is asked with a time limit (mounts.ask), like every command
facing a mount.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import replace

from .config import RepoConfig, Settings, is_url, load_settings, parse_repo_option, parse_size
from .errors import UserError
from .mounts import PROBE_TIMEOUT, NoAnswer, ask, canonical, mount_at, silence

CONFIG_XATTR = "user.rezlazyfs.config"
FLUSH_XATTR = "user.rezlazyfs.flush"
FSTYPE = "fuse.rez-lazyfs"


class WontTell(UserError):
    """A mount that answers but does not tell its settings: someone else's, or
    one of a release before them."""


def served_config(settings: Settings, specs, block_size: int) -> dict:
    """What a daemon tells about itself through CONFIG_XATTR."""
    return {"mountpoint": settings.mountpoint, "cache_dir": settings.cache_dir,
            "block_size": block_size, "log_file": settings.log_file,
            "repos": [vars(RepoConfig(s.alias, s.path, s.mutable, s.public_key, s.proxy,
                                      s.traces)) for s in specs]}


def running_config(mountpoint: str) -> dict | None:
    """What the rez-lazyfs mount at `mountpoint` serves (served_config), or
    None if none is mounted there. A mount that does not answer, or will not
    tell, is an error saying so."""
    path = canonical(mountpoint)
    entry = mount_at(path)
    if entry is None or entry.fstype != FSTYPE:
        return None
    try:
        return json.loads(ask(PROBE_TIMEOUT, os.getxattr, path, CONFIG_XATTR))
    except NoAnswer:
        raise UserError(silence(path, PROBE_TIMEOUT)) from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise WontTell(f"the mount at {path} is not yours: only its owner or root "
                           "can use its settings") from None
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            raise WontTell(f"the mount at {path} does not tell its settings (an older "
                           "rez-lazyfs? remount it)") from None
        raise UserError(f"the mount at {path}: {e.strerror}") from None


def settings_from_mount(mountpoint: str | None = None, *, fallback: bool = False,
                        need_repos: bool = True, **options) -> Settings:
    """A command's settings: with `mountpoint` (`--mount`) and a rez-lazyfs mount
    running there, its repositories, cache directory, block size and log file,
    the rest from the config; any of `options` contradicting the mount is an
    error naming both. With no mount running there: an error, unless
    `fallback` (bake, export, trace record: the mount point the context is
    for), then load_settings as without a running mount; so too for a mount
    that will not tell (another user's: its cache is not ours to use anyway)."""
    try:
        served = running_config(mountpoint) if mountpoint else None
    except WontTell:
        if not fallback:
            raise
        served = None
    if served is None:
        if mountpoint and not fallback:
            raise UserError(f"nothing rez-lazyfs is mounted at {mountpoint}")
        return load_settings(mountpoint, need_repos=need_repos, **options)
    where = f"the mount at {served['mountpoint']}"
    _check_agreement(served, where, options)
    for checked in ("repos", "mutable", "public_key", "proxy", "cache_dir", "block_size"):
        options.pop(checked, None)  # what the mount serves replaces them
    settings = load_settings(served["mountpoint"], need_repos=False, **options)
    return replace(settings, repos=[RepoConfig(**r) for r in served["repos"]],
                   cache_dir=served["cache_dir"], block_size=served["block_size"],
                   log_file=served["log_file"])


def _check_agreement(served: dict, where: str, options: dict) -> None:
    """Options given with --mount must say what the mount does."""
    repos = {r["alias"]: r for r in served["repos"]}
    serving = ", ".join(f"{a}={r['path']}" for a, r in repos.items()) or "nothing"

    def contradiction(option: str, mount_has: str) -> UserError:
        return UserError(f"{option} contradicts {where}, which {mount_has}")

    cache_dir = options.get("cache_dir")
    if cache_dir and os.path.realpath(cache_dir) != os.path.realpath(served["cache_dir"]):
        raise contradiction(f"--cache {cache_dir}", f"uses {served['cache_dir']}")
    block_size = options.get("block_size")
    if block_size and parse_size(block_size) != served["block_size"]:
        raise contradiction(f"--block-size {block_size}",
                            f"uses {served['block_size'] // 1024}K blocks")
    for text in options.get("repos") or ():
        given = parse_repo_option(text)
        path = given.path if is_url(given.path) else os.path.abspath(given.path)
        if given.alias not in repos:
            raise contradiction(f"--repo {text}", f"serves no repository {given.alias!r} "
                                f"(it serves {serving})")
        if path.rstrip("/") != repos[given.alias]["path"].rstrip("/"):
            raise contradiction(f"--repo {text}",
                                f"serves {given.alias}={repos[given.alias]['path']}")
    for alias in options.get("mutable") or ():
        if not repos.get(alias, {}).get("mutable"):
            raise contradiction(f"--mutable {alias}", f"serves {alias!r} as immutable"
                                if alias in repos else f"serves no repository {alias!r}")
    images = [r for r in repos.values() if is_url(r["path"])]
    for option, key, given in (("--public-key", "public_key", options.get("public_key")),
                               ("--proxy", "proxy", options.get("proxy"))):
        if given is None:
            continue
        want = os.path.abspath(given) if key == "public_key" else given
        if not images:
            raise contradiction(f"{option} {given}", "serves no published image")
        for r in images:
            if r[key] != want:
                raise contradiction(f"{option} {given}",
                                    f"reads {r['alias']} with {r[key] or 'none'}")


def _flush_if_on(mountpoint: str, cache_dir: str) -> bool:
    """In the asking child: flush the mount's noted uses if it uses `cache_dir`."""
    served = json.loads(os.getxattr(mountpoint, CONFIG_XATTR))
    if os.path.realpath(served["cache_dir"]) != cache_dir:
        return False
    os.getxattr(mountpoint, FLUSH_XATTR)
    return True


def flush_mounts_of(cache_dir: str, mountpoints) -> list[str]:
    """Have the running mounts at `mountpoints` that use `cache_dir` write the
    uses they noted to its index; warnings about those that did not answer."""
    warnings = []
    for mp in sorted(mountpoints):
        try:
            ask(PROBE_TIMEOUT, _flush_if_on, mp, os.path.realpath(cache_dir))
        except NoAnswer:
            warnings.append(f"{silence(mp, PROBE_TIMEOUT)}; what it read in the last few "
                            "seconds may show as (unattributed)")
        except (OSError, RuntimeError):
            pass  # not ours, an older rez-lazyfs, or it just went away
    return warnings
