"""`rez-lazyfs doctor` (issue 14, item 6): one test per condition that breaks
mounts in practice and can be produced here, each for real: a daemon
SIGKILLed, a fuse.conf of the test's own, a cache another user owns, a store
removed or frozen with SIGSTOP, a full cache disk, a mount point in use, and
a healthy setup and mount, parsed from --json. Each problem line must carry
its fix, and where the fix is a command, running it must clear the problem."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.faults import (
    daemon_pid,
    fault_store_fixture,
    lazyfs_cli_fixture,
    scratch_mounts_fixture,
    wait_gone,
)
from helpers.mounts import LAZYFS, is_mounted
from helpers.trees import write_file
from helpers.users import public_tmp_fixture, throwaway_user_fixture
from mount.mounts import PROBE_TIMEOUT
from mount.system.doctor import request_timeout_check

FIXTURES = (lazyfs_cli_fixture, fault_store_fixture, scratch_mounts_fixture,
            throwaway_user_fixture, public_tmp_fixture)

STORE_TIMEOUT = 2.0
# A doctor's own start and its checks that answer at once (a loaded 2-core VM).
SLACK = 4.0


def make_store(root: Path) -> Path:
    write_file(root / "fam/1.0/package.py", "name = 'fam'\nversion = '1.0'\n")
    write_file(root / "fam/1.0/lib/data.bin", b"x" * 5000)
    return root


def doctor(cli, *args, timeout: float = 60):
    """`rez-lazyfs doctor ARGS --json`: (result, {check name: check}, seconds)."""
    started = time.monotonic()
    result = cli.run("doctor", *args, "--json", timeout=timeout, track=False)
    took = time.monotonic() - started
    assert result.returncode in (0, 1), result.output
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["ok"] == (result.returncode == 0) == (data["problems"] == 0), data
    assert sum(c["level"] == "problem" for c in checks.values()) == data["problems"]
    for check in checks.values():
        assert check["level"] in ("ok", "warning", "problem"), check
        assert "\n" not in check["found"] and check["found"], check
        assert check["level"] == "ok" or check["fix"], f"no fix for {check}"
    return result, checks, took


def problems(checks: dict) -> dict:
    return {name: c for name, c in checks.items() if c["level"] == "problem"}


# -- healthy ------------------------------------------------------------------------------

def test_healthy_setup_exits_0_and_creates_nothing(tmp_path, lazyfs_cli):
    store = make_store(tmp_path / "store")
    cache, mp = tmp_path / "cache", tmp_path / "mp"
    mp.mkdir()
    result, checks, _ = doctor(lazyfs_cli, mp, "--repo", f"main={store}", "--cache", cache)
    assert result.returncode == 0, result.output
    for name in ("fuse device", "fusermount3", "allow_other", "fuse request timeout",
                 "read-ahead", "cache", "cache space", "store main", "mountpoint"):
        assert checks[name]["level"] == "ok", checks[name]
    assert "does not exist yet" in checks["cache"]["found"]
    assert not cache.exists(), "the doctor created the cache directory"
    # What it found is what mounting finds.
    mounted = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache)
    assert mounted.returncode == 0 and mounted.mounted, mounted.output
    try:
        result, checks, _ = doctor(lazyfs_cli, mp, "--repo", f"main={store}", "--cache", cache)
        assert result.returncode == 0, result.output
        assert checks["mountpoint"]["level"] == "ok"
        assert "running rez-lazyfs mount" in checks["mountpoint"]["found"]
        assert "trusted and writable" in checks["cache"]["found"]
    finally:
        assert lazyfs_cli.run("umount", mp).returncode == 0


def test_healthy_mount(tmp_path, lazyfs_mount, lazyfs_cli):
    m = lazyfs_mount({"main": make_store(tmp_path / "store")})
    result, checks, _ = doctor(lazyfs_cli, "--mount", m.path)
    assert result.returncode == 0, result.output
    assert checks["mount"]["level"] == "ok" and "answers" in checks["mount"]["found"]
    assert checks["daemon"]["level"] == "ok"
    assert f"pid {daemon_pid(m)} " in checks["daemon"]["found"]
    device = m.path.stat().st_dev
    knob = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    kib = int(Path(knob).read_text())
    assert checks["read-ahead"] == {"name": "read-ahead", "level": "ok", "found":
                                    f"{kib} KiB ({knob})", "fix": ""}
    assert checks["cache"]["level"] == "ok" and checks["cache"]["found"].startswith(f"{m.cache}:")
    assert checks["cache space"]["level"] == "ok"
    assert checks["fuse limits"]["level"] in ("ok", "warning")

    # The text form: one line per check, in the same order.
    text = lazyfs_cli.run("doctor", "--mount", m.path, track=False)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert [line.split(None, 1)[0] for line in lines] == [c["level"] for c in checks.values()]
    assert [line.split(None, 1)[1].split(":")[0] for line in lines] == list(checks)


def in_fusectl_namespace(cli, script: str, *args) -> subprocess.CompletedProcess:
    """`sh -c SCRIPT` in a mount namespace of its own with the FUSE control
    filesystem mounted (it vanishes with the namespace; the host's mount
    table stays as it was)."""
    prelude = ("mountpoint -q /sys/fs/fuse/connections || "
               "mount -t fusectl none /sys/fs/fuse/connections || exit 99\n")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           prelude + script, "sh", *map(str, args)], capture_output=True,
                          text=True, env=cli.env(), timeout=60)


def test_mount_limits_and_read_ahead(tmp_path, lazyfs_mount, lazyfs_cli):
    """max_background below the kernel's default and read-ahead off are
    warnings whose fixes (run as written) make them ok again."""
    m = lazyfs_mount({"main": make_store(tmp_path / "store")})
    minor = os.minor(m.path.stat().st_dev)
    connection = f"/sys/fs/fuse/connections/{minor}"
    bdi = f"/sys/class/bdi/0:{minor}/read_ahead_kb"

    def run_doctor(before: str = "") -> dict:
        run = in_fusectl_namespace(lazyfs_cli, before + '"$1" doctor --mount "$2" --json',
                                   LAZYFS, m.path)
        assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
        return {c["name"]: c for c in json.loads(run.stdout)["checks"]}

    checks = run_doctor(f"cat {connection}/max_background > {tmp_path}/max_background\n")
    max_background = int((tmp_path / "max_background").read_text())
    assert checks["fuse limits"]["level"] == "ok", checks["fuse limits"]
    assert checks["fuse limits"]["found"].startswith(f"max_background {max_background}, ")

    checks = run_doctor(f"echo 1 > {connection}/max_background\n")
    limits = checks["fuse limits"]
    assert limits["level"] == "warning" and "at most 1 reads" in limits["found"], limits
    assert limits["fix"] == f"echo 12 > {connection}/max_background (as root)"
    fix = limits["fix"].removesuffix(" (as root)")
    assert run_doctor(fix + "\n")["fuse limits"]["level"] == "ok"

    Path(bdi).write_text("0\n")
    result, checks, _ = doctor(lazyfs_cli, "--mount", m.path)
    assert result.returncode == 0, "a warning is not a problem"
    assert checks["read-ahead"]["level"] == "warning", checks["read-ahead"]
    assert checks["read-ahead"]["fix"] == f"echo 128 > {bdi} (as root)"
    subprocess.run(["sh", "-c", checks["read-ahead"]["fix"].removesuffix(" (as root)")], check=True)
    assert doctor(lazyfs_cli, "--mount", m.path)[1]["read-ahead"]["level"] == "ok"


# -- a dead mount -------------------------------------------------------------------------

def test_dead_mount(tmp_path, lazyfs_mount, lazyfs_cli):
    store = make_store(tmp_path / "store")
    m = lazyfs_mount({"main": store})
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, 15)
    try:
        result, checks, took = doctor(lazyfs_cli, m.path, "--repo", f"main={store}",
                                      "--cache", m.cache)
        assert result.returncode == 1 and list(problems(checks)) == ["mountpoint"], checks
        assert "dead mount left by a crash" in checks["mountpoint"]["found"]
        assert checks["mountpoint"]["fix"] == f"rez-lazyfs umount {m.path}"
        assert is_mounted(m.path), "the doctor changed something"

        result, checks, took = doctor(lazyfs_cli, "--mount", m.path)
        assert result.returncode == 1 and set(problems(checks)) == {"mount", "daemon"}, checks
        assert "Transport endpoint is not connected" in checks["mount"]["found"]
        assert checks["mount"]["fix"] == f"rez-lazyfs umount {m.path}"
        assert took <= PROBE_TIMEOUT + SLACK, took

        # The fix, as written.
        fixed = lazyfs_cli.run(*checks["mount"]["fix"].split()[1:], track=False)
        assert fixed.returncode == 0, fixed.output
        assert not is_mounted(m.path)
        m.mounted = False
        result, checks, _ = doctor(lazyfs_cli, m.path, "--repo", f"main={store}",
                                   "--cache", m.cache)
        assert result.returncode == 0, result.output
    finally:
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True,
                           timeout=60)
        m.mounted = False


def test_daemon_stopped(tmp_path, lazyfs_mount, lazyfs_cli):
    m = lazyfs_mount({"main": make_store(tmp_path / "store")})
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGSTOP)
    try:
        result, checks, took = doctor(lazyfs_cli, "--mount", m.path)
        assert result.returncode == 1 and set(problems(checks)) == {"mount", "daemon"}, checks
        assert checks["mount"]["found"] == f"{m.path} does not answer within " \
            f"{PROBE_TIMEOUT:g}s (daemon pid {pid} is stopped)"
        assert checks["daemon"]["fix"] == f"kill -CONT {pid}"
        assert checks["cache"]["level"] == "ok", "the daemon's cache, found from /proc"
        assert took <= PROBE_TIMEOUT + SLACK, took
        fixed = subprocess.run(checks["daemon"]["fix"].split(), capture_output=True, timeout=30)
        assert fixed.returncode == 0, fixed.stderr
        assert doctor(lazyfs_cli, "--mount", m.path)[0].returncode == 0
    finally:
        os.kill(pid, signal.SIGCONT)


# -- allow_other without user_allow_other --------------------------------------------------

def test_allow_other_without_user_allow_other(public_tmp, throwaway_user):
    """As a user (root needs no user_allow_other), with a fuse.conf of the test's own."""
    without = public_tmp / "fuse.conf"
    without.write_text("# mount_max = 1000\n#user_allow_other\n")
    with_it = public_tmp / "fuse-allowing.conf"
    with_it.write_text("user_allow_other\n")
    for f in (without, with_it):
        f.chmod(0o644)
    env = {"PATH": os.environ["PATH"], "XDG_CONFIG_HOME": str(public_tmp / "config"),
           "XDG_CACHE_HOME": str(public_tmp / "cache")}

    def allow_other(conf: Path) -> tuple[int, dict]:
        run = throwaway_user.run([LAZYFS, "doctor", "--allow-other", "--fuse-conf", conf,
                                  "--json"], env=env)
        assert run.returncode in (0, 1), run.stderr
        checks = {c["name"]: c for c in json.loads(run.stdout)["checks"]}
        return run.returncode, checks["allow_other"]

    code, check = allow_other(without)
    assert code == 1 and check["level"] == "problem", check
    assert f"user_allow_other is not in {without}" in check["found"]
    assert check["fix"] == f"echo user_allow_other | sudo tee -a {without}"
    assert allow_other(with_it)[1]["level"] == "ok"
    subprocess.run(["sh", "-c", check["fix"].replace("sudo ", "")], check=True,
                   capture_output=True)
    assert allow_other(without)[1]["level"] == "ok", "the fix, run as written, did not fix it"


# -- a cache owned by someone else ----------------------------------------------------------

def test_cache_owned_by_someone_else(public_tmp, throwaway_user, lazyfs_cli):
    cache = public_tmp / "their-cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, throwaway_user.uid, throwaway_user.gid)
    result, checks, _ = doctor(lazyfs_cli, "--cache", cache)
    assert result.returncode == 1 and list(problems(checks)) == ["cache"], checks
    assert f"not owned by uid {os.geteuid()}" in checks["cache"]["found"]
    assert checks["cache"]["fix"].startswith(f"mount as uid {throwaway_user.uid}, its owner")
    assert os.listdir(cache) == [], "the doctor wrote into another user's directory"
    # The mount refuses it with the same words.
    (public_tmp / "mnt").mkdir()
    refused = lazyfs_cli.run("mount", public_tmp / "mnt", "--repo",
                             f"main={make_store(public_tmp / 'store')}", "--cache", cache)
    assert checks["cache"]["found"] in refused.one_line_error()
    # As its owner (the fix), the same directory is fine.
    run = throwaway_user.run([LAZYFS, "doctor", "--cache", cache, "--json"],
                             env={"PATH": os.environ["PATH"],
                                  "XDG_CONFIG_HOME": str(public_tmp / "config")})
    owner_checks = {c["name"]: c for c in json.loads(run.stdout)["checks"]}
    assert owner_checks["cache"]["level"] == "ok", owner_checks["cache"]


# -- an unreachable store -------------------------------------------------------------------

def test_store_removed(tmp_path, lazyfs_cli):
    store = make_store(tmp_path / "store")
    shutil.rmtree(store)
    cache = tmp_path / "cache"
    result, checks, _ = doctor(lazyfs_cli, "--repo", f"main={store}", "--cache", cache)
    assert result.returncode == 1 and list(problems(checks)) == ["store main"], checks
    found = checks["store main"]["found"]
    assert found.startswith(f"store path {store} for repository 'main' is not a directory")
    assert "refuses a store its cache never saw" in found
    assert checks["store main"]["fix"] == "give the store's path: --repo main=PATH (or [repos] " \
                                          "in the config)"
    mp = tmp_path / "mp"
    mp.mkdir()
    refused = lazyfs_cli.run("mount", mp, "--repo", f"main={store}", "--cache", cache)
    assert f"store path {store} for repository 'main' is not a directory" in \
        refused.one_line_error()


def test_store_frozen_answers_within_the_timeout(tmp_path, fault_store, lazyfs_cli):
    fs = fault_store(make_store(tmp_path / "source"))
    fs.freeze()
    try:
        result, checks, took = doctor(lazyfs_cli, "--repo", f"main={fs.path}", "--cache",
                                      tmp_path / "cache", "--store-timeout", STORE_TIMEOUT)
    finally:
        fs.thaw()
    assert result.returncode == 1 and list(problems(checks)) == ["store main"], checks
    store = checks["store main"]
    assert store["found"].startswith(f"store path {fs.path} for repository 'main' does not "
                                     f"answer within {STORE_TIMEOUT:g}s"), store
    assert store["fix"].startswith(f"check the server of {fs.path} (fuse"), store
    assert took <= STORE_TIMEOUT + SLACK, f"the doctor took {took:.1f}s"


def test_offline(tmp_path, lazyfs_mount, lazyfs_cli):
    store = make_store(tmp_path / "store")
    fresh = doctor(lazyfs_cli, "--offline", "--repo", f"main={store}", "--cache",
                   tmp_path / "fresh")
    assert fresh[0].returncode == 1 and list(problems(fresh[1])) == ["store main"], fresh[1]
    assert "--offline: the cache holds nothing for repository 'main'" in \
        fresh[1]["store main"]["found"]
    m = lazyfs_mount({"main": store})
    assert os.listdir(m.repo_path("main")) == ["fam"]  # the cache knows the store from now on
    m.unmount()
    # No --repo: the repositories the cache recorded, as an offline mount takes them.
    result, checks, _ = doctor(lazyfs_cli, "--offline", "--cache", m.cache)
    assert result.returncode == 0, result.output
    assert checks["store main"] == {"name": "store main", "level": "ok", "fix": "",
                                    "found": f"{store}: --offline, served from the cache"}


# -- the cache disk full, the mount point in use --------------------------------------------

def test_cache_disk_full(tmp_path, scratch_mounts, lazyfs_cli):
    disk = scratch_mounts.tmpfs(tmp_path / "small", size="8m")
    result, checks, _ = doctor(lazyfs_cli, "--cache", disk / "cache")
    assert result.returncode == 1 and list(problems(checks)) == ["cache space"], checks
    assert checks["cache space"]["found"].startswith("8 MiB free of 8 MiB: ")
    assert checks["cache space"]["fix"].startswith(f"rez-lazyfs clean --cache {disk / 'cache'} ")


def test_cache_on_a_filesystem_that_can_stall(tmp_path, fault_store, lazyfs_cli):
    source = tmp_path / "disk"
    source.mkdir(mode=0o700)
    disk = fault_store(source, writable=True)
    result, checks, _ = doctor(lazyfs_cli, "--cache", disk.path / "cache")
    assert result.returncode == 0, "a warning is not a problem"
    assert checks["cache"]["level"] == "warning", checks["cache"]
    assert f"is on fuse.faultdisk ({disk.path}), a filesystem that can stall" in \
        checks["cache"]["found"]
    disk.freeze()
    try:
        result, checks, took = doctor(lazyfs_cli, "--cache", disk.path / "cache")
    finally:
        disk.thaw()
    assert result.returncode == 1 and list(problems(checks)) == ["cache"], checks
    assert checks["cache"]["found"] == f"cache directory {disk.path / 'cache'} does not answer " \
        f"within {PROBE_TIMEOUT:g}s (fuse.faultdisk at {disk.path}): mounting would hang on it"
    assert took <= PROBE_TIMEOUT + SLACK, took


def test_mountpoint_not_empty(tmp_path, lazyfs_cli):
    store = make_store(tmp_path / "store")
    mp = tmp_path / "mp"
    write_file(mp / "left-over.txt", "x")
    result, checks, _ = doctor(lazyfs_cli, mp, "--repo", f"main={store}", "--cache",
                               tmp_path / "cache")
    assert result.returncode == 1 and list(problems(checks)) == ["mountpoint"], checks
    assert checks["mountpoint"]["found"] == f"mountpoint {mp} is not empty"
    assert checks["mountpoint"]["fix"] == f"an empty directory this user can read (ls -A {mp})"


def test_config_that_does_not_load_is_a_problem(tmp_path, lazyfs_cli):
    config = tmp_path / "config.toml"
    config.write_text("cache = \n")
    result, checks, _ = doctor(lazyfs_cli, "--config", config)
    assert result.returncode == 1 and list(problems(checks)) == ["config"], checks
    assert "is not valid TOML" in checks["config"]["found"]
    assert checks["fuse device"]["level"] == "ok", "checks needing no settings were skipped"
    both = lazyfs_cli.run("doctor", tmp_path, "--mount", tmp_path, track=False)
    assert both.returncode == 1 and "not both" in both.one_line_error()


# -- the kernel's FUSE request timeout (a global setting: not changed here) ----------------

@pytest.mark.parametrize("default, maximum, level, timeout", [
    (0, 0, "ok", None), (10, 0, "problem", 10), (60, 0, "warning", 60),
    (0, 30, "warning", 30), (60, 10, "problem", 10), (10, 60, "problem", 10)])
def test_request_timeout(default, maximum, level, timeout):
    check = request_timeout_check(default, maximum, store_timeout=15.0)
    assert check.level == level, check
    if timeout:
        assert f"unanswered for {timeout}s" in check.found, check
        assert check.fix.startswith("sysctl -w fs.fuse.default_request_timeout=0"), check
