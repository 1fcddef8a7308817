"""pyfuse3's own cost per request, next to rez-lazyfs's (issue 16, item 1).

    .venv/bin/python tests/bench/floor.py [--files 3000] [--rounds 5]

A file system that does nothing (one directory of FILES empty files, attributes made
once, entry and attribute timeouts 0 so that every stat(2) is a LOOKUP) on the same
pyfuse3 and trio as the daemon, in a process of its own; a client stats every file,
ROUNDS times. The file system's CPU time (user, system) over the requests it served is
the floor of a request on this machine now: the kernel's round trip, pyfuse3's request
loop and trio, no handler work. Run next to profile_warm.py to tell rez-lazyfs's own
share of a request from the floor's (both move with the machine's load).
Writes tests/bench/results/floor.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve(mountpoint: str, files: int) -> None:
    """The file system (the child process)."""
    import pyfuse3
    import trio

    names = {b"f%05d" % i: pyfuse3.ROOT_INODE + 1 + i for i in range(files)}

    def entry(inode: int, mode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink = inode, mode, 1
        e.entry_timeout = e.attr_timeout = 0.0
        return e

    entries = {inode: entry(inode, stat.S_IFREG | 0o444) for inode in names.values()}
    root = entry(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o555)
    served = [0]

    class Nothing(pyfuse3.Operations):
        async def lookup(self, parent_inode, name, ctx=None):
            served[0] += 1
            inode = names.get(name)
            if parent_inode != pyfuse3.ROOT_INODE or inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return entries[inode]

        async def getattr(self, inode, ctx=None):
            served[0] += 1
            return root if inode == pyfuse3.ROOT_INODE else entries[inode]

        async def getxattr(self, inode, name, ctx=None):
            return str(served[0]).encode()

    pyfuse3.init(Nothing(), mountpoint, set(pyfuse3.default_options) | {"fsname=floor", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--serve", nargs=2, metavar=("MOUNTPOINT", "FILES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    mountpoint = tempfile.mkdtemp(prefix="floor-")
    child = subprocess.Popen([sys.executable, __file__, "--serve", mountpoint, str(args.files)])
    runs = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline and child.poll() is None, "no mount"
            time.sleep(0.05)
        paths = [os.path.join(mountpoint, "f%05d" % i) for i in range(args.files)]
        for _ in range(args.rounds):
            served0 = int(os.getxattr(mountpoint, "user.served"))
            (u0, s0), t0 = cpu(child.pid), time.perf_counter()
            for p in paths:
                os.stat(p)
            (u1, s1), seconds = cpu(child.pid), time.perf_counter() - t0
            requests = int(os.getxattr(mountpoint, "user.served")) - served0
            runs.append({"requests": requests, "seconds": round(seconds, 3),
                         "user_us": round((u1 - u0) / requests * 1e6, 1),
                         "system_us": round((s1 - s0) / requests * 1e6, 1),
                         "round_trip_us": round(seconds / requests * 1e6, 1)})
            print(runs[-1], flush=True)
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        child.wait(timeout=30)
        os.rmdir(mountpoint)
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2]
           for k in ("user_us", "system_us", "round_trip_us")}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "load": open("/proc/loadavg").read().split()[:3], "files": args.files,
              "runs": runs, "median": med}
    out = HERE / "results"
    (out / "floor.json").write_text(json.dumps(report, indent=2))
    (out / "floor.md").write_text(
        "# pyfuse3's floor per request\n\n"
        f"`tests/bench/floor.py --files {args.files} --rounds {args.rounds}`, {report['date']}, "
        f"load {' '.join(report['load'])}: a file system that does nothing, one LOOKUP per "
        f"stat(2). Medians of {len(runs)} rounds of {args.files} requests: daemon CPU "
        f"{med['user_us']:.0f} us user + {med['system_us']:.0f} us system a request, round "
        f"trip {med['round_trip_us']:.0f} us.\n")
    print(med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
