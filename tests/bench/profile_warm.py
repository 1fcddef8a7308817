"""Where a warm launch's daemon CPU goes, per FUSE handler (issue 16, item 1).

    .venv/bin/python tests/bench/profile_warm.py [--quick] [--runs 3] [--mount-option ARG]

The W1 launch of tests/bench (workloads.py; the store generated in WORKDIR as run.py
does, --quick: its 1/10 sizes) from a rez-lazyfs mount of the local store (no network:
the cache is warm, so the store is not read), remounted with the page cache dropped
before each run (warm-disk).

Two views of the daemon per run. Measured: handler_cpu/sitecustomize.py, put on the
daemon's PYTHONPATH, takes the CPU time (user + system) of every request inside each
handler of fusefs/operations.py (its own trio task only, so a handler that awaits is
not charged for requests served meanwhile); the daemon's CPU (from /proc, every
thread) minus the handlers' is what pyfuse3's request loop, trio, the kernel's side of
receiving requests and sending replies, and the worker threads cost (floor.py measures
that floor alone). Per handler: requests, CPU per request (mean and its distribution).
Sampled: py-spy (installed into WORKDIR/pydeps; --nonblocking: it never pauses the
daemon) samples the thread holding the GIL; each sample is put to the handler it is in
(the outermost frame of fusefs/operations.py), which names the hottest frames inside
each handler. With --perf, perf(1) samples the daemon as well (every thread, user and
kernel): the daemon's CPU by object (the kernel, libpython, pyfuse3, blake3, ...) and
its hottest symbols, which the Python view cannot split.
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
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE / "handler_cpu"))

from contenders import CLI, W1_VARIANT, LazyMount, drop_caches, run_w1  # noqa: E402
from handler_timing import distribution  # noqa: E402
from workloads import Sizes, ensure_store  # noqa: E402

PY_SPY_VERSION = "0.4.3"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_py_spy(workdir: Path) -> Path:
    # its own target: pip puts nothing into a --target whose bin/ exists already
    deps = workdir / f"py-spy-{PY_SPY_VERSION}"
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


def loop_thread_seconds(pid: int) -> float:
    """CPU time (user + system) of the daemon's main thread, the event loop's."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


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


def profiled_run(m: LazyMount, n: int, args, workdir: Path, py_spy: Path, spent_dir: Path,
                 info: dict, handlers: set[str], perf_data: Path) -> dict:
    """One warm launch through the mounted `m`, measured and sampled."""
    raw = workdir / f"profile-{n}.txt"
    try:
        before = m.stats()["requests"]
        user0, sys0 = cpu_times(m.pid)
        loop0 = loop_thread_seconds(m.pid)
        spy = subprocess.Popen([str(py_spy), "record", "--pid", str(m.pid), "--rate",
                                str(args.rate), "--format", "raw", "--gil", "--nonblocking",
                                "--threads", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(m.pid),
                                     "-o", str(perf_data)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        window = [time.monotonic()]
        seconds = run_w1(m.mountpoint / "main" / W1_VARIANT, info)["seconds"]
        window.append(time.monotonic())
        user1, sys1 = cpu_times(m.pid)
        loop_seconds = loop_thread_seconds(m.pid) - loop0
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
    # The daemon's own record of every request it served (written as it
    # exited): the launch's are the last of each kind (before them: the
    # mount's own; the stats xattr's getxattrs are left out).
    spent, collected = {}, []
    for f in spent_dir.glob("*[0-9].json"):
        spent = json.loads(f.read_text())
    for f in spent_dir.glob("*-gc.json"):  # the collections during the launch
        collected = [c for c in json.loads(f.read_text()) if window[0] <= c[0] <= window[1]]
    gc_loop = sum(c[2] for c in collected if c[3]) / 1e9
    steps = {}  # trio task steps in the daemon's life, by task name
    for f in spent_dir.glob("*-steps.json"):
        steps = json.loads(f.read_text())
    handler_ns = {name: spent.get(name, [])[-count:] for name, count in delta.items()}
    handler_seconds = sum(sum(ns) for ns in handler_ns.values()) / 1e9
    buckets, leaves = parse(raw, handlers)
    return {"seconds": seconds, "user_seconds": round(user1 - user0, 3),
            "system_seconds": round(sys1 - sys0, 3), "requests": delta,
            "loop_thread_seconds": round(loop_seconds, 3),
            "handler_cpu_seconds": round(handler_seconds, 3),
            "gc": {"collections": len(collected),
                   "by_generation": [sum(c[1] == g for c in collected) for g in range(3)],
                   "loop_thread_seconds": round(gc_loop, 3),
                   "worker_threads_seconds": round(sum(c[2] for c in collected if not c[3])
                                                   / 1e9, 3)},
            "task_steps": sum(steps.values()),
            "request_loop_steps": sum(n for task, n in steps.items() if task.startswith("pyfuse-")),
            "samples": dict(buckets), "handler_ns": handler_ns,
            "leaves": {b: dict(c) for b, c in leaves.items()}}


def summarize(runs: list[dict]) -> dict:
    """One contender's runs: totals per request, and per handler its distribution."""
    requests: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    handler_ns: dict[str, list[int]] = collections.defaultdict(list)
    for r in runs:
        requests.update(r["requests"])
        total.update(r["samples"])
        for b, c in r["leaves"].items():
            leaves[b].update(c)
        for name, ns in r["handler_ns"].items():
            handler_ns[name] += ns
    cpu = sum(r["user_seconds"] + r["system_seconds"] for r in runs)
    in_handlers = sum(r["handler_cpu_seconds"] for r in runs)
    loop = sum(r["loop_thread_seconds"] for r in runs)
    n_req = sum(requests.values())
    rows = []
    for name, count in requests.most_common():
        ns = handler_ns.get(name)
        rows.append({"handler": name, "requests": count,
                     "cpu_seconds": round(sum(ns) / 1e9, 3) if ns else None,
                     "us_per_request": distribution(ns) if ns else None,
                     "samples": total.get(name, 0),
                     "top_leaves": [[leaf, c] for leaf, c in leaves[name].most_common(8)]})
    return {"requests": dict(requests), "launch_seconds_median":
            round(statistics.median(r["seconds"] for r in runs), 3),
            "daemon_cpu_seconds": round(cpu, 3),
            "user_seconds": round(sum(r["user_seconds"] for r in runs), 3),
            "system_seconds": round(sum(r["system_seconds"] for r in runs), 3),
            "handler_cpu_seconds": round(in_handlers, 3),
            "us_per_request": round(cpu / n_req * 1e6, 1),
            "us_per_request_loop_thread": round(loop / n_req * 1e6, 1),
            "us_per_request_in_handlers": round(in_handlers / n_req * 1e6, 1),
            "us_per_request_loop_outside_handlers": round((loop - in_handlers) / n_req * 1e6, 1),
            "us_per_request_worker_threads": round((cpu - loop) / n_req * 1e6, 1),
            "gc_per_launch": round(sum(r["gc"]["collections"] for r in runs) / len(runs), 1),
            "task_steps_per_request": round(sum(r["task_steps"] for r in runs) / n_req, 2),
            "request_loop_steps_per_request": round(
                sum(r["request_loop_steps"] for r in runs) / n_req, 2),
            "gc_us_per_request_loop_thread": round(
                sum(r["gc"]["loop_thread_seconds"] for r in runs) / n_req * 1e6, 1),
            "rows": rows,
            "outside_handlers_samples": [
                {"where": bucket, "samples": c,
                 "top_leaves": [[leaf, k] for leaf, k in leaves[bucket].most_common(8)]}
                for bucket, c in total.most_common() if bucket not in requests]}


def markdown(name: str, s: dict, runs: int) -> list[str]:
    lines = [f"## {name}", "",
             f"{runs} launches (median {s['launch_seconds_median']:.2f} s), "
             f"{sum(s['requests'].values()):,} requests, daemon CPU "
             f"{s['daemon_cpu_seconds']:.2f} s (user {s['user_seconds']:.2f}, system "
             f"{s['system_seconds']:.2f}): {s['us_per_request']:.0f} us a request, of which "
             f"the event loop's thread {s['us_per_request_loop_thread']:.0f} us "
             f"({s['us_per_request_in_handlers']:.0f} us inside the handlers, "
             f"{s['us_per_request_loop_outside_handlers']:.0f} us outside them: pyfuse3's "
             "request loop, trio, the kernel's side of receiving requests and sending replies, "
             "the hook's own clock reads) and the worker threads "
             f"{s['us_per_request_worker_threads']:.0f} us (cache disk, index, store). Python's "
             f"garbage collector ran {s['gc_per_launch']:.0f} times a launch, "
             f"{s['gc_us_per_request_loop_thread']:.1f} us a request on the event loop's thread "
             "(inside handlers or not, wherever an allocation set it off). trio ran "
             f"{s['task_steps_per_request']:.2f} task steps a request, "
             f"{s['request_loop_steps_per_request']:.2f} of them pyfuse3's request loop's (in "
             "the daemon's whole life: its start and end included).", "",
             "CPU per request inside each handler (user + system of its own task, measured "
             "around every request), and the hottest frames py-spy saw inside it:", "",
             "| handler | requests | CPU | mean us | p10 | p50 | p90 | p99 | hottest frames "
             "(py-spy samples) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        d = r["us_per_request"] or {}
        top = "; ".join(f"{leaf} {c}" for leaf, c in r["top_leaves"][:4])
        cpu_s = f"{r['cpu_seconds']:.2f} s" if r["cpu_seconds"] is not None else "-"
        lines.append(f"| {r['handler']} | {r['requests']:,} | {cpu_s} | "
                     + " | ".join(f"{d[k]:.0f}" if k in d else "-"
                                  for k in ("mean", "p10", "p50", "p90", "p99"))
                     + f" | {top} |")
    lines += ["", "py-spy samples outside the handlers:", "",
              "| where | samples | hottest frames |", "|---|---|---|"]
    lines += [f"| {o['where']} | {o['samples']:,} | "
              + "; ".join(f"{leaf} {c}" for leaf, c in o["top_leaves"][:4]) + " |"
              for o in s["outside_handlers_samples"]]
    return lines + [""]


def ratios(by_run: list[dict], names: list[str]) -> dict:
    """Each contender's per-request CPU over the first's, run by run (medians)."""
    def per_request(run: dict, what: str) -> float | None:
        n = sum(run["requests"].values())
        if what == "daemon":
            return (run["user_seconds"] + run["system_seconds"]) / n
        ns = run["handler_ns"].get(what)
        return sum(ns) / len(ns) if ns else None

    out: dict = {}
    for name in names[1:]:
        kinds = ["daemon", *sorted({h for r in by_run for h in r[names[0]]["handler_ns"]})]
        for what in kinds:
            pairs = [b / a for r in by_run
                     if (a := per_request(r[names[0]], what)) and (b := per_request(r[name], what))]
            if pairs:
                out.setdefault(name, {})[what] = {"median": round(statistics.median(pairs), 3),
                                                  "per_run": [round(p, 3) for p in pairs]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000, help="py-spy samples per second [1000]")
    ap.add_argument("--mount-option", action="append", default=[], metavar="ARG")
    ap.add_argument("--perf", action="store_true", help="also sample with perf(1)")
    ap.add_argument("--keep-page-cache", action="store_true",
                    help="remount without dropping the page cache: the cache files' pages stay "
                         "(what a read costs without the cache disk's I/O)")
    ap.add_argument("--cli", action="append", default=[], metavar="NAME=PATH",
                    help="a contender: a rez-lazyfs command (another checkout's); twice or "
                         "more: runs in turn, in an order that turns each run [this=this one's]")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-warmfuse/full"))
    ap.add_argument("--output", help="results name [profile-warm, profile-warm-quick]")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("profile_warm.py needs root (drop_caches, FUSE, ptrace)", file=sys.stderr)
        return 2
    contenders = [tuple(c.split("=", 1)) for c in args.cli] or [("this", CLI)]
    names = [name for name, _ in contenders]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    py_spy = ensure_py_spy(workdir)
    sizes = Sizes.quick() if args.quick else Sizes()
    store, info = ensure_store(workdir, sizes, log=log)
    cache = workdir / "profile-cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)

    from fusefs.operations import LazyOperations
    handlers = {name for name in vars(LazyOperations) if not name.startswith("_")}

    def mounted(cli: str, env: dict | None = None) -> LazyMount:
        m = LazyMount(workdir / "profile-mnt", store, cache, args.mount_option, cli=cli, env=env)
        m.mount()
        return m

    m = mounted(contenders[0][1])
    try:
        run_w1(m.mountpoint / "main" / W1_VARIANT, info)  # fills the cache
    finally:
        m.umount()
    by_run: list[dict] = []
    for n in range(args.runs):
        order = contenders[n % len(contenders):] + contenders[:n % len(contenders)]
        by_run.append({})
        for name, cli in order:
            if not args.keep_page_cache:
                drop_caches()
            spent_dir = workdir / f"handler-cpu-{n}"
            subprocess.run(["rm", "-rf", str(spent_dir)], check=True)
            spent_dir.mkdir()
            m = mounted(cli, {"REZ_LAZYFS_HANDLER_CPU": str(spent_dir),
                              "PYTHONPATH": str(HERE / "handler_cpu")})
            run = by_run[-1][name] = profiled_run(m, n, args, workdir, py_spy, spent_dir, info,
                                                  handlers, workdir / f"perf-{name}-{n}.data")
            log(f"run {n + 1} {name}: {run['seconds']:.2f} s, daemon user "
                f"{run['user_seconds']:.2f} s system {run['system_seconds']:.2f} s (event loop "
                f"thread {run['loop_thread_seconds']:.2f} s, in handlers "
                f"{run['handler_cpu_seconds']:.2f} s, garbage collection "
                f"{run['gc']['loop_thread_seconds']:.2f} s), {sum(run['requests'].values())} "
                f"requests, {sum(run['samples'].values())} samples")

    summaries = {name: summarize([r[name] for r in by_run]) for name in names}
    compared = ratios(by_run, names)
    if args.perf:
        for name in names:
            objects, symbols = perf_split([workdir / f"perf-{name}-{n}.data"
                                           for n in range(args.runs)])
            summaries[name]["perf"] = {"objects": objects, "symbols": symbols}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "mount_options": args.mount_option,
              "contenders": dict(contenders), "keep_page_cache": args.keep_page_cache,
              "kernel": platform.release(), "load": open("/proc/loadavg").read().split()[:3],
              "summary": summaries, "ratios": compared,
              "runs": [{name: {k: v for k, v in run.items() if k not in ("handler_ns", "leaves")}
                        for name, run in r.items()} for r in by_run]}
    name = args.output or ("profile-warm-quick" if args.quick else "profile-warm")
    out = HERE / "results"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = ["# Daemon CPU of a warm W1 launch, per handler", "",
             f"`tests/bench/profile_warm.py{' --quick' if args.quick else ''} --runs {args.runs}"
             + "".join(f" --mount-option={o}" for o in args.mount_option)
             + "".join(f" --cli {c}" for c in args.cli)
             + (" --keep-page-cache" if args.keep_page_cache else "") + f"`, "
             f"{report['date']}, load {' '.join(report['load'])}: "
             + ("warm launches, remounted with the cache files' pages kept"
                if args.keep_page_cache else "warm-disk launches (remounted, page cache dropped)")
             + (f", the contenders in turn ({', '.join(f'{n} = {c}' for n, c in contenders)})"
                if len(contenders) > 1 else "") + ".", ""]
    for contender in names:
        lines += markdown(contender, summaries[contender], args.runs)
        perf = summaries[contender].get("perf")
        if perf:
            lines += ["perf, every thread of the daemon, user and kernel (share of its samples):",
                      "", "| object | share |", "|---|---|"]
            lines += [f"| {o} | {share:.1%} |" for o, share in perf["objects"][:10]]
            lines += ["", "| hottest symbols | object | share |", "|---|---|---|"]
            lines += [f"| `{sym}` | {o} | {share:.1%} |" for sym, o, share in perf["symbols"][:25]]
            lines.append("")
    for contender, by in compared.items():
        lines += [f"{contender} / {names[0]}, CPU per request, run by run (interleaved): "
                  + "; ".join(f"{what} median {d['median']} {d['per_run']}"
                              for what, d in by.items()) + ".", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    log(f"wrote {out / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
