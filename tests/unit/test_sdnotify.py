"""systemd's readiness protocol (mount/sdnotify.py) against real unix datagram
sockets, the addresses systemd hands out: a path, or an abstract name
(`@...`). A manager that is gone or an address that is not a unix socket is a
warning, never an error: the mount serves either way. (The units themselves,
run as systemd runs them: tests/integration/test_login.py.)"""
from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

from mount import sdnotify


@pytest.fixture
def manager(tmp_path):
    """A bound datagram socket and the NOTIFY_SOCKET value naming it."""
    made = []

    def bind(kind: str) -> tuple[socket.socket, str]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        made.append(s)
        if kind == "path":
            address = str(tmp_path / "notify")
            s.bind(address)
        else:
            address = f"@rez-lazyfs-unit-{uuid.uuid4().hex}"
            s.bind("\0" + address[1:])
        s.settimeout(5)
        return s, address

    yield bind
    for s in made:
        s.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_and_stopping_reach_the_manager(manager, monkeypatch, kind):
    s, address = manager(kind)
    monkeypatch.setenv(sdnotify.SOCKET_VAR, address)
    sdnotify.ready("/mnt/rez")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving /mnt/rez"
    sdnotify.stopping("/mnt/rez")
    assert s.recv(4096) == b"STOPPING=1\nSTATUS=unmounting /mnt/rez"


def test_no_manager_no_message_and_a_gone_one_is_a_warning(tmp_path, manager, monkeypatch, caplog):
    s, address = manager("path")
    monkeypatch.delenv(sdnotify.SOCKET_VAR, raising=False)
    sdnotify.ready("/mnt/rez")  # outside systemd: nothing to tell
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recv(4096)

    caplog.set_level(logging.WARNING, logger="rez_lazyfs")
    monkeypatch.setenv(sdnotify.SOCKET_VAR, str(tmp_path / "gone"))
    sdnotify.ready("/mnt/rez")
    monkeypatch.setenv(sdnotify.SOCKET_VAR, "vsock:2:1234")
    sdnotify.ready("/mnt/rez")
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"cannot tell the service manager READY=1 through {tmp_path / 'gone'}: "
                    "No such file or directory",
                    "NOTIFY_SOCKET=vsock:2:1234 is not a unix socket path: not telling the "
                    "service manager READY=1"], said


def test_the_watchdog_is_fed_only_when_systemd_watches_this_process(monkeypatch, caplog):
    monkeypatch.setenv(sdnotify.SOCKET_VAR, "@rez-lazyfs-unit-watchdog")
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.without_manager(os.environ).keys() == \
        os.environ.keys() - {sdnotify.SOCKET_VAR, "WATCHDOG_USEC"}
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None
    caplog.set_level(logging.WARNING, logger="rez_lazyfs")
    monkeypatch.setenv("WATCHDOG_USEC", "1min")
    assert sdnotify.watchdog_interval() is None
    assert [r.getMessage() for r in caplog.records] == \
        ["WATCHDOG_USEC=1min is not a number of microseconds: no watchdog"]
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv(sdnotify.SOCKET_VAR)
    assert sdnotify.watchdog_interval() is None
