"""Mounting at login and at boot, the ways an administrator sets it up: the
systemd unit `rez-lazyfs service install` writes (its commands run exactly as
written, stopped the way systemd stops a service), mount(8) and /etc/fstab
through the real mount.fuse3 helper, and a mount whose daemon was killed.

No systemd runs on the test machines, and mount(8) runs helpers with no PATH,
so mount(8) is run in a private mount namespace where /usr/local/bin holds
the rez-lazyfs command, as an administrator would install it.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import struct
import subprocess
import time
import uuid
import weakref
from pathlib import Path

import pytest

from helpers.mounts import EXIT_TIMEOUT, LAZYFS, MARKER_VAR, LazyMount, MountOptions, is_mounted
from helpers.namespaces import MountNamespace, mount_namespace  # noqa: F401 (a fixture)
from helpers.trees import KiB, deterministic_bytes, write_rez_package
from helpers.walk import assert_same_tree, walk

ALIAS = "main"
MOUNT_TIMEOUT = 30  # seconds for a foreground mount to answer
# What systemd gives a service: no virtualenv on PATH, so the unit must name
# the command by absolute path.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def build_store(root: Path) -> Path:
    write_rez_package(root, "tool", "1.0.0", commands='env.PATH.prepend("{root}/bin")',
                      files={"bin/tool": "#!/bin/sh\necho tool\n",
                             "data/blocks.bin": deterministic_bytes(3 * 64 * KiB + 5, seed=7)},
                      executables=("bin/tool",))
    write_rez_package(root, "lib", "2.1", files={"include/lib.h": "int lib(void);\n"})
    return root


def write_config(path: Path, *, cache: Path, store: Path, mountpoint: Path | None = None) -> Path:
    lines = [f'cache = "{cache}"', 'block_size = "64K"']
    if mountpoint is not None:
        lines.append(f'mountpoint = "{mountpoint}"')
    lines += ["", "[repos]", f'{ALIAS} = "{store}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def lazyfs(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(LAZYFS), *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, f"rez-lazyfs {args} exited {result.returncode}:\n{result.stderr}"
    return result


# 1. The systemd unit ----------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, str]]:
    """section -> key -> value of a systemd unit (each key once, as we write them)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{line!r} is outside any section"
        assert key not in current, f"{key} given twice"
        current[key] = value
    return sections


def command_line(value: str) -> list[str]:
    """An ExecStart=/ExecStop= value as argv; a leading `-` only tells systemd
    to ignore the exit status. (Our paths hold no `%` or `$`, the only other
    thing systemd would expand.)"""
    return shlex.split(value.removeprefix("-"))


class ServiceManager:
    """systemd's end of a Type=notify unit's socket (sd_notify(3)): an abstract
    datagram socket that takes each sender's credentials, as systemd's does, so
    that only the unit's main process counts (its default NotifyAccess=main)."""

    def __init__(self):
        self.address = f"@rez-lazyfs-test-{uuid.uuid4().hex}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind("\0" + self.address[1:])
        weakref.finalize(self, self._socket.close)  # once no mount of the test needs it
        self.messages: list[tuple[int, dict[str, str], float]] = []  # (sender pid, fields, when)

    def receive(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        self._socket.settimeout(timeout)
        try:
            data, ancillary, _, _ = self._socket.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
        except (TimeoutError, BlockingIOError):  # nothing within timeout (0: nothing waiting)
            return None
        [pid] = [CREDENTIALS.unpack_from(cdata)[0] for level, kind, cdata in ancillary
                 if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
        fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
        self.messages.append((pid, fields, time.monotonic()))
        return pid, fields


class SupervisedMount(LazyMount):
    """The unit's ExecStart run as systemd runs a Type=notify service: in the
    foreground, with systemd's environment and notify socket, started once its
    main process says READY=1, stopped with SIGTERM."""

    def __init__(self, argv: list[str], watchdog: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.argv = argv
        self.watchdog = watchdog  # WatchdogSec=, as systemd hands it over (WATCHDOG_USEC)
        self.process: subprocess.Popen | None = None
        self.manager = ServiceManager()
        self.main_pids: list[int] = []  # of every ExecStart run

    @property
    def journal(self) -> Path:
        """What the service wrote to stdout and stderr: what journald would keep."""
        return self._work_dir / f"{self.path.name}-journal.txt"

    def start(self) -> None:
        """ExecStart, as systemd runs it (again, when it restarts the unit)."""
        env = {"PATH": SYSTEMD_PATH, "HOME": str(self._work_dir), MARKER_VAR: self._marker,
               "NOTIFY_SOCKET": self.manager.address}
        if self.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.watchdog * 1e6))
        with open(self.journal, "ab") as journal:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=journal,
                                            stderr=subprocess.STDOUT, env=env)
        self.main_pids.append(self.process.pid)

    def wait_ready(self) -> float:
        """Seconds until the main process said READY=1; the mount must answer
        by then (systemd starts the units ordered after it at that moment)."""
        started = time.monotonic()
        deadline = started + MOUNT_TIMEOUT
        while True:
            assert self.process.poll() is None, self._failure(f"ExecStart exited {self.process.returncode}")
            assert time.monotonic() < deadline, self._failure("ExecStart did not report READY=1 in time")
            message = self.manager.receive(0.1)
            if message is None:
                continue
            pid, fields = message
            assert pid == self.process.pid, f"pid {pid}, not the unit's main process, sent {fields}"
            if fields.get("READY") == "1":
                break
        assert is_mounted(self.path), self._failure("READY=1 before the mount was in the mount table")
        os.stat(self.path)
        assert fields["STATUS"] == f"serving {self.path}", fields
        return time.monotonic() - started

    def mount(self) -> None:
        self.start()
        self.wait_ready()
        self.mounted = True

    def exit_status(self) -> int:
        """Wait for the service's main process to end, as systemd does after stopping it."""
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(self._failure(f"still running {EXIT_TIMEOUT}s after being stopped")) from None

    def reported(self) -> list[dict[str, str]]:
        """Everything the unit sent systemd so far, each from a main process
        (never from a daemon the main process started)."""
        while self.manager.receive(0) is not None:
            pass
        assert all(pid in self.main_pids for pid, _, _ in self.manager.messages), \
            (self.main_pids, self.manager.messages)
        return [fields for _, fields, _ in self.manager.messages if fields != {"WATCHDOG": "1"}]

    def watchdog_fed(self, seconds: float) -> int:
        """How many WATCHDOG=1 the unit sent in the next `seconds`."""
        since = time.monotonic()
        while time.monotonic() < since + seconds:
            self.manager.receive(0.05)
        self.reported()  # every message from a main process
        return sum(1 for _, fields, when in self.manager.messages
                   if fields == {"WATCHDOG": "1"} and when >= since)


@pytest.fixture
def supervise(tmp_path, lazyfs_mount):
    """Factory: run a unit's ExecStart; the lazyfs_mount fixture's teardown
    unmounts, ends the process and checks its log as for any other mount."""
    def start(argv: list[str], mountpoint: Path, cache: Path,
              watchdog: float | None = None) -> SupervisedMount:
        mount = SupervisedMount(argv, watchdog=watchdog, path=mountpoint,
                                options=MountOptions(repos={}, cache=cache),
                                work_dir=tmp_path, expected_log=lazyfs_mount.expected_log)
        lazyfs_mount.mounts.append(mount)
        mount.mount()
        return mount

    return start


def install_unit(tmp_path: Path, *args) -> tuple[Path, dict[str, dict[str, str]], list[list[str]]]:
    """Runs `service install`: the unit's path, its contents, and the shell
    commands it printed (as argv)."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    output = lazyfs("service", "install", *args, env=env).stdout
    unit_path = Path(output.splitlines()[0].removeprefix("wrote "))
    # systemd's own parser: any line it would ignore or refuse is printed.
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_path)],
                            capture_output=True, text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), verify
    commands = [shlex.split(line) for line in output.splitlines() if line.startswith("  ")]
    return unit_path, parse_unit(unit_path.read_text()), commands


def test_user_unit_mounts_at_login_and_unmounts_on_sigterm(tmp_path, supervise):
    store = build_store(tmp_path / "store")
    # A space in the mountpoint: the unit's quoting must hold.
    mountpoint = tmp_path / "rez lazy"
    config = write_config(tmp_path / "config.toml", cache=tmp_path / "cache", store=store,
                          mountpoint=mountpoint)

    unit_path, unit, commands = install_unit(tmp_path, "--config", config)

    assert unit_path.parent == tmp_path / "xdg" / "systemd" / "user"
    assert ["systemctl", "--user", "enable", "--now", unit_path.name] in commands
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["Type"] == "notify"
    assert unit["Install"]["WantedBy"] == "default.target"
    argv = command_line(unit["Service"]["ExecStart"])
    assert argv == [str(LAZYFS), "mount", str(mountpoint), "--foreground", "--config", str(config)]

    assert unit["Service"]["WatchdogSec"] == "60"
    # A shorter watchdog period than the unit's, as `systemctl edit` would set
    # it: its event loop says WATCHDOG=1 twice a period, from the first second.
    m = supervise(argv, mountpoint, tmp_path / "cache", watchdog=0.5)
    assert_same_tree(walk(store), walk(mountpoint / ALIAS))
    fed = m.watchdog_fed(1.5)
    assert fed >= 3, f"{fed} WATCHDOG=1 in 1.5 s with WatchdogSec=0.5"

    m.process.send_signal(signal.SIGTERM)
    assert m.exit_status() == 0
    assert not is_mounted(mountpoint)
    m.mounted = False
    assert m.reported() == [{"READY": "1", "STATUS": f"serving {mountpoint}"},
                            {"STOPPING": "1", "STATUS": f"unmounting {mountpoint}"}]
    journal = m.journal.read_text()
    assert f"mounted {mountpoint}" in journal and "SIGTERM: unmounting" in journal, journal

    # Enabled, as `systemctl --user enable` leaves it; uninstall undoes both.
    wants = unit_path.parent / "default.target.wants"
    wants.mkdir()
    (wants / unit_path.name).symlink_to(unit_path)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    lazyfs("service", "uninstall", "--config", config, env=env)
    assert not unit_path.exists() and not os.path.lexists(wants / unit_path.name)


def test_system_unit_mounts_for_every_user_and_execstop_unmounts(tmp_path, supervise):
    store = build_store(tmp_path / "store")
    mountpoint = tmp_path / "mnt"
    config = write_config(tmp_path / "rez-lazyfs.toml", cache=tmp_path / "cache", store=store)
    units = tmp_path / "etc-systemd-system"

    unit_path, unit, commands = install_unit(tmp_path, "--system", "--mountpoint", mountpoint,
                                             "--config", config, "--unit-dir", units)

    assert unit_path.parent == units and mountpoint.is_dir()
    assert ["systemctl", "enable", "--now", unit_path.name] in commands
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    argv = command_line(unit["Service"]["ExecStart"])
    assert "--allow-other" in argv

    m = supervise(argv, mountpoint, tmp_path / "cache")
    with open("/proc/self/mounts") as f:
        options = next(line.split()[3] for line in f if line.split()[1] == str(mountpoint))
    assert "allow_other" in options.split(",")
    assert_same_tree(walk(store), walk(mountpoint / ALIAS))

    # systemctl stop: ExecStop first; the service's process then ends by itself.
    stop = subprocess.run(command_line(unit["Service"]["ExecStop"]), capture_output=True, text=True,
                          env={"PATH": SYSTEMD_PATH}, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert m.exit_status() == 0
    assert not is_mounted(mountpoint)
    m.mounted = False


def test_a_unit_whose_mount_cannot_start_fails_its_start(tmp_path, lazyfs_mount):
    """Type=notify: no READY=1 and a non-zero exit, so systemd fails the start
    and never starts the units ordered after it."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    config = write_config(tmp_path / "config.toml", cache=tmp_path / "cache",
                          store=tmp_path / "no-such-store", mountpoint=mountpoint)
    m = SupervisedMount([str(LAZYFS), "mount", str(mountpoint), "--foreground", "--config",
                         str(config)], path=mountpoint,
                        options=MountOptions(repos={}, cache=tmp_path / "cache"),
                        work_dir=tmp_path, expected_log=lazyfs_mount.expected_log)
    m.start()
    assert m.exit_status() == 1
    assert m.reported() == [] and not is_mounted(mountpoint)
    journal = m.journal.read_text()
    assert journal.startswith(f"rez-lazyfs: error: store path {tmp_path / 'no-such-store'}"), journal
    assert len(journal.splitlines()) == 1, journal


def test_service_install_refuses_a_config_without_repositories(tmp_path):
    config = tmp_path / "empty.toml"
    config.write_text(f'cache = "{tmp_path / "cache"}"\n')
    result = subprocess.run([str(LAZYFS), "service", "install", "--config", str(config),
                             "--mountpoint", str(tmp_path / "mnt"), "--unit-dir", str(tmp_path / "units")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("rez-lazyfs: error: no repositories given"), result.stderr
    assert not (tmp_path / "units").exists()


# 2. mount(8) and /etc/fstab ---------------------------------------------------


@pytest.fixture
def admin_namespace(tmp_path, mount_namespace) -> MountNamespace:
    """A mount namespace where rez-lazyfs is installed the way the README says
    (a link in /usr/local/bin), since mount(8) clears PATH before running
    mount.fuse3 and its /bin/sh."""
    bin_dir = tmp_path / "usr-local-bin"
    bin_dir.mkdir()
    (bin_dir / "rez-lazyfs").symlink_to(LAZYFS)
    ns = mount_namespace()
    ns.bind(bin_dir, "/usr/local/bin")
    return ns


GENERIC_OPTIONS = "ro,nosuid,nodev,allow_other,noauto,_netdev,nofail,x-systemd.automount"


@pytest.mark.parametrize("how", ["mount -t", "fstab line"])
def test_mount_8_mounts_through_mount_fuse3_and_umount_8_unmounts(tmp_path, admin_namespace, how):
    store = build_store(tmp_path / "store")
    cache = tmp_path / "cache"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    if how == "mount -t":
        options = f"repo={ALIAS}:{store},cache={cache},block_size=64K,{GENERIC_OPTIONS}"
        argv = ["mount", "-t", "fuse.rez-lazyfs", "rez-lazyfs", mountpoint, "-o", options]
    else:
        config = write_config(tmp_path / "rez-lazyfs.toml", cache=cache, store=store)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# <source> <mountpoint> <type> <options> <dump> <pass>\n"
                         f"rez-lazyfs {mountpoint} fuse.rez-lazyfs config={config},{GENERIC_OPTIONS} 0 0\n")
        argv = ["mount", "--fstab", fstab, mountpoint]

    m = admin_namespace.adopt_mount(argv, mountpoint, MountOptions(repos={ALIAS: store}, cache=cache))

    assert admin_namespace.is_mounted(mountpoint, b"fuse.rez-lazyfs")
    assert_same_tree(walk(store), walk(admin_namespace.outside(mountpoint / ALIAS)))
    m.unmount(["umount", mountpoint])


def test_mount_8_reports_an_unknown_option_clearly(tmp_path, admin_namespace):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = admin_namespace.run(
        ["mount", "-t", "fuse.rez-lazyfs", "rez-lazyfs", mountpoint, "-o",
         f"repo={ALIAS}:{tmp_path},cache={tmp_path / 'cache'},colour=blue"], check=False)
    assert result.returncode != 0
    assert "rez-lazyfs: error: unknown mount option 'colour=blue'" in result.stderr, result.stderr
    assert not admin_namespace.is_mounted(mountpoint)


# 3. A dead mount --------------------------------------------------------------


def test_mount_over_a_dead_mount_clears_it(tmp_path, lazyfs_mount):
    store = build_store(tmp_path / "store")
    m = lazyfs_mount({ALIAS: store})
    walk(m.repo_path(ALIAS))
    for pid in m.daemon_pids():
        os.kill(pid, signal.SIGKILL)

    # What a crashed daemon leaves behind, still in the mount table. (stat()
    # of the mountpoint may still succeed: the kernel caches its attributes.)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while m.daemon_pids():
        assert time.monotonic() < deadline, "the killed daemon did not exit"
        time.sleep(0.05)
    with pytest.raises(OSError) as dead:
        os.listdir(m.path)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert is_mounted(m.path)

    m.mounted = False  # as far as rez-lazyfs is concerned; the next mount must cope
    m.mount()
    assert_same_tree(walk(store), walk(m.repo_path(ALIAS)))
