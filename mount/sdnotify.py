"""systemd's readiness protocol (sd_notify(3)) for the units `service install`
writes (`Type=notify`): the service counts as started once the mount answers,
not when its process starts, so a render job's unit ordered after it never
finds an empty mount point, and a mount that fails before answering fails the
unit's start.

Only the unit's main process speaks (systemd's default `NotifyAccess=main`):
the foreground mount, or a transparent mount's supervisor. The daemons a
process starts (`daemon.spawn`) are not given these variables.

A plain mount's unit also has a watchdog (`WatchdogSec=`): the daemon's event
loop says WATCHDOG=1 twice a period, so a daemon whose loop stopped (a
deadlock, a bug) is killed and restarted by systemd, and the restarted one
clears the dead mount. A transparent mount's supervisor watches its daemon
itself (mount/supervisor.py).
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("rez_lazyfs")
SOCKET_VAR = "NOTIFY_SOCKET"
WATCHDOG_VARS = ("WATCHDOG_USEC", "WATCHDOG_PID")


def notify(*fields: str) -> None:
    """Send `fields` ("READY=1", "STATUS=...") to the service manager, if one
    asked for them; else nothing. A manager that went away is logged, never
    fatal: the mount serves either way."""
    address = os.environ.get(SOCKET_VAR)
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("%s=%s is not a unix socket path: not telling the service manager %s",
                    SOCKET_VAR, address, fields[0])
        return
    try:
        # Never waits (the watchdog is fed from the event loop): a manager
        # whose queue is full misses one message, and is told the next.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                           | socket.SOCK_NONBLOCK) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as e:
        log.warning("cannot tell the service manager %s through %s: %s", fields[0],
                    os.environ[SOCKET_VAR], e.strerror or e)


def ready(mountpoint: str) -> None:
    notify("READY=1", f"STATUS=serving {mountpoint}")


def stopping(mountpoint: str) -> None:
    notify("STOPPING=1", f"STATUS=unmounting {mountpoint}")


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 (half systemd's period), if systemd
    watches this process; else None."""
    period, pid = (os.environ.get(name) for name in WATCHDOG_VARS)
    if not os.environ.get(SOCKET_VAR) or not period or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(period) / 2e6 if int(period) > 0 else None
    except ValueError:
        log.warning("WATCHDOG_USEC=%s is not a number of microseconds: no watchdog", period)
        return None


def feed_watchdog() -> None:
    notify("WATCHDOG=1")


def without_manager(environ) -> dict[str, str]:
    """`environ` for a process that is not the unit's main one."""
    return {k: v for k, v in environ.items() if k != SOCKET_VAR and k not in WATCHDOG_VARS}
