"""Warm launches and walks with and without the kernel's open requests (issue 16), A/B.

    .venv/bin/python tests/bench/levers_warm.py [--quick] [--rounds 7] [--venv NAME=DIR]

Contenders, all rez-lazyfs at this commit:
    no-open        the patched pyfuse3 (patches/, what .ci/setup installs): the kernel
                   sends no open, release, opendir or releasedir, and keeps listings
                   (and symlink targets)
    open-requests  the same build mounted with --open-requests: every open, release,
                   opendir and releasedir reaches the daemon, as with stock pyfuse3
    NAME           (--venv NAME=DIR, repeatable) another environment holding this
                   checkout (`pip install -e`) and another pyfuse3: the stock release
                   (the fallback), or a build with fewer of the patches; or another
                   commit's code in this environment (code_contender.sh)

The store is run.py's (workloads.py; --quick: its 1/10 sizes), served through sshfs
across a 1 ms RTT, 1 Gbit/s link (netstore.py), in WORKDIR (kept for the next run).
The cache is filled once per workload by a cold run. Then per round, the contenders in
an order that turns each round (A B C, B C A, ...), each: remount and drop the page
cache, the workload (warm-disk), then the workload again in the same mount (hot); and
the workload on the local store, page cache dropped (native), in the same round. Each
run records its time, the daemon's CPU time and the FUSE requests per handler (the
stats xattr, its own getxattr left out). Medians over the rounds, ratios to the native
time of the same round; every run is kept in the JSON.
Writes tests/bench/results/levers-warm.{json,md} (levers-warm-quick.* with --quick).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netstore  # noqa: E402
from contenders import (  # noqa: E402
    CLI, VARIANT_OF, LazyMount, WorkloadFailed, drop_caches, run_w1, run_w3)
from workloads import Sizes, ensure_store  # noqa: E402

RUNNERS = {"W1": run_w1, "W3": run_w3}
TITLES = {"W1": "W1 launch (imports + scattered binary reads)",
          "W3": "W3 metadata walk (os.walk + lstat of every entry)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _requests(mount: LazyMount) -> dict[str, int]:
    return mount.stats().get("requests", {})


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after[k] - before.get(k, 0) for k in after if k != "getxattr"}
    return {k: v for k, v in sorted(out.items()) if v}


def _settle(mount: LazyMount, quiet: float = 1.0, limit: float = 60.0) -> None:
    """Until background fetches (prefetch, replays) stop moving the store counters."""
    last, still, t0 = mount.stats(), time.monotonic(), time.monotonic()
    while time.monotonic() - still < quiet and time.monotonic() - t0 < limit:
        time.sleep(0.1)
        now = mount.stats()
        if (now["store_reads"], now["store_listings"]) != (last["store_reads"],
                                                           last["store_listings"]):
            still = time.monotonic()
        last = now


def remount_store(net) -> None:
    """A fresh sshfs (its caches cold); on a loaded machine its mount now and then
    fails (the old one still going away): tried again, three times in all."""
    for _ in range(2):
        try:
            net.remount()
            return
        except subprocess.CalledProcessError as e:
            log(f"sshfs remount failed ({(e.stderr or '').strip()[-200:]}); again")
            time.sleep(2)
    net.remount()


class Contender:
    def __init__(self, name: str, cli: str, extra: list[str]):
        self.name, self.cli, self.extra = name, cli, extra


def measured(mount: LazyMount, run, root: Path, info: dict) -> dict:
    before, cpu = _requests(mount), mount.cpu_seconds()
    out = run(root, info)
    cpu = mount.cpu_seconds() - cpu
    requests = _delta(before, _requests(mount))
    total = sum(requests.values())
    return {"seconds": out["seconds"], "daemon_cpu_seconds": round(cpu, 3),
            "requests": requests, "requests_total": total,
            "daemon_us_per_request": round(cpu / total * 1e6, 1) if total else None}


def run_round(wl: str, order: list[Contender], store: Path, net, workdir: Path,
              info: dict) -> dict:
    runner, variant = RUNNERS[wl], VARIANT_OF[wl]
    drop_caches()
    native = runner(store / variant, info)["seconds"]
    out = {"native_seconds": native, "order": [c.name for c in order]}
    for c in order:
        remount_store(net)
        drop_caches()
        mount = LazyMount(workdir / "lazy", net.mountpoint, workdir / f"cache-{wl}", c.extra,
                          cli=c.cli)
        mount.mount()
        try:
            root = mount.mountpoint / "main" / variant
            warm = measured(mount, runner, root, info)
            hot = measured(mount, runner, root, info)
            log(f"{wl} {c.name:14} warm-disk {warm['seconds']:6.3f} s "
                f"({warm['seconds'] / native:4.2f}x native {native:.3f} s), "
                f"cpu {warm['daemon_cpu_seconds']:.2f} s, {warm['requests_total']} requests "
                f"{warm['requests']};  hot {hot['seconds']:6.3f} s, {hot['requests_total']} "
                "requests")
            out[c.name] = {"warm_disk": warm, "hot": hot}
        finally:
            mount.umount()
    return out


def fill_cache(wl: str, c: Contender, net, workdir: Path, info: dict) -> None:
    remount_store(net)
    drop_caches()
    mount = LazyMount(workdir / "lazy", net.mountpoint, workdir / f"cache-{wl}", c.extra,
                      cli=c.cli)
    mount.mount()
    try:
        t = time.perf_counter()
        RUNNERS[wl](mount.mountpoint / "main" / VARIANT_OF[wl], info)
        _settle(mount)
        log(f"{wl}: cache filled by a cold run ({time.perf_counter() - t:.1f} s)")
    finally:
        mount.umount()


def summarize(raw: dict, names: list[str]) -> dict:
    summary: dict = {}
    for wl, rounds in raw.items():
        s = summary[wl] = {"native_seconds": statistics.median(r["native_seconds"] for r in rounds)}
        for name in names:
            for kind in ("warm_disk", "hot"):
                runs = [r[name][kind] for r in rounds]
                ratios = [r[name][kind]["seconds"] / r["native_seconds"] for r in rounds]
                kinds = sorted({k for run in runs for k in run["requests"]})
                s.setdefault(name, {})[kind] = {
                    "seconds": statistics.median(run["seconds"] for run in runs),
                    "x_native": round(statistics.median(ratios), 3),
                    "daemon_cpu_seconds": statistics.median(run["daemon_cpu_seconds"]
                                                            for run in runs),
                    "requests_total": statistics.median(run["requests_total"] for run in runs),
                    "requests": {k: statistics.median(run["requests"].get(k, 0) for run in runs)
                                 for k in kinds},
                    "daemon_us_per_request": statistics.median(
                        run["daemon_us_per_request"] for run in runs
                        if run["daemon_us_per_request"] is not None) if any(
                        run["daemon_us_per_request"] for run in runs) else None,
                }
        for other in names[1:]:  # each against the first, round by round
            for kind in ("warm_disk", "hot"):
                pairs = [r[other][kind]["seconds"] / r[names[0]][kind]["seconds"]
                         for r in rounds]
                cpu = [r[other][kind]["daemon_cpu_seconds"] / r[names[0]][kind]["daemon_cpu_seconds"]
                       for r in rounds if r[names[0]][kind]["daemon_cpu_seconds"]]
                s.setdefault("against_first", {}).setdefault(other, {})[kind] = {
                    "time_median": round(statistics.median(pairs), 3),
                    "time_per_round": [round(p, 3) for p in pairs],
                    "cpu_median": round(statistics.median(cpu), 3) if cpu else None}
    return summary


def write_markdown(path: Path, report: dict) -> None:
    names, lines = report["contenders"], []
    m = report["machine"]
    lines += ["# Warm launches and walks with and without open requests (issue 16)", "",
              f"`tests/bench/levers_warm.py{' --quick' if report['quick'] else ''} --rounds "
              f"{report['rounds']}` at {m['commit']}, {report['date']}: {m['nproc']} cores, "
              f"kernel {m['kernel']}, load average {m['load_start']} at the start and "
              f"{m['load_end']} at the end (other jobs share the machine). Store through sshfs, "
              f"{m['rtt_ms']} ms RTT. Medians of {report['rounds']} rounds; x native = the "
              "median of each run's time over the native time of its round.", ""]
    for wl, s in report["summary"].items():
        lines += [f"## {TITLES[wl]}", "", f"Native (local disk, page cache dropped): "
                  f"{s['native_seconds']:.3f} s.", "",
                  "| contender | warm-disk | x native | daemon CPU | us/request | requests | "
                  "hot | x native | requests |", "|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            w, h = s[name]["warm_disk"], s[name]["hot"]
            us = f"{w['daemon_us_per_request']:.0f}" if w["daemon_us_per_request"] else "-"
            lines.append(f"| {name} | {w['seconds']:.3f} s | {w['x_native']:.2f}x | "
                         f"{w['daemon_cpu_seconds']:.2f} s | {us} | {w['requests_total']:,.0f} | "
                         f"{h['seconds']:.3f} s | {h['x_native']:.2f}x | "
                         f"{h['requests_total']:,.0f} |")
        lines += ["", "Requests per handler, warm-disk (medians):", "",
                  "| contender | " + " | ".join(sorted({k for n in names for k in
                                                         s[n]["warm_disk"]["requests"]})) + " |"]
        kinds = sorted({k for n in names for k in s[n]["warm_disk"]["requests"]})
        lines.append("|---|" + "---|" * len(kinds))
        for name in names:
            r = s[name]["warm_disk"]["requests"]
            lines.append(f"| {name} | " + " | ".join(f"{r.get(k, 0):,.0f}" for k in kinds) + " |")
        for other, ab in s.get("against_first", {}).items():
            w, h = ab["warm_disk"], ab["hot"]
            lines += ["", f"{other} / {names[0]}, round by round (interleaved): warm-disk time "
                      f"{w['time_per_round']} (median {w['time_median']}; daemon CPU median "
                      f"{w['cpu_median']}), hot time {h['time_per_round']} (median "
                      f"{h['time_median']}; daemon CPU median {h['cpu_median']})."]
        lines.append("")
    path.write_text("\n".join(lines))


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="run.py's ~1/10 sizes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workloads", default="W1,W3")
    ap.add_argument("--contenders", default="open-requests,no-open",
                    help="of this environment [open-requests,no-open]")
    ap.add_argument("--venv", action="append", default=[], metavar="NAME=DIR",
                    help="a contender in another venv (this checkout, another pyfuse3)")
    ap.add_argument("--rtt-ms", type=float, default=1.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-warmfuse"))
    ap.add_argument("--output", help="results name [levers-warm, levers-warm-quick]")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("levers_warm.py needs root (network namespaces, drop_caches, FUSE)", file=sys.stderr)
        return 2
    sizes = Sizes.quick() if args.quick else Sizes()
    wls = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    own = {"open-requests": Contender("open-requests", CLI, ["--open-requests"]),
           "no-open": Contender("no-open", CLI, [])}
    contenders = [own[name.strip()] for name in args.contenders.split(",") if name.strip()]
    for spec in args.venv:
        name, _, venv = spec.partition("=")
        contenders.append(Contender(name, str(Path(venv) / "bin" / "rez-lazyfs"), []))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    netstore.install()
    store, info = ensure_store(workdir, sizes, log=log)
    info = {**info, "sizes": asdict(sizes)}
    load_start = _load()
    net = netstore.NetStore(store, workdir / "sshfs", rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit)
    raw: dict = {}
    try:
        net.start()
        for wl in wls:
            for leftover in workdir.glob(f"cache-{wl}"):
                subprocess.run(["rm", "-rf", str(leftover)], check=True)
            fill_cache(wl, contenders[0], net, workdir, info)
            raw[wl] = []
            for r in range(args.rounds):
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                log(f"{wl} round {r + 1}/{args.rounds}: {[c.name for c in order]}")
                raw[wl].append(run_round(wl, order, store, net, workdir, info))
    except WorkloadFailed as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        net.close()
    names = [c.name for c in contenders]
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no",
                            "--", "cachecore", "fusefs", "mount", "patches", "tests/bench"],
                           capture_output=True, text=True).stdout.strip()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
              "rounds": args.rounds, "contenders": names, "sizes": asdict(sizes),
              "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                          "commit": commit + ("+local changes" if dirty else ""),
                          "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit,
                          "load_start": load_start, "load_end": _load()},
              "summary": summarize(raw, names), "raw": raw}
    name = args.output or ("levers-warm-quick" if args.quick else "levers-warm")
    results = HERE / "results"
    (results / f"{name}.json").write_text(json.dumps(report, indent=2))
    write_markdown(results / f"{name}.md", report)
    log(f"wrote {results / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
