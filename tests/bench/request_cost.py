"""rez-lazyfs's own CPU per FUSE request, in process, without a mount (issue 16, item 1).

    .venv/bin/python tests/bench/request_cost.py [--full] [--rounds 15] [--ab NAME=DIR ...]

The requests of a real warm W1 launch (tests/bench: the store generated in WORKDIR as
run.py does, its 1/10 sizes unless --full), replayed against the handlers of
fusefs/operations.py in this process, one after another, as the kernel sent them:
no kernel, no pyfuse3 request loop, so what is timed is our own code alone, and a
change to it shows through far less noise than a launch through a mount. Recorded
once per WORKDIR: a cold launch through a mount fills its cache (WORKDIR/rc-cache),
a warm one (remounted, page cache dropped) is logged by handler_cpu/ (lookups, reads,
readdirs, getattrs by path), WORKDIR/requests.json. Each round is a process of its
own that replays the log 1 + REPLAYS times, counting all but the first (which warms
the process up), each time opening the cache afresh as a mount does (index, block
cache, repositories, LazyOperations without open requests); every handler call is
timed (handler_timing.py: CPU of its own trio task, user + system). The cache files
stay in the page cache between replays (--drop-caches: dropped before each, as after
a remount: then a read's CPU holds the kernel's reading of the disk). readdir_reply,
pyfuse3's, is replaced by a function that takes as many entries as the kernel took:
building the kernel's dirents is pyfuse3's cost.

--ab NAME=DIR (twice or more): the same replay, round by round in turn (an order that
turns each round), with the code of each DIR (a checkout of this repository: its
cachecore and fusefs are imported). Ratios of each to the first, round by round.
Writes tests/bench/results/NAME.{json,md} (--output; default request-cost).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE / "handler_cpu"))

from handler_timing import distribution  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def record(workdir: Path, store: Path, info: dict) -> Path:
    """The request log of a warm W1 launch (and the cache it reads), made once."""
    sys.path.insert(0, str(HERE))
    from contenders import W1_VARIANT, LazyMount, drop_caches, run_w1

    requests = workdir / "requests.json"
    if requests.exists():
        return requests
    cache = workdir / "rc-cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    m = LazyMount(workdir / "rc-mnt", store, cache, [])
    m.mount()
    try:
        run_w1(m.mountpoint / "main" / W1_VARIANT, info)  # fills the cache
    finally:
        m.umount()
    spent_dir = workdir / "rc-record"
    subprocess.run(["rm", "-rf", str(spent_dir)], check=True)
    spent_dir.mkdir()
    drop_caches()
    m = LazyMount(workdir / "rc-mnt", store, cache, [],
                  env={"REZ_LAZYFS_HANDLER_CPU": str(spent_dir), "REZ_LAZYFS_REQUEST_LOG": "1",
                       "PYTHONPATH": str(HERE / "handler_cpu")})
    m.mount()
    try:
        run_w1(m.mountpoint / "main" / W1_VARIANT, info)
    finally:
        m.umount()
    logs = list(spent_dir.glob("*-requests.json"))
    if len(logs) != 1:
        raise SystemExit(f"expected one request log in {spent_dir}, found {logs}")
    logs[0].rename(requests)
    return requests


class Token:
    """What a readdir is given instead of pyfuse3's token: takes as many entries as
    the kernel took in the recorded run (`limit`), noting their inodes."""

    def __init__(self, limit: float):
        self.limit, self.inodes = limit, []


def _readdir_reply(token: Token, name, attr, next_id) -> bool:
    if len(token.inodes) >= token.limit:
        return False
    token.inodes.append(attr.st_ino)
    return True


def _readdir_limits(requests: list) -> list[float]:
    """Each readdir takes the entries up to where the next one of its directory starts."""
    limits, last = [math.inf] * len(requests), {}
    for i, r in enumerate(requests):
        if r[0] == "readdir":
            where = tuple(r[1])
            if where in last and r[2] > requests[last[where]][2]:
                limits[last[where]] = r[2] - requests[last[where]][2]
            last[where] = i
    return limits


async def serve(ops, requests: list, kinds=("lookup", "read", "readdir", "getattr")) -> list:
    """Hand the logged requests to `ops` (LazyOperations, no open requests), as the
    kernel did, the paths mapped to this run's inodes; those of `kinds` only, besides
    the lookups and readdirs that name inodes. Returns the reads as (inode, offset, size)."""
    import errno

    import pyfuse3

    pyfuse3.readdir_reply = _readdir_reply  # replaced in this process for good
    inodes = {(None, ""): pyfuse3.ROOT_INODE}
    reads = []
    for r, limit in zip(requests, _readdir_limits(requests)):
        kind, where = r[0], tuple(r[1])
        inode = inodes.get(where)
        if inode is None:
            continue  # under a name this replay could not look up
        try:
            if kind == "lookup":
                e = await ops.lookup(inode, os.fsencode(r[2]), None)
                if e.st_ino:
                    alias, relpath = ops.inodes.key(e.st_ino)
                    inodes[(alias, os.fsdecode(relpath))] = e.st_ino
            elif kind == "read":
                reads.append((inode, r[2], r[3]))
                if kind in kinds:
                    await ops.read(inode, r[2], r[3], None)
            elif kind == "readdir":
                token = Token(limit)
                await ops.readdir(inode, r[2], token, None)
                for child in token.inodes:
                    alias, relpath = ops.inodes.key(child)
                    inodes[(alias, os.fsdecode(relpath))] = child
            elif kind == "getattr" and kind in kinds:
                await ops.getattr(inode, None)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
    return reads


def opened(cache_dir: str, store: str, prefetch: int = 128 * 1024):
    """The cache opened as a mount opens it: (LocalCache, LazyOperations). Call in trio.run."""
    from cachecore.cache import LocalCache, RepoSpec
    from fusefs.operations import LazyOperations

    cache = LocalCache(cache_dir)
    repos = cache.repositories([RepoSpec("main", store)], metadata_ttl=60.0, store_timeout=15.0,
                               prefetch_max_size=prefetch)
    return cache, LazyOperations(repos, cache.counters, cache.blocks.block_size, no_open=True)


def replay(cache_dir: str, store: str, requests: list, drop: bool) -> dict:
    """One round (in this process, with the code on sys.path): {"spent": {handler:
    [ns, ...]}, "misses": blocks the cache did not have (0, or it is not a warm run)}."""
    import trio

    from fusefs.operations import LazyOperations
    from handler_timing import time_handlers

    spent = time_handlers(LazyOperations)
    if drop:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    misses = []

    async def run() -> None:
        cache, ops = opened(cache_dir, store)
        try:
            async with trio.open_nursery() as nursery:
                cache.fetcher.run_prefetches_in(nursery)
                await serve(ops, requests)
                nursery.cancel_scope.cancel()
            misses.append(cache.counters.cache_misses)
        finally:
            cache.close()

    spent.clear()
    trio.run(run)
    return {"spent": {name: list(ns) for name, ns in spent.items()}, "misses": misses[0]}


def round_in(code: Path, args, requests: Path) -> dict[str, list[int]]:
    """One round in a process of its own, importing the code of `code`: {handler: [ns, ...]}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(HERE / "handler_cpu")])}
    r = subprocess.run([sys.executable, __file__, "--one-round", str(requests),
                        "--workdir", str(args.workdir), "--replays", str(args.replays)]
                       + (["--full"] if args.full else [])
                       + (["--drop-caches"] if args.drop_caches else []),
                       env=env, capture_output=True, text=True, cwd="/")
    if r.returncode:
        raise SystemExit(f"a round with {code} failed: {r.stderr[-2000:]}")
    got = json.loads(r.stdout)
    if got["misses"]:
        raise SystemExit(f"a round with {code} read {got['misses']} block(s) from the store: "
                         "not a warm cache")
    return got["spent"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="run.py's full sizes (default: 1/10)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--replays", type=int, default=2,
                    help="replays a round counts, after one that warms the process up [2]")
    ap.add_argument("--ab", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--output", default="request-cost")
    ap.add_argument("--one-round", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = (args.workdir or Path("/var/tmp/rez-lazyfs-reqcost")
                    / ("full" if args.full else "quick")).resolve()
    store = args.workdir / "store"
    if args.one_round:
        # The first replay of a process warms it up (imports, the allocator, the
        # cache files' pages unless dropped); the next ones count.
        replays = [replay(str(args.workdir / "rc-cache"), str(store),
                          json.loads(args.one_round.read_text()), args.drop_caches)
                   for _ in range(1 + args.replays)][1:]
        print(json.dumps({"spent": {name: [ns for r in replays for ns in r["spent"][name]]
                                    for name in replays[0]["spent"]},
                          "misses": sum(r["misses"] for r in replays)}))
        return 0
    if os.geteuid() != 0:
        print("request_cost.py needs root (FUSE, drop_caches)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from workloads import Sizes, ensure_store

    args.workdir.mkdir(parents=True, exist_ok=True)
    store, info = ensure_store(args.workdir, Sizes() if args.full else Sizes.quick(), log=log)
    requests = record(args.workdir, store, info)
    kinds = collections.Counter(r[0] for r in json.loads(requests.read_text()))
    log(f"replaying {requests}: {dict(kinds)}")
    contenders = [tuple(spec.split("=", 1)) for spec in args.ab] or [("this", str(REPO))]
    names = [name for name, _ in contenders]
    rounds = []
    for n in range(args.rounds):
        turn = n % len(contenders)
        order = contenders[turn:] + contenders[:turn]
        got = {name: round_in(Path(code), args, requests) for name, code in order}
        rounds.append(got)
        log(f"round {n + 1}/{args.rounds}: " + "; ".join(
            f"{name} " + ", ".join(f"{h} {sum(v) / len(v) / 1000:.1f}"
                                   for h, v in sorted(got[name].items()))
            for name in names))

    summary: dict = {}
    for name in names:
        per_round = [{h: sum(v) / len(v) / 1000 for h, v in r[name].items()} for r in rounds]
        handlers = sorted({h for r in rounds for h in r[name]})
        summary[name] = {
            h: {**distribution([ns for r in rounds for ns in r[name].get(h, [])]),
                "mean_median_of_rounds": round(statistics.median(
                    p[h] for p in per_round if h in p), 1)}
            for h in handlers}
        total = [sum(sum(v) for v in r[name].values()) / sum(len(v) for v in r[name].values())
                 / 1000 for r in rounds]
        summary[name]["all"] = {"mean_median_of_rounds": round(statistics.median(total), 1)}
    ratios: dict = {}
    for name in names[1:]:
        for h in summary[names[0]]:
            pairs = []
            for r in rounds:
                a, b = r[names[0]].get(h), r[name].get(h)
                if h == "all":
                    a = [ns for v in r[names[0]].values() for ns in v]
                    b = [ns for v in r[name].values() for ns in v]
                if a and b:
                    pairs.append((sum(b) / len(b)) / (sum(a) / len(a)))
            if pairs:
                ratios.setdefault(name, {})[h] = {"median": round(statistics.median(pairs), 3),
                                                  "per_round": [round(p, 3) for p in pairs]}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": commit, "full": args.full, "rounds": args.rounds,
              "drop_caches": args.drop_caches, "contenders": dict(contenders),
              "kernel": platform.release(), "load": open("/proc/loadavg").read().split()[:3],
              "requests": dict(kinds), "summary": summary, "ratios": ratios}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    lines = ["# rez-lazyfs's own CPU per request, replayed in process", "",
             f"`tests/bench/request_cost.py{' --full' if args.full else ''} --rounds {args.rounds}"
             + (" --drop-caches" if args.drop_caches else "")
             + "".join(f" --ab {n}={c}" for n, c in contenders if args.ab) + f"` at {commit}, "
             f"{report['date']}, load {' '.join(report['load'])}: the {sum(kinds.values()):,} "
             "requests of a warm W1 launch ("
             + ", ".join(f"{k} {v:,}" for k, v in kinds.most_common()) + "),"
             f" replayed against the handlers, {args.rounds} rounds, the cache opened afresh "
             "each round; the cache files' pages "
             + ("dropped before each round." if args.drop_caches else "kept (hot)."), "",
             "CPU per request inside each handler, us (user + system of its own task; mean, "
             "the median over rounds of each round's mean, and percentiles of every request):",
             "", "| code | handler | requests/replay | mean | median of round means | p10 | p50 | "
             "p90 | p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for h, d in summary[name].items():
            if h == "all":
                continue
            per_replay = d["requests"] // (args.rounds * args.replays)
            lines.append(f"| {name} | {h} | {per_replay:,} | {d['mean']:.1f} | "
                         f"{d['mean_median_of_rounds']:.1f} | {d['p10']:.1f} | {d['p50']:.1f} | "
                         f"{d['p90']:.1f} | {d['p99']:.1f} |")
        lines.append(f"| {name} | all | {sum(kinds.values()):,} | - | "
                     f"{summary[name]['all']['mean_median_of_rounds']:.1f} | | | | |")
    for name, by in ratios.items():
        lines += ["", f"{name} / {names[0]}, mean CPU per request, round by round "
                  "(interleaved, each round in processes of its own):", ""]
        lines += [f"- {h}: median {d['median']} {d['per_round']}" for h, d in by.items()]
    (out / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / args.output}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
