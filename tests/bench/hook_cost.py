"""What handler_cpu/ (the timing hook of profile_warm.py) costs the daemon itself.

    .venv/bin/python tests/bench/hook_cost.py [--quick] [--rounds 6]

A warm W1 launch (profile_warm.py's set-up, the cache files' pages kept across the
remounts, so the cache disk stays out of it) with the hook and without, in an order that
turns each round; the daemon's CPU (from /proc) over the requests its handlers counted.
Writes tests/bench/results/NAME.{json,md} (--output; default hook-cost).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import W1_VARIANT, LazyMount, run_w1  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-reqcost/full"))
    ap.add_argument("--output", default="hook-cost")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    store, info = ensure_store(workdir, Sizes.quick() if args.quick else Sizes())
    cache, spent_dir = workdir / "hook-cost-cache", workdir / "hook-cost"
    subprocess.run(["rm", "-rf", str(cache)], check=True)

    def launch(env: dict) -> float:
        """us of daemon CPU a request."""
        m = LazyMount(workdir / "hook-cost-mnt", store, cache, [], env=env)
        m.mount()
        try:
            before, cpu = m.stats()["requests"], m.cpu_seconds()
            run_w1(m.mountpoint / "main" / W1_VARIANT, info)
            cpu, after = m.cpu_seconds() - cpu, m.stats()["requests"]
        finally:
            m.umount()
        return cpu / sum(after[k] - before.get(k, 0) for k in after if k != "getxattr") * 1e6

    launch({})  # fills the cache
    kinds = {"plain": {}, "hook": {"REZ_LAZYFS_HANDLER_CPU": str(spent_dir),
                                   "PYTHONPATH": str(HERE / "handler_cpu")}}
    got: dict[str, list[float]] = {k: [] for k in kinds}
    for n in range(args.rounds):
        for kind in (list(kinds) if n % 2 == 0 else list(kinds)[::-1]):
            subprocess.run(["rm", "-rf", str(spent_dir)], check=True)
            spent_dir.mkdir()
            got[kind].append(round(launch(kinds[kind]), 1))
        print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]} us" for k, v in got.items()),
              file=sys.stderr)
    median = {k: statistics.median(v) for k, v in got.items()}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "load": open("/proc/loadavg").read().split()[:3], "us_per_request": got,
              "median": median}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.output}.md").write_text(
        "# What the timing hook costs the daemon\n\n"
        f"`tests/bench/hook_cost.py{' --quick' if args.quick else ''} --rounds {args.rounds}`, "
        f"{report['date']}, load {' '.join(report['load'])}: warm W1 launches, the cache files' "
        "pages kept, daemon CPU a request: without the hook "
        f"{median['plain']:.0f} us {got['plain']}, with it {median['hook']:.0f} us "
        f"{got['hook']} (medians of {args.rounds}, in turn).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
