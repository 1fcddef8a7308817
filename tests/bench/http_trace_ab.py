"""The W1 launch cold from a published image that carries its trace, with the
trace's packs (this checkout's publish) and without them (the same trace
published by a commit before packs), interleaved: what packs do to a traced
cold start through squid, cold (the first node) and warm (every node after).

    .venv/bin/python tests/bench/http_trace_ab.py --base-cli DIR/env-base/bin/rez-lazyfs
        [--workdir DIR] [--runs N] [--output FILE]

As root, on the store run.py built in WORKDIR (default sizes): the W1
variant alone (a copy, as run.py's publish timing makes), the W1 launch's
trace (lazy-cold-trace-kept's) with each file's identity that copy's, both
images served by one nginx behind the bench's link. Each round, per image: a
fresh squid; node 1 launches on a fresh cache (squid cold), then node 2 on
another (squid warm). This checkout's daemon mounts both images (without
packs it fetches chunk by chunk, as before them). Prints a JSON row per
launch and the medians.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import profile_warm  # noqa: E402
from contenders import CLI, WORKLOADS, LazyMount, drop_caches  # noqa: E402
from helpers.http import SquidProxy  # noqa: E402
from replay_alone import KEPT, bench_on, write_result  # noqa: E402
from workloads import W1_VARIANT  # noqa: E402

from cachecore.model import identity_of_stat  # noqa: E402
from cachecore.trace import decode, encode  # noqa: E402


def local_trace(recorded: Path, repo: Path, out: Path) -> None:
    """The recorded trace (through sshfs: mtimes in whole seconds) with the
    identities of the files in `repo`, which publish checks them against."""
    traces = decode(recorded.read_bytes())
    for t in traces:
        t.files = [(path, identity_of_stat((repo / t.root.decode() / path.decode()).lstat()))
                   for path, _ in t.files]
    out.write_bytes(encode(traces))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rez-lazyfs-tbench"))
    ap.add_argument("--base-cli", type=Path, required=True,
                    help="rez-lazyfs of a commit before packs (code_contender.sh's env-NAME/bin)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    work = args.workdir / "http-trace"
    repo, served, key = work / "repo", work / "served", work / "key"
    rows = []
    with bench_on(args.workdir) as (bench, _):
        recorded = bench._ensure_trace(KEPT)
        shutil.rmtree(work, ignore_errors=True)
        (repo / W1_VARIANT).parent.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(bench.net.store / W1_VARIANT), str(repo / W1_VARIANT)], check=True)
        local_trace(recorded, repo, work / "w1.trace")
        subprocess.run([CLI, "keygen", str(key)], check=True, capture_output=True)
        published = {}
        for name, cli in (("packs", CLI), ("no-packs", str(args.base_cli))):
            r = subprocess.run([cli, "publish", str(repo), str(served / name), "--key", str(key),
                                "--trace", str(work / "w1.trace"), "--json"],
                               check=True, capture_output=True, text=True,
                               cwd="/")  # python -m puts the working directory first
            published[name] = json.loads(r.stdout)
            print(name, {k: published[name].get(k) for k in ("files", "traces", "packs",
                                                             "objects_new", "bytes_new")})
        url = bench.net.serve_http(served)  # closed with the link
        for run in range(args.runs):
            for name in published:
                squid = SquidProxy()
                try:
                    for node in (1, 2):
                        bench._unmount()
                        cache = work / f"cache-{node}"
                        shutil.rmtree(cache, ignore_errors=True)
                        drop_caches()
                        mark = len(squid.log()), len(bench.net.origin.log())
                        mount = bench._add_mount(LazyMount(
                            bench.lazy_mp, f"{url}/{name}", cache,
                            ["--public-key", f"{key}.pub", "--proxy", squid.url]))
                        try:
                            cpu0 = profile_warm.cpu_times(mount.pid)
                            out = bench._run_on("W1", WORKLOADS["W1"], mount)
                            cpu = sum(b - a for a, b in
                                      zip(cpu0, profile_warm.cpu_times(mount.pid)))
                        finally:
                            bench._unmount()
                        served_log = bench.net.origin.log()[mark[1]:]
                        row = {"run": run + 1, "image": name, "node": node,
                               "squid": "cold" if node == 1 else "warm",
                               "seconds": round(out["seconds"], 3),
                               "daemon_cpu_seconds": round(cpu, 2),
                               "squid_requests": len(squid.log()) - mark[0],
                               "origin_requests": len(served_log),
                               "origin_mib": round(sum(r.bytes for r in served_log) / 2**20, 1),
                               "replay_blocks": out["store"].get("replay_blocks"),
                               "store_reads": out["store"].get("store_reads")}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    squid.close()
    summary = {f"{name} squid {squid}": {
        k: statistics.median(r[k] for r in rows if r["image"] == name and r["squid"] == squid)
        for k in ("seconds", "daemon_cpu_seconds", "squid_requests", "origin_requests")}
        for name in ("packs", "no-packs") for squid in ("cold", "warm")}
    write_result(summary, rows, args.output, published=published)
    return 0


if __name__ == "__main__":
    sys.exit(main())
