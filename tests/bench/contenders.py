"""The contenders and how each one runs a workload.

    native          the tree on local disk (the store directory itself), page cache dropped
    direct          straight from the sshfs store, sshfs remounted (its caches cold), page cache dropped
    copy            Rez's package cache: PackageCache.add_variant() (rez's own API, a
                    shutil.copytree of the variant from the sshfs store to local disk),
                    then the workload on the copy; time = copy + workload
    lazy-cold       rez-lazyfs on the sshfs store, a fresh --cache dir, page cache dropped
    lazy-cold-trace lazy-cold with W1's launch trace seeded into the fresh cache
                    (`rez-lazyfs seed`): recorded once per bench run, not timed, by
                    `rez-lazyfs trace record` on a cold mount (launchtrace.py); W1, W4
    lazy-cold-trace-kept
                    the same through an sshfs mount of its own, mounted once and never
                    remounted: sshfs numbers inodes in lookup order, so after a remount
                    a file's identity (size, mtime, ctime, inode) is not the one the
                    trace recorded and its replay skips it; a kept mount (remember=-1)
                    keeps the numbers, as an NFS store keeps its inode numbers. Cold
                    all the same: page cache dropped, and sshfs's own caches expired
                    (unused for longer than its 20 s cache timeout) before each run
    lazy-cold-trace-kept-b
                    lazy-cold-trace-kept (its trace, its sshfs mount) with the mount
                    arguments of run.py's --ab-mount-option as well: an A/B of a lever,
                    interleaved with the A runs
    lazy-warm-disk  the same cache, remounted, page cache dropped
    lazy-warm-hot   the same mount again, right after lazy-warm-disk (page cache hot)

    The published image over HTTP (imagestore.py: nginx across the link, squid
    on this side), page cache dropped, each a node of its own (mount + cache;
    W4: 8 nodes at once, one launch each: 8 machines starting together):
    http-cold-squid-cold   fresh rez-lazyfs caches, squid replaced by an empty one
    http-cold-squid-warm   fresh rez-lazyfs caches, squid holding what an earlier
                           node read (the squid-cold run before it, else a node
                           run first, not recorded)
    http-warm              node 0's cache, filled by the cold run, remounted
                           (W4: 8 launches at once on it, as lazy-warm-disk)

    The peers (peers.py: how each is run), the workload on their mount point:
    rclone-cold       `rclone mount --vfs-cache-mode full` over the sshfs store's
                      link and sshd (its sftp backend), an empty VFS cache, a
                      fresh mount, page cache dropped
    rclone-warm-disk  its VFS cache kept from a cold run, remounted, page cache dropped
    rclone-warm-hot   the same mount again, right after rclone-warm-disk (page cache hot)
    bindfs-warm-disk  `bindfs -o ro` over the store directory itself (no network),
                      remounted, page cache dropped: a C FUSE filesystem's floor
    bindfs-hot        the same mount again, right after bindfs-warm-disk

Store traffic: for rez-lazyfs from its stats xattr (store_reads, store_bytes,
store_listings); for every contender that touches the network, also the SFTP
requests and the bytes on the client veth (NetStore.counters), counted until
the link is quiet (a peer's read-ahead may outlast the workload); for HTTP,
the requests squid answered and those that reached the origin (ImageSide.since).

This file is also run as `python contenders.py rez-cache-add REPO NAME VERSION CACHE`:
Rez's package cache copying one variant, in its own process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launchtrace  # noqa: E402
import peers  # noqa: E402
from netstore import is_mounted  # noqa: E402
from workloads import (  # noqa: E402
    W1_VARIANT, W2_FILE, W2_VARIANT, W3_DIR, W3_VARIANT, launch_argv)

CLI = str(Path(sys.executable).parent / "rez-lazyfs")
CONTENDERS = ["native", "direct", "copy", "lazy-cold", "lazy-cold-trace", "lazy-cold-trace-kept",
              "lazy-cold-trace-kept-b", "lazy-warm-disk", "lazy-warm-hot",
              "http-cold-squid-cold", "http-cold-squid-warm", "http-warm",
              "rclone-cold", "rclone-warm-disk", "rclone-warm-hot", "bindfs-warm-disk", "bindfs-hot"]
HTTP_CONTENDERS = [c for c in CONTENDERS if c.startswith("http-")]
PEER_CONTENDERS = [c for c in CONTENDERS if c.startswith(tuple(f"{p}-" for p in peers.APT_PACKAGES))]
LABELS = {"native": "native (local disk, page cache dropped)",
          "direct": "direct from the sshfs store (cold)",
          "copy": "Rez package cache: copy variant, then run",
          "lazy-cold": "rez-lazyfs cold (empty cache)",
          "lazy-cold-trace": "rez-lazyfs cold, launch trace seeded",
          "lazy-cold-trace-kept": "rez-lazyfs cold, launch trace seeded, sshfs kept (stable inodes)",
          "lazy-cold-trace-kept-b": "the same, B: with --ab-mount-option",
          "lazy-warm-disk": "rez-lazyfs warm, page cache dropped",
          "lazy-warm-hot": "rez-lazyfs warm, page cache hot",
          "http-cold-squid-cold": "HTTP image, cold, squid cold",
          "http-cold-squid-warm": "HTTP image, cold, squid warm (a second node)",
          "http-warm": "HTTP image, warm, page cache dropped",
          "rclone-cold": "rclone VFS cache (full) over SFTP, cold (empty cache)",
          "rclone-warm-disk": "rclone VFS cache (full), warm, page cache dropped",
          "rclone-warm-hot": "rclone VFS cache (full), warm, page cache hot",
          "bindfs-warm-disk": "bindfs over local disk, page cache dropped",
          "bindfs-hot": "bindfs over local disk, page cache hot"}
TRACED_WORKLOADS = ("W1", "W4")  # lazy-cold-trace*: the launches (W1's trace)
TRACE_CONTENDERS = ["lazy-cold-trace", "lazy-cold-trace-kept", "lazy-cold-trace-kept-b"]
# sshfs keeps attributes and listings this long (its dcache_timeout, 20 s by
# default): a kept sshfs mount unused for longer answers nothing from them
SSHFS_CACHE_SECONDS = 21.0
VARIANT_OF = {"W1": W1_VARIANT, "W2": W2_VARIANT, "W3": W3_VARIANT, "W4": W1_VARIANT}
MARKER_VAR = "REZ_LAZYFS_BENCH_MARKER"
STATS_XATTR = "user.rezlazyfs.stats"
DAEMON_EXIT_TIMEOUT = 60
PEER_MOUNT_TIMEOUT = 30


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class WorkloadFailed(RuntimeError):
    pass


# -- the workloads, on a variant root -------------------------------------------
def _check_launch(out: str, expect: dict) -> dict:
    try:
        got = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise WorkloadFailed(f"the launch printed {out[-300:]!r}") from None
    if got["modules"] != expect["modules"] or got["binary_bytes"] != expect["binary_bytes"]:
        raise WorkloadFailed(f"the launch loaded {got}, expected {expect}")
    return got


def run_w1(root: Path, info: dict) -> dict:
    argv, env = launch_argv(root)
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/")
    seconds = time.perf_counter() - t
    if r.returncode:
        raise WorkloadFailed(f"the launch failed: {r.stderr.strip()[-500:]}")
    _check_launch(r.stdout, info["W1"])
    return {"seconds": seconds, "bytes_read": info["W1"]["launch_bytes"]}


def run_w4(root: Path, info: dict) -> dict:
    return run_launches([root] * info["sizes"]["w4_processes"], info)


def run_launches(roots: list[Path], info: dict) -> dict:
    """One W1 launch from each root, all at once."""
    t = time.perf_counter()
    procs = []
    for root in roots:
        argv, env = launch_argv(root)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd="/"))
    each = []
    for p in procs:
        out, err = p.communicate()
        each.append(time.perf_counter() - t)
        if p.returncode:
            raise WorkloadFailed(f"a launch failed: {err.strip()[-500:]}")
        _check_launch(out, info["W1"])
    return {"seconds": max(each), "per_process_seconds": each,
            "bytes_read": len(roots) * info["W1"]["launch_bytes"]}


def _runner(*args: str) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "workloads.py"), *args],
                       capture_output=True, text=True, cwd="/")
    if r.returncode:
        raise WorkloadFailed(f"{args[0]} failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def run_w2(root: Path, info: dict) -> dict:
    got = _runner("seqread", str(root / W2_FILE))
    if got["bytes"] != info["W2"]["file_bytes"]:
        raise WorkloadFailed(f"read {got['bytes']} bytes, expected {info['W2']['file_bytes']}")
    return {"seconds": got["seconds"], "bytes_read": got["bytes"]}


def run_w3(root: Path, info: dict) -> dict:
    got = _runner("walk", str(root / W3_DIR))
    if got["entries"] != info["W3"]["entries"]:
        raise WorkloadFailed(f"walked {got['entries']} entries, expected {info['W3']['entries']}")
    return {"seconds": got["seconds"], "entries": got["entries"], "bytes_read": 0}


WORKLOADS = {"W1": run_w1, "W2": run_w2, "W3": run_w3, "W4": run_w4}


# -- processes of ours ----------------------------------------------------------
def pids_with_marker(marker: str) -> list[int]:
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    """The process serving a mount (once mounted): its CPU time and peak RSS."""

    pid: int | None = None

    def peak_rss_kib(self) -> int | None:
        return vm_hwm_kib(self.pid) if self.pid else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid else None


class LazyMount(Daemon):
    """One `rez-lazyfs mount` of a store (the sshfs store's path, or the
    image's URL), its daemon found by an env marker; `cli` is the rez-lazyfs
    command (another environment's, say one with another pyfuse3)."""

    def __init__(self, mountpoint: Path, store: Path, cache: Path, extra: list[str],
                 cli: str = CLI, env: dict[str, str] | None = None):
        """env: variables the daemon gets besides ours (PYTHONPATH: another
        checkout's code; profile_warm.py's hook)."""
        self.mountpoint, self.store, self.cache, self.extra = mountpoint, store, cache, extra
        self.repo_root = mountpoint / "main"  # the store's root, mirrored
        self.cli = cli
        self.env = env or {}
        self.marker = uuid.uuid4().hex

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, MARKER_VAR: self.marker}
        r = subprocess.run([self.cli, "mount", str(self.mountpoint), "--repo", f"main={self.store}",
                            "--cache", str(self.cache), *self.extra],
                           env=env, capture_output=True, text=True)
        if r.returncode:
            raise WorkloadFailed(f"rez-lazyfs mount failed: {(r.stderr or r.stdout).strip()[-500:]}")
        # the daemon's process title, over its command line: `rez-lazyfs mount MP ...`
        daemons = [p for p in pids_with_marker(self.marker)
                   if _cmdline(p).startswith(b"rez-lazyfs mount ")]
        if len(daemons) != 1:
            raise WorkloadFailed(f"expected one rez-lazyfs daemon with our marker, found {daemons}")
        self.pid = daemons[0]

    def stats(self) -> dict:
        return json.loads(os.getxattr(self.mountpoint, STATS_XATTR))

    def umount(self) -> None:
        if is_mounted(self.mountpoint):
            r = subprocess.run([self.cli, "umount", str(self.mountpoint)], capture_output=True,
                               text=True)
            if r.returncode:
                subprocess.run([self.cli, "umount", "--lazy", str(self.mountpoint)],
                               capture_output=True)
        # the daemon flushes its index and exits: wait for it, so the next
        # mount of this cache does not race it
        deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
        while self.pid and time.monotonic() < deadline:
            if not pids_with_marker(self.marker):
                break
            time.sleep(0.05)
        self.kill_leftovers()
        self.pid = None

    def kill_leftovers(self) -> None:
        for pid in pids_with_marker(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class PeerMount(Daemon):
    """A peer's FUSE filesystem (peers.py): `argv` run in the foreground as a
    child of ours, mounting the store's root at `mountpoint`; its output
    appended to `log`. Stopped by unmounting, then by its PID."""

    def __init__(self, mountpoint: Path, argv: list[str], log: Path):
        self.mountpoint = self.repo_root = mountpoint
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen | None = None

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            start = out.tell()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + PEER_MOUNT_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.umount()
                with open(self.log, "rb") as f:
                    f.seek(start)
                    said = f.read(500).decode(errors="replace").strip()  # the error comes first
                raise WorkloadFailed(f"{self.argv[0]} did not mount ({self.log}): {said}")
            time.sleep(0.05)

    def umount(self) -> None:
        if is_mounted(self.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        # unmounted, it exits (rclone writes its cache's metadata first)
        if self.proc is not None:
            try:
                self.proc.wait(DAEMON_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self.pid = None


def cached_payload_bytes(cache: Path) -> int | None:
    """Payload bytes the cache holds, all packages (`rez-lazyfs status --json`)."""
    r = subprocess.run([CLI, "status", "--json", "--cache", str(cache)], capture_output=True, text=True)
    try:
        rows = json.loads(r.stdout)["variants"] if r.returncode == 0 else None
        return sum(int(row["bytes_cached"]) for row in rows) if rows is not None else None
    except (ValueError, KeyError, TypeError):
        return None


# -- the bench: one contender, one workload, one run ------------------------------
class Bench:
    def __init__(self, workdir: Path, store: Path, netstore, info: dict, mount_extra: list[str],
                 log=print, image=None, ab_extra: list[str] | None = None,
                 rclone_extra: list[str] | None = None):
        self.workdir, self.store, self.net, self.info = workdir, store, netstore, info
        self.mount_extra = mount_extra
        self.ab_extra = ab_extra or []  # lazy-cold-trace-kept-b's extra mount arguments
        self.log = log
        self.image = image  # imagestore.ImageSide, for the http-* contenders
        self.lazy_mp = workdir / "lazy"
        self.cache = workdir / "cache"
        self.trace_cache = workdir / "cache-trace"  # lazy-cold-trace's: lazy-warm-* keep theirs
        self.trace_dir = workdir / "trace"
        self.traces: dict[str, Path] = {}  # traced contender -> its trace file
        self.trace_info: dict = {}  # traced contender -> how its trace was made, what it holds
        self.kept_sshfs = workdir / "sshfs-kept"  # lazy-cold-trace-kept's store
        # lazy-cold's and lazy-warm-*'s store: mounted afresh by lazy-cold only.
        # sshfs numbers inodes in lookup order, so a remount between the run
        # that fills a cache and the warm runs that read it makes every file
        # look replaced to the mount (a farm's NFS keeps its inode numbers).
        self.lazy_sshfs = workdir / "sshfs-lazy"
        self._kept_used: float | None = None  # when it was last read (None: not mounted)
        self.copy_dir = workdir / "pkgcache"
        self.rclone_mp, self.rclone_cache = workdir / "rclone", workdir / "rclone-cache"
        self.rclone_config = workdir / "rclone.conf"
        self.rclone_extra = rclone_extra or []  # run.py's --rclone-option
        self.bindfs_mp = workdir / "bindfs"
        self.peer_logs = {name: workdir / f"{name}.log" for name in peers.APT_PACKAGES}
        for peer_log in self.peer_logs.values():
            peer_log.unlink(missing_ok=True)  # this bench run's only
        self.mounted: list[LazyMount | PeerMount] = []
        self._hot_ready: str | None = None  # whose *-warm-disk mount is still mounted
        self._cold_done: set[tuple[str, str]] = set()  # (lazy, rclone or http, workload)

    # store-side traffic --------------------------------------------------------
    def _net_before(self) -> dict:
        return self.net.counters()

    def _net_after(self, before: dict) -> dict:
        return self.net.delta(before, self.net.counters())

    def _fresh(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def run(self, workload: str, contender: str) -> dict:
        fn = getattr(self, "_" + contender.replace("-", "_"))
        return fn(workload, WORKLOADS[workload])

    # contenders ------------------------------------------------------------------
    def _native(self, wl: str, fn) -> dict:
        drop_caches()
        return fn(self.store / VARIANT_OF[wl], self.info)

    def _direct(self, wl: str, fn) -> dict:
        self.net.remount()
        drop_caches()
        before = self._net_before()
        out = fn(self.net.mountpoint / VARIANT_OF[wl], self.info)
        out["network"] = self._net_after(before)
        return out

    def _copy(self, wl: str, fn) -> dict:
        self._fresh(self.copy_dir)
        self.net.remount()
        drop_caches()
        before = self._net_before()
        name, version = VARIANT_OF[wl].split("/")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "rez-cache-add", str(self.net.mountpoint), name,
                            version, str(self.copy_dir)], capture_output=True, text=True, cwd="/",
                           env={**os.environ, "REZ_DISABLE_HOME_CONFIG": "1"})
        copy_seconds = time.perf_counter() - t
        if r.returncode:
            raise WorkloadFailed(f"rez package cache copy failed: {r.stderr.strip()[-800:]}")
        added = json.loads(r.stdout.strip().splitlines()[-1])
        network = self._net_after(before)
        try:
            out = fn(Path(added["root"]), self.info)
        finally:
            self._fresh(self.copy_dir)
        out["copy_seconds"] = copy_seconds
        out["workload_seconds"] = out["seconds"]
        out["seconds"] = copy_seconds + out["seconds"]
        out["network"] = network
        out["rez_status"] = added["status"]
        return out

    def _run_on(self, wl: str, fn, *mounts: LazyMount | PeerMount) -> dict:
        """The workload on one mount; with several (nodes), one W1 launch on
        each, all at once. rez-lazyfs's store counters summed over its mounts."""
        lazy = [m for m in mounts if isinstance(m, LazyMount)]
        before, net_before = [m.stats() for m in lazy], self._net_before()
        cpu_before = [m.cpu_seconds() for m in mounts]
        roots = [m.repo_root / VARIANT_OF[wl] for m in mounts]
        out = fn(roots[0], self.info) if len(roots) == 1 else run_launches(roots, self.info)
        # Background work (prefetch, read-ahead) may still be fetching when the
        # workload ends: it counts as this run's store traffic (not its time).
        store, out["settle_seconds"] = {}, 0.0
        for m, b in zip(lazy, before):
            after, settle = self._settle(m)
            out["settle_seconds"] += settle
            for k, v in after.items():
                if isinstance(v, int):
                    store[k] = store.get(k, 0) + v - b[k]
        if lazy:
            out["store"] = store
        elif self.net.counters() != net_before:  # a peer's, over the link
            link = ("net_rx_bytes", "net_tx_bytes")
            out["settle_seconds"] = self._until_still(self.net.counters, link)[1]
        out["network"] = self._net_after(net_before)
        out["daemon_peak_rss_kib"] = max((m.peak_rss_kib() or 0) for m in mounts) or None
        cpu = [(m.cpu_seconds(), b) for m, b in zip(mounts, cpu_before)]
        out["daemon_cpu_seconds"] = sum(a - b for a, b in cpu if a is not None and b is not None)
        return out

    @staticmethod
    def _settle(mount: LazyMount) -> tuple[dict, float]:
        """Stats once the store counters have not moved for a second."""
        return Bench._until_still(mount.stats, ("store_reads", "store_listings"))

    @staticmethod
    def _until_still(read, keys: tuple[str, ...], quiet: float = 1.0,
                     limit: float = 60.0) -> tuple[dict, float]:
        """read() once its `keys` have not moved for `quiet` seconds, and how
        long they moved."""
        t0 = time.monotonic()
        last = read()
        still_since = time.monotonic()
        while time.monotonic() - still_since < quiet and time.monotonic() - t0 < limit:
            time.sleep(0.1)
            now = read()
            if any(now.get(k) != last.get(k) for k in keys):
                still_since = time.monotonic()
            last = now
        return last, time.monotonic() - t0 - quiet

    def _lazy_cold(self, wl: str, fn) -> dict:
        self._fresh(self.cache)
        self._unmount()
        self.net.umount_at(self.lazy_sshfs)
        self.net.mount_at(self.lazy_sshfs)  # cold: no attribute, directory or page cache
        drop_caches()
        mount = self._mount()
        try:
            out = self._run_on(wl, fn, mount)
        except WorkloadFailed as e:
            self._unmount()
            raise WorkloadFailed(f"{e} [daemon log kept: {self._keep_log(self.cache, wl)}]") from None
        finally:
            self._unmount()
        # a fresh cache that only this run filled: what it holds afterwards is
        # every distinct block fetched, once
        out["bytes_cached"] = cached_payload_bytes(self.cache)
        self._cold_done.add(("lazy", wl))
        return out

    def _lazy_cold_trace(self, wl: str, fn) -> dict:
        """lazy-cold, with the W1 launch's trace seeded into the fresh cache
        (sshfs remounted before the run, as for lazy-cold)."""
        return self._traced_cold(wl, fn, "lazy-cold-trace")

    def _lazy_cold_trace_kept(self, wl: str, fn) -> dict:
        """lazy-cold-trace through an sshfs mount of its own that is never
        remounted: its inode numbers stay those the trace recorded."""
        return self._traced_cold(wl, fn, "lazy-cold-trace-kept")

    def _lazy_cold_trace_kept_b(self, wl: str, fn) -> dict:
        """lazy-cold-trace-kept with the A/B mount arguments as well."""
        return self._traced_cold(wl, fn, "lazy-cold-trace-kept-b")

    def _trace_store(self, contender: str) -> Path:
        """The store path (an sshfs mount) a traced contender reads, made cold:
        lazy-cold-trace's is the shared one, remounted; lazy-cold-trace-kept's
        is mounted once (at its first use) and kept, its own caches expired
        by waiting out sshfs's cache timeout since its last use."""
        if contender == "lazy-cold-trace":
            self.net.remount()
            return self.net.mountpoint
        if self._kept_used is None:
            self.net.mount_at(self.kept_sshfs)
        else:
            wait = SSHFS_CACHE_SECONDS - (time.monotonic() - self._kept_used)
            if wait > 0:
                time.sleep(wait)
        return self.kept_sshfs

    def _traced_cold(self, wl: str, fn, contender: str) -> dict:
        if wl not in TRACED_WORKLOADS:
            raise WorkloadFailed(f"{contender} has a trace of the W1 launch only, not of {wl}")
        base = contender.removesuffix("-b")  # B: A's trace and store, more mount arguments
        extra = self.mount_extra + (self.ab_extra if contender != base else [])
        trace = self._ensure_trace(base)
        if contender not in self.trace_info:
            self.trace_info[contender] = {**self.trace_info[base], "same_trace_as": base,
                                          "replay_width": launchtrace.replay_width(extra),
                                          "ab_mount_options": self.ab_extra}
        self._unmount()
        self._fresh(self.trace_cache)
        store = self._trace_store(base)
        launchtrace.seed(trace, store, self.trace_cache, extra)
        drop_caches()
        mount = self._add_mount(LazyMount(self.lazy_mp, store, self.trace_cache, extra))
        t0 = time.time()
        try:
            out = self._run_on(wl, fn, mount)
        except WorkloadFailed as e:
            self._unmount()
            raise WorkloadFailed(f"{e} [daemon log kept: {self._keep_log(self.trace_cache, wl)}]") from None
        finally:
            self._unmount()
            if base == "lazy-cold-trace-kept":
                self._kept_used = time.monotonic()
        out["bytes_cached"] = cached_payload_bytes(self.trace_cache)
        out["replay_timing"] = launchtrace.replay_timing(self.trace_cache / "logs" / "daemon.log", t0)
        self._fresh(self.trace_cache)
        return out

    def _keep_log(self, cache: Path, tag: str) -> Path:
        """A failed run's daemon log, copied out of its cache (which the next run replaces)."""
        dest = self.workdir / "failed-logs" / f"{time.strftime('%H%M%S')}-{tag}"
        shutil.copytree(cache / "logs", dest, dirs_exist_ok=True)
        return dest

    def _ensure_trace(self, contender: str) -> Path:
        """The W1 launch's trace for a traced contender, recorded once per bench
        run on a cold mount of the store that contender reads."""
        if contender in self.traces:
            return self.traces[contender]
        self._unmount()
        tdir = self.trace_dir / contender
        self._fresh(tdir)
        tdir.mkdir(parents=True)
        self.log(f"{contender}: recording the W1 launch's trace (resolve with rez-env, bake, "
                 "record on a cold mount)")
        store = self.kept_sshfs if contender == "lazy-cold-trace-kept" else self.net.mountpoint
        if contender == "lazy-cold-trace-kept" and self._kept_used is None:
            self.net.mount_at(self.kept_sshfs)
            self._kept_used = time.monotonic() - SSHFS_CACHE_SECONDS
        info = launchtrace.prepare_context(tdir, store, self.lazy_mp)
        if contender == "lazy-cold-trace-kept":
            self._kept_used = time.monotonic()  # what rez and bake read: expired before recording
        cache = tdir / "record-cache"
        self._trace_store(contender)  # cold: remounted, or its caches expired
        drop_caches()
        mount = self._add_mount(LazyMount(self.lazy_mp, store, cache, self.mount_extra))
        try:
            before = mount.stats()
            trace, recorded = launchtrace.record(tdir, store, self.lazy_mp)
            after, _ = self._settle(mount)
        finally:
            self._unmount()
            self._fresh(cache)
            if contender == "lazy-cold-trace-kept":
                self._kept_used = time.monotonic()
        got = recorded["launched"]
        if got["modules"] != self.info["W1"]["modules"] or got["binary_bytes"] != self.info["W1"]["binary_bytes"]:
            raise WorkloadFailed(f"the recorded launch loaded {got}, expected {self.info['W1']}")
        info.update(recorded)
        info["store_path"] = str(store)
        info["record_store"] = {k: v - before[k] for k, v in after.items()
                                if isinstance(v, int) and k in before}
        info["trace"] = launchtrace.show(trace)
        info["trace_file_bytes"] = trace.stat().st_size
        info["block_size"] = json.loads(trace.read_bytes())["variants"][0]["block_size"]
        info["trace_payload_bytes"] = launchtrace.payload_bytes(trace)
        info["replay_width"] = launchtrace.replay_width(self.mount_extra)
        self.trace_info[contender], self.traces[contender] = info, trace
        rows = info["trace"]
        self.log(f"{contender}: trace " + "; ".join(
            f"{r['root']} {r['files']} files {r['directories']} dirs {r['blocks']} blocks "
            f"{r['bytes'] / 2**20:.1f} MiB" for r in rows)
            + f" (recorded in {info['record_seconds']:.1f} s)")
        return trace

    def _lazy_warm_disk(self, wl: str, fn) -> dict:
        if ("lazy", wl) not in self._cold_done:
            self._lazy_cold(wl, fn)  # warm the cache first (not recorded)
        self._unmount()
        drop_caches()  # the store's sshfs stays the one the cache was filled through
        return self._warm_disk_run(wl, fn, "lazy", self._mount())

    def _lazy_warm_hot(self, wl: str, fn) -> dict:
        return self._hot(wl, fn, "lazy")

    def _warm_disk_run(self, wl: str, fn, family: str, mount: LazyMount | PeerMount) -> dict:
        """A *-warm-disk run, its mount left mounted for the family's hot run."""
        out = self._run_on(wl, fn, mount)
        self._hot_ready = family
        return out

    def _hot(self, wl: str, fn, family: str) -> dict:
        """The workload again on the mount the family's warm-disk run left
        (page cache hot); that run first if it is not there (not recorded)."""
        if self._hot_ready != family:
            getattr(self, f"_{family}_warm_disk")(wl, fn)
        try:
            return self._run_on(wl, fn, self.mounted[-1])
        finally:
            self._unmount()

    def _mount(self) -> LazyMount:
        self._unmount()
        return self._add_mount(LazyMount(self.lazy_mp, self.lazy_sshfs, self.cache, self.mount_extra))

    def _add_mount(self, m: LazyMount | PeerMount) -> LazyMount | PeerMount:
        self.mounted.append(m)
        m.mount()
        return m

    def _unmount(self) -> None:
        self._hot_ready = None
        while self.mounted:
            self.mounted.pop().umount()

    # the peers ---------------------------------------------------------------------
    def _rclone_mount(self) -> PeerMount:
        self._unmount()
        config = peers.write_rclone_config(self.rclone_config, self.net)
        argv = peers.rclone_argv(config, self.net.store, self.rclone_mp, self.rclone_cache,
                                 self.rclone_extra)
        return self._add_mount(PeerMount(self.rclone_mp, argv, self.peer_logs["rclone"]))

    def _rclone_cold(self, wl: str, fn) -> dict:
        self._unmount()
        self._fresh(self.rclone_cache)
        drop_caches()
        try:
            out = self._run_on(wl, fn, self._rclone_mount())
        finally:
            self._unmount()
        self._cold_done.add(("rclone", wl))
        return out

    def _rclone_warm_disk(self, wl: str, fn) -> dict:
        if ("rclone", wl) not in self._cold_done:
            self._rclone_cold(wl, fn)  # fill its VFS cache first (not recorded)
        self._unmount()
        drop_caches()
        return self._warm_disk_run(wl, fn, "rclone", self._rclone_mount())

    def _rclone_warm_hot(self, wl: str, fn) -> dict:
        return self._hot(wl, fn, "rclone")

    def _bindfs_warm_disk(self, wl: str, fn) -> dict:
        self._unmount()
        drop_caches()
        mount = PeerMount(self.bindfs_mp, peers.bindfs_argv(self.store, self.bindfs_mp),
                          self.peer_logs["bindfs"])
        return self._warm_disk_run(wl, fn, "bindfs", self._add_mount(mount))

    def _bindfs_hot(self, wl: str, fn) -> dict:
        return self._hot(wl, fn, "bindfs")

    # the published image over HTTP ------------------------------------------------
    def _http_node(self, n: int) -> tuple[Path, Path]:
        """Node n's mount point and cache."""
        return self.workdir / f"http-node{n}", self.workdir / f"http-cache{n}"

    def _http_mount(self, n: int) -> LazyMount:
        mountpoint, cache = self._http_node(n)
        return self._add_mount(LazyMount(mountpoint, self.image.url, cache,
                                         [*self.image.mount_args(), *self.mount_extra]))

    def _http_cold_squid_cold(self, wl: str, fn) -> dict:
        self.image.fresh_squid()
        return self._http_cold(wl, fn)

    def _http_cold_squid_warm(self, wl: str, fn) -> dict:
        if wl not in self.image.warmed:
            if self.image.squid is None:
                self.image.fresh_squid()
            self._http_cold(wl, fn)  # the earlier node that fills squid (not recorded)
        return self._http_cold(wl, fn)

    def _http_cold(self, wl: str, fn) -> dict:
        nodes = self.info["sizes"]["w4_processes"] if wl == "W4" else 1
        self._unmount()
        for n in range(nodes):
            self._fresh(self._http_node(n)[1])
        drop_caches()
        mark = self.image.mark()
        try:
            out = self._run_on(wl, fn, *(self._http_mount(n) for n in range(nodes)))
        finally:
            self._unmount()
        out["http"] = self.image.since(mark)
        out["nodes"] = nodes
        self.image.warmed.add(wl)
        self._cold_done.add(("http", wl))
        return out

    def _http_warm(self, wl: str, fn) -> dict:
        if ("http", wl) not in self._cold_done:
            if self.image.squid is None:
                self.image.fresh_squid()
            self._http_cold(wl, fn)  # fill node 0's cache (not recorded)
        self._unmount()
        drop_caches()
        mark = self.image.mark()
        try:
            out = self._run_on(wl, fn, self._http_mount(0))
        finally:
            self._unmount()
        out["http"] = self.image.since(mark)
        return out

    def _fresh_http_caches(self) -> None:
        for n in range(self.info["sizes"]["w4_processes"]):
            mountpoint, cache = self._http_node(n)
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
            self._fresh(cache)

    def end_workload(self) -> None:
        """Between workloads: nothing mounted, no cache or copy left on disk
        (the trace is kept: W1's serves W4)."""
        self._unmount()
        self._fresh(self.cache)
        self._fresh(self.trace_cache)
        self._fresh(self.copy_dir)
        self._fresh_http_caches()
        self._fresh(self.rclone_cache)
        self._cold_done.clear()

    def close(self) -> None:
        try:
            self._unmount()
        finally:
            for mountpoint in (self.lazy_mp, self.rclone_mp, self.bindfs_mp):
                if is_mounted(mountpoint):
                    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
            self._fresh(self.cache)
            self._fresh(self.trace_cache)
            for tdir in self.trace_dir.glob("*/record-cache"):
                self._fresh(tdir)
            if self._kept_used is not None:
                self.net.umount_at(self.kept_sshfs)
                self._kept_used = None
            self._fresh(self.copy_dir)
            self._fresh_http_caches()
            self._fresh(self.rclone_cache)
            self.rclone_config.unlink(missing_ok=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# -- Rez's package cache, run in its own process ----------------------------------------
def rez_cache_add(repo: str, name: str, version: str, cache: str) -> None:
    from rez.package_cache import PackageCache
    from rez.packages import get_package

    package = get_package(name, version, paths=[repo])
    if package is None:
        raise SystemExit(f"{name}-{version} not found in {repo}")
    variant = next(package.iter_variants())
    os.makedirs(cache, exist_ok=True)
    # force: the bench's store is not "local", but the same-device and
    # cachable checks are not what is measured here
    root, status = PackageCache(cache).add_variant(variant, force=True, wait_for_copying=True)
    print(json.dumps({"root": root, "status": status}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["rez-cache-add"]:
        rez_cache_add(*sys.argv[2:6])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} rez-cache-add REPO NAME VERSION CACHE")
