"""A warm read's CPU in process, part by part (issue 16, item 1), A/B between checkouts.

    .venv/bin/python tests/bench/read_parts.py [--full] [--rounds 6] [--ab NAME=DIR ...]

The lookups and listings of request_cost.py's recorded warm W1 launch (recorded there
first: run it once) are replayed to name the files; then the launch's first FILES reads
of small files (at most 12K, a .pyc each: most of a start-up's reads) are timed,
whole passes over them, CPU of this thread (user + system), the minimum of PASSES passes
(a pass the machine's other jobs got in the way of counts for nothing):
    read handler, first read      LazyOperations.read as at a file's first read: its
                                  version taken, its cache file opened
    ... version and descriptor kept   the same read again
    Fetcher.read, fresh / kept descriptor
    BlockCache.read, fresh / kept descriptor   the cache file's read and its MAC check
    InodeTable.key + Repository.open           the version a first read takes
    InodeTable.key, BlockMac of the block
FILES stays below the block cache's pool of kept descriptors, so "fresh" opens every
file once a pass and "kept" opens none. The cache files stay in the page cache: this is
our code's cost, not the cache disk's. --ab: each round runs every DIR's code (its
cachecore and fusefs) in a process of its own, in an order that turns each round;
ratios to the first, round by round.
Writes tests/bench/results/NAME.{json,md} (--output; default read-parts).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FILES = 250    # below BlockCache's 256 kept descriptors
PASSES = 9


def parts(workdir: Path) -> dict[str, float]:
    """One process's measurements (the code on sys.path): {part: us per read}."""
    import trio

    from request_cost import opened, serve

    requests = json.loads((workdir / "requests.json").read_text())
    out: dict[str, float] = {}

    async def run() -> None:
        cache, ops = opened(str(workdir / "rc-cache"), str(workdir / "store"), prefetch=0)
        try:
            reads = [r for r in await serve(ops, requests, kinds=()) if r[2] <= 12288][:FILES]
            repo, fetcher, blocks = ops.repos["main"], cache.fetcher, cache.blocks

            async def timed(name, step, before=None) -> None:
                best = []
                for _ in range(PASSES):
                    if before is not None:
                        before()
                    started = time.thread_time_ns()
                    for read in reads:
                        await step(*read)
                    best.append((time.thread_time_ns() - started) / len(reads) / 1000)
                out[name] = round(min(best), 2)

            def forget_descriptors():
                blocks._readers.close_idle(max_age=0)

            def forget_versions():
                ops._versions.clear()
                forget_descriptors()

            async def handler(inode, offset, size):
                await ops.read(inode, offset, size, None)

            await timed("read handler, first read", handler, forget_versions)
            await timed("read handler, version and descriptor kept", handler)
            versions = {inode: ops._versions[inode][1] for inode, _, _ in reads}

            async def fetcher_read(inode, offset, size):
                await fetcher.read(versions[inode], offset, size)

            async def blocks_read(inode, offset, size):
                blocks.read(versions[inode].key, 0, versions[inode].size)

            async def version(inode, offset, size):
                await repo.open(ops.inodes.key(inode)[1])

            async def key(inode, offset, size):
                ops.inodes.key(inode)

            async def mac(inode, offset, size):
                blocks._mac(bytes(versions[inode].size), versions[inode].key, 0)

            await timed("Fetcher.read, fresh descriptor", fetcher_read, forget_descriptors)
            await timed("Fetcher.read, kept descriptor", fetcher_read)
            await timed("BlockCache.read, fresh descriptor", blocks_read, forget_descriptors)
            await timed("BlockCache.read, kept descriptor", blocks_read)
            await timed("InodeTable.key + Repository.open", version)
            await timed("InodeTable.key", key)
            await timed("BlockMac of the block", mac)
        finally:
            cache.close()

    trio.run(run)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="run.py's full sizes (default: 1/10)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ab", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--output", default="read-parts")
    ap.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = (args.workdir or Path("/var/tmp/rez-lazyfs-reqcost")
                    / ("full" if args.full else "quick")).resolve()
    if args.one_process:
        print(json.dumps(parts(args.workdir)))
        return 0
    if not (args.workdir / "requests.json").exists():
        print(f"no recorded launch in {args.workdir}: run request_cost.py first", file=sys.stderr)
        return 2
    contenders = [tuple(spec.split("=", 1)) for spec in args.ab] or [("this", str(REPO))]
    names = [name for name, _ in contenders]
    rounds = []
    for n in range(args.rounds):
        turn = n % len(contenders)
        got = {}
        for name, code in contenders[turn:] + contenders[:turn]:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([code, str(HERE)])}
            r = subprocess.run([sys.executable, __file__, "--one-process", "--workdir",
                                str(args.workdir)], env=env, capture_output=True, text=True,
                               cwd="/")
            if r.returncode:
                raise SystemExit(f"{name} failed: {r.stderr[-2000:]}")
            got[name] = json.loads(r.stdout)
        rounds.append(got)
        print(f"round {n + 1}/{args.rounds}: " + "; ".join(
            f"{name} first read {got[name]['read handler, first read']}" for name in names),
            file=sys.stderr, flush=True)
    summary = {name: {part: statistics.median(r[name][part] for r in rounds)
                      for part in rounds[0][name]} for name in names}
    ratios = {name: {part: {"median": round(statistics.median(
        r[name][part] / r[names[0]][part] for r in rounds), 3),
        "per_round": [round(r[name][part] / r[names[0]][part], 3) for r in rounds]}
        for part in summary[name]} for name in names[1:]}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
              "full": args.full, "rounds": args.rounds, "files": FILES, "passes": PASSES,
              "contenders": dict(contenders),
              "load": open("/proc/loadavg").read().split()[:3],
              "summary": summary, "ratios": ratios, "raw": rounds}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    lines = ["# A warm read's CPU in process, part by part", "",
             f"`tests/bench/read_parts.py{' --full' if args.full else ''} --rounds {args.rounds}"
             + "".join(f" --ab {n}={c}" for n, c in contenders if args.ab) + f"` at {commit}, "
             f"{report['date']}, load {' '.join(report['load'])}: the first {FILES} reads of "
             "small files of the recorded warm W1 launch, the cache files in the page cache; "
             f"us per read, CPU of the thread, the minimum of {PASSES} passes, the median over "
             "rounds.", "", "| part | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for part in summary[names[0]]:
        lines.append(f"| {part} | " + " | ".join(f"{summary[n][part]:.2f}" for n in names) + " |")
    for name, by in ratios.items():
        lines += ["", f"{name} / {names[0]}, round by round (interleaved, processes of their "
                  "own):", ""]
        lines += [f"- {part}: median {d['median']} {d['per_round']}" for part, d in by.items()]
    (out / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.output}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
