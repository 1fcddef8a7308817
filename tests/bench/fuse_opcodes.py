"""What the kernel sends a mount during a warm W1 launch, by opcode, next to what the
daemon's handlers count (issue 16, item 1).

    .venv/bin/python tests/bench/fuse_opcodes.py [--quick] [--runs 1]

The kernel's own record: the fuse:fuse_request_send tracepoint (perf record -a, the
mount's connection only: the device number of its root), during the launch of
profile_warm.py's set-up (the store generated in WORKDIR, a cache filled by a cold run,
remounted, page cache dropped). The daemon's: its stats xattr. Requests that libfuse
answers without asking pyfuse3 (an opcode no handler exists for: ENOSYS) show in the
first only.
Writes tests/bench/results/NAME.{json,md} (--output; default fuse-opcodes).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import CLI, W1_VARIANT, LazyMount, drop_caches, run_w1  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402

SEND = re.compile(r"connection (\d+) req \d+ opcode \d+ \((\w+)\)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--cli", default=CLI, help="the rez-lazyfs command [this one's]")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-reqcost/full"))
    ap.add_argument("--output", default="fuse-opcodes")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("fuse_opcodes.py needs root (perf's tracepoints, drop_caches, FUSE)",
              file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    store, info = ensure_store(workdir, Sizes.quick() if args.quick else Sizes())
    cache = workdir / "opcodes-cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    m = LazyMount(workdir / "opcodes-mnt", store, cache, [], cli=args.cli)
    m.mount()
    try:
        run_w1(m.mountpoint / "main" / W1_VARIANT, info)  # fills the cache
    finally:
        m.umount()
    runs = []
    for n in range(args.runs):
        drop_caches()
        m = LazyMount(workdir / "opcodes-mnt", store, cache, [], cli=args.cli)
        m.mount()
        data = workdir / f"opcodes-{n}.data"
        try:
            connection = os.stat(m.mountpoint).st_dev
            before = m.stats()["requests"]
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "fuse:fuse_request_send",
                                     "-a", "-o", str(data)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # recording
            run_w1(m.mountpoint / "main" / W1_VARIANT, info)
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
            after = m.stats()["requests"]
        finally:
            m.umount()
        sent: collections.Counter = collections.Counter()
        script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True,
                                text=True).stdout
        for line in script.splitlines():
            match = SEND.search(line)
            if match and int(match[1]) == connection:
                sent[match[2]] += 1
        handled = {k: after[k] - before.get(k, 0) for k in after
                   if k != "getxattr" and after[k] != before.get(k, 0)}
        sent.pop("FUSE_GETXATTR", None)  # the stats xattr's own
        runs.append({"kernel_sent": dict(sent.most_common()), "handlers_counted": handled})
        print(runs[-1], file=sys.stderr)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "cli": args.cli,
              "load": open("/proc/loadavg").read().split()[:3], "runs": runs}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    last = runs[-1]
    lines = ["# What the kernel sends a mount during a warm W1 launch", "",
             f"`tests/bench/fuse_opcodes.py{' --quick' if args.quick else ''} --runs "
             f"{args.runs}`, {report['date']}, load {' '.join(report['load'])}: the "
             "fuse:fuse_request_send tracepoint on the mount's connection during a warm-disk "
             "launch, next to what the daemon's handlers counted (its stats xattr; the "
             "stats xattr's own getxattrs left out of both).", "",
             "| opcode | the kernel sent | the handlers counted |", "|---|---|---|"]
    for opcode, count in last["kernel_sent"].items():
        handler = opcode.removeprefix("FUSE_").lower().replace("readdirplus", "readdir")
        lines.append(f"| {opcode} | {count:,} | {last['handlers_counted'].get(handler, 0):,} |")
    lines += ["", f"In all: {sum(last['kernel_sent'].values()):,} requests sent, "
              f"{sum(last['handlers_counted'].values()):,} counted by the handlers."]
    (out / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / args.output}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
