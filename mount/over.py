"""Transparent mode: one repository mounted over its store's own path.

`rez-lazyfs mount --over /svr/packages` puts the cached view of the
repository at /svr/packages itself, so saved contexts, DCC configuration
files, rpaths and wrapper scripts that name packages by their store path go
through the cache unchanged: nothing is baked, nothing else changes.

How the store stays reachable. The daemon opens the store's root directory
(O_PATH, not through a symlink) before it mounts, and reads the store
through that descriptor for its whole life (cachecore/store.py, `root_fd`);
the path is never walked again, since it now names the mount (the daemon
would ask itself: a deadlock). The store keeps its path as its name, so the
cache's keys, the index and the logs are those of any mount of that store.
Commands that read the store themselves (bake, populate, seed, export) find
the running daemon of the mount and open the same directory through its
descriptor's /proc link (`stores_beneath`): the owner of the mount and root
may; other users read the path as they would any filesystem (through the
mount, into a cache of their own).

What is refused (`check_over`), each with one line: a path that is not a
directory (a symlink included: mount over its target), one that is a
rez-lazyfs mount already or lies inside one, one inside the cache
directory, or a cache directory (or log, or shared cache) inside the store,
which the mount would hide from its own daemon. A dead transparent mount
left at the path (its daemon and supervisor killed together) is cleared,
as a restart must be able to mount again.

Failing open is the supervisor's (mount/supervisor.py): the daemon runs as
its child, and a daemon that dies or hangs has its mount detached at once,
so the store beneath serves the path until a new daemon has mounted again.
Transparent mounts are told apart in the mount table by their source
(`OVER_SOURCE`), so `umount` can detach them lazily (the store shows
through; open files keep reading through the daemon until closed) without
asking anyone.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading

from .config import Settings, is_url
from .errors import UserError
from .mounts import PROBE_TIMEOUT, MountEntry, NoAnswer, ask, filesystem_of, mount_at, silence

log = logging.getLogger("rez_lazyfs")

FSTYPE = "fuse.rez-lazyfs"
OVER_SOURCE = "rez-lazyfs-over"  # the fsname of a transparent mount: its source in mountinfo
# What a FUSE mount whose daemon is gone answers (ECONNABORTED: a request in flight).
DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)
_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_over(entry: MountEntry | None) -> bool:
    return entry is not None and entry.fstype == FSTYPE and entry.source == OVER_SOURCE


def local_root(mountpoint: str, repo) -> str:
    """Where a mount at `mountpoint` shows a repository (RepoConfig or
    RepoSpec): at its own path if the mount is its transparent mount, else at
    MOUNTPOINT/ALIAS."""
    return repo.path if mountpoint == repo.path else os.path.join(mountpoint, repo.alias)


# -- refusals -------------------------------------------------------------------
def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_over(settings: Settings) -> None:
    """Everything that makes `settings.mountpoint` (canonical) unfit to mount
    over, as one UserError; a dead transparent mount there is cleared first."""
    from .daemon import fusermount

    path = settings.mountpoint
    for _ in range(8):  # stacked dead mounts, one at a time
        entry = mount_at(path)
        if entry is None or entry.fstype != FSTYPE:
            break
        try:
            ask(PROBE_TIMEOUT, os.statvfs, path)
        except NoAnswer:
            raise UserError(f"{silence(path, PROBE_TIMEOUT)}: it is a rez-lazyfs mount already "
                            f"(rez-lazyfs umount {path} first)") from None
        except OSError as e:
            if e.errno not in DEAD_MOUNT:
                raise UserError(f"cannot mount over {path}: {e.strerror}") from None
            fusermount("-u", "-z", path)
            log.info("cleared a dead rez-lazyfs mount at %s", path)
            continue
        raise UserError(f"{path} is already a rez-lazyfs mount (rez-lazyfs umount {path} first)")
    else:
        raise UserError(f"{path} holds dead mounts that could not be cleared")
    holder = filesystem_of(path)
    if holder is not None and holder.fstype == FSTYPE and holder.path != path:
        raise UserError(f"cannot mount over {path}: it lies inside the rez-lazyfs mount at "
                        f"{holder.path}")
    try:
        st = ask(settings.store_timeout, os.lstat, path)
    except NoAnswer:
        raise UserError(f"cannot mount over {path}: it does not answer within "
                        f"{settings.store_timeout:g}s") from None
    except FileNotFoundError:
        raise UserError(f"cannot mount over {path}: it does not exist") from None
    except OSError as e:
        raise UserError(f"cannot mount over {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"cannot mount over {path}: it is a symlink (mount over the directory "
                        "it points to, and keep the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"cannot mount over {path}: it is not a directory")
    for what, where in _cache_paths(settings):
        if _contains(where, path):
            raise UserError(f"cannot mount over {path}: it lies inside the {what} {where}")
        if _contains(path, where):
            raise UserError(f"cannot mount over {path}: the {what} {where} is inside it, and "
                            "the mount would hide it from its own daemon (use one outside)")


def _cache_paths(settings: Settings) -> list[tuple[str, str]]:
    """The cache's directories, with symlinks in them resolved (a missing
    part is taken as written), asked with a limit like every path."""
    found = []
    for what, where in (("cache directory", settings.cache_dir),
                        *(("shared cache", d) for d in settings.shared_caches),
                        ("log directory", os.path.dirname(settings.log_file))):
        try:
            found.append((what, ask(PROBE_TIMEOUT, os.path.realpath, where)))
        except (NoAnswer, OSError):
            found.append((what, os.path.abspath(where)))
    return found


# -- the store beneath ----------------------------------------------------------
def _within(seconds: float, fn, *args):
    """fn(*args) in a thread of its own, waited for `seconds` at most: its
    value, or the OSError it raised; NoAnswer if it has not returned (the
    thread is left to finish or hang on its own: a daemon thread)."""
    outcome: list = []

    def run():
        try:
            outcome.append((True, fn(*args)))
        except OSError as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise NoAnswer(f"no answer within {seconds:g}s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _open_root(path: str, follow: bool = False) -> tuple[int, os.stat_result]:
    """(O_PATH descriptor, fstat) of a directory; `follow`: through a /proc link."""
    fd = os.open(path, _ROOT_FLAGS & ~os.O_NOFOLLOW if follow else _ROOT_FLAGS)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _device(st: os.stat_result) -> str:
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def open_store_root(path: str, timeout: float) -> int:
    """A descriptor of the store directory at `path`, opened by the daemon
    before it mounts over it: not through a symlink, not a rez-lazyfs mount
    (a second `mount --over` that raced this one in), within `timeout`."""
    try:
        fd, st = _within(timeout, _open_root, path)
    except NoAnswer:
        raise UserError(f"cannot mount over {path}: it does not answer within "
                        f"{timeout:g}s") from None
    except OSError as e:
        raise UserError(f"cannot mount over {path}: {e.strerror}") from None
    top = mount_at(path)
    if top is not None and top.fstype == FSTYPE and top.device == _device(st):
        os.close(fd)
        raise UserError(f"{path} is already a rez-lazyfs mount (rez-lazyfs umount {path} first)")
    return fd


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _descriptor_beneath(path: str, entry: MountEntry, timeout: float) -> int | None:
    """A descriptor of the directory the daemon of the transparent mount at
    `path` reads as its store, through the daemon's own descriptor (its
    /proc link reaches that directory without walking the path). None if no
    daemon serves it, or its descriptors are not ours to use (another
    user's daemon)."""
    from .mounts import serving_process

    try:
        found = ask(PROBE_TIMEOUT, serving_process, path, os.getpid())
    except NoAnswer:
        found = None
    if found is None:
        return None
    pid = found[0]
    started = _start_time(pid)
    try:
        links = [(n, os.readlink(f"/proc/{pid}/fd/{n}")) for n in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    for n, target in links:
        if target != path:
            continue
        try:
            fd, st = _within(timeout, _open_root, f"/proc/{pid}/fd/{n}", True)
        except (OSError, NoAnswer):
            continue
        # The mount's own root has the same name: the store's is on another device.
        # And the daemon must still be the one found (not a new process with its pid).
        if stat.S_ISDIR(st.st_mode) and _device(st) != entry.device and \
                _start_time(pid) == started:
            return fd
        os.close(fd)
    return None


def stores_beneath(specs, *, offline: bool, timeout: float) -> dict:
    """alias -> FilesystemStore, for each directory store a running
    transparent mount covers, reached beneath it (see the module's docstring)."""
    from cachecore.store import FilesystemStore

    stores = {}
    for spec in specs:
        if is_url(spec.path):
            continue
        entry = mount_at(spec.path)
        if not is_over(entry):
            continue
        fd = _descriptor_beneath(spec.path, entry, timeout)
        if fd is not None:  # else not ours to use: the path is read, through the mount
            stores[spec.alias] = FilesystemStore(spec.path, offline=offline, root_fd=fd)
    return stores


def repositories(cache, specs, *, offline: bool = False, **options) -> dict:
    """cache.repositories(specs, ...) for a command, with every store that a
    transparent mount covers read beneath it (`stores_beneath`)."""
    return cache.repositories(specs, offline=offline, stores=stores_beneath(
        specs, offline=offline, timeout=options["store_timeout"]), **options)
