"""HTTP client measurement: how fast the HTTP store's download manager
(cachecore/stores/download.py) GETs objects from nginx through squid.

A real nginx origin and a real squid (tests/helpers/http.py) on loopback;
squid is warmed first, so every measured GET is a squid hit and the figure
is the client's (and squid's) cost, not the origin's. Each run: 16 threads
for DURATION seconds, each walking its own share of the objects, so no two
concurrent GETs share a path (the single flight never merges). Contenders:

* ``Downloader.get``: the download manager (pycurl, a pool of easy handles,
  single flight, counters, route planning).
* ``pycurl, one easy handle per thread``: the bare client, the ceiling.
* ``Downloader.get, one trio thread hop per get``: as the store calls it from
  the event loop (trio.to_thread.run_sync under a CapacityLimiter of 16).
* ``urllib3 ProxyManager``: the other client measured in shared/notes/http.md.

4 KiB objects give GET/s; 128 KiB objects (the block size) give MB/s.
Medians of RUNS runs.

Run: .venv/bin/python tests/bench/http_client.py
Writes tests/bench/results/http_client.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # helpers
sys.path.insert(0, str(HERE.parents[1]))  # cachecore

import pycurl  # noqa: E402
import trio  # noqa: E402
import urllib3  # noqa: E402

from cachecore.stores.download import Downloader  # noqa: E402
from helpers.http import NginxOrigin, SquidProxy  # noqa: E402

THREADS = 16
SIZES = {"4 KiB": (4096, 16384), "128 KiB": (128 * 1024, 512)}  # object size, how many


def populate(root: Path, size: int, count: int, tag: str) -> list[str]:
    paths = []
    for n in range(count):
        rel = f"objects/{n % 256:02x}/{tag}{n:06d}"
        p = root / rel
        if not p.parent.is_dir():
            p.parent.mkdir(parents=True, mode=0o755)
        p.write_bytes(n.to_bytes(4, "big") * (size // 4))
        paths.append(rel)
    for d in [root / "objects", *(root / "objects").iterdir()]:
        d.chmod(0o755)
    return paths


def shares(paths: list[str]) -> list[list[str]]:
    return [paths[i::THREADS] for i in range(THREADS)]


def run_threads(work, paths: list[str], duration: float) -> tuple[int, int, float]:
    """work(share, stop_at) -> (gets, bytes), in THREADS threads."""
    results = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + duration

    def body(share):
        got = work(share, stop_at)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=body, args=(s,)) for s in shares(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return sum(g for g, _ in results), sum(b for _, b in results), elapsed


def downloader_work(dl: Downloader):
    def work(share, stop_at):
        gets = nbytes = 0
        while time.monotonic() < stop_at:
            for path in share:
                nbytes += len(dl.get(path).data)
                gets += 1
                if gets % 64 == 0 and time.monotonic() >= stop_at:
                    break
        return gets, nbytes
    return work


def bare_pycurl_work(base_url: str, proxy: str):
    def work(share, stop_at):
        c = pycurl.Curl()
        c.setopt(pycurl.PROXY, proxy)
        c.setopt(pycurl.NOSIGNAL, 1)
        gets = nbytes = 0
        while time.monotonic() < stop_at:
            for path in share:
                buf = io.BytesIO()
                c.setopt(pycurl.URL, f"{base_url}/{path}")
                c.setopt(pycurl.WRITEDATA, buf)
                c.perform()
                assert c.getinfo(pycurl.RESPONSE_CODE) == 200
                nbytes += buf.tell()
                gets += 1
                if gets % 64 == 0 and time.monotonic() >= stop_at:
                    break
        c.close()
        return gets, nbytes
    return work


def urllib3_work(base_url: str, proxy: str):
    manager = urllib3.ProxyManager(proxy, maxsize=THREADS, block=True)

    def work(share, stop_at):
        gets = nbytes = 0
        while time.monotonic() < stop_at:
            for path in share:
                r = manager.request("GET", f"{base_url}/{path}")
                assert r.status == 200
                nbytes += len(r.data)
                gets += 1
                if gets % 64 == 0 and time.monotonic() >= stop_at:
                    break
        return gets, nbytes
    return work


def run_trio_hops(dl: Downloader, paths: list[str], duration: float) -> tuple[int, int, float]:
    totals = [0, 0]

    async def main():
        limiter = trio.CapacityLimiter(THREADS)
        stop_at = trio.current_time() + duration

        async def task(share):
            while trio.current_time() < stop_at:
                for path in share:
                    d = await trio.to_thread.run_sync(dl.get, path, limiter=limiter)
                    totals[0] += 1
                    totals[1] += len(d.data)
                    if trio.current_time() >= stop_at:
                        break

        async with trio.open_nursery() as nursery:
            for share in shares(paths):
                nursery.start_soon(task, share)

    start = time.monotonic()
    trio.run(main)
    return totals[0], totals[1], time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    rows = []
    load_before = os.getloadavg()[0]
    with NginxOrigin() as origin, SquidProxy() as squid:
        for label, (size, count) in SIZES.items():
            tag = f"s{size}-"
            paths = populate(origin.root, size, count, tag)
            with Downloader(origin.url, squid.url) as warm:
                for path in paths:
                    warm.get(path)
            contenders = {
                "Downloader.get": lambda: _with_downloader(origin, squid, lambda dl: run_threads(
                    downloader_work(dl), paths, args.duration)),
                "pycurl, one easy handle per thread": lambda: run_threads(
                    bare_pycurl_work(origin.url, squid.url), paths, args.duration),
                "Downloader.get, one trio thread hop per get": lambda: _with_downloader(
                    origin, squid, lambda dl: run_trio_hops(dl, paths, args.duration)),
                "urllib3 ProxyManager, pool of 16": lambda: run_threads(
                    urllib3_work(origin.url, squid.url), paths, args.duration),
            }
            runs = {name: [] for name in contenders}
            for _ in range(args.runs):  # interleaved: the machine's load drifts
                for name, run in contenders.items():
                    gets, nbytes, elapsed = run()
                    runs[name].append((gets / elapsed, nbytes / elapsed / 1e6))
            for name, results in runs.items():
                rows.append({"size": label, "client": name,
                             "get_per_s": statistics.median(r[0] for r in results),
                             "mb_per_s": statistics.median(r[1] for r in results),
                             "runs_get_per_s": [round(r[0]) for r in results]})
                print(f"{label:8} {name:46} {rows[-1]['get_per_s']:9.0f} GET/s "
                      f"{rows[-1]['mb_per_s']:8.1f} MB/s  {rows[-1]['runs_get_per_s']}", flush=True)
            misses = [r for r in squid.requests(tag) if not r.hit]
            reached_origin = [p for p in origin.requests() if tag in p]
            rows.append({"size": label, "objects": count, "origin_requests": len(reached_origin),
                         "squid_misses": len(misses)})
    write_results(rows, args, (load_before, os.getloadavg()[0]))


def _with_downloader(origin, squid, run):
    with Downloader(origin.url, squid.url) as dl:
        result = run(dl)
        assert dl.counters()["failures"] == 0, dl.counters()
        return result


def write_results(rows: list[dict], args, load: tuple[float, float]) -> None:
    out = HERE / "results"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                          text=True).stdout.strip()
    meta = {"machine": f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "pycurl": pycurl.version, "code": head, "threads": THREADS, "duration_s": args.duration,
            "runs": args.runs, "when": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_1min": {"before": load[0], "after": load[1]}}
    (out / "http_client.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# HTTP client: GETs from nginx through squid (squid warm: every GET a hit)", "",
             f"Generated by `tests/bench/http_client.py` ({meta['when']}, code {head}); {meta['machine']}; "
             f"{meta['pycurl']}.", "",
             f"{THREADS} threads, {args.duration:g} s per run, median of {args.runs} runs; nginx 1.22 "
             "(one process) and squid 5.7 on loopback, all on the same 2 cores as the client; 1-minute "
             f"load average {load[0]:.1f} before, {load[1]:.1f} after (other test runs share the "
             "machine: compare rows of one run, not runs).", "",
             "| objects | client | GET/s | MB/s | GET/s of each run |", "|---|---|---|---|---|"]
    for r in rows:
        if "client" in r:
            lines.append(f"| {r['size']} | {r['client']} | {r['get_per_s']:,.0f} | {r['mb_per_s']:,.1f} | "
                         f"{', '.join(f'{n:,}' for n in r['runs_get_per_s'])} |")
    lines += [""]
    by = {(r["size"], r["client"]): r["get_per_s"] for r in rows if "client" in r}
    for size in SIZES:
        ours = by[(size, "Downloader.get")]
        lines.append(
            f"* {size}: the download manager makes {ours / by[(size, 'pycurl, one easy handle per thread')]:.0%} "
            f"of the bare client's GET/s, {ours / by[(size, 'urllib3 ProxyManager, pool of 16')]:.1f}x "
            f"urllib3's; called through a trio thread hop per get, "
            f"{by[(size, 'Downloader.get, one trio thread hop per get')] / ours:.0%} of its direct rate.")
    for r in rows:
        if "origin_requests" in r:
            lines.append(f"* {r['size']}: {r['objects']} objects; {r['origin_requests']} origin requests and "
                         f"{r['squid_misses']} squid misses over the warm-up and all runs.")
    (out / "http_client.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
