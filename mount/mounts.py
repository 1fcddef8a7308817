"""What is mounted where, and asking a mount something with a time limit.

A FUSE mount whose daemon is stopped or hung answers nothing: every syscall
on it waits until the daemon answers or the caller is killed, and a thread
stuck in one can be neither interrupted nor abandoned cleanly (it holds the
mount busy, so even unmounting it fails). So commands never touch a mount
(ours, or a network filesystem under a store or the cache) in their own
process without a limit: what is mounted where comes from
/proc/self/mountinfo, which costs no syscall on any mount, and each question
to a mount is asked by a forked child that is killed if it has not answered
in time (`ask`). A FUSE request not yet read by its daemon ends with the
child; a hung NFS call is killable too.
"""
from __future__ import annotations

import os
import pickle
import re
import select
import signal
import time
from dataclasses import dataclass

# Seconds a command waits for a mount to answer a question about itself. A
# healthy rez-lazyfs mount answers from memory in milliseconds; one that has
# not answered in this long is stopped, hung or swamped, and the command says
# so instead of waiting with it.
PROBE_TIMEOUT = 5.0

# Filesystems on a local block device (or in memory): a syscall on them may be
# slow but does not wait on another machine or process. Anything else (nfs,
# cifs, fuse.*, 9p, ceph, ...) can stall for as long as its server does.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "zfs", "jfs", "reiserfs",
    "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs3", "squashfs", "erofs",
})


@dataclass(frozen=True)
class MountEntry:
    path: str      # where it is mounted
    fstype: str    # e.g. "ext4", "nfs4", "fuse.rez-lazyfs"
    device: str    # major:minor (a FUSE connection's number is its minor)
    source: str = ""  # what was mounted: a device, a server's export, a FUSE fsname


class NoAnswer(Exception):
    """The mount (or filesystem) did not answer within the time limit."""


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo and leaves
    # every other byte as it is: undo the escapes on bytes, then decode as
    # the filesystem does (a non-ASCII path stays that path).
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def _escape(path: str) -> str:
    """A path as mountinfo writes it, space, tab, newline and backslash as
    \\ooo, and its bytes that are not UTF-8 too (os.fsdecode made them
    surrogates), so that the text can be encoded: _unescape reads it back."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else
                   f"\\{ord(c) - 0xDC00:03o}" if "\udc80" <= c <= "\udcff" else c
                   for c in path)


def mount_table() -> list[MountEntry]:
    """Every mount this process can see, in mount order (a stacked mount after
    the one it covers)."""
    entries = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                left, _, right = line.rstrip(b"\n").partition(b" - ")
                fields, tail = left.split(b" "), right.split(b" ")
                if len(fields) >= 5 and tail:
                    entries.append(MountEntry(_unescape(fields[4]), _unescape(tail[0]),
                                              fields[2].decode(),
                                              _unescape(tail[1]) if len(tail) > 1 else ""))
    except OSError:
        pass
    return entries


def mount_at(path: str) -> MountEntry | None:
    """The mount whose mount point is exactly `path` (the top one if stacked)."""
    found = None
    for entry in mount_table():
        if entry.path == path:
            found = entry
    return found


def canonical(path: str) -> str:
    """`path` absolute, its parent's symlinks resolved (not the path itself: if
    it is a mount point, resolving it would ask the mount), as mountinfo has it."""
    path = os.path.abspath(path)
    try:
        parent = ask(PROBE_TIMEOUT, os.path.realpath, os.path.dirname(path))
    except NoAnswer:
        return path
    return os.path.join(parent, os.path.basename(path))


def filesystem_of(path: str) -> MountEntry | None:
    """The mount holding `path` (an absolute path with symlinks resolved)."""
    best = None
    for entry in mount_table():
        prefix = entry.path.rstrip("/") + "/"
        if (path == entry.path or path.startswith(prefix)) and \
                (best is None or len(entry.path) >= len(best.path)):
            best = entry
    return best


def may_stall(path: str) -> bool:
    """Whether syscalls on `path` can wait on another machine or process."""
    entry = filesystem_of(path)
    return entry is None or entry.fstype not in LOCAL_FILESYSTEMS


def ask(timeout: float, fn, *args):
    """fn(*args) run in a forked child; its result, or the OSError it raised.

    NoAnswer if the child has not answered within `timeout` seconds: it is
    killed then, and not waited for (a child stuck in a request its server
    already took cannot die until the server answers; it is reaped by
    whoever inherits it)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one call, its outcome down the pipe, no cleanup
        try:
            # Nothing else of the parent's: a child that cannot die must not
            # hold its output pipes (or anything else) open.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, write_end)
            os.closerange(write_end + 1, 1 << 20)
            try:
                outcome = ("value", fn(*args))
            except OSError as e:
                outcome = ("oserror", e.errno, e.strerror, e.filename)
            except Exception as e:
                outcome = ("error", f"{type(e).__name__}: {e}")
            data = memoryview(pickle.dumps(outcome))
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks = []
    answered = False
    try:
        while not answered:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                break
            chunk = os.read(read_end, 65536)
            chunks.append(chunk)
            answered = not chunk
    finally:
        os.close(read_end)
    if not answered:
        os.kill(pid, signal.SIGKILL)
        _reaped(pid, wait=0.2)
        raise NoAnswer(f"no answer within {timeout:g}s")
    os.waitpid(pid, 0)  # it has written everything and is exiting
    outcome = pickle.loads(b"".join(chunks))
    if outcome[0] == "oserror":
        raise OSError(outcome[1], outcome[2], outcome[3])
    if outcome[0] == "error":
        raise RuntimeError(outcome[1])
    return outcome[1]


def _reaped(pid: int, wait: float = 0.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def daemon_title(mountpoint: str, repos) -> str:
    """What ps, top and systemctl status show for the daemon serving
    `mountpoint` (its process title): `rez-lazyfs mount MOUNTPOINT ALIAS=STORE
    ...`, paths written as the mount table writes them, so the title splits
    into its words at spaces (serving_process reads the mount point back)."""
    return " ".join(["rez-lazyfs", "mount", _escape(mountpoint),
                     *(f"{repo.alias}={_escape(repo.path)}" for repo in repos)])


def serving_process(mountpoint: str, asker: int) -> tuple[int, str] | None:
    """(pid, state letter from /proc/PID/stat) of the rez-lazyfs daemon serving
    `mountpoint`, found by its process title (daemon_title), which a daemon
    (or a foreground mount) takes before it mounts. `asker` (the command
    asking) is not it."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == asker:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().split(b"\0", 1)[0].split(b" ")
            if words[:2] != [b"rez-lazyfs", b"mount"] or len(words) < 3 \
                    or _unescape(words[2]) != mountpoint:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0].decode()
        except (OSError, IndexError):
            continue
        return int(entry), state
    return None


def silence(mountpoint: str, timeout: float) -> str:
    """What a command says about a mount that did not answer."""
    try:
        # Reading a process's command line can wait on that process's memory
        # map, held by a page fault on the silent mount: asked with a limit too.
        found = ask(PROBE_TIMEOUT, serving_process, mountpoint, os.getpid())
    except NoAnswer:
        found = None
    if found is None:
        who = "no daemon serving it was found"
    else:
        pid, state = found
        who = {"T": f"daemon pid {pid} is stopped", "t": f"daemon pid {pid} is stopped",
               "D": f"daemon pid {pid} is blocked in the kernel",
               "Z": f"daemon pid {pid} has exited"}.get(state, f"daemon pid {pid} is busy or hung")
    return f"{mountpoint} does not answer within {timeout:g}s ({who})"
