"""Mounting through mount(8) and /etc/fstab.

    mount -t fuse.rez-lazyfs rez-lazyfs /rez/lazy -o config=/etc/rez-lazyfs.toml,allow_other
    rez-lazyfs  /rez/lazy  fuse.rez-lazyfs  repo=main:/svr/packages,cache=/var/cache/rez-lazyfs,allow_other,_netdev  0 0
    rez-lazyfs  /svr/packages  fuse.rez-lazyfs  over,config=/etc/rez-lazyfs.toml,allow_other,_netdev  0 0

`over`: a transparent mount (mount/over.py) of the repository whose store is
the mount point itself.

For a `fuse.TYPE` filesystem mount(8) runs the mount.fuse3 helper, which runs
`/bin/sh -c 'TYPE SOURCE MOUNTPOINT -o OPTIONS'`. TYPE is the subtype the
daemon mounts with, so fstab, findmnt and /proc/mounts all say
`fuse.rez-lazyfs`, and the command run is the main CLI in that calling form;
`as_command` turns it into the hidden `fstab-mount` command. mount(8) clears
PATH first, so sh searches its default path: the `rez-lazyfs` command must be
installed in /usr/local/bin or /usr/bin (a symlink to a virtualenv's one will
do). SOURCE is a free label (any word but a subcommand's name); `rez-lazyfs`
is the convention.

The helper returns once the mount answers (daemon mode), as mount(8) expects.
"""
from __future__ import annotations

import os

import click

from .errors import UserError

COMMAND = "fstab-mount"

# Options that mount(8), mount.fuse3 and fstab conventions pass along and that
# need nothing from rez-lazyfs: the mount is read-only, nosuid, nodev and
# default_permissions whatever they say (mount.fuse3 adds `dev,suid` to every
# call unless told nodev/nosuid), and atime or sync modes mean nothing on a
# read-only mount.
GENERIC_OPTIONS = frozenset({
    "defaults", "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "default_permissions",
    "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "lazytime", "nolazytime", "sync", "async",
    "silent", "loud",
})
GENERIC_PREFIXES = ("x-", "comment=")

# rez-lazyfs options taking a value: option name -> (load_settings keyword, converter).
VALUE_OPTIONS = {
    "cache": ("cache_dir", str),
    "block_size": ("block_size", str),
    "metadata_ttl": ("metadata_ttl", float),
    "store_timeout": ("store_timeout", float),
    "store_threads": ("store_threads", int),
    "cache_limit": ("cache_limit", str),
    "log_file": ("log_file", str),
}
FLAG_OPTIONS = ("offline", "allow_other", "debug", "over")
SUMMARY = ("config=FILE, repo=ALIAS:PATH, mutable=ALIAS, "
           + ", ".join(f"{name}=..." for name in VALUE_OPTIONS) + ", " + ", ".join(FLAG_OPTIONS))


def as_command(args: list[str], commands) -> list[str]:
    """`SOURCE MOUNTPOINT -o OPTIONS` (or `MOUNTPOINT -o OPTIONS`, with an empty
    source) as `fstab-mount ...`; any other command line unchanged.

    mount.fuse3 always passes -o (it adds dev,suid or gets nodev,nosuid), so
    requiring it keeps a mistyped subcommand an ordinary click error.
    """
    if not args or args[0] in commands or args[0].startswith("-"):
        return args
    if len(args) == 4 and args[2] == "-o":
        return [COMMAND, *args]
    if len(args) == 3 and args[1] == "-o":
        return [COMMAND, "", *args]
    return args


def parse_mount_options(text: str) -> dict:
    """load_settings keywords from a comma-separated fstab option list."""
    settings: dict = {"repos": [], "mutable": []}
    for option in filter(None, text.split(",")):
        name, has_value, value = option.partition("=")
        key = name.replace("-", "_")
        if option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
            continue
        if option == "noexec":
            raise UserError("mount option noexec: rez-lazyfs mounts hold programs and are always "
                            "exec (with `user` in fstab, add `exec` after it)")
        if key in FLAG_OPTIONS and not has_value:
            settings[key] = True
        elif key == "config" and value:
            settings["config"] = value
        elif key == "repo" and value:
            alias, colon, path = value.partition(":")
            if not colon or not alias or not path:
                raise UserError(f"mount option {option!r}: use repo=ALIAS:PATH")
            settings["repos"].append(f"{alias}={path}")
        elif key == "mutable" and value:
            settings["mutable"].append(value)
        elif key in VALUE_OPTIONS and value:
            keyword, convert = VALUE_OPTIONS[key]
            try:
                settings[keyword] = convert(value)
            except ValueError:
                raise UserError(f"mount option {option!r}: not a valid {name}") from None
        else:
            raise UserError(f"unknown mount option {option!r} (rez-lazyfs takes {SUMMARY}, "
                            f"and the usual mount(8) options)")
    settings["repos"] = tuple(settings["repos"])
    settings["mutable"] = tuple(settings["mutable"])
    return settings


def settings_from_mount_options(mountpoint: str, text: str):
    from .config import load_settings

    options = parse_mount_options(text)
    if options.pop("over", False):  # the mount point is the store to mount over
        options["over"], mountpoint = mountpoint, None
    if "config" not in options:
        if "cache_dir" not in options:
            raise UserError("mount options need cache=DIR (or config=FILE): "
                            "a mount made by mount(8) has no home to put a cache in")
        # No config file at all: an fstab line is self-contained, and at boot
        # HOME is root's, whose config has nothing to do with this mount.
        options["config"] = os.devnull
    return load_settings(mountpoint, **options)


@click.command(COMMAND, hidden=True)
@click.argument("source")
@click.argument("mountpoint")  # not click.Path: see cli.mount
@click.option("-o", "options", default="", help="Comma-separated mount options.")
def fstab_mount(source, mountpoint, options):
    """mount(8)'s calling form: `rez-lazyfs SOURCE MOUNTPOINT -o OPTIONS`."""
    from .daemon import mount_fs

    mount_fs(settings_from_mount_options(mountpoint, options), foreground=False)
