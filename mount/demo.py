"""`rez-lazyfs demo`: the whole story on one machine in under a minute.

Builds the sample repository as a "store", mounts it, launches `sampleapp`
through the real rez-env cold, warm, and warm again after a remount (kernel
caches empty, block cache on disk), and prints time and store traffic of each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import RepoConfig, Settings
from .daemon import mount_fs, unmount
from .errors import UserError
from .sample import build_sample_repository


# The counters the demo's table shows (the stats also hold latencies, and
# the requests per handler: not differences to take).
COUNTED = ("store_reads", "store_listings", "store_bytes")


def _stats(mountpoint: Path) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.rezlazyfs.stats"))


def _launch(packages_path: Path, workdir: Path) -> tuple[float, str]:
    rez_env = shutil.which("rez-env", path=os.path.dirname(sys.executable)) or shutil.which("rez-env")
    if rez_env is None:
        raise UserError("rez-env not found: install rez (pip install 'rez-lazyfs[rez]')")
    config = workdir / "rezconfig.py"
    config.write_text("package_caching = False\n")
    env = {**os.environ, "REZ_PACKAGES_PATH": str(packages_path), "REZ_CONFIG_FILE": str(config),
           "REZ_DISABLE_HOME_CONFIG": "1"}
    start = time.perf_counter()
    result = subprocess.run([rez_env, "sampleapp", "--", "sampleapp"], env=env,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise UserError(f"the launch failed: {result.stderr.strip().splitlines()[-1:]}")
    return elapsed, result.stdout.strip()


def run_demo(workdir: Path | None = None, keep: bool = False) -> None:
    base = Path(workdir or tempfile.mkdtemp(prefix="rez-lazyfs-demo-"))
    store, mnt, cache = base / "store", base / "mnt", base / "cache"
    for d in (store, mnt):
        d.mkdir(parents=True, exist_ok=True)
    print(f"building a sample Rez repository in {store} ...")
    build_sample_repository(store)
    total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    files = sum(1 for p in store.rglob("*") if p.is_file())
    print(f"  {files} files, {total / 2**20:.1f} MiB (what a whole-variant copy would move)")

    settings = Settings(mountpoint=str(mnt), repos=[RepoConfig("main", str(store))],
                        cache_dir=str(cache))
    rows = []
    try:
        direct, output = _launch(store, base)
        rows.append(("direct from the store", direct, None))
        mount_fs(settings)
        for label in ("rez-lazyfs cold (empty cache)", "rez-lazyfs warm (same mount)"):
            before = _stats(mnt)
            elapsed, output = _launch(mnt / "main", base)
            after = _stats(mnt)
            rows.append((label, elapsed, {k: after[k] - before[k] for k in COUNTED}))
        unmount(str(mnt))
        mount_fs(settings)
        elapsed, output = _launch(mnt / "main", base)
        rows.append(("rez-lazyfs warm (remounted, disk cache)", elapsed, _stats(mnt)))
    finally:
        try:
            unmount(str(mnt))
        except UserError:
            pass
    print(f"  {output}")
    print()
    print(f"{'launch of sampleapp via rez-env':42} {'seconds':>8} {'store reads':>12} {'MiB fetched':>12}")
    for label, elapsed, delta in rows:
        reads = f"{delta['store_reads'] + delta['store_listings']:>12}" if delta else f"{'-':>12}"
        fetched = f"{delta['store_bytes'] / 2**20:>12.1f}" if delta else f"{'-':>12}"
        print(f"{label:42} {elapsed:>8.2f} {reads} {fetched}")
    print("\n(store reads = block reads + directory listings; here the 'store' is local disk,")
    print(" so 'direct' is the best case: over NFS every one of those reads is a round trip)")
    if keep:
        print(f"\nkept {base}")
    else:
        shutil.rmtree(base)
