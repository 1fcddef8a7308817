"""Soak of the HTTP store: one rez-lazyfs mount of the published image,
read through two squids, for --minutes of mixed work, with the proxies
restarted in between; the daemon's RSS and open descriptors over time must
stay flat.

    .venv/bin/python tests/bench/soak_http.py              # 30 min, full-size store
    .venv/bin/python tests/bench/soak_http.py --minutes 5 --quick

The store, the image and the link are the launch benchmark's (run.py): the
generated store published once (imagestore.ensure_image), nginx in the
server namespace across the delayed, rate-limited link (netstore.serve_http),
squid A and squid B on the client side, mounted with `--proxy "A;B"` (B
only when A fails). One daemon serves the whole soak; the page cache is
dropped before every step, so every read reaches it. The steps, in a cycle:

    launch     the W1 launch (an interpreter start importing ~3,000 modules and
               reading the binary's ranges), checked like the benchmark's
    launch x8  eight W1 launches at once (every 4th cycle)
    walk       os.walk + lstat of the W3 tree (50k entries), then of the W1
               variant's share/ (20k files) reading every 50th file
    clean      `rez-lazyfs clean --max-size 0` while mounted (every 3rd cycle):
               the next steps fetch everything again, through the proxies
    restart    the launch of the first cycle at least RESTART_EVERY seconds after
               the last restart runs while a squid is restarted (1 s into it;
               A and B in turn; squid's own stop, or SIGKILL as a crash, in
               turn): the mount stays up and fails over while one is down; the
               other steps run between restarts. The spacing is longer than
               the download manager's back-off (30 s), so the proxy restarted
               before is in use again when the other one goes down.

After every step: the daemon's VmRSS, open descriptors (/proc/PID/fd) and
threads. Flat means: after a warm-up (--warmup-minutes), the median RSS of
the last window is within max(8 MiB, 10%) of the first window's, and the
largest descriptor count of the last window is at most the first window's
plus 4 (pooled connections come and go). A step that fails is counted and
named, not retried.

Writes tests/bench/results/soak_http.{json,md} (--output to change the name).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imagestore  # noqa: E402
import netstore  # noqa: E402
from contenders import (  # noqa: E402
    CLI, LazyMount, WorkloadFailed, drop_caches, run_launches, run_w1, run_w3)
from helpers.http import SquidProxy  # noqa: E402
from workloads import W1_VARIANT, W3_VARIANT, Sizes, ensure_store  # noqa: E402

MiB = 2**20
RESTART_EVERY = 45  # seconds between proxy restarts, at least
RESTART_AFTER = 1.0  # seconds into the launch
RSS_MARGIN_MIB, RSS_MARGIN_FRACTION = 8, 0.10
FD_MARGIN = 4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def proc_sample(pid: int) -> dict:
    """The daemon's resident memory, open descriptors and threads now."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return {"rss_kib": int(status["VmRSS"][0]), "hwm_kib": int(status["VmHWM"][0]),
            "threads": int(status["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def walk_share(root: Path) -> dict:
    """os.walk + lstat of share/, reading every 50th file."""
    t = time.perf_counter()
    entries = read = 0
    for dirpath, dirnames, filenames in os.walk(root / "share"):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            os.lstat(path)
            entries += 1
            if name in filenames and entries % 50 == 0:
                with open(path, "rb") as f:
                    read += len(f.read())
    return {"seconds": time.perf_counter() - t, "entries": entries, "bytes_read": read}


class DaemonGone(RuntimeError):
    pass


class Soak:
    def __init__(self, workdir: Path, info: dict, image: imagestore.ImageSide,
                 squids: list[SquidProxy], mount_extra: list[str]):
        self.info, self.image = info, image
        self.squids = squids
        self.cache = workdir / "soak-cache"
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mount = LazyMount(workdir / "soak-mnt", image.url, self.cache,
                               ["--public-key", str(image.public_key),
                                "--proxy", ";".join(s.url for s in squids), *mount_extra])
        self.samples: list[dict] = []
        self.failures: list[str] = []
        self.restarts: list[str] = []
        self.daemon_pid: int | None = None
        self.last_restart = time.monotonic()
        self.cycles = 0
        self.t0 = time.monotonic()

    @property
    def root(self) -> Path:
        return self.mount.mountpoint / "main"

    def step(self, name: str, fn) -> None:
        drop_caches()
        t = time.perf_counter()
        ok, detail = True, ""
        try:
            out = fn()
            detail = out if isinstance(out, str) else ""
        except (WorkloadFailed, OSError, subprocess.SubprocessError, RuntimeError) as e:
            ok, detail = False, f"{type(e).__name__}: {str(e)[-300:]}"
            self.failures.append(f"{self.minutes():.1f} min {name}: {detail}")
            log(f"FAILED {name}: {detail}")
        seconds = time.perf_counter() - t
        try:
            now = proc_sample(self.daemon_pid)
        except OSError:
            raise DaemonGone(f"the daemon (pid {self.daemon_pid}) is gone after {name}") from None
        sample = {"minute": round(self.minutes(), 3), "step": name, "seconds": round(seconds, 3),
                  "ok": ok, **now}
        if detail and ok:
            sample["detail"] = detail
        self.samples.append(sample)

    def minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60

    # -- the steps ------------------------------------------------------------------
    def launch(self) -> None:
        run_w1(self.root / W1_VARIANT, self.info)

    def launches(self) -> None:
        run_launches([self.root / W1_VARIANT] * self.info["sizes"]["w4_processes"], self.info)

    def walk(self) -> None:
        run_w3(self.root / W3_VARIANT, self.info)
        walk_share(self.root / W1_VARIANT)

    def clean(self) -> str:
        r = subprocess.run([CLI, "clean", "--cache", str(self.cache), "--max-size", "0", "--json"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"rez-lazyfs clean failed: {(r.stderr or r.stdout).strip()[-300:]}")
        return r.stdout.strip().replace("\n", " ")[:200]

    def launch_during_restart(self) -> str:
        """The launch (in a thread), with a squid restarted 1 s into it (from
        this thread: a server started from a thread gets SIGKILL when that
        thread ends, setpriv's --pdeathsig in tests/helpers/http.py)."""
        n = len(self.restarts)
        squid = self.squids[n % len(self.squids)]
        crash = (n // len(self.squids)) % 2 == 1
        what = f"squid {'AB'[n % len(self.squids)]} {'killed' if crash else 'stopped'} and started"
        self.restarts.append(f"{self.minutes():.1f} min: {what}")
        self.last_restart = time.monotonic()
        errors = []

        def launch():
            try:
                self.launch()
            except Exception as e:  # reported with the step, not lost in the thread
                errors.append(e)

        thread = threading.Thread(target=launch)
        thread.start()
        try:
            time.sleep(RESTART_AFTER)
            if crash:
                squid.kill()
            else:
                squid.stop()
            squid.start()
        finally:
            thread.join()
        if errors:
            raise errors[0]
        return what

    def run(self, minutes: float) -> None:
        self.mount.mount()
        self.daemon_pid = self.mount.pid
        log(f"mounted {self.image.url} at {self.mount.mountpoint} (daemon {self.daemon_pid}) via "
            + ";".join(s.url for s in self.squids))
        self.samples.append({"minute": 0.0, "step": "mount", "seconds": 0.0, "ok": True,
                             **proc_sample(self.daemon_pid)})
        while self.minutes() < minutes:
            self.cycles += 1
            if time.monotonic() - self.last_restart >= RESTART_EVERY:
                self.step("launch, squid restarted during it", self.launch_during_restart)
            else:
                self.step("launch", self.launch)
            if self.cycles % 4 == 0:
                self.step("launch x8", self.launches)
            self.step("walk", self.walk)
            if self.cycles % 3 == 0:
                self.step("clean", self.clean)
            last = self.samples[-1]
            log(f"cycle {self.cycles} at {self.minutes():.1f} min: rss {last['rss_kib'] / 1024:.1f} MiB, "
                f"fds {last['fds']}, threads {last['threads']}, {len(self.failures)} failed step(s)")

    def daemon_log(self) -> dict:
        """The daemon log's WARNING and ERROR lines: how many, and the first few."""
        try:
            text = (self.cache / "logs" / "daemon.log").read_text(errors="replace")
        except OSError as e:
            return {"error": str(e)}
        bad = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
        return {"lines": len(text.splitlines()), "warnings_errors": len(bad), "first": bad[:8]}

    def stats(self) -> dict | None:
        r = subprocess.run([CLI, "stats", "--cache", str(self.cache), "--json"], capture_output=True,
                           text=True)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            return None

    def close(self) -> None:
        try:
            self.mount.umount()
        finally:
            shutil.rmtree(self.cache, ignore_errors=True)


# -- verdict and report -------------------------------------------------------------
def verdict(samples: list[dict], warmup: float, window: float) -> dict:
    after = [s for s in samples if s["minute"] >= warmup]
    if not after:
        return {"flat": None, "why": "the soak ended before the warm-up did"}
    end = after[-1]["minute"]
    first = [s for s in after if s["minute"] < warmup + window]
    last = [s for s in after if s["minute"] >= end - window]
    rss_first = statistics.median(s["rss_kib"] for s in first) / 1024
    rss_last = statistics.median(s["rss_kib"] for s in last) / 1024
    fds_first, fds_last = max(s["fds"] for s in first), max(s["fds"] for s in last)
    # least squares slope of RSS over time after the warm-up, MiB per hour
    xs, ys = [s["minute"] / 60 for s in after], [s["rss_kib"] / 1024 for s in after]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    rss_limit = max(RSS_MARGIN_MIB, RSS_MARGIN_FRACTION * rss_first)
    rss_flat = rss_last - rss_first <= rss_limit
    fds_flat = fds_last <= fds_first + FD_MARGIN
    return {"flat": rss_flat and fds_flat, "rss_flat": rss_flat, "fds_flat": fds_flat,
            "rss_first_mib": rss_first, "rss_last_mib": rss_last, "rss_limit_mib": rss_limit,
            "rss_slope_mib_per_hour": slope, "fds_first_max": fds_first, "fds_last_max": fds_last,
            "first_window": [warmup, warmup + window], "last_window": [end - window, end]}


def markdown(report: dict) -> str:
    v, samples = report["verdict"], report["samples"]
    ok = {True: "PASS", False: "**MISS**", None: "not measured"}
    steps: dict[str, list] = {}
    for s in samples:
        if s["step"] != "mount":
            steps.setdefault(s["step"], []).append(s)
    lines = ["# Soak: the HTTP store through squid, proxies restarted", "",
             f"{report['generated']}; `{report['command']}`; rez-lazyfs {report['commit']}.", "",
             f"Ran {report['minutes_run']:.1f} min ({report['cycles']} cycles) of mixed steps on one mount "
             f"(daemon pid {report['daemon_pid']}) of the published store ({report['sizes_name']} sizes), "
             f"nginx across a {report['rtt_ms']} ms RTT / {report['rate_mbit']:g} Mbit/s link, "
             "`--proxy \"A;B\"` with two squids on the client side; page cache dropped before every "
             "step. Load (uptime) at the start "
             f"{report['load_start']}, at the end {report['load_end']} (other sessions share the "
             "machine: step times are not a benchmark).", "",
             "## Verdict", "",
             "| check | first window | last window | limit | result |", "|---|---|---|---|---|"]
    if v.get("flat") is not None:
        lines += [f"| daemon RSS (median MiB) | {v['rss_first_mib']:.1f} | {v['rss_last_mib']:.1f} | "
                  f"+{v['rss_limit_mib']:.1f} | {ok[v['rss_flat']]} |",
                  f"| open descriptors (max) | {v['fds_first_max']} | {v['fds_last_max']} | +{FD_MARGIN} | "
                  f"{ok[v['fds_flat']]} |", "",
                  f"Windows: minutes {v['first_window'][0]:.1f}-{v['first_window'][1]:.1f} (after a "
                  f"{report['warmup_minutes']:g} min warm-up) and {v['last_window'][0]:.1f}-"
                  f"{v['last_window'][1]:.1f}; RSS slope after the warm-up (least squares) "
                  f"{v['rss_slope_mib_per_hour']:+.1f} MiB/hour; peak RSS (VmHWM) "
                  f"{max(s['hwm_kib'] for s in samples) / 1024:.1f} MiB."]
    else:
        lines.append(f"| - | - | - | - | {v.get('why')} |")
    lines += ["", "## Steps", "", "| step | count | failed | median s | max s |", "|---|---|---|---|---|"]
    for name, ss in steps.items():
        secs = [s["seconds"] for s in ss]
        lines.append(f"| {name} | {len(ss)} | {sum(1 for s in ss if not s['ok'])} | "
                     f"{statistics.median(secs):.2f} | {max(secs):.2f} |")
    lines += ["", f"Proxy restarts ({len(report['restarts'])}, each during a launch): "
              + "; ".join(report["restarts"]) + "."]
    if report["failures"]:
        lines += ["", "Failed steps:", ""] + [f"- {f}" for f in report["failures"]]
    dl = report.get("daemon_log", {})
    if "warnings_errors" in dl:
        lines += ["", f"Daemon log: {dl['lines']} lines, {dl['warnings_errors']} WARNING/ERROR"
                  + (":" if dl["first"] else ".")] + [f"    {line[:240]}" for line in dl["first"]]
    st = report.get("stats")
    if st:
        lines += ["", "`rez-lazyfs stats --json` at the end: `" + json.dumps(st, sort_keys=True)[:1500] + "`"]
    lines += ["", "## Over time", "",
              "One row per minute: the last sample in it (after its last step).", "",
              "| minute | daemon RSS MiB | open descriptors | threads | steps so far | failed so far |",
              "|---|---|---|---|---|---|"]
    done = failed = 0
    rows: dict[int, str] = {}
    for s in samples:
        done += s["step"] != "mount"
        failed += not s["ok"]
        rows[int(s["minute"])] = (f"| {s['minute']:.1f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | "
                                  f"{s['threads']} | {done} | {failed} |")
    lines += [rows[m] for m in sorted(rows)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to soak [30]")
    ap.add_argument("--warmup-minutes", type=float, default=5.0, help="not judged [5]")
    ap.add_argument("--window-minutes", type=float, default=5.0, help="first and last windows compared [5]")
    ap.add_argument("--quick", action="store_true", help="the benchmark's --quick store")
    ap.add_argument("--rtt-ms", type=float, default=1.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-bench"),
                    help="the benchmark's workdir (store and image kept there)")
    ap.add_argument("--mount-option", action="append", default=[], metavar="ARG")
    ap.add_argument("--output", default="soak_http", help="results name in tests/bench/results")
    args = ap.parse_args(argv)
    # The code under test is what the daemon loaded when it started, not what
    # the checkout holds when the report is written half an hour later.
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if os.geteuid() != 0:
        print("soak_http.py needs root (network namespaces, drop_caches, FUSE mounts)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    sizes = Sizes.quick() if args.quick else Sizes()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store, info = ensure_store(workdir, sizes, log=log)
    info = {**info, "sizes": asdict(sizes)}
    with open("/proc/loadavg") as f:
        load_start = " ".join(f.read().split()[:3])
    net = netstore.NetStore(store, workdir / "sshfs", rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit,
                            sftp=False)
    image = soak = None
    squids: list[SquidProxy] = []
    interrupted = False
    try:
        net.start()
        image = imagestore.ImageSide(workdir, store, net, log=log)
        image.fresh_squid()
        squids = [image.squid, SquidProxy()]
        soak = Soak(workdir, info, image, squids, args.mount_option)
        try:
            soak.run(args.minutes)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: writing what was measured")
        except DaemonGone as e:
            soak.failures.append(str(e))
            log(f"FAILED: {e}")
        stats, daemon_log = soak.stats(), soak.daemon_log()
    finally:
        if soak is not None:
            try:
                soak.close()
            except Exception:
                traceback.print_exc()
        for squid in squids[1:]:
            squid.close()
        if image is not None:
            image.close()
        net.close()
    with open("/proc/loadavg") as f:
        load_end = " ".join(f.read().split()[:3])
    minutes_run = soak.samples[-1]["minute"]
    report = {"generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "tests/bench/soak_http.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": commit, "minutes_asked": args.minutes, "minutes_run": minutes_run,
              "interrupted": interrupted, "cycles": soak.cycles,
              "warmup_minutes": args.warmup_minutes, "window_minutes": args.window_minutes,
              "sizes_name": "quick" if args.quick else "full", "rtt_ms": args.rtt_ms,
              "rate_mbit": args.rate_mbit, "daemon_pid": soak.daemon_pid,
              "load_start": load_start, "load_end": load_end, "restarts": soak.restarts,
              "failures": soak.failures, "stats": stats, "daemon_log": daemon_log,
              "verdict": verdict(soak.samples, args.warmup_minutes, args.window_minutes),
              "samples": soak.samples}
    out = HERE / "results"
    (out / f"{args.output}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / f"{args.output}.md").write_text(md)
    print(md)
    log(f"wrote {out / args.output}.json, .md")
    return 0 if report["verdict"].get("flat") else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
