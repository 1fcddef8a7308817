"""pyfuse3's own cost per request, next to rez-lazyfs's (issue 16, item 1).

    .venv/bin/python tests/bench/floor.py [--files 3000] [--rounds 5] [--read-kib 128]

A file system that does nothing, on the same pyfuse3 and trio as the daemon, in a
process of its own: one directory of FILES empty files, attributes made once, entry and
attribute timeouts 0, so that every stat(2) is a LOOKUP (and a GETATTR); and, unless
--read-kib 0, as many files of READ_KIB KiB per round, new names each round, which a
client opens and reads whole (a LOOKUP and one READ each: no open requests, as with
the daemon's patched pyfuse3; the reply is one bytes object made once). The file
system's CPU time (user, system) over the requests it served is the floor of a
request on this machine now: the kernel's round trip, pyfuse3's request loop and
trio, no handler work; a READ's floor also holds the kernel copying the reply into
the page cache. Run next to profile_warm.py to tell rez-lazyfs's own share of a
request from the floor's (both move with the machine's load).
--gap-us: the client works that long between two files, as a launch does between its
requests (the daemon's caches cool down, it sleeps and is woken for each). Writes
tests/bench/results/NAME.{json,md} (--output; default floor).
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve(mountpoint: str, files: int, rounds: int, read_size: int) -> None:
    """The file system (the child process)."""
    import collections

    import pyfuse3
    import trio

    names = {b"f%05d" % i: pyfuse3.ROOT_INODE + 1 + i for i in range(files)}
    for r in range(rounds if read_size else 0):
        names.update({b"r%d-%05d" % (r, i): pyfuse3.ROOT_INODE + 1 + files * (1 + r) + i
                      for i in range(files)})

    def entry(inode: int, mode: int, size: int = 0) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink, e.st_size = inode, mode, 1, size
        e.entry_timeout = e.attr_timeout = 0.0
        return e

    entries = {inode: entry(inode, stat.S_IFREG | 0o444, read_size if name[:1] == b"r" else 0)
               for name, inode in names.items()}
    root = entry(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o555)
    data = b"x" * read_size
    served: collections.Counter = collections.Counter()

    class Nothing(pyfuse3.Operations):
        no_open = True  # as the daemon with the patched pyfuse3: READ gets the inode

        async def lookup(self, parent_inode, name, ctx=None):
            served["lookup"] += 1
            inode = names.get(name)
            if parent_inode != pyfuse3.ROOT_INODE or inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return entries[inode]

        async def getattr(self, inode, ctx=None):
            served["getattr"] += 1
            return root if inode == pyfuse3.ROOT_INODE else entries[inode]

        async def open(self, inode, flags, ctx=None):  # a stock pyfuse3 asks
            served["open"] += 1
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, off, size, ctx=None):
            served["read"] += 1
            return data[off:off + size] if off or size < len(data) else data

        async def getxattr(self, inode, name, ctx=None):
            return json.dumps(served).encode()

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
    ap.add_argument("--read-kib", type=int, default=128, help="KiB per file read [128; 0: none]")
    ap.add_argument("--gap-us", type=int, default=0,
                    help="the client's own work between two files, us (a launch unmarshals "
                         "what it read: the daemon's caches cool down meanwhile) [0]")
    ap.add_argument("--output", default="floor", help="results name [floor]")
    ap.add_argument("--serve", nargs=4, metavar=("MOUNTPOINT", "FILES", "ROUNDS", "BYTES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], *map(int, args.serve[1:]))
        return 0
    read_size = args.read_kib * 1024
    gap = args.gap_us / 1e6
    mountpoint = tempfile.mkdtemp(prefix="floor-")
    child = subprocess.Popen([sys.executable, __file__, "--serve", mountpoint, str(args.files),
                              str(args.rounds), str(read_size)])

    def served() -> dict:
        return json.loads(os.getxattr(mountpoint, "user.served"))

    def measured(paths: list[str], client) -> dict:
        before = served()
        (u0, s0), t0 = cpu(child.pid), time.perf_counter()
        for p in paths:
            client(p)
            busy_until = time.perf_counter() + gap
            while time.perf_counter() < busy_until:
                pass
        (u1, s1), seconds = cpu(child.pid), time.perf_counter() - t0
        after = served()
        kinds = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        return {"requests": kinds, "seconds": round(seconds, 3),
                "user_s": round(u1 - u0, 3), "system_s": round(s1 - s0, 3)}

    def read_whole(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert len(os.read(fd, read_size)) == read_size
        finally:
            os.close(fd)

    runs = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline and child.poll() is None, "no mount"
            time.sleep(0.05)
        for r in range(args.rounds):
            run = {"stat": measured([os.path.join(mountpoint, "f%05d" % i)
                                     for i in range(args.files)], os.stat)}
            n = sum(run["stat"]["requests"].values())
            lookup_us = (run["stat"]["user_s"] + run["stat"]["system_s"]) / n * 1e6
            run["stat"].update(user_us=round(run["stat"]["user_s"] / n * 1e6, 1),
                               system_us=round(run["stat"]["system_s"] / n * 1e6, 1),
                               round_trip_us=round(run["stat"]["seconds"] / n * 1e6, 1))
            if read_size:
                run["read"] = measured([os.path.join(mountpoint, "r%d-%05d" % (r, i))
                                        for i in range(args.files)], read_whole)
                # each READ: the round's CPU less its other requests at the stat floor
                got = run["read"]["requests"]
                others = sum(got.values()) - got.get("read", 0)
                cpu_s = run["read"]["user_s"] + run["read"]["system_s"]
                run["read"]["read_us"] = round((cpu_s * 1e6 - others * lookup_us)
                                               / got["read"], 1)
            runs.append(run)
            print(run, flush=True)
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        child.wait(timeout=30)
        os.rmdir(mountpoint)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in runs)

    med = {k: median("stat", k) for k in ("user_us", "system_us", "round_trip_us")}
    if read_size:
        med["read_us"] = median("read", "read_us")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "load": open("/proc/loadavg").read().split()[:3], "files": args.files,
              "read_kib": args.read_kib, "gap_us": args.gap_us, "runs": runs, "median": med}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    reads = (f" A READ of {args.read_kib} KiB (a file opened and read whole, new names each "
             f"round: a LOOKUP and a READ each, the LOOKUP counted at the floor above): "
             f"{med['read_us']:.0f} us of daemon CPU.") if read_size else ""
    (out / f"{args.output}.md").write_text(
        "# pyfuse3's floor per request\n\n"
        f"`tests/bench/floor.py --files {args.files} --rounds {args.rounds} --read-kib "
        f"{args.read_kib} --gap-us {args.gap_us}`, {report['date']}, load "
        f"{' '.join(report['load'])}: a file system that does nothing, one LOOKUP (and GETATTR) "
        f"per stat(2)"
        + (f", the client busy for {args.gap_us} us between two files" if args.gap_us else "")
        + f". Medians of {len(runs)} "
        f"rounds of {args.files} files: daemon CPU {med['user_us']:.0f} us user + "
        f"{med['system_us']:.0f} us system a request, round trip "
        f"{med['round_trip_us']:.0f} us.{reads}\n")
    print(med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
