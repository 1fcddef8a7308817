"""The launch benchmark: rez-lazyfs against local disk, a network store and Rez's package cache.

One command (as root: it makes network namespaces and drops the page cache):

    .venv/bin/python tests/bench/run.py            # default sizes, 3 runs (~25 min on 2 cores)
    .venv/bin/python tests/bench/run.py --quick    # ~1/10 sizes: a smoke run of ~4 minutes

Medians of --runs runs; the package-cache copy, by far the slowest contender
and network-bound, runs --copy-runs times (1). Cold runs start from a remounted
sshfs, a fresh rez-lazyfs cache and a dropped page cache, every time; warm
runs read through the sshfs mount their cache was filled through (sshfs
numbers inodes in lookup order: after a remount every file would look
replaced, which a farm's NFS store never makes it).

It installs what it needs (Debian's sshfs and openssh-server with apt, and
rclone and bindfs for their contenders; matplotlib with pip into
WORKDIR/pydeps, not the project's environment; none with --no-install),
generates the store once (kept in WORKDIR for the next run), serves it over
a real network link (netstore.py: sshd in a network namespace of its own,
a veth with a tbf rate, a delaying relay for the RTT, sshfs on the client),
runs workloads W1-W4 (workloads.py) with the contenders (contenders.py)
and writes tests/bench/results/latest.{json,md,png} (quick.* for --quick).
Everything it sets up it tears down, also on Ctrl-C.

With a lazy-cold-trace* contender (W1 and W4 only) it first records the W1
launch's trace with the real rez and `rez-lazyfs trace record` (once per run,
not timed; contenders.py, launchtrace.py) and reports the issue-12 targets:
traced cold against warm from disk, store bytes and replayed-but-unread bytes
against the bytes read (results/trace-findings.md: what the runs showed).

With rclone-* or bindfs-* contenders (peers.py) it also runs two other FUSE
filesystems over the same store (rclone's VFS cache over the same SFTP link,
bindfs over the local tree) and reports rez-lazyfs against them (issue 16).

With any http-* contender it also publishes the store as an image (once,
kept in WORKDIR), serves it with nginx across the same link and puts a
squid on the client side (imagestore.py), times `rez-lazyfs publish` of the
W1 variant (--publish-runs) and measures what one request through squid
costs, for the HTTP targets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imagestore  # noqa: E402
import netstore  # noqa: E402
import peers  # noqa: E402
from contenders import (  # noqa: E402
    CONTENDERS, HTTP_CONTENDERS, LABELS, PEER_CONTENDERS, TRACE_CONTENDERS, TRACED_WORKLOADS, Bench,
    WorkloadFailed)
from netstore import is_mounted  # noqa: E402
from workloads import LAUNCH_PYTHON, W1_VARIANT, Sizes, ensure_store  # noqa: E402

MiB = 2**20
WORKLOADS = ["W1", "W2", "W3", "W4"]
WORKLOAD_TITLES = {
    "W1": "W1 DCC-like launch (imports + scattered binary reads)",
    "W2": "W2 sequential read of one large file",
    "W3": "W3 metadata walk (os.walk + lstat of every entry)",
    "W4": "W4 eight W1 launches at once",
}
RSS_LIMIT_MIB = 256
PUBLISH_LIMIT_SECONDS = 60
SQUID_WARM_LIMIT = 2.0  # W1 cold through a warm squid / W1 warm from disk
TRACE_WARM_LIMIT = 1.5  # W1 (W4) cold with a trace / W1 (W4) warm from disk
TRACE_BYTES_LIMIT = 1.3  # store bytes of a traced cold launch / bytes it read
TRACE_WASTE_LIMIT = 0.10  # replayed bytes no reader read / bytes the launch read
# rez-lazyfs's contender -> rclone's in the same state, for "ahead of rclone"
RCLONE_PAIRS = {"lazy-cold": "rclone-cold", "lazy-warm-disk": "rclone-warm-disk",
                "lazy-warm-hot": "rclone-warm-hot"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup ----------------------------------------------------------------------
def ensure_matplotlib(workdir: Path) -> bool:
    deps = workdir / "pydeps"
    if deps.is_dir():
        sys.path.insert(0, str(deps))
    if _importable("matplotlib"):
        return True
    log(f"installing matplotlib into {deps} (for the chart) ...")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "matplotlib"])
    if r.returncode:
        log("matplotlib could not be installed: no chart")
        return False
    sys.path.insert(0, str(deps))
    return _importable("matplotlib")


def machine_info(workdir: Path, net: dict) -> dict:
    def cmd(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo")
                if line.startswith("MemTotal")), 0)
    commit = cmd("git", "-C", str(HERE), "rev-parse", "--short", "HEAD")
    dirty = bool(cmd("git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no",
                     "--", "cachecore", "fusefs", "mount"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "launch_python": LAUNCH_PYTHON,
            "workdir": str(workdir), "workdir_fs": cmd("stat", "-f", "-c", "%T", str(workdir)),
            "rez_lazyfs_commit": commit + ("+local changes" if dirty else ""),
            "sshfs": next((line for line in cmd("sshfs", "--version").splitlines()
                           if line.startswith("SSHFS")), ""),
            "openssh": cmd("ssh", "-V") or subprocess.run(["ssh", "-V"], capture_output=True,
                                                          text=True).stderr.strip(),
            **{f"network_{k}": v for k, v in net.items()}}


# -- summary --------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _median_dict(dicts: list[dict]) -> dict:
    keys = sorted({k for d in dicts for k, v in d.items() if isinstance(v, (int, float))})
    return {k: _median([d.get(k) for d in dicts]) for k in keys}


def summarize(raw: dict, info: dict) -> dict:
    out = {}
    for wl, per in raw.items():
        native = _median([r["seconds"] for r in per.get("native", {}).get("runs", [])])
        out[wl] = {}
        for c in CONTENDERS:
            if c not in per:
                continue
            runs = per[c]["runs"]
            s = {"label": LABELS[c], "runs": len(runs), "errors": per[c]["errors"],
                 "seconds_each": [round(r["seconds"], 4) for r in runs]}
            med = _median([r["seconds"] for r in runs])
            s["median_seconds"] = med
            s["ratio_vs_native"] = med / native if med and native else None
            if runs:
                s["bytes_read"] = runs[0].get("bytes_read")
                if wl == "W2" and med:
                    s["median_mib_s"] = runs[0]["bytes_read"] / med / MiB
                for part in ("copy_seconds", "workload_seconds"):
                    if part in runs[0]:
                        s["median_" + part] = _median([r[part] for r in runs])
                if any("store" in r for r in runs):
                    s["store"] = _median_dict([r["store"] for r in runs if "store" in r])
                if any("network" in r for r in runs):
                    s["network"] = _median_dict([r["network"] for r in runs if "network" in r])
                cached = [r["bytes_cached"] for r in runs if r.get("bytes_cached") is not None]
                if cached:
                    s["bytes_cached"] = _median(cached)
                if any("http" in r for r in runs):
                    s["http"] = _median_dict([r["http"] for r in runs if "http" in r])
                cpu = [r.get("daemon_cpu_seconds") for r in runs if r.get("daemon_cpu_seconds") is not None]
                if cpu:
                    s["median_daemon_cpu_seconds"] = _median(cpu)
                rss = [r.get("daemon_peak_rss_kib") for r in runs if r.get("daemon_peak_rss_kib")]
                if rss:
                    s["daemon_peak_rss_mib"] = max(rss) / 1024
                if wl == "W4":
                    s["median_per_process_seconds"] = _median(
                        [statistics.median(r["per_process_seconds"]) for r in runs])
            out[wl][c] = s
    return out


def _get(summary, wl, c, *keys):
    d = summary.get(wl, {}).get(c)
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def targets(summary: dict, raw: dict, info: dict, publish: dict | None = None,
            trace: dict | None = None) -> list[dict]:
    t = []

    def add(name, measured, limit, met, how):
        t.append({"target": name, "measured": measured, "limit": limit,
                  "met": None if measured is None else met, "how": how})

    r = _get(summary, "W1", "lazy-warm-disk", "ratio_vs_native")
    add("W1 warm, page cache dropped: at most 1.3x native", r, 1.3, r is not None and r <= 1.3,
        "median lazy-warm-disk time / median native time")
    cold, copy, direct = (_get(summary, "W1", c, "median_seconds") for c in ("lazy-cold", "copy", "direct"))
    r = cold / copy if cold and copy else None
    add("W1 cold: at most 0.3x of the package-cache copy-then-launch time", r, 0.3,
        r is not None and r <= 0.3, "median lazy-cold time / median copy (copy + launch) time")
    r = cold / direct if cold and direct else None
    add("W1 cold: below direct", r, 1.0, r is not None and r < 1.0,
        "median lazy-cold time / median direct time")
    sb = _get(summary, "W1", "lazy-cold", "store", "store_bytes")
    r = sb / info["W1"]["launch_bytes"] if sb is not None else None
    add("W1 cold: bytes pulled from the store at most 1.2x the bytes the launch read", r, 1.2,
        r is not None and r <= 1.2,
        f"median store_bytes / {info['W1']['launch_bytes']} bytes read (.pyc files + binary ranges)")
    r = _get(summary, "W2", "lazy-warm-disk", "ratio_vs_native")
    r = 1 / r if r else None
    add("W2 warm from disk cache: at least 0.6x native throughput", r, 0.6,
        r is not None and r >= 0.6, "native median time / lazy-warm-disk median time")
    r = _get(summary, "W3", "lazy-warm-disk", "ratio_vs_native")
    hot = _get(summary, "W3", "lazy-warm-hot", "ratio_vs_native")
    add("W3 warm: at most 2x native", r, 2.0, r is not None and r <= 2.0,
        "median lazy-warm-disk time / median native time (page cache dropped for both)"
        + (f"; page cache hot: {hot:.2f}x" if hot else ""))
    # W4: every block fetched once. Each cold run starts from an empty cache,
    # so the payload it holds afterwards is every distinct block fetched: the
    # store bytes (counted until the daemon is idle) must not exceed it.
    runs = raw.get("W4", {}).get("lazy-cold", {}).get("runs", [])
    ratios = [r["store"]["store_bytes"] / r["bytes_cached"] for r in runs
              if r.get("bytes_cached") and "store" in r]
    worst = max(ratios) if ratios else None
    w1b = _get(summary, "W1", "lazy-cold", "store", "store_bytes")
    w4b = _get(summary, "W4", "lazy-cold", "store", "store_bytes")
    add("W4: each block fetched from the store once", worst, 1.0,
        worst is not None and worst <= 1.0,
        "worst cold W4 run: store bytes / payload bytes in its cache afterwards (`rez-lazyfs status`)"
        + (f"; store bytes of 8 launches / of one launch (W1 cold, medians) {w4b / w1b:.3f}"
           if w1b and w4b else ""))
    rss = [s.get("daemon_peak_rss_mib") for wl in summary.values() for c, s in wl.items()
           if c not in PEER_CONTENDERS]
    rss = [x for x in rss if x]
    peak = max(rss) if rss else None
    add(f"Memory: daemon peak RSS over W1-W4 at most {RSS_LIMIT_MIB} MiB", peak, RSS_LIMIT_MIB,
        peak is not None and peak <= RSS_LIMIT_MIB, "max VmHWM of the daemon at the end of every run (MiB)")
    http_targets(add, summary, raw, publish)
    trace_targets(add, summary, raw, info, trace)
    peer_targets(add, summary)
    return t


def _ratio(summary: dict, wl: str, a: str, b: str) -> float | None:
    """Median time of contender a / median time of contender b on wl."""
    x, y = (_get(summary, wl, c, "median_seconds") for c in (a, b))
    return x / y if x and y else None


def peer_targets(add, summary: dict) -> None:
    """The peers' targets (issue 16), as ratios of medians within this run,
    for each peer contender that ran."""
    for lazy, rclone in RCLONE_PAIRS.items():
        ratios = {wl: _ratio(summary, wl, lazy, rclone) for wl in WORKLOADS
                  if rclone in summary.get(wl, {})}
        if not ratios:
            continue
        measured = [r for r in ratios.values() if r is not None]
        worst = max(measured) if len(measured) == len(ratios) else None
        add(f"Peers: rez-lazyfs ahead of rclone on every workload ({lazy} against {rclone})", worst,
            1.0, worst is not None and worst < 1.0,
            f"the highest over the workloads of median {lazy} time / median {rclone} time: "
            + ", ".join(f"{wl} {_fmt(r, 2, 'x')}" for wl, r in ratios.items()))
    if "bindfs-warm-disk" in summary.get("W1", {}):
        r = _ratio(summary, "W1", "lazy-warm-disk", "bindfs-warm-disk")
        hot = _ratio(summary, "W1", "lazy-warm-hot", "bindfs-hot")
        add("Peers: W1 warm ahead of bindfs over local disk", r, 1.0, r is not None and r < 1.0,
            "median lazy-warm-disk time / median bindfs-warm-disk time (page cache dropped for both)"
            + (f"; page cache hot (lazy-warm-hot / bindfs-hot): {hot:.2f}x" if hot else ""))
    if "bindfs-warm-disk" in summary.get("W2", {}):
        r = _ratio(summary, "W2", "bindfs-warm-disk", "lazy-warm-disk")
        add("Peers: W2 warm from disk cache at least bindfs's throughput", r, 1.0,
            r is not None and r >= 1.0,
            "median bindfs-warm-disk time / median lazy-warm-disk time (page cache dropped for both)")


def trace_waste(run: dict, block_size: int) -> int | None:
    """Bytes a traced run replayed that no reader read: replay_waste blocks x
    the block size (an upper bound: a file's last block may be shorter)."""
    st = run.get("store", {})
    return st["replay_waste"] * block_size if "replay_waste" in st else None


def trace_targets(add, summary: dict, raw: dict, info: dict, traces: dict | None) -> None:
    """The launch traces' targets (issue 12), as ratios within this run, for
    each traced contender that ran."""
    launch = info["W1"]["launch_bytes"]
    for c in TRACE_CONTENDERS:
        if not any(c in summary.get(wl, {}) for wl in TRACED_WORKLOADS):
            continue
        for wl in TRACED_WORKLOADS:
            traced = _get(summary, wl, c, "median_seconds")
            warm = _get(summary, wl, "lazy-warm-disk", "median_seconds")
            cold = _get(summary, wl, "lazy-cold", "median_seconds")
            r = traced / warm if traced and warm else None
            add(f"Trace ({c}): {wl} cold with a launch trace at most {TRACE_WARM_LIMIT:g}x {wl} "
                "warm from disk", r, TRACE_WARM_LIMIT, r is not None and r <= TRACE_WARM_LIMIT,
                f"median {c} time / median lazy-warm-disk time (both page cache dropped)"
                + (f"; lazy-cold (no trace) / lazy-warm-disk {cold / warm:.2f}x, "
                   f"{c} / lazy-cold {traced / cold:.2f}x" if traced and cold and warm else ""))
        runs = raw.get("W1", {}).get(c, {}).get("runs", [])
        sb = _get(summary, "W1", c, "store", "store_bytes")
        served = _get(summary, "W1", c, "store", "bytes_served")
        plain = _get(summary, "W1", "lazy-cold", "store", "store_bytes")
        r = sb / launch if sb is not None else None
        add(f"Trace ({c}): W1 store bytes at most {TRACE_BYTES_LIMIT:g}x the bytes the launch read",
            r, TRACE_BYTES_LIMIT, r is not None and r <= TRACE_BYTES_LIMIT,
            f"median store_bytes of {c} / {launch} bytes read (.pyc files + binary ranges)"
            + (f"; store bytes / bytes_served (what the mount gave the readers, the kernel's "
               f"read-ahead included) {sb / served:.3f}" if sb and served else "")
            + (f"; lazy-cold (no trace) {plain / launch:.3f}" if plain else ""))
        bs = (traces or {}).get(c, {}).get("block_size")
        waste = [w for w in (trace_waste(x, bs) for x in runs) if w is not None] if bs else []
        w = statistics.median(waste) / launch if waste else None
        w4 = [x for x in (trace_waste(x, bs) for x in raw.get("W4", {}).get(c, {})
                          .get("runs", [])) if x is not None] if bs else []
        add(f"Trace ({c}): W1 replayed bytes no reader read at most {TRACE_WASTE_LIMIT:.0%} of the "
            "bytes the launch read", w, TRACE_WASTE_LIMIT, w is not None and w <= TRACE_WASTE_LIMIT,
            f"median over W1 {c} runs of replay_waste blocks x {bs} (block size) / {launch} bytes "
            "read" + "".join(
                f"; run {n + 1}: {x['store']['replay_waste']} of {x['store']['replay_blocks']} "
                f"replayed blocks unread, {x['store']['replay_skipped']} traced files skipped"
                for n, x in enumerate(runs) if "replay_waste" in x.get("store", {}))
            + (f"; W4 (8 launches): median {statistics.median(w4) / launch:.4f}" if w4 else ""))


def http_targets(add, summary: dict, raw: dict, publish: dict | None) -> None:
    """The HTTP store's targets (issue 11), as ratios within this run."""
    warm_squid = _get(summary, "W1", "http-cold-squid-warm", "median_seconds")
    warm_disk = _get(summary, "W1", "lazy-warm-disk", "median_seconds")
    r = warm_squid / warm_disk if warm_squid and warm_disk else None
    add(f"HTTP: W1 cold through a warm squid at most {SQUID_WARM_LIMIT:g}x W1 warm from disk", r,
        SQUID_WARM_LIMIT, r is not None and r <= SQUID_WARM_LIMIT,
        "median http-cold-squid-warm time / median lazy-warm-disk time (both page cache dropped)")
    runs = raw.get("W4", {}).get("http-cold-squid-cold", {}).get("runs", [])
    ratios = [r["http"]["origin_object_requests"] / r["http"]["unique_objects"] for r in runs
              if r.get("http", {}).get("unique_objects")]
    worst = max(ratios) if ratios else None
    add("HTTP: origin requests for 8 cold clients (separate caches, one cold squid) = unique objects",
        worst, 1.0, worst is not None and worst <= 1.0,
        "worst W4 http-cold-squid-cold run: object requests in nginx's access log / distinct object "
        "URLs the clients asked squid for (the manifest, not an object, is asked again once its "
        "61 s TTL is over: counted apart)" + "".join(
            f"; run {n + 1}: {r['http']['origin_object_requests']} / {r['http']['unique_objects']}"
            f" (+ {r['http']['origin_manifest_requests']} manifest)"
            for n, r in enumerate(runs) if "http" in r))
    secs = publish.get("median_seconds") if publish else None
    add(f"HTTP: publishing the W1 variant under {PUBLISH_LIMIT_SECONDS} s", secs, PUBLISH_LIMIT_SECONDS,
        secs is not None and secs < PUBLISH_LIMIT_SECONDS,
        "median wall time of `rez-lazyfs publish` into a new image, page cache dropped"
        + (f" ({publish['files']} files, {publish['bytes'] / MiB:.0f} MiB)" if publish else ""))


# -- report -----------------------------------------------------------------------
def _fmt(x, nd=2, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def markdown(report: dict) -> str:
    m, info, s = report["machine"], report["store_info"], report["summary"]
    lines = [f"# rez-lazyfs launch benchmark{' (--quick)' if report['quick'] else ''}", "",
             f"{report['generated']}; `{report['command']}`; medians of {report['runs']} run(s) "
             f"({report['copy_runs']} of the package-cache copy).", "",
             f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_mib']} MiB, kernel {m['kernel']}, "
             f"workdir on {m['workdir_fs']}; rez-lazyfs {m['rez_lazyfs_commit']}"
             + (f", mount options `{' '.join(report['mount_options'])}`" if report["mount_options"] else "")
             + ".", "",
             f"Network store: {m['network_transport']}, RTT {m['network_rtt_ms']} ms, "
             f"rate {m['network_rate_mbit']} Mbit/s ({m['network_link']}); {m['sshfs']}.", "",
             "Sizes: W1 {modules} modules ({pyc:.1f} MiB of .pyc), a {bin} MiB binary of which the launch "
             "reads {binr:.1f} MiB in {nr} ranges, {untouched} untouched files; W2 {seq} MiB; "
             "W3 {entries} entries; W4 {procs} processes.".format(
                 modules=info["W1"]["modules"], pyc=info["W1"]["pyc_bytes"] / MiB,
                 bin=report["sizes"]["binary_mib"], binr=info["W1"]["binary_bytes"] / MiB,
                 nr=info["W1"]["binary_ranges"], untouched=report["sizes"]["untouched_files"],
                 seq=report["sizes"]["seq_mib"], entries=info["W3"]["entries"],
                 procs=report["sizes"]["w4_processes"]),
             "", "## Targets", "", "| target | measured | met | how |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 4)} | {met} | {t['how']} |")
    lines += ["", "## Results", "",
              "Time: wall time of the workload (W1/W4: the launch processes; W2/W3: the read or walk "
              "inside its process); for the package cache, copy + workload. Store: rez-lazyfs's own "
              "counters (block reads, MiB, directory listings). Network: SFTP requests and MiB on the "
              "client veth (encrypted SSH incl. TCP/IP headers), for every contender that used it.", ""]
    for wl in WORKLOADS:
        if wl not in s:
            continue
        http = any(c in HTTP_CONTENDERS for c in s[wl])
        lines += [f"### {WORKLOAD_TITLES[wl]}", "",
                  "| contender | median s | x native | " + ("MiB/s | " if wl == "W2" else "")
                  + "store reads | store MiB | listings | SFTP requests | network MiB | "
                  + ("HTTP requests (squid hits) | unique objects | origin requests (manifest) | origin MiB | "
                     if http else "")
                  + "daemon CPU s | daemon peak RSS MiB |",
                  "|---|---|---|" + ("---|" if wl == "W2" else "") + "---|---|---|---|---|---|---|"
                  + ("---|---|---|---|" if http else "")]
        for c, r in s[wl].items():
            st, net = r.get("store", {}), r.get("network", {})
            t = _fmt(r["median_seconds"], 3)
            if "median_copy_seconds" in r:
                t += f" ({_fmt(r['median_copy_seconds'], 2)} copy + {_fmt(r['median_workload_seconds'], 2)})"
            if r["errors"]:
                t += f" ({len(r['errors'])} failed)"
            row = [LABELS[c], t, _fmt(r["ratio_vs_native"], 2, "x")]
            if wl == "W2":
                row.append(_fmt(r.get("median_mib_s"), 0))
            row += [_fmt(st.get("store_reads"), 0), _fmt(st["store_bytes"] / MiB, 1) if st else "-",
                    _fmt(st.get("store_listings"), 0), _fmt(net.get("sftp_requests"), 0),
                    _fmt(net["net_bytes"] / MiB, 1) if net else "-"]
            if http:
                h = r.get("http")
                row += [f"{h['proxy_requests']:.0f} ({h['proxy_hits']:.0f})" if h else "-",
                        _fmt(h and h["unique_objects"], 0),
                        f"{h['origin_requests']:.0f} ({h['origin_manifest_requests']:.0f})" if h else "-",
                        _fmt(h["origin_bytes"] / MiB, 1) if h else "-"]
            row += [_fmt(r.get("median_daemon_cpu_seconds"), 2), _fmt(r.get("daemon_peak_rss_mib"), 0)]
            lines.append("| " + " | ".join(row) + " |")
        read = next((r.get("bytes_read") for r in s[wl].values() if r.get("bytes_read")), None)
        notes = []
        if read:
            notes.append(f"bytes the workload read: {read / MiB:.1f} MiB")
        if wl == "W4":
            per = {c: r.get("median_per_process_seconds") for c, r in s[wl].items()}
            notes.append("median per-process launch time: " + ", ".join(
                f"{c} {v:.2f} s" for c, v in per.items() if v))
            if any(c in s[wl] for c in ("http-cold-squid-cold", "http-cold-squid-warm")):
                notes.append(f"the HTTP cold rows are {report['sizes']['w4_processes']} nodes (a "
                             "mount and a cache each, one launch each) started together, the "
                             "others (http-warm included) 8 launches on one mount; daemon CPU "
                             "is summed over the nodes")
        cached = _get(s, wl, "lazy-cold", "bytes_cached")
        if cached:
            notes.append(f"rez-lazyfs cache after a cold run: {cached / MiB:.1f} MiB of payload")
        if notes:
            lines += ["", "; ".join(notes) + "."]
        lines.append("")
    if report.get("peers"):
        lines += peers_markdown(report)
    if report.get("trace"):
        lines += trace_markdown(report)
    if report.get("http"):
        lines += http_markdown(report)
    if report.get("load") and (report.get("trace") or report.get("peers")) and not report.get("http"):
        lines += [f"Load (uptime: 1, 5, 15 min) at the start: {report['load']['start']}; at the "
                  f"end: {report['load']['end']} (other jobs share this 2-core machine).", ""]
    if report.get("errors"):
        lines += ["## Failures", ""] + [f"- {e}" for e in report["errors"]] + [""]
    lines += ["Variant sizes (what a whole-variant copy moves): " + ", ".join(
        f"{v} {d['files']} files / {d['bytes'] / MiB:.0f} MiB" for v, d in info["variants"].items()) + ".",
        "", f"Total bench time: {report['elapsed_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def peers_markdown(report: dict) -> list[str]:
    """What the peer contenders are and how they were run."""
    p = report["peers"]
    ran = {c.split("-")[0] for wl in report["summary"].values() for c in wl if c in PEER_CONTENDERS}
    lines = [f"## The peers: {' and '.join(sorted(ran, reverse=True))}", ""]
    if "rclone" in ran:
        lines += [
            f"rclone-* ({p['rclone'] or 'rclone'}): `rclone mount` of the store's directory with its "
            "sftp backend, logging in to the same sshd through the same delaying relay and link as "
            "sshfs (so the SFTP requests and network columns count it as they count sshfs), SFTP "
            "requests only (no commands over SSH), with `" + " ".join(p["rclone_flags"]) + "`: "
            "what it reads is kept on local disk in its VFS cache (sparse files) across mounts, "
            "listings and attributes in memory for the mount's life. rclone-cold: an empty VFS "
            "cache, a fresh mount, page cache dropped; rclone-warm-disk: the VFS cache a cold run "
            "filled, remounted (so it lists the store again: it keeps no metadata on disk), page "
            "cache dropped; rclone-warm-hot: the same mount again, at once.", ""]
    if "bindfs" in ran:
        lines += [
            f"bindfs-* ({p['bindfs'] or 'bindfs'}): `" + " ".join(p["bindfs_argv"]) + "` over the "
            "store directory on local disk: no network and no cache of its own, the kernel caching "
            "rez-lazyfs asks for its payload (its entry, attribute and negative timeouts, the page "
            "cache kept across opens). What a C FUSE filesystem costs over native on this kernel: "
            "the floor of a warm rez-lazyfs. bindfs-warm-disk: remounted, page cache dropped; "
            "bindfs-hot: the same mount again, at once.", ""]
    return lines + ["Daemon CPU and peak RSS in their rows are the peer's own process's (not in the "
                    "memory target, which is rez-lazyfs's).", ""]


def trace_markdown(report: dict) -> list[str]:
    """How the launch traces were made and what each traced cold run replayed."""
    info = report["store_info"]
    launch = info["W1"]["launch_bytes"]
    lines = ["## Launch traces (lazy-cold-trace, lazy-cold-trace-kept)", "",
             "Recorded once per bench run and traced contender, not timed "
             "(tests/bench/launchtrace.py): `rez-env dcc --output ctx.rxt` with the real rez "
             "against the contender's sshfs store path, `rez-lazyfs bake` for the lazy mount point "
             "(a scratch cache), then `rez-lazyfs trace record baked.rxt -o w1.trace -- <the W1 "
             "launch>` on a cold mount (fresh cache, sshfs cold, page cache dropped). Each timed "
             "run: a fresh cache, `rez-lazyfs seed w1.trace --repo main=STORE --cache CACHE`, the "
             "store's sshfs made cold (lazy-cold-trace: remounted, as for lazy-cold; "
             "lazy-cold-trace-kept: its own sshfs mount, never remounted, unused for longer than "
             "sshfs's 20 s cache timeout), page cache dropped, mount, the workload exactly as "
             "lazy-cold (W4: 8 launches at once on the mount; the trace is replayed once, on the "
             f"first access to {W1_VARIANT}).", "",
             "Why two: sshfs has no inode numbers from the server (SFTP carries none) and numbers "
             "files in the order they are looked up; rez-lazyfs's file identity (size, mtime, "
             "ctime, inode) recorded in a trace therefore matches a remounted sshfs only where the "
             "lookup order happened to be the same, and the replay skips every other file "
             "(`replay_skipped`, never reading a file it cannot prove unchanged). The kept mount "
             "(sshfs `-o remember=-1`, as every sshfs mount of the bench now) keeps the numbers, "
             "as an NFS store keeps its inode numbers: it measures the replay itself.", ""]
    for c, tr in report["trace"].items():
        rec = tr.get("record_store", {})
        rows = tr.get("trace", [])
        if tr.get("same_trace_as"):
            lines += [f"### {c}", "", f"{tr['same_trace_as']}'s trace and sshfs mount; the mounts "
                      f"also given `{' '.join(tr.get('ab_mount_options', []))}`: the replay fetches "
                      f"{tr.get('replay_width', '?')} blocks at a time.", ""]
        else:
            lines += [f"### {c}", "",
                  f"Store {tr.get('store_path')}: resolve {tr.get('resolve_seconds', 0):.1f} s, bake "
                  f"{tr.get('bake_seconds', 0):.1f} s, record {tr.get('record_seconds', 0):.1f} s "
                  f"(rez-env included; the recording mount fetched "
                  f"{rec.get('store_bytes', 0) / MiB:.1f} MiB in {rec.get('store_reads', 0)} store "
                  f"reads). The trace file: {tr.get('trace_file_bytes', 0) / 1024:.0f} KiB, "
                  + "; ".join(f"{r['repo']}/{r['root']}: {r['files']} files, {r['directories']} "
                              f"directories, {r['blocks']} blocks" for r in rows)
                  + (f", holding {tr['trace_payload_bytes'] / MiB:.1f} MiB "
                     f"({tr['trace_payload_bytes'] / launch:.3f}x the {launch / MiB:.1f} MiB the "
                     "launch reads; most blocks are .pyc files, shorter than a block)"
                     if tr.get("trace_payload_bytes") else "")
                  + f". The replay fetches {tr.get('replay_width', '?')} blocks at a time (the "
                  "fetcher's background limiter: half of store_threads).", ""]
        lines += ["Replay start / done: seconds after the workload started that the daemon logged "
                  "the replay's start and end (its fetches took the difference); cache misses: "
                  "blocks a reader had to wait for the store for.", "",
                  "| workload | run | s | store reads | store MiB | bytes_served MiB | replayed blocks | "
                  "replayed MiB | read by a reader | unread (waste) | skipped files | cache misses | "
                  "replay start / done s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for wl in TRACED_WORKLOADS:
            for n, r in enumerate(report["raw"].get(wl, {}).get(c, {}).get("runs", [])):
                st, rt = r.get("store", {}), r.get("replay_timing", {})
                lines.append(f"| {wl} | {n + 1} | {r['seconds']:.3f} | {st.get('store_reads')} | "
                             f"{st.get('store_bytes', 0) / MiB:.1f} | "
                             f"{st.get('bytes_served', 0) / MiB:.1f} | {st.get('replay_blocks')} | "
                             f"{st.get('replay_bytes', 0) / MiB:.1f} | {st.get('replay_useful')} | "
                             f"{st.get('replay_waste')} | {st.get('replay_skipped')} | "
                             f"{st.get('cache_misses')} | {_fmt(rt.get('replay_start_s'), 2)} / "
                             f"{_fmt(rt.get('replay_end_s'), 2)} |")
        lines.append("")
    if not report.get("http"):
        lines += where_the_time_goes(report)
    return lines


def http_markdown(report: dict) -> list[str]:
    h = report["http"]
    lines = ["## The HTTP store", "",
             f"The image: `rez-lazyfs publish` of the whole store ({h['image']['files']} files, "
             f"{h['image']['objects_new']} objects, {h['image']['bytes_new'] / MiB:.0f} MiB on disk), "
             "served by nginx in the server namespace behind its own delaying relay (the same link, "
             "RTT and rate as the sshfs store); squid 5 in the root namespace (the client side: a hit "
             "does not cross the link), `collapsed_forwarding on`, 128 MB memory + 512 MB disk cache "
             "(tests/helpers/http.py). Each HTTP node: `rez-lazyfs mount --repo main=URL --public-key "
             "--proxy SQUID`, a cache of its own. Columns: HTTP requests = what the nodes asked squid "
             "(squid's access log), unique objects = distinct object URLs among them (catalogs and "
             "chunks), origin requests = lines in nginx's access log (in parentheses: of the manifest, "
             "which squid asks for again once its 61 s are over), origin MiB = body bytes nginx sent.",
             ""]
    p = h.get("publish")
    if p:
        lines += ["### Publishing the W1 variant", "",
                  "| publish | median wall s | each run s | median CPU s | files read | objects new / there |",
                  "|---|---|---|---|---|---|"]
        for kind, runs in (("into a new image", p["first"]), ("again, nothing changed", p["again"])):
            lines.append(f"| {kind} | {statistics.median(r['wall_seconds'] for r in runs):.1f} | "
                         + ", ".join(f"{r['wall_seconds']:.1f}" for r in runs)
                         + f" | {statistics.median(r['cpu_seconds'] for r in runs):.1f} | "
                         f"{runs[0]['files_read']} | {runs[0]['objects_new']} / {runs[0]['objects_existing']} |")
        lines += ["", f"{p['files']} files, {p['bytes'] / MiB:.0f} MiB; {p['objects']} objects, "
                  f"{p['image_bytes'] / MiB:.0f} MiB in the image (zstd-3). Page cache dropped before "
                  "each publish; CPU = user + system of the publish process.", ""]
    lines += where_the_time_goes(report)
    lat = h.get("latency")
    if lat:
        lines += ["### One request through squid", "",
                  f"Sequential GETs of one object ({lat['object'][:16]}...) with pycurl on a kept-alive "
                  f"connection: a squid hit {lat['hit_ms_median']:.2f} ms median "
                  f"({lat['hit_ms_p90']:.2f} p90); a miss (`Cache-Control: no-cache`, squid asks "
                  f"the origin across the link) {lat['miss_ms_median']:.2f} ms median "
                  f"({lat['miss_ms_p90']:.2f} p90).", ""]
    lines += [f"Load (uptime) at the start: {h.get('load_start')}; at the end: {h.get('load_end')}.", ""]
    return lines


def where_the_time_goes(report: dict) -> list[str]:
    """Per HTTP contender: requests, wall time per request, daemon CPU per
    wall second (what bounds a launch: latency in series, or CPU)."""
    s = report["summary"]
    rows = []
    for wl in ("W1", "W4"):
        for c in ("lazy-cold", *TRACE_CONTENDERS, "lazy-warm-disk", *HTTP_CONTENDERS):
            r = s.get(wl, {}).get(c)
            if not r or not r.get("median_seconds"):
                continue
            req = r.get("http", {}).get("proxy_requests")
            if req is None:
                req = r.get("network", {}).get("sftp_requests")
            cpu, wall = r.get("median_daemon_cpu_seconds"), r["median_seconds"]
            rows.append(f"| {wl} | {c} | {_fmt(req, 0)} | {wall:.2f} | "
                        + (f"{wall / req * 1000:.2f}" if req and req >= 10 else "-")
                        + f" | {_fmt(cpu, 2)} | "
                        + (f"{cpu / wall:.2f}" if cpu is not None else "-") + " |")
    if not rows:
        return []
    return ["### Where the time goes", "",
            "Requests: HTTP requests the node(s) sent to squid (lazy-*: SFTP requests); wall ms per "
            "request: the median launch time spread over them (a bound if the requests are in "
            "series); daemon CPU / wall: cores the rez-lazyfs daemon(s) kept busy (2 on this machine).",
            "", "| workload | contender | requests | wall s | wall ms per request | daemon CPU s | "
            "daemon CPU / wall |", "|---|---|---|---|---|---|---|", *rows, ""]


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    wls = [w for w in WORKLOADS if w in s]
    colors = {"native": "#555555", "direct": "#d62728", "copy": "#ff7f0e", "lazy-cold": "#1f77b4",
              "lazy-cold-trace": "#17becf", "lazy-cold-trace-kept": "#9edae5",
              "lazy-cold-trace-kept-b": "#bcbd22",
              "lazy-warm-disk": "#2ca02c", "lazy-warm-hot": "#98df8a",
              "http-cold-squid-cold": "#9467bd", "http-cold-squid-warm": "#c5b0d5", "http-warm": "#8c564b",
              "rclone-cold": "#e377c2", "rclone-warm-disk": "#f7b6d2", "rclone-warm-hot": "#fcdcec",
              "bindfs-warm-disk": "#7f7f7f", "bindfs-hot": "#c7c7c7"}
    fig, axes = plt.subplots(len(wls), 1, figsize=(9, 2.3 * len(wls) + 0.8), squeeze=False)
    for ax, wl in zip(axes[:, 0], wls):
        cs = [c for c in CONTENDERS if c in s[wl] and s[wl][c]["median_seconds"]]
        vals = [s[wl][c]["median_seconds"] for c in cs]
        y = range(len(cs))[::-1]
        ax.barh(list(y), vals, color=[colors[c] for c in cs])
        ax.set_yticks(list(y), [c for c in cs], fontsize=8)
        ax.set_xscale("log")
        ax.set_title(WORKLOAD_TITLES[wl], fontsize=9, loc="left")
        ax.set_xlabel("median seconds (log scale)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        for yi, c, v in zip(y, cs, vals):
            r = s[wl][c]["ratio_vs_native"]
            ax.text(v, yi, f" {v:.2f} s" + (f"  {r:.2f}x" if r else ""), va="center", fontsize=7)
        ax.set_xlim(min(vals) / 2, max(vals) * 6)
    m = report["machine"]
    fig.suptitle(f"rez-lazyfs vs local disk, sshfs store ({m['network_rtt_ms']} ms RTT, "
                 f"{m['network_rate_mbit']} Mbit/s) and Rez package cache"
                 + (" [quick sizes]" if report["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1/10 sizes: a smoke run")
    ap.add_argument("--runs", type=int, default=3, help="runs per contender and workload [3]")
    ap.add_argument("--copy-runs", type=int, default=1,
                    help="runs of the package-cache copy, the slowest contender (network-bound, "
                         "least noisy) [1]")
    ap.add_argument("--rtt-ms", type=float, default=1.0, help="round-trip time added by the relay [1]")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="link rate (tbf) [1000]")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="subset, e.g. W1,W3")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="subset, e.g. native,lazy-cold")
    ap.add_argument("--publish-runs", type=int, default=None,
                    help="timed publishes of the W1 variant, with an http-* contender [--runs; 0: none]")
    ap.add_argument("--mount-option", action="append", default=[], metavar="ARG",
                    help="extra argument for `rez-lazyfs mount` (repeat), e.g. --mount-option=--block-size=1M")
    ap.add_argument("--ab-mount-option", action="append", default=[], metavar="ARG",
                    help="extra argument for the mounts of lazy-cold-trace-kept-b (repeat): an A/B "
                         "against lazy-cold-trace-kept, e.g. --ab-mount-option=--config=wide.toml")
    ap.add_argument("--rclone-option", action="append", default=[], metavar="ARG",
                    help="extra argument for `rclone mount` of the rclone-* contenders (repeat; a "
                         "later flag wins), e.g. --rclone-option=--buffer-size=0")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-bench"),
                    help="store (kept and reused), mounts, caches [/var/tmp/rez-lazyfs-bench]")
    ap.add_argument("--output", help="results name in tests/bench/results [latest, quick with --quick]")
    ap.add_argument("--no-install", action="store_true", help="do not apt/pip install anything")
    for name, help_ in (("modules", "W1 Python modules"), ("binary-mib", "W1 binary size"),
                        ("untouched-files", "W1 files never touched"), ("seq-mib", "W2 file size"),
                        ("tree-entries", "W3 entries"), ("w4-processes", "W4 concurrent launches")):
        ap.add_argument(f"--{name}", type=int, help=help_)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run.py needs root (network namespaces, tc, drop_caches, FUSE mounts)", file=sys.stderr)
        return 2
    sizes = Sizes.quick() if args.quick else Sizes()
    for k in ("modules", "binary_mib", "untouched_files", "seq_mib", "tree_entries", "w4_processes"):
        if getattr(args, k) is not None:
            setattr(sizes, k, getattr(args, k))
    wls = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    cons = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in cons:
        if c not in CONTENDERS:
            raise SystemExit(f"unknown contender {c!r}; one of {', '.join(CONTENDERS)}")
    cons = [c for c in CONTENDERS if c in cons]
    for w in wls:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}")
    name = args.output or ("quick" if args.quick else "latest")

    # Ctrl-C and SIGTERM both unwind through the finally blocks below
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_install:
        netstore.install({**netstore.APT_PACKAGES, **peers.apt_packages(cons)})
    have_chart = ensure_matplotlib(workdir) if not args.no_install else _importable("matplotlib")
    store, info = ensure_store(workdir, sizes, log=log)
    info = {**info, "sizes": asdict(sizes)}
    mount_dirs = [workdir / name for name in ("sshfs", "sshfs-kept", "lazy", "rclone", "bindfs")]
    for leftover in mount_dirs:
        if is_mounted(leftover):
            subprocess.run(["fusermount3", "-u", "-z", str(leftover)], capture_output=True)

    raw: dict = {}
    errors: list[str] = []
    net = netstore.NetStore(store, workdir / "sshfs", rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit)
    bench = image = None
    trace_info: dict = {}
    load = {"start": _load()}
    http: dict = {}
    net_desc = net.describe()
    try:
        if any(c in HTTP_CONTENDERS for c in cons):
            http["load_start"] = _load()
            publish_runs = args.runs if args.publish_runs is None else args.publish_runs
            if publish_runs:
                http["publish"] = imagestore.time_publish(workdir, store, publish_runs, log=log)
        log(f"network store: {args.rtt_ms} ms RTT, {args.rate_mbit} Mbit/s, sshfs at {net.mountpoint}")
        net.start()
        if http:
            image = imagestore.ImageSide(workdir, store, net, log=log)
            http["image"] = image.publish_report
            http["servers"] = _server_versions()
            log(f"image served at {image.url} (nginx in {net.ns_srv}, across the link)")
        bench = Bench(workdir, store, net, info, args.mount_option, log=log, image=image,
                      ab_extra=args.ab_mount_option, rclone_extra=args.rclone_option)
        for wl in wls:
            wl_cons = [c for c in cons if c not in TRACE_CONTENDERS or wl in TRACED_WORKLOADS]
            raw[wl] = {c: {"runs": [], "errors": []} for c in wl_cons}
            for run in range(1, args.runs + 1):
                for c in wl_cons:
                    if c == "copy" and run > args.copy_runs:
                        continue
                    try:
                        r = bench.run(wl, c)
                    except Exception as e:
                        if not isinstance(e, WorkloadFailed):
                            traceback.print_exc()
                        msg = f"{wl} {c} run {run}: {type(e).__name__}: {e}"
                        log("FAILED " + msg)
                        errors.append(msg)
                        raw[wl][c]["errors"].append(str(e))
                        bench._unmount()
                        continue
                    raw[wl][c]["runs"].append(r)
                    extra = ""
                    if "store" in r:
                        extra += (f"  store {r['store'].get('store_reads')} reads "
                                  f"{r['store'].get('store_bytes', 0) / MiB:.1f} MiB")
                    if "network" in r:
                        extra += (f"  net {r['network']['sftp_requests']} SFTP req "
                                  f"{r['network']['net_bytes'] / MiB:.1f} MiB")
                    if r.get("store", {}).get("replay_blocks"):
                        st = r["store"]
                        extra += (f"  replay {st['replay_blocks']} blocks ({st['replay_waste']} unread, "
                                  f"{st['replay_skipped']} skipped)")
                    if "http" in r:
                        h = r["http"]
                        extra += (f"  http {h['proxy_requests']} req ({h['proxy_hits']} hits) "
                                  f"{h['unique_objects']} unique, origin {h['origin_requests']} req "
                                  f"{h['origin_bytes'] / MiB:.1f} MiB")
                    if r.get("daemon_peak_rss_kib"):
                        extra += f"  rss {r['daemon_peak_rss_kib'] / 1024:.0f} MiB"
                    log(f"{wl} run {run}/{args.runs} {c:15} {r['seconds']:8.3f} s{extra}")
            bench.end_workload()
        if image is not None and image.squid is not None:
            http["latency"] = image.probe_latency()
            log(f"one request through squid: {http['latency']}")
        if http:
            http["load_end"] = _load()
    except KeyboardInterrupt:
        log("interrupted: tearing down (no results written)")
        return 130
    finally:
        if bench is not None:
            trace_info = bench.trace_info
            try:
                bench.close()
            except Exception:
                traceback.print_exc()
        if image is not None:
            try:
                image.close()
            except Exception:
                traceback.print_exc()
        net.close()
        leftovers = [ns for ns in (net.ns_srv, net.ns_cli)
                     if ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout]
        still_mounted = [str(d) for d in mount_dirs if is_mounted(d)]
        if leftovers or still_mounted:
            log(f"WARNING: not clean after teardown: namespaces {leftovers}, mounted {still_mounted}")

    summary = summarize(raw, info)
    report = {"generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "tests/bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "quick": args.quick, "runs": args.runs, "copy_runs": min(args.copy_runs, args.runs),
              "sizes": asdict(sizes),
              "mount_options": args.mount_option, "ab_mount_options": args.ab_mount_option,
              "machine": machine_info(workdir, net_desc), "store_info": info,
              "summary": summary, "raw": raw, "errors": errors, "http": http,
              "trace": trace_info, "load": {**load, "end": _load()},
              "peers": peers.describe(args.rclone_option) if set(cons) & set(PEER_CONTENDERS) else {},
              "elapsed_seconds": time.time() - started}
    report["targets"] = targets(summary, raw, info, http.get("publish"), trace_info)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (out / f"{name}.md").write_text(md)
    if have_chart:
        try:
            chart(report, out / f"{name}.png")
        except Exception:
            traceback.print_exc()
    print()
    print(md)
    log(f"wrote {out / name}.json, .md" + (", .png" if have_chart else ""))
    return 0


def _load() -> str:
    """The machine's load averages (1, 5, 15 min): other work shares it."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _server_versions() -> dict:
    def first_line(argv):
        r = subprocess.run(argv, capture_output=True, text=True)
        return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]
    return {"nginx": first_line(["/usr/sbin/nginx", "-v"]), "squid": first_line(["/usr/sbin/squid", "-v"])}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
