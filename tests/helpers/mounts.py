"""Mounting rez-lazyfs for real, through its CLI, and always cleaning up.

Every mount is made with `rez-lazyfs mount` in daemon mode (the way users
run it) and undone with `rez-lazyfs umount`; at teardown anything still
mounted is removed with fusermount3 (lazily as a last resort) and any daemon
still alive is reported and killed. Daemons are recognised by a unique
marker in their environment (inherited across the daemon's fork/exec), so
only processes these tests started are ever touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
LAZYFS = VENV_BIN / "rez-lazyfs"

STATS_XATTR = "user.rezlazyfs.stats"
STATS_COUNTERS = ("store_reads", "store_bytes", "cache_hits", "cache_misses")

MARKER_VAR = "LAZYFS_INTEGRATION_TEST_MOUNT_ID"
CLI_TIMEOUT = 60  # seconds for `mount`/`umount` to return
EXIT_TIMEOUT = 15  # seconds for a daemon to exit once unmounted

# Log lines at these levels fail the test unless declared with expect_log().
PROBLEM_LEVEL = re.compile(rb"\b(WARNING|ERROR|CRITICAL|FATAL)\b")


def _unescape_mount_field(field: bytes) -> bytes:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounted_paths() -> set[bytes]:
    with open("/proc/self/mounts", "rb") as f:
        return {_unescape_mount_field(line.split()[1]) for line in f if line.strip()}


def is_mounted(path: Path | bytes) -> bool:
    return os.fsencode(path) in mounted_paths()


def processes_with_marker(marker: str) -> list[int]:
    """Live processes whose environment carries MARKER_VAR=marker."""
    needle = f"{MARKER_VAR}={marker}".encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read() + b"\0"
        except OSError:  # gone, or a kernel thread
            continue
        if needle in environ:
            pids.append(int(entry))
    return pids


def is_daemon(pid: int) -> bool:
    """Whether *pid* is a mount daemon (not the `rez-lazyfs mount` command
    that started it, whose first word is its interpreter): a daemon's process
    title is `rez-lazyfs mount MP ...`, written over its command line once it
    knows its repositories; until then it is `python -m mount.daemon ...`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return cmdline.startswith(b"rez-lazyfs mount ") or b"\0mount.daemon\0" in cmdline


def _wait_for_exit(marker: str, timeout: float) -> list[int]:
    """Poll until no process carries *marker*; returns the survivors."""
    deadline = time.monotonic() + timeout
    while (pids := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for failure messages."""
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


@dataclass
class MountOptions:
    """Everything `rez-lazyfs mount` is called with; remount(**changes)
    replaces fields of this."""

    repos: dict[str, Path]
    cache: Path
    mutable: tuple[str, ...] = ()
    block_size: str | None = "64K"  # small, so multi-block files stay cheap
    metadata_ttl: float | None = None
    store_timeout: float | None = None
    # Off by default: background prefetching of small files would make
    # store-read counts depend on what else is in a directory. The prefetch
    # tests turn it on.
    prefetch: str | None = "0"
    log_file: Path | None = None
    offline: bool = False
    extra_args: tuple[str, ...] = ()

    def cli_args(self, mountpoint: Path) -> list[str]:
        args = [str(LAZYFS), "mount", str(mountpoint)]
        for alias, store in self.repos.items():
            args += ["--repo", f"{alias}={store}"]
        for alias in self.mutable:
            args += ["--mutable", alias]
        args += ["--cache", str(self.cache)]
        if self.block_size is not None:
            args += ["--block-size", self.block_size]
        if self.metadata_ttl is not None:
            args += ["--metadata-ttl", str(self.metadata_ttl)]
        if self.store_timeout is not None:
            args += ["--store-timeout", str(self.store_timeout)]
        if self.prefetch is not None:
            args += ["--prefetch", self.prefetch]
        if self.log_file is not None:
            args += ["--log-file", str(self.log_file)]
        if self.offline:
            args.append("--offline")
        return args + list(self.extra_args)


class LazyMount:
    """One mountpoint, mounted (and re-mounted) through the CLI."""

    def __init__(self, path: Path, options: MountOptions, work_dir: Path, expected_log: set[bytes]):
        self.path = path
        self.options = options
        self._work_dir = work_dir
        self._expected_log = expected_log  # shared by all mounts of a test
        self._marker = uuid.uuid4().hex
        self._cli_runs = 0
        self.mounted = False

    def __repr__(self) -> str:
        return f"<LazyMount {self.path} repos={self.options.repos} mounted={self.mounted}>"

    # -- what tests use ----------------------------------------------------

    @property
    def cache(self) -> Path:
        return self.options.cache

    @property
    def log_path(self) -> Path:
        # The contract: the daemon logs to CACHE/logs/daemon.log by default.
        return self.options.log_file or self.options.cache / "logs" / "daemon.log"

    def repo_path(self, alias: str) -> Path:
        assert alias in self.options.repos, f"no repo {alias!r} in {self!r}"
        return self.path / alias

    def stats(self) -> dict[str, int]:
        raw = os.getxattr(self.path, STATS_XATTR)
        stats = json.loads(raw)
        for counter in STATS_COUNTERS:
            assert isinstance(stats.get(counter), int), f"{STATS_XATTR}: {counter} missing or not an int: {stats}"
        return stats

    def daemon_pids(self) -> list[int]:
        """The daemon process(es) serving this mount (found by marker)."""
        return processes_with_marker(self._marker)

    def is_mounted(self) -> bool:
        """Whether this mount is in /proc/mounts (a mount over a store
        tells its own from the store's: helpers/over.py)."""
        return is_mounted(self.path)

    def expect_log(self, substring: str | bytes) -> None:
        """Declare WARNING/ERROR log lines containing *substring* as expected.
        (A Traceback is never expected.)"""
        self._expected_log.add(os.fsencode(substring) if isinstance(substring, str) else substring)

    def log_mark(self) -> int:
        """Current end of the log; pass to log_lines(since=...)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_lines(self, since: int = 0) -> list[bytes]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def unmount(self) -> None:
        """`rez-lazyfs umount`, then wait until the daemon has exited, so its
        log is complete and the cache is no longer in use."""
        assert self.mounted, f"{self!r} is not mounted"
        result = self._run_cli([str(LAZYFS), "umount", str(self.path)], "umount")
        assert result.returncode == 0, self._failure("rez-lazyfs umount failed", result)
        assert not self.is_mounted(), self._failure("still in /proc/mounts after rez-lazyfs umount", result)
        self.mounted = False
        survivors = _wait_for_exit(self._marker, EXIT_TIMEOUT)
        assert not survivors, self._failure(f"daemon pids {survivors} still running {EXIT_TIMEOUT}s after umount")

    def remount(self, **changes) -> None:
        """Unmount if mounted, then mount again with *changes* applied to the
        MountOptions (same mountpoint; same cache unless changed)."""
        if self.mounted:
            self.unmount()
        self.options = replace(self.options, **changes)
        self.mount()

    # -- plumbing ----------------------------------------------------------

    def mount(self) -> None:
        assert not self.mounted
        self.path.mkdir(parents=True, exist_ok=True)
        result = self._run_cli(self.options.cli_args(self.path), "mount")
        # Daemon mode returns only once the mount answers, so no polling here.
        self.mounted = self.is_mounted()
        assert result.returncode == 0, self._failure("rez-lazyfs mount failed", result)
        assert self.mounted, self._failure("rez-lazyfs mount returned 0 but nothing is mounted", result)
        os.stat(self.path)  # answers?

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_LAZYFS")}
        config = self._work_dir / "xdg"
        env.update(
            # No user configuration may leak into the daemon.
            XDG_CONFIG_HOME=str(config / "config"),
            XDG_CACHE_HOME=str(config / "cache"),
            XDG_DATA_HOME=str(config / "data"),
            XDG_STATE_HOME=str(config / "state"),
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        )
        env[MARKER_VAR] = self._marker
        return env

    def _run_cli(self, args: list[str], what: str) -> subprocess.CompletedProcess:
        self._cli_runs += 1
        # Output goes to a file, not a pipe: a daemon that keeps an inherited
        # pipe open would make subprocess.run wait for EOF forever.
        out_path = self._work_dir / f"{self.path.name}-{what}-{self._cli_runs}.out"
        with open(out_path, "wb") as out:
            try:
                result = subprocess.run(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=self._env(), timeout=CLI_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise AssertionError(self._failure(f"`{' '.join(args)}` did not return within {CLI_TIMEOUT}s")) from None
        result.stdout = out_path.read_bytes()
        return result

    def _failure(self, message: str, result: subprocess.CompletedProcess | None = None) -> str:
        parts = [f"{message} ({self.path})"]
        if result is not None:
            parts.append(f"command: {' '.join(map(str, result.args))}\nexit status: {result.returncode}")
            parts.append("output:\n" + (result.stdout.decode(errors="replace").strip() or "<none>"))
        parts.append(f"log tail ({self.log_path}):\n{tail(self.log_path)}")
        return "\n".join(parts)

    def teardown(self) -> list[str]:
        """Unmount whatever is left (fusermount3 -u, then -u -z), make sure
        no daemon survives, and check the log. Returns problems found."""
        problems = []
        if self.is_mounted():
            # Still mounted at the end of a test is normal (no explicit
            # unmount); failing to get rid of it is not.
            attempts = []
            for args in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
                # -u fails with EBUSY while something (say, a failed test's
                # open file) still uses the mount; -z then detaches it lazily.
                result = subprocess.run([*args, str(self.path)], capture_output=True, timeout=CLI_TIMEOUT)
                attempts.append(f"{' '.join(args)}: {result.returncode} {result.stderr.decode(errors='replace').strip()}")
                if not self.is_mounted():
                    break
            else:
                problems.append(f"{self.path} is STILL MOUNTED; " + "; ".join(attempts))
        self.mounted = False
        survivors = _wait_for_exit(self._marker, EXIT_TIMEOUT)
        if survivors:
            problems.append(f"daemon pids {survivors} of {self.path} still running {EXIT_TIMEOUT}s after unmount; killed")
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in processes_with_marker(self._marker):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if not _wait_for_exit(self._marker, 5):
                    break
        problems += self.log_problems()
        return problems

    def log_problems(self) -> list[str]:
        bad = []
        for line in self.log_lines():
            if b"Traceback" in line:
                bad.append(line)
            elif PROBLEM_LEVEL.search(line) and not any(s in line for s in self._expected_log):
                bad.append(line)
        if not bad:
            return []
        shown = "\n".join(line.decode(errors="replace") for line in bad[:20])
        return [
            f"daemon log {self.log_path} has {len(bad)} unexpected WARNING/ERROR/Traceback lines "
            f"(expected substrings: {sorted(self._expected_log)}):\n{shown}\n"
            f"log tail:\n{tail(self.log_path)}"
        ]


def yield_then_check(value, teardown):
    """A fixture's body (`yield from`): give `value` to the test, then always
    run `teardown()` and fail the test with the problems it returns."""
    try:
        yield value
    finally:
        problems = teardown()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@dataclass
class LazyfsMounter:
    """The `lazyfs_mount` fixture: call it to get a mounted LazyMount."""

    work_dir: Path
    mounts: list[LazyMount] = field(default_factory=list)
    expected_log: set[bytes] = field(default_factory=set)

    def __call__(self, repos: dict[str, Path], *, cache: Path | None = None, **options) -> LazyMount:
        """Mount *repos* (alias -> store path) at a fresh mountpoint, with a
        fresh cache unless *cache* is given; *options* are MountOptions
        fields (block_size, store_timeout, metadata_ttl, mutable, ...)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        n = len(self.mounts)
        lazy_mount = LazyMount(
            path=self.work_dir / f"mnt{n}",
            options=MountOptions(repos=dict(repos), cache=cache or self.work_dir / f"cache{n}", **options),
            work_dir=self.work_dir,
            expected_log=self.expected_log,
        )
        self.mounts.append(lazy_mount)
        lazy_mount.mount()
        return lazy_mount

    def teardown(self) -> list[str]:
        problems = []
        # Newest first: a later mount may use an earlier one as its store.
        for lazy_mount in reversed(self.mounts):
            try:
                problems += lazy_mount.teardown()
            except Exception as exc:  # keep cleaning up the other mounts
                problems.append(f"teardown of {lazy_mount!r} raised {exc!r}")
        return problems
