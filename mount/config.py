"""Mount settings from the command line and a TOML config file.

Config file (default: $XDG_CONFIG_HOME/rez-lazyfs/config.toml):

    cache = "~/.cache/rez-lazyfs"
    block_size = "128K"      # fixed when a cache is created; default 128K
    metadata_ttl = 60        # seconds before repository listings are revalidated
    permission_ttl = 300     # allow_other: seconds before payload permissions are revalidated (0: never)
    store_timeout = 15       # seconds before an unanswered store read fails with EIO
    shared_caches = ["/host-cache"]  # read-only caches read before the store (mount/layered.py)

    [repos]
    main = "/svr/packages"                          # alias = store path
    dev = { path = "/home/me/packages", mutable = true }
    farm = { path = "/svr/farm", traces = "/svr/traces/farm" }   # launch traces from CI
    site = { path = "/svr/site", over = true }      # mounted over its own path (mount --over)

A repository with `over = true` (or whose path is in a top-level list,
`over = ["/svr/site"]`) is served by a transparent mount of its own,
`rez-lazyfs mount --over /svr/site` (mount/over.py), not under the mount
point with the others.

Command-line options override the file.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "rez-lazyfs" / "config.toml"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "rez-lazyfs"


def parse_size(text: str | int) -> int:
    """'128K', '1M', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"not a size: {text!r} (use e.g. 131072, 128K, 1M)")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


@dataclass
class RepoConfig:
    alias: str
    path: str                # a store directory, or the URL of a published image
    mutable: bool = False
    public_key: str = ""     # published images: the key their manifests verify with
    proxy: str = ""          # published images: "p1|p2;p3" (CernVM-FS syntax), "" = direct
    traces: str = ""         # a read-only directory of launch traces (`*.trace`)
    over: bool = False       # served by a transparent mount at its own path (mount --over)


@dataclass
class Settings:
    mountpoint: str
    repos: list[RepoConfig]
    cache_dir: str
    block_size: int = 0  # 0: the cache's own (set when it was created; 128K for a new one)
    metadata_ttl: float = 60.0
    # On an allow_other mount the kernel checks other users against the modes
    # and owners listed: payload listings are revalidated after this many
    # seconds, so a chmod in the store reaches them (0: kept forever).
    permission_ttl: float = 300.0
    store_timeout: float = 15.0
    store_threads: int = 16
    cache_limit: int = 0  # bytes; 0 = no limit
    # Kernel read-ahead on the mount (root only); 0 = the kernel's default,
    # 128K: one block per request, so scattered reads pull little extra
    # (tests/bench: W1 cold bytes 1.17x read at 128K, 1.84x at 1M) while
    # sequential reads still run at ~1 GB/s from a warm cache.
    read_ahead: int = 0
    prefetch: int = 128 * 1024  # on a file's first read (open), fetch same-suffix siblings up to this size; 0 = off
    offline: bool = False
    allow_other: bool = False
    log_file: str = ""
    debug: bool = False
    # Have the kernel send every open, release, opendir and releasedir, as
    # with stock pyfuse3, even where the patched one lets it skip them
    # (patches/): for A/B measurements and tests of the stock way.
    open_requests: bool = False
    shared_caches: list[str] = field(default_factory=list)  # read-only caches read before the store
    # A transparent mount (mount/over.py): `mountpoint` is the store path of
    # its one repository, served at its own path.
    over: bool = False

    def __post_init__(self):
        if not self.log_file:
            self.log_file = os.path.join(self.cache_dir, "logs", "daemon.log")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        raw["repos"] = [RepoConfig(**r) for r in raw["repos"]]
        return cls(**raw)


def _read_config(path: Path, explicit: bool) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None


# The TOML type each setting must have: a typo'd value must be an error, never
# a surprise (bool("false") is True: allow_other = "false" would share the mount).
_SIZE_TYPES = (int, str)
_CONFIG_TYPES = {
    "cache": str, "mountpoint": str, "log_file": str, "block_size": _SIZE_TYPES,
    "cache_limit": _SIZE_TYPES, "read_ahead": _SIZE_TYPES, "prefetch": _SIZE_TYPES,
    "metadata_ttl": (int, float), "permission_ttl": (int, float), "store_timeout": (int, float), "store_threads": int,
    "offline": bool, "allow_other": bool, "debug": bool, "open_requests": bool,
    "shared_caches": list, "repos": dict, "over": list,
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table", _SIZE_TYPES: "a size like \"128K\" or a byte count",
               (int, float): "a number"}


def _check_types(conf: dict, path) -> None:
    for key, value in conf.items():
        want = _CONFIG_TYPES[key]
        kinds = want if isinstance(want, tuple) else (want,)
        # bool is an int in Python; TOML's true is no byte count or thread count.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise UserError(f"{path}: {key} must be {_TYPE_NAMES[want]}, not {value!r}")
        if key == "store_threads" and value < 1:
            raise UserError(f"{path}: store_threads must be at least 1")


def _repos_from_config(table, path, from_config) -> list[RepoConfig]:
    """[repos]: alias = "PATH", { path = ..., mutable = ..., traces = ... } or
    { url = ..., public_key = ..., proxy = ... }; relative paths are the file's."""
    repos = []
    for alias, value in table.items():
        if isinstance(value, str):
            repos.append(RepoConfig(alias, value if is_url(value) else from_config(value)))
            continue
        if not isinstance(value, dict) or not (isinstance(value.get("path"), str)
                                               ^ isinstance(value.get("url"), str)):
            raise UserError(f"{path}: repos.{alias} must be a path, {{ path = ..., mutable = ... }} "
                            "or {{ url = ..., public_key = ..., proxy = ... }}")
        allowed = ({"path", "mutable", "traces", "over"} if "path" in value
                   else {"url", "public_key", "proxy"})
        unknown = set(value) - allowed
        if unknown:
            raise UserError(f"{path}: repos.{alias}: unknown setting(s): {', '.join(sorted(unknown))}")
        for key, kind in (("mutable", bool), ("public_key", str), ("proxy", str),
                          ("traces", str), ("over", bool)):
            if key in value and not isinstance(value[key], kind):
                raise UserError(f"{path}: repos.{alias}.{key} must be {_TYPE_NAMES[kind]}")
        if "path" in value:
            traces = value.get("traces", "")
            repos.append(RepoConfig(alias, from_config(value["path"]), value.get("mutable", False),
                                    traces=from_config(traces) if traces else "",
                                    over=value.get("over", False)))
        else:
            key = value.get("public_key", "")
            repos.append(RepoConfig(alias, value["url"], public_key=from_config(key) if key else "",
                                    proxy=value.get("proxy", "")))
    return repos


def _mark_over(paths, repos: list[RepoConfig], where: str) -> None:
    """Repositories (by store path) served by transparent mounts of their own; a
    path no repository has becomes one, named after its last component."""
    for path in paths:
        if not isinstance(path, str) or not os.path.isabs(path):
            raise UserError(f"{where}: over must list absolute store paths, not {path!r}")
        path = os.path.normpath(path)
        found = [r for r in repos if not is_url(r.path) and os.path.normpath(r.path) == path]
        if not found:
            alias = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path)).lstrip(".-") or "repo"
            if any(r.alias == alias for r in repos):
                raise UserError(f"{where}: the transparent mount of {path} needs an alias, and "
                                f"{alias!r} is taken: name it under [repos] "
                                f"(ALIAS = {{ path = {json.dumps(path)}, over = true }}) "
                                f"or with --repo ALIAS={path}")
            found = [RepoConfig(alias, path)]
            repos.extend(found)
        for r in found:
            r.over = True


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _check_published(r: RepoConfig) -> None:
    """A published image needs a public key that loads and proxies that parse."""
    from cachecore.image.manifest import BadKey, load_public_key
    from cachecore.stores.download import parse_proxies

    if not r.public_key:
        raise UserError(f"repository {r.alias!r} is a published image ({r.path}): give "
                        "--public-key FILE (or public_key in the config)")
    try:
        load_public_key(r.public_key)
        parse_proxies(r.proxy)
    except (BadKey, ValueError) as e:
        raise UserError(f"repository {r.alias!r}: {e}") from None


def parse_repo_option(text: str) -> RepoConfig:
    alias, sep, path = text.partition("=")
    if not sep or not alias or not path:
        raise UserError(f"--repo takes ALIAS=PATH, not {text!r}")
    return RepoConfig(alias, path)


def load_settings(mountpoint: str | None = None, *, config: str | None = None,
                  repos: tuple[str, ...] = (), mutable: tuple[str, ...] = (),
                  public_key: str | None = None, proxy: str | None = None,
                  need_repos: bool = True, over: str | None = None, **overrides) -> Settings:
    """Settings from the config file, overridden by command-line values (None = unset).

    Relative paths in the config file are relative to the file's directory, so
    a directory holding a config and a cache (see `export`) can be moved.
    `over`: the store path of a transparent mount (mount --over): its one
    repository (the configured one with that path, else one named after it)
    is mounted at that path.
    """
    path = Path(config) if config else default_config_path()
    conf = _read_config(path, explicit=bool(config))
    unknown = set(conf) - set(_CONFIG_TYPES)
    if unknown:
        raise UserError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    _check_types(conf, path)
    base = path.resolve().parent

    def from_config(value) -> str:
        return os.path.join(base, os.path.expanduser(str(value)))

    repo_list = _repos_from_config(conf.get("repos", {}), path, from_config)
    _mark_over([from_config(p) if isinstance(p, str) else p for p in conf.get("over", [])],
               repo_list, str(path))
    for text in repos:
        option = parse_repo_option(text)
        if is_url(option.path):
            option.public_key = os.path.abspath(public_key) if public_key else ""
            option.proxy = proxy or ""
        repo_list = [r for r in repo_list if r.alias != option.alias] + [option]
    if proxy is not None:
        for r in repo_list:
            if is_url(r.path):
                r.proxy = proxy
    for alias in mutable:
        matching = [r for r in repo_list if r.alias == alias]
        if not matching:
            raise UserError(f"--mutable {alias}: no repository with that alias")
        matching[0].mutable = True
    offline = overrides.get("offline") or conf.get("offline")
    if need_repos and not repo_list and not offline and over is None:
        # (offline, the cache's recorded repositories are used)
        raise UserError("no repositories given: use --repo ALIAS=PATH or list them "
                        f"under [repos] in {path}")
    seen = set()
    for r in repo_list:
        if not _ALIAS.match(r.alias) or r.alias in (".", ".."):
            raise UserError(f"repository alias {r.alias!r} is not a plain name")
        if r.alias in seen:
            raise UserError(f"repository alias {r.alias!r} is given twice")
        seen.add(r.alias)
        if is_url(r.path):
            _check_published(r)
        else:
            r.path = os.path.abspath(os.path.expanduser(r.path))
    if over is not None:
        if is_url(over):
            raise UserError(f"--over takes the path of a store directory, not a URL ({over}): "
                            "a published image has no path to mount over")
        over = os.path.abspath(os.path.expanduser(over))
        if mountpoint and os.path.abspath(mountpoint) != over:
            raise UserError(f"--over {over} mounts at the store's own path: give no MOUNTPOINT")
        _mark_over([over], repo_list, "--over")
        repo_list = [r for r in repo_list if r.path == over][:1]
        mountpoint = over

    values = {k: v for k, v in conf.items() if k not in ("repos", "cache", "over")}
    values["cache_dir"] = from_config(conf["cache"]) if "cache" in conf else str(default_cache_dir())
    for key in ("mountpoint", "log_file"):
        if values.get(key):
            values[key] = from_config(values[key])
    if not all(isinstance(p, str) for p in values.get("shared_caches", [])):
        raise UserError(f"{path}: shared_caches must be a list of cache directories")
    values["shared_caches"] = [from_config(p) for p in values.get("shared_caches", [])]
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["shared_caches"] = [os.path.abspath(os.path.expanduser(str(p)))
                               for p in values["shared_caches"]]
    mount_at = mountpoint or values.pop("mountpoint", "")
    values.pop("mountpoint", None)
    try:
        settings = Settings(mountpoint=os.path.abspath(mount_at) if mount_at else "",
                            repos=repo_list, over=over is not None,
                            cache_dir=os.path.abspath(os.path.expanduser(str(values.pop("cache_dir")))),
                            **values)
        settings.block_size = parse_size(settings.block_size)
        settings.cache_limit = parse_size(settings.cache_limit)
        settings.read_ahead = parse_size(settings.read_ahead)
        settings.prefetch = parse_size(settings.prefetch)
        settings.metadata_ttl = float(settings.metadata_ttl)
        settings.permission_ttl = float(settings.permission_ttl)
        settings.store_timeout = float(settings.store_timeout)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad setting: {e}") from None
    if settings.block_size and (not 4096 <= settings.block_size <= 16 * 2**20
                                or settings.block_size % 4096):
        raise UserError("block size must be a multiple of 4K between 4K and 16M")
    if settings.store_timeout <= 0 or settings.metadata_ttl < 0 or settings.permission_ttl < 0:
        raise UserError("store_timeout must be > 0, metadata_ttl and permission_ttl >= 0")
    return settings
