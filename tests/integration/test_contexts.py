"""Deep contexts, end to end: contexts resolved by the real rez, baked,
populated, seeded and exported with the real `rez-lazyfs` CLI, mounted for
real, and sourced with stock `rez-env --input`.

Every test resolves its own context against its own store (tmp_path), and
"the store is unreachable" is always the real thing: the store directory is
renamed, so anything still reading it fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.mounts import PROBLEM_LEVEL, LazyMount
from helpers.rezrepo import Rez, build_store
from helpers.trees import KiB, deterministic_bytes
from helpers.walk import sha256_file

STORE_TIMEOUT = 2  # seconds; --store-timeout of mounts whose store is gone
# Mounts use the default block size, the one bake/populate/seed/export use
# when given none: blocks are keyed by block size, so a mount with another
# one would not see what they put in the cache.
DEFAULT_BLOCK_SIZE = {"block_size": None}
ALIAS = "main"
ERROR_PREFIX = "rez-lazyfs: error: "

# The repository the contexts resolve from. Every shape that matters to a
# deep context: a package whose commands put {root}/bin on PATH and
# {root}/python on PYTHONPATH (with a script and a module there, and a file
# spanning several cache blocks), a package with two variants, a requires
# chain app -> midlib -> baselib, and things the context does not use (an
# older tools, the other plugin variant) so "exactly the context" means
# something. baselib is released (it has a timestamp); the others are not,
# which makes rez also look for .metadata and release.yaml when sourcing.
STORE = {
    "tools/1.0/package.py": """
        name = "tools"
        version = "1.0"
        def commands():
            env.PATH.prepend("{root}/bin")
            env.PYTHONPATH.prepend("{root}/python")
    """,
    "tools/1.0/bin/lazyhello": """
        #!/bin/sh
        echo "lazyhello ran from $0"
    """,
    "tools/1.0/python/lazymod.py": """
        GREETING = "hello from lazymod"
    """,
    "tools/1.0/share/blocks.bin": deterministic_bytes(3 * 64 * KiB + 123, seed=3),
    "tools/0.9/package.py": """
        name = "tools"
        version = "0.9"
        def commands():
            env.PATH.prepend("{root}/bin")
    """,
    "tools/0.9/bin/lazyhello": """
        #!/bin/sh
        echo "old lazyhello"
    """,
    "pyver/1.0/package.py": """
        name = "pyver"
        version = "1.0"
    """,
    "pyver/2.0/package.py": """
        name = "pyver"
        version = "2.0"
    """,
    "plugin/1.0/package.py": """
        name = "plugin"
        version = "1.0"
        variants = [["pyver-1"], ["pyver-2"]]
        def commands():
            env.PYTHONPATH.append("{root}/python")
    """,
    "plugin/1.0/pyver-1/python/plugin_variant.py": "PYVER = 1\n",
    "plugin/1.0/pyver-2/python/plugin_variant.py": "PYVER = 2\n",
    "app/1.0/package.py": """
        name = "app"
        version = "1.0"
        requires = ["midlib"]
    """,
    "midlib/2.0/package.py": """
        name = "midlib"
        version = "2.0"
        requires = ["baselib"]
    """,
    "baselib/3.0/package.py": """
        name = "baselib"
        version = "3.0"
        timestamp = 1700000000
    """,
    "baselib/3.0/lib/libbase.txt": "the bottom of the requires chain\n",
}
REQUEST = ["tools", "plugin", "pyver-2", "app"]

# What the resolved context holds: package -> variant root, relative to the
# repository. plugin is the variant package (its second variant).
ROOTS = {
    "tools": "tools/1.0",
    "plugin": "plugin/1.0/pyver-2",
    "pyver": "pyver/2.0",
    "app": "app/1.0",
    "midlib": "midlib/2.0",
    "baselib": "baselib/3.0",
}
LAZYHELLO = "tools/1.0/bin/lazyhello"
NOT_IN_CONTEXT = ["tools/0.9/bin/lazyhello", "plugin/1.0/pyver-1/python/plugin_variant.py"]

# Run inside the sourced context: runs the tool and imports the modules the
# way a user's process would find them (PATH, PYTHONPATH), and reports where
# they came from and every REZ_<PKG>_ROOT.
PROBE = """
import json, os, subprocess, sys
import lazymod, plugin_variant
print(json.dumps({
    "lazyhello": subprocess.run(["lazyhello"], capture_output=True, text=True, check=True).stdout,
    "modules": {m.__name__: m.__file__ for m in (lazymod, plugin_variant)},
    "roots": {name: os.environ.get(f"REZ_{name.upper()}_ROOT") for name in sys.argv[1:]},
}))
"""


def alias_root(mountpoint: Path) -> str:
    """Where bake points the handles: realpath(MP)/ALIAS (rez only accepts
    canonical locations)."""
    return os.path.join(os.path.realpath(mountpoint), ALIAS)


def roots_under(mountpoint: Path) -> dict[str, str]:
    """package -> the REZ_<PKG>_ROOT a context baked for *mountpoint* sets."""
    return {name: f"{alias_root(mountpoint)}/{root}" for name, root in ROOTS.items()}


# -- running rez-lazyfs ------------------------------------------------------


def lazyfs_cli(rez: Rez, *args) -> subprocess.CompletedProcess:
    return rez.lazyfs(*args)


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"`{' '.join(result.args)}` exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


def run_ok(rez: Rez, *args) -> subprocess.CompletedProcess:
    result = lazyfs_cli(rez, *args)
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    return result


def run_fails(rez: Rez, *args) -> str:
    """Runs a command that must fail the documented way; returns its error line."""
    result = lazyfs_cli(rez, *args)
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), describe(result)
    return lines[0]


# -- the store and its resolved context --------------------------------------


@dataclass
class Shot:
    """A store, and a context resolved from it by rez-env (as a user's shot
    context would be)."""

    rez: Rez
    workdir: Path
    store: Path
    context: Path  # written by `rez-env --output`: handles point at the store
    digests: dict[str, str]  # relpath -> sha256 of every file the context uses
    definition_mtimes: dict[str, int]  # relpath of each package.py -> st_mtime_ns

    def bake_args(self, mountpoint: Path, cache: Path, out: Path, context: Path | None = None) -> list:
        return ["bake", context or self.context, "-o", out, "--mount", mountpoint,
                "--repo", f"{ALIAS}={self.store}", "--cache", cache]

    def bake(self, mountpoint: Path, cache: Path, *options: str) -> Path:
        out = self.workdir / f"baked-for-{mountpoint.name}.rxt"
        run_ok(self.rez, *self.bake_args(mountpoint, cache, out), *options)
        return out

    def populate(self, baked: Path, cache: Path) -> None:
        result = run_ok(self.rez, "populate", baked, "--cache", cache)
        # Progress is for a tty only: no bar redrawn into logs and pipes.
        assert "\r" not in result.stdout + result.stderr, describe(result)

    def move_store_away(self, *mounts: LazyMount) -> None:
        """Makes the store unreachable (for real: renamed). Log lines of
        *mounts* naming it are expected from now on."""
        self.store.rename(self.store.with_name("packages-moved-away"))
        for m in mounts:
            m.expect_log(str(self.store))


def files_the_context_uses(store: Path) -> list[str]:
    """Every file below each variant root, and each package definition."""
    files = set()
    for root in ROOTS.values():
        files.update(str(p.relative_to(store)) for p in (store / root).rglob("*") if p.is_file())
        files.add("/".join(root.split("/")[:2]) + "/package.py")
    return sorted(files)


@pytest.fixture
def shot(tmp_path) -> Shot:
    workdir = tmp_path / "shot"
    workdir.mkdir()
    rez = Rez(workdir)
    store = tmp_path / "svr" / "packages"
    build_store(store, STORE)
    context = rez.resolve(REQUEST, [store], workdir / "shot.rxt")
    original = context.read_bytes()
    files = files_the_context_uses(store)
    yield Shot(rez, workdir, store, context,
               digests={rel: sha256_file(store / rel) for rel in files},
               definition_mtimes={rel: (store / rel).stat().st_mtime_ns
                                  for rel in files if rel.endswith("/package.py")})
    # Nothing rez-lazyfs does may touch the context it was given.
    assert context.read_bytes() == original, f"{context} was modified"


def mountpoint_known_in_advance(lazyfs_mount, shot: Shot) -> LazyMount:
    """A mount of the store that is mounted once, with nothing read through
    it, and unmounted again: bake/export need the mountpoint before the mount
    that serves the baked context exists, and its cache stays as good as new
    (bake is the first thing to put anything from the store into it)."""
    m = lazyfs_mount({ALIAS: shot.store}, **DEFAULT_BLOCK_SIZE)
    m.unmount()
    return m


# -- what users see ----------------------------------------------------------


def assert_baked_for(baked: Path, mountpoint: Path) -> None:
    doc = json.loads(baked.read_text())
    locations = {h["variables"]["name"]: h["variables"]["location"] for h in doc["resolved_packages"]}
    assert locations == dict.fromkeys(ROOTS, alias_root(mountpoint))
    assert doc["package_paths"] == [alias_root(mountpoint)]
    # Or a client with rez's package cache would copy whole variants
    # through the mount.
    assert doc["package_caching"] is False
    assert "rez_lazyfs" in doc, "no embedded definitions/metadata"


def assert_context_runs_from_mount(rez: Rez, baked: Path, mountpoint: Path) -> None:
    repo = alias_root(mountpoint)
    result = rez.source(baked, [sys.executable, "-c", PROBE, *ROOTS])
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["lazyhello"] == f"lazyhello ran from {repo}/{LAZYHELLO}\n"
    assert seen["modules"] == {
        "lazymod": f"{repo}/tools/1.0/python/lazymod.py",
        "plugin_variant": f"{repo}/plugin/1.0/pyver-2/python/plugin_variant.py",
    }
    assert seen["roots"] == roots_under(mountpoint)


def assert_mount_serves_every_file_of_the_context(shot: Shot, mountpoint: Path) -> None:
    repo = Path(alias_root(mountpoint))
    served = {rel: sha256_file(repo / rel) for rel in shot.digests}
    assert served == shot.digests


def assert_definitions_keep_their_store_mtimes(shot: Shot, mountpoint: Path) -> None:
    # rez's memcached package-file cache validates entries with them.
    repo = Path(alias_root(mountpoint))
    served = {rel: (repo / rel).stat().st_mtime_ns for rel in shot.definition_mtimes}
    assert served == shot.definition_mtimes


def assert_sources_but_the_tool_fails_with_eio(shot: Shot, baked: Path, m: LazyMount) -> None:
    """Definitions are there (the context sources and every root is under
    the mount) but the tool's content never was: running it fails with EIO,
    and the user is told which file."""
    environ = shot.rez.source_environ(baked)
    assert {name: environ.get(f"REZ_{name.upper()}_ROOT") for name in ROOTS} == roots_under(m.path)
    m.expect_log(LAZYHELLO)
    result = shot.rez.source(baked, ["lazyhello"])
    assert result.returncode != 0, result.stdout
    # The shell names the file only if its PATH search found it: the
    # variant's directories must be known to the mount, only the content
    # missing. ("lazyhello: command not found" means bin/ was not.)
    assert f"{alias_root(m.path)}/{LAZYHELLO}: Input/output error" in result.stderr, result.stderr


# 1. ---------------------------------------------------------------------------


def test_baked_context_runs_tools_and_modules_from_the_mount(shot, lazyfs_mount):
    m = lazyfs_mount({ALIAS: shot.store}, **DEFAULT_BLOCK_SIZE)
    # Baked while mounted, through the mount's own cache, as users will.
    baked = shot.bake(m.path, m.cache)

    assert_baked_for(baked, m.path)
    assert_context_runs_from_mount(shot.rez, baked, m.path)


# 2. ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["populate", "bake --populate"])
def test_populated_context_runs_with_the_store_moved_away(shot, lazyfs_mount, how):
    m = lazyfs_mount({ALIAS: shot.store}, **DEFAULT_BLOCK_SIZE)
    if how == "populate":
        baked = shot.bake(m.path, m.cache)
        shot.populate(baked, m.cache)  # while mounted: the cache is shared
    else:
        baked = shot.bake(m.path, m.cache, "--populate")

    shot.move_store_away(m)
    m.remount(store_timeout=STORE_TIMEOUT)

    assert_context_runs_from_mount(shot.rez, baked, m.path)
    assert_mount_serves_every_file_of_the_context(shot, m.path)


def test_populate_again_once_complete_needs_no_store(shot, tmp_path):
    # Resumable: what is already cached is never fetched again, so a run
    # after a complete one has nothing to do, store or no store.
    cache = tmp_path / "cache"
    baked = shot.bake(tmp_path / "mnt", cache)
    shot.populate(baked, cache)
    shot.move_store_away()
    shot.populate(baked, cache)


def test_populate_refuses_clearly_when_the_cache_limit_is_too_small(shot, tmp_path):
    cache = tmp_path / "cache"
    baked = shot.bake(tmp_path / "mnt", cache)
    config = tmp_path / "small.toml"
    config.write_text('cache_limit = "1K"\n')
    before = sorted(p.stat().st_size for p in (cache / "blocks").rglob("*") if p.is_file())
    error = run_fails(shot.rez, "populate", baked, "--cache", cache, "--config", config)
    assert "limit" in error and "1.0 KiB" in error, error
    # Nothing was fetched on the way to the refusal.
    assert sorted(p.stat().st_size for p in (cache / "blocks").rglob("*") if p.is_file()) == before


def test_unpopulated_context_sources_without_the_store_but_its_tool_fails(shot, lazyfs_mount):
    m = mountpoint_known_in_advance(lazyfs_mount, shot)
    baked = shot.bake(m.path, m.cache)
    shot.move_store_away(m)
    log_mark = m.log_mark()
    m.remount(store_timeout=STORE_TIMEOUT)

    assert_definitions_keep_their_store_mtimes(shot, m.path)
    assert_sources_but_the_tool_fails_with_eio(shot, baked, m)

    m.unmount()  # waits for the daemon to exit, so its log is complete
    naming = [line for line in m.log_lines(since=log_mark)
              if LAZYHELLO.encode() in line and os.fsencode(shot.store) in line]
    assert any(PROBLEM_LEVEL.search(line) or b"EIO" in line for line in naming), (
        f"no WARNING/ERROR/EIO log line names {LAZYHELLO} in the store {shot.store}:\n"
        + b"\n".join(m.log_lines(since=log_mark)).decode(errors="replace"))


# 3. ---------------------------------------------------------------------------


def test_exported_context_runs_offline_from_its_own_cache(shot, lazyfs_mount, tmp_path):
    # The exported context points at m.path: it is run from there, mounted
    # afresh on the exported cache alone (no --repo: the cache records them).
    m = mountpoint_known_in_advance(lazyfs_mount, shot)
    export_dir = tmp_path / "export"
    run_ok(shot.rez, "export", shot.context, export_dir, "--mount", m.path, "--repo", f"{ALIAS}={shot.store}")
    baked = export_dir / "context.rxt"
    assert_baked_for(baked, m.path)

    shot.move_store_away(m)
    m.remount(repos={}, cache=export_dir / "cache", offline=True)

    assert_context_runs_from_mount(shot.rez, baked, m.path)
    assert_mount_serves_every_file_of_the_context(shot, m.path)
    # Exactly the context: what it does not use was not exported.
    for rel in NOT_IN_CONTEXT:
        m.expect_log(rel)
        with pytest.raises(OSError) as excinfo:
            Path(alias_root(m.path), rel).read_bytes()
        assert excinfo.value.errno in (errno.EIO, errno.ENOENT), f"{rel}: {excinfo.value!r}"


def test_seeded_cache_sources_offline_but_unfetched_payload_fails(shot, lazyfs_mount, tmp_path):
    m = mountpoint_known_in_advance(lazyfs_mount, shot)
    # Baked elsewhere: the seeded cache gets everything from the file alone.
    baked = shot.bake(m.path, tmp_path / "baking-cache")
    seeded_cache = tmp_path / "seeded-cache"
    run_ok(shot.rez, "seed", baked, "--cache", seeded_cache)

    shot.move_store_away(m)
    m.remount(cache=seeded_cache, offline=True)

    assert_definitions_keep_their_store_mtimes(shot, m.path)
    assert_sources_but_the_tool_fails_with_eio(shot, baked, m)


# 4. ---------------------------------------------------------------------------


def malformed_json(shot: Shot) -> Path:
    bad = shot.workdir / "malformed.rxt"
    bad.write_text(shot.context.read_text().replace(",", ",,", 1))
    return bad


def truncated(shot: Shot) -> Path:
    text = shot.context.read_text()
    cut = shot.workdir / "truncated.rxt"
    cut.write_text(text[: len(text) // 2])
    return cut


UNREADABLE_CONTEXTS = [malformed_json, truncated]

# command -> (its arguments for a context, a mountpoint, a cache and a place
# to write to; what it writes)
COMMANDS = {
    "bake": lambda shot, ctx, mnt, cache, out: (shot.bake_args(mnt, cache, out, ctx), out),
    "populate": lambda shot, ctx, mnt, cache, out: (["populate", ctx, "--cache", cache], cache),
    "seed": lambda shot, ctx, mnt, cache, out: (["seed", ctx, "--cache", cache], cache),
    "export": lambda shot, ctx, mnt, cache, out: (
        ["export", ctx, out, "--mount", mnt, "--repo", f"{ALIAS}={shot.store}"], out),
}


def assert_fails_cleanly(shot: Shot, args: list, *, reads: Path, writes: Path, names: str) -> None:
    """Exit 1, one "rez-lazyfs: error:" line naming *names*, no traceback,
    nothing written, and the input untouched."""
    before = reads.read_bytes()
    line = run_fails(shot.rez, *args)
    assert names in line, line
    assert not writes.exists(), f"{writes} was written by a failed command"
    assert reads.read_bytes() == before, f"{reads} was modified"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("make_context", UNREADABLE_CONTEXTS, ids=lambda f: f.__name__)
def test_unreadable_context_is_a_clean_error(shot, tmp_path, command, make_context):
    context = make_context(shot)
    args, writes = COMMANDS[command](shot, context, tmp_path / "mnt", tmp_path / "cache", tmp_path / "out")
    assert_fails_cleanly(shot, args, reads=context, writes=writes, names=context.name)


def package_missing_from_store(shot: Shot, tmp_path: Path) -> tuple[Path, str]:
    # Resolved while it was there, deleted before baking (with a fresh cache,
    # bake has to read the store for it).
    shutil.rmtree(shot.store / "baselib" / "3.0")
    return tmp_path / "baked.rxt", "baselib"


def output_in_a_missing_directory(shot: Shot, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "no-such-dir" / "baked.rxt"
    return out, str(out)


def output_under_a_regular_file(shot: Shot, tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "baked.rxt"
    return out, str(out)


@pytest.mark.parametrize("problem", [package_missing_from_store, output_in_a_missing_directory,
                                     output_under_a_regular_file], ids=lambda f: f.__name__)
def test_bake_problem_is_a_clean_error(shot, tmp_path, problem):
    out, named = problem(shot, tmp_path)
    (tmp_path / "mnt").mkdir()  # the mountpoint is not what is wrong here
    args = shot.bake_args(tmp_path / "mnt", tmp_path / "cache", out)
    assert_fails_cleanly(shot, args, reads=shot.context, writes=out, names=named)


# unmirrored repositories -----------------------------------------------------


def test_variant_from_an_unmirrored_repository_is_left_alone_with_a_warning(shot, tmp_path):
    dev_repo = tmp_path / "home" / "dev-packages"
    build_store(dev_repo, {"devtool/1.0/package.py": """
        name = "devtool"
        version = "1.0"
    """})
    context = shot.rez.resolve(["tools", "devtool"], [shot.store, dev_repo], tmp_path / "with-dev.rxt")
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"

    out = tmp_path / "baked.rxt"
    result = run_ok(shot.rez, *shot.bake_args(mountpoint, cache, out, context))
    assert [line for line in result.stderr.splitlines() if "devtool-1.0" in line], describe(result)
    doc = json.loads(out.read_text())
    locations = {h["variables"]["name"]: h["variables"]["location"] for h in doc["resolved_packages"]}
    assert locations == {"tools": alias_root(mountpoint), "devtool": os.path.realpath(dev_repo)}

    strict_out = tmp_path / "strict.rxt"
    assert_fails_cleanly(shot, [*shot.bake_args(mountpoint, cache, strict_out, context), "--strict"],
                         reads=context, writes=strict_out, names="devtool-1.0")
