"""Fixtures shared by the rez-lazyfs test suite."""

from __future__ import annotations

import pytest

from helpers.mounts import LazyfsMounter, yield_then_check


@pytest.fixture
def lazyfs_mount(tmp_path):
    """Factory: ``m = lazyfs_mount({"main": store_dir}, store_timeout=2)``
    mounts through the real CLI (daemon mode) at a fresh mountpoint with a
    fresh cache and returns a helpers.mounts.LazyMount (.path, .repo_path(),
    .cache, .log_path, .stats(), .unmount(), .remount(**changes),
    .expect_log(substring)).

    Teardown always unmounts (fusermount3 -u, then -u -z), makes sure the
    daemon is gone, and fails the test if anything was left mounted or the
    daemon log has a Traceback or WARNING/ERROR lines nobody expected.
    """
    mounter = LazyfsMounter(tmp_path / "lazyfs")
    yield from yield_then_check(mounter, mounter.teardown)
