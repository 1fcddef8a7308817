"""Issue 12: a published image carries its variants' launch traces
(`rez-lazyfs publish --trace`), and every mount of it replays them.

The trace is recorded for real (`rez-lazyfs trace record`) on a mount of the
repository directory itself; the image of that directory is served by a real
nginx, read through a real squid, and mounted at the same mount point over
a fresh cache, so the same baked context launches from it. Real rez
resolves and sources the contexts; the launch imports a package of modules
and reads scattered ranges of a data file, and prints the sha256 of all it
read.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers.faults import lazyfs_cli_fixture
from helpers.http import nginx_origin_fixture, squid_proxy_fixture
from helpers.image import ImageReader, image_objects
from helpers.rezrepo import Rez, build_store
from helpers.trees import write_rez_package

from cachecore.image.manifest import Manifest, load_private_key
from cachecore.image.objects import encode_object, object_name, object_path
from cachecore.image.traces import encode_trace_index
from cachecore.trace import VariantTrace, encode

# The launch, its store and its expected output: the same as the filesystem store's traces.
from .test_traces import LAUNCH, VARIANT, expected_output
from .test_traces import _store_entries as store_entries

FIXTURES = (nginx_origin_fixture, squid_proxy_fixture, lazyfs_cli_fixture)
ALIAS = "main"
WARNING = "rez-lazyfs: warning: "
BLOCK = 128 * 1024  # the default block size and the image's chunk size


def lstat_identity(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def blocks_of(trace: VariantTrace) -> dict[bytes, set[int]]:
    out: dict[bytes, set[int]] = {}
    for f, b in trace.reads:
        out.setdefault(trace.files[f][0], set()).add(b)
    return out


def rewrite(path: Path) -> None:
    """Another version of a module, in place: another value."""
    path.write_text(path.read_text().replace("VALUE = ", "VALUE = 1 + ", 1))


class TracedImage:
    """A repository, a context resolved from it and baked for one mount
    point, a mount of the repository at that point (to record on), and an
    image of the repository on an nginx origin (to mount there instead)."""

    def __init__(self, tmp_path: Path, lazyfs_mount, origin):
        self.tmp = tmp_path
        self.rez = Rez(tmp_path)
        self.source = tmp_path / "svr" / "packages"
        build_store(self.source, store_entries())
        self.origin = origin
        self.image = Path(origin.root)
        self.key = tmp_path / "signing.key"
        self.lazyfs("keygen", self.key)
        self.public_key = Path(f"{self.key}.pub")
        context = self.rez.resolve(["app"], [self.source], tmp_path / "app.rxt")
        self.mount = lazyfs_mount({ALIAS: self.source}, block_size=None)
        self.baked = tmp_path / "app.lazy.rxt"
        self.lazyfs("bake", context, "-o", self.baked, "--mount", self.mount.path,
                    "--repo", f"{ALIAS}={self.source}", "--cache", self.mount.cache)
        self.trace = tmp_path / "app.trace"

    def lazyfs(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        result = self.rez.lazyfs(*args, timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def record(self) -> VariantTrace:
        """Record the launch on the repository's own mount; the trace of the variant."""
        self.lazyfs("trace", "record", self.baked, "-o", self.trace, "--",
                    sys.executable, "-B", "-c", LAUNCH)
        [trace] = self.trace_file()
        assert trace.root == VARIANT.encode() and trace.reads
        return trace

    def trace_file(self) -> list[VariantTrace]:
        from cachecore.trace import decode

        return decode(self.trace.read_bytes())

    def publish(self, *args) -> tuple[dict, list[str]]:
        """The report and the warning lines of a publish into the origin's directory."""
        result = self.lazyfs("publish", self.source, self.image, "--key", self.key, "--json", *args)
        self.origin.reload()  # nginx keeps files open: serve what was just written
        lines = result.stderr.splitlines()
        assert all(line.startswith(WARNING) for line in lines), result.stderr
        return json.loads(result.stdout), [line[len(WARNING):] for line in lines]

    def reader(self) -> ImageReader:
        return ImageReader(self.image, self.public_key)

    def mount_image(self, name: str, proxy=None) -> None:
        """The image at the same mount point, over a fresh cache."""
        extra = ("--public-key", str(self.public_key)) + (("--proxy", proxy.url) if proxy else ())
        self.mount.remount(repos={ALIAS: self.origin.url}, cache=self.tmp / f"cache-{name}",
                           extra_args=extra)

    def launch(self) -> str:
        result = self.rez.source(self.baked, [sys.executable, "-B", "-c", LAUNCH])
        assert result.returncode == 0, result.stderr
        return result.stdout

    def variant(self) -> Path:
        return self.mount.repo_path(ALIAS) / VARIANT

    def settle(self, quiet: float = 1.0, limit: float = 60.0) -> dict:
        """The mount's stats once its store reads stop moving."""
        last, still = self.mount.stats(), time.monotonic()
        deadline = time.monotonic() + limit
        while time.monotonic() - still < quiet and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.mount.stats()
            if now["store_reads"] != last["store_reads"]:
                still = time.monotonic()
            last = now
        return last


@pytest.fixture
def origin(nginx_origin):
    return nginx_origin()


@pytest.fixture
def traced(tmp_path, lazyfs_mount, origin) -> TracedImage:
    return TracedImage(tmp_path, lazyfs_mount, origin)


def wait_for_log(mount, text: str, since: int = 0, limit: float = 30.0) -> bytes:
    deadline = time.monotonic() + limit
    while True:
        found = [line for line in mount.log_lines(since) if text.encode() in line]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {text!r} in the log within {limit}s"
        time.sleep(0.1)


# -- 1. published, mounted, replayed through squid ------------------------------------
def test_a_published_trace_is_replayed_through_squid_and_the_launch_reads_the_same_bytes(
        traced, squid_proxy):
    recorded = traced.record()
    expected = expected_output(traced.source)
    proxy = squid_proxy()

    # An image without traces (as every image before them): mounts, launches, no replay.
    report, warnings = traced.publish()
    assert report["traces"] == 0 and not warnings
    assert traced.reader().manifest.traces == ""
    traced.mount_image("untraced", proxy)
    assert traced.launch() == expected
    stats = traced.settle()
    assert stats["replay_blocks"] == 0 and stats["errors"] == 0
    assert not [line for line in traced.mount.log_lines() if b"cannot read the trace" in line]

    # The next revision carries the trace, with the image's identities.
    report, warnings = traced.publish("--trace", traced.trace)
    assert report["traces"] == 1 and report["revision"] == 2 and not warnings, warnings
    reader = traced.reader()
    [(root, published)] = reader.traces().items()
    assert root == VARIANT.encode()
    assert [p for p, _ in published.files] == [p for p, _ in recorded.files]
    for (path, identity), (_, was) in zip(published.files, recorded.files):
        attr = reader.attrs[root + b"/" + path]
        assert identity == attr.identity and len(identity) == 5 and identity[:4] == was
    assert blocks_of(published) == blocks_of(recorded)
    assert published.dirs == recorded.dirs
    trace_objects = {reader.manifest.traces, *reader.trace_index().values()}
    assert trace_objects <= image_objects(traced.image)
    assert image_objects(traced.image) >= reader.referenced_objects() >= trace_objects

    # A fresh cache, through a fresh squid: the first access replays the
    # trace from the image, the launch prints what it printed from the
    # repository, and the replayed blocks are the ones it reads. (The launch
    # starts once the replay is done: reads that come before the trace's
    # pack list is in would fetch their chunks alone, which is allowed but
    # not what this counts.)
    proxy = squid_proxy()
    traced.mount_image("traced", proxy)
    mark = traced.mount.log_mark()
    os.listdir(traced.variant())
    line = wait_for_log(traced.mount, f"replayed the trace of {ALIAS}/{VARIANT}", mark)
    assert traced.launch() == expected
    stats = traced.settle()
    traced_blocks = sum(len(b) for b in blocks_of(published).values())
    assert stats["replay_blocks"] >= traced_blocks - 2, (stats, line)
    assert stats["replay_useful"] >= stats["replay_blocks"] - 2, stats
    assert stats["replay_skipped"] == 0 and stats["errors"] == 0, stats
    # Every traced chunk came through squid in the trace's packs, none of them
    # alone; the trace and its pack list too; nothing of the file the launch
    # does not read.
    chunks = {name for path, blocks in blocks_of(published).items()
              for name in (reader.files[root + b"/" + path].chunks[b] for b in blocks)}
    [packs] = reader.packs().values()
    packed = {member for pack in packs for member, _ in pack.members}
    assert packed == chunks and len(packs) < len(chunks)
    asked = [r.url.rsplit("/", 1)[1] for r in proxy.requests("/objects/")]
    assert sorted(set(asked)) == sorted(asked), "an object was asked for twice"
    assert {pack.name for pack in packs} <= set(asked)
    assert not chunks & set(asked), "a traced chunk was fetched alone, not in its pack"
    assert trace_objects | {reader.pack_index()[root]} <= set(asked)
    unused = reader.files[root + b"/share/unused.bin"].chunks
    assert not set(unused) & set(asked)
    traffic = stats["stores"][ALIAS]
    assert (traffic["trace_packs"], traffic["trace_pack_failures"]) == (len(packs), 0), traffic
    assert traffic["requests"] == len(asked) + 1, (traffic, asked)  # and the manifest


# -- 2. a file changed before publishing; publishing again --------------------------------
def test_a_file_changed_before_publishing_is_left_out_and_publishing_again_keeps_the_rest(traced):
    recorded = traced.record()
    traced.mount.unmount()
    changed = traced.source / VARIANT / "python/applaunch/mod_000.py"
    rewrite(changed)
    expected = expected_output(traced.source)
    # and a variant the repository does not have, by hand
    ghost = VariantTrace(b"ghost/1.0", BLOCK, ALIAS, [b""])
    traced.trace.write_bytes(encode([*traced.trace_file(), ghost]))

    report, warnings = traced.publish("--trace", traced.trace)
    assert report["traces"] == 1
    assert sorted(warnings) == sorted([
        f"the trace of {VARIANT}: 1 file(s) changed or gone since it was recorded, left out "
        "of it: python/applaunch/mod_000.py",
        f"the trace of ghost/1.0 is left out: ghost/1.0 is not a directory in {traced.source}"])
    published = traced.reader().traces()[VARIANT.encode()]
    names = [p for p, _ in published.files]
    assert b"python/applaunch/mod_000.py" not in names
    assert names == [p for p, _ in recorded.files if p != b"python/applaunch/mod_000.py"]

    traced.mount_image("changed")
    assert traced.launch() == expected
    stats = traced.settle()
    # nothing skipped at the mount: the image's trace names only what it holds
    assert stats["replay_blocks"] > 0 and stats["replay_skipped"] == 0 and stats["errors"] == 0

    # Again without --trace, another module changed: the previous revision's
    # trace is kept, less that module.
    rewrite(traced.source / VARIANT / "python/applaunch/mod_001.py")
    report, warnings = traced.publish()
    assert report["traces"] == 1
    assert warnings == [f"the previous revision's trace of {VARIANT}: 1 file(s) changed or gone "
                        "since it was recorded, left out of it: python/applaunch/mod_001.py"]
    kept = traced.reader().traces()[VARIANT.encode()]
    assert [p for p, _ in kept.files] == [n for n in names if n != b"python/applaunch/mod_001.py"]

    # Again, nothing changed: the same traces, no object written, nothing said.
    index = traced.reader().manifest.traces
    report, warnings = traced.publish()
    assert report["objects_new"] == 0 and report["traces"] == 1 and not warnings
    assert traced.reader().manifest.traces == index

    # A trace given replaces the variant's previous one.
    traced.trace.write_bytes(encode([VariantTrace(
        VARIANT.encode(), BLOCK, ALIAS, [b"share"],
        [(b"share/unused.bin", lstat_identity(traced.source / VARIANT / "share/unused.bin"))],
        [(0, 2)])]))
    report, warnings = traced.publish("--trace", traced.trace)
    assert report["traces"] == 1 and not warnings
    replaced = traced.reader().traces()[VARIANT.encode()]
    assert [p for p, _ in replaced.files] == [b"share/unused.bin"] and replaced.reads == [(0, 2)]


# -- 3. a bad --trace: one line, nothing written ---------------------------------------------
def test_a_bad_trace_file_fails_with_one_line_and_publishes_nothing(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    write_rez_package(repo, "fam", "1.0", files={"lib/a.txt": "alpha\n"})
    key = tmp_path / "signing.key"
    assert lazyfs_cli.run("keygen", key).returncode == 0
    good = VariantTrace(b"fam/1.0", BLOCK, ALIAS, [b""],
                        [(b"lib/a.txt", lstat_identity(repo / "fam/1.0/lib/a.txt"))], [(0, 0)])
    document = json.loads(encode([good]))

    def variant_with(**fields) -> bytes:
        return json.dumps({**document, "variants": [{**document["variants"][0], **fields}]}).encode()

    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "missing": (None, "No such file or directory"),
        "a directory": (bad / "dir", "Is a directory"),
        "not JSON": (b"\x00garbage", "not JSON"),
        "another document": (b'{"format": "rez-lazyfs-recording"}', "not a rez-lazyfs trace"),
        "a bad identity": (variant_with(files=[{"path": "lib/a.txt", "identity": [1, -2]}]),
                           "identity must be"),
        "an escaping path": (variant_with(files=[{"path": "../../etc/passwd",
                                                  "identity": [1, 2, 3, 4]}]), "'..'"),
        "a path no file has": (variant_with(root="fam/\ud800"), "is not a file name"),
        "a read past the end": (variant_with(reads=[0, 5, 1]), "past its end"),
    }
    (bad / "dir").mkdir()

    def run_cases(dest: Path) -> None:
        for case, (content, expected) in cases.items():
            path = bad / case.replace(" ", "-")
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif content is not None:
                path = content
            result = lazyfs_cli.run("publish", repo, dest, "--key", key,
                                    "--trace", tmp_path / "good.trace", "--trace", path)
            line = result.one_line_error()
            assert result.returncode == 1 and expected in line, (case, line)
            assert line.startswith("rez-lazyfs: error: --trace: ") and "nothing published" in line

    (tmp_path / "good.trace").write_bytes(encode([good]))
    run_cases(image)
    assert not image.exists(), "a refused publish made the image directory"

    published = lazyfs_cli.run("publish", repo, image, "--key", key, "--trace", tmp_path / "good.trace")
    assert published.returncode == 0 and not published.stderr, published.output
    manifest, objects = (image / "manifest").read_bytes(), image_objects(image)
    run_cases(image)
    assert (image / "manifest").read_bytes() == manifest and image_objects(image) == objects
    assert [n for n in os.listdir(image) if n.startswith(".tmp-")] == []
    assert list(ImageReader(image, Path(f"{key}.pub")).traces()) == [b"fam/1.0"]


# -- 4. a damaged trace in the image: said and skipped -----------------------------------------
def publish_traced_package(tmp_path: Path, image: Path, files: dict[str, bytes]):
    """pkg/1.0 holding `files` (3 blocks of each traced), published with its
    trace into `image`: (the trace, publish's report, a reader, the public key)."""
    version = write_rez_package(tmp_path / "repo", "pkg", "1.0", files=files)
    key = tmp_path / "signing.key"
    rez = Rez(tmp_path)
    assert rez.lazyfs("keygen", key).returncode == 0
    trace = VariantTrace(b"pkg/1.0", BLOCK, ALIAS, [b"", b"lib"],
                         [(os.fsencode(rel), lstat_identity(version / rel)) for rel in files],
                         [(i, b) for i in range(len(files)) for b in range(3)])
    (tmp_path / "pkg.trace").write_bytes(encode([trace]))
    published = rez.lazyfs("publish", tmp_path / "repo", image, "--key", key,
                           "--trace", tmp_path / "pkg.trace", "--json")
    assert published.returncode == 0, published.stderr
    public = Path(f"{key}.pub")
    return trace, json.loads(published.stdout), ImageReader(image, public), public


def test_a_damaged_trace_in_the_image_is_logged_and_skipped(tmp_path, origin, lazyfs_mount):
    image = Path(origin.root)
    files = {f"lib/m{i}.bin": random.Random(i).randbytes(2 * BLOCK + 1 + i) for i in range(4)}
    _, _, reader, public = publish_traced_package(tmp_path, image, files)
    key = tmp_path / "signing.key"
    trace_name = reader.trace_index()[b"pkg/1.0"]
    options = dict(block_size=None, extra_args=("--public-key", str(public)))

    def first_access_then_read(m) -> dict:
        mark = m.log_mark()
        variant = m.repo_path(ALIAS) / "pkg/1.0"
        assert sorted(os.listdir(variant / "lib")) == sorted(Path(r).name for r in files)
        line = wait_for_log(m, "cannot read the trace", mark)
        for rel, data in files.items():
            assert (variant / rel).read_bytes() == data
        stats = m.stats()
        assert stats["replay_blocks"] == 0, stats
        return line

    # Sound: replayed.
    m = lazyfs_mount({ALIAS: origin.url}, **options)
    os.listdir(m.repo_path(ALIAS) / "pkg/1.0")
    wait_for_log(m, "replayed the trace of main/pkg/1.0")
    m.unmount()

    # Bytes that do not match the object's name: fetched again past the
    # caches, then given up on; the files are read as ever.
    blob = (image / object_path(trace_name)).read_bytes()
    origin.put(object_path(trace_name), blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    m.expect_log("does not match its name")
    m.remount(cache=tmp_path / "cache-tampered")
    line = first_access_then_read(m)
    assert trace_name.encode() in line, line
    origin.put(object_path(trace_name), blob)

    # Signed, matching its name, and no trace: the replay says so and goes without.
    not_a_trace = b'{"format": "rez-lazyfs-trace", "version": 1, "variants": "none"}'
    index = encode_trace_index({b"pkg/1.0": object_name(not_a_trace)})
    for data in (not_a_trace, index):
        origin.put(object_path(object_name(data)), encode_object(data))
    manifest = reader.manifest
    resigned = Manifest(**{**asdict(manifest), "revision": manifest.revision + 1,
                           "traces": object_name(index)})
    origin.put("manifest", resigned.encode(load_private_key(str(key))))
    m.remount(cache=tmp_path / "cache-not-a-trace")
    line = first_access_then_read(m)
    assert b"variants must be a list" in line, line


# -- 5. a damaged trace pack: said, its chunks fetched alone ------------------------------------
def test_a_damaged_trace_pack_is_given_up_on_and_its_chunks_are_fetched_alone(
        tmp_path, origin, lazyfs_mount):
    image = Path(origin.root)
    files = {f"lib/m{i}.bin": random.Random(i).randbytes(3 * BLOCK - 7) for i in range(6)}
    trace, report, reader, public = publish_traced_package(tmp_path, image, files)
    [packs] = reader.packs().values()
    assert report["packs"] == len(packs) == 3, packs  # 2.25 MiB, random
    options = dict(block_size=None, extra_args=("--public-key", str(public)))

    def replay_then_read(m, cache: str) -> dict:
        m.remount(cache=tmp_path / cache)
        mark = m.log_mark()
        os.listdir(m.repo_path(ALIAS) / "pkg/1.0")
        wait_for_log(m, "replayed the trace of main/pkg/1.0", mark)
        for rel, data in files.items():
            assert (m.repo_path(ALIAS) / "pkg/1.0" / rel).read_bytes() == data
        stats = m.stats()
        assert stats["replay_blocks"] == len(trace.reads) and stats["errors"] == 0, stats
        return stats["stores"][ALIAS]

    m = lazyfs_mount({ALIAS: origin.url}, **options)
    traffic = replay_then_read(m, "cache-sound")
    assert (traffic["trace_packs"], traffic["trace_pack_failures"]) == (3, 0), traffic
    assert not {member for member, _ in packs[1].members} & {
        path.rsplit("/", 1)[1] for path in origin.requests()}

    # The second pack's bytes do not match its name: asked for again past the
    # caches, then given up on; its members come one by one, each checked.
    damaged = packs[1]
    blob = (image / object_path(damaged.name)).read_bytes()
    origin.put(object_path(damaged.name), blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    m.expect_log("does not match its name")
    m.expect_log(f"trace pack {damaged.name} failed")
    before = len(origin.requests())
    traffic = replay_then_read(m, "cache-damaged-pack")
    assert (traffic["trace_packs"], traffic["trace_pack_failures"]) == (2, 1), traffic
    asked = [path.rsplit("/", 1)[1] for path in origin.requests()[before:]]
    assert asked.count(damaged.name) == 2, asked  # and once more past the caches
    assert sorted(m for m, _ in damaged.members) == sorted(
        name for name in asked if name in dict(damaged.members))
    origin.put(object_path(damaged.name), blob)

    # A pack list that is not one: said, and every chunk fetched alone.
    pack_list = reader.pack_index()[b"pkg/1.0"]
    origin.put(object_path(pack_list), encode_object(b'{"format": "rez-lazyfs-trace-packs"}'))
    m.expect_log("the trace's packs cannot be read")
    traffic = replay_then_read(m, "cache-damaged-list")
    assert (traffic["trace_packs"], traffic["trace_pack_failures"]) == (0, 0), traffic
