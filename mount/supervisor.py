"""The supervisor of a transparent mount: it fails open.

A mount over the studio's package path must never leave that path
"Transport endpoint is not connected": a FUSE mount whose daemon died stays
mounted, and every process opening a package gets ENOTCONN until someone
unmounts it. So a transparent mount's daemon runs as the child of this small
process, which waits on it (a pidfd: woken the moment it dies) and probes
the mount (a statfs in a forked child, `mounts.ask`):

* the daemon dies (any signal, any exit) with its mount still there: the
  mount is detached at once (`fusermount3 -u -z`), so the store beneath
  serves the path, then a new daemon mounts over it again;
* the mount answers no statfs for `hang_after` (longer than a request can
  wait on the store: 2 x store_timeout + 10 s, 40 s by default): detached
  the same way, its FUSE connection aborted (requests waiting on it fail
  rather than wait), the daemon killed, and a new one started;
* the mount is unmounted (`rez-lazyfs umount`, which detaches a transparent
  mount lazily): nothing to do but wait until the daemon exits, which it
  does once the files still open through it are closed; then exit 0;
* SIGTERM, SIGINT, SIGHUP (systemd's stop): passed to the daemon, which
  unmounts; exit 0.

A new daemon is started 1 s after a death, then after twice as long each
time one dies within a minute of starting (up to 60 s): a daemon that
cannot stay up costs the store's direct traffic, never a dead path. It opens
the store's directory afresh: the path shows the store again by then.

Processes holding files open on the dead mount, or with a working directory
in it, keep a handle of the dead connection (ENOTCONN on their next read);
everything that looks the path up again, the next process above all, gets
the store, then the new mount. The README says what a site sees and for
how long.

The supervisor touches the mount only through mounts.ask (a killable child)
and the mount table; it keeps no descriptor in it and runs in /. Its own
start is the mount's start: the first daemon's error is the command's error.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

from . import sdnotify
from .config import Settings
from .errors import UserError
from .mounts import PROBE_TIMEOUT, NoAnswer, ask, mount_at, mount_table
from .over import FSTYPE

log = logging.getLogger("rez_lazyfs")

PROBE_INTERVAL = 2.0        # seconds between two statfs probes of the mount
FIRST_RESTART_DELAY = 1.0   # seconds from a daemon's death to the next one's start
MAX_RESTART_DELAY = 60.0
STABLE_AFTER = 60.0         # a daemon up this long resets the delay
STOP_TIMEOUT = 30.0         # seconds a signalled daemon has to unmount and exit


def hang_after(settings: Settings) -> float:
    """Seconds without a statfs answer after which the daemon counts as hung: a
    request can wait for a store thread, then for the store, each bounded by
    store_timeout; more than that, and two probes, is no longer waiting."""
    return 2 * settings.store_timeout + 2 * PROBE_TIMEOUT


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = settings.mountpoint
        self.daemon: subprocess.Popen | None = None
        self.pidfd = -1                  # readable once the daemon has exited
        self.started_at = 0.0
        self.device: str | None = None   # the FUSE connection of the daemon's mount
        self.answered = time.monotonic()  # the mount's last answer to a probe
        self.unmounted = False           # the mount went away while the daemon lived
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- the life of the mount ------------------------------------------------------
    def serve(self, on_ready=lambda: None) -> int:
        """Start the first daemon (its failure is a UserError), then keep the
        path served until unmounted or signalled. Returns the exit status."""
        from .daemon import spawn

        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: self._stop.set())
        self._started(*spawn("mount.daemon", self.settings))
        on_ready()
        threading.Thread(target=self._probe, daemon=True, name="probe").start()
        delay = FIRST_RESTART_DELAY
        while self._watch():
            if time.monotonic() - self.started_at >= STABLE_AFTER:
                delay = FIRST_RESTART_DELAY
            started = False
            while not started:
                log.info("starting a new daemon for %s in %gs", self.path, delay)
                if self._stop.wait(delay):
                    sdnotify.stopping(self.path)
                    return 0
                started = self._restart()
                delay = min(2 * delay, MAX_RESTART_DELAY)
        return 0

    def _started(self, child: subprocess.Popen, message: str) -> None:
        if message != "ok":
            raise UserError(message)
        self.daemon, self.started_at = child, time.monotonic()
        entry = mount_at(self.path)
        self.device = entry.device if entry is not None and entry.fstype == FSTYPE else None
        self.answered, self.unmounted = time.monotonic(), False
        self.pidfd = os.pidfd_open(child.pid)

    def _restart(self) -> bool:
        """Start a new daemon; whether it mounted."""
        from .daemon import spawn

        child, message = spawn("mount.daemon", self.settings)
        try:
            self._started(child, message)
        except UserError as e:
            log.warning("a new daemon could not mount over %s (%s); the store beneath "
                        "serves it meanwhile", self.path, e)
            return False
        log.info("%s is served by the cache again (daemon pid %d)", self.path, child.pid)
        return True

    def _watch(self) -> bool:
        """Until the daemon needs replacing (True: it died or hung; its mount
        is detached by then) or the mount is over (False: unmounted, or we
        were signalled)."""
        poll = select.poll()
        poll.register(self.pidfd, select.POLLIN)
        poll.register(self._wake_r, select.POLLIN)
        try:
            while True:
                if self._stop.is_set():
                    sdnotify.stopping(self.path)
                    self._stop_daemon()
                    return False
                if poll.poll(1000) and self.daemon.poll() is not None:
                    return self._died()
                if self._ours_mounted():
                    if time.monotonic() - self.answered > hang_after(self.settings):
                        return self._hung()
                elif not self.unmounted:
                    self.unmounted = True
                    log.info("%s was unmounted; the daemon (pid %d) exits once the files "
                             "open through it are closed", self.path, self.daemon.pid)
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
        finally:
            os.close(self.pidfd)

    def _died(self) -> bool:
        status = self.daemon.returncode
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else \
            f"exited with status {status}"
        if self._ours_mounted():
            self._detach()
            log.warning("the daemon of %s (pid %d) %s; its mount is detached, so the store "
                        "beneath serves the path until a new daemon mounts over it",
                        self.path, self.daemon.pid, how)
            return True
        if self.unmounted or status == 0:
            log.info("the daemon of %s (pid %d) %s after the unmount", self.path,
                     self.daemon.pid, how)
            return False
        log.warning("the daemon of %s (pid %d) %s", self.path, self.daemon.pid, how)
        return True

    def _hung(self) -> bool:
        pid = self.daemon.pid
        log.warning("%s has not answered for %.0fs (daemon pid %d): detaching it, so the "
                    "store beneath serves the path, and starting a new daemon", self.path,
                    time.monotonic() - self.answered, pid)
        self._detach()
        self._abort()
        self.daemon.kill()
        try:
            self.daemon.wait(PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the hung daemon (pid %d) did not exit on SIGKILL within %gs",
                        pid, PROBE_TIMEOUT)
        return True

    def _stop_daemon(self) -> None:
        log.info("stopping the daemon of %s (pid %d)", self.path, self.daemon.pid)
        self.daemon.terminate()
        try:
            self.daemon.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the daemon of %s (pid %d) did not unmount within %gs: killed it",
                        self.path, self.daemon.pid, STOP_TIMEOUT)
            self.daemon.kill()
            self.daemon.wait()
        if self._ours_mounted():
            self._detach()

    # -- the mount ------------------------------------------------------------------
    def _ours_mounted(self) -> bool:
        return self.device is not None and any(
            e.path == self.path and e.device == self.device for e in mount_table())

    def _detach(self) -> None:
        """Lazily unmount the daemon's mount, if it is the one on top of the path."""
        from .daemon import fusermount

        top = mount_at(self.path)
        if top is None or top.device != self.device:
            return  # something was mounted over it since: not ours to take away
        try:
            result = fusermount("-u", "-z", self.path)
        except UserError as e:
            log.error("cannot detach the mount at %s: %s", self.path, e)
            return
        if result.returncode != 0:
            log.error("cannot detach the mount at %s: %s", self.path, result.stderr.strip())

    def _abort(self) -> None:
        """Abort the mount's FUSE connection: requests waiting on it fail now."""
        minor = self.device.split(":")[1]
        try:
            with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                f.write("1")
        except OSError as e:
            log.info("could not abort FUSE connection %s (%s)", minor, e.strerror)

    def _probe(self) -> None:
        """Runs for the supervisor's life: a statfs of the mount every
        PROBE_INTERVAL, each in a child killed after PROBE_TIMEOUT."""
        while not self._stop.wait(PROBE_INTERVAL):
            if not self._ours_mounted():
                continue
            try:
                ask(PROBE_TIMEOUT, os.statvfs, self.path)
            except NoAnswer:
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                    log.info("probe of %s: %s", self.path, e.strerror)
            self.answered = time.monotonic()


if __name__ == "__main__":  # a transparent mount's supervisor (`mount` without --foreground)
    from .daemon import child_main

    # argv[2], the mount point, is for ps
    sys.exit(child_main(int(sys.argv[1]), lambda settings, on_ready:
                        Supervisor(settings).serve(on_ready), "the supervisor"))
