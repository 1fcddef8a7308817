"""`rez-lazyfs service install|uninstall`: a systemd unit that mounts at login
(a user unit, the default) or at boot (`--system`, with allow_other, for
shared workstations and render nodes).

The unit runs `rez-lazyfs mount MOUNTPOINT --foreground --config FILE`, which
logs to stderr (the journal), tells systemd once the mount answers
(Type=notify, mount/sdnotify.py) and unmounts on SIGTERM, systemd's way of
stopping a service. `--over STORE` writes the unit of a transparent mount
(`rez-lazyfs mount --over STORE ...`: one unit per store path), whose
process supervises its daemon (mount/supervisor.py). Everything in a unit
is an absolute path written at install time, so what the unit runs is
exactly what `service install` checked.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import sys

import click

from .errors import UserError

UNIT_PREFIX = "rez-lazyfs-"
SYSTEM_UNIT_DIR = "/etc/systemd/system"
SYSTEM_CONFIG = "/etc/rez-lazyfs.toml"
# systemd restarts a daemon whose event loop has not answered for this long
# (the loop never blocks: CONCURRENCY.md; a busy one still turns every few ms).
WATCHDOG_SECONDS = 60
# Characters systemd keeps in an escaped unit name (systemd-escape --path).
_UNIT_NAME_SAFE = re.compile(rb"[A-Za-z0-9:_.]")
# Words that need no quoting on a systemd command line.
_EXEC_WORD_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def user_unit_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "systemd", "user")


def unit_name(mountpoint: str) -> str:
    """rez-lazyfs-<mountpoint escaped as `systemd-escape --path` does>.service."""
    path = b"/".join(part for part in os.fsencode(mountpoint).split(b"/") if part)
    escaped = "".join(
        "-" if byte == ord("/") else
        chr(byte) if _UNIT_NAME_SAFE.fullmatch(bytes([byte])) and not (i == 0 and byte == ord(".")) else
        f"\\x{byte:02x}"
        for i, byte in enumerate(path))
    return f"{UNIT_PREFIX}{escaped or '-'}.service"


def exec_word(arg: str) -> str:
    """One argument of ExecStart=/ExecStop=, quoted the way systemd parses it."""
    if any(ord(c) < 32 for c in arg):
        raise UserError(f"{arg!r} has control characters: it cannot go in a systemd unit")
    # % starts a systemd specifier and $ a variable; doubled, they are literal.
    text = arg.replace("%", "%%").replace("$", "$$")
    if _EXEC_WORD_SAFE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: list[str]) -> str:
    return " ".join(exec_word(a) for a in argv)


def lazyfs_executable() -> str:
    """The installed `rez-lazyfs` command, by absolute path: the one beside this
    Python (a virtualenv's bin), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "rez-lazyfs")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("rez-lazyfs")
    if found is None:
        raise UserError("cannot find the rez-lazyfs command to run from the unit")
    return os.path.abspath(found)


def render_unit(executable: str, mountpoint: str, config: str, system: bool,
                over: bool = False) -> str:
    start = [executable, "mount", *(["--over"] if over else []), mountpoint, "--foreground",
             "--config", config]
    if system:
        start.append("--allow-other")  # every user's shells and DCCs use one machine mount
    # The store is usually NFS: start after the network and remote mounts, but
    # do not require them, since a cache can serve while the store is away.
    network = ("Wants=network-online.target\n"
               "After=network-online.target remote-fs.target\n") if system else ""
    # The daemon's event loop feeds it (mount/sdnotify.py); a transparent
    # mount's supervisor watches its daemon itself.
    watchdog = "" if over else f"WatchdogSec={WATCHDOG_SECONDS}\n"
    return (
        f"# Written by `rez-lazyfs service install`; "
        f"remove with `rez-lazyfs service uninstall{' --system' if system else ''} "
        f"--mountpoint {shlex.quote(mountpoint)}`.\n"
        f"[Unit]\n"
        f"Description=Rez packages {'cached in place at' if over else 'mounted lazily at'} "
        f"{mountpoint.replace('%', '%%')} (rez-lazyfs)\n"
        f"{network}"
        f"\n[Service]\n"
        # Started once the mount answers (mount/sdnotify.py): units ordered
        # after this one never see an empty mount point.
        f"Type=notify\n"
        f"ExecStart={exec_line(start)}\n"
        # SIGTERM alone unmounts too; this just does it first, and `-` lets a
        # mount that is already gone count as stopped.
        f"ExecStop=-{exec_line([executable, 'umount', mountpoint])}\n"
        # A daemon that died left a dead mount; the restarted one clears it.
        # (A transparent mount's own supervisor restarts its daemon; the unit
        # restarts the supervisor, killed with it, soon: its path is dead meanwhile.)
        f"Restart=on-failure\n"
        f"{watchdog}"
        f"RestartSec={1 if over else 5}\n"
        f"\n[Install]\n"
        f"WantedBy={'multi-user.target' if system else 'default.target'}\n")


def _settings(mountpoint: str | None, config: str, need_repos: bool, over: str | None = None):
    from .config import load_settings

    settings = load_settings(mountpoint, config=config, need_repos=need_repos, over=over)
    if not settings.mountpoint:
        raise UserError(f"no mountpoint: give --mountpoint or set mountpoint in {config}")
    return settings


def _systemctl(system: bool, *args: str) -> str:
    """A systemctl command line to print, ready to paste into a shell."""
    return shlex.join(["systemctl", *([] if system else ["--user"]), *args])


def unit_options(f):
    f = click.option("--over", metavar="STORE",
                     help="The unit of a transparent mount of STORE at its own path "
                          "(`mount --over STORE`).")(f)
    f = click.option("--unit-dir", type=click.Path(file_okay=False),
                     help=f"Where the unit goes [{user_unit_dir()}, or {SYSTEM_UNIT_DIR} with --system].")(f)
    f = click.option("--config", type=click.Path(dir_okay=False),
                     help=f"Config file the unit mounts with [the user config, or {SYSTEM_CONFIG} "
                          f"with --system].")(f)
    f = click.option("--mountpoint", type=click.Path(file_okay=False),
                     help="Where to mount [the config's mountpoint].")(f)
    return click.option("--system", is_flag=True,
                        help="A system unit mounting at boot for every user (allow_other).")(f)


def _locations(system: bool, config: str | None, unit_dir: str | None) -> tuple[str, str]:
    from .config import default_config_path

    config = config or (SYSTEM_CONFIG if system else str(default_config_path()))
    unit_dir = unit_dir or (SYSTEM_UNIT_DIR if system else user_unit_dir())
    return os.path.abspath(config), os.path.abspath(unit_dir)


@click.group()
def service():
    """Mount at login or boot with a systemd unit."""


@service.command()
@unit_options
def install(system, mountpoint, config, unit_dir, over):
    """Write a systemd unit that mounts the config's repositories, and say how to enable it."""
    config, unit_dir = _locations(system, config, unit_dir)
    settings = _settings(mountpoint, config, need_repos=True, over=over)
    name = unit_name(settings.mountpoint)
    path = os.path.join(unit_dir, name)
    text = render_unit(lazyfs_executable(), settings.mountpoint, config, system, settings.over)
    try:
        os.makedirs(unit_dir, exist_ok=True)
        # (a store to mount over is the store's to make, never ours)
        if not settings.over and not os.path.lexists(settings.mountpoint):
            os.makedirs(settings.mountpoint)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from None
    when = "at boot" if system else "at every login"
    click.echo(f"wrote {path}\nto mount {settings.mountpoint} now and {when}:\n"
               f"  {_systemctl(system, 'daemon-reload')}\n"
               f"  {_systemctl(system, 'enable', '--now', name)}")
    if not system:
        click.echo("to mount at boot rather than at login: loginctl enable-linger $USER")


@service.command()
@unit_options
def uninstall(system, mountpoint, config, unit_dir, over):
    """Remove the unit written by `service install` (and its enablement)."""
    config, unit_dir = _locations(system, config, unit_dir)
    mountpoint = mountpoint or over
    if mountpoint is None:
        mountpoint = _settings(None, config, need_repos=False).mountpoint
    name = unit_name(os.path.abspath(mountpoint))
    path = os.path.join(unit_dir, name)
    if not os.path.exists(path):
        raise UserError(f"no unit {name} in {unit_dir}")
    # What `systemctl disable` removes: the links made by `enable`.
    links = [p for p in glob.glob(os.path.join(glob.escape(unit_dir), "*.wants", glob.escape(name)))
             if os.path.islink(p)]
    try:
        for p in [*links, path]:
            os.unlink(p)
    except OSError as e:
        raise UserError(f"cannot remove {e.filename}: {e.strerror}") from None
    click.echo(f"removed {path}\nif it is running, stop it:\n"
               f"  {_systemctl(system, 'stop', name)}\n"
               f"  {_systemctl(system, 'daemon-reload')}")
