"""Launch traces, end to end: a launch recorded with `rez-lazyfs trace record`
on a real mount, seeded into a fresh cache, replayed on the first access to
its variant; the store is a FaultFS passthrough that counts every read by
file and offset and can be slowed per request or made to fail.

Real rez resolves and sources the contexts; the launch is a Python start-up
that imports a package of modules and reads scattered ranges of a data
file, and prints the sha256 of everything it read.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.faults import fault_store_fixture  # noqa: F401 (fixture)
from helpers.mounts import is_mounted
from helpers.rezrepo import Rez, build_store
from helpers.mounts import LAZYFS
from helpers.workload import drop_page_cache, resident_pages

ALIAS = "main"
BLOCK = 128 * 1024  # the default block size: bake and seed use it
VARIANT = "app/1.0"
MODULES = 40
DATA_SIZE = 24 * BLOCK
# (offset, length) of the data file the launch reads: scattered, 9 blocks
RANGES = [(0, 4096), (3 * BLOCK + 100, 5000), (7 * BLOCK, BLOCK + 10), (12 * BLOCK + 5, 300),
          (15 * BLOCK, 2 * BLOCK), (21 * BLOCK + 17, 64)]
LAUNCH = ("import applaunch, sys; sys.stdout.write(applaunch.main())")


def _module(i: int) -> str:
    rng = random.Random(i)
    body = "\n".join(f"def f{n}(x={rng.randrange(1000)}):\n    return x * {n}\n"
                     for n in range(60))
    return f"VALUE = {rng.randrange(10**6)}\n{body}\n"


def _store_entries() -> dict:
    entries = {
        f"{VARIANT}/package.py": """
            name = "app"
            version = "1.0"
            def commands():
                env.PYTHONPATH.prepend("{root}/python")
                env.APP_DATA = "{root}/share/data.bin"
        """,
        f"{VARIANT}/python/applaunch/__init__.py": f"""
            import hashlib, importlib, os
            RANGES = {RANGES!r}
            def main():
                h = hashlib.sha256()
                for i in range({MODULES}):
                    h.update(str(importlib.import_module(f"applaunch.mod_{{i:03d}}").VALUE).encode())
                with open(os.environ["APP_DATA"], "rb") as f:
                    for offset, length in RANGES:
                        f.seek(offset)
                        h.update(f.read(length))
                return h.hexdigest() + "\\n"
        """,
        f"{VARIANT}/share/data.bin": random.Random(7).randbytes(DATA_SIZE),
        f"{VARIANT}/share/unused.bin": random.Random(8).randbytes(8 * BLOCK),
    }
    for i in range(MODULES):
        entries[f"{VARIANT}/python/applaunch/mod_{i:03d}.py"] = _module(i)
    return entries


def expected_output(store: Path) -> str:
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for i in range(MODULES):
        path = store / VARIANT / f"python/applaunch/mod_{i:03d}.py"
        spec = importlib.util.spec_from_file_location(f"m{i}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        h.update(str(module.VALUE).encode())
    data = (store / VARIANT / "share/data.bin").read_bytes()
    for offset, length in RANGES:
        h.update(data[offset:offset + length])
    return h.hexdigest() + "\n"


class Launch:
    """A store behind a counting FaultFS, a context resolved from it, baked
    for one mount point, and the trace of its launch."""

    def __init__(self, tmp_path: Path, fault_store, lazyfs_mount):
        self.tmp = tmp_path
        self.rez = Rez(tmp_path)
        self.source = tmp_path / "svr" / "packages"
        build_store(self.source, _store_entries())
        self.faults = fault_store(self.source)
        self.store = self.faults.path
        self.context = self.rez.resolve(["app"], [self.store], tmp_path / "app.rxt")
        self.expected = expected_output(self.source)
        self.mount = lazyfs_mount({ALIAS: self.store}, block_size=None)
        self.baked = tmp_path / "app.lazy.rxt"
        self.lazyfs("bake", self.context, "-o", self.baked, "--mount", self.mount.path,
                    "--repo", f"{ALIAS}={self.store}", "--cache", self.mount.cache)
        self.trace = tmp_path / "app.trace"

    def lazyfs(self, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = self.rez.lazyfs(*args, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr, result.stderr
        return result

    def record(self) -> subprocess.CompletedProcess:
        return self.lazyfs("trace", "record", self.baked, "-o", self.trace, "--",
                           sys.executable, "-B", "-c", LAUNCH)

    def record_in_background(self, code: str) -> subprocess.Popen:
        """`trace record` of `python -B -c code`, not waited for."""
        return subprocess.Popen([str(LAZYFS), "trace", "record", str(self.baked), "-o",
                                 str(self.trace), "--", sys.executable, "-B", "-c", code],
                                env=self.rez.lazyfs_environ(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def launch(self) -> tuple[str, float]:
        started = time.monotonic()
        result = self.rez.source(self.baked, [sys.executable, "-B", "-c", LAUNCH])
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        return result.stdout, elapsed

    def fresh_mount(self, name: str, *, seed_trace: bool) -> None:
        """The mount point again, over an empty cache (seeded with the trace)."""
        cache = self.tmp / f"cache-{name}"
        if seed_trace:
            self.lazyfs("seed", self.trace, "--repo", f"{ALIAS}={self.store}", "--cache", cache)
        self.mount.remount(cache=cache)

    def settle(self, quiet: float = 1.0, limit: float = 60.0) -> dict:
        """The mount's stats once its store counters stop moving."""
        last, still = self.mount.stats(), time.monotonic()
        deadline = time.monotonic() + limit
        while time.monotonic() - still < quiet and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.mount.stats()
            if (now["store_reads"], now["store_listings"]) != (last["store_reads"],
                                                               last["store_listings"]):
                still = time.monotonic()
            last = now
        return last


def trace_doc(path: Path) -> dict:
    return json.loads(path.read_bytes())


def trace_blocks(doc: dict) -> dict[str, set[int]]:
    """path (relative to the store) -> the blocks the trace names."""
    out: dict[str, set[int]] = {}
    for v in doc["variants"]:
        runs = v["reads"]
        for i in range(0, len(runs), 3):
            f, first, count = runs[i:i + 3]
            path = f"{v['root']}/{v['files'][f]['path']}"
            out.setdefault(path, set()).update(range(first, first + count))
    return out


def store_reads(faults) -> dict[str, dict[int, int]]:
    """path -> {block: times read} from the FaultFS counts (reads are block-aligned)."""
    out = {}
    for path, offsets in faults.counts().get("by_file", {}).items():
        blocks: dict[int, int] = {}
        for offset, times in offsets.items():
            blocks[int(offset) // BLOCK] = blocks.get(int(offset) // BLOCK, 0) + times
        out[path] = blocks
    return out


@pytest.fixture
def launch(tmp_path, fault_store, lazyfs_mount) -> Launch:
    return Launch(tmp_path, fault_store, lazyfs_mount)


# -- 1. record, seed, replay: same bytes, each block once, faster ------------------
def test_traced_cold_launch_reads_the_same_bytes_fetches_each_block_once_and_is_faster(launch):
    recorded = launch.record()
    assert recorded.stdout == launch.expected  # the command's output passes through
    doc = trace_doc(launch.trace)
    assert [v["root"] for v in doc["variants"]] == [VARIANT]
    blocks = trace_blocks(doc)
    # what the launch read, and what the kernel's read-ahead asked for around it
    assert blocks[f"{VARIANT}/share/data.bin"] >= {0, 3, 7, 8, 12, 15, 16, 21}
    assert f"{VARIANT}/share/unused.bin" not in blocks
    assert sum(p.startswith(f"{VARIANT}/python/applaunch/mod_") for p in blocks) == MODULES

    # Recording again merges: the same launch adds nothing.
    before = launch.trace.read_bytes()
    launch.record()
    assert trace_blocks(trace_doc(launch.trace)) == blocks
    assert len(launch.trace.read_bytes()) == len(before)

    # A cold start with the trace seeded: the same output, every traced block
    # read from the store exactly once, nothing read twice.
    launch.faults.set("ok")
    launch.fresh_mount("traced", seed_trace=True)
    output, _ = launch.launch()
    assert output == launch.expected
    stats = launch.settle()
    reads = store_reads(launch.faults)
    assert all(times == 1 for per_file in reads.values() for times in per_file.values()), reads
    for path, wanted in blocks.items():
        assert set(reads.get(path, {})) >= wanted, path
    assert stats["replay_blocks"] >= sum(len(b) for b in blocks.values()) - 2
    assert stats["replay_useful"] >= stats["replay_blocks"] - 2
    assert stats["replay_waste"] == stats["replay_blocks"] - stats["replay_useful"]

    # With the store slowed, the traced cold launch beats the untraced one.
    timings = {}
    for name, traced in (("untraced", False), ("traced-slow", True)):
        launch.faults.set("ok", delay=0.03, slow_ops=["read", "readdir", "lookup"])
        launch.fresh_mount(name, seed_trace=traced)
        output, timings[name] = launch.launch()
        assert output == launch.expected
    assert timings["traced-slow"] < timings["untraced"], timings


# -- 1b. what the kernel holds does not hide reads from a recording -------------------
def wait_until(done, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, f"not {what} within {limit}s"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["no-open", "open-requests"])
def test_a_recording_sees_reads_the_kernel_could_answer_from_earlier_or_other_readers(
        launch, tmp_path, mode):
    """Without open requests the kernel keeps a file's pages and a
    directory's listing for the next reader: a recorded process must still
    ask for them itself, whether they were read before the recording began
    (by a process that keeps the file open) or during it by a process outside it."""
    if mode == "open-requests":
        launch.mount.remount(extra_args=("--open-requests",))
    root = launch.mount.repo_path(ALIAS) / VARIANT
    package = root / "python/applaunch"
    modules = [package / f"mod_{i:03d}.py" for i in range(MODULES)]
    started, go = tmp_path / "started", tmp_path / "go"
    code = (f"import os, time\nopen({str(started)!r}, 'w').close()\n"
            f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.02)\n{LAUNCH}")
    with open(root / "share/data.bin", "rb") as held:  # in use since before the recording
        held.read()
        recording = launch.record_in_background(code)
        try:
            wait_until(started.exists, "started")
            os.listdir(package)  # a process outside the recording lists and reads
            for module in modules:
                module.read_bytes()
            if mode == "no-open":  # what the kernel was given, it drops again (at once)
                wait_until(lambda: not any(resident_pages(m) for m in modules), "dropped", 10)
            go.touch()
            out, err = recording.communicate(timeout=120)
        finally:
            recording.kill()
            recording.wait()
    assert recording.returncode == 0 and out == launch.expected, err
    doc = trace_doc(launch.trace)
    blocks = trace_blocks(doc)
    assert blocks[f"{VARIANT}/share/data.bin"] >= {0, 3, 7, 8, 12, 15, 16, 21}
    assert sum(p.startswith(f"{VARIANT}/python/applaunch/mod_") for p in blocks) == MODULES
    assert "python/applaunch" in doc["variants"][0]["dirs"]


# -- 2. demand reads go first ---------------------------------------------------------
def test_a_read_outside_the_trace_is_not_delayed_by_a_replay(launch):
    launch.record()
    # A large trace: every block of unused.bin and data.bin, many times over
    # what the slowed store can deliver in the time the test allows a read.
    doc = trace_doc(launch.trace)
    variant = doc["variants"][0]
    names = [f["path"] for f in variant["files"]]
    for big in ("share/data.bin", "share/unused.bin"):
        if big not in names:
            st = os.stat(launch.store / VARIANT / big)
            variant["files"].append({"path": big, "identity": [st.st_size, st.st_mtime_ns,
                                                               st.st_ctime_ns, st.st_ino]})
            names.append(big)
    data = names.index("share/data.bin")
    variant["reads"] += [data, 0, DATA_SIZE // BLOCK]
    launch.trace.write_text(json.dumps(doc))
    # The read is of a block the trace does not name, in a file it does not name.
    outside = launch.source / VARIANT / "share" / "outside.bin"
    outside.write_bytes(random.Random(9).randbytes(BLOCK))
    launch.faults.set("ok", delay=0.25)
    launch.fresh_mount("busy", seed_trace=True)
    root = launch.mount.repo_path(ALIAS) / VARIANT
    os.listdir(root / "share")   # the first access: the replay starts
    time.sleep(0.3)              # it is under way, holding its threads
    started = time.monotonic()
    got = (root / "share" / "outside.bin").read_bytes()
    elapsed = time.monotonic() - started
    assert got == outside.read_bytes()
    # one store read of 0.25 s, plus a listing; the replay has ~24 blocks
    # queued at 0.25 s each, 8 at a time (0.75 s and more)
    assert elapsed < 1.5, f"a demand read took {elapsed:.2f}s during a replay"
    stats = launch.mount.stats()
    assert stats["replay_blocks"] < DATA_SIZE // BLOCK  # the replay was indeed still going


# -- 3. changed and vanished files are skipped -------------------------------------------
def test_a_trace_of_files_that_changed_or_vanished_replays_the_rest(launch):
    launch.record()
    launch.mount.unmount()
    changed = launch.source / VARIANT / "python/applaunch/mod_000.py"
    changed.write_text(changed.read_text().replace("VALUE = ", "VALUE = 1 + "))
    gone = launch.source / VARIANT / "python/applaunch/mod_001.py"
    kept = gone.read_text()
    gone.unlink()
    (launch.source / VARIANT / "python/applaunch/mod_001.py").write_text(kept)  # a new inode
    expected = expected_output(launch.source)
    launch.faults.set("ok")
    launch.fresh_mount("changed", seed_trace=True)
    output, _ = launch.launch()
    assert output == expected
    stats = launch.settle()
    assert stats["replay_skipped"] >= 2
    assert stats["errors"] == 0
    reads = store_reads(launch.faults)
    assert all(times == 1 for per_file in reads.values() for times in per_file.values()), reads


# -- 4. store unreachable, unmount during a replay ------------------------------------------
def wait_for_log(mount, text: str, since: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not any(text.encode() in line for line in mount.log_lines(since)):
        assert time.monotonic() < deadline, f"no {text!r} in the log within {limit}s"
        time.sleep(0.1)


def test_replay_stops_when_the_store_fails_and_unmount_is_prompt(launch):
    launch.record()
    launch.faults.set("ok", delay=0.2)
    launch.fresh_mount("failing", seed_trace=True)
    mark = launch.mount.log_mark()
    module = launch.mount.repo_path(ALIAS) / VARIANT / "python/applaunch/mod_002.py"
    expected = (launch.source / VARIANT / "python/applaunch/mod_002.py").read_bytes()
    assert module.read_bytes() == expected  # the first access: the replay starts
    time.sleep(0.5)
    launch.mount.expect_log(str(launch.store))  # the store's failures are logged
    launch.faults.set("eio")
    wait_for_log(launch.mount, f"trace replay of {ALIAS}/{VARIANT} stopped", mark)
    stats = launch.mount.stats()  # the daemon answers
    assert 0 < stats["replay_blocks"] < sum(len(b) for b in trace_blocks(
        trace_doc(launch.trace)).values())
    drop_page_cache(module)
    assert module.read_bytes() == expected  # cached: still read
    assert "mod_003.py" in os.listdir(module.parent)

    # Unmount during a replay from a slow store: prompt.
    launch.faults.set("ok", delay=0.5)
    launch.fresh_mount("slow", seed_trace=True)
    mark = launch.mount.log_mark()
    os.listdir(launch.mount.repo_path(ALIAS) / VARIANT)
    wait_for_log(launch.mount, "replaying the trace of", mark)
    started = time.monotonic()
    launch.mount.unmount()
    assert time.monotonic() - started < 5


# -- 5. traces travel: a baked context, a trace directory; status and stats show them --------
def test_traces_travel_in_a_baked_context_and_a_trace_directory(launch, tmp_path):
    launch.record()
    baked = tmp_path / "app.traced.rxt"
    result = launch.lazyfs("bake", launch.context, "-o", baked, "--mount", launch.mount.path,
                           "--repo", f"{ALIAS}={launch.store}", "--cache", launch.mount.cache,
                           "--trace", launch.trace)
    assert "with the traces of 1" in result.stdout
    section = json.loads(baked.read_text())["rez_lazyfs"]
    assert [t["root"] for t in section["traces"]] == [VARIANT]

    # Another machine: seeding the baked context brings the trace.
    cache = tmp_path / "cache-from-context"
    result = launch.lazyfs("seed", baked, "--repo", f"{ALIAS}={launch.store}", "--cache", cache)
    assert "the traces of 1 variant(s)" in result.stdout
    status = json.loads(launch.lazyfs("status", "--json", "--cache", cache).stdout)
    row = next(v for v in status["variants"] if (v["package"], v["version"]) == ("app", "1.0"))
    assert row["traces"] == ["-"]  # the variant is the version directory itself
    table = launch.lazyfs("status", "--cache", cache).stdout
    assert "TRACE" in table.splitlines()[1]
    launch.mount.remount(cache=cache)
    output = launch.rez.source(baked, [sys.executable, "-B", "-c", LAUNCH]).stdout
    assert output == launch.expected
    stats = launch.settle()
    assert stats["replay_blocks"] > 0 and stats["replay_useful"] > 0
    shown = launch.lazyfs("stats", "--cache", cache).stdout
    assert f"trace replays fetched {stats['replay_blocks']} block(s)" in shown, shown

    # A studio's trace directory, named in the config: no seeding at all.
    traces = tmp_path / "ci-traces"
    (traces / "app").mkdir(parents=True)
    shutil.copy(launch.trace, traces / "app" / "1.0.trace")
    config = tmp_path / "config.toml"
    config.write_text(f'[repos]\n{ALIAS} = {{ path = "{launch.store}", traces = "{traces}" }}\n')
    launch.mount.remount(repos={}, extra_args=("--config", str(config)),
                         cache=tmp_path / "cache-from-directory")
    output = launch.rez.source(launch.baked, [sys.executable, "-B", "-c", LAUNCH]).stdout
    assert output == launch.expected
    stats = launch.settle()
    assert stats["replay_blocks"] > 0 and stats["replay_useful"] > 0


# -- bad input ----------------------------------------------------------------------------
BAD_TRACES = {
    "not JSON": b"{not json",
    "not a trace": json.dumps({"format": "something-else"}).encode(),
    "a path out of the variant": json.dumps({"format": "rez-lazyfs-trace", "version": 1, "variants": [
        {"root": VARIANT, "block_size": BLOCK, "dirs": [], "reads": [0, 0, 1],
         "files": [{"path": "../../etc/passwd", "identity": [10, 1, 1, 1]}]}]}).encode(),
    "a read past the end": json.dumps({"format": "rez-lazyfs-trace", "version": 1, "variants": [
        {"root": VARIANT, "block_size": BLOCK, "dirs": [], "reads": [0, 5, 1],
         "files": [{"path": "a", "identity": [10, 1, 1, 1]}]}]}).encode(),
}


@pytest.mark.parametrize("problem", sorted(BAD_TRACES))
def test_a_bad_trace_file_is_a_clean_error_everywhere(launch, tmp_path, problem):
    bad = tmp_path / "bad.trace"
    bad.write_bytes(BAD_TRACES[problem])
    cache = tmp_path / "cache-bad"
    out = tmp_path / "never-written.rxt"
    for args in (["trace", "show", bad],
                 ["seed", bad, "--repo", f"{ALIAS}={launch.store}", "--cache", cache],
                 ["bake", launch.context, "-o", out, "--mount", launch.mount.path,
                  "--repo", f"{ALIAS}={launch.store}", "--cache", launch.mount.cache,
                  "--trace", bad]):
        if args[0] == "seed" and problem in ("not JSON", "not a trace"):
            continue  # not a trace file: seed takes it for a context (tested there)
        result = launch.lazyfs(*args, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("rez-lazyfs: error: "), result.stderr
        assert not out.exists()


def test_recording_needs_a_baked_context_and_passes_the_exit_status(launch, tmp_path):
    result = launch.lazyfs("trace", "record", launch.context, "-o", tmp_path / "t.trace", "--",
                           "true", check=False)
    assert result.returncode == 1 and "rez-lazyfs bake" in result.stderr, result.stderr
    assert not (tmp_path / "t.trace").exists()
    result = launch.lazyfs("trace", "record", launch.baked, "-o", tmp_path / "t.trace", "--",
                           sys.executable, "-c", "import sys; print('out'); sys.exit(3)",
                           check=False)
    assert result.returncode == 3 and result.stdout == "out\n", result
    assert "Traceback" not in result.stderr


def test_recording_with_nothing_mounted_mounts_for_the_run_and_unmounts(launch, tmp_path):
    launch.mount.unmount()
    trace = tmp_path / "own-mount.trace"
    result = launch.lazyfs("trace", "record", launch.baked, "-o", trace,
                           "--repo", f"{ALIAS}={launch.store}", "--cache", tmp_path / "cache-own",
                           "--", sys.executable, "-B", "-c", LAUNCH)
    assert result.stdout == launch.expected
    assert not is_mounted(launch.mount.path)
    assert f"{VARIANT}/share/data.bin" in trace_blocks(trace_doc(trace))
