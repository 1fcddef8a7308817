"""The benchmark's peers: other FUSE filesystems over the same trees, how each is run.

    rclone   `rclone mount --vfs-cache-mode full` (Debian's rclone), its sftp
             backend logging in to the NetStore's sshd through its delaying
             relay with the NetStore's client key: the link, server and SFTP
             requests sshfs has. Its VFS cache keeps what it read on local
             disk (sparse files, across mounts), as rez-lazyfs's block cache
             does; listings and attributes it keeps in memory only, so a
             remounted rclone lists the store again.
    bindfs   `bindfs -o ro` (Debian's) over the store directory itself: a C
             FUSE filesystem passing each call on to local disk, no network;
             the floor of a FUSE filesystem on this kernel.

Both get the kernel caching rez-lazyfs gives released payload (entries,
attributes and, for bindfs, negative entries kept IMMUTABLE_TIMEOUT; bindfs
also keeps the page cache across opens); rclone also the most generous of its
own caching flags (RCLONE_FLAGS). contenders.PeerMount runs them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from fusefs.operations import IMMUTABLE_TIMEOUT

# Debian package -> its program (netstore.install), by the contenders' prefix
APT_PACKAGES = {"rclone": "rclone", "bindfs": "bindfs"}
RCLONE_REMOTE = "store"  # the config's name for the NetStore's SFTP server
# rclone's durations end at hours: eleven years, longer than any bench
FOREVER = "100000h"
KERNEL_TIMEOUT = int(IMMUTABLE_TIMEOUT)  # seconds
RCLONE_FLAGS = [
    "--read-only",
    # every byte read kept on local disk, in sparse files, across mounts
    "--vfs-cache-mode", "full",
    "--vfs-cache-max-age", FOREVER, "--vfs-cache-max-size", "off",  # never evicted
    "--dir-cache-time", FOREVER,  # listings and attributes kept for the mount's life
    "--attr-timeout", f"{KERNEL_TIMEOUT}s",  # the kernel's entry and attribute timeout
    # In full mode the buffer is read-ahead, held in memory, of each read
    # position: every scattered read of the launch pulled 16 MiB (the default)
    # across the link, 13x the bytes read (quick sizes); with none, 3.4x, and
    # a sequential read keeps its pace (the sftp backend keeps 64 requests
    # in flight). --vfs-read-chunk-size is left at its 128 MiB: 1 MiB only
    # added requests.
    "--buffer-size", "0",
]


def apt_packages(contenders: list[str]) -> dict[str, str]:
    """What netstore.install must add for these contenders."""
    return {name: program for name, program in APT_PACKAGES.items()
            if any(c.startswith(name + "-") for c in contenders)}


def write_rclone_config(path: Path, net) -> Path:
    """An rclone config whose remote RCLONE_REMOTE is `net`'s SFTP server:
    127.0.0.1 at the relay's port, as root with the client key."""
    path.write_text("\n".join([
        f"[{RCLONE_REMOTE}]", "type = sftp", "host = 127.0.0.1", f"port = {net.relay_port}",
        "user = root", f"key_file = {net.client_key}",
        # SFTP requests only, as sshfs sends: no commands over SSH (rclone
        # would detect the shell and run md5sum for hashes)
        "shell_type = none", "disable_hashcheck = true",
        ""]))
    return path


def rclone_argv(config: Path, store: Path, mountpoint: Path, cache_dir: Path,
                extra: list[str]) -> list[str]:
    """`rclone mount` of the store's directory on the server at `mountpoint`,
    its VFS cache in `cache_dir`; `extra` last (a later flag wins)."""
    return ["rclone", "mount", f"{RCLONE_REMOTE}:{store}", str(mountpoint), "--config", str(config),
            "--cache-dir", str(cache_dir), *RCLONE_FLAGS, *extra]


def bindfs_argv(store: Path, mountpoint: Path) -> list[str]:
    """bindfs of the store directory at `mountpoint`, read-only, in the foreground."""
    timeouts = ",".join(f"{kind}_timeout={KERNEL_TIMEOUT}" for kind in ("entry", "attr", "negative"))
    # multithreaded: its one race (a new file seen briefly with the wrong
    # owner) needs writes; single-threaded, W4's eight launches would queue
    return ["bindfs", "-f", "-o", "ro", "--multithreaded", "-o", f"kernel_cache,{timeouts}",
            str(store), str(mountpoint)]


def versions() -> dict:
    """The peers' versions, for the report ("" where not installed)."""
    def first_line(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
        except OSError:
            return ""
        return (((r.stdout or "") + (r.stderr or "")).strip().splitlines() or [""])[0]
    return {"rclone": first_line(["rclone", "version"]), "bindfs": first_line(["bindfs", "--version"])}


def describe(extra_rclone: list[str]) -> dict:
    """How the peers are run, for the report."""
    return {**versions(), "rclone_flags": [*RCLONE_FLAGS, *extra_rclone],
            "rclone_sftp": "shell_type = none, disable_hashcheck = true (SFTP requests only)",
            "bindfs_argv": bindfs_argv(Path("STORE"), Path("MOUNTPOINT"))}
