"""cachecore on its own: real files, real SQLite, real threads; no FUSE."""
from __future__ import annotations

import os
import pickle
import stat

import diskcache
import pytest
import trio

from cachecore.blocks import BlockCache, file_key
from cachecore.cache import open_blocks
from cachecore.errors import LazyFSError, NotFound, StoreFileChanged, StoreUnavailable, UnsafeValue
from cachecore.fetcher import Fetcher
from cachecore.index import MetadataIndex
from cachecore.model import Attr, decode_listing, encode_listing, identity_of_stat
from cachecore.repository import RepoPolicy, Repository
from cachecore.stats import Counters
from cachecore.store import FilesystemStore

BS = 4096


class CountingStore(FilesystemStore):
    """The real filesystem store, with a count of the calls that reach it."""

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        self.reads = 0
        self.listings = 0

    def read(self, *args):
        self.reads += 1
        return super().read(*args)

    def list_dir(self, relpath, *progress):
        self.listings += 1
        return super().list_dir(relpath, *progress)


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def store_root(tmp_path):
    root = tmp_path / "store"
    (root / "fam" / "1.0" / "bin").mkdir(parents=True)
    (root / "fam" / "1.0" / "package.py").write_text("name = 'fam'\nversion = '1.0'\n")
    (root / "fam" / "1.0" / "bin" / "tool").write_bytes(os.urandom(BS * 3 + 17))
    (root / "fam" / "1.0" / "bin" / "link").symlink_to("../../../../outside")
    return root


def blocks_in(directory, kind=BlockCache) -> BlockCache:
    """A block cache in `directory` (made if missing), keyed with its own secret."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return open_blocks(str(directory), BS, kind=kind)


def make_repo(tmp_path, store, *, mutable=False, ttl=60.0, clock=None, timeout=5.0,
              blocks_class=BlockCache, cache_may_stall=False):
    counters = Counters()
    index = MetadataIndex(str(tmp_path / "cache" / "index"))
    blocks = blocks_in(str(tmp_path / "cache"), blocks_class)
    fetcher = Fetcher(blocks, counters, store_limiter=trio.CapacityLimiter(4),
                      local_limiter=trio.CapacityLimiter(4), store_timeout=timeout,
                      cache_may_stall=cache_may_stall)
    repo = Repository("main", store, index, fetcher, RepoPolicy(ttl, mutable),
                      clock=clock or Clock())
    return repo, counters, index


def test_listing_codec_round_trips_odd_names():
    entries = {b"a b": Attr(0o100644, 5, 1, 2, 3, 1, 0, 0),
               b"\xff\xfe-not-utf8": Attr(0o120777, 3, 1, 2, 3, 1, 0, 0, b"../x"),
               b"x" * 255: Attr(0o40755, 0, 1, 2, 3, 2, 0, 0)}
    decoded, fetched_at = decode_listing(encode_listing(entries, 12.5))
    assert decoded == entries and fetched_at == 12.5
    with pytest.raises(ValueError):
        decode_listing(encode_listing(entries, 1.0)[:-3])


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_a_listing_record_naming_an_impossible_entry_is_refused(name):
    # encode_listing writes whatever it is given: a record forged like this
    # (in a shared cache, a baked context) must not decode.
    good = {b"ok": Attr(0o100644, 5, 1, 2, 3, 1, 0, 0)}
    blob = encode_listing({**good, name: Attr(0o100644, 1, 1, 2, 3, 1, 0, 0)}, 1.0)
    with pytest.raises(ValueError, match="impossible name"):
        decode_listing(blob)
    # a repository root's record holds one entry, "."
    root = encode_listing({b".": Attr(0o40755, 0, 1, 2, 3, 2, 0, 0)}, 1.0)
    assert list(decode_listing(root)[0]) == [b"."]
    with pytest.raises(ValueError):
        decode_listing(encode_listing({b".": good[b"ok"], b"x": good[b"ok"]}, 1.0))


def test_index_refuses_pickles_and_never_runs_them(tmp_path):
    index = MetadataIndex(str(tmp_path / "index"))
    with pytest.raises(TypeError):
        index._db.set(b"k", {"not": "plain"})
    index.close()

    # Plant a pickle the way a hostile sharer of the cache directory would:
    # through stock diskcache, which pickles anything that is not plain.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = diskcache.Cache(str(tmp_path / "index"))
    planted.set(b"evil", Payload())
    planted.set(b"L\0" + b"/store\0", Payload())
    planted.close()

    index = MetadataIndex(str(tmp_path / "index"))
    with pytest.raises(UnsafeValue):
        index._db.get(b"evil")
    with pytest.raises(UnsafeValue):
        index.get_listing("/store", b"")
    assert not marker.exists()
    assert pickle.dumps  # the module is there; we simply never call loads


def test_block_cache_detects_damage_and_absence(tmp_path):
    from cachecore.blocks import TRAILER_SIZE

    blocks = blocks_in(str(tmp_path))
    key = file_key("/s", b"f", (BS + 10, 1), BS)
    assert blocks.read(key, 0, BS) is None          # no cache file yet
    blocks.write(key, 1, b"0123456789")
    assert blocks.read(key, 1, 10) == b"0123456789"
    assert blocks.read(key, 0, BS) is None          # a hole: never written, not damage
    assert blocks.present(key, BS + 10) == [1]
    assert stat.S_IMODE(os.stat(blocks.path(key)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "blocks").st_mode) == 0o700
    slot1 = BS + TRAILER_SIZE
    with open(blocks.path(key), "r+b") as f:         # flip one byte: the digest must catch it
        f.seek(slot1 + 3)
        f.write(b"X")
    assert blocks.read(key, 1, 10) is None
    assert blocks.read(key, 1, 10) is None           # damaged, every time, until rewritten
    blocks.write(key, 1, b"0123456789")
    blocks.write(key, 0, b"a" * BS)
    os.truncate(blocks.path(key), slot1 + 5)        # a torn tail
    assert blocks.read(key, 1, 10) is None and blocks.read(key, 0, BS) == b"a" * BS
    # Bytes that are whole but belong to another slot do not verify there.
    with open(blocks.path(key), "r+b") as f:
        trailer_of_block0 = f.read()[BS:BS + TRAILER_SIZE]
        f.seek(slot1)
        f.write(b"a" * 10 + trailer_of_block0)
    assert blocks.read(key, 1, 10) is None


def test_kept_cache_file_never_hides_a_replacement(tmp_path):
    """Reads keep the cache file open; a file evicted and fetched again (by this
    process or another sharing the cache) must be read from its new copy."""
    key = file_key("/s", b"f", (3 * BS, 1), BS)
    ours, other = blocks_in(str(tmp_path)), blocks_in(str(tmp_path))
    ours.write(key, 0, b"a" * BS)
    assert ours.read(key, 0, BS) == b"a" * BS        # its descriptor is now kept
    os.unlink(ours.path(key))                        # evicted by a clean elsewhere
    other.write(key, 1, b"b" * BS)                   # and refetched by another process
    assert ours.read(key, 1, BS) == b"b" * BS        # not "absent" through the old file
    assert ours.read(key, 0, BS) is None             # the evicted block is gone for good
    os.unlink(ours.path(key))
    ours.write(key, 2, b"c" * BS)                    # refetched by this process
    assert ours.read(key, 2, BS) == b"c" * BS
    assert ours.read(key, 1, BS) is None


def test_a_shared_cache_that_never_held_a_block_reads_as_empty(tmp_path):
    from cachecore.cache import open_blocks
    from cachecore.layered import SharedBlocks

    # A read-only cache that never held a block has no blocks/ directory, and
    # none is made in it.
    (tmp_path / "shared").mkdir(mode=0o700)
    open_blocks(str(tmp_path / "shared"), BS).close()  # made its secret, as a mount would
    shared = open_blocks(str(tmp_path / "shared"), BS, create=False, kind=SharedBlocks)
    key = file_key("/s", b"f", (BS, 1), BS)
    assert shared.read(key, 0, BS) is None
    assert shared.present(key, BS) == []
    shared.close_idle()
    assert not (tmp_path / "shared" / "blocks").exists()


def test_open_files_close_only_unused_descriptors(tmp_path):
    from cachecore.openfiles import OpenFiles

    path = tmp_path / "f"
    path.write_bytes(b"x")
    files = OpenFiles(max_idle=1, idle_seconds=60)
    opener = lambda: os.open(path, os.O_RDONLY)  # noqa: E731
    fd = files.acquire("k", opener)
    assert files.acquire("k", opener) == fd          # shared while open
    files.forget("k")                                # replaced while two readers use it
    fresh = files.acquire("k", opener)
    assert fresh != fd
    files.release("k", fd)
    assert os.pread(fd, 1, 0) == b"x"                # one reader left: still open
    files.release("k", fd)
    with pytest.raises(OSError):
        os.fstat(fd)                                 # closed with its last reader
    files.release("k", fresh)
    assert os.pread(fresh, 1, 0) == b"x"             # idle, kept
    other = files.acquire("other", opener)
    files.release("other", other)                    # a second idle file: over max_idle
    with pytest.raises(OSError):
        os.fstat(fresh)                              # the oldest idle one went
    files.close_idle(max_age=0)
    with pytest.raises(OSError):
        os.fstat(other)


def streaming_repo(tmp_path, blocks: int, stream_after: int, stream_window: int):
    """(data, store, counters, fetcher, repo): fam/1.0/stream.bin and scatter.bin,
    both `data`, `blocks` blocks long, in a counting store."""
    store_dir = tmp_path / "store"
    (store_dir / "fam" / "1.0").mkdir(parents=True)
    data = os.urandom(BS * blocks)
    (store_dir / "fam" / "1.0" / "stream.bin").write_bytes(data)
    (store_dir / "fam" / "1.0" / "scatter.bin").write_bytes(data)
    store = CountingStore(str(store_dir))
    counters = Counters()
    fetcher = Fetcher(blocks_in(str(tmp_path / "cache")), counters,
                      store_limiter=trio.CapacityLimiter(4), local_limiter=trio.CapacityLimiter(4),
                      store_timeout=5.0, stream_after=stream_after, stream_window=stream_window)
    repo = Repository("main", store, MetadataIndex(str(tmp_path / "cache" / "index")), fetcher,
                      RepoPolicy(), clock=Clock())
    return data, store, counters, fetcher, repo


def test_a_stream_from_the_store_is_fetched_ahead_once_and_scattered_reads_are_not(tmp_path):
    data, store, counters, fetcher, repo = streaming_repo(tmp_path, 64, 8 * BS, 4 * BS)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher.run_prefetches_in(nursery)
            scatter = await repo.open(b"fam/1.0/scatter.bin")
            for index in (40, 3, 17, 60, 9, 33, 50, 1, 25, 12):
                assert await repo.read(scatter, index * BS, BS) == data[index * BS:(index + 1) * BS]
            await trio.sleep(0.2)
            assert counters.prefetch_blocks == 0        # scattered: nothing fetched ahead
            stream = await repo.open(b"fam/1.0/stream.bin")
            for index in range(20):                     # read in order, one block at a time
                assert await repo.read(stream, index * BS, BS) == data[index * BS:(index + 1) * BS]
            with trio.move_on_after(5):                 # the fetches ahead run in threads
                while counters.store_reads < 10 + 24:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            # After 8 blocks in order, the next ones were fetched ahead of the
            # reader, each block once (reads that found one on its way waited
            # for it), and no further than the window past the last read.
            assert counters.prefetch_blocks > 0
            assert fetcher.cached_bytes(stream) == 24 * BS
            assert counters.store_reads == 10 + 24
            # Fetched ahead in runs of blocks, one store call each (a call a
            # block before): the 16 blocks past the first 8 in at most 8.
            assert store.reads - 10 - 8 <= 8
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_stream_is_fetched_ahead_when_its_window_is_shorter_than_a_run(tmp_path):
    # A window of one block (a 1M block size under the 2 MiB default): runs
    # shrink to the window, so the stream is still fetched ahead.
    data, _, counters, fetcher, repo = streaming_repo(tmp_path, 16, 4 * BS, BS)

    async def main():
        async with trio.open_nursery() as nursery:
            fetcher.run_prefetches_in(nursery)
            stream = await repo.open(b"fam/1.0/stream.bin")
            for index in range(12):
                assert await repo.read(stream, index * BS, BS) == data[index * BS:(index + 1) * BS]
            await trio.sleep(0.2)
            assert counters.prefetch_blocks > 0
            assert counters.store_reads == 13  # the 12 read and the one ahead of them, once each
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_file_key_changes_with_identity():
    key = file_key("/s", b"f", (10, 1), BS)
    assert key != file_key("/s", b"f", (10, 2), BS)
    assert key != file_key("/s", b"f", (11, 1), BS)
    assert key != file_key("/t", b"f", (10, 1), BS)
    assert key != file_key("/s", b"f", (10, 1), 2 * BS)
    # The name of a cache file is a format: computed otherwise, every cache already
    # on disk would miss.
    assert file_key("/s", b"fam/1.0/bin/tool", (10, 1, 2, 3), 131072) == \
        "7dae0a9bba0c5d8a9a03daf834786ad945ed7997993281ed7ad9b2c5ca0815ef"


def test_store_never_follows_symlinks(tmp_path, store_root):
    store = FilesystemStore(str(store_root))
    (tmp_path / "outside").write_text("secret")
    entries = store.list_dir(b"fam/1.0/bin")
    assert entries[b"link"].is_link and entries[b"link"].target == b"../../../../outside"
    with pytest.raises(LazyFSError):  # O_NOFOLLOW: ELOOP, never the target
        store.read(b"fam/1.0/bin/link", (6, entries[b"link"].mtime_ns), 0, 6)
    # A directory swapped for a symlink after it was indexed is not walked through.
    os.rename(store_root / "fam" / "1.0" / "bin", tmp_path / "bin-moved")
    os.symlink(tmp_path / "bin-moved", store_root / "fam" / "1.0" / "bin")
    tool = (tmp_path / "bin-moved" / "tool").stat()
    with pytest.raises(LazyFSError):
        store.read(b"fam/1.0/bin/tool", identity_of_stat(tool), 0, 10)


def test_read_fetches_each_block_once_even_when_concurrent(tmp_path, store_root):
    store = CountingStore(str(store_root))
    repo, counters, _ = make_repo(tmp_path, store)
    data = (store_root / "fam/1.0/bin/tool").read_bytes()

    async def main():
        version = await repo.open(b"fam/1.0/bin/tool")
        results = {}

        async def reader(n):
            results[n] = await repo.read(version, 0, len(data) + 100)

        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(reader, n)
        assert all(r == data for r in results.values())
        assert await repo.read(version, BS - 3, 10) == data[BS - 3:BS + 7]
        assert await repo.read(version, len(data), 10) == b""

    trio.run(main)
    assert store.reads == 4  # 3 full blocks and a partial one, each fetched once
    assert counters.store_reads == 4 and counters.cache_misses == 4
    assert counters.store_bytes == len(data)


def test_metadata_policy_ttl_and_immutability(tmp_path, store_root):
    clock = Clock()
    store = CountingStore(str(store_root))
    repo, _, _ = make_repo(tmp_path, store, ttl=30, clock=clock)

    async def main():
        await repo.readdir(b"fam/1.0/bin")
        with pytest.raises(NotFound):
            await repo.lookup(b"fam/1.0/bin", b"missing")
        listed = store.listings  # fam/1.0 (for bin's attributes) and fam/1.0/bin
        assert listed == 2
        (store_root / "fam" / "2.0").mkdir()
        (store_root / "fam" / "1.0" / "bin" / "new").write_text("x")
        clock.now += 31
        # The family directory is revalidated after the TTL: a new version appears.
        assert b"2.0" in await repo.readdir(b"fam")
        # A payload directory below a version is immutable: never relisted.
        with pytest.raises(NotFound):
            await repo.lookup(b"fam/1.0/bin", b"new")
        return listed

    listed = trio.run(main)
    assert store.listings == listed + 2  # root and fam listed; bin never relisted
    assert repo.is_volatile(b"fam/1.0/package.py") and not repo.is_volatile(b"fam/1.0/bin/tool")


def test_mutable_repository_revalidates_payload(tmp_path, store_root):
    clock = Clock()
    store = CountingStore(str(store_root))
    repo, _, _ = make_repo(tmp_path, store, mutable=True, ttl=5, clock=clock)
    tool = store_root / "fam/1.0/bin/tool"

    async def main():
        v1 = await repo.open(b"fam/1.0/bin/tool")
        assert await repo.read(v1, 0, 5) == tool.read_bytes()[:5]
        tool.write_bytes(b"new contents")
        os.utime(tool, ns=(1, 1))
        clock.now += 6
        v2 = await repo.open(b"fam/1.0/bin/tool")
        assert v2.key != v1.key
        assert await repo.read(v2, 0, 100) == b"new contents"

    trio.run(main)


def test_changed_file_is_never_mixed(tmp_path, store_root):
    store = CountingStore(str(store_root))
    repo, _, _ = make_repo(tmp_path, store)
    tool = store_root / "fam/1.0/bin/tool"

    async def main():
        version = await repo.open(b"fam/1.0/bin/tool")
        await repo.read(version, 0, BS)          # block 0 cached from the old file
        tool.write_bytes(os.urandom(BS * 3 + 17))  # same size, new mtime
        assert await repo.read(version, 0, BS) == (await repo.read(version, 0, BS))
        with pytest.raises(StoreFileChanged):      # block 1 would come from the new file
            await repo.read(version, BS, BS)

    trio.run(main)


def test_offline_serves_cache_and_fails_fast_otherwise(tmp_path, store_root):
    store = CountingStore(str(store_root))
    repo, _, index = make_repo(tmp_path, store)
    data = (store_root / "fam/1.0/bin/tool").read_bytes()

    async def warm():
        v = await repo.open(b"fam/1.0/bin/tool")
        assert await repo.read(v, 0, BS) == data[:BS]

    trio.run(warm)
    index.close()
    os.rename(store_root, tmp_path / "away")
    repo, _, _ = make_repo(tmp_path, CountingStore(str(store_root)))

    async def offline():
        v = await repo.open(b"fam/1.0/bin/tool")  # metadata from the index
        assert await repo.read(v, 0, BS) == data[:BS]
        with pytest.raises(StoreUnavailable):
            await repo.read(v, BS, BS)
        with pytest.raises(StoreUnavailable):
            await repo.readdir(b"fam")  # never listed, so not in the index

    trio.run(offline)


def test_hung_store_times_out(tmp_path, store_root):
    import threading

    release = threading.Event()

    class HungStore(FilesystemStore):
        def read(self, *args):
            release.wait(10)
            return super().read(*args)

    repo, _, _ = make_repo(tmp_path, HungStore(str(store_root)), timeout=0.3)

    async def main():
        v = await repo.open(b"fam/1.0/bin/tool")
        start = trio.current_time()
        with pytest.raises(StoreUnavailable, match="no answer"):
            await repo.read(v, 0, BS)
        assert trio.current_time() - start < 2

    try:
        trio.run(main)
    finally:
        release.set()


def test_a_listing_that_keeps_answering_outlasts_the_timeout(tmp_path, store_root):
    """Each step of a listing reports progress, which moves its deadline: a
    listing taking several timeouts finishes (once); one step longer than the
    timeout fails it."""
    import time

    for n in range(40):
        (store_root / "fam" / "1.0" / "bin" / f"m{n:02d}").write_text("x")

    class SlowStore(FilesystemStore):
        step = 0.02

        def list_dir(self, relpath, progress):
            def slowly():
                time.sleep(self.step)
                progress()
            return super().list_dir(relpath, slowly)

    store = SlowStore(str(store_root))
    repo, counters, index = make_repo(tmp_path, store, timeout=0.3)

    async def main():
        start = trio.current_time()
        names = await repo.readdir(b"fam/1.0/bin")
        took = trio.current_time() - start
        assert len(names) == 42 and took > 1.0, took  # > 3 timeouts
        assert index.get_listing(store.root, b"fam/1.0/bin") is not None
        store.step = 0.5
        start = trio.current_time()
        with pytest.raises(StoreUnavailable, match="no answer"):
            await repo.readdir(b"fam")
        assert trio.current_time() - start < 1.5

    trio.run(main)


def test_a_cache_disk_that_does_not_answer_is_a_cache_that_misses(tmp_path, store_root, caplog):
    import threading

    release = threading.Event()

    class StallingBlocks(BlockCache):
        stalled = False

        def read_many(self, key, blocks):
            if self.stalled:
                release.wait(10)
            return super().read_many(key, blocks)

    repo, counters, _ = make_repo(tmp_path, FilesystemStore(str(store_root)), timeout=0.3,
                                  blocks_class=StallingBlocks, cache_may_stall=True)
    data = (store_root / "fam" / "1.0" / "bin" / "tool").read_bytes()

    async def main():
        v = await repo.open(b"fam/1.0/bin/tool")
        assert bytes(await repo.read(v, 0, BS)) == data[:BS]
        assert bytes(await repo.read(v, 0, BS)) == data[:BS] and counters.store_reads == 1
        repo.fetcher.blocks.stalled = True
        start = trio.current_time()
        assert bytes(await repo.read(v, 0, BS)) == data[:BS]  # from the store
        assert trio.current_time() - start < 1.0 and counters.store_reads == 2
        start = trio.current_time()
        assert bytes(await repo.read(v, BS, BS)) == data[BS:2 * BS]
        assert trio.current_time() - start < 0.2  # known silent: no second wait

    try:
        trio.run(main)
    finally:
        release.set()
    said = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(said) == 1, said


def test_latency_histogram_merges_and_gives_percentiles():
    from cachecore.stats import Counters

    a, b = Counters(), Counters()
    for ms in range(1, 101):
        a.record_latency(ms / 1000)
    b.record_latency(5.0)
    b.cache_hits = 3
    total = Counters.from_record(json_round_trip((a + b).to_record()))
    assert total.cache_hits == 3 and sum(total.fetch_latency) == 101
    assert total.fetch_time_us == sum(range(1, 101)) * 1000 + 5_000_000  # a histogram's sum
    # Buckets are 2^(1/4) apart: a percentile is within 19% above the true value.
    assert 0.050 <= total.latency_percentile(0.5) <= 0.050 * 1.19
    assert 0.099 <= total.latency_percentile(0.99) <= 0.100 * 1.19
    assert total.latency_percentile(1.0) >= 5.0
    assert Counters().summary()["hit_ratio"] is None


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


def _cached_file(cache, relpath: bytes, size: int, when: float, mtime=1):
    """Blocks for a (pretend) store file, and a recorded use at `when`."""
    key = file_key("/store", relpath, (size, mtime), cache.blocks.block_size)
    for i, offset in enumerate(range(0, size, BS)):
        cache.blocks.write(key, i, b"x" * min(BS, size - offset))
    cache.index.record_uses([(key, {"store": "/store", "path": relpath.decode(), "size": size,
                                    "mtime_ns": mtime, "block_size": BS}, int(when))])
    os.utime(cache.blocks.path(key), (when, when))
    return key


def test_clean_evicts_least_recently_used_keeps_pins(tmp_path):
    from cachecore.cache import LocalCache
    from cachecore.clean import clean_cache, scan_cache

    cache = LocalCache(str(tmp_path), BS)
    now = 2_000_000_000
    old = _cached_file(cache, b"a/1/old", 3 * BS, now - 10 * 86400)
    mid = _cached_file(cache, b"a/1/mid", 2 * BS, now - 5 * 86400)
    new = _cached_file(cache, b"a/1/new", 2 * BS, now - 60)
    pinned = _cached_file(cache, b"a/1/package.py", 100, now - 100 * 86400)
    cache.index.pin("context:/x.rxt", [pinned])
    per_block = BS + 4096  # allocated: a block and its trailer's page

    dry = clean_cache(cache.blocks, cache.index, max_size=5 * per_block, dry_run=True, now=now)
    assert dry.evicted_files == 1 and set(scan_cache(cache.blocks, cache.index)) == {old, mid, new, pinned}

    report = clean_cache(cache.blocks, cache.index, max_size=5 * per_block, now=now)
    left = scan_cache(cache.blocks, cache.index)
    assert set(left) == {mid, new, pinned}  # the oldest went first; the pinned one stays
    assert report.size_after == sum(f.bytes for f in left.values()) <= 5 * per_block
    assert old not in {k for k, _, _ in cache.index.file_records()}

    clean_cache(cache.blocks, cache.index, max_days=1, now=now)
    assert set(scan_cache(cache.blocks, cache.index)) == {new, pinned}
    report = clean_cache(cache.blocks, cache.index, max_size=0, now=now)
    assert set(scan_cache(cache.blocks, cache.index)) == {pinned}
    assert report.pinned_bytes == 4096  # one page allocated
    cache.close()


def test_pins_last_while_their_holder_file_does(tmp_path):
    from cachecore.cache import LocalCache
    from cachecore.clean import holder_identity, release_orphaned_pins

    cache = LocalCache(str(tmp_path / "cache"), BS)
    files = {name: tmp_path / f"{name}.rxt" for name in ("kept", "gone", "replaced", "legacy")}
    for path in files.values():
        path.write_text("{}")
    for name in ("kept", "gone", "replaced"):
        path = str(files[name])
        cache.index.pin(f"context:{path}", [name], (path, holder_identity(os.stat(path))))
    cache.index.pin("no-holder", ["always"])
    # As written before pins named their holder: a bare list, named for the file.
    cache.index.set_record("p", f"context:{files['legacy']}", '["legacy"]')
    files["gone"].unlink()
    other = tmp_path / "other"
    other.write_text("{}")
    other.replace(files["replaced"])  # another file at the same path

    assert release_orphaned_pins(cache.index, dry_run=True).released == sorted(
        f"context:{files[n]}" for n in ("gone", "replaced"))
    assert len(cache.index.pins()) == 5  # a dry run releases nothing
    files["legacy"].unlink()
    held = release_orphaned_pins(cache.index)
    assert len(held.released) == 3 and not held.unanswered
    assert set().union(*cache.index.pins().values()) == {"kept", "always"}
    cache.close()


def test_cache_keeps_its_block_size(tmp_path):
    from cachecore.cache import BlockSizeMismatch, LocalCache

    LocalCache(str(tmp_path), 64 * 1024).close()
    reopened = LocalCache(str(tmp_path))
    assert reopened.blocks.block_size == 64 * 1024
    reopened.close()
    with pytest.raises(BlockSizeMismatch, match="64K"):
        LocalCache(str(tmp_path), 128 * 1024)


def test_store_keeps_a_file_open_across_blocks_and_closes_it_when_idle(store_root):
    opened = []

    class OpenCountingStore(FilesystemStore):
        def _open_file(self, relpath):
            opened.append(relpath)
            return super()._open_file(relpath)

    store = OpenCountingStore(str(store_root))
    tool = store_root / "fam/1.0/bin/tool"
    st = tool.stat()
    identity = identity_of_stat(st)
    fds_before = len(os.listdir("/proc/self/fd"))
    data = b"".join(store.read(b"fam/1.0/bin/tool", identity, off, min(BS, st.st_size - off))
                    for off in range(0, st.st_size, BS))
    assert data == tool.read_bytes() and opened == [b"fam/1.0/bin/tool"]
    assert len(os.listdir("/proc/self/fd")) == fds_before + 2  # the file and its directory, idle
    store._files.close_idle(max_age=0)
    store._dirs.close_idle(max_age=0)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_store_opens_files_of_a_directory_through_one_walk_and_walks_again_when_it_moved(
        store_root):
    walks = []

    class WalkCountingStore(FilesystemStore):
        def _walk(self, relpath, for_listing=False):
            walks.append(relpath)
            return super()._walk(relpath, for_listing)

    store = WalkCountingStore(str(store_root))
    bin_dir = store_root / "fam/1.0/bin"

    def read_new(name: str, content: bytes, replace_as: str | None = None) -> bytes:
        """Write bin/NAME (in a new bin/ if replace_as: the old one renamed so) and read it."""
        if replace_as:
            os.rename(bin_dir, store_root / "fam/1.0" / replace_as)
            bin_dir.mkdir()
        (bin_dir / name).write_bytes(content)
        st = (bin_dir / name).stat()
        return store.read(b"fam/1.0/bin/" + os.fsencode(name), identity_of_stat(st), 0,
                          len(content))

    assert read_new("one", b"one bytes") == b"one bytes"
    assert read_new("two", b"two bytes") == b"two bytes"
    assert walks == [b"fam/1.0/bin"]
    # The directory is replaced by another: the kept descriptor names the old
    # one, where the file is not; a fresh walk finds it.
    assert read_new("new", b"new bytes", replace_as="bin.old") == b"new bytes"
    assert walks == [b"fam/1.0/bin"] * 2
    # Replaced again, with a file of the same name (a release flipped): the old
    # directory's file has the old identity, so the path is walked afresh.
    assert read_new("new", b"newer bytes", replace_as="bin.older") == b"newer bytes"
    assert walks == [b"fam/1.0/bin"] * 3
    # However busy, a directory is walked to again after DIR_AGE seconds.
    store._dirs.max_age = 0
    assert read_new("more", b"more") == b"more"
    assert walks == [b"fam/1.0/bin"] * 4
    store.close_idle()
