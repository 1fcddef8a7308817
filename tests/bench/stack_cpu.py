"""Where the CPU of a contender's run goes, process by process: the daemon or
peer, and the stack it drives (sshfs, ssh, sshd, sftp-server, the bench's
relay), for the runs where the two cores, not the link, are the limit.

    .venv/bin/python tests/bench/stack_cpu.py --workload W2 --contenders lazy-cold,rclone-cold [--runs 2]

As root, on the store run.py built in WORKDIR (default sizes), through the
bench's link (contenders.Bench: each run exactly as run.py runs it). Every
process is sampled from /proc every 0.1 s during the run, so processes that
start and end inside it (the daemon, rclone, the sftp-server of its
session) count too, all but their last tenth of a second.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from replay_alone import bench_on, cpu_by_command  # noqa: E402


class Sampler:
    """CPU seconds per command name of every process seen between start and stop."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.first: dict[int, tuple[str, int]] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.first = cpu_by_command()
        self.last = dict(self.first)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.last.update(cpu_by_command())
        self.last.update(cpu_by_command())

    def spent(self, top: int = 10) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        spent = collections.Counter()
        for pid, (name, ticks) in self.last.items():
            used = ticks - self.first.get(pid, (name, 0))[1]  # by pid: kernel workers rename
            if used > 0 and pid != os.getpid():
                spent[name] += used / tick
        return {name: round(s, 2) for name, s in spent.most_common(top)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--contenders", default="lazy-cold,rclone-cold")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--output", type=Path, help="write the rows here (JSON)")
    args = ap.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    rows = []
    with bench_on(args.workdir) as (bench, _):
        for run in range(args.runs):
            for contender in contenders:
                with Sampler() as sampler:
                    out = bench.run(args.workload, contender)
                row = {"run": run + 1, "workload": args.workload, "contender": contender,
                       "seconds": round(out["seconds"], 3),
                       "network": out.get("network"), "cpu_seconds_by_command": sampler.spent()}
                rows.append(row)
                print(json.dumps(row), flush=True)
        bench.end_workload()
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv[1:]),
                                           "load": open("/proc/loadavg").read().split()[:3],
                                           "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
