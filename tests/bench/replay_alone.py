"""A trace replay with no launch beside it: how fast the daemon fetches the W1
trace when nothing else asks it for anything (what bounds lazy-cold-trace-kept).

    .venv/bin/python tests/bench/replay_alone.py [--workdir DIR] [--runs N] [--config TOML ...]

As root, on the store run.py built in WORKDIR (default sizes), the bench's
link and its kept sshfs mount (contenders.Bench, lazy-cold-trace-kept's
trace, recorded first). Per run and mount configuration (the default, then
each --config, interleaved): a fresh cache seeded with the trace, sshfs's
caches expired, page cache dropped, mount, one stat of the variant root
(the first access: the replay starts), then the stats once the store
counters stop moving. The replay's own time comes from the daemon's log
lines; daemon CPU, and every other process's (the stack the replay drives:
sshfs, ssh, sshd, sftp-server, the relay), from /proc. Everything is torn
down.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launchtrace  # noqa: E402
import netstore  # noqa: E402
import profile_warm  # noqa: E402
from contenders import W1_VARIANT, Bench, LazyMount, drop_caches  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402

KEPT = "lazy-cold-trace-kept"


def print_hottest(raw: Path, top: int = 25) -> None:
    """The leaf frames py-spy saw most, and the frames of ours under them."""
    leaves, ours = collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            frames = stack.split(";")
            leaves[frames[-1].strip()] += int(count)
            for frame in set(frames):
                if "cachecore/" in frame or "fusefs/" in frame:
                    ours[frame.strip()] += int(count)
    total = sum(leaves.values()) or 1
    for title, counter in (("leaf frames", leaves), ("our frames (inclusive)", ours)):
        print(f"{title}, of {total} samples:")
        for frame, n in counter.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


def cpu_by_command() -> dict[int, tuple[str, int]]:
    """{pid: (command name, user + system clock ticks)} of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    head, _, rest = f.read().rpartition(b")")
            except OSError:
                continue  # gone
            fields = rest.split()
            out[int(entry.name)] = (head.split(b"(", 1)[1].decode(errors="replace"),
                                    int(fields[11]) + int(fields[12]))
    return out


def cpu_spent(before: dict, after: dict, daemon: int) -> dict[str, float]:
    """CPU seconds each command (the daemon by itself) spent between two
    cpu_by_command() snapshots, largest first: the rest of the stack a
    replay drives (sshfs, ssh, sshd, sftp-server, the relay)."""
    tick = os.sysconf("SC_CLK_TCK")
    spent = collections.Counter()
    for pid, (name, ticks) in after.items():
        # by pid: a kernel worker renames itself after the work it runs
        used = ticks - before.get(pid, (name, 0))[1]
        if used > 0:
            spent["rez-lazyfs daemon" if pid == daemon else name] += used / tick
    return {name: round(s, 2) for name, s in spent.most_common(8)}


def write_result(summary: dict, rows: list, output: Path | None, **fields) -> None:
    """Print an A/B script's summary; with `output`, write it there with its
    rows, the load and `fields` (JSON)."""
    print(json.dumps(summary, indent=1))
    if output:
        result = {**fields, "load": Path("/proc/loadavg").read_text().split()[:3],
                  "summary": summary, "rows": rows}
        output.write_text(json.dumps(result, indent=1) + "\n")


@contextlib.contextmanager
def bench_on(workdir: Path):
    """(Bench, store info) on the store run.py built in `workdir` (default
    sizes) behind the bench's link; everything torn down after."""
    store, info = ensure_store(workdir, Sizes(), log=print)
    info = {**info, "sizes": Sizes().__dict__}
    net = netstore.NetStore(store, workdir / "sshfs")
    bench = None
    try:
        net.start()
        bench = Bench(workdir, store, net, info, [], log=print)
        yield bench, info
    finally:
        if bench is not None:
            bench.close()
        net.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", action="append", default=[],
                    help="a mount config to compare with the default (repeat)")
    ap.add_argument("--code", action="append", default=[], type=Path,
                    help="a checkout whose cachecore/fusefs/mount the daemon runs instead, "
                         "interleaved with this one's (repeat)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the daemon with py-spy during each replay; print its hottest frames")
    args = ap.parse_args(argv)
    variants = ([("default", [], {})]
                + [(Path(c).name, [f"--config={c}"], {}) for c in args.config]
                + [(f"code:{c}", [], {"PYTHONPATH": str(c)}) for c in args.code])
    rows = []
    with bench_on(args.workdir) as (bench, _):
        trace = bench._ensure_trace(KEPT)
        for run in range(args.runs):
            for name, extra, env in variants:
                bench._unmount()
                bench._fresh(bench.trace_cache)
                kept = bench._trace_store(KEPT)
                launchtrace.seed(trace, kept, bench.trace_cache, extra)
                drop_caches()
                mount = bench._add_mount(LazyMount(bench.lazy_mp, kept, bench.trace_cache, extra,
                                                      env=env))
                before, cpu0 = mount.stats(), profile_warm.cpu_times(mount.pid)
                spy = raw = None
                if args.profile:
                    raw = args.workdir / f"replay-profile-{run}-{name}.txt"
                    spy = subprocess.Popen(
                        [str(profile_warm.ensure_py_spy(args.workdir)), "record", "--pid",
                         str(mount.pid), "--rate", "500", "--format", "raw", "--gil",
                         "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)  # attached
                procs0 = cpu_by_command()
                t0 = time.time()
                os.stat(mount.mountpoint / "main" / W1_VARIANT)
                after, _ = bench._settle(mount)
                stack_cpu = cpu_spent(procs0, cpu_by_command(), mount.pid)
                user, system = (b - a for a, b in zip(cpu0, profile_warm.cpu_times(mount.pid)))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                    print_hottest(raw)
                bench._unmount()
                bench._kept_used = time.monotonic()
                timing = launchtrace.replay_timing(bench.trace_cache / "logs" / "daemon.log", t0)
                row = {"run": run + 1, "config": name, "daemon_cpu_seconds": round(user + system, 2),
                       "daemon_user_seconds": round(user, 2),
                       "replay_width": launchtrace.replay_width(extra), **timing,
                       "cpu_seconds_by_command": stack_cpu,
                       **{k: after[k] - before[k] for k in ("replay_blocks", "replay_bytes",
                                                            "store_reads", "store_listings")}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for name, _, _ in variants:
        mine = [r for r in rows if r["config"] == name and r.get("replay_end_s") is not None]
        if mine:
            summary[name] = {k: statistics.median(r[k] for r in mine)
                             for k in ("replay_start_s", "replay_end_s", "daemon_cpu_seconds",
                                       "replay_blocks")}
    print(json.dumps({"load": Path("/proc/loadavg").read_text().split()[:3], "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
