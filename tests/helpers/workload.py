"""Scripted workloads against a mount, and reading what the cache-management
commands (`status`, `stats`, `clean`, `logs`) say about them.

* reads that reach the daemon exactly as scripted (no kernel readahead
  beyond what was asked, page cache dropped on request), so counters can be
  predicted block for block;
* ``LazyfsCommands`` runs the offline commands in an isolated environment
  and parses both their ``--json`` output and their tables;
* ``HashingReader`` is a separate process that hashes files through the
  mount in a loop and reports every wrong byte it ever saw;
* block files of a cache directory, counted and sized from the outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.mounts import LAZYFS, VENV_BIN
from helpers.trees import deterministic_bytes, write_file

MAINTENANCE_INTERVAL = 2.0  # seconds between a mount's flushes and limit checks


# -- reading through the mount -----------------------------------------------


def drop_page_cache(path: Path) -> None:
    """Evict *path* from the kernel page cache, so the next read of it must
    go to the daemon instead of being answered by the kernel."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path: Path) -> int:
    """How many pages of *path* the kernel's page cache holds (fincore(1),
    util-linux: mincore(2) of a mapping of it, so nothing is read)."""
    out = subprocess.run(["fincore", "--noheadings", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """Exactly [offset, offset+length) of *path*. Readahead is switched off
    for this open file (POSIX_FADV_RANDOM): otherwise the kernel would ask
    the daemon for blocks past the range, and a "read half of the file"
    workload would fetch more than half."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_whole(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def blocks_of(size: int, block_size: int) -> int:
    return -(-size // block_size)


# -- store payloads ------------------------------------------------------------


def write_payload(store: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """Write each relpath -> size as incompressible, distinct content
    (so a block served for another file or offset fails a hash check);
    returns relpath -> content."""
    written = {}
    for n, (relpath, size) in enumerate(sorted(sizes.items())):
        written[relpath] = deterministic_bytes(size, seed=seed * 1000 + n)
        write_file(store / relpath, written[relpath])
    return written


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the block cache from the outside ----------------------------------------


@dataclass(frozen=True)
class DiskUsage:
    """What the files under CACHE/blocks take: their apparent sizes and the
    space allocated to them. Which of the two is "the size on disk" depends
    on the block layout (one file per block: apparent, payload plus
    trailers; one sparse file per file version: allocated), so tests learn
    it from what the cache reports (size_on_disk_kind) and then hold the
    cache to it."""

    apparent: int
    allocated: int
    files: int

    def of_kind(self, kind: str) -> int:
        return getattr(self, kind)


def disk_usage(cache: Path) -> DiskUsage:
    apparent = allocated = files = 0
    for root, _dirs, names in os.walk(cache / "blocks"):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # evicted meanwhile
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return DiskUsage(apparent, allocated, files)


def size_on_disk_kind(reported: int, cache: Path) -> str:
    """The measure ("apparent" or "allocated") by which *reported* is exactly
    the size of the cache's block files now; fails if it is neither."""
    usage = disk_usage(cache)
    kinds = [kind for kind in ("apparent", "allocated") if usage.of_kind(kind) == reported]
    assert kinds, f"the cache reports {reported} bytes on disk; its block files hold {usage}"
    return kinds[0]


# -- rez-lazyfs's offline commands -------------------------------------------


class CommandFailed(AssertionError):
    pass


@dataclass
class LazyfsCommands:
    """Runs `rez-lazyfs` (not the mount) with no user configuration, on one
    cache directory unless told otherwise. *env* adds to the environment
    (bake needs rez's test configuration)."""

    work_dir: Path
    cache: Path
    env: dict[str, str] | None = None

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_LAZYFS")}
        env.update(self.env or {})
        xdg = self.work_dir / "xdg"
        env.update(XDG_CONFIG_HOME=str(xdg / "config"), XDG_CACHE_HOME=str(xdg / "cache"),
                   XDG_DATA_HOME=str(xdg / "data"), XDG_STATE_HOME=str(xdg / "state"),
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
        return env

    def argv(self, command: str, *args) -> list[str]:
        return [str(LAZYFS), command, *map(str, args), "--cache", str(self.cache)]

    def run(self, command: str, *args) -> str:
        """stdout of a command that must succeed and leave no traceback."""
        result = subprocess.run(self.argv(command, *args), env=self.environ(), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        shown = (f"`{' '.join(map(str, result.args))}` exited {result.returncode}\n"
                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        if result.returncode != 0 or "Traceback" in result.stdout + result.stderr:
            raise CommandFailed(shown)
        self.last_stderr = result.stderr
        return result.stdout

    def json(self, command: str, *args) -> dict:
        return json.loads(self.run(command, *args, "--json"))

    def status(self) -> dict:
        return self.json("status")

    def stats(self) -> dict:
        return self.json("stats")

    def clean(self, *args) -> dict:
        return self.json("clean", *args)

    def status_when_flushed(self, timeout: float = 3 * MAINTENANCE_INTERVAL) -> dict:
        """`status --json` once every cached file is attributed to its
        package. A running mount records which file each block belongs to
        when it flushes (every MAINTENANCE_INTERVAL), so blocks fetched in
        the last moments are "(unattributed)" until then."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            pending = [v for v in status["variants"] if v["package"] == "(unattributed)"]
            if not pending or time.monotonic() > deadline:
                return status
            time.sleep(0.2)


def source_named(stats: dict, name: str) -> dict:
    found = [s for s in stats["sources"] if s["name"] == name]
    assert len(found) == 1, f"no single source {name!r} in stats: {[s['name'] for s in stats['sources']]}"
    return found[0]


def row_of(status: dict, package: str, version: str) -> dict:
    found = [v for v in status["variants"] if (v["package"], v["version"]) == (package, version)]
    assert len(found) == 1, f"no single status row {package}/{version}: {status['variants']}"
    return found[0]


# -- tables ---------------------------------------------------------------------


def parse_table(lines: list[str], headers: list[str]) -> list[dict[str, str]]:
    """Rows of a left-aligned table whose header line holds *headers* in
    order; cells are cut at the headers' columns (values may contain
    single spaces, as "1.5 KiB / 2.0 KiB" and "just now" do)."""
    header_at = next(i for i, line in enumerate(lines) if line.split()[:1] == headers[0].split()[:1])
    header = lines[header_at]
    starts, pos = [], 0
    for name in headers:
        pos = header.index(name, pos)
        starts.append(pos)
        pos += len(name)
    assert header[starts[0]:].split() == " ".join(headers).split(), f"unexpected header: {header!r}"
    rows = []
    for line in lines[header_at + 1:]:
        if not line.strip():
            continue
        bounds = [*starts[1:], None]
        rows.append({name: line[start:end].strip() for name, start, end in zip(headers, starts, bounds)})
    return rows


_HUMAN = re.compile(r"^(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def assert_size_shows(text: str, n: int) -> None:
    """*text* is a human-readable size of exactly *n* bytes, to the
    precision shown (bytes exact, larger units to one decimal)."""
    m = _HUMAN.match(text.strip())
    assert m, f"not a size: {text!r}"
    value, unit = float(m.group(1)), _UNITS[m.group(2)]
    if unit == 1:
        assert int(value) == n, f"{text!r} shown for {n} bytes"
    else:
        assert abs(n / unit - value) <= 0.05 + 1e-9, f"{text!r} shown for {n} bytes"
        assert n >= 1024 and (n / unit < 1024 or unit == _UNITS["TiB"]), f"{text!r}: wrong unit for {n} bytes"


# -- a reader that never stops checking ------------------------------------


_HASHING_READER = r"""
import hashlib, json, os, sys, time
expected, stop_file, result_file = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
rounds, reads, mismatches, errors = 0, 0, [], []
while not os.path.exists(stop_file):
    for path, digest in expected.items():
        try:
            with open(path, "rb") as f:
                # Or after the first round the kernel would answer every
                # read itself and the daemon (and the clean) never be tested.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            errors.append(f"{path}: {e!r}")
            continue
        reads += 1
        if got != digest:
            mismatches.append(path)
    rounds += 1
json.dump({"rounds": rounds, "reads": reads, "mismatches": mismatches, "errors": errors},
          open(result_file, "w"))
"""


class HashingReader:
    """A separate process hashing every given file through the mount, round
    after round, until stopped; ``stop()`` returns what it saw."""

    def __init__(self, work_dir: Path, expected: dict[Path, str]):
        work_dir.mkdir(parents=True, exist_ok=True)
        self._expected = work_dir / "expected.json"
        self._expected.write_text(json.dumps({str(p): d for p, d in expected.items()}))
        self._stop = work_dir / "stop"
        self._result = work_dir / "result.json"
        self._process = subprocess.Popen(
            [sys.executable, "-c", _HASHING_READER, self._expected, self._stop, self._result],
            stdin=subprocess.DEVNULL)

    def stop(self, timeout: float = 30) -> dict:
        self._stop.touch()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the hashing reader did not stop within {timeout}s") from None
        assert self._process.returncode == 0, f"the hashing reader exited {self._process.returncode}"
        return json.loads(self._result.read_text())

    def kill(self) -> None:
        """Only for cleanup after a failure: our own child, by its pid."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> HashingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
