"""The W1 trace replayed in process from the bench's store on local disk into
a fresh cache: the replay's own CPU (cachecore only: no FUSE, no network, no
sshfs), to cut it without the noise of the store's stack.

    .venv/bin/python tests/bench/replay_local.py [--workdir DIR] [--rounds N] [--threads N]
        [--code DIR ...]

The store and the trace are run.py's and replay_alone.py's (WORKDIR/store,
WORKDIR/trace/lazy-cold-trace-kept/w1.trace: run either once first). Each
round, for this checkout and every --code checkout in turn (a fresh Python
each, so the code is the checkout's): a new cache, the replay, its wall time,
the process's user and system CPU and its context switches. The store's
files stay in the page cache after the first round, as a filer's would.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from contenders import drop_caches  # noqa: E402

ONE_ROUND = r"""
import json, os, resource, sys, time
import trio
from cachecore.blocks import BlockCache
from cachecore.cache import open_blocks
from cachecore.fetcher import Fetcher
from cachecore.index import MetadataIndex
from cachecore.replay import replay
from cachecore.repository import RepoPolicy, Repository
from cachecore.stats import Counters
from cachecore.store import FilesystemStore
from cachecore.trace import decode
from cachecore.model import identity_of_stat

store_root, trace_file, cache, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
(trace,) = decode(open(trace_file, "rb").read())
# recorded through sshfs (mtimes in whole seconds): the local files' identities instead
trace.files = [(path, identity_of_stat(os.lstat(os.path.join(store_root.encode(),
                                                                  trace.root, path))))
               for path, _ in trace.files]
index = MetadataIndex(os.path.join(cache, "index"))
blocks = open_blocks(cache, trace.block_size, kind=BlockCache)
fetcher = Fetcher(blocks, Counters(), store_limiter=trio.CapacityLimiter(threads),
                  local_limiter=trio.CapacityLimiter(8), store_timeout=60.0)
repo = Repository("main", FilesystemStore(store_root), index, fetcher, RepoPolicy())

async def main():
    async with trio.open_nursery() as nursery:
        fetcher.run_prefetches_in(nursery)
        await replay(repo, trace)
        nursery.cancel_scope.cancel()

before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
trio.run(main)
wall, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": round(wall, 3), "user_s": round(after.ru_utime - before.ru_utime, 3),
                  "system_s": round(after.ru_stime - before.ru_stime, 3),
                  "switches": (after.ru_nvcsw + after.ru_nivcsw) - (before.ru_nvcsw + before.ru_nivcsw),
                  "blocks": fetcher.counters.replay_blocks}))
"""


def one_round(code: Path, store: Path, trace: Path, threads: int, parent: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=parent, prefix="replay-local-") as cache:
        os.chmod(cache, 0o700)
        # The last round's cache just went: on ext4 without a journal (this VM's
        # disk) every file created while the freed inodes' table blocks are
        # cached and recent scans past them all (find_inode_bit), half of the
        # replay's CPU here; run.py's runs sync and drop the caches first, so do so.
        drop_caches()
        out = subprocess.run([sys.executable, "-c", ONE_ROUND, str(store), str(trace),
                              cache, str(threads)],
                             env={**os.environ, "PYTHONPATH": str(code)},
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=16, help="store_threads (the replay gets half)")
    ap.add_argument("--cache-in", action="append", default=[], type=Path,
                    help="a directory to make the caches in (repeat: each in turn; default /var/tmp)")
    ap.add_argument("--code", action="append", default=[], type=Path,
                    help="another checkout to run in turn with this one (repeat)")
    args = ap.parse_args(argv)
    store = args.workdir / "store"
    trace = args.workdir / "trace" / "lazy-cold-trace-kept" / "w1.trace"
    if not trace.exists():
        print(f"no trace at {trace}: run tests/bench/replay_alone.py once first", file=sys.stderr)
        return 2
    variants = [(code, parent) for code in [ROOT, *args.code]
                for parent in args.cache_in or [Path("/var/tmp")]]
    rows = {f"{code} {parent}": [] for code, parent in variants}
    for n in range(args.rounds):
        for code, parent in variants:
            row = one_round(code, store, trace, args.threads, parent)
            rows[f"{code} {parent}"].append(row)
            print(json.dumps({"round": n, "code": str(code), "cache_in": str(parent), **row}),
                  flush=True)
    for variant, got in rows.items():
        print(variant, {k: statistics.median(r[k] for r in got)
                     for k in ("wall_s", "user_s", "system_s", "switches")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
