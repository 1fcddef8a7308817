"""systemd's readiness protocol (sd_notify(3)) for the units `service install`
writes (`Type=notify`): the service counts as started once the mount answers,
not when its process starts, so a render job's unit ordered after it never
finds an empty mount point, and a mount that fails before answering fails the
unit's start.

Only the unit's main process speaks (systemd's default `NotifyAccess=main`):
the foreground mount, or a transparent mount's supervisor. The daemons a
process starts (`daemon.spawn`) are not given NOTIFY_SOCKET.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("rez_lazyfs")
SOCKET_VAR = "NOTIFY_SOCKET"


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
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as e:
        log.warning("cannot tell the service manager %s through %s: %s", fields[0],
                    os.environ[SOCKET_VAR], e.strerror or e)


def ready(mountpoint: str) -> None:
    notify("READY=1", f"STATUS=serving {mountpoint}")


def stopping(mountpoint: str) -> None:
    notify("STOPPING=1", f"STATUS=unmounting {mountpoint}")
