"""Block-size measurement: what each block size costs on the read paths that matter.

For each block size, on a fresh cache, through a real mount:
  * launch-like scattered reads (16 KiB at random offsets of a 256 MiB binary)
    and all of 2,000 small files: store requests and bytes fetched vs bytes read;
  * a sequential read of the 256 MiB file, cold, then warm after a remount
    (kernel page cache empty, blocks on local disk).
The store here is local disk, so cold *time* is not the network's; the table
adds a modelled cold time for a 1 ms RTT, 1 Gbit/s store from the measured
request and byte counts (requests x RTT / parallelism + bytes / bandwidth).

Run: .venv/bin/python tests/bench/block_size.py [--sizes 64K,128K,...]
Writes tests/bench/results/block_size.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "rez-lazyfs")
BIG = 256 * 2**20
SCATTERED_READS, SCATTERED_SIZE = 200, 16 * 1024
SMALL_FILES = 2000
RTT, BANDWIDTH, PARALLEL = 0.001, 125e6, 1  # a launch reads mostly one file at a time


def build_store(root: Path) -> None:
    rng = random.Random(7)
    (root / "app/1.0/bin").mkdir(parents=True)
    with open(root / "app/1.0/bin/big", "wb") as f:
        for _ in range(BIG // 2**20):
            f.write(rng.randbytes(2**20))
    for n in range(SMALL_FILES):
        p = root / f"app/1.0/lib/d{n // 100:02d}/f{n:04d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randrange(1024, 8192)))


def mount(mnt: Path, store: Path, cache: Path, bs: str) -> None:
    subprocess.run([CLI, "mount", str(mnt), "--repo", f"main={store}", "--cache", str(cache),
                    "--block-size", bs], check=True)


def umount(mnt: Path) -> None:
    subprocess.run([CLI, "umount", str(mnt)], check=True)


def stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.rezlazyfs.stats"))


def read_file(path: Path, chunk: int = 2**20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            n += len(data)
    return n


def measure(bs: str, store: Path, work: Path) -> dict:
    mnt, cache = work / f"mnt-{bs}", work / f"cache-{bs}"
    mnt.mkdir()
    app = mnt / "main/app/1.0"
    mount(mnt, store, cache, bs)
    try:
        rng = random.Random(11)
        t = time.perf_counter()
        read = 0
        with open(app / "bin/big", "rb", buffering=0) as f:
            for _ in range(SCATTERED_READS):
                f.seek(rng.randrange(0, BIG - SCATTERED_SIZE))
                read += len(f.read(SCATTERED_SIZE))
        for p in sorted((app / "lib").rglob("*.py")):
            read += read_file(p)
        launch_s = time.perf_counter() - t
        s = stats(mnt)
        launch = {"bytes_read": read, "store_reads": s["store_reads"],
                  "store_bytes": s["store_bytes"], "local_seconds": launch_s}
        t = time.perf_counter()
        n = read_file(app / "bin/big")
        cold_seq = n / (time.perf_counter() - t) / 2**20
        s2 = stats(mnt)
        seq_requests = s2["store_reads"] - s["store_reads"]
        seq_bytes = s2["store_bytes"] - s["store_bytes"]
    finally:
        umount(mnt)
    mount(mnt, store, cache, bs)  # fresh kernel page cache, blocks on disk
    try:
        t = time.perf_counter()
        n = read_file(mnt / "main/app/1.0/bin/big")
        warm_seq = n / (time.perf_counter() - t) / 2**20
    finally:
        umount(mnt)
    model = lambda reqs, nbytes: reqs * RTT / PARALLEL + nbytes / BANDWIDTH  # noqa: E731
    return {"block_size": bs, "launch": launch,
            "launch_amplification": launch["store_bytes"] / launch["bytes_read"],
            "launch_modelled_network_seconds": model(launch["store_reads"], launch["store_bytes"]),
            "sequential_cold_mib_s_local": cold_seq,
            "sequential_modelled_network_seconds": model(seq_requests, seq_bytes),
            "sequential_warm_mib_s": warm_seq}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32K,64K,128K,256K,512K,1M")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlfs-bs-") as tmp:
        work = Path(tmp)
        build_store(work / "store")
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
        t = time.perf_counter()
        read_file(work / "store/app/1.0/bin/big")
        native = BIG / (time.perf_counter() - t) / 2**20
        rows = [measure(bs, work / "store", work) for bs in args.sizes.split(",")]
    result = {"native_sequential_mib_s": native, "rows": rows,
              "model": {"rtt_s": RTT, "bandwidth_bytes_s": BANDWIDTH, "parallel": PARALLEL}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results/block_size.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| block | launch store reads | launch MiB fetched / read | amplification | "
             "launch over 1 ms / 1 Gbit (modelled s) | 256 MiB seq over network (modelled s) | "
             "seq warm MiB/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        la = r["launch"]
        lines.append(f"| {r['block_size']} | {la['store_reads']} | "
                     f"{la['store_bytes'] / 2**20:.1f} / {la['bytes_read'] / 2**20:.1f} | "
                     f"{r['launch_amplification']:.2f}x | {r['launch_modelled_network_seconds']:.2f} | "
                     f"{r['sequential_modelled_network_seconds']:.2f} | {r['sequential_warm_mib_s']:.0f} |")
    lines.append(f"\nnative sequential read of the same file (page cache dropped): {native:.0f} MiB/s")
    (HERE / "results/block_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
