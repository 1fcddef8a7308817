"""What a trace replay outside the daemon's interpreter would be worth: the
W1 launch on a warm mount while a second daemon, its own process, replays the
W1 trace into a cache of its own (the same store, link and CPU), against the
launch with the replay in its own daemon (lazy-cold-trace-kept) and the warm
launch alone.

    .venv/bin/python tests/bench/replay_apart.py [--workdir DIR] [--rounds N]

As root, on the store run.py built in WORKDIR (default sizes) and its kept
sshfs mount (contenders.Bench, lazy-cold-trace-kept's trace). Per round, in
turn: "traced" (a fresh cache seeded with the trace, the launch on its mount:
the replay shares the daemon's interpreter, its GIL, with the requests of the
launch); "warm" (the launch on a warm cache, page cache dropped); "warm +
replay apart" (the same, while another mount's daemon replays the trace into
a fresh cache: the same replay work on the same two cores, in another
process). The store's caches expire before each replay (sshfs's timeout), the
page cache is dropped before each launch. If "warm + replay apart" is close to
"warm", what the traced launch loses over warm is the sharing of one
interpreter, and moving the replay's store reads and cache writes out of it
(a helper process, or a batch reader in C) is the lever; if it is close to
"traced", the two cores are the limit.
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
from contenders import W1_VARIANT, LazyMount, drop_caches, run_w1  # noqa: E402
from replay_alone import KEPT, bench_on, cpu_by_command, cpu_spent  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", type=Path, help="write the rows and medians here (JSON)")
    args = ap.parse_args(argv)
    replayer_mp = args.workdir / "lazy-replayer"
    rows = []
    load = [open("/proc/loadavg").read().split()[:3]]
    with bench_on(args.workdir) as (bench, info):
        trace = bench._ensure_trace(KEPT)

        def seeded_cache() -> Path:
            bench._fresh(bench.trace_cache)
            kept = bench._trace_store(KEPT)  # its caches expired
            launchtrace.seed(trace, kept, bench.trace_cache, [])
            return kept

        def launch(mount: LazyMount) -> tuple[float, dict]:
            before = cpu_by_command()
            seconds = run_w1(mount.repo_root / W1_VARIANT, info)["seconds"]
            return seconds, cpu_spent(before, cpu_by_command(), mount.pid)

        # the warm cache: one cold launch through the kept store fills it
        bench._unmount()
        bench._fresh(bench.cache)
        warm = bench._add_mount(LazyMount(bench.lazy_mp, seeded_cache(), bench.cache, []))
        run_w1(warm.repo_root / W1_VARIANT, info)
        bench._settle(warm)
        bench._unmount()
        bench._kept_used = time.monotonic()

        for n in range(args.rounds):
            for config in ("traced", "warm", "warm + replay apart"):
                bench._unmount()
                if config == "traced":
                    kept = seeded_cache()
                    drop_caches()
                    mount = bench._add_mount(LazyMount(bench.lazy_mp, kept, bench.trace_cache, []))
                    seconds, cpu = launch(mount)
                    bench._settle(mount)
                elif config == "warm":
                    drop_caches()
                    mount = bench._add_mount(LazyMount(bench.lazy_mp, bench.kept_sshfs, bench.cache, []))
                    seconds, cpu = launch(mount)
                else:
                    kept = seeded_cache()
                    replayer = bench._add_mount(LazyMount(replayer_mp, kept, bench.trace_cache, []))
                    mount = bench._add_mount(LazyMount(bench.lazy_mp, bench.kept_sshfs, bench.cache, []))
                    drop_caches()
                    os.stat(replayer.repo_root / W1_VARIANT)  # the first access: the replay starts
                    seconds, cpu = launch(mount)
                    replayed = bench._settle(replayer)[0]["replay_blocks"]
                bench._unmount()
                bench._kept_used = time.monotonic()
                row = {"round": n + 1, "config": config, "seconds": round(seconds, 3),
                       "cpu_seconds_by_command": cpu}
                if config == "warm + replay apart":
                    row["replayed_blocks"] = replayed
                rows.append(row)
                print(json.dumps(row), flush=True)
    load.append(open("/proc/loadavg").read().split()[:3])
    medians = {c: statistics.median(r["seconds"] for r in rows if r["config"] == c)
               for c in ("traced", "warm", "warm + replay apart") if any(r["config"] == c for r in rows)}
    summary = {"load_start_end": load, "median_seconds": medians}
    print(json.dumps(summary))
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, **summary},
                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
