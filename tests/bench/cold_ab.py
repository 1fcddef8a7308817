"""A cold run of one workload through this checkout's daemon and through other
checkouts' (their cachecore, fusefs and mount: code_contender.sh) or with other
mount configs (--config), interleaved
round by round, each exactly as run.py's lazy-cold runs it (a fresh cache,
the store's sshfs mounted afresh, page cache dropped); with --trace, each as
lazy-cold-trace-kept runs it (the W1 launch's trace seeded into the fresh cache).

    .venv/bin/python tests/bench/cold_ab.py --workload W2 --code /var/tmp/rez-lazyfs-reqcost/code-base [--runs 3] [--trace]

As root, on the store run.py built in WORKDIR (default sizes), through the
bench's link. Prints a JSON row per run (time, the daemon's CPU and every
process's, store counters) and the per-round ratios against this checkout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launchtrace  # noqa: E402
import profile_warm  # noqa: E402
from contenders import WORKLOADS, LazyMount, drop_caches  # noqa: E402
from replay_alone import KEPT, bench_on, cpu_by_command, cpu_spent, write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--workload", default="W2", choices=sorted(WORKLOADS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], type=Path,
                    help="a checkout whose cachecore/fusefs/mount the daemon runs instead (repeat)")
    ap.add_argument("--config", action="append", default=[], type=Path,
                    help="a mount config file this checkout's daemon runs with (repeat)")
    ap.add_argument("--cache-in", action="append", default=[], type=Path,
                    help="a directory this checkout's daemon keeps its cache in instead of the "
                         "workdir (another filesystem: repeat)")
    ap.add_argument("--trace", action="store_true",
                    help="seed the W1 launch's trace into each fresh cache (W1, W4)")
    ap.add_argument("--output", type=Path, help="also write the rows and summary here (JSON)")
    args = ap.parse_args(argv)
    variants = ([("this", {}, [], None)]
                + [(f"code:{c}", {"PYTHONPATH": str(c)}, [], None) for c in args.code]
                + [(f"config:{c.name}", {}, [f"--config={c}"], None) for c in args.config]
                + [(f"cache-in:{d}", {}, [], d / "cache") for d in args.cache_in])
    rows = []
    with bench_on(args.workdir) as (bench, _):
        trace = bench._ensure_trace(KEPT) if args.trace else None
        workdir_cache = bench.cache
        for run in range(args.runs):
            for name, env, extra, cache in variants:
                bench._unmount()
                bench.cache = cache or workdir_cache
                bench._fresh(bench.cache)
                if trace is None:
                    store = bench.lazy_sshfs
                    bench.net.umount_at(store)
                    bench.net.mount_at(store)
                else:
                    store = bench._trace_store(KEPT)  # its caches expired, as for lazy-cold-trace-kept
                    launchtrace.seed(trace, store, bench.cache, extra)
                drop_caches()
                mount = bench._add_mount(LazyMount(bench.lazy_mp, store, bench.cache, extra, env=env))
                try:
                    cpu0, procs0 = profile_warm.cpu_times(mount.pid), cpu_by_command()
                    out = bench._run_on(args.workload, WORKLOADS[args.workload], mount)
                    user, system = (b - a for a, b in zip(cpu0, profile_warm.cpu_times(mount.pid)))
                    stack = cpu_spent(procs0, cpu_by_command(), mount.pid)
                finally:
                    bench._unmount()
                    if trace is not None:
                        bench._kept_used = time.monotonic()  # its caches expire before the next
                row = {"run": run + 1, "code": name, "seconds": round(out["seconds"], 3),
                       "daemon_user_seconds": round(user, 2),
                       "daemon_system_seconds": round(system, 2),
                       "cpu_seconds_by_command": stack,
                       "store": {k: out["store"].get(k) for k in
                                 ("store_reads", "store_bytes", "prefetch_blocks", "cache_misses",
                                  "replay_blocks")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    this = {r["run"]: r for r in rows if r["code"] == "this"}
    summary = {}
    for name, *_ in variants:
        mine = [r for r in rows if r["code"] == name]
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in mine),
            "daemon_cpu_seconds": statistics.median(
                r["daemon_user_seconds"] + r["daemon_system_seconds"] for r in mine),
            "seconds_over_this": [round(r["seconds"] / this[r["run"]]["seconds"], 3) for r in mine]}
    write_result(summary, rows, args.output, workload=args.workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
