"""The benchmark's store (a Rez repository, generated deterministically) and its workloads.

Store layout (one repository; every package has one variant, its root):

    dcc/1.0.0/        W1/W4: a DCC-like launch
      package.py
      python/dccapp/  ~3,000 modules in nested packages (.py and their .pyc)
      bin/dcc.bin     >= 512 MiB "binary"; the launch reads ~5% of it
      share/          20,000 files the launch never touches
    bigdata/1.0.0/data/blob.bin   W2: 2 GiB, read sequentially
    metatree/1.0.0/tree/          W3: >= 50,000 entries, stat'ed (os.walk + lstat)

The launch is a real interpreter start:
    python3 -B -c "import dccapp, dccapp.boot; dccapp.boot.main()"
with PYTHONPATH=<variant>/python and PYTHONDONTWRITEBYTECODE=1. Importing
`dccapp` imports every module (each package's __init__ imports its children),
then boot.main() reads the binary like a loader: a header, then ranges at
fixed scattered offsets, some with read() (1-4 MiB, like data sections), some
by touching every page of an mmap (128 KiB-1 MiB, like code being faulted in).
The modules ship with unchecked-hash .pyc files in __pycache__ (a released
package is compiled once), so a launch stats each .py and reads its .pyc, as
with a real installed package; -B keeps anything from being written.

This file is also the workload runner, run as a subprocess by the bench:
    python workloads.py seqread FILE     -> {"bytes", "seconds"}
    python workloads.py walk DIR         -> {"entries", "seconds"}
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 2**20
PAGE = 4096
LAUNCH_CODE = "import dccapp, dccapp.boot; dccapp.boot.main()"
GENERATOR_VERSION = 3  # bump when the generated tree changes
# The "DCC" interpreter: the system's Python if there is one (a clean start-up,
# like a DCC's own), else this one. Its .pyc files are compiled by it.
LAUNCH_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@dataclass
class Sizes:
    modules: int = 3000
    binary_mib: int = 512
    binary_read_fraction: float = 0.05
    untouched_files: int = 20000
    seq_mib: int = 2048
    tree_entries: int = 50000
    w4_processes: int = 8

    @classmethod
    def quick(cls) -> Sizes:
        return cls(modules=300, binary_mib=64, untouched_files=2000, seq_mib=256,
                   tree_entries=5000)


# relative to the repository root
W1_VARIANT = "dcc/1.0.0"
W2_VARIANT, W2_FILE = "bigdata/1.0.0", "data/blob.bin"
W3_VARIANT, W3_DIR = "metatree/1.0.0", "tree"


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def _package_py(name: str, version: str, commands: str = "") -> str:
    return textwrap.dedent(f"""\
        name = "{name}"
        version = "{version}"
        cachable = True
        """) + commands


def _random_file(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n


# -- W1: the DCC variant --------------------------------------------------------
def _module_source(rng: random.Random, name: str) -> str:
    """A plausible module: imports, constants, a class, functions; 2-6 KiB."""
    lines = [f'"""{name}: generated module of the benchmark DCC."""',
             "import os", "import re", "import functools", ""]
    for i in range(rng.randrange(8, 30)):
        lines.append(f"CONSTANT_{i} = {rng.randrange(10**9)}")
    lines.append(f"NAMES = {[f'n{rng.randrange(10**6)}' for _ in range(rng.randrange(5, 20))]!r}")
    lines += ["", "", f"class Node{rng.randrange(10**4)}:",
              '    """A node type."""', "",
              "    def __init__(self, name, **attrs):",
              "        self.name = name", "        self.attrs = dict(attrs)", ""]
    for m in range(rng.randrange(3, 10)):
        lines += [f"    def method_{m}(self, value={rng.randrange(100)}):",
                  f"        if value > {rng.randrange(50)}:",
                  f"            return self.attrs.get('k{m}', value) * {rng.randrange(2, 9)}",
                  "        return re.sub(r'[a-z]+', '_', self.name) + str(value)", ""]
    for f in range(rng.randrange(4, 14)):
        lines += ["", "", "@functools.lru_cache(maxsize=None)",
                  f"def function_{f}(a, b={rng.randrange(10)}):",
                  "    total = 0",
                  "    for i in range(a):",
                  f"        total += (i * {rng.randrange(1, 99)}) % (b + 1)",
                  f"    return os.path.join('p{f}', str(total))"]
    return "\n".join(lines) + "\n"


def _binary_ranges(size: int, fraction: float, rng: random.Random) -> list[tuple[int, int, str]]:
    """(offset, length, how) ranges covering ~fraction of the binary at scattered offsets."""
    target = int(size * fraction)
    ranges = [(0, 64 * 1024, "read")]  # the header, first
    slot = 4 * MiB
    slots = list(range(1, size // slot))
    rng.shuffle(slots)
    total = ranges[0][1]
    for s in slots:
        if total >= target:
            break
        if rng.random() < 0.5:
            how, length = "read", rng.randrange(MiB // PAGE, 4 * MiB // PAGE + 1) * PAGE
        else:
            how, length = "mmap", rng.randrange(128 * 1024 // PAGE, MiB // PAGE + 1) * PAGE
        remaining = -(-(target - total) // PAGE) * PAGE
        length = min(length, remaining, slot)
        start = s * slot + rng.randrange(0, (slot - length) // PAGE + 1) * PAGE
        ranges.append((start, length, how))
        total += length
    return ranges


_BOOT = '''\
"""Start-up of the benchmark DCC: read the binary like a loader would."""
import json
import mmap
import os
import sys

from ._ranges import RANGES

PAGE = 4096


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    binary = os.path.join(here, "..", "..", "bin", "dcc.bin")
    nbytes, check = 0, 0
    with open(binary, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            for offset, length, how in RANGES:
                if how == "read":
                    f.seek(offset)
                    data = f.read(length)
                    nbytes += len(data)
                    check ^= data[-1]
                else:
                    for page in range(offset, offset + length, PAGE):
                        check ^= m[page]
                    nbytes += length
        finally:
            m.close()
    modules = sum(1 for name in sys.modules if name == "dccapp" or name.startswith("dccapp."))
    print(json.dumps({"modules": modules, "binary_bytes": nbytes, "check": check}))
'''


def build_w1(root: Path, sizes: Sizes, rng: random.Random) -> dict:
    var = root / W1_VARIANT
    _write(var / "package.py", _package_py("dcc", "1.0.0", textwrap.dedent("""\
        def commands():
            env.PYTHONPATH.prepend("{root}/python")
            env.PATH.prepend("{root}/bin")
        """)))
    py = var / "python" / "dccapp"
    per_leaf = 30
    leaves = -(-sizes.modules // per_leaf)
    tops = max(1, round(leaves ** 0.5))
    module_count = 0
    top_names = []
    for t in range(tops):
        top = f"core{t:02d}" if t % 2 == 0 else f"tools{t:02d}"
        top_names.append(top)
        leaf_names = []
        for leaf in range(t, leaves, tops):
            lname = f"lib{leaf:03d}"
            leaf_names.append(lname)
            names = []
            for m in range(per_leaf):
                if module_count >= sizes.modules:
                    break
                mname = f"mod{module_count:04d}"
                _write(py / top / lname / f"{mname}.py", _module_source(rng, f"dccapp.{top}.{lname}.{mname}"))
                names.append(mname)
                module_count += 1
            _write(py / top / lname / "__init__.py",
                   "".join(f"from . import {n}\n" for n in names))
        _write(py / top / "__init__.py", "".join(f"from . import {n}\n" for n in leaf_names))
    _write(py / "__init__.py", '"""The benchmark DCC."""\n'
           + "".join(f"from . import {n}\n" for n in top_names))
    size = sizes.binary_mib * MiB
    ranges = _binary_ranges(size, sizes.binary_read_fraction, rng)
    _write(py / "_ranges.py", f"RANGES = {ranges!r}\n")
    _write(py / "boot.py", _BOOT)
    subprocess.run([LAUNCH_PYTHON, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
                    "unchecked-hash", str(var / "python")], check=True)
    _random_file(var / "bin" / "dcc.bin", size, rng)
    for n in range(sizes.untouched_files):
        kind = ("doc", "icons", "plugins", "scripts", "presets")[n % 5]
        _write(var / "share" / kind / f"g{n // 200:03d}" / f"item{n:05d}.dat",
               rng.randbytes(rng.randrange(200, 4000)))
    # what one launch reads: every .pyc of dccapp (the whole file each) + the binary ranges
    pyc_bytes = sum(p.stat().st_size for p in py.rglob("*.pyc"))
    binary_bytes = sum(length for _, length, _ in ranges)
    return {"modules": module_count + 1 + tops + leaves + 2,  # + the package __init__s, _ranges, boot
            "pyc_bytes": pyc_bytes, "binary_bytes": binary_bytes,
            "launch_bytes": pyc_bytes + binary_bytes, "binary_size": size,
            "binary_ranges": len(ranges)}


# -- W2, W3 ---------------------------------------------------------------------
def build_w2(root: Path, sizes: Sizes, rng: random.Random) -> dict:
    var = root / W2_VARIANT
    _write(var / "package.py", _package_py("bigdata", "1.0.0"))
    _random_file(var / W2_FILE, sizes.seq_mib * MiB, rng)
    return {"file_bytes": sizes.seq_mib * MiB}


def build_w3(root: Path, sizes: Sizes, rng: random.Random) -> dict:
    var = root / W3_VARIANT
    _write(var / "package.py", _package_py("metatree", "1.0.0"))
    tree = var / W3_DIR
    per_dir = 100
    leaves = -(-sizes.tree_entries // (per_dir + 1))
    tops = max(1, round(leaves ** 0.5))
    entries = 0
    for leaf in range(leaves):
        d = tree / f"top{leaf % tops:03d}" / f"dir{leaf:04d}"
        d.mkdir(parents=True)
        for n in range(per_dir):
            name = f"file{n:03d}"
            if n % 50 == 49:  # a few symlinks, as packages have (libfoo.so -> libfoo.so.1)
                os.symlink(f"file{n - 1:03d}", d / f"{name}.so")
            else:
                (d / name).write_bytes(rng.randbytes(rng.randrange(0, 256)))
    entries = sum(1 for _ in _walk_entries(tree))
    return {"entries": entries}


def _walk_entries(top: Path):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def build_store(root: Path, sizes: Sizes) -> dict:
    """Generate the whole store under `root` (deterministic for given sizes)."""
    rng = random.Random(20240505)
    info = {"W1": build_w1(root, sizes, rng), "W2": build_w2(root, sizes, rng),
            "W3": build_w3(root, sizes, rng)}
    total_bytes = total_files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            total_files += 1
            total_bytes += os.lstat(os.path.join(dirpath, name)).st_size
    for var in (W1_VARIANT, W2_VARIANT, W3_VARIANT):
        b = f = 0
        for dirpath, dirnames, filenames in os.walk(root / var):
            for name in filenames:
                f += 1
                b += os.lstat(os.path.join(dirpath, name)).st_size
        info.setdefault("variants", {})[var] = {"files": f, "bytes": b}
    info["store"] = {"files": total_files, "bytes": total_bytes}
    return info


def ensure_store(workdir: Path, sizes: Sizes, log=print) -> tuple[Path, dict]:
    """The store for these sizes, built once and reused while the sizes match."""
    store = workdir / "store"
    manifest = workdir / "store.json"
    version = subprocess.run([LAUNCH_PYTHON, "-c", "import sys; print(sys.implementation.cache_tag)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wanted = {"generator": GENERATOR_VERSION, "sizes": asdict(sizes), "launch_python": LAUNCH_PYTHON,
              "cache_tag": version}
    if manifest.exists() and store.is_dir():
        data = json.loads(manifest.read_text())
        if data.get("wanted") == json.loads(json.dumps(wanted)):
            return store, data["info"]
    if store.exists():
        import shutil
        shutil.rmtree(store)
    manifest.unlink(missing_ok=True)
    log(f"generating the store in {store} ...")
    t = time.perf_counter()
    store.mkdir(parents=True)
    info = build_store(store, sizes)
    manifest.write_text(json.dumps({"wanted": wanted, "info": info}, indent=2))
    log(f"  {info['store']['files']} files, {info['store']['bytes'] / MiB:.0f} MiB "
        f"in {time.perf_counter() - t:.0f} s")
    return store, info


# -- the launch and the workload runners ---------------------------------------
def launch_argv(variant_root: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(variant_root / "python"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONHOME", None)
    return [LAUNCH_PYTHON, "-B", "-c", LAUNCH_CODE], env


def seqread(path: str) -> dict:
    buf = bytearray(MiB)
    n = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            n += got
    return {"bytes": n, "seconds": time.perf_counter() - t}


def walk(top: str) -> dict:
    t = time.perf_counter()
    n = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return {"entries": n, "seconds": time.perf_counter() - t}


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    print(json.dumps({"seqread": seqread, "walk": walk}[cmd](arg)))
