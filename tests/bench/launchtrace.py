"""The W1 launch's trace, recorded once per bench run (not timed), for the
lazy-cold-trace contender (issue 12).

    1. resolve `dcc` with the real rez (rez-env dcc --output ctx.rxt) against
       the store path the lazy mounts mirror (the sshfs mount), with a
       minimal rez config of our own (no user or site config leaks in);
    2. bake it for the bench's lazy mount point (`rez-lazyfs bake`, into a
       scratch cache of its own, removed afterwards: the recording's cache
       stays cold);
    3. on a cold mount (fresh cache, sshfs remounted, page cache dropped),
       `rez-lazyfs trace record baked.rxt -o w1.trace -- <the W1 launch>`:
       rez-env sources the baked context (PYTHONPATH from dcc's commands),
       the launch is the W1 argv with W1's environment.

Each timed lazy-cold-trace run then seeds w1.trace into its fresh cache
(`rez-lazyfs seed w1.trace --repo main=STORE --cache CACHE`) before mounting.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from workloads import LAUNCH_CODE, LAUNCH_PYTHON, W1_VARIANT

BIN = Path(sys.executable).parent
CLI = str(BIN / "rez-lazyfs")
ALIAS = "main"


class TraceFailed(RuntimeError):
    pass


def rez_environ(tdir: Path, packages_path: str) -> dict:
    """The environment for rez and the non-daemon rez-lazyfs commands: a
    minimal rez config of ours, no REZ_* or user config from outside."""
    config = tdir / "rezconfig.py"
    if not config.exists():
        config.write_text(textwrap.dedent(f"""\
            packages_path = []
            local_packages_path = "{tdir}/local-packages"
            release_packages_path = "{tdir}/release-packages"
            implicit_packages = []
            """))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REZ_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    xdg = tdir / "xdg"
    env.update(REZ_CONFIG_FILE=str(config), REZ_DISABLE_HOME_CONFIG="1",
               REZ_PACKAGES_PATH=packages_path,
               XDG_CONFIG_HOME=str(xdg / "config"), XDG_CACHE_HOME=str(xdg / "cache"),
               XDG_DATA_HOME=str(xdg / "data"), XDG_STATE_HOME=str(xdg / "state"))
    return env


def _run(argv: list, env: dict, what: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, cwd="/", timeout=timeout)
    if r.returncode:
        raise TraceFailed(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def block_size_args(mount_extra: list[str]) -> list[str]:
    """The --block-size of the bench's mounts, for seed (the same cache)."""
    out = []
    for i, a in enumerate(mount_extra):
        if a.startswith("--block-size="):
            out.append(a)
        elif a == "--block-size" and i + 1 < len(mount_extra):
            out += [a, mount_extra[i + 1]]
    return out


def replay_width(mount_extra: list[str]) -> int:
    """How many blocks a replay fetches at a time: the fetcher's background
    limiter, half of store_threads (16 unless a --config given to the mounts
    says otherwise)."""
    import tomllib

    threads = 16
    for i, a in enumerate(mount_extra):
        path = a.split("=", 1)[1] if a.startswith("--config=") else (
            mount_extra[i + 1] if a == "--config" and i + 1 < len(mount_extra) else None)
        if path:
            with open(path, "rb") as f:
                threads = tomllib.load(f).get("store_threads", threads)
    return max(1, threads // 2)


def prepare_context(tdir: Path, store_path: Path, mountpoint: Path) -> dict:
    """Steps 1 and 2: tdir/ctx.rxt resolved, tdir/baked.rxt baked for `mountpoint`."""
    env = rez_environ(tdir, str(store_path))
    t = time.perf_counter()
    ctx, baked = tdir / "ctx.rxt", tdir / "baked.rxt"
    _run([BIN / "rez-env", W1_VARIANT.split("/")[0], "--output", ctx], env, "rez-env --output")
    resolve_seconds = time.perf_counter() - t
    bake_cache = tdir / "bake-cache"
    t = time.perf_counter()
    try:
        r = _run([CLI, "bake", ctx, "-o", baked, "--mount", mountpoint,
                  "--repo", f"{ALIAS}={store_path}", "--cache", bake_cache], env, "rez-lazyfs bake")
    finally:
        shutil.rmtree(bake_cache, ignore_errors=True)
    return {"resolve_seconds": resolve_seconds, "bake_seconds": time.perf_counter() - t,
            "bake": r.stdout.strip()}


def record(tdir: Path, store_path: Path, mountpoint: Path) -> tuple[Path, dict]:
    """Step 3, on the cold mount running at `mountpoint`: the W1 launch through
    the baked context, recorded into tdir/w1.trace. Returns the trace and
    what the launch printed (its last line, JSON)."""
    env = rez_environ(tdir, str(tdir / "no-packages-here"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # as launch_argv; PYTHONPATH comes from the context
    trace = tdir / "w1.trace"
    trace.unlink(missing_ok=True)
    t = time.perf_counter()
    r = _run([CLI, "trace", "record", tdir / "baked.rxt", "-o", trace, "--mount", mountpoint,
              "--", LAUNCH_PYTHON, "-B", "-c", LAUNCH_CODE], env, "rez-lazyfs trace record")
    seconds = time.perf_counter() - t
    try:
        launched = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TraceFailed(f"the recorded launch printed {r.stdout[-300:]!r}") from None
    return trace, {"record_seconds": seconds, "launched": launched,
                   "record_said": r.stderr.strip().splitlines()[-1:]}


def show(trace: Path) -> list[dict]:
    r = _run([CLI, "trace", "show", "--json", trace], dict(os.environ), "rez-lazyfs trace show")
    return json.loads(r.stdout)


def payload_bytes(trace: Path) -> int:
    """The bytes a trace's blocks hold (a file's last block is shorter; `trace
    show` counts every block whole)."""
    total = 0
    for v in json.loads(trace.read_bytes())["variants"]:
        bs, runs = v["block_size"], v["reads"]
        for i in range(0, len(runs), 3):
            f, first, count = runs[i:i + 3]
            size = v["files"][f]["identity"][0]
            total += sum(max(0, min(bs, size - b * bs)) for b in range(first, first + count))
    return total


def seed(trace: Path, store_path: Path, cache: Path, mount_extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_")}
    _run([CLI, "seed", trace, "--repo", f"{ALIAS}={store_path}", "--cache", cache,
          *block_size_args(mount_extra)], env, "rez-lazyfs seed")


_REPLAY_LINE = re.compile(rb"^(\S+ \S+) \d+ \w+ \S+: (replaying the trace of|replayed the trace of|"
                          rb"trace replay of) ")
_TO_FETCH = re.compile(rb": (\d+) block\(s\) to fetch")
_FETCHED_IN = re.compile(rb": \d+ block\(s\) fetched in ([\d.]+)s")


def replay_timing(log: Path, t0: float) -> dict:
    """When the replay started and ended, in seconds after `t0` (time.time()
    at the workload's start), from the daemon's log lines (cachecore/replay.py)."""
    out: dict = {}
    try:
        lines = log.read_bytes().splitlines()
    except OSError:
        return out
    for line in lines:
        m = _REPLAY_LINE.match(line)
        if not m:
            continue
        when = datetime.datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        kind = m.group(2)
        if kind == b"replaying the trace of":
            out["replay_start_s"] = round(when - t0, 3)
            n = _TO_FETCH.search(line)
            out["replay_to_fetch"] = int(n.group(1)) if n else None
        elif kind == b"replayed the trace of":
            out["replay_end_s"] = round(when - t0, 3)
            n = _FETCHED_IN.search(line)
            out["replay_fetch_seconds"] = float(n.group(1)) if n else None
        else:
            out["replay_stopped_s"] = round(when - t0, 3)
    return out
