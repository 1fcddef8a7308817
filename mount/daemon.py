"""Mounting and unmounting: the library side of `rez-lazyfs mount/umount`.

`mount_fs` checks everything a user can get wrong before anything is mounted,
then either serves in the foreground or starts a daemon (this module run as
`python -m mount.daemon`, settings on stdin) and returns once the mount
answers. The daemon reports readiness or its first error through a pipe.
"""
from __future__ import annotations

import atexit
import errno
import logging
import logging.handlers
import os
import queue
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time

from . import sdnotify
from .config import Settings, is_url
from .errors import UserError
from .mounts import (
    PROBE_TIMEOUT,
    NoAnswer,
    ask,
    canonical,
    daemon_title,
    may_stall,
    mount_at,
    silence,
)

log = logging.getLogger("rez_lazyfs")
READY_TIMEOUT = 60.0


# -- checks -------------------------------------------------------------------
# Every question to a mount point, a store or the cache directory is asked with
# a time limit (mounts.ask): a stopped daemon or a hung filer must give a clear
# error, never a command that hangs with it.

# What a FUSE mount whose daemon is gone answers (ECONNABORTED: a request in flight).
_DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)
FUSERMOUNT_TIMEOUT = 30.0


def mount_state(path: str) -> str:
    """'missing', 'notdir', 'stale', 'silent', 'mounted' or 'free', within
    PROBE_TIMEOUT: whether something is mounted there comes from the mount
    table; whether it answers, from a statfs, which always reaches the
    filesystem (stat may be answered from the kernel's attribute cache long
    after a daemon died)."""
    try:
        if mount_at(path) is not None:
            ask(PROBE_TIMEOUT, os.statvfs, path)
            return "mounted"
        if not stat.S_ISDIR(ask(PROBE_TIMEOUT, os.stat, path).st_mode):
            return "notdir"
    except NoAnswer:
        if mount_at(path) is not None:
            return "silent"
        raise UserError(f"cannot use mountpoint {path}: its filesystem does not answer "
                        f"within {PROBE_TIMEOUT:g}s") from None
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        if e.errno in _DEAD_MOUNT:
            return "stale"
        raise UserError(f"cannot use mountpoint {path}: {e.strerror}") from None
    return "free"


def fusermount(*args: str) -> subprocess.CompletedProcess:
    """fusermount3 ARGS (as root or the mount's owner: either may unmount it)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise UserError("fusermount3 not found: install the fuse3 package")
    try:
        return subprocess.run([tool, *args], capture_output=True, text=True,
                              timeout=FUSERMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{os.path.basename(tool)} {' '.join(args)}` did not return within "
                        f"{FUSERMOUNT_TIMEOUT:g}s") from None


def check_mountpoint(path: str) -> None:
    path = canonical(path)
    state = mount_state(path)
    if state == "stale":
        # A daemon that died leaves "Transport endpoint is not connected".
        fusermount("-u", "-z", path)
        if mount_state(path) == "stale":
            raise UserError(f"{path} holds a dead mount that could not be cleared")
        log.info("cleared a dead mount at %s", path)
        state = mount_state(path)
    if state == "silent":
        raise UserError(f"{silence(path, PROBE_TIMEOUT)}: it is mounted already "
                        f"(rez-lazyfs umount {path} first)")
    if state == "mounted":
        raise UserError(f"{path} is already a mount point (rez-lazyfs umount {path} first)")
    problem = mountpoint_problem(path, state)
    if problem:
        raise UserError(problem)


def mountpoint_problem(path: str, state: str) -> str | None:
    """What keeps a mount off `path`, a mount point in `state` 'missing',
    'notdir' or 'free' (mount_state), or None if nothing does."""
    if state == "missing":
        return f"mountpoint {path} does not exist"
    if state == "notdir":
        return f"mountpoint {path} is not a directory"
    try:
        if ask(PROBE_TIMEOUT, os.listdir, path):
            return f"mountpoint {path} is not empty"
    except PermissionError:
        return f"mountpoint {path} is not readable"
    except (OSError, NoAnswer) as e:
        return f"cannot use mountpoint {path}: {getattr(e, 'strerror', None) or e}"
    return None


def prepare_cache_dir(path: str) -> None:
    """The cache directory exists, is trusted (cachecore/cachedir.py) and writable."""
    from cachecore.cachedir import UntrustedCache

    try:
        check_cache_dir(path, create=True)
    except UntrustedCache as e:
        raise UserError(untrusted_cache_message(e)) from None
    except OSError as e:
        raise UserError(unusable_cache_message(path, e)) from None


def check_cache_dir(path: str, *, create: bool) -> None:
    """That `path` is trusted (cachecore/cachedir.py) and writable, by
    writing a file there; with `create`, made first (mode 0700, its missing
    parents too), else a missing `path` only has to be creatable.
    UntrustedCache or OSError if not."""
    from cachecore.cachedir import check_ancestors, check_tree, open_owned

    if create:
        _make_private_dirs(path)
    elif not os.path.lexists(path):
        first_missing = os.path.abspath(path)
        while not os.path.lexists(os.path.dirname(first_missing)):
            first_missing = os.path.dirname(first_missing)
        check_ancestors(first_missing)
        parent = os.path.dirname(first_missing)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), parent)
        return
    check_tree(path, (), create=False)
    probe = os.path.join(path, f".probe-{os.getpid()}")
    os.close(open_owned(probe, os.O_WRONLY | os.O_CREAT))
    os.unlink(probe)


def untrusted_cache_message(e) -> str:
    return f"refusing the cache directory: {e}"


def unusable_cache_message(path: str, e: OSError) -> str:
    hint = (" (to use a read-only cache, mount with a writable --cache and "
            f"--shared-cache {path})") if e.errno == errno.EROFS else ""
    return f"cache directory {path} is not usable: {e.strerror}{hint}"


def _make_private_dirs(path: str) -> None:
    """mkdir -p with every directory made mode 0700 (os.makedirs gives only
    the last one its mode; a group-writable parent would be refused)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass


def _isdir_within(path: str, seconds: float) -> bool | None:
    """os.path.isdir, or None if the (network) filesystem does not answer in time."""
    try:
        return ask(seconds, os.path.isdir, path)
    except NoAnswer:
        return None


def _image_answers(repo, seconds: float, index) -> bool | None:
    """Whether a published image's manifest can be fetched and verifies (None:
    no answer in time). A manifest that does not verify, has expired or is
    older than one this cache saw (`index`; None: no cache yet) is a clear error."""
    from cachecore.errors import LazyFSError, StoreUnavailable
    from cachecore.image.manifest import (
        MANIFEST_PATH,
        BadManifest,
        Manifest,
        load_public_key,
    )
    from cachecore.stores.download import Downloader

    def fetch() -> bytes:
        with Downloader(repo.path, repo.proxy, timeout=seconds) as download:
            return download.get(MANIFEST_PATH).data

    try:
        manifest = Manifest.decode(ask(seconds + 1, fetch), load_public_key(repo.public_key))
    except NoAnswer:
        return None
    except BadManifest as e:
        raise UserError(f"repository {repo.alias!r} ({repo.path}): {e}") from None
    except StoreUnavailable:
        return None
    except LazyFSError:
        return False
    seen = index.get_text(f"revision:{repo.path.rstrip('/')}") if index is not None else None
    if seen and seen.isdigit() and manifest.revision < int(seen):
        raise UserError(f"repository {repo.alias!r} ({repo.path}) serves revision "
                        f"{manifest.revision}, older than revision {seen} seen before: refusing it")
    return True


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_store_paths(settings: Settings, specs) -> None:
    """A store at or below the mount point would be served by the mount itself
    (a tree without end, and a daemon asking itself); a mount point below a
    store would appear inside its own tree. Compared with symlinks resolved.
    A transparent mount's store is its mount point: mount/over.py checks it."""
    if settings.over:
        return
    mountpoint = canonical(settings.mountpoint)
    for repo in specs:
        if is_url(repo.path):
            continue
        try:
            store = ask(settings.store_timeout, os.path.realpath, repo.path)
        except (NoAnswer, OSError):
            continue  # check_stores says what is wrong with it
        if _contains(mountpoint, store):
            where = "is the mount point" if store == mountpoint else "is inside the mount point"
            raise UserError(f"store path {repo.path} for repository {repo.alias!r} {where} "
                            f"{mountpoint}: the mount would serve itself")
        if _contains(store, mountpoint):
            raise UserError(f"mountpoint {mountpoint} is inside the store path {repo.path} of "
                            f"repository {repo.alias!r}: the mount would appear in its own tree")


def store_problem(repo, seconds: float, index) -> str | None:
    """Why the store of `repo` cannot be read now ("does not answer" within
    `seconds`, "has no image", "is not a directory"), or None if it answers.
    A published image's manifest that cannot be trusted is a UserError."""
    published = is_url(repo.path)
    reachable = _image_answers(repo, seconds, index) if published else \
        _isdir_within(repo.path, seconds)
    if reachable:
        return None
    return "does not answer" if reachable is None else \
        "has no image" if published else "is not a directory"


def offline_problem(repo, index) -> str | None:
    """Why an --offline mount cannot serve `repo` (None if it can)."""
    if index is None or not index.knows_store(repo.path):
        return f"--offline: the cache holds nothing for repository {repo.alias!r} ({repo.path})"
    return None


def check_stores(settings: Settings, specs, index) -> None:
    """A store path never seen is a typo: refuse it. One seen before may just be away."""
    check_store_paths(settings, specs)
    for repo in specs:
        if settings.offline:
            problem = offline_problem(repo, index)
            if problem:
                raise UserError(problem)
            continue
        why = store_problem(repo, settings.store_timeout, index)
        if why is None:
            continue
        if not index.knows_store(repo.path):
            raise UserError(f"store path {repo.path} for repository {repo.alias!r} {why}")
        log.warning("store %s for repository %r is unreachable; serving what is cached",
                    repo.path, repo.alias)


def cache_may_stall(settings: Settings) -> bool:
    """Whether the cache directory (or a shared one) is on a filesystem whose
    calls can wait on another machine or process (NFS, SMB, FUSE, ...): then
    the daemon makes no cache-disk call on its event loop (CONCURRENCY.md, rule 1)."""
    for directory in (settings.cache_dir, *settings.shared_caches):
        real = os.path.realpath(directory)
        if may_stall(real):
            log.info("the cache directory %s is on a filesystem that can stall; every "
                     "cache-disk call runs in a worker thread, bounded by %gs", real,
                     settings.store_timeout)
            return True
    return False


# -- serving ------------------------------------------------------------------
def setup_logging(settings: Settings, to_stderr: bool) -> None:
    _open_log(settings.log_file).close()  # created owner-only, or a clear error
    handlers: list[logging.Handler] = [_OwnedLog(settings.log_file, maxBytes=10 * 2**20,
                                                 backupCount=5)]
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
    if may_stall(os.path.dirname(os.path.realpath(settings.log_file))):
        # A log on a disk that can stall (the default one, in a cache on NFS)
        # must not stall whoever logs, the event loop included: records go
        # through a queue to one thread that writes them (CONCURRENCY.md rule 1).
        records: queue.SimpleQueue = queue.SimpleQueue()
        writer = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
        writer.start()
        atexit.register(writer.stop)
        handlers = [logging.handlers.QueueHandler(records)]
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if settings.debug else logging.INFO)


class _OwnedLog(logging.handlers.RotatingFileHandler):
    """A rotated log that is (re)opened like every file of the cache: never
    through a symlink, only if it is ours (a log replaced by a link to another
    file must not make the daemon append there)."""

    def _open(self):
        return _open_log(self.baseFilename, text=True)


def open_cache(settings: Settings):
    """The cache directory, with clear errors instead of SQLite tracebacks."""
    from cachecore.cache import BlockSizeMismatch, LocalCache
    from cachecore.cachedir import UntrustedCache
    from cachecore.errors import UnsafeValue

    prepare_cache_dir(settings.cache_dir)
    try:
        if settings.shared_caches:
            from cachecore.layered import LayeredCache

            return LayeredCache(settings.cache_dir, settings.block_size or None,
                                settings.shared_caches)
        return LocalCache(settings.cache_dir, settings.block_size or None)
    except BlockSizeMismatch as e:
        raise UserError(str(e)) from None
    except UntrustedCache as e:
        raise UserError(f"refusing the cache: {e}") from None
    except (OSError, sqlite3.Error, UnsafeValue) as e:
        raise UserError(f"cache index in {settings.cache_dir} is unusable: {e}") from None


def repo_specs(settings: Settings, cache) -> list:
    """The repositories to serve: as configured, else (offline) as the cache recorded them."""
    from cachecore.cache import RepoSpec

    if settings.repos:
        specs = [RepoSpec(r.alias, r.path, r.mutable, r.public_key, r.proxy, r.traces)
                 for r in settings.repos]
        cache.record_repos(specs)
        return specs
    specs = cache.recorded_repos()
    if not specs:
        raise UserError(f"no repositories given and the cache {settings.cache_dir} has none recorded")
    return specs


def serve(settings: Settings, on_ready=lambda: None) -> None:
    """Mount and serve until unmounted or signalled. Blocks."""
    import pyfuse3
    import trio

    from fusefs.operations import LazyOperations

    from . import over
    from .running import served_config

    if settings.over:
        over.check_over(settings)
    else:
        check_mountpoint(settings.mountpoint)
    cache = open_cache(settings)
    specs = repo_specs(settings, cache)
    _name_process(daemon_title(settings.mountpoint, specs))
    check_stores(settings, specs, cache.index)

    totals_name = "mount:" + settings.mountpoint
    base = cache.totals_of(totals_name)  # earlier runs of this mount
    cache_can_stall = cache_may_stall(settings)

    async def run() -> None:
        stores = root_alias = None
        if settings.over:
            from cachecore.store import FilesystemStore

            # Before mounting, and for good: from now on the path is the mount.
            root_alias = specs[0].alias
            stores = {root_alias: FilesystemStore(
                specs[0].path, offline=settings.offline,
                root_fd=over.open_store_root(specs[0].path, settings.store_timeout))}
        repos = cache.repositories(specs, metadata_ttl=settings.metadata_ttl,
                                   store_timeout=settings.store_timeout,
                                   store_threads=settings.store_threads, offline=settings.offline,
                                   prefetch_max_size=settings.prefetch,
                                   cache_may_stall=cache_can_stall,
                                   permission_ttl=_permission_ttl(settings), stores=stores)
        # The kernel can skip open, release, opendir and releasedir (half
        # the requests of a start-up) with a pyfuse3 that lets it: ours,
        # patched (patches/); stock pyfuse3 serves them all, slower.
        no_open = hasattr(pyfuse3.Operations, "no_open") and not settings.open_requests
        ops = LazyOperations(repos, cache.counters, cache.blocks.block_size,
                             totals=lambda: base + cache.counters,
                             config=served_config(settings, specs, cache.blocks.block_size),
                             flush=lambda: cache.flush(totals_name, base), root_alias=root_alias,
                             no_open=no_open)
        for repo in repos.values():  # before the first lookup, which may start a replay
            await repo.refresh_traces()
        options = set(pyfuse3.default_options) | {
            f"fsname={over.OVER_SOURCE if settings.over else 'rez-lazyfs'}",
            "subtype=rez-lazyfs", "ro", "nosuid", "nodev"}
        if settings.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, settings.mountpoint, options)
        except RuntimeError as e:
            raise UserError(f"cannot mount {settings.mountpoint}: {e}") from None
        log.info("mounted %s (%s) pid %d", settings.mountpoint,
                 ", ".join(f"{r.alias}={r.path}" for r in specs), os.getpid())
        if hasattr(pyfuse3.Operations, "enable_symlink_cache"):
            log.info("pyfuse3 %s: the kernel keeps symlink targets", pyfuse3.__version__)
        if no_open:
            log.info("pyfuse3 %s: the kernel sends no open, release, opendir or releasedir "
                     "requests", pyfuse3.__version__)
        else:
            log.info("pyfuse3 %s: every open, release, opendir and releasedir reaches the daemon "
                     "(%s)", pyfuse3.__version__, "open_requests is set" if settings.open_requests else
                     "a stock release; patches/install-pyfuse3 builds one that lets the kernel "
                     "skip them")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signal)
                nursery.start_soon(cache.maintain, totals_name, base, settings.cache_limit)
                nursery.start_soon(_ready_when_answering)
                nursery.start_soon(ops.invalidate_kernel_caches)
                nursery.start_soon(_refresh_traces, repos)
                watchdog = sdnotify.watchdog_interval()
                if watchdog:
                    nursery.start_soon(_feed_watchdog, watchdog)
                cache.fetcher.run_prefetches_in(nursery)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await cache.flush(totals_name, base)
            pyfuse3.close(unmount=True)
            cache.close()
            log.info("unmounted %s", settings.mountpoint)

    async def _ready_when_answering() -> None:
        # A stat served by our own loop: the kernel's INIT is done, so the
        # read-ahead we set now is not reset by it.
        await trio.to_thread.run_sync(os.stat, settings.mountpoint)
        await trio.to_thread.run_sync(_set_read_ahead, settings.mountpoint, settings.read_ahead)
        await cache.flush(totals_name, base)  # `stats` lists this mount from now on
        on_ready()

    async def _refresh_traces(repos) -> None:
        # New traces (a trace directory CI fills, a new image revision) are
        # seen within metadata_ttl, as new versions are.
        while True:
            await trio.sleep(max(settings.metadata_ttl, 5.0))
            for repo in repos.values():
                await repo.refresh_traces()

    async def _feed_watchdog(interval: float) -> None:
        # From the event loop itself: systemd hears from it only while the
        # loop runs, so a loop that stopped is what its watchdog catches.
        while True:
            sdnotify.feed_watchdog()
            await trio.sleep(interval)

    async def _terminate_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                sdnotify.stopping(settings.mountpoint)
                pyfuse3.terminate()
                return

    trio.run(run)


def _name_process(title: str) -> None:
    """ps, top and systemctl status show `title`; the process's name (comm,
    15 bytes: what top shows by default and the journal's _COMM) and that of
    every thread started after this is rez-lazyfs."""
    import setproctitle

    # The title is written over the command line only, never over the
    # environment that follows it in memory, so /proc/PID/environ stays what
    # it was; the daemon is started with room for its title (mount_fs).
    os.environ["SPT_NOENV"] = "1"
    setproctitle.setproctitle(title)
    del os.environ["SPT_NOENV"]
    setproctitle.setthreadtitle("rez-lazyfs")


def _permission_ttl(settings: Settings) -> float:
    """Other users' access is checked against the modes listed: on a mount they
    reach, listings are revalidated after permission_ttl (SECURITY.md)."""
    if not settings.allow_other:
        return 0.0
    if settings.offline:
        log.info("offline: permissions are served as cached, not revalidated")
        return 0.0
    return settings.permission_ttl


def _set_read_ahead(mountpoint: str, size: int) -> None:
    """Let the kernel read ahead `size` bytes on sequential reads of the mount.

    Not set by default: the kernel's 128K is one block per request, which
    keeps scattered reads from pulling unread bytes, and warm sequential
    reads still run near disk speed (tests/bench/results/levers.md). The
    setting lives in the mount's backing-device info in sysfs, writable by
    root only: others keep the kernel default.
    """
    if not size:
        return
    entry = mount_at(mountpoint)
    path = f"/sys/class/bdi/{entry.device if entry else None}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(max(size // 1024, 4)))
    except OSError as e:
        log.info("kernel read-ahead left at its default (%s: %s)", path, e.strerror)


def mount_fs(settings: Settings, foreground: bool = False) -> None:
    """Mount as configured. Without `foreground`, returns once the mount answers.

    A transparent mount (settings.over) is served by a daemon under a
    supervisor that fails open (mount/supervisor.py): in the foreground the
    supervisor is this process, else a process of its own."""
    from .over import check_over

    if not settings.mountpoint:
        raise UserError("no mountpoint: give MOUNTPOINT, --over STORE, or set mountpoint "
                        "in the config")
    if not settings.over:
        settings.repos = _repos_mounted_together(settings.repos)
    # As the mount table will show it: totals, `ps` and the read-ahead setting
    # find the mount by this name.
    settings.mountpoint = canonical(settings.mountpoint)
    if foreground:  # the main process of a systemd unit (Type=notify), or a terminal's
        setup_logging(settings, to_stderr=True)
        if settings.over:
            from .supervisor import Supervisor

            Supervisor(settings).serve(lambda: sdnotify.ready(settings.mountpoint))
        else:
            serve(settings, lambda: sdnotify.ready(settings.mountpoint))
        return
    if settings.over:  # fail fast, in the caller's terminal
        check_over(settings)
    else:
        check_mountpoint(settings.mountpoint)
    check_store_paths(settings, settings.repos)
    prepare_cache_dir(settings.cache_dir)
    _, message = spawn("mount.supervisor" if settings.over else "mount.daemon", settings)
    if message != "ok":
        raise UserError(message)
    try:
        ask(PROBE_TIMEOUT, os.stat, settings.mountpoint)  # answered by the daemon: it is serving
    except NoAnswer:
        raise UserError(f"{silence(settings.mountpoint, PROBE_TIMEOUT)} right after "
                        "mounting") from None


def _repos_mounted_together(repos: list) -> list:
    """The repositories a mount point serves: all but those mounted over their
    own paths (`over`: each has a transparent mount of its own)."""
    together = [r for r in repos if not r.over]
    if repos and not together:
        raise UserError("every repository is mounted over its own path (over = true): mount "
                        "each with `rez-lazyfs mount --over PATH`")
    return together


def spawn(module: str, settings: Settings) -> tuple[subprocess.Popen, str]:
    """Start `python -m MODULE READY_FD MOUNTPOINT` (a daemon, or the supervisor
    of a transparent mount's daemons) with the settings on stdin, in a session
    of its own; the child and what it reported: "ok" once the mount answers,
    else why not."""
    read_end, write_end = os.pipe()
    with _open_log(settings.log_file) as stderr:
        child = subprocess.Popen(
            # Its process title (serve) is written over this command line, so
            # the title as it will be with the repositories given is the last
            # argument: room for it, and what `ps` shows until it is set.
            [sys.executable, "-m", module, str(write_end),
             daemon_title(settings.mountpoint, settings.repos)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
            pass_fds=(write_end,), start_new_session=True, cwd="/",
            # A systemd unit's main process is the one that reports to it
            # (mount/sdnotify.py), never the daemons it starts.
            env={**sdnotify.without_manager(os.environ),
                 "PYTHONPATH": os.pathsep.join(
                     filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))})
    os.close(write_end)
    child.stdin.write(settings.to_json().encode())
    child.stdin.close()
    return child, _read_ready(read_end, child)


def _open_log(path: str, text: bool = False):
    """The log file for appending, owner-only like the rest of the cache,
    never opened through a symlink nor if someone else owns it."""
    from cachecore.cachedir import UntrustedCache, open_owned

    try:
        _make_private_dirs(os.path.dirname(path))
        fd = open_owned(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except UntrustedCache as e:
        raise UserError(f"refusing the log file: {e}") from None
    except OSError as e:
        raise UserError(f"cannot write the log file {path}: {e.strerror}") from None
    return os.fdopen(fd, "a", encoding="utf-8") if text else os.fdopen(fd, "ab")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_ready(fd: int, child: subprocess.Popen) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
            elif child.poll() is not None:
                break
    finally:
        os.close(fd)
    text = data.decode(errors="replace").strip()
    if text:
        return text
    if child.poll() is None:
        child.kill()
        if time.monotonic() >= deadline:
            return f"the mount daemon did not answer within {READY_TIMEOUT:g}s (killed it)"
        return "the mount daemon stopped answering before it was ready (killed it; see its log)"
    return f"the mount daemon exited with status {child.returncode} (see its log)"


def child_main(ready_fd: int, body, name: str) -> int:
    """Entry point of a process `spawn` started (a daemon, a supervisor):
    settings on stdin, readiness on ready_fd; body(settings, on_ready) serves
    and calls on_ready() once the mount answers."""
    settings = Settings.from_json(sys.stdin.read())
    os.umask(0o077)
    ready = os.fdopen(ready_fd, "w")

    def report(message: str) -> None:
        if not ready.closed:
            ready.write(message + "\n")
            ready.close()

    setup_logging(settings, to_stderr=False)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        body(settings, lambda: report("ok"))
    except UserError as e:
        log.error("%s", e)
        report(str(e))
        return 1
    except BaseException:
        log.exception("%s failed", name)
        report(f"{name} failed unexpectedly; see {settings.log_file}")
        return 1
    return 0


def unmount(mountpoint: str, lazy: bool = False) -> str | None:
    """Unmount with fusermount3 (-u, or -u -z if lazy). A mount that does not
    answer is unmounted all the same (the kernel does not need its daemon for
    that): the returned line says what was found."""
    from .over import FSTYPE, is_over

    path = canonical(mountpoint)
    state = mount_state(path)
    if state not in ("mounted", "stale", "silent"):
        raise UserError(f"{path} is not mounted")
    entry = mount_at(path)
    if entry is not None and entry.fstype != FSTYPE:
        # Above all at a transparent mount's path once it is gone: the filer's own mount.
        raise UserError(f"{path} is not a rez-lazyfs mount (it is {entry.fstype}): "
                        "not unmounting it")
    note = silence(path, PROBE_TIMEOUT) if state == "silent" else None
    # A transparent mount is always detached at once: the store beneath serves
    # the path from then on, and open files read through the daemon until closed.
    lazy = lazy or is_over(entry)
    result = fusermount("-u", *(["-z"] if lazy else []), path)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        hint = " (files are in use; --lazy detaches it now and finishes when they close)" \
            if "busy" in reason.lower() else ""
        raise UserError(f"cannot unmount {path}: {reason}{hint}"
                        + (f"; {note}" if note else ""))
    if note:
        return f"{note}; unmounted it{' lazily' if lazy else ''} anyway"
    return None


if __name__ == "__main__":
    # argv[2] is room for the process title (serve)
    sys.exit(child_main(int(sys.argv[1]), serve, "the mount daemon"))
