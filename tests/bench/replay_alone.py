"""A trace replay with no launch beside it: how fast the daemon fetches the W1
trace when nothing else asks it for anything (what bounds lazy-cold-trace-kept).

    .venv/bin/python tests/bench/replay_alone.py [--workdir DIR] [--runs N] [--config TOML ...]

As root, on the store run.py built in WORKDIR (default sizes), the bench's
link and its kept sshfs mount (contenders.Bench, lazy-cold-trace-kept's
trace, recorded first). Per run and mount configuration (the default, then
each --config, interleaved): a fresh cache seeded with the trace, sshfs's
caches expired, page cache dropped, mount, one stat of the variant root
(the first access: the replay starts), then the stats once the store
counters stop moving. The replay's own time comes from the daemon's log
lines; daemon CPU from /proc. Everything is torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launchtrace  # noqa: E402
import netstore  # noqa: E402
from contenders import W1_VARIANT, Bench, LazyMount, drop_caches  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402

KEPT = "lazy-cold-trace-kept"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", action="append", default=[],
                    help="a mount config to compare with the default (repeat)")
    args = ap.parse_args(argv)
    store, info = ensure_store(args.workdir, Sizes(), log=print)
    info = {**info, "sizes": Sizes().__dict__}
    net = netstore.NetStore(store, args.workdir / "sshfs")
    bench = None
    rows = []
    try:
        net.start()
        bench = Bench(args.workdir, store, net, info, [], log=print)
        trace = bench._ensure_trace(KEPT)
        variants = [("default", [])] + [(Path(c).name, [f"--config={c}"]) for c in args.config]
        for run in range(args.runs):
            for name, extra in variants:
                bench._unmount()
                bench._fresh(bench.trace_cache)
                kept = bench._trace_store(KEPT)
                launchtrace.seed(trace, kept, bench.trace_cache, extra)
                drop_caches()
                mount = bench._add_mount(LazyMount(bench.lazy_mp, kept, bench.trace_cache, extra))
                before, cpu0 = mount.stats(), mount.cpu_seconds()
                t0 = time.time()
                os.stat(mount.mountpoint / "main" / W1_VARIANT)
                after, _ = bench._settle(mount)
                cpu = mount.cpu_seconds() - cpu0
                bench._unmount()
                bench._kept_used = time.monotonic()
                timing = launchtrace.replay_timing(bench.trace_cache / "logs" / "daemon.log", t0)
                row = {"run": run + 1, "config": name, "daemon_cpu_seconds": round(cpu, 2),
                       "replay_width": launchtrace.replay_width(extra), **timing,
                       **{k: after[k] - before[k] for k in ("replay_blocks", "replay_bytes",
                                                            "store_reads", "store_listings")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if bench is not None:
            bench.close()
        net.close()
    summary = {}
    for name, _ in [("default", [])] + [(Path(c).name, []) for c in args.config]:
        mine = [r for r in rows if r["config"] == name and r.get("replay_end_s") is not None]
        if mine:
            summary[name] = {k: statistics.median(r[k] for r in mine)
                             for k in ("replay_start_s", "replay_end_s", "daemon_cpu_seconds",
                                       "replay_blocks")}
    print(json.dumps({"load": open("/proc/loadavg").read().split()[:3], "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
