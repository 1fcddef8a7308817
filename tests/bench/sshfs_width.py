"""How the bench's sshfs store answers reads in parallel: what a trace replay
(8 or 16 fetches at a time) could get from it at best.

    .venv/bin/python tests/bench/sshfs_width.py [--workdir DIR] [--files N] [--rounds R]

As root, on the store run.py built in WORKDIR (default sizes): the same link
as the bench (netstore.NetStore: sshd in a namespace, tbf, the delaying
relay, sshfs). Per round and width (1, 8, 16, 32 threads): sshfs remounted,
page cache dropped, the directories of N distinct .pyc files listed first
(as rez-lazyfs lists before it reads), then every file opened, fstat'ed,
read (up to one 128K block) and closed, by that many threads. Prints one
line per measurement and a JSON summary; everything is torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netstore  # noqa: E402
from contenders import drop_caches  # noqa: E402

WIDTHS = (1, 8, 16, 32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    store = args.workdir / "store"
    pycs = sorted(p.relative_to(store) for p in (store / "dcc/1.0.0/python").rglob("*.pyc"))
    net = netstore.NetStore(store, args.workdir / "sshfs-width")
    rows = []

    def read(rel):
        fd = os.open(net.mountpoint / rel, os.O_RDONLY)
        try:
            os.fstat(fd)
            return len(os.pread(fd, 131072, 0))
        finally:
            os.close(fd)

    try:
        net.start()
        n = args.files
        for rnd in range(args.rounds):
            for k, width in enumerate(WIDTHS):
                start = (k * n + rnd * len(WIDTHS) * n) % len(pycs)
                files = (pycs[start:] + pycs[:start])[:n]
                net.remount()
                drop_caches()
                for d in sorted({f.parent for f in files}):
                    os.listdir(net.mountpoint / d)
                before = net.counters()
                cpu = time.process_time()
                t = time.perf_counter()
                if width == 1:
                    for f in files:
                        read(f)
                else:
                    with ThreadPoolExecutor(width) as ex:
                        list(ex.map(read, files))
                seconds = time.perf_counter() - t
                cpu = time.process_time() - cpu
                d = net.delta(before, net.counters())
                rows.append({"round": rnd, "width": width, "files": n, "seconds": seconds,
                             "cpu_seconds": cpu, "sftp_requests": d["sftp_requests"]})
                print(f"round {rnd} width {width:2d}: {n} files in {seconds:.3f} s = "
                      f"{seconds / n * 1000:.2f} ms/file, CPU {cpu / n * 1000:.2f} ms/file, "
                      f"{d['sftp_requests']} SFTP requests", flush=True)
    finally:
        net.close()
    print(json.dumps({"load": open("/proc/loadavg").read().split()[:3], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
