"""Launch traces from the command line: record, seed, show (cachecore/trace.py).

`record` runs a command in a baked context on its mount while the daemon
notes what the command's process tree reads (the daemon is asked through
the mount root's trace xattrs, each question with a time limit, like every
command facing a mount), then splits the recording per variant of the
context and merges it into the trace file. If nothing is mounted at the
context's mount point, it mounts one for the run (from --repo, --cache and
the config, as `mount` would) and unmounts it afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from cachecore.trace import (
    BadTrace,
    VariantTrace,
    decode,
    encode,
    is_trace_document,
    merge_all,
    traces_from_recording,
)

from .config import Settings
from .errors import UserError

TRACE_XATTR = "user.rezlazyfs.trace."
ASK_TIMEOUT = 10.0
MAX_TRACE_FILE = 256 * 2**20


# -- trace files -------------------------------------------------------------------
def read_trace_file(path: str) -> list[VariantTrace]:
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_TRACE_FILE + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(blob) > MAX_TRACE_FILE:
        raise UserError(f"{path}: larger than {MAX_TRACE_FILE // 2**20} MiB: not a trace")
    try:
        return decode(blob)
    except BadTrace as e:
        raise UserError(f"{path}: {e}") from None


def is_trace_file(path: str) -> bool:
    """Whether `path` holds a trace (rather than, say, a context)."""
    try:
        with open(path, "rb") as f:
            return is_trace_document(json.loads(f.read(MAX_TRACE_FILE)))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def write_trace_file(path: str, traces: list[VariantTrace]) -> None:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".trace.")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(traces))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def summary(traces: list[VariantTrace]) -> list[dict]:
    return [{"repo": t.repo, "root": os.fsdecode(t.root), "files": len(t.files),
             "directories": len(t.dirs), "blocks": len(t.reads),
             "bytes": t.payload_bytes()} for t in traces]


# -- recording -------------------------------------------------------------------
def _ask_mount(mountpoint: str, name: str) -> bytes:
    from .mounts import NoAnswer, ask

    try:
        return ask(ASK_TIMEOUT, os.getxattr, mountpoint, TRACE_XATTR + name)
    except NoAnswer:
        raise UserError(f"the mount at {mountpoint} does not answer within "
                        f"{ASK_TIMEOUT:g}s") from None
    except OSError as e:
        if e.errno in (13, 1):  # EACCES, EPERM
            raise UserError(f"recording a trace on {mountpoint} needs its owner "
                            "(uid {}) or root".format(os.stat(mountpoint).st_uid)) from None
        if e.errno == 61:  # ENODATA: not a rez-lazyfs mount of this release
            raise UserError(f"{mountpoint} cannot record traces (an older rez-lazyfs?)") from None
        raise UserError(f"{mountpoint}: {e.strerror}") from None


def _take(mountpoint: str, recording: int) -> bytes:
    """Stop a recording and read it whole (in the asking child: one fork)."""
    name = TRACE_XATTR + f"stop:{recording}"
    parts = json.loads(os.getxattr(mountpoint, name))["parts"]
    blob = b"".join(os.getxattr(mountpoint, TRACE_XATTR + f"part:{recording}:{i}")
                    for i in range(parts))
    os.getxattr(mountpoint, TRACE_XATTR + f"end:{recording}")
    return blob


def record(ctx_path: str, out_path: str, command: list[str], settings: Settings,
           *, say=print) -> int:
    """Run `command` in the baked context, record what it reads, merge the
    traces into `out_path`. Returns the command's exit status."""
    from .context import DeepData
    from .daemon import mount_fs, unmount
    from .mounts import NoAnswer, ask, mount_at
    from .rxt import load_context

    if not command:
        raise UserError("give the command to record after --: trace record CTX -o T -- CMD ...")
    deep = DeepData.from_context(load_context(ctx_path), ctx_path)
    old = read_trace_file(out_path) if os.path.exists(out_path) else []
    mountpoint = os.path.realpath(settings.mountpoint or deep.mountpoint)
    mounted_here = False
    entry = mount_at(mountpoint)
    if entry is None:
        settings.mountpoint = mountpoint
        if not settings.repos:
            settings.repos = _repos_of(deep)
        mount_fs(settings)
        mounted_here = True
    elif entry.fstype != "fuse.rez-lazyfs":
        raise UserError(f"{mountpoint} is a {entry.fstype} mount, not rez-lazyfs")
    try:
        try:
            recording = int(_ask_mount(mountpoint, f"start:{os.getpid()}"))
        except ValueError:
            raise UserError(f"{mountpoint} answered nonsense to a trace request") from None
        try:
            status = _run_in_context(ctx_path, command)
        except BaseException:
            _ask_mount(mountpoint, f"end:{recording}")
            raise
        try:
            blob = ask(ASK_TIMEOUT * 6, _take, mountpoint, recording)
        except (NoAnswer, OSError) as e:
            raise UserError(f"cannot read the recording from {mountpoint}: {e}") from None
    finally:
        if mounted_here:
            unmount(mountpoint)
    roots: dict[str, list[bytes]] = {}
    for v in deep.variants:
        roots.setdefault(v["repo"], []).append(os.fsencode(v["root"]))
    try:
        new = traces_from_recording(blob, roots)
    except BadTrace as e:
        raise UserError(f"the recording from {mountpoint} is damaged: {e}") from None
    merged = list(merge_all([*old, *new]).values())
    write_trace_file(out_path, merged)
    blocks = sum(len(t.reads) for t in new)
    size = sum(t.payload_bytes() for t in new)
    say(f"recorded {blocks} block(s) ({size / 2**20:.1f} MiB) and "
        f"{sum(len(t.dirs) for t in new)} directories of {len(new)} variant(s)"
        f"{' into' if old else ':'} {out_path}")
    if json.loads(blob).get("truncated"):
        say("warning: the recording reached its limit; later reads were not recorded")
    return status


def _repos_of(deep) -> list:
    from .config import RepoConfig

    return [RepoConfig(alias, path) for alias, path in deep.repos.items()]


def _rez_env() -> str:
    """rez-env: beside the interpreter running us (a venv, a rez install), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "rez-env")
    found = beside if os.access(beside, os.X_OK) else shutil.which("rez-env")
    if not found:
        raise UserError("rez-env not found (beside this Python or on PATH): is rez installed?")
    return found


def _run_in_context(ctx_path: str, command: list[str]) -> int:
    """The command's exit status (128 + N for a signal), output passed through.
    Run by rez-env --input, as users source a context: everything that reads
    the mount (rez loading the definitions too) is a recorded child, and this
    process never touches the mount itself."""
    try:
        child = subprocess.Popen([_rez_env(), "--input", ctx_path, "--", *command])
    except OSError as e:
        raise UserError(f"cannot run rez-env: {e.strerror}") from None
    while True:
        try:
            status = child.wait()
            break
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached the child too
            continue
    return 128 + -status if status < 0 else status


# -- seeding --------------------------------------------------------------------
def seed_traces(path: str, settings: Settings) -> list[dict]:
    """Put a trace file's traces into the cache, for the repositories they were
    recorded under (by alias: --repo, the config or what the cache records)."""
    from cachecore.stores import store_id

    from .daemon import open_cache, repo_specs

    traces = read_trace_file(path)
    cache = open_cache(settings)
    try:
        specs = {s.alias: s for s in repo_specs(settings, cache)}
        seeded = []
        for t in traces:
            spec = specs.get(t.repo) if t.repo else (next(iter(specs.values()))
                                                     if len(specs) == 1 else None)
            if spec is None:
                raise UserError(f"{path}: {os.fsdecode(t.root)} was recorded in repository "
                                f"{t.repo!r}, which is not configured here (give --repo "
                                f"{t.repo or 'ALIAS'}=PATH)")
            cache.index.put_trace(store_id(spec.path), t)
            seeded.append(t)
        return summary(seeded)
    finally:
        cache.close()
