"""Transparent mounts for tests: `rez-lazyfs mount --over STORE`, through the
real CLI, always undone.

A transparent mount sits on the store's own path, usually over another
mount (a FaultFS store, a bind mount standing for NFS), so "mounted" means
a rez-lazyfs mount at that path, not any mount. Teardown first stops the
mount's supervisor (SIGTERM: it stops its daemon, which unmounts, and
restarts nothing), then detaches whatever rez-lazyfs mount is left there,
lazily, so the store beneath is never left hidden, then does what every
mount's teardown does (daemons gone, log checked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.faults import wait_gone
from helpers.mounts import (
    CLI_TIMEOUT,
    LAZYFS,
    LazyfsMounter,
    LazyMount,
    MountOptions,
    _unescape_mount_field,
    is_daemon,
    processes_with_marker,
    yield_then_check,
)

FSTYPE = b"fuse.rez-lazyfs"


def lazyfs_mounted_at(path: Path) -> bool:
    """Whether a rez-lazyfs mount is at *path* (at any level of a stack)."""
    target = os.fsencode(path)
    with open("/proc/self/mounts", "rb") as f:
        return any(_unescape_mount_field(fields[1]) == target and fields[2] == FSTYPE
                   for fields in (line.split() for line in f) if len(fields) > 2)


@dataclass
class OverOptions(MountOptions):
    """`rez-lazyfs mount --over STORE`: the one repository is given with --repo
    ALIAS=STORE, so its alias is the test's."""

    def cli_args(self, mountpoint: Path) -> list[str]:
        return [str(LAZYFS), "mount", "--over", str(mountpoint), *super().cli_args(mountpoint)[3:]]


class OverMount(LazyMount):
    """A LazyMount whose path is its store's: .path is also the repository."""

    def repo_path(self, alias: str) -> Path:
        return self.path

    def is_mounted(self) -> bool:
        return lazyfs_mounted_at(self.path)

    def supervisors(self) -> list[int]:
        return [pid for pid in processes_with_marker(self._marker) if has_argument(pid, b"mount.supervisor")]

    def daemons(self) -> list[int]:
        return [pid for pid in processes_with_marker(self._marker) if is_daemon(pid)]

    def teardown(self) -> list[str]:
        problems = []
        ours = self.daemons() + self.supervisors()
        for pid in self.supervisors():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 40
        while self.supervisors() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.supervisors():
            problems.append(f"supervisor(s) {self.supervisors()} of {self.path} still running 40s "
                            "after SIGTERM")
        for _ in range(5):  # stacked ones too, each detached (never the store beneath)
            if not self.is_mounted():
                break
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True,
                           timeout=CLI_TIMEOUT)
        problems += super().teardown()
        # Until their last threads are gone too (a daemon's abandoned store
        # threads keep the store beneath busy): the store's teardown is next.
        for pid in ours:
            try:
                wait_gone(pid, 15)
            except AssertionError as e:
                problems.append(str(e))
        return problems


def has_argument(pid: int, word: bytes) -> bool:
    """Whether process *pid* has *word* among its arguments."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return word in f.read().split(b"\0")
    except OSError:
        return False


@dataclass
class OverMounter(LazyfsMounter):
    """The `over_mount` fixture: ``m = over_mount(store_path, cache=..., **options)``."""

    def __call__(self, store: Path, *, alias: str = "main", cache: Path | None = None,
                 config: Path | None = None, **options) -> OverMount:
        """The repository is --repo ALIAS=STORE, or what *config* says of STORE."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        n = len(self.mounts)
        if config is not None:
            options["extra_args"] = (*options.get("extra_args", ()), "--config", str(config))
        m = OverMount(path=Path(store),
                      options=OverOptions(repos={} if config else {alias: Path(store)},
                                          cache=cache or self.work_dir / f"cache{n}", **options),
                      work_dir=self.work_dir, expected_log=self.expected_log)
        self.mounts.append(m)
        m.mount()
        return m


@pytest.fixture(name="over_mount")
def over_mount_fixture(tmp_path):
    """Factory of transparent mounts (OverMount). Request it *after* the
    fixtures making the stores (fault_store, scratch_mounts), so it is torn
    down first: the mount over a store goes before the store."""
    mounter = OverMounter(tmp_path / "over")
    yield from yield_then_check(mounter, mounter.teardown)
