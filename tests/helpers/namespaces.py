"""Containers without a container engine: private kernel mount namespaces.

A `MountNamespace` is what a container is to the filesystem: a mount table of
its own (`unshare --mount --propagation private`), kept alive by a holder
process. Commands run in it through nsenter, so mounts made there (bind
mounts, a tmpfs hiding the store, a rez-lazyfs mount) are invisible to the
host and vanish with it. The test process sees the namespace's view of a
path through /proc/<holder>/root.

Every process started in a namespace carries a marker in its environment
(see helpers.mounts), so closing it finds the daemons started there, and only
those, if unmounting did not end them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from .mounts import (
    CLI_TIMEOUT,
    EXIT_TIMEOUT,
    LAZYFS,
    MARKER_VAR,
    STATS_XATTR,
    LazyMount,
    MountOptions,
    _unescape_mount_field,
    processes_with_marker,
    yield_then_check,
)

READY_TIMEOUT = 10  # seconds for unshare to have entered its namespace


def _mount_namespace_of(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _is_fuse(fstype: bytes) -> bool:
    return fstype in (b"fuse", b"fuseblk") or fstype.startswith((b"fuse.", b"fuseblk."))


def _read_back(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


class MountNamespace:
    def __init__(self, work_dir: Path, expected_log: set[bytes], *, keep_fuse: tuple[Path, ...] = (),
                 parent: MountNamespace | None = None, propagation: str = "private"):
        """A new mount namespace, made from the test's own or from *parent*'s.
        It starts as a copy of that mount table; of the FUSE mounts in it,
        only those in *keep_fuse* stay. `propagation="slave"` keeps receiving
        the parent's mounts and unmounts below its shared mounts."""
        self.work_dir = work_dir
        self.expected_log = expected_log
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, MARKER_VAR: self.marker}
        self.lazyfs_mounts: list[NamespacedMount] = []
        work_dir.mkdir(parents=True, exist_ok=True)
        unshare = ["unshare", "--mount", "--propagation", propagation, "sleep", "infinity"]
        # nsenter execs unshare, which execs sleep: one process, whose pid is the holder's.
        self._holder = subprocess.Popen(parent.argv(unshare) if parent else unshare,
                                        stdin=subprocess.DEVNULL, env=self.env)
        self.pid = self._holder.pid
        try:
            self._wait_until_inside(parent)
            self._detach_fuse_mounts_except(keep_fuse)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<MountNamespace of pid {self.pid}>"

    def _wait_until_inside(self, parent: MountNamespace | None) -> None:
        # Until unshare has switched, nsenter would run commands on the host
        # (or in the parent): nothing may be mounted before the namespace is
        # really a new one.
        deadline = time.monotonic() + READY_TIMEOUT
        before = {_mount_namespace_of(p) for p in ("self", *([parent.pid] if parent else []))}
        while _mount_namespace_of(self.pid) in before:
            assert self._holder.poll() is None, f"unshare exited with {self._holder.returncode}"
            assert time.monotonic() < deadline, "unshare did not enter a new mount namespace"
            time.sleep(0.01)

    def _detach_fuse_mounts_except(self, keep: tuple[Path, ...]) -> None:
        # The copy includes FUSE mounts of tests running alongside, and a copy
        # keeps their daemons alive after they unmount on the host.
        kept = {os.fsencode(p) for p in keep}
        for target, fstype in self.mounts():
            if _is_fuse(fstype) and target not in kept:
                self.run(["umount", "--lazy", target], check=False)

    # -- using it ----------------------------------------------------------

    def argv(self, argv: list) -> list[str]:
        """*argv* run inside the namespace."""
        return ["nsenter", "--target", str(self.pid), "--mount", "--", *map(os.fsdecode, argv)]

    def run(self, argv: list, *, check: bool = True, timeout: float = CLI_TIMEOUT,
            user: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run *argv* in the namespace (as uid and gid *user* if given); output as text."""
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
        # Files, not pipes: a daemon started in here keeps inherited pipes
        # open, and reading them to EOF would wait for it forever.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run(self.argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env={**self.env, **(env or {})}, timeout=timeout)
            result.stdout, result.stderr = _read_back(out), _read_back(err)
        if check:
            assert result.returncode == 0, (
                f"in {self!r}: {' '.join(map(os.fsdecode, argv))} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def outside(self, path: Path | str) -> Path:
        """*path* as the namespace sees it, for the test process."""
        return Path(f"/proc/{self.pid}/root") / Path(path).relative_to("/")

    def mounts(self) -> list[tuple[bytes, bytes]]:
        """(mount point, filesystem type) of every mount in the namespace."""
        found = []
        with open(f"/proc/{self.pid}/mountinfo", "rb") as f:
            for line in f:
                before, _, after = line.partition(b" - ")
                found.append((_unescape_mount_field(before.split()[4]), after.split()[0]))
        return found

    def is_mounted(self, path: Path | str, fstype: bytes | None = None) -> bool:
        return any(target == os.fsencode(path) and fstype in (None, kind) for target, kind in self.mounts())

    def bind(self, source: Path | str, target: Path | str, *, read_only: bool = True) -> None:
        self.run(["mkdir", "-p", target])
        self.run(["mount", "--bind", *(["-o", "ro"] if read_only else []), source, target])

    def hide(self, path: Path | str) -> None:
        """Cover *path* with an empty tmpfs: in here, what it held is gone."""
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "hidden", path])

    def mount_lazyfs(self, path: Path, repos: dict[str, Path], *, cache: Path, **options) -> NamespacedMount:
        """`rez-lazyfs mount` run in here, as a container would run it (daemon mode)."""
        return self.adopt_mount(None, path, MountOptions(repos=dict(repos), cache=cache, **options))

    def adopt_mount(self, argv: list | None, path: Path, options: MountOptions) -> NamespacedMount:
        """A rez-lazyfs mount made in here by *argv* (mount(8), say); *options*
        say where its cache and log are."""
        mount = NamespacedMount(self, path, options, self.work_dir, self.expected_log, argv=argv)
        self.lazyfs_mounts.append(mount)
        mount.mount()
        return mount

    def close(self) -> list[str]:
        """Unmount what rez-lazyfs mounted in here, end every process started
        in here (by marker), then the holder: the kernel then drops the
        namespace with all its mounts. Returns problems worth failing a test for."""
        problems = []
        for mount in reversed(self.lazyfs_mounts):
            try:
                problems += mount.teardown()
            except Exception as exc:  # keep cleaning up
                problems.append(f"teardown of {mount!r} raised {exc!r}")
        for pid in processes_with_marker(self.marker):
            if pid != self.pid:
                problems.append(f"process {pid} was still running in {self!r}; killed")
                os.kill(pid, signal.SIGKILL)
        self._holder.kill()
        self._holder.wait(timeout=EXIT_TIMEOUT)
        return problems


class NamespacedMount(LazyMount):
    """A rez-lazyfs mount made inside a MountNamespace, by the real CLI (a
    container running its own mount) or by *argv*. LazyMount's API; `path`
    is where it is mounted inside the namespace."""

    def __init__(self, ns: MountNamespace, path: Path, options: MountOptions, work_dir: Path,
                 expected_log: set[bytes], argv: list | None = None):
        super().__init__(path, options, work_dir, expected_log)
        self.ns = ns
        self.argv = argv
        self._marker = ns.marker  # whatever starts in the namespace carries its marker

    def __repr__(self) -> str:
        return f"<NamespacedMount {self.path} in {self.ns!r}>"

    @property
    def log_path(self) -> Path:
        return self.ns.outside(super().log_path)

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.ns.outside(self.path), STATS_XATTR))

    def _run_cli(self, args: list, what: str) -> subprocess.CompletedProcess:
        return super()._run_cli(self.ns.argv(args), what)

    def mount(self) -> None:
        assert not self.mounted
        self.ns.run(["mkdir", "-p", self.path])
        result = self._run_cli(self.argv or self.options.cli_args(self.path), "mount")
        self.mounted = self.ns.is_mounted(self.path)
        assert result.returncode == 0, self._failure("mount failed in the namespace", result)
        assert self.mounted, self._failure("mount returned 0 but nothing is mounted", result)

    def unmount(self, argv: list | None = None) -> None:
        """`rez-lazyfs umount` (or *argv*, umount(8) say) in the namespace;
        then the daemon must exit."""
        result = self._run_cli(argv or [LAZYFS, "umount", self.path], "umount")
        assert result.returncode == 0, self._failure("unmounting failed in the namespace", result)
        assert not self.ns.is_mounted(self.path), self._failure("still mounted after unmounting", result)
        self.mounted = False
        survivors = self._daemons_after_exit()
        assert not survivors, self._failure(f"daemon pids {survivors} still running after unmount")

    def _daemons_after_exit(self) -> list[int]:
        deadline = time.monotonic() + EXIT_TIMEOUT
        while True:
            daemons = [p for p in processes_with_marker(self._marker) if p != self.ns.pid]
            if not daemons or time.monotonic() > deadline:
                return daemons
            time.sleep(0.05)

    def teardown(self) -> list[str]:
        problems = []
        if self.ns.is_mounted(self.path):
            for args in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
                self.ns.run([*args, self.path], check=False)
                if not self.ns.is_mounted(self.path):
                    break
            else:
                problems.append(f"{self!r} could not be unmounted")
        self.mounted = False
        if survivors := self._daemons_after_exit():
            problems.append(f"daemon pids {survivors} of {self!r} still running {EXIT_TIMEOUT}s after unmount")
        return problems + self.log_problems()


@pytest.fixture
def mount_namespace(tmp_path, lazyfs_mount):
    """Factory: `ns = mount_namespace(keep_fuse=(host_mount.path,))`.

    Depends on lazyfs_mount so that namespaces close first: a namespace's
    copy of a host mount keeps the host's daemon from exiting on unmount.
    """
    namespaces: list[MountNamespace] = []

    def start(**kwargs) -> MountNamespace:
        ns = MountNamespace(tmp_path / f"ns{len(namespaces)}", lazyfs_mount.expected_log, **kwargs)
        namespaces.append(ns)
        return ns

    yield from yield_then_check(start, lambda: [p for ns in reversed(namespaces) for p in ns.close()])
