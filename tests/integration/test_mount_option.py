"""`--mount MP` (issue 14, item 1): commands on a cache take the cache, the
repositories and the block size from the mount running at MP, instead of
the user repeating `--repo` and `--cache` as the mount was started; options
that contradict the mount are refused; `status` right after a read through
the mount attributes the file to its package; a stopped daemon is a clear
error within the probe timeout.

Contexts are resolved by the real rez and baked with the real CLI, with no
configuration file: everything a command knows comes from the mount.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from helpers.faults import daemon_pid, lazyfs_mount_at_fixture  # noqa: F401 (a fixture)
from helpers.mounts import LAZYFS
from helpers.rezrepo import Rez, build_store
from helpers.users import public_tmp_fixture, throwaway_user_fixture  # noqa: F401 (fixtures)
from helpers.workload import read_whole, row_of

from .test_contexts import (  # noqa: F401 (shot is a fixture)
    ALIAS,
    Shot,
    assert_baked_for,
    assert_context_runs_from_mount,
    describe,
    run_fails,
    run_ok,
    shot,
)

PROBE_TIMEOUT = 5.0  # mount/mounts.py: how long a command waits for a mount
# The command's own start-up (Python, click) on a loaded 2-core machine.
STARTUP = 6.0


def status_json(rez: Rez, *args) -> dict:
    return json.loads(run_ok(rez, "status", "--json", *args).stdout)


def assert_no_cache_but_the_mounts(rez: Rez, m) -> None:
    # No config and no --cache: a command not taking the mount's cache would
    # have made the default one.
    default = rez.workdir / "xdg" / "cache" / "rez-lazyfs"
    assert not default.exists(), f"{default} was created: the mount's cache is {m.cache}"


def test_bake_populate_and_status_take_everything_from_the_mount(shot: Shot, lazyfs_mount):
    m = lazyfs_mount({ALIAS: shot.store})
    baked = shot.workdir / "shot.lazy.rxt"

    run_ok(shot.rez, "bake", shot.context, "-o", baked, "--mount", m.path)
    assert_baked_for(baked, m.path)
    populated = run_ok(shot.rez, "populate", baked, "--mount", m.path).stdout
    assert "fetched" in populated, populated
    assert_context_runs_from_mount(shot.rez, baked, m.path)

    status = status_json(shot.rez, "--mount", m.path)
    assert status["cache_dir"] == str(m.cache)
    tools = row_of(status, "tools", "1.0")
    assert tools["pinned"], tools  # bake pinned it in the mount's cache
    assert (tools["files_cached"], tools["bytes_cached"]) == \
        (tools["files_total"], tools["bytes_total"]), tools  # populate fetched all of it
    assert tools["local_path"] == f"{m.path}/{ALIAS}/tools/1.0"

    stats = json.loads(run_ok(shot.rez, "stats", "--json", "--mount", m.path).stdout)
    assert [s["running"] for s in stats["sources"] if s["name"] == f"mount:{m.path}"] == [True]
    log = run_ok(shot.rez, "logs", "--mount", m.path).stdout
    assert f"mounted {m.path}" in log, log
    assert_no_cache_but_the_mounts(shot.rez, m)


def test_options_contradicting_the_running_mount_are_refused_naming_both(shot: Shot, lazyfs_mount,
                                                                        tmp_path):
    m = lazyfs_mount({ALIAS: shot.store}, block_size=None)
    other_cache, elsewhere = tmp_path / "other-cache", tmp_path / "elsewhere"
    out = tmp_path / "never-written.rxt"
    bake = ["bake", shot.context, "-o", out, "--mount", m.path]
    refusals = {
        (*bake, "--cache", other_cache):
            f"--cache {other_cache} contradicts the mount at {m.path}, which uses {m.cache}",
        (*bake, "--repo", f"{ALIAS}={elsewhere}"):
            f"--repo {ALIAS}={elsewhere} contradicts the mount at {m.path}, "
            f"which serves {ALIAS}={shot.store}",
        (*bake, "--repo", f"dev={elsewhere}"):
            f"--repo dev={elsewhere} contradicts the mount at {m.path}, which serves no "
            f"repository 'dev' (it serves {ALIAS}={shot.store})",
        ("populate", shot.context, "--mount", m.path, "--block-size", "64K"):
            f"--block-size 64K contradicts the mount at {m.path}, which uses 128K blocks",
        ("status", "--mount", m.path, "--cache", other_cache):
            f"--cache {other_cache} contradicts the mount at {m.path}, which uses {m.cache}",
    }
    for args, expected in refusals.items():
        assert run_fails(shot.rez, *args) == f"rez-lazyfs: error: {expected}"
    assert not out.exists() and not other_cache.exists()

    # Agreeing options are fine; so is the mount's cache given another way.
    run_ok(shot.rez, *bake, "--cache", m.cache, "--repo", f"{ALIAS}={shot.store}")
    assert_baked_for(out, m.path)


def test_without_a_mount_running_there(shot: Shot, tmp_path):
    free = tmp_path / "not-mounted"
    free.mkdir()
    for command in (["populate", shot.context], ["status"], ["clean", "--max-size", "0"]):
        assert run_fails(shot.rez, *command, "--mount", free) == \
            f"rez-lazyfs: error: nothing rez-lazyfs is mounted at {free}"
    # bake keeps its meaning of --mount (where the context will be mounted):
    # the repositories come from the config or --repo, as before.
    out = tmp_path / "baked.rxt"
    assert "no repositories given" in run_fails(shot.rez, "bake", shot.context, "-o", out,
                                                "--mount", free)
    cache = tmp_path / "cache"
    run_ok(shot.rez, "bake", shot.context, "-o", out, "--mount", free,
           "--repo", f"{ALIAS}={shot.store}", "--cache", cache)
    assert_baked_for(out, free)


# Files in three packages, each read and at once asked about.
FRESH_STORE = {f"pkg{i}/1.0/package.py": f'name = "pkg{i}"\nversion = "1.0"\n' for i in range(3)}
FRESH_STORE |= {f"pkg{i}/1.0/data/payload.bin": bytes([i]) * 5000 for i in range(3)}


def test_status_right_after_a_read_attributes_the_file_to_its_package(tmp_path, lazyfs_mount):
    """Uses are written in batches every 2 s; status asks the mount to write
    them first. Three reads, each followed at once by status (with --mount,
    then on the cache alone, then with --mount): by chance alone each would
    catch a batch written in time about once in four."""
    store = tmp_path / "store"
    build_store(store, FRESH_STORE)
    m = lazyfs_mount({ALIAS: store})
    rez = Rez(tmp_path)
    for i, args in enumerate((["--mount", m.path], ["--cache", m.cache], ["--mount", m.path])):
        read_whole(m.repo_path(ALIAS) / f"pkg{i}/1.0/data/payload.bin")
        status = status_json(rez, *args)
        assert [v for v in status["variants"] if v["package"] == "(unattributed)"] == [], status
        assert row_of(status, f"pkg{i}", "1.0")["bytes_cached"] == 5000, status


def test_a_stopped_daemon_is_a_clear_error_within_the_probe_timeout(shot: Shot, lazyfs_mount):
    m = lazyfs_mount({ALIAS: shot.store}, block_size=None)
    pid = daemon_pid(m)
    silent = f"{m.path} does not answer within {PROBE_TIMEOUT:g}s (daemon pid {pid} is stopped)"
    os.kill(pid, signal.SIGSTOP)
    try:
        for args in (["bake", shot.context, "-o", shot.workdir / "out.rxt", "--mount", m.path],
                     ["status", "--mount", m.path]):
            started = time.monotonic()
            assert run_fails(shot.rez, *args) == f"rez-lazyfs: error: {silent}"
            assert time.monotonic() - started < PROBE_TIMEOUT + STARTUP
        # On the cache alone, status still answers, and says why what the
        # mount read last may be unattributed.
        started = time.monotonic()
        result = shot.rez.lazyfs("status", "--cache", m.cache)
        assert result.returncode == 0, describe(result)
        assert result.stderr.splitlines() == [
            f"rez-lazyfs: warning: {silent}; what it read in the last few seconds may show "
            "as (unattributed)"], describe(result)
        assert time.monotonic() - started < PROBE_TIMEOUT + STARTUP
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not (shot.workdir / "out.rxt").exists()
    run_ok(shot.rez, "status", "--mount", m.path)  # thawed, it answers again


@pytest.mark.parametrize("command", ["seed", "clean", "forget", "trace-record"])
def test_the_other_commands_take_the_mount_too(command, shot: Shot, lazyfs_mount, tmp_path):
    """Each refuses a contradicting --cache naming both, so each asked the mount."""
    m = lazyfs_mount({ALIAS: shot.store}, block_size=None)
    other = tmp_path / "other-cache"
    args, tail = {"seed": (["seed", shot.context], []),
                  "clean": (["clean", "--max-size", "0"], []),
                  "forget": (["forget", "tools-1.0"], []),
                  "trace-record": (["trace", "record", shot.context, "-o", tmp_path / "t"],
                                   ["--", "true"])}[command]
    assert run_fails(shot.rez, *args, "--mount", m.path, "--cache", other, *tail) == (
        f"rez-lazyfs: error: --cache {other} contradicts the mount at {m.path}, "
        f"which uses {m.cache}")


def test_another_users_mount_tells_them_nothing_and_bake_works_as_before(
        public_tmp, throwaway_user, lazyfs_mount_at):
    """A mount's settings are its owner's (as its other xattrs): another user's
    status --mount is refused; their bake for that mount point takes --repo
    and their own --cache, as without a mount (its cache is not theirs)."""
    store = public_tmp / "store"
    build_store(store, FRESH_STORE)
    (public_tmp / "rez").mkdir()
    rez = Rez(public_tmp / "rez")
    context = rez.resolve(["pkg0"], [store], public_tmp / "rez" / "pkg0.rxt")
    m = lazyfs_mount_at.at(public_tmp / "mnt", {ALIAS: store}, cache=public_tmp / "cache")
    home = public_tmp / "home"
    home.mkdir()
    os.chown(home, throwaway_user.uid, throwaway_user.gid)
    env = {**rez.environ([public_tmp / "no-packages-here"]), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache")}

    refused = throwaway_user.run([LAZYFS, "status", "--mount", m.path], env=env)
    assert (refused.returncode, refused.stderr.decode()) == (
        1, f"rez-lazyfs: error: the mount at {m.path} is not yours: only its owner or root "
           "can use its settings\n")
    baked = home / "pkg0.lazy.rxt"
    result = throwaway_user.run([LAZYFS, "bake", context, "-o", baked, "--mount", m.path,
                                 "--repo", f"{ALIAS}={store}", "--cache", home / "mine"], env=env)
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(baked.read_text())
    assert [h["variables"]["location"] for h in doc["resolved_packages"]] == [f"{m.path}/{ALIAS}"]
    assert (home / "mine" / "index").is_dir()
