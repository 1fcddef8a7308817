"""Fault injection, scratch mounts and the generated fault report, for
tests/integration/test_faults.py, test_bad_input.py and test_trust_contexts.py.

* ``FaultFS`` -- a tiny read-only passthrough FUSE filesystem (pyfuse3 +
  trio) used as a *store* that misbehaves on demand: requests delayed,
  every Nth read failing with EIO, every request failing with EACCES.
  It runs as its own process (``python tests/helpers/faults.py faultfs
  SOURCE MOUNTPOINT CONTROL``); the test switches faults by rewriting the
  JSON CONTROL file (``FaultStore.set``) and freezes it with SIGSTOP
  (``FaultStore.freeze``) to make a store that hangs. ``FaultDisk``
  (``faultdisk``) is the same, writable: a cache disk that can stall.
* ``ScratchMounts`` -- tmpfs and bind mounts a test makes (a tiny cache
  disk, a store that can be unmounted, a read-only filesystem); teardown
  always undoes them.
* ``LazyfsCli`` -- runs ``rez-lazyfs`` when the outcome may be a failure
  (bad input, damaged caches): isolated environment, a marker to find its
  daemons, and teardown that unmounts and stops whatever it started.
* ``LazyfsMounterAt`` -- the ``lazyfs_mount`` fixture's mounter, but at a
  mountpoint the test chooses (e.g. one another user can reach).
* Fixtures (import the ``*_fixture`` names into a test module to use them
  there; pytest knows them by their ``name``): ``report`` (autouse),
  ``fault_store``, ``scratch_mounts``, ``lazyfs_cli``, ``lazyfs_mount_at``.
* The report -- every test of the REPORT_MODULES records rows (area, fault
  or input, observed outcome) through the autouse ``report`` fixture; at the
  end of a complete run of them the report is written from them, with each
  test's real result, outside the checkout (REPORT_PATH).
  ``python tests/helpers/faults.py --report`` runs them and writes the
  committed copy, ``docs/faults.md``.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `helpers` importable
    # In place of the script's own directory, where helpers/http.py would
    # shadow the standard library's http package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from helpers.mounts import (
    LAZYFS,
    MARKER_VAR,
    VENV_BIN,
    LazyfsMounter,
    LazyMount,
    MountOptions,
    is_daemon,
    is_mounted,
    processes_with_marker,
    yield_then_check,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# A complete test run writes the report outside the checkout (a test run leaves
# it clean); `faults.py --report` refreshes the committed copy.
REPORT_PATH = Path(os.environ.get("REZ_LAZYFS_REPORT_DIR") or tempfile.gettempdir()) / "rez-lazyfs-faults.md"
COMMITTED_REPORT = REPO_ROOT / "docs" / "faults.md"
REPORT_MODULES = ("test_faults.py", "test_bad_input.py", "test_trust_cache.py", "test_http_download.py",
                  "test_trust_contexts.py", "test_trust_liveness.py", "test_trust_mount.py",
                  "test_transparent.py")
ERROR_PREFIX = "rez-lazyfs: error: "


# -- the report ---------------------------------------------------------------
@dataclass
class _Row:
    nodeid: str
    area: str
    case: str
    outcome: str


class FaultReport:
    """A pytest plugin, registered by the first ``report`` fixture of a run."""

    NAME = "rez-lazyfs-fault-report"

    def __init__(self):
        self.rows: list[_Row] = []
        self.measurements: list[tuple[str, str]] = []
        self.results: dict[str, tuple[str, str]] = {}  # nodeid -> (status, message)
        self.areas: dict[str, str] = {}  # nodeid -> area
        self.started = time.time()

    # hooks
    def pytest_runtest_logreport(self, report):
        if not _in_report_module(report.nodeid):
            return
        status, _ = self.results.get(report.nodeid, ("passed", ""))
        if report.failed:
            what = "failed" if report.when == "call" else f"error in {report.when}"
            if status == "passed":
                self.results[report.nodeid] = (what, _failure_line(report))
        elif report.skipped:
            self.results[report.nodeid] = ("skipped", _failure_line(report))
        elif report.when == "call":
            self.results.setdefault(report.nodeid, ("passed", ""))

    def pytest_sessionfinish(self, session, exitstatus):
        forced = os.environ.get("FAULTS_REPORT")
        complete, why = _complete_run(session)
        target = Path(forced) if forced else (REPORT_PATH if complete else None)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if target is None:
            if reporter:
                reporter.ensure_newline()
                reporter.write_line(f"fault report not written ({why}); "
                                    "run `python tests/helpers/faults.py --report`")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.render(session))
        if reporter:
            reporter.ensure_newline()
            reporter.write_line(f"fault report written to {target}")

    # rendering
    def render(self, session) -> str:
        order = [item.nodeid for item in session.items if _in_report_module(item.nodeid)]
        status_of = {n: self.results.get(n, ("not run", "")) for n in order}
        counts: dict[str, int] = {}
        for status, _ in status_of.values():
            counts[status] = counts.get(status, 0) + 1
        head = _git("rev-parse", "--short", "HEAD")
        dirty = " + uncommitted changes" if _git("status", "--porcelain", "--", "cachecore", "fusefs", "mount") else ""
        lines = [
            "# rez-lazyfs: faults and bad input, as tested",
            "",
            "Generated by `python tests/helpers/faults.py --report` (a complete test run writes "
            "the same report to $REZ_LAZYFS_REPORT_DIR or the temporary directory) from "
            f"tests/integration/{{{','.join(m[:-3] for m in REPORT_MODULES)}}}.py; "
            "do not edit by hand. Every row is what "
            "the test observed on real mounts with real processes; the last column is the "
            "test's own result. TMP/ stands for the test's temporary directory.",
            "",
            f"* run: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
            f"{time.time() - self.started:.0f}s; code: {head}{dirty}",
            f"* machine: Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "* tests: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            "",
            "| # | Area | Fault or input | Observed outcome | Test |",
            "|---|------|----------------|------------------|------|",
        ]
        n = 0
        seen = set()
        by_node: dict[str, list[_Row]] = {}
        for row in self.rows:
            by_node.setdefault(row.nodeid, []).append(row)
        for nodeid in order:
            status, message = status_of[nodeid]
            verdict = "pass" if status == "passed" else f"**{status.upper()}**"
            test = f"`{nodeid.split('::', 1)[1]}` {verdict}"
            rows = by_node.get(nodeid) or [_Row(nodeid, self.areas.get(nodeid, _module_area(nodeid)),
                                                "(the test failed before recording what it saw)", "")]
            for i, row in enumerate(rows):
                n += 1
                outcome = row.outcome
                if i == len(rows) - 1 and status not in ("passed",) and message:
                    outcome = (outcome + "; " if outcome else "") + f"**{status}: {message}**"
                lines.append(f"| {n} | {_cell(row.area)} | {_cell(row.case)} | {_cell(outcome)} | "
                             f"{test if i == 0 else '〃'} |")
            seen.add(nodeid)
        if self.measurements:
            lines += ["", "## Measurements", "", "| Measurement | Value |", "|---|---|"]
            lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in self.measurements]
        failed = [(n, m) for n, (s, m) in status_of.items() if s not in ("passed", "skipped")]
        if failed:
            lines += ["", "## Failures", ""]
            lines += [f"* `{n}`: {_cell(m)}" for n, m in failed]
        return "\n".join(lines) + "\n"


_TEST_DIR = re.compile(r"/[^\s'\"()\[\]]*?/test_[A-Za-z0-9_]+?\d+/")


def _cell(text: str) -> str:
    """One table cell: pytest's per-test directories shortened to TMP/."""
    text = _TEST_DIR.sub("TMP/", str(text))
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _in_report_module(nodeid: str) -> bool:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in REPORT_MODULES


def _module_area(nodeid: str) -> str:
    if "test_trust_" in nodeid:
        return "trust"
    return "fault" if "test_faults" in nodeid else "bad input"


def _failure_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    if isinstance(report.longrepr, tuple):  # skip: (file, line, reason)
        text = report.longrepr[2]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("assert "):
            return line[:300]
    return text.strip()[:300]


def _complete_run(session) -> tuple[bool, str]:
    config = session.config
    if config.option.keyword or config.option.markexpr or config.getoption("deselect", None) \
            or config.getoption("lf", False):
        return False, "tests were selected by -k/-m/--deselect/--lf"
    if any("::" in str(arg) for arg in config.args):
        return False, "single tests were selected"
    if session.shouldstop or session.shouldfail:
        return False, "the run stopped early"
    modules = {}
    for item in session.items:
        name = Path(str(item.fspath)).name
        if name in REPORT_MODULES:
            modules.setdefault(name, (item.module, set()))[1].add(item.originalname)
    if set(modules) != set(REPORT_MODULES):
        return False, "not every fault test module ran"
    for name, (module, ran) in modules.items():
        defined = {k for k, v in vars(module).items() if k.startswith("test_") and callable(v)}
        if defined - ran:
            return False, f"{name}: {sorted(defined - ran)} did not run"
    return True, ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


class Recorder:
    """What a test gets from the ``report`` fixture."""

    def __init__(self, plugin: FaultReport, nodeid: str, area: str):
        self._plugin = plugin
        self._nodeid = nodeid
        self.area = area

    def row(self, case: str, outcome: str, *, area: str | None = None) -> None:
        self._plugin.rows.append(_Row(self._nodeid, area or self.area, case, outcome))

    def measure(self, name: str, value: str) -> None:
        self._plugin.measurements.append((name, value))


@pytest.fixture(autouse=True, name="report")
def report_fixture(request):
    """Autouse wherever it is imported (the two fault modules):
    ``report.row(case, outcome)`` adds a row to the fault report for this test,
    under the area the module's ``AREAS`` gives the test's name prefix."""
    config = request.config
    plugin = config.pluginmanager.get_plugin(FaultReport.NAME)
    if plugin is None:
        plugin = FaultReport()
        config.pluginmanager.register(plugin, FaultReport.NAME)
    areas = getattr(request.module, "AREAS", {})
    name = request.node.originalname
    area = next((a for prefix, a in areas.items() if name.startswith(prefix)), _module_area(request.node.nodeid))
    plugin.areas[request.node.nodeid] = area
    return Recorder(plugin, request.node.nodeid, area)


# -- FaultFS: a store that misbehaves on demand ----------------------------------
class FaultFS(pyfuse3.Operations):
    """Read-only passthrough of SOURCE. Faults, from the JSON control file:

    ``mode``: "ok"; "eacces" / "eio" (every request fails so); "flaky"
    (a read fails with EIO with probability ``fraction``, seeded by
    ``seed``, or else every ``every``-th read). Read counts since the last
    change are kept in CONTROL.counts (``FaultStore.counts()``). ``delay``: seconds added to
    each request named in ``slow_ops`` (default: read). Attribute and entry
    timeouts are 0 and reads are direct_io, so every request of the daemon
    under test reaches this process (and its faults)."""

    def __init__(self, source: str, control: str):
        super().__init__()
        self.source = os.fsencode(source)
        self.control = control
        self._ctl: dict = {}
        self._ctl_sig = None
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self.inodes: dict[bytes, int] = {b"": pyfuse3.ROOT_INODE}
        self.reads = self.failed = 0
        self.rng = random.Random(0)
        # Which byte ranges of which files were read since the last change:
        # {path: {offset: times}} in the counts (FaultStore.reads_by_file()).
        self.by_file: dict[str, dict[int, int]] = {}
        self._open_paths: dict[int, bytes] = {}

    def _real(self, rel: bytes) -> bytes:
        return os.path.join(self.source, rel) if rel else self.source

    def _settings(self) -> dict:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            return {}
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._ctl_sig:
            with open(self.control) as f:
                self._ctl = json.load(f)
            self._ctl_sig = sig
            self.reads = self.failed = 0
            self.by_file = {}
            self.rng = random.Random(self._ctl.get("seed", 0))
        return self._ctl

    async def _fault(self, op: str) -> None:
        ctl = self._settings()
        delay = ctl.get("delay", 0)
        if delay and op in ctl.get("slow_ops", ["read"]):
            await trio.sleep(delay)
        mode = ctl.get("mode", "ok")
        if mode == "eacces":
            raise FUSEError(errno.EACCES)
        if mode == "eio":
            raise FUSEError(errno.EIO)
        if op == "read":
            self.reads += 1
            if mode == "flaky" and (self.rng.random() < ctl["fraction"] if "fraction" in ctl
                                    else self.reads % int(ctl.get("every", 3)) == 0):
                self.failed += 1
                self._write_counts()
                raise FUSEError(errno.EIO)
            self._write_counts()

    def _write_counts(self) -> None:
        tmp = self.control + ".counts.tmp"
        with open(tmp, "w") as f:
            json.dump({"reads": self.reads, "failed": self.failed, "by_file": self.by_file}, f)
        os.replace(tmp, self.control + ".counts")

    def _inode(self, rel: bytes) -> int:
        inode = self.inodes.get(rel)
        if inode is None:
            inode = self.inodes[rel] = len(self.paths) + pyfuse3.ROOT_INODE
            self.paths[inode] = rel
        return inode

    def _attr(self, rel: bytes) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._real(rel))
        except OSError as e:
            raise FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(rel)
        a.generation = 0
        a.entry_timeout = a.attr_timeout = 0
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        return a

    def _rel(self, inode: int) -> bytes:
        try:
            return self.paths[inode]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    async def lookup(self, parent_inode, name, ctx=None):
        await self._fault("lookup")
        parent = self._rel(parent_inode)
        if name == b".":
            rel = parent
        elif name == b"..":
            rel = parent.rpartition(b"/")[0]
        else:
            rel = os.path.join(parent, name) if parent else name
        return self._attr(rel)

    async def getattr(self, inode, ctx=None):
        await self._fault("getattr")
        return self._attr(self._rel(inode))

    async def readlink(self, inode, ctx=None):
        await self._fault("readlink")
        try:
            return os.readlink(self._real(self._rel(inode)))
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def opendir(self, inode, ctx=None):
        await self._fault("opendir")
        return inode

    async def readdir(self, fh, start_id, token):
        await self._fault("readdir")
        rel = self._rel(fh)
        try:
            names = sorted(os.listdir(self._real(rel)))
        except OSError as e:
            raise FUSEError(e.errno) from None
        for i in range(start_id, len(names)):
            child = os.path.join(rel, names[i]) if rel else names[i]
            try:
                attr = self._attr(child)
            except FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, names[i], attr, i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx=None):
        await self._fault("open")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            raise FUSEError(errno.EROFS)
        try:
            fd = os.open(self._real(self._rel(inode)), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise FUSEError(e.errno) from None
        self._open_paths[fd] = self._rel(inode)
        return pyfuse3.FileInfo(fh=fd, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        await self._fault("read")
        offsets = self.by_file.setdefault(os.fsdecode(self._open_paths.get(fh, b"?")), {})
        offsets[off] = offsets.get(off, 0) + 1
        self._write_counts()
        return os.pread(fh, size, off)

    async def release(self, fh):
        self._open_paths.pop(fh, None)
        os.close(fh)

    async def statfs(self, ctx=None):
        st = os.statvfs(self.source)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, name, getattr(st, name))
        return s

    async def forget(self, inode_list):
        pass


class FaultDisk(FaultFS):
    """FaultFS, writable: a *cache disk* on a filesystem served by a process
    that can stall, as NFS or sshfs do (freeze it with FaultStore.freeze).
    Its files are not direct_io, so SQLite can map its WAL index; attribute
    timeouts stay 0, so every stat and fstat of the daemon reaches it."""

    def _child(self, parent_inode: int, name: bytes) -> bytes:
        parent = self._rel(parent_inode)
        return os.path.join(parent, name) if parent else name

    def _forget_path(self, rel: bytes) -> None:
        # A new file at this path gets a new inode number (the kernel may still
        # hold the old one, open); open handles keep the old number's path.
        for known in [k for k in self.inodes if k == rel or k.startswith(rel + b"/")]:
            del self.inodes[known]

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def open(self, inode, flags, ctx=None):
        await self._fault("open")
        fd = self._call(os.open, self._real(self._rel(inode)), (flags & ~os.O_CREAT) | os.O_NOFOLLOW)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx=None):
        await self._fault("create")
        rel = self._child(parent_inode, name)
        fd = self._call(os.open, self._real(rel), flags | os.O_CREAT | os.O_NOFOLLOW, mode)
        return pyfuse3.FileInfo(fh=fd), self._attr(rel)

    async def write(self, fh, off, buf):
        await self._fault("write")
        return self._call(os.pwrite, fh, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        # Not passed on: durability is not what this disk is for, and a real
        # fsync under other tests' I/O can take seconds.
        await self._fault("fsync")

    async def setattr(self, inode, attr, fields, fh, ctx=None):
        await self._fault("setattr")
        rel = self._rel(inode)
        real = self._real(rel)
        if fields.update_size:
            if fh is not None:
                self._call(os.ftruncate, fh, attr.st_size)
            else:
                self._call(os.truncate, real, attr.st_size)
        if fields.update_mode:
            self._call(os.chmod, real, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            self._call(os.lchown, real, attr.st_uid if fields.update_uid else -1,
                       attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            now = self._call(os.lstat, real)
            self._call(lambda: os.utime(real, ns=(
                attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns), follow_symlinks=False))
        return self._attr(rel)

    async def mkdir(self, parent_inode, name, mode, ctx=None):
        await self._fault("mkdir")
        rel = self._child(parent_inode, name)
        self._call(os.mkdir, self._real(rel), mode)
        return self._attr(rel)

    async def unlink(self, parent_inode, name, ctx=None):
        await self._fault("unlink")
        rel = self._child(parent_inode, name)
        self._call(os.unlink, self._real(rel))
        self._forget_path(rel)

    async def rmdir(self, parent_inode, name, ctx=None):
        await self._fault("rmdir")
        rel = self._child(parent_inode, name)
        self._call(os.rmdir, self._real(rel))
        self._forget_path(rel)

    async def link(self, inode, new_parent_inode, new_name, ctx=None):
        await self._fault("link")
        rel = self._child(new_parent_inode, new_name)
        self._call(lambda: os.link(self._real(self._rel(inode)), self._real(rel), follow_symlinks=False))
        return self._attr(rel)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx=None):
        await self._fault("rename")
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EINVAL)
        if flags and os.path.lexists(self._real(new)):
            raise FUSEError(errno.EEXIST)
        self._call(os.rename, self._real(old), self._real(new))
        self._forget_path(new)
        for known in [k for k in self.inodes if k == old or k.startswith(old + b"/")]:
            inode = self.inodes.pop(known)
            self.inodes[new + known[len(old):]] = inode
            self.paths[inode] = new + known[len(old):]


_KINDS = {"faultfs": (FaultFS, {"fsname=faultfs", "subtype=faultfs", "ro"}),
          "faultdisk": (FaultDisk, {"fsname=faultdisk", "subtype=faultdisk"})}


def _faultfs_main(kind: str, source: str, mountpoint: str, control: str) -> int:
    cls, options = _KINDS[kind]
    ops = cls(source, control)
    pyfuse3.init(ops, mountpoint, options)

    async def main():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


class FaultStore:
    """One FaultFS process over *source*, mounted at *mountpoint* (a FaultDisk
    if *writable*)."""

    def __init__(self, source: Path, mountpoint: Path, work_dir: Path, writable: bool = False):
        self.kind = "faultdisk" if writable else "faultfs"
        self.source = source
        self.path = mountpoint
        self.control = work_dir / f"{mountpoint.name}.control.json"
        self.log = work_dir / f"{mountpoint.name}.log"
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    def start(self) -> FaultStore:
        self.path.mkdir(parents=True, exist_ok=True)
        self.set()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, self.kind, str(self.source), str(self.path), str(self.control)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                start_new_session=True)
        deadline = time.monotonic() + 15
        while not is_mounted(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"faultfs did not mount at {self.path}: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def set(self, mode: str = "ok", **options) -> None:
        """Switch faults (takes effect at the store's next request)."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mode": mode, **options}))
        os.replace(tmp, self.control)
        # The store rewrites the counts at its next read: until then they are
        # the previous setting's, and counts() must say none happened since.
        Path(str(self.control) + ".counts").unlink(missing_ok=True)

    def counts(self) -> dict:
        """{"reads": N, "failed": M, "by_file": {path: {offset: times}}} since
        the last set() (offsets are JSON keys: strings)."""
        try:
            return json.loads(Path(str(self.control) + ".counts").read_text())
        except FileNotFoundError:
            return {"reads": 0, "failed": 0, "by_file": {}}

    def freeze(self) -> None:
        """SIGSTOP: every request to the store now hangs."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self) -> list[str]:
        problems = []
        if self.proc is None:
            return problems
        self.thaw()
        self.set()
        for args in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
            if not is_mounted(self.path):
                break
            subprocess.run([*args, str(self.path)], capture_output=True, timeout=60)
        if is_mounted(self.path):
            problems.append(f"faultfs {self.path} is STILL MOUNTED")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            problems.append(f"faultfs pid {self.proc.pid} did not exit; killed")
            self.proc.kill()
            self.proc.wait(timeout=15)
        if b"Traceback" in self.log.read_bytes():
            problems.append(f"faultfs crashed:\n{self.log.read_text()}")
        self.proc = None
        return problems


@pytest.fixture(name="fault_store")
def fault_store_fixture(tmp_path):
    """Factory: ``fs = fault_store(source_dir)`` mounts a FaultFS over it and
    returns the FaultStore (``fs.path`` is the store to give rez-lazyfs);
    ``fault_store(source_dir, writable=True)`` a FaultDisk (a cache directory).
    Request it *before* lazyfs_mount, so the daemon using it is unmounted first."""
    stores: list[FaultStore] = []
    work = tmp_path / "faultfs"
    work.mkdir(exist_ok=True)

    def start(source: Path, writable: bool = False) -> FaultStore:
        store = FaultStore(Path(source), work / f"store{len(stores)}", work, writable)
        stores.append(store)
        return store.start()

    yield from yield_then_check(start, lambda: [p for s in reversed(stores) for p in s.stop()])


# -- scratch mounts (tmpfs, bind) -------------------------------------------------
class ScratchMounts:
    def __init__(self):
        self.paths: list[Path] = []

    def _mount(self, args: list[str], target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"mount {args} {target}: {result.stderr}"
        self.paths.append(target)
        return target

    def tmpfs(self, target: Path, size: str = "8m", *, ro: bool = False) -> Path:
        options = f"size={size},mode=0700" + (",ro" if ro else "")
        return self._mount(["-t", "tmpfs", "-o", options, "tmpfs"], target)

    def bind(self, source: Path, target: Path, *, ro: bool = False) -> Path:
        self._mount(["--bind", str(source)], target)
        if ro:
            result = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"remount ro {target}: {result.stderr}"
        return target

    def umount(self, target: Path, busy_for: float = 5.0) -> None:
        """Unmount, retrying while busy for up to `busy_for` seconds, as an admin
        would: the daemon keeps a store file open for a moment after reading it
        (cachecore/store.py: idle_seconds)."""
        deadline = time.monotonic() + busy_for
        while True:
            result = subprocess.run(["umount", str(target)], capture_output=True, text=True,
                                    timeout=30)
            if result.returncode == 0 or "busy" not in result.stderr or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result.returncode == 0, f"umount {target}: {result.stderr}"
        self.paths.remove(target)

    def teardown(self) -> list[str]:
        problems = []
        for target in reversed(self.paths):
            # A path can be stacked (mounted more than once): undo them all.
            for _ in range(5):
                if not is_mounted(target):
                    break
                result = subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
                if result.returncode != 0:
                    subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)
            if is_mounted(target):
                problems.append(f"scratch mount {target} is STILL MOUNTED")
        self.paths.clear()
        return problems


@pytest.fixture(name="scratch_mounts")
def scratch_mounts_fixture():
    """tmpfs/bind mounts for a test, always undone. Request it *before*
    lazyfs_mount when a daemon uses one (teardown runs in reverse order)."""
    mounts = ScratchMounts()
    yield from yield_then_check(mounts, mounts.teardown)


# -- rez-lazyfs run directly, when failing is a valid outcome -------------------
@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    mounted: bool = False  # a `mount` that left its mountpoint mounted

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()

    def one_line_error(self) -> str:
        """The error line; asserts it is exactly one line with our prefix."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (
            f"expected one '{ERROR_PREFIX}...' line on stderr, got:\n{self.stderr}")
        return lines[0]

    def summary(self) -> str:
        text = self.stderr.strip() or self.stdout.strip() or "<no output>"
        return f"exit {self.returncode}: " + " / ".join(text.splitlines()[:3])


class LazyfsCli:
    """``cli.run("mount", mp, "--repo", ...)``: rez-lazyfs with an isolated
    environment (no user config) and a marker to find its daemons. Teardown
    unmounts every path it was given that is still mounted and stops its
    daemons, so a bad input that wrongly mounts anyway leaves nothing behind."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.marker = uuid.uuid4().hex
        self.paths: set[Path] = set()
        self.runs = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_LAZYFS")}
        xdg = self.work_dir / "xdg"
        env.update(XDG_CONFIG_HOME=str(xdg / "config"), XDG_CACHE_HOME=str(xdg / "cache"),
                   XDG_DATA_HOME=str(xdg / "data"), XDG_STATE_HOME=str(xdg / "state"),
                   PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}")
        env[MARKER_VAR] = self.marker
        return env

    def run(self, *args, timeout: float = 60, track: bool = True) -> CliResult:
        """Run `rez-lazyfs ARGS`; the mountpoint of a `mount` is remembered
        (unless track=False) and unmounted at teardown if still mounted."""
        argv = [str(LAZYFS), *map(str, args)]
        if track and len(args) > 1 and args[0] == "mount":
            self.paths.add(Path(args[2] if args[1] == "--over" else args[1]))
        self.runs += 1
        self.work_dir.mkdir(parents=True, exist_ok=True)
        out, err = (self.work_dir / f"cli-{self.runs}.{s}" for s in ("out", "err"))
        # Files, not pipes: a daemon keeping an inherited pipe would block us.
        with open(out, "wb") as o, open(err, "wb") as e:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                      env=self.env(), timeout=timeout, cwd=self.work_dir)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = -999
        mounted = bool(args) and args[0] == "mount" and len(args) > 1 and is_mounted(Path(args[1]))
        return CliResult(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"), mounted)

    def daemons(self) -> list[int]:
        return [pid for pid in processes_with_marker(self.marker) if is_daemon(pid)]

    def teardown(self) -> list[str]:
        problems = []
        for path in self.paths:
            for args in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
                if not is_mounted(path):
                    break
                subprocess.run([*args, str(path)], capture_output=True, timeout=60)
            if is_mounted(path):
                problems.append(f"{path} is STILL MOUNTED")
        deadline = time.monotonic() + 15
        while processes_with_marker(self.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in processes_with_marker(self.marker):
            problems.append(f"rez-lazyfs pid {pid} still running after teardown; killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return problems


@pytest.fixture(name="lazyfs_cli")
def lazyfs_cli_fixture(tmp_path):
    cli = LazyfsCli(tmp_path / "cli")
    yield from yield_then_check(cli, cli.teardown)


class LazyfsMounterAt(LazyfsMounter):
    """lazyfs_mount, plus ``.at(path, repos, cache=...)`` for a chosen mountpoint."""

    def at(self, path: Path, repos: dict[str, Path], *, cache: Path, **options) -> LazyMount:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lazy_mount = LazyMount(path=path, options=MountOptions(repos=dict(repos), cache=cache, **options),
                               work_dir=self.work_dir, expected_log=self.expected_log)
        self.mounts.append(lazy_mount)
        lazy_mount.mount()
        return lazy_mount


@pytest.fixture(name="lazyfs_mount_at")
def lazyfs_mount_at_fixture(tmp_path):
    mounter = LazyfsMounterAt(tmp_path / "lazyfs-at")
    yield from yield_then_check(mounter, mounter.teardown)


# -- small tools ------------------------------------------------------------------
def daemon_pid(m: LazyMount) -> int:
    """The one mount daemon serving *m* (found by the fixture's env marker)."""
    pids = [pid for pid in m.daemon_pids() if is_daemon(pid)]
    assert len(pids) == 1, f"expected one daemon for {m.path}, found {pids}"
    return pids[0]


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Until every thread of *pid* has exited (its files are closed). A
    zombie leader whose threads are all gone counts as gone: its parent,
    the CLI, exited long ago and whoever adopted it reaps it when it likes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        if zombie and len(threads) <= 1:
            return
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout}s"
        time.sleep(0.01)


def drop_page_cache(path) -> None:
    """Evict a file from the kernel page cache so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_CHILD = r"""
import errno, hashlib, os, sys, time
op, path = sys.argv[1], os.fsencode(sys.argv[2])
start = time.monotonic()
try:
    if op == "read":
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            outcome = hashlib.sha256(f.read()).hexdigest()
    elif op == "list":
        outcome = ",".join(sorted(os.fsdecode(n) for n in os.listdir(path)))
    elif op == "statfs":
        os.statvfs(path)
        outcome = "ok"
    else:
        os.stat(path)
        outcome = "ok"
except OSError as exc:
    outcome = errno.errorcode.get(exc.errno, str(exc.errno))
print(outcome or "-", time.monotonic() - start)
"""


def in_child(op: str, path, timeout: float) -> tuple[str, float]:
    """("read" -> sha256 | "list" -> comma-joined names | "stat"/"statfs" -> "ok"), or
    the errno name, and the seconds it took, done in a child process so a
    hang only hangs the child: outcome "HUNG" after *timeout*."""
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", _CHILD, op, os.fsdecode(path)],
                                capture_output=True, text=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        return "HUNG", time.monotonic() - start
    if result.returncode != 0:
        return f"CRASHED: {result.stderr.strip()[-300:]}", time.monotonic() - start
    outcome, elapsed = result.stdout.split()
    return outcome, float(elapsed)


def mount_options(path: Path) -> set[str]:
    """The options of the mount at *path* in /proc/self/mounts."""
    target = os.fsencode(path)
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[1].replace(b"\\040", b" ") == target:
                return set(fields[3].decode().split(","))
    raise AssertionError(f"{path} is not mounted")


def tree_modes(root: Path) -> dict[str, int]:
    """relpath -> permission bits of everything below *root* (no symlink following)."""
    modes = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            modes[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return modes


def log_problems(log_path: Path, expected: tuple[str, ...] = (), since: int = 0) -> list[str]:
    """Traceback lines, and WARNING/ERROR lines containing none of *expected*."""
    from helpers.mounts import PROBLEM_LEVEL

    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    wanted = [os.fsencode(e) for e in expected]
    return [line.decode(errors="replace") for line in lines
            if b"Traceback" in line
            or (PROBLEM_LEVEL.search(line) and not any(w in line for w in wanted))]


def log_text(log_path: Path) -> str:
    try:
        return Path(log_path).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


# -- script entry points -------------------------------------------------------------
def _run_report() -> int:
    env = {**os.environ, "FAULTS_REPORT": str(COMMITTED_REPORT)}
    tests = [str(REPO_ROOT / "tests" / "integration" / m) for m in REPORT_MODULES]
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in _KINDS and len(sys.argv) == 5:
        sys.exit(_faultfs_main(*sys.argv[1:5]))
    if sys.argv[1:] == ["--report"]:
        sys.exit(_run_report())
    sys.exit("usage: faults.py --report | faults.py faultfs|faultdisk SOURCE MOUNTPOINT CONTROL")
