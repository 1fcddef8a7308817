"""`rez-lazyfs doctor`: what breaks mounts in practice, each said in one line with its fix.

Two uses. Before mounting (the settings `mount` takes): the FUSE device and
fusermount3, `user_allow_other` when allow_other is asked for, the kernel's
FUSE request timeout and read-ahead, the cache directory (trust, writability,
free space, its index), each store, and the mount point (empty, already a
rez-lazyfs mount, or a dead mount a crash left). Of a running mount
(`--mount MP`): whether it answers, its daemon, the read-ahead and FUSE
limits of its connection, and its cache.

The checks are the mount's own (mount/daemon.py), so the doctor and the mount
never disagree about what is wrong; only the doctor goes on after the first
problem, and changes nothing (a dead mount is reported, not cleared). Like
every command facing a mount, it asks a mount point, a store or the cache
directory only through mounts.ask (a forked child killed after its time
limit): a stopped daemon or a hung filer is a problem line, never a doctor
that hangs with it.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass, replace

from ..daemon import (
    check_cache_dir,
    check_store_paths,
    mount_state,
    mountpoint_problem,
    offline_problem,
    open_cache,
    store_problem,
    untrusted_cache_message,
    unusable_cache_message,
)
from ..errors import UserError
from ..mounts import (
    PROBE_TIMEOUT,
    NoAnswer,
    ask,
    canonical,
    filesystem_of,
    may_stall,
    mount_at,
    mount_table,
    serving_process,
    silence,
)

OK, WARNING, PROBLEM = "ok", "warning", "problem"
FUSE_DEVICE = "/dev/fuse"
# The file fusermount3 reads (the doctor takes another only for tests).
FUSE_CONF = "/etc/fuse.conf"
FUSE_SYSCTL = "/proc/sys/fs/fuse"
FUSE_CONNECTIONS = "/sys/fs/fuse/connections"
FSTYPE = "fuse.rez-lazyfs"
# The kernel's own max_background for a FUSE connection (FUSE_DEFAULT_MAX_BACKGROUND):
# read-ahead requests beyond it wait in the kernel, so less than this is a
# connection someone throttled.
KERNEL_MAX_BACKGROUND = 12
# Free space on the cache disk. Below MIN_FREE a few cold launches (W1 fetches
# ~53 MiB) fill it, and from then on fetched blocks are not kept: every read
# of them goes to the store again. Below LOW_FREE that is near.
MIN_FREE = 256 * 2**20
LOW_FREE = 2**30


@dataclass
class Check:
    name: str    # what was checked: "cache", "store main", "mountpoint", ...
    level: str   # OK, WARNING or PROBLEM
    found: str   # what was found, one line
    fix: str = ""  # for anything not ok: how to fix it (a command where there is one)

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.level:<7}  {self.name}: {self.found}{fix}"


def report(checks: list[Check]) -> dict:
    """What `--json` prints."""
    problems = sum(c.level == PROBLEM for c in checks)
    return {"ok": not problems, "problems": problems,
            "warnings": sum(c.level == WARNING for c in checks),
            "checks": [asdict(c) for c in checks]}


def diagnose(load_settings, *, running: str | None = None,
             fuse_conf: str = FUSE_CONF) -> list[Check]:
    """Every check, in order. `load_settings()` gives the settings (a config
    that does not load is itself a problem, and the checks that need no
    settings still run); `running`: the mount point of a running mount to
    check, instead of what a mount would need."""
    checks = [_fuse_device(), _fusermount()]
    try:
        settings = load_settings()
    except UserError as e:
        return checks + [Check("config", PROBLEM, str(e), "correct the config file or the options")]
    if running:
        return checks + _running_mount(settings, running)
    checks += [_allow_other(settings, fuse_conf), _request_timeout(settings), _read_ahead(settings)]
    cache_checks, cache = _cache(settings)
    checks += cache_checks
    try:
        specs = settings.repos or (cache.recorded_repos() if cache and settings.offline else [])
        stores = _stores(settings, specs, cache.index if cache else None, running=False)
    finally:
        if cache:
            cache.close()
    checks += stores
    answering = [r for r, c in zip(specs, stores) if c.level == OK]
    return checks + [_mountpoint(settings, answering)]


# -- the machine ----------------------------------------------------------------
def _fuse_device() -> Check:
    name = "fuse device"
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return Check(name, PROBLEM, f"{FUSE_DEVICE} does not exist: nothing can be mounted",
                     "modprobe fuse (in a container: --device /dev/fuse)")
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, PROBLEM, f"{FUSE_DEVICE} is not a character device",
                     "rm /dev/fuse && mknod -m 0666 /dev/fuse c 10 229 (as root)")
    found = f"{FUSE_DEVICE} (character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, " \
            f"mode {stat.S_IMODE(st.st_mode):04o})"
    try:
        # Opening it starts nothing (a connection begins at mount): this is
        # the check a container's device cgroup or a 0600 mode fails.
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        fix = "chmod 0666 /dev/fuse (as root)" if e.errno == errno.EACCES else \
            "in a container: --device /dev/fuse (its device cgroup refuses it)"
        return Check(name, PROBLEM, f"{found} cannot be opened by uid {os.geteuid()}: "
                     f"{e.strerror}: mounts fail", fix)
    return Check(name, OK, found)


def _fusermount() -> Check:
    name = "fusermount3"
    tool = shutil.which("fusermount3")
    if tool is None:
        return Check(name, PROBLEM, "fusermount3 is not installed: mounting as a user and "
                     "unmounting fail", "apt-get install fuse3 (or dnf install fuse3)")
    st = os.stat(tool)
    setuid = st.st_uid == 0 and st.st_mode & stat.S_ISUID
    if not setuid and os.geteuid() != 0:
        return Check(name, PROBLEM, f"{tool} is not setuid root: mounts by uid {os.geteuid()} "
                     "fail", f"chmod u+s {tool} (as root)")
    return Check(name, OK, tool + (" (setuid root)" if setuid else ""))


def _allow_other(settings, fuse_conf: str) -> Check:
    name = "allow_other"
    if not settings.allow_other:
        return Check(name, OK, "not asked for: only this user (and root) can use the mount")
    if os.geteuid() == 0:
        return Check(name, OK, "asked for, by root, who needs no user_allow_other")
    try:
        with open(fuse_conf, encoding="utf-8", errors="replace") as f:
            allowed = any(line.strip() == "user_allow_other" for line in f)
        missing = f"user_allow_other is not in {fuse_conf}"
    except FileNotFoundError:
        allowed, missing = False, f"{fuse_conf} does not exist"
    except OSError as e:
        allowed, missing = False, f"{fuse_conf} cannot be read ({e.strerror})"
    if allowed:
        return Check(name, OK, f"asked for; user_allow_other is in {fuse_conf}")
    return Check(name, PROBLEM, f"asked for, and {missing}: fusermount3 refuses the mount",
                 f"echo user_allow_other | sudo tee -a {fuse_conf}")


def kernel_request_timeout(default: int, maximum: int) -> int:
    """Seconds after which the kernel aborts a connection (the mount dies:
    "Transport endpoint is not connected") whose daemon left a request
    unanswered, for a daemon that asks none (pyfuse3 does not), as the kernel
    derives it from fs.fuse.default_request_timeout and max_request_timeout
    (fs/fuse/inode.c, init_server_timeout); 0: never."""
    if maximum:
        return min(default, maximum) if default else maximum
    return default


def request_timeout_check(default: int, maximum: int, store_timeout: float) -> Check:
    name = "fuse request timeout"
    timeout = kernel_request_timeout(default, maximum)
    settings_line = f"fs.fuse.default_request_timeout {default}, max_request_timeout {maximum}"
    fix = ("sysctl -w fs.fuse.default_request_timeout=0 fs.fuse.max_request_timeout=0 "
           "(as root)")
    if not timeout:
        return Check(name, OK, f"none: the kernel never aborts a mount ({settings_line})")
    if timeout <= store_timeout:
        return Check(name, PROBLEM, f"the kernel aborts a mount that leaves a request "
                     f"unanswered for {timeout}s ({settings_line}), and a store read may take "
                     f"store_timeout ({store_timeout:g}s): a slow store kills the mount",
                     f"{fix}, or store_timeout below {timeout}")
    return Check(name, WARNING, f"the kernel aborts a mount that leaves a request unanswered "
                 f"for {timeout}s ({settings_line}): store_timeout ({store_timeout:g}s) bounds "
                 "each store call, but a directory slow to list takes as long as it takes", fix)


def _request_timeout(settings) -> Check:
    values = []
    for knob in ("default_request_timeout", "max_request_timeout"):
        try:
            with open(os.path.join(FUSE_SYSCTL, knob)) as f:
                values.append(int(f.read()))
        except (OSError, ValueError):
            values.append(0)  # a kernel without request timeouts (before 6.14)
    return request_timeout_check(*values, settings.store_timeout)


def _read_ahead(settings) -> Check:
    name = "read-ahead"
    if not settings.read_ahead:
        return Check(name, OK, "not set: the kernel's default for FUSE (128 KiB, one block "
                     "a request)")
    asked = f"{settings.read_ahead // 1024} KiB"
    if os.geteuid() != 0:
        return Check(name, WARNING, f"read_ahead {asked} is asked for, but only root can set "
                     "it: the mount keeps the kernel's 128 KiB",
                     "drop read_ahead from the config (or mount as root)")
    return Check(name, OK, f"{asked}, set on the mount when it starts")


# -- the cache ------------------------------------------------------------------
def _inspect_cache_dir(path: str, owner: tuple[int, int] | None) -> dict:
    """In a child (mounts.ask), as `owner` (uid, gid) if given: the mount's
    checks of its cache directory (without creating it), then the free space
    of the disk it is (or would be) on."""
    from cachecore.cachedir import UntrustedCache

    if owner is not None and owner[0] != os.geteuid():
        os.setgroups([])
        os.setgid(owner[1])
        os.setuid(owner[0])
    try:
        check_cache_dir(path, create=False)
    except UntrustedCache as e:
        return {"problem": untrusted_cache_message(e),
                "fix": e.fix or "a cache directory of your own (--cache DIR)"}
    except OSError as e:
        fix = f"a cache on a writable disk (--cache DIR), with --shared-cache {path}" \
            if e.errno == errno.EROFS else "a cache directory this user can write (--cache DIR)"
        return {"problem": unusable_cache_message(path, e), "fix": fix}
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    st = os.statvfs(existing)
    return {"exists": existing == path, "index": os.path.isdir(os.path.join(path, "index")),
            "real": os.path.realpath(existing),
            "free": st.f_bavail * st.f_frsize, "size": st.f_blocks * st.f_frsize}


def _cache(settings, owner: tuple[int, int] | None = None, *, open_index: bool = True):
    """The "cache" and "cache space" checks, and the cache opened as a mount
    opens it (None if there is none yet, or it is refused): its index says
    which stores it knows. `open_index` False: a running mount's (already open)."""
    path = settings.cache_dir
    try:
        info = ask(PROBE_TIMEOUT, _inspect_cache_dir, path, owner)
    except NoAnswer:
        fs = filesystem_of(os.path.abspath(path))
        return [Check("cache", PROBLEM, f"cache directory {path} does not answer within "
                      f"{PROBE_TIMEOUT:g}s" + (f" ({fs.fstype} at {fs.path})" if fs else "")
                      + ": mounting would hang on it", "a cache directory on a local disk "
                      "(--cache DIR)")], None
    except (OSError, RuntimeError) as e:
        return [Check("cache", PROBLEM, f"cache directory {path}: {e}",
                      "a cache directory of your own (--cache DIR)")], None
    if "problem" in info:
        return [Check("cache", PROBLEM, info["problem"], info["fix"])], None
    fs = filesystem_of(info["real"])
    space = _cache_space(path, info, fs)
    on = f" on {fs.fstype} ({fs.path})" if fs else ""
    if may_stall(info["real"]):
        # cachecore/CONCURRENCY.md: measured +25% a launch on a FUSE cache disk.
        cache_check = Check("cache", WARNING, f"{path} is{on}, a filesystem that can stall: "
                            "every cache-disk call goes through a worker thread (launches "
                            "~25% slower), and while it stalls reads go to the store",
                            "a cache directory on a local disk (--cache DIR)")
    elif not info["exists"]:
        cache_check = Check("cache", OK, f"{path} does not exist yet: the mount creates it, "
                            f"mode 0700{on}")
    else:
        cache_check = Check("cache", OK, f"{path}: trusted and writable{on}")
    cache = None
    if open_index and info["index"]:
        try:
            cache = open_cache(settings)
        except UserError as e:
            cache_check = Check("cache", PROBLEM, str(e), "another cache directory (--cache DIR)"
                                + (", or no --shared-cache" if settings.shared_caches else ""))
    return [cache_check, space], cache


def _cache_space(path: str, info: dict, fs) -> Check:
    name = "cache space"
    free, size = info["free"], info["size"]
    found = f"{_size(free)} free of {_size(size)}"
    fix = f"rez-lazyfs clean --cache {path} --max-size SIZE, or free space on " \
          f"{fs.path if fs else 'its disk'}"
    if free < MIN_FREE:
        return Check(name, PROBLEM, f"{found}: fetched blocks are not kept once it is full "
                     "(every read of them goes to the store again)", fix)
    if free < LOW_FREE:
        return Check(name, WARNING, f"{found}: little room for fetched blocks", fix)
    return Check(name, OK, found)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# -- the stores -----------------------------------------------------------------
def _stores(settings, specs, index, *, running: bool) -> list[Check]:
    """One check per store: answering within store_timeout (or, offline, known
    to the cache), said as the mount would see it."""
    if not specs:
        if running or settings.offline:
            return []
        return [Check("stores", WARNING, "none given: the mount needs at least one repository",
                      "--repo ALIAS=PATH (or [repos] in the config)")]
    checks = []
    for repo in specs:
        name = f"store {repo.alias}"
        if settings.offline:
            problem = offline_problem(repo, index)
            checks.append(Check(name, PROBLEM, problem, "mount once without --offline, or "
                                "rez-lazyfs seed a baked context") if problem else
                          Check(name, OK, f"{repo.path}: --offline, served from the cache"))
            continue
        started = time.monotonic()
        try:
            why = store_problem(repo, settings.store_timeout, index)
        except UserError as e:
            checks.append(Check(name, PROBLEM, str(e), "publish the image again (rez-lazyfs "
                                "publish), or check --public-key"))
            continue
        took = time.monotonic() - started
        if why is None:
            checks.append(Check(name, OK, f"{repo.path} answers ({took * 1000:.0f} ms)"))
            continue
        if running or (index is not None and index.knows_store(repo.path)):
            effect = "the mount serves what is cached of it, anything else fails with EIO"
        else:
            effect = "the mount refuses a store its cache never saw"
        within = f" within {settings.store_timeout:g}s" if why == "does not answer" else ""
        if repo.path.startswith(("http://", "https://")):
            fix = f"curl -sI {repo.path.rstrip('/')}/manifest (the origin or a --proxy must answer)"
        elif why == "does not answer":
            fs = filesystem_of(os.path.abspath(repo.path))
            fix = (f"check the server of {fs.path} ({fs.fstype}); umount -l {fs.path} detaches "
                   "it if it is gone") if fs else "check the store's server"
        else:
            fix = f"give the store's path: --repo {repo.alias}=PATH (or [repos] in the config)"
        checks.append(Check(name, PROBLEM, f"store path {repo.path} for repository "
                            f"{repo.alias!r} {why}{within}: {effect}", fix))
    return checks


# -- the mount point ------------------------------------------------------------
def _mountpoint(settings, answering_stores) -> Check:
    """Empty, or already a rez-lazyfs mount that answers; anything else is a
    problem (a dead mount, a mount of something else, a file, a full
    directory, a store at, inside or around it)."""
    name = "mountpoint"
    if not settings.mountpoint:
        return Check(name, WARNING, "none given, so it was not checked",
                     "rez-lazyfs doctor MOUNTPOINT (or mountpoint in the config)")
    path = canonical(settings.mountpoint)
    try:
        state = mount_state(path)
    except UserError as e:  # its filesystem does not answer, or refuses
        return Check(name, PROBLEM, str(e), "a mountpoint on a local disk this user can read")
    if state == "stale":
        return Check(name, PROBLEM, f"{path} holds a dead mount left by a crash (its daemon "
                     "is gone: Transport endpoint is not connected)", f"rez-lazyfs umount {path}")
    if state == "silent":
        return Check(name, PROBLEM, silence(path, PROBE_TIMEOUT), f"rez-lazyfs umount {path}")
    if state == "mounted":
        entry = mount_at(path)
        if entry is None or entry.fstype != FSTYPE:
            return Check(name, PROBLEM, f"{path} is already a mount point "
                         f"({entry.fstype if entry else 'unknown'})",
                         f"umount {path}, or another mountpoint")
        found = f"{path} is a running rez-lazyfs mount (rez-lazyfs doctor --mount {path} " \
                "checks it)"
    else:
        problem = mountpoint_problem(path, state)
        if problem:
            fix = {"missing": f"mkdir -p {path}", "notdir": "a directory as MOUNTPOINT"}.get(
                state, f"an empty directory this user can read (ls -A {path})")
            return Check(name, PROBLEM, problem, fix)
        found = f"{path}: an empty directory"
    try:
        check_store_paths(settings, answering_stores)
    except UserError as e:
        return Check(name, PROBLEM, str(e), "a mountpoint outside every store, and no store "
                     "inside it")
    return Check(name, OK, found)


# -- a running mount ------------------------------------------------------------
def _running_mount(settings, mountpoint: str) -> list[Check]:
    path = canonical(mountpoint)
    entry = mount_at(path)
    if entry is None:
        return [Check("mount", PROBLEM, f"nothing is mounted at {path}",
                      f"rez-lazyfs mount {path} --repo ALIAS=PATH")]
    if entry.fstype != FSTYPE:
        return [Check("mount", PROBLEM, f"{path} is a {entry.fstype} mount, not rez-lazyfs",
                      f"findmnt -t {FSTYPE} lists the rez-lazyfs mounts")]
    started = time.monotonic()
    try:
        state = mount_state(path)
    except UserError as e:  # one this user may not ask (another's, without allow_other)
        state, refused = "refused", str(e)
    took = time.monotonic() - started
    if state == "mounted":
        mount_check = Check("mount", OK, f"{path} answers ({took * 1000:.0f} ms)")
    elif state == "stale":
        mount_check = Check("mount", PROBLEM, f"{path} is a dead mount: its daemon is gone "
                            "(Transport endpoint is not connected)", f"rez-lazyfs umount {path}")
    elif state == "silent":
        mount_check = Check("mount", PROBLEM, silence(path, PROBE_TIMEOUT),
                            f"rez-lazyfs umount {path}")
    else:
        mount_check = Check("mount", PROBLEM, refused,
                            f"rez-lazyfs doctor --mount {path}, as the mount's owner or root")
    try:
        # Reading a process's command line can wait on a page fault on the
        # silent mount (mounts.silence): asked with a limit too.
        daemon = ask(PROBE_TIMEOUT, serving_process, path, os.getpid())
    except NoAnswer:
        daemon = None
    checks = [mount_check, _daemon(path, state, daemon), _connection_read_ahead(settings, entry),
              _connection_limits(entry)]
    if daemon is None:
        return checks
    cache_dir = _daemon_cache_dir(daemon[0])
    if cache_dir is None:
        return checks + [Check("cache", WARNING, f"the cache of daemon pid {daemon[0]} was not "
                               "found among its open files, so it was not checked",
                               f"rez-lazyfs doctor --mount {path}, as the mount's owner or root")]
    owner = None
    if os.geteuid() == 0:
        # The cache must be trusted by the daemon's user, not by root: root
        # checks it as that user.
        try:
            st = os.stat(f"/proc/{daemon[0]}")
            owner = (st.st_uid, st.st_gid)
        except OSError:
            pass
    cache_checks, _ = _cache(replace(settings, cache_dir=cache_dir), owner, open_index=False)
    return checks + cache_checks + _stores(settings, settings.repos, None, running=True)


def _daemon(path: str, state: str, daemon: tuple[int, str] | None) -> Check:
    name = "daemon"
    if daemon is None:
        if state == "stale":
            return Check(name, PROBLEM, "none: it died, and the kernel answers every request "
                         "with ENOTCONN", f"rez-lazyfs umount {path}")
        return Check(name, WARNING, f"no rez-lazyfs daemon serving {path} was found among the "
                     "processes this user can see",
                     f"rez-lazyfs doctor --mount {path}, as the mount's owner or root")
    pid, letter = daemon
    if letter in "Tt":
        return Check(name, PROBLEM, f"pid {pid} is stopped: every request waits",
                     f"kill -CONT {pid}")
    if letter == "Z":
        return Check(name, PROBLEM, f"pid {pid} has exited", f"rez-lazyfs umount {path}")
    if state != "mounted":
        blocked = "blocked in the kernel (on its store or cache disk?)" if letter == "D" else \
            "busy or hung"
        return Check(name, PROBLEM, f"pid {pid} is {blocked}: the mount does not answer",
                     f"rez-lazyfs umount {path}, then mount again")
    return Check(name, OK, f"pid {pid} serves it (state {letter})")


def _connection_read_ahead(settings, entry) -> Check:
    name = "read-ahead"
    knob = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(knob) as f:
            kib = int(f.read())
    except (OSError, ValueError) as e:
        return Check(name, WARNING, f"{knob} cannot be read ({getattr(e, 'strerror', e)})",
                     f"rez-lazyfs doctor --mount {entry.path}, as root")
    asked = max(settings.read_ahead // 1024, 4) if settings.read_ahead else None
    if asked and kib != asked:
        return Check(name, WARNING, f"{kib} KiB ({knob}), not the {asked} KiB asked for "
                     "(only root can set it)", f"echo {asked} > {knob} (as root)")
    if kib == 0:
        return Check(name, WARNING, f"off ({knob} is 0): every read is a request of one page",
                     f"echo 128 > {knob} (as root)")
    return Check(name, OK, f"{kib} KiB ({knob})")


def _connection_limits(entry) -> Check:
    name = "fuse limits"
    directory = os.path.join(FUSE_CONNECTIONS, entry.device.split(":")[1])
    values = {}
    for knob in ("max_background", "congestion_threshold", "waiting"):
        try:
            with open(os.path.join(directory, knob)) as f:
                values[knob] = int(f.read())
        except (OSError, ValueError) as e:
            if not any(m.fstype == "fusectl" for m in mount_table()):
                return Check(name, WARNING, "the FUSE control filesystem is not mounted, so "
                             "max_background and congestion_threshold cannot be read",
                             f"mount -t fusectl none {FUSE_CONNECTIONS} (as root)")
            return Check(name, WARNING, f"{directory}/{knob} cannot be read "
                         f"({getattr(e, 'strerror', e)})",
                         f"rez-lazyfs doctor --mount {entry.path}, as root")
    found = f"max_background {values['max_background']}, congestion_threshold " \
            f"{values['congestion_threshold']}, {values['waiting']} request(s) waiting " \
            f"({directory})"
    if values["max_background"] < KERNEL_MAX_BACKGROUND:
        return Check(name, WARNING, f"{found}: at most {values['max_background']} reads reach "
                     f"the daemon at once (the kernel's default is {KERNEL_MAX_BACKGROUND})",
                     f"echo {KERNEL_MAX_BACKGROUND} > {directory}/max_background (as root)")
    return Check(name, OK, found)


def _daemon_cache_dir(pid: int) -> str | None:
    """The cache directory a daemon serves from: the one whose index it has
    open for writing (a shared cache's index is open read-only). Read from
    /proc, which asks no mount."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for fd in names:
        try:
            target = os.readlink(os.path.join(fds, fd))
            if not target.endswith("/index/cache.db"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if flags & os.O_ACCMODE == os.O_RDWR:
            return os.path.dirname(os.path.dirname(target))
    return None
