"""FUSE passthrough, measured on this machine (issue 16, item 3: decide passthrough by measurement).

One command, as root (it mounts, drops the page cache and registers backing files):

    python3 tests/bench/passthrough.py [--workdir /var/tmp/rlfs-passthrough] [--rounds 7] [--quick]

Does the kernel passing reads straight to a backing file (FUSE passthrough, Linux >= 6.9)
pay for files that are wholly on local disk, against the same C daemon without it, a
plain C FUSE file system and the local disk itself? rez-lazyfs cannot try it directly
(pyfuse3 has no backing-open call and Debian 12's libfuse 3.14 predates passthrough), so
the question is put to libfuse's own high-performance example daemon, which has both
modes in one binary.

What it sets up in WORKDIR (kept for the next run; a build that is there is reused):
  * libfuse >= 3.17 built from Debian's source package (the orig tarball and Debian's
    patches, pinned by SHA-256, fetched from the Debian archive that apt is configured
    with), with meson and ninja; nothing is installed: the system's libfuse 3.14, which
    pyfuse3 is built against, is not touched. Its example passthrough_hp runs from the
    build directory.
  * passthrough_probe (tests/bench/passthrough_probe.c, built against that libfuse): a
    two-file FUSE file system that answers the yes/no questions below.
  * a test tree: W2, one large file (default 2 GiB) read sequentially in 1 MiB reads;
    W1, ~3,000 files of 2-20 KiB in ~200 directories, each opened, read whole and
    closed by one process.
Debian's meson, ninja-build, g++, patch and bindfs are installed with apt when missing.

Contenders: native (the tree itself), passthrough (passthrough_hp, kernel reads the
backing files), no-passthrough (the same binary with --nopassthrough), bindfs (1.14.7,
-o ro with the same 24 h entry/attribute timeouts and kernel_cache that passthrough_hp
uses). Per round, the contenders in an order that turns each round; each: mount, drop the
page cache (and dentries and inodes), the workload (warm-disk: every byte from the local
disk, through a fresh mount), the workload again in the same mount (hot), unmount. Wall
time is the reader's own (process start excluded); daemon CPU is utime + stime of the
daemon from /proc/PID/stat around the run. Medians over the rounds; every run is kept.

The probes (each its own mount): passthrough granted and used (no READ reaches the
daemon) on this kernel with this userland; with FOPEN_KEEP_CACHE on the open reply;
with the allow_other mount option, read by another user; a backing file bigger than the
file presented (the shape of a rez-lazyfs cache file: 8-byte trailers between blocks);
and an unprivileged daemon (the mount made for it by root, as fusermount3 would).

Writes tests/bench/results/passthrough.{json,md} (passthrough-quick.* with --quick).
The "## Decision" section of an existing .md is hand-written and is kept as it is.
Everything mounted is unmounted and every process started is ended (by its PID) in a
finally, also on failure and Ctrl-C.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import signal
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROBE_SOURCE = HERE / "passthrough_probe.c"
MiB = 2**20

# Debian's fuse3 source package (trixie): the first libfuse with the passthrough API is
# 3.17. Pinned so that what is built is what was measured; the pool keeps an orig tarball
# as long as any suite carries its upstream version.
LIBFUSE_VERSION = "3.17.2"
LIBFUSE_DEBIAN_REVISION = "3"
LIBFUSE_FILES = {
    f"fuse3_{LIBFUSE_VERSION}.orig.tar.gz":
        "3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f",
    f"fuse3_{LIBFUSE_VERSION}-{LIBFUSE_DEBIAN_REVISION}.debian.tar.xz":
        "eaf7a177761ae8bf99ea97619f2cccf83f169b4f000e17b6106834e69456b5a2",
}
POOL_PATH = "pool/main/f/fuse3/"
APT_PACKAGES = {"meson": "meson", "ninja": "ninja-build", "g++": "g++", "patch": "patch",
                "bindfs": "bindfs", "cc": "gcc", "pkg-config": "pkg-config"}

# Generous caching for bindfs, the same 24 h that passthrough_hp gives its entries and
# attributes, so that the comparison is of data paths, not of timeouts.
BINDFS_OPTIONS = "ro,kernel_cache,entry_timeout=86400,attr_timeout=86400,negative_timeout=86400"
CONTENDERS = ["native", "passthrough", "no-passthrough", "no-passthrough-nosplice", "bindfs"]
LABELS = {
    "native": "native (local ext4)",
    "passthrough": "passthrough_hp, passthrough",
    "no-passthrough": "passthrough_hp --nopassthrough",
    "no-passthrough-nosplice": "passthrough_hp --nopassthrough --nosplice",
    "bindfs": "bindfs -o ro (kernel_cache, 24 h)",
}
WORKLOADS = {
    "W2": "W2-like: one large file, sequential 1 MiB reads",
    "W1": "W1-like: small files (2-20 KiB) in many directories, each read whole",
}
STATES = {"disk": "warm-disk (fresh mount, page cache dropped)",
          "hot": "hot (same mount, second run)"}

# The reader, a process of its own so that the file system sees an ordinary client.
# It times itself: interpreter start-up is not the file system's cost.
READER = r"""
import json, os, sys, time
mode, root, arg = sys.argv[1], sys.argv[2], sys.argv[3]
buf = bytearray(1 << 20)
view = memoryview(buf)
paths = [os.path.join(root, arg)] if mode == "big" else [
    os.path.join(root, line.rstrip("\n")) for line in open(arg)]
total = 0
t0 = time.perf_counter()
for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [view])
            if not n:
                break
            total += n
    finally:
        os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": total, "files": len(paths)}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], **kw)


# -- what is mounted and started, so that the finally can undo all of it -------------------
class Teardown:
    """Every mount point this run mounted and every process it started, undone in reverse
    order: a daemon is asked to stop (SIGTERM, which unmounts it), a mount that outlives
    it is unmounted (lazily as a last resort), a process that will not stop is killed by
    its PID. Nothing that this run did not start is touched."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}
        self.mounts: list[str] = []

    def started(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs[proc.pid] = proc
        return proc

    def mounted(self, mountpoint: str) -> None:
        if mountpoint not in self.mounts:
            self.mounts.append(mountpoint)

    def stop(self, proc: subprocess.Popen | None, mountpoint: str | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if mountpoint is not None:
            unmount(mountpoint)
            if mountpoint in self.mounts and not is_mounted(mountpoint):
                self.mounts.remove(mountpoint)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
            self.procs.pop(proc.pid, None)

    def all(self) -> None:
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for mp in reversed(self.mounts):
            unmount(mp)
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
        for mp in reversed(self.mounts):
            if is_mounted(mp):  # a daemon that was killed leaves its mount behind
                run(["umount", "-l", mp], capture_output=True)
        left = [mp for mp in self.mounts if is_mounted(mp)]
        self.mounts, self.procs = left, {}
        if left:
            log(f"WARNING: still mounted: {left}")


def mounted_points() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1].replace("\\040", " ") for line in f}


def is_mounted(mountpoint: str) -> bool:
    return str(mountpoint) in mounted_points()


def unmount(mountpoint: str) -> None:
    for argv in (["fusermount3", "-u", mountpoint], ["umount", mountpoint]):
        if not is_mounted(mountpoint):
            return
        run(argv, capture_output=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_cache_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


# -- building libfuse and the probe --------------------------------------------------------
def _apt_get(*args: str) -> int:
    """apt-get in a session of its own, waited for even through a Ctrl-C: killing it
    half-way leaves dpkg half-configured for everyone on the machine."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.Popen(["apt-get", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    interrupted = None
    while True:
        try:
            err = proc.communicate()[1]
            break
        except KeyboardInterrupt as e:
            interrupted = e
            log("waiting for apt-get to finish before stopping ...")
    if interrupted:
        raise interrupted
    if proc.returncode:
        log(f"apt-get {' '.join(args)}: {err.decode(errors='replace')[-1500:]}")
    return proc.returncode


def ensure_tools() -> None:
    """Debian's build tools and bindfs, installed when missing (checked again before each
    bindfs mount: on this shared machine another session may remove a package)."""
    missing = sorted({pkg for tool, pkg in APT_PACKAGES.items() if not shutil.which(tool)})
    if not missing:
        return
    for _ in range(30 if shutil.which("fuser") else 0):
        # another session's apt-get holds the lock for a while at most
        if subprocess.run(["fuser", "/var/lib/dpkg/lock-frontend"],
                          capture_output=True).returncode:
            break
        time.sleep(2)
    log(f"installing {' '.join(missing)} with apt ...")
    if _apt_get("install", "-y", "-q", *missing):
        _apt_get("update", "-q")  # an old package list: update once, then try again
        if _apt_get("install", "-y", "-q", *missing):
            raise SystemExit(f"apt-get install {' '.join(missing)} failed")


def debian_archive() -> str:
    """The Debian archive apt is configured with (its main suite, not -security or
    -updates): the source package comes from where the machine's packages come from."""
    r = run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)"],
            capture_output=True, text=True)
    uris = [line.split()[0] for line in r.stdout.splitlines()
            if len(line.split()) == 2 and "-" not in line.split()[1]]
    if not uris:
        raise SystemExit("no Debian archive found in apt's configuration (apt-get update first?)")
    return uris[0].rstrip("/") + "/"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_libfuse_sources(workdir: Path) -> Path:
    downloads = workdir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = None
    for name, digest in LIBFUSE_FILES.items():
        path = downloads / name
        if not path.exists() or sha256(path) != digest:
            archive = archive or debian_archive()
            url = archive + POOL_PATH + name
            log(f"downloading {name} from the Debian archive ...")
            tmp = path.with_suffix(path.suffix + ".part")
            with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
            tmp.rename(path)
        if sha256(path) != digest:
            raise SystemExit(f"{name}: SHA-256 is not the pinned {digest}; update the pins "
                             "in tests/bench/passthrough.py after checking the new package")
    src = workdir / "src" / f"fuse-{LIBFUSE_VERSION}"
    if not (src / ".patched").exists():
        shutil.rmtree(src, ignore_errors=True)
        src.parent.mkdir(parents=True, exist_ok=True)
        names = list(LIBFUSE_FILES)
        with tarfile.open(downloads / names[0]) as t:
            t.extractall(src.parent)
        with tarfile.open(downloads / names[1]) as t:
            t.extractall(src)
        # Debian's patches fix 3.17.2 bugs that a daemon meets (conn want flags, conn
        # info options): build what Debian ships, not the bare tarball.
        series = (src / "debian" / "patches" / "series").read_text().split()
        for patch in (p for p in series if not p.startswith("#")):
            r = run(["patch", "-p1", "-i", src / "debian" / "patches" / patch], cwd=src,
                    capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"Debian patch {patch} does not apply:\n{r.stdout}{r.stderr}")
        (src / ".patched").write_text("\n".join(series) + "\n")
    return src


@dataclass
class LibFuse:
    src: Path
    build: Path
    passthrough_hp: Path
    probe: Path
    version: str
    env: dict = field(default_factory=dict)


def ensure_libfuse(workdir: Path) -> LibFuse:
    build = workdir / "build"
    hp = build / "example" / "passthrough_hp"
    src = workdir / "src" / f"fuse-{LIBFUSE_VERSION}"
    if not (hp.exists() and (build / "lib" / "libfuse3.so").exists() and src.exists()):
        src = fetch_libfuse_sources(workdir)
        log(f"building libfuse {LIBFUSE_VERSION} in {build} (meson + ninja, nothing installed) ...")
        shutil.rmtree(build, ignore_errors=True)
        with open(workdir / "build.log", "w") as out:
            for argv in (["meson", "setup", build, "-Dexamples=true", "-Dutils=false",
                          "-Dtests=false", "-Dbuildtype=release"], ["ninja", "-C", build]):
                if run(argv, cwd=src, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"{argv[0]} failed: see {workdir / 'build.log'}")
    else:
        log(f"reusing the libfuse build in {build}")
    probe = workdir / "probe" / "passthrough_probe"
    probe.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(probe.parent, 0o755)  # the unprivileged probe runs it and reads beside it
    if not probe.exists() or probe.stat().st_mtime < PROBE_SOURCE.stat().st_mtime:
        r = run(["cc", "-O2", "-Wall", "-Wextra", "-I", src / "include", "-I", build,
                 "-o", probe, PROBE_SOURCE, "-L", build / "lib", "-lfuse3",
                 f"-Wl,-rpath,{build / 'lib'}"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"passthrough_probe does not build:\n{r.stderr}")
    # the binaries carry an rpath to build/lib; LD_LIBRARY_PATH makes it certain that
    # they never load the system's libfuse3.so.3 (3.14) by accident
    env = dict(os.environ, LD_LIBRARY_PATH=str(build / "lib"))
    linked = run(["ldd", hp], capture_output=True, text=True, env=env).stdout
    if str(build / "lib") not in linked:
        raise SystemExit(f"passthrough_hp does not load the libfuse it was built with:\n{linked}")
    return LibFuse(src, build, hp, probe, LIBFUSE_VERSION, env)


# -- the test tree -------------------------------------------------------------------------
@dataclass
class Tree:
    root: Path
    big: str          # relative to root
    big_bytes: int
    small_list: Path  # relative paths, one a line, in the order they are read
    small_files: int
    small_bytes: int


def ensure_tree(workdir: Path, big_mib: int, files: int, dirs: int) -> Tree:
    root = workdir / "tree"
    marker = root / ".made"
    want = f"big_mib={big_mib} files={files} dirs={dirs} seed=16\n"
    small_list = workdir / f"small-{files}-{dirs}.list"
    if not (marker.exists() and marker.read_text() == want and small_list.exists()):
        log(f"making the test tree in {root} ({big_mib} MiB file, {files} files in {dirs} dirs) ...")
        shutil.rmtree(root, ignore_errors=True)
        (root / "big").mkdir(parents=True)
        with open(root / "big" / "payload.bin", "wb") as f:
            # incompressible, like a real payload; never a hole
            for _ in range(big_mib // 16):
                f.write(os.urandom(16 * MiB))
            f.write(os.urandom((big_mib % 16) * MiB))
        rng = random.Random(16)
        rel = []
        for i in range(files):
            d = root / "small" / f"d{i % dirs:03d}"
            d.mkdir(parents=True, exist_ok=True)
            name = f"d{i % dirs:03d}/f{i // dirs:04d}.bin"
            (root / "small" / name).write_bytes(rng.randbytes(rng.randint(2048, 20480)))
            rel.append("small/" + name)
        # read directory by directory, as a launch walks a package
        small_list.write_text("\n".join(sorted(rel)) + "\n")
        os.sync()
        marker.write_text(want)
    rel = small_list.read_text().split()
    return Tree(root, "big/payload.bin", (root / "big" / "payload.bin").stat().st_size,
                small_list, len(rel), sum((root / p).stat().st_size for p in rel))


# -- contenders ----------------------------------------------------------------------------
class Mount:
    """One contender's view of the tree: the tree itself (native) or a daemon's mount."""

    def __init__(self, name: str, tree: Tree, lib: LibFuse, workdir: Path, td: Teardown):
        self.name, self.tree, self.lib, self.td = name, tree, lib, td
        self.mountpoint = str(workdir / "mnt" / name)
        self.log_path = workdir / "logs" / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return str(self.tree.root) if self.name == "native" else self.mountpoint

    def command(self) -> list[str]:
        src = str(self.tree.root)
        if self.name == "passthrough":
            return [str(self.lib.passthrough_hp), "--foreground", "-o", "ro", src, self.mountpoint]
        if self.name == "no-passthrough":
            return [str(self.lib.passthrough_hp), "--foreground", "--nopassthrough", "-o", "ro",
                    src, self.mountpoint]
        if self.name == "no-passthrough-nosplice":
            # replies written from a buffer instead of spliced from the backing file: on
            # this VM the cheaper of the two ways without passthrough (measured by hand:
            # about half the daemon CPU on W2), and the way pyfuse3 replies
            return [str(self.lib.passthrough_hp), "--foreground", "--nopassthrough", "--nosplice",
                    "-o", "ro", src, self.mountpoint]
        if self.name == "bindfs":
            return ["bindfs", "-f", "-o", BINDFS_OPTIONS, src, self.mountpoint]
        raise ValueError(self.name)

    def __enter__(self) -> "Mount":
        if self.name == "native":
            return self
        os.makedirs(self.mountpoint, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise SystemExit(f"{self.mountpoint} is already mounted (a run before this one?)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.name == "bindfs":
            ensure_tools()
        with open(self.log_path, "ab") as out:
            # a session of its own: a Ctrl-C reaches this harness, which unmounts first
            self.proc = self.td.started(subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=self.lib.env if self.name != "bindfs" else None))
        self.td.mounted(self.mountpoint)
        deadline = time.monotonic() + 30
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        os.stat(self.mountpoint)  # the INIT handshake is done
        return self

    def __exit__(self, *exc) -> None:
        if self.name != "native":
            self.td.stop(self.proc, self.mountpoint)

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc else None


def read_workload(mount: Mount, workload: str) -> dict:
    arg = mount.tree.big if workload == "W2" else str(mount.tree.small_list)
    mode = "big" if workload == "W2" else "list"
    cpu0, cached0 = mount.cpu(), page_cache_mib()
    r = run([sys.executable, "-c", READER, mode, mount.root, arg], capture_output=True,
            text=True, timeout=600)
    cpu1, cached1 = mount.cpu(), page_cache_mib()
    if r.returncode:
        raise RuntimeError(f"{mount.name} {workload}: reader failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    expect = mount.tree.big_bytes if workload == "W2" else mount.tree.small_bytes
    if out["bytes"] != expect:
        raise RuntimeError(f"{mount.name} {workload}: read {out['bytes']} bytes, not {expect}")
    out["daemon_cpu_seconds"] = None if cpu0 is None else round(cpu1 - cpu0, 3)
    out["page_cache_growth_mib"] = round(cached1 - cached0, 1)
    out["seconds"] = round(out["seconds"], 4)
    return out


def bench(tree: Tree, lib: LibFuse, workdir: Path, td: Teardown, rounds: int) -> dict:
    raw = {wl: {c: {"disk": [], "hot": []} for c in CONTENDERS} for wl in WORKLOADS}
    loads = []
    for rnd in range(rounds):
        order = CONTENDERS[rnd % len(CONTENDERS):] + CONTENDERS[:rnd % len(CONTENDERS)]
        loads.append(load())
        log(f"round {rnd + 1}/{rounds}: {' '.join(order)} (load {' '.join(map(str, loads[-1]))})")
        for wl in WORKLOADS:
            for c in order:
                with Mount(c, tree, lib, workdir, td) as m:
                    drop_caches()
                    disk = read_workload(m, wl)
                    hot = read_workload(m, wl)
                raw[wl][c]["disk"].append(disk)
                raw[wl][c]["hot"].append(hot)
                log(f"  {wl} {c:15s} disk {disk['seconds']:7.3f} s  hot {hot['seconds']:7.3f} s"
                    f"  daemon cpu {disk['daemon_cpu_seconds']} / {hot['daemon_cpu_seconds']} s")
    loads.append(load())
    return {"raw": raw, "load_per_round": loads}


def summarize(raw: dict, tree: Tree) -> dict:
    out = {}
    for wl, per in raw.items():
        nbytes = tree.big_bytes if wl == "W2" else tree.small_bytes
        out[wl] = {}
        for state in STATES:
            native = statistics.median(r["seconds"] for r in per["native"][state])
            row = {}
            for c in CONTENDERS:
                runs = per[c][state]
                secs = [r["seconds"] for r in runs]
                med = statistics.median(secs)
                cpu = [r["daemon_cpu_seconds"] for r in runs if r["daemon_cpu_seconds"] is not None]
                row[c] = {
                    "median_seconds": round(med, 4), "min_seconds": min(secs),
                    "max_seconds": max(secs), "runs": len(runs),
                    "mb_per_s": round(nbytes / med / 1e6, 1),
                    "x_native": round(med / native, 3),
                    "median_daemon_cpu_seconds": round(statistics.median(cpu), 3) if cpu else None,
                    "median_page_cache_growth_mib": round(statistics.median(
                        r["page_cache_growth_mib"] for r in runs), 1),
                }
            # passthrough against each other contender: the ratio of the medians, and the
            # median of the ratios paired within a round, which holds better when the
            # machine's speed drifts between rounds
            pt = row["passthrough"]["median_seconds"]
            row["passthrough_over"] = {
                c: {"of_medians": round(pt / row[c]["median_seconds"], 3),
                    "paired": round(statistics.median(
                        a["seconds"] / b["seconds"]
                        for a, b in zip(per["passthrough"][state], per[c][state])), 3)}
                for c in CONTENDERS if c != "passthrough"}
            out[wl][state] = row
    return out


# -- probes --------------------------------------------------------------------------------
def _status(path: str) -> dict:
    text = Path(path).read_text()
    return {k: int(v) for k, v in (line.split("=") for line in text.split())}


# What a probe's reader reports of a file: read(2) whole, then mapped (mmap is passed
# through too: a DCC maps its shared libraries), or the error.
PROBE_READER = r"""
import hashlib, json, mmap, sys
out = {}
try:
    with open(sys.argv[1], "rb") as f:
        d = f.read()
    out.update(bytes=len(d), sha256=hashlib.sha256(d).hexdigest(), at_65536=d[65536:65544].hex())
    with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        out.update(mmap_bytes=len(m), mmap_sha256=hashlib.sha256(m).hexdigest())
except OSError as e:
    out.update(error=e.strerror, errno=e.errno)
print(json.dumps(out))
"""


def _read_as(uid: int | None, path: str) -> dict:
    """Read a file whole as another user (or as this process): what comes back, or why not."""
    code = PROBE_READER
    kw = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    # another user may not be able to run this interpreter (one under /root, say): the
    # system's python3 then
    python = sys.executable if uid is None else (
        shutil.which("python3", path="/usr/bin:/bin") or sys.executable)
    r = run([python, "-c", code, path], capture_output=True, text=True, timeout=60, **kw)
    return json.loads(r.stdout) if r.stdout else {"error": r.stderr.strip()[-500:]}


class ProbeMount:
    """passthrough_probe on a mount point of its own. With as_user, the daemon runs as
    that user without any capability: root opens /dev/fuse and makes the mount for it
    (what fusermount3 does for a user), and hands it the descriptor as /dev/fd/N."""

    def __init__(self, lib: LibFuse, workdir: Path, td: Teardown, name: str, backing: Path,
                 flags: list[str] = (), options: str = "ro", as_user: int | None = None):
        self.lib, self.td, self.backing = lib, td, backing
        self.flags, self.options, self.as_user = list(flags), options, as_user
        self.mountpoint = str(workdir / "mnt" / f"probe-{name}")
        self.log_path = workdir / "logs" / f"probe-{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ProbeMount":
        os.makedirs(self.mountpoint, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "wb")
        fd = None
        try:
            if self.as_user is None:
                argv = [self.lib.probe, *self.flags, self.backing, self.mountpoint,
                        "-o", self.options]
                kw = {}
            else:
                fd = os.open("/dev/fuse", os.O_RDWR)
                libc = ctypes.CDLL(None, use_errno=True)
                MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
                data = (f"fd={fd},rootmode=40000,user_id={self.as_user},"
                        f"group_id={self.as_user}").encode()
                if libc.mount(b"passthrough_probe", self.mountpoint.encode(),
                              b"fuse.passthrough_probe", MS_RDONLY | MS_NOSUID | MS_NODEV,
                              data) != 0:
                    raise OSError(ctypes.get_errno(), "mount for the unprivileged probe")
                self.td.mounted(self.mountpoint)
                argv = [self.lib.probe, *self.flags, self.backing, f"/dev/fd/{fd}"]
                kw = {"pass_fds": (fd,), "user": self.as_user, "group": self.as_user,
                      "extra_groups": []}
            self.proc = self.td.started(subprocess.Popen(
                [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.lib.env, **kw))
        finally:
            out.close()
            if fd is not None:
                os.close(fd)  # the daemon holds its own copy
        self.td.mounted(self.mountpoint)
        deadline = time.monotonic() + 30
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"probe did not mount: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.td.stop(self.proc, self.mountpoint)

    def read(self, name: str, uid: int | None = None) -> dict:
        return _read_as(uid, os.path.join(self.mountpoint, name))

    def status(self, uid: int | None = None) -> dict:
        if uid is None:
            return _status(os.path.join(self.mountpoint, "status"))
        r = run(["cat", os.path.join(self.mountpoint, "status")], capture_output=True, text=True,
                user=uid, group=uid, extra_groups=[])
        return {k: int(v) for k, v in (line.split("=") for line in r.stdout.split())}


def make_probe_files(workdir: Path, block_size: int = 65536) -> dict:
    """A plain file, and the same bytes laid out as a rez-lazyfs cache file does: slot i at
    i * (block_size + 8), the block's bytes then an 8-byte trailer (here b'MACMACMA' where
    the real cache has a keyed-BLAKE3 MAC)."""
    d = workdir / "probe"
    rng = random.Random(316)
    plain = rng.randbytes(3 * block_size + 1000)
    (d / "plain.bin").write_bytes(plain)
    with open(d / "slots.bin", "wb") as f:
        for i in range(0, len(plain), block_size):
            f.seek((i // block_size) * (block_size + 8))
            f.write(plain[i:i + block_size] + b"MACMACMA")
    for name in ("plain.bin", "slots.bin"):
        os.chmod(d / name, 0o644)
    return {"plain": d / "plain.bin", "slots": d / "slots.bin", "plain_bytes": len(plain),
            "plain_sha256": hashlib.sha256(plain).hexdigest(),
            "slots_bytes": (d / "slots.bin").stat().st_size, "block_size": block_size}


def probes(lib: LibFuse, workdir: Path, td: Teardown) -> dict:
    files = make_probe_files(workdir)
    nobody = 65534
    out: dict = {"files": {k: (str(v) if isinstance(v, Path) else v) for k, v in files.items()}}

    def case(name, backing, flags=(), options="ro", reader_uid=None, as_user=None):
        with ProbeMount(lib, workdir, td, name, backing, flags, options, as_user) as pm:
            got = pm.read("data", reader_uid)
            st = pm.status(reader_uid if as_user is None else as_user)
        got["correct"] = got.get("sha256") == files["plain_sha256"]
        got["mmap_correct"] = got.get("mmap_sha256") == files["plain_sha256"]
        res = {"read": got, "daemon": st}
        if st.get("last_refusal_errno"):
            res["refusal"] = errno.errorcode.get(st["last_refusal_errno"], str(st["last_refusal_errno"]))
        log(f"  probe {name}: {res}")
        return res

    log("probes ...")
    out["passthrough"] = case("passthrough", files["plain"])
    out["no_passthrough"] = case("no-passthrough", files["plain"], ["--no-passthrough"])
    out["keep_cache"] = case("keep-cache", files["plain"], ["--keep-cache"])
    out["allow_other"] = case("allow-other", files["plain"], options="ro,allow_other",
                              reader_uid=nobody)
    out["slice"] = case("slice", files["slots"], ["--size", str(files["plain_bytes"])])
    out["slice"]["presented_bytes"] = files["plain_bytes"]
    out["slice"]["backing_bytes"] = files["slots_bytes"]
    out["unprivileged"] = case("unprivileged", files["plain"], reader_uid=nobody, as_user=nobody)
    return out


# -- report --------------------------------------------------------------------------------
def machine_info(lib: LibFuse) -> dict:
    def cmd(*argv):
        try:
            r = run(argv, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip()
        except OSError:
            return ""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "")
    mem = next(int(line.split()[1]) // 1024 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_mib": mem,
            "kernel": platform.release(),
            "debian": Path("/etc/debian_version").read_text().strip(),
            "glibc": platform.libc_ver()[1],
            "system_libfuse": cmd("dpkg-query", "-W", "-f", "${Version}", "libfuse3-3"),
            "built_libfuse": f"{lib.version} (Debian fuse3 {lib.version}-{LIBFUSE_DEBIAN_REVISION}"
                             " source package, Debian patches applied)",
            "bindfs": cmd("bindfs", "--version"),
            # findmnt names ext4 as ext4 (stat -f says ext2/ext3 for all three)
            "tree_fs": cmd("findmnt", "-n", "-o", "FSTYPE", "-T", str(lib.build)),
            "fuse_passthrough_config": _kernel_config("CONFIG_FUSE_PASSTHROUGH")}


def _kernel_config(name: str) -> str:
    for path in (f"/boot/config-{platform.release()}",):
        try:
            for line in open(path):
                if line.startswith(name + "="):
                    return line.strip().split("=", 1)[1]
        except OSError:
            pass
    try:
        import gzip
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(name + "="):
                    return line.strip().split("=", 1)[1]
    except OSError:
        pass
    return "unknown (no kernel config readable; the probes say whether it works)"


def _fmt_cpu(x):
    return "-" if x is None else f"{x:.2f}"


def render(report: dict) -> str:
    m, s, tree = report["machine"], report["summary"], report["tree"]
    loads = report["load_per_round"]
    lo = min(x[0] for x in loads)
    hi = max(x[0] for x in loads)
    lines = [
        "# FUSE passthrough, measured (issue 16, item 3)", "",
        f"`python3 tests/bench/passthrough.py{' --quick' if report['quick'] else ''} "
        f"--rounds {report['rounds']}`, {report['date']}, rez-lazyfs {report['commit']}.",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_mib']} MiB, kernel {m['kernel']}, "
        f"Debian {m['debian']} (glibc {m['glibc']}, system libfuse {m['system_libfuse']}); "
        f"libfuse {m['built_libfuse']} built in the workdir; {m['bindfs']}; tree on {m['tree_fs']}.",
        f"Load average (1 min) over the rounds: {lo:.2f} to {hi:.2f} (the machine is shared: "
        "other sessions' test suites and benchmarks ran beside this).", "",
        f"Tree: W2 one {tree['big_bytes'] / MiB:.0f} MiB file read in 1 MiB reads; W1 "
        f"{tree['small_files']} files of 2-20 KiB ({tree['small_bytes'] / MiB:.1f} MiB) in "
        f"{tree['small_dirs']} directories, each opened, read whole (1 MiB reads) and closed "
        "in directory order by one process. Per round every contender in a turning order: "
        "mount, drop the page cache (`echo 3`), the workload (warm-disk), the workload again "
        "(hot), unmount. Wall time from the reader itself; daemon CPU = utime + stime of the "
        f"daemon over the run. Medians of {report['rounds']} rounds (min-max in brackets).", "",
    ]
    for wl, title in WORKLOADS.items():
        lines += [f"## {title}", "",
                  "| state | contender | wall s (min-max) | MB/s | x native | daemon CPU s "
                  "| page cache growth MiB |", "|---|---|---|---|---|---|---|"]
        for state, stitle in STATES.items():
            row = s[wl][state]
            for c in CONTENDERS:
                r = row[c]
                lines.append(
                    f"| {stitle if c == 'native' else ''} | {LABELS[c]} | "
                    f"{r['median_seconds']:.3f} ({r['min_seconds']:.3f}-{r['max_seconds']:.3f}) | "
                    f"{r['mb_per_s']:,.0f} | {r['x_native']:.2f} | "
                    f"{_fmt_cpu(r['median_daemon_cpu_seconds'])} | "
                    f"{r['median_page_cache_growth_mib']:,.0f} |")
        lines.append("")
        for state, stitle in STATES.items():
            over = s[wl][state]["passthrough_over"]
            lines.append(f"- {stitle}: passthrough's time over the other's (ratio of the medians; "
                         "median of the per-round ratios): "
                         + ", ".join(f"{c} {o['of_medians']:.2f} ({o['paired']:.2f})"
                                     for c, o in over.items()) + ".")
        lines.append("")
    p = report["probes"]
    if not p:
        return "\n".join(lines + ["(probes not run: --no-probes)", ""])
    lines += ["## Probes (passthrough_probe.c against the built libfuse)", "",
              "| case | open/read result | READ requests reaching the daemon | backing files "
              "registered | note |", "|---|---|---|---|---|"]

    def probe_row(name, key, note):
        r = p[key]
        rd = r["read"]
        result = (f"read: {rd['bytes']} bytes, {'correct' if rd['correct'] else 'WRONG bytes'}"
                  if "bytes" in rd else f"error: {rd.get('error')}")
        if "mmap_bytes" in rd:
            result += (f"; mmap: {rd['mmap_bytes']} bytes, "
                       f"{'correct' if rd['mmap_correct'] else 'WRONG bytes'}")
        reg = f"{r['daemon'].get('backing_opens', 0)}"
        if r["daemon"].get("backing_refusals"):
            reg += f" ({r['daemon']['backing_refusals']} refused: {r.get('refusal')})"
        lines.append(f"| {name} | {result} | {r['daemon'].get('read_requests')} | {reg} | {note} |")

    probe_row("passthrough, root daemon", "passthrough",
              "granted=%d by the kernel at INIT" % p["passthrough"]["daemon"].get("granted", 0))
    probe_row("no passthrough (same probe)", "no_passthrough", "every read is a request")
    probe_row("passthrough + FOPEN_KEEP_CACHE", "keep_cache", "the kernel refuses the open")
    probe_row("passthrough, -o allow_other, read by uid 65534", "allow_other",
              "reads checked as the caller, done with the daemon's credentials")
    sl = p["slice"]
    probe_row(f"backing = cache-layout file ({sl['backing_bytes']} B) presented as "
              f"{sl['presented_bytes']} B", "slice",
              f"bytes at offset 65536: {sl['read'].get('at_65536', '?')} "
              "(the first trailer, b'MACMACMA' is 4d41434d41434d41)")
    probe_row("unprivileged daemon (uid 65534, no capabilities)", "unprivileged",
              "mount made by root for it; reads fall back to the daemon")
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict, stem: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = RESULTS / f"{stem}.md"
    decision = ""
    if md.exists():
        old = md.read_text()
        at = old.find("\n## Decision")
        if at >= 0:
            decision = old[at:]
    md.write_text(render(report) + (decision or "\n## Decision\n\n(to be written from the figures "
                                                "above)\n"))
    return md


# -- main ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rlfs-passthrough"))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians of these)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: a smoke run")
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--dirs", type=int, default=200)
    ap.add_argument("--no-probes", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts, drops the page cache and registers backing files")
    if args.quick:
        args.big_mib, args.files, args.dirs, args.rounds = 256, 300, 20, min(args.rounds, 3)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    td = Teardown()
    try:
        ensure_tools()
        lib = ensure_libfuse(workdir)
        tree = ensure_tree(workdir, args.big_mib, args.files, args.dirs)
        probe_results = {} if args.no_probes else probes(lib, workdir, td)
        measured = bench(tree, lib, workdir, td, args.rounds)
        commit = run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                     text=True).stdout.strip()
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit, "quick": args.quick, "rounds": args.rounds,
            "machine": machine_info(lib),
            "tree": {"big_bytes": tree.big_bytes, "small_files": tree.small_files,
                     "small_bytes": tree.small_bytes, "small_dirs": args.dirs},
            "contenders": {c: LABELS[c] for c in CONTENDERS},
            "commands": {c: Mount(c, tree, lib, workdir, td).command()
                         for c in CONTENDERS if c != "native"},
            "load_per_round": measured["load_per_round"],
            "summary": summarize(measured["raw"], tree),
            "probes": probe_results,
            "raw": measured["raw"],
        }
        md = write_report(report, "passthrough-quick" if args.quick else "passthrough")
        log(f"wrote {md} and its .json")
        print(render(report))
        return 0
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        return 130
    finally:
        td.all()
        left = [mp for mp in mounted_points() if mp.startswith(str(workdir) + "/")]
        if left:
            log(f"WARNING: mounts left under {workdir}: {left}")


if __name__ == "__main__":
    sys.exit(main())
