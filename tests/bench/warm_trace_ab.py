"""Warm launches with and without the launch's trace in the cache, interleaved:
what a trace does for a start-up whose blocks are all cached already (the
replay then finds every block present and only reads it, ahead of the
launch, from the cache disk).

    .venv/bin/python tests/bench/warm_trace_ab.py [--workdir DIR] [--workload W1|W4] [--runs N]
        [--output FILE]

As root, on the store run.py built in WORKDIR (default sizes), through the
bench's link. One cold run fills a cache (as run.py's lazy-cold); a copy of
it gets the W1 launch's trace seeded (lazy-cold-trace-kept's). Then, round by
round, each cache in turn: unmounted, page cache dropped, mounted, the
workload (as lazy-warm-disk), then again with the page cache hot (as
lazy-warm-hot). Prints a JSON row per run and the medians.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launchtrace  # noqa: E402
import profile_warm  # noqa: E402
from contenders import WORKLOADS, LazyMount, drop_caches  # noqa: E402
from replay_alone import KEPT, bench_on, write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--workload", default="W1", choices=["W1", "W4"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--output", type=Path, help="also write the rows and summary here (JSON)")
    args = ap.parse_args(argv)
    fn = WORKLOADS[args.workload]
    rows = []
    with bench_on(args.workdir) as (bench, _):
        trace = bench._ensure_trace(KEPT)
        bench._lazy_cold(args.workload, fn)  # fills bench.cache
        traced = args.workdir / "cache-warm-traced"
        shutil.rmtree(traced, ignore_errors=True)
        subprocess.run(["cp", "-a", str(bench.cache), str(traced)], check=True)
        launchtrace.seed(trace, bench.lazy_sshfs, traced, [])
        caches = {"untraced": bench.cache, "traced": traced}
        try:
            for run in range(args.runs):
                for name, cache in caches.items():
                    bench._unmount()
                    drop_caches()
                    mount = bench._add_mount(LazyMount(bench.lazy_mp, bench.lazy_sshfs, cache, []))
                    try:
                        row = {"run": run + 1, "cache": name}
                        for state in ("warm_disk", "hot"):
                            cpu0 = profile_warm.cpu_times(mount.pid)
                            out = bench._run_on(args.workload, fn, mount)
                            cpu = sum(b - a for a, b in zip(cpu0, profile_warm.cpu_times(mount.pid)))
                            row[state] = {"seconds": round(out["seconds"], 3),
                                          "daemon_cpu_seconds": round(cpu, 2),
                                          "store_reads": out["store"].get("store_reads"),
                                          "replay_blocks": out["store"].get("replay_blocks")}
                    finally:
                        bench._unmount()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(traced, ignore_errors=True)
    summary = {}
    for name in ("untraced", "traced"):
        mine = [r for r in rows if r["cache"] == name]
        summary[name] = {state: {k: statistics.median(r[state][k] for r in mine)
                                 for k in ("seconds", "daemon_cpu_seconds")}
                         for state in ("warm_disk", "hot")}
    summary["traced_over_untraced_warm_disk"] = [
        round(t["warm_disk"]["seconds"] / u["warm_disk"]["seconds"], 3)
        for u, t in zip(rows[::2], rows[1::2])]
    write_result(summary, rows, args.output, workload=args.workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
