"""rez-lazyfs in containers, with real kernel mount namespaces standing in
for a container engine (none runs on the test machines). A container here is
a private mount namespace whose own filesystem is a tmpfs at CONTAINER, in
which the store does not exist (covered by an empty tmpfs) unless a test says
it is reachable. The two ways of the README:

1. the host's mount, made with --allow-other, bind-mounted read-only into the
   container (`docker run -v /rez/lazy:/rez/lazy:ro,rslave`);
2. the host's cache bind-mounted read-only into the container, which mounts
   for itself, with a private writable cache layered over the host's.

And the standalone case: an exported context directory copied into a
container runs its context with no store at all.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from helpers.mounts import LAZYFS, MountOptions
from helpers.namespaces import MountNamespace, mount_namespace  # noqa: F401 (a fixture)
from helpers.rezrepo import REZ_BIN, Rez
from helpers.trees import KiB, deterministic_bytes, write_rez_package
from helpers.walk import walk

ALIAS = "main"
BLOCK = 64 * KiB  # the block size of every mount here (MountOptions' default)
CONTAINER = Path("/mnt")  # the container's own filesystem, inside its namespace only
NOBODY = 65534  # a container process that is not the mount's owner
HOST_READS = "tool"  # what the host has read (and so cached) before a container starts


def build_store(root: Path) -> Path:
    # Readable by anyone: a container user reads it through the mount.
    write_rez_package(root, "tool", "1.0.0", commands='env.PATH.prepend("{root}/bin")',
                      files={"bin/tool": "#!/bin/sh\necho tool ran\n",
                             "data/blocks.bin": deterministic_bytes(3 * BLOCK + 5, seed=7)},
                      executables=("bin/tool",))
    write_rez_package(root, "lib", "2.1", files={"include/lib.h": "int lib(void);\n",
                                                 "lib/liblib.so": deterministic_bytes(BLOCK + 1, seed=8)})
    return root


def digests(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every file below *root*, read by the test process."""
    return {os.fsdecode(e.relpath): e.sha256 for e in walk(root) if e.type == "file"}


def digests_in(container: MountNamespace, root: Path, *, user: int | None = None) -> dict[str, str]:
    """relpath -> sha256 of every file below *root*, read inside the container
    by its own tools (as *user*)."""
    listing = container.run(["sh", "-c", 'cd "$1" && find . -type f -exec sha256sum {} +', "-", root],
                            user=user).stdout
    return {path.removeprefix("./"): digest for digest, path in
            (line.split("  ", 1) for line in listing.splitlines())}


def blocks_of(store: Path, relpaths) -> int:
    return sum(-(-(store / rel).stat().st_size // BLOCK) for rel in relpaths)


def host_reads(host_mount) -> None:
    """The host reads HOST_READS, so its cache holds it."""
    walk(host_mount.repo_path(ALIAS) / HOST_READS)


def not_read_by_host(store: Path) -> list[str]:
    return [rel for rel in digests(store) if not rel.startswith(HOST_READS + "/")]


# 1. The host's mount, bind-mounted ------------------------------------------


def test_host_mount_bind_mounted_read_only_serves_the_container_and_fills_the_host_cache(
        tmp_path, lazyfs_mount, mount_namespace):
    store = build_store(tmp_path / "store")
    host = lazyfs_mount({ALIAS: store}, extra_args=("--allow-other",))
    store_reads = host.stats()["store_reads"]

    container = mount_namespace(keep_fuse=(host.path,))
    container.hide(CONTAINER)
    container.bind(host.path, CONTAINER / "rez/lazy", read_only=True)
    container.hide(store)
    inside = CONTAINER / "rez/lazy" / ALIAS

    # A container user that does not own the mount: allow_other lets it in.
    assert digests_in(container, inside, user=NOBODY) == digests(store)
    assert host.stats()["store_reads"] == store_reads + blocks_of(store, digests(store))
    refused = container.run(["touch", inside / "tool/new-file"], check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr


def test_container_follows_a_host_remount_through_an_rslave_bind_of_the_parent(tmp_path, mount_namespace):
    # A daemon restart (a new login, systemd's Restart=) replaces the host's
    # mount. A bind of the mount itself would keep the old, dead one; a bind
    # of its parent directory with rslave propagation receives the new one:
    # `docker run -v /rez:/rez:ro,rslave`. That needs the host's /rez to be a
    # shared mount, as it is where systemd runs (/ is shared); this host's
    # is made so in a namespace of its own.
    store = build_store(tmp_path / "store")
    parent = tmp_path / "rez"
    parent.mkdir()
    host = mount_namespace()
    host.hide(parent)
    host.run(["mount", "--make-shared", parent])
    host_mount = host.mount_lazyfs(parent / "lazy", {ALIAS: store}, cache=tmp_path / "cache",
                                   extra_args=("--allow-other",))

    container = mount_namespace(parent=host, propagation="slave", keep_fuse=(host_mount.path,))
    container.hide(CONTAINER)
    container.run(["mkdir", CONTAINER / "rez"])
    container.run(["mount", "--rbind", parent, CONTAINER / "rez"])
    container.run(["mount", "--make-rslave", CONTAINER / "rez"])
    container.hide(store)
    inside = CONTAINER / "rez/lazy" / ALIAS
    assert digests_in(container, inside, user=NOBODY) == digests(store)

    host_mount.remount()
    assert digests_in(container, inside, user=NOBODY) == digests(store)


# 2. The host's cache, bind-mounted read-only --------------------------------


def container_with_host_cache(mount_namespace, host_cache: Path, store: Path, *,
                              store_reachable: bool) -> MountNamespace:
    container = mount_namespace()
    container.hide(CONTAINER)
    container.bind(host_cache, CONTAINER / "host-cache", read_only=True)
    if not store_reachable:
        container.hide(store)
    return container


def test_container_cannot_use_a_read_only_cache_as_its_own(tmp_path, lazyfs_mount, mount_namespace):
    # Why the tiered mode exists: a cache directory is written to (log, SQLite
    # WAL, usage and totals, fetched blocks), so a read-only one fails at once.
    store = build_store(tmp_path / "store")
    host = lazyfs_mount({ALIAS: store})
    host_reads(host)
    container = container_with_host_cache(mount_namespace, host.cache, store, store_reachable=False)

    container.run(["mkdir", CONTAINER / "mnt"])
    result = container.run([LAZYFS, "mount", CONTAINER / "mnt", "--offline", "--cache", CONTAINER / "host-cache"],
                           check=False, env={"XDG_CONFIG_HOME": str(tmp_path / "no-config")})
    assert result.returncode == 1
    assert result.stderr.startswith(f"rez-lazyfs: error: cache directory {CONTAINER / 'host-cache'} "
                                    "is not usable: Read-only file system"), result.stderr
    assert not container.is_mounted(CONTAINER / "mnt")


@pytest.mark.parametrize("host_daemon", ["running", "stopped"])
def test_container_mounts_offline_over_the_hosts_read_only_cache(tmp_path, lazyfs_mount, mount_namespace,
                                                                 host_daemon):
    store = build_store(tmp_path / "store")
    host = lazyfs_mount({ALIAS: store})
    host_reads(host)
    if host_daemon == "stopped":
        host.unmount()  # the host's index is then closed, its SQLite WAL gone
    container = container_with_host_cache(mount_namespace, host.cache, store, store_reachable=False)

    # No --repo: the repositories the host's cache recorded.
    m = container.mount_lazyfs(CONTAINER / "rez/lazy", {}, cache=CONTAINER / "cache", offline=True,
                               extra_args=("--shared-cache", str(CONTAINER / "host-cache")))

    assert digests_in(container, m.path / ALIAS / HOST_READS) == digests(store / HOST_READS)
    # Offline, what the host never read is not there.
    m.expect_log("lib")
    missing = container.run(["cat", m.path / ALIAS / "lib/2.1/include/lib.h"], check=False)
    assert missing.returncode != 0
    assert os.strerror(errno.EIO) in missing.stderr or os.strerror(errno.ENOENT) in missing.stderr
    assert m.stats()["store_reads"] == 0


def test_container_cache_layers_over_the_hosts_and_fetches_only_the_rest(tmp_path, lazyfs_mount,
                                                                          mount_namespace):
    store = build_store(tmp_path / "store")
    host = lazyfs_mount({ALIAS: store})
    host_reads(host)
    container = container_with_host_cache(mount_namespace, host.cache, store, store_reachable=True)

    m = container.mount_lazyfs(CONTAINER / "rez/lazy", {ALIAS: store}, cache=CONTAINER / "cache",
                               extra_args=("--shared-cache", str(CONTAINER / "host-cache")))

    assert digests_in(container, m.path / ALIAS) == digests(store)
    # The store was read for exactly what the host had not cached ...
    assert m.stats()["store_reads"] == blocks_of(store, not_read_by_host(store))
    # ... and that went into the container's private cache: with the store
    # gone, a new mount on the two layers serves everything.
    m.unmount()
    container.hide(store)
    m.remount(offline=True)
    assert digests_in(container, m.path / ALIAS) == digests(store)
    assert m.stats()["store_reads"] == 0


# 3. A standalone context ----------------------------------------------------


def test_exported_context_runs_in_a_fresh_container_without_the_store(tmp_path, mount_namespace):
    store = build_store(tmp_path / "store")
    (tmp_path / "rez").mkdir()
    rez = Rez(tmp_path / "rez")
    context = rez.resolve(["tool"], [store], tmp_path / "shot.rxt")
    # The baked context names this mountpoint; the container mounts there too.
    mountpoint = tmp_path / "rez-lazy"
    export = tmp_path / "export"
    exported = subprocess.run([LAZYFS, "export", context, export, "--mount", mountpoint,
                               "--repo", f"{ALIAS}={store}"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "no-config")})
    assert exported.returncode == 0, exported.stderr

    container = mount_namespace()
    container.hide(store)
    container.hide(CONTAINER)
    bundle = CONTAINER / "standalone"  # copied in, as into an image
    container.run(["cp", "-a", export, bundle])
    container.adopt_mount([LAZYFS, "mount", mountpoint, "--config", bundle / "rez-lazyfs.toml"],
                          mountpoint, MountOptions(repos={}, cache=bundle / "cache"))

    ran = container.run([REZ_BIN / "rez-env", "--input", bundle / "context.rxt", "--", "tool"],
                        env=rez.environ([tmp_path / "no-packages-here"]))
    assert ran.stdout == "tool ran\n"
    assert digests_in(container, mountpoint / ALIAS / "tool") == digests(store / "tool")
