"""Where a warm launch's daemon CPU goes, per FUSE handler (issue 16, item 1).

    .venv/bin/python tests/bench/profile_warm.py [--quick] [--runs 3] [--mount-option ARG]

The W1 launch of tests/bench (workloads.py; the store generated in WORKDIR as run.py
does, --quick: its 1/10 sizes) from a rez-lazyfs mount of the local store (no network:
the cache is warm, so the store is not read), remounted with the page cache dropped
before each run (warm-disk). py-spy (installed into WORKDIR/pydeps) samples the daemon
while the launch runs, only the thread holding the GIL (Python and Cython at work, not
waiting on a disk or for requests); each sample is put to the handler of
fusefs/operations.py it is in (the outermost), else to what the event loop thread runs
between handlers (trio, pyfuse3's request loop: Cython, no Python frames of its own),
else to the worker threads' work. The daemon's user CPU time (from /proc) is shared out
in proportion to the samples, over the requests per handler (the stats xattr); system
time (the kernel's side of requests, replies and cache-disk reads) is given apart.
With --perf, perf(1) samples the daemon as well (every thread, user and kernel): the
daemon's CPU by object (the kernel, libpython, pyfuse3, blake3, ...) and its hottest
symbols, which the Python view cannot split (a syscall made holding the GIL counts as
the Python frame that made it).
Writes tests/bench/results/NAME.{json,md} (profile-warm, profile-warm-quick).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import W1_VARIANT, LazyMount, drop_caches, run_w1  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402

PY_SPY_VERSION = "0.4.3"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_py_spy(workdir: Path) -> Path:
    deps = workdir / "pydeps"
    binary = deps / "bin" / "py-spy"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps),
                        f"py-spy=={PY_SPY_VERSION}"], check=True)
    return binary


def cpu_times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def where(stack: list[tuple[str, str]], handlers: set[str]) -> tuple[str, str]:
    """(the bucket a sample counts for, its leaf frame)."""
    leaf = f"{stack[-1][0]} ({stack[-1][1]})" if stack else "?"
    for function, file in stack:  # py-spy names methods Class.method
        if file.endswith("fusefs/operations.py") and function.rpartition(".")[2] in handlers:
            return function.rpartition(".")[2], leaf
    files = [file for _, file in stack]
    if any("trio/_threads.py" in f for f in files):
        return "worker threads (store, cache disk, index)", leaf
    if any("trio/" in f for f in files):
        return "event loop between handlers (trio; pyfuse3's loop is C)", leaf
    return "other", leaf


def parse(raw: Path, handlers: set[str]) -> tuple[collections.Counter, dict]:
    buckets: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack = []
        for part in stack_text.split(";"):
            m = FRAME.match(part.strip())
            if m:
                stack.append((m["function"], m["file"]))
        bucket, leaf = where(stack, handlers)
        buckets[bucket] += int(count)
        leaves[bucket][leaf] += int(count)
    return buckets, leaves


def perf_split(files: list[Path]) -> tuple[list, list]:
    """([(object, share)], [(symbol, object, share)]) over the perf.data files."""
    objects: collections.Counter = collections.Counter()
    symbols: collections.Counter = collections.Counter()
    for data in files:
        out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                              "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.05"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$", line)
            if m:
                share, obj, sym = float(m[1]) / 100 / len(files), m[2], m[3].strip()
                objects[obj] += share
                symbols[(sym, obj)] += share
    return (objects.most_common(), [(s, o, v) for (s, o), v in symbols.most_common(40)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second [1000]")
    ap.add_argument("--mount-option", action="append", default=[], metavar="ARG")
    ap.add_argument("--perf", action="store_true", help="also sample with perf(1)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-warmfuse/full"))
    ap.add_argument("--output", help="results name [profile-warm, profile-warm-quick]")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("profile_warm.py needs root (drop_caches, FUSE, ptrace)", file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    py_spy = ensure_py_spy(workdir)
    sizes = Sizes.quick() if args.quick else Sizes()
    store, info = ensure_store(workdir, sizes, log=log)
    cache = workdir / "profile-cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)

    from fusefs.operations import LazyOperations
    handlers = {name for name in vars(LazyOperations) if not name.startswith("_")}

    def mounted() -> LazyMount:
        m = LazyMount(workdir / "profile-mnt", store, cache, args.mount_option)
        m.mount()
        return m

    m = mounted()
    try:
        run_w1(m.mountpoint / "main" / W1_VARIANT, info)  # fills the cache
    finally:
        m.umount()
    total: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    requests: collections.Counter = collections.Counter()
    runs = []
    for n in range(args.runs):
        drop_caches()
        m = mounted()
        raw = workdir / f"profile-{n}.txt"
        try:
            before = m.stats()["requests"]
            user0, sys0 = cpu_times(m.pid)
            spy = subprocess.Popen([str(py_spy), "record", "--pid", str(m.pid), "--rate",
                                    str(args.rate), "--format", "raw", "--gil",
                                    "--threads", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            perf = None
            if args.perf:
                perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(m.pid),
                                         "-o", str(workdir / f"perf-{n}.data")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            seconds = run_w1(m.mountpoint / "main" / W1_VARIANT, info)["seconds"]
            user1, sys1 = cpu_times(m.pid)
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=120)
            after = m.stats()["requests"]
        finally:
            m.umount()
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        delta.pop("getxattr", None)  # the stats xattr itself
        requests.update(delta)
        buckets, run_leaves = parse(raw, handlers)
        total.update(buckets)
        for b, c in run_leaves.items():
            leaves[b].update(c)
        runs.append({"seconds": seconds, "user_seconds": round(user1 - user0, 3),
                     "system_seconds": round(sys1 - sys0, 3), "requests": delta,
                     "samples": dict(buckets)})
        log(f"run {n + 1}: {seconds:.2f} s, daemon user {user1 - user0:.2f} s system "
            f"{sys1 - sys0:.2f} s, {sum(delta.values())} requests, {sum(buckets.values())} samples")

    cpu = sum(r["user_seconds"] + r["system_seconds"] for r in runs)
    user = sum(r["user_seconds"] for r in runs)
    samples = sum(total.values())
    rows = []
    for bucket, count in total.most_common():
        seconds = user * count / samples if samples else 0.0
        n = requests.get(bucket, 0)
        rows.append({"where": bucket, "samples": count, "share": round(count / samples, 4),
                     "cpu_seconds": round(seconds, 3), "requests": n,
                     "us_per_request": round(seconds / n * 1e6, 1) if n else None,
                     "top_leaves": [[leaf, c] for leaf, c in leaves[bucket].most_common(8)]})
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "runs": runs, "mount_options": args.mount_option,
              "kernel": platform.release(), "load": open("/proc/loadavg").read().split()[:3],
              "requests": dict(requests), "daemon_cpu_seconds": round(cpu, 3),
              "samples": samples, "rows": rows}
    name = args.output or ("profile-warm-quick" if args.quick else "profile-warm")
    out = HERE / "results"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    n_req = sum(requests.values())
    lines = ["# Daemon CPU of a warm W1 launch, per handler", "",
             f"`tests/bench/profile_warm.py{' --quick' if args.quick else ''} --runs {args.runs}"
             + "".join(f" --mount-option={o}" for o in args.mount_option) + f"`, "
             f"{report['date']}, load {' '.join(report['load'])}: {len(runs)} warm-disk "
             f"launches, {n_req:,} requests, daemon CPU {cpu:.2f} s (user "
             f"{sum(r['user_seconds'] for r in runs):.2f}, system "
             f"{sum(r['system_seconds'] for r in runs):.2f}): {cpu / n_req * 1e6:.0f} us a "
             f"request; {samples:,} py-spy samples of the thread holding the GIL, the user "
             "time shared out in proportion.", "",
             "| where | share | user CPU | requests | user us/request | hottest frames (samples) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        us = f"{r['us_per_request']:.0f}" if r["us_per_request"] else "-"
        top = "; ".join(f"{leaf} {c}" for leaf, c in r["top_leaves"][:4])
        lines.append(f"| {r['where']} | {r['share']:.1%} | {r['cpu_seconds']:.2f} s | "
                     f"{r['requests']:,} | {us} | {top} |")
    if args.perf:
        objects, symbols = perf_split([workdir / f"perf-{n}.data" for n in range(args.runs)])
        report["perf"] = {"objects": objects, "symbols": symbols}
        (out / f"{name}.json").write_text(json.dumps(report, indent=2))
        lines += ["", "perf, every thread of the daemon, user and kernel (share of its samples):",
                  "", "| object | share |", "|---|---|"]
        lines += [f"| {o} | {share:.1%} |" for o, share in objects[:10]]
        lines += ["", "| hottest symbols | object | share |", "|---|---|---|"]
        lines += [f"| `{sym}` | {o} | {share:.1%} |" for sym, o, share in symbols[:25]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
