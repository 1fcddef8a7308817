"""A throwaway unprivileged user for the multi-user (hostile user) tests.

``throwaway_user`` (import ``throwaway_user_fixture`` into a test module)
creates a system user with no home and no login shell, named uniquely for
the test, and removes it afterwards; every process it still runs (only ever
ones this test started as it) is killed first. ``user.run(argv)`` runs a
command as that user, with no supplementary groups, from ``/``.

``public_tmp`` gives a directory under /tmp that other users can traverse
(pytest's own are 0700), removed at teardown unless something is still
mounted inside it (which the test then fails on).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.mounts import mounted_paths


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def argv(self, argv) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", *map(str, argv)]

    def run(self, argv, *, timeout: float = 60, input: bytes | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, timeout=timeout, cwd="/",
                              input=input, env=env)

    def python(self, code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run Python code as the user (the venv's interpreter, which can import diskcache)."""
        import sys

        return self.run([sys.executable, "-c", code, *args], timeout=timeout)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


@pytest.fixture(name="throwaway_user")
def throwaway_user_fixture():
    name = f"rlz{uuid.uuid4().hex[:10]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True, timeout=30)
    out = subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True)
    user = User(name, int(out.stdout), int(gid.stdout))
    try:
        yield user
    finally:
        # The uid is fresh: whatever runs under it was started by this test.
        for pid in _pids_of(user.uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _pids_of(user.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


@pytest.fixture(name="public_tmp")
def public_tmp_fixture():
    """A 0755 directory under /tmp (request it before any mount fixture, so it
    is removed after they are undone)."""
    path = Path(tempfile.mkdtemp(prefix="lazyfs-trust-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        inside = [p for p in mounted_paths() if p.startswith(os.fsencode(path) + b"/")]
        if not inside:
            shutil.rmtree(path, ignore_errors=True)
    assert not inside, f"still mounted under {path}: {inside}"
