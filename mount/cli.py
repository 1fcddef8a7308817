"""`rez-lazyfs`: thin click commands over the mount package's library functions.

Heavy imports (pyfuse3, trio, diskcache, rez) happen inside commands so that
`--help` stays fast.
"""
from __future__ import annotations

import sys

import click

from .errors import UserError


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"rez-lazyfs: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rez-lazyfs")
def main():
    """Lazily localised Rez package repositories, mounted read-only."""


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--repo", "repos", multiple=True, metavar="ALIAS=PATH",
              help="Mirror the store directory PATH at MOUNTPOINT/ALIAS (repeatable).")
@click.option("--mutable", multiple=True, metavar="ALIAS",
              help="Revalidate everything in this repository by size/mtime (local dev packages).")
@click.option("--cache", "cache_dir", type=click.Path(), help="Cache directory [config, else ~/.cache/rez-lazyfs].")
@click.option("--config", type=click.Path(), help="TOML config file [~/.config/rez-lazyfs/config.toml].")
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted or signalled.")
@click.option("--block-size", help="Cache block size, e.g. 128K or 1M.")
@click.option("--metadata-ttl", type=float, help="Seconds before repository listings are revalidated.")
@click.option("--store-timeout", type=float, help="Seconds before an unanswered store request fails with EIO.")
@click.option("--log-file", type=click.Path(), help="Daemon log [CACHE/logs/daemon.log].")
@click.option("--offline", is_flag=True, default=None, help="Never contact the store: serve the cache alone.")
@click.option("--allow-other", is_flag=True, default=None, help="Let other users (and containers) use the mount.")
@click.option("--debug", is_flag=True, default=None, help="Log every store request.")
def mount(mountpoint, foreground, **options):
    """Mount the configured repositories read-only at MOUNTPOINT."""
    from .config import load_settings
    from .daemon import mount_fs

    mount_fs(load_settings(mountpoint, **options), foreground=foreground)


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if files are open.")
def umount(mountpoint, lazy):
    """Unmount a rez-lazyfs mount."""
    from .daemon import unmount

    unmount(mountpoint, lazy=lazy)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Where to build and mount [a temp dir].")
@click.option("--keep", is_flag=True, help="Keep the work directory afterwards.")
def demo(workdir, keep):
    """Build a sample repository, mount it, launch from it cold and warm, print figures."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(workdir) if workdir else None, keep)


if __name__ == "__main__":
    main()
