"""Launch traces in cachecore alone: the format, merging, recordings split per
variant, the process tree, and a replay through a real Repository over a
real directory store (no FUSE)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio
import trio.testing

from cachecore.blocks import BlockCache
from cachecore.cache import open_blocks
from cachecore.fetcher import Fetcher
from cachecore.index import MetadataIndex
from cachecore.replay import IndexTraces, TraceDirectory
from cachecore.repository import RepoPolicy, Repository
from cachecore.stats import Counters
from cachecore.store import FilesystemStore
from cachecore.trace import (
    BadTrace,
    ProcessTree,
    Recording,
    VariantTrace,
    decode,
    encode,
    merge,
    rescaled,
    traces_from_recording,
)

BS = 4096


def trace_of(files: dict[str, tuple], reads: list[tuple[int, int]], dirs=(), root=b"fam/1.0"):
    return VariantTrace(root, BS, "main", [os.fsencode(d) for d in dirs],
                        [(os.fsencode(p), i) for p, i in files.items()], reads)


def test_a_trace_round_trips_and_reads_are_kept_in_first_touch_order():
    t = trace_of({"a.py": (10 * BS, 1, 2, 3), "bin/x": (3 * BS, 4, 5, 6)},
                 [(1, 2), (0, 0), (0, 1), (0, 2), (1, 0)], dirs=["", "bin"])
    blob = encode([t])
    runs = json.loads(blob)["variants"][0]["reads"]
    assert runs == [1, 2, 1, 0, 0, 3, 1, 0, 1]  # consecutive blocks as one run
    assert decode(blob) == [t]


@pytest.mark.parametrize("damage, says", [
    (lambda v: v.update(root="fam"), "at least family/version"),
    (lambda v: v.update(root="/abs/1.0"), "root"),
    (lambda v: v["files"].append({"path": "a/../../b", "identity": [1, 1, 1, 1]}), "file"),
    (lambda v: v["files"][0].update(identity=[1, -1, 1, 1]), "identity"),
    (lambda v: v["files"][0].update(identity=[True, 1, 1, 1]), "identity"),
    (lambda v: v.update(reads=[0, 99, 1]), "past its end"),
    (lambda v: v.update(reads=[5, 0, 1]), "names no file"),
    (lambda v: v.update(reads=[0, 0]), "runs of three"),
    (lambda v: v.update(block_size=1000), "block_size"),
    (lambda v: v["files"].append(dict(v["files"][0])), "twice"),
    (lambda v: v.update(dirs=["ok", "x\0y"]), "directory"),
])
def test_a_damaged_trace_is_refused_naming_what_is_wrong(damage, says):
    doc = json.loads(encode([trace_of({"a.py": (2 * BS, 1, 2, 3)}, [(0, 0)])]))
    damage(doc["variants"][0])
    with pytest.raises(BadTrace, match=says):
        decode(json.dumps(doc).encode())


def test_merging_keeps_the_first_order_and_drops_reads_of_a_file_version_replaced():
    old = trace_of({"a": (4 * BS, 1, 1, 1), "b": (4 * BS, 2, 2, 2)}, [(0, 0), (1, 0), (0, 1)],
                   dirs=["", "x"])
    new = trace_of({"b": (4 * BS, 9, 9, 9), "c": (BS, 3, 3, 3)}, [(1, 0), (0, 3)], dirs=["y", ""])
    m = merge(old, new)
    assert m.dirs == [b"", b"x", b"y"]
    named = [(m.files[f][0], b) for f, b in m.reads]
    assert named == [(b"a", 0), (b"a", 1), (b"c", 0), (b"b", 3)]
    assert dict(m.files)[b"b"] == (4 * BS, 9, 9, 9)
    assert merge(m, m).reads == m.reads  # a union: nothing twice


def test_a_trace_in_other_blocks_names_the_same_bytes():
    t = trace_of({"a": (10 * BS, 1, 1, 1)}, [(0, 3), (0, 0)])
    assert [b for _, b in rescaled(t, 2 * BS).reads] == [1, 0]
    assert [b for _, b in rescaled(rescaled(t, 2 * BS), BS).reads] == [2, 3, 0, 1]


def test_a_recording_splits_into_the_contexts_variants():
    rec = Recording(ProcessTree(os.getpid()), BS, {"main": "/svr"})
    rec.note_dir("main", b"")                      # the repository root: not kept
    rec.note_dir("main", b"fam/1.0/v1")
    rec.note_read("main", b"fam/1.0/v1/lib/a.so", (3 * BS, 1, 1, 1), 0, 2)
    rec.note_read("main", b"fam/1.0/package.py", (100, 1, 1, 2), 0, 0)
    rec.note_read("main", b"other/2.0/x.py", (100, 1, 1, 3), 0, 0)
    rec.note_read("main", b"fam/1.0/v1/lib/a.so", (3 * BS, 1, 1, 1), 1, 1)  # again: once
    traces = {t.root: t for t in traces_from_recording(rec.to_json(),
                                                       {"main": [b"fam/1.0/v1"]})}
    assert set(traces) == {b"fam/1.0/v1", b"fam/1.0", b"other/2.0"}
    v1 = traces[b"fam/1.0/v1"]
    assert v1.dirs == [b""]
    assert [(v1.files[f][0], b) for f, b in v1.reads] == [(b"lib/a.so", 0), (b"lib/a.so", 1),
                                                          (b"lib/a.so", 2)]
    assert traces[b"fam/1.0"].files == [(b"package.py", (100, 1, 1, 2))]


def test_the_process_tree_holds_descendants_only():
    tree = ProcessTree(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", ("import os, sys; print(os.getpid()); "
                                                     "sys.stdout.flush(); sys.stdin.read()")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert int(child.stdout.readline()) in tree
        assert os.getppid() not in tree
        assert 1 not in tree
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait()


# -- a replay through a real repository ------------------------------------------------------
class CountingStore(FilesystemStore):
    def __init__(self, root):
        super().__init__(root)
        self.reads: list[tuple[bytes, int]] = []

    def read(self, relpath, identity, offset, size):
        self.reads.append((relpath, offset // BS))
        return super().read(relpath, identity, offset, size)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    (root / "fam/1.0/lib").mkdir(parents=True)
    (root / "fam/1.0/lib/a.so").write_bytes(os.urandom(8 * BS))
    (root / "fam/1.0/lib/b.py").write_bytes(os.urandom(BS // 2))
    return root


def make_repo(tmp_path, store_root, sources=(), cache_may_stall=False):
    cache = tmp_path / "cache"
    index = MetadataIndex(str(cache / "index"))
    blocks = open_blocks(str(cache), BS, kind=BlockCache)
    fetcher = Fetcher(blocks, Counters(), store_limiter=trio.CapacityLimiter(4),
                      local_limiter=trio.CapacityLimiter(4), store_timeout=5.0,
                      cache_may_stall=cache_may_stall)
    store = CountingStore(str(store_root))
    return Repository("main", store, index, fetcher, RepoPolicy(),
                      trace_sources=[IndexTraces(index, store.root), *sources]), store, index


def identity(path) -> tuple:
    st = os.lstat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@pytest.mark.parametrize("cache_may_stall", [False, True])  # blocks kept in the store thread, or after
def test_a_replay_fetches_the_trace_once_on_first_access_and_skips_changed_files(
        tmp_path, store, cache_may_stall):
    repo, counting, index = make_repo(tmp_path, store, cache_may_stall=cache_may_stall)
    a = store / "fam/1.0/lib/a.so"
    index.put_trace(repo.store.root, trace_of(
        {"lib/a.so": identity(a), "lib/b.py": (1, 2, 3, 4)},  # b.py: another version
        [(0, 5), (0, 1), (1, 0), (0, 6)], dirs=["", "lib"]))

    async def main():
        async with trio.open_nursery() as nursery:
            repo.fetcher.run_prefetches_in(nursery)
            await repo.refresh_traces()
            assert repo.traced_roots() == {b"fam/1.0"}
            await repo.getattr(b"fam")  # above the variant: no replay
            await trio.sleep(0.1)
            assert counting.reads == []
            await repo.getattr(b"fam/1.0/lib")  # the first access below it
            await trio.sleep(0.3)
            assert sorted(counting.reads) == [(b"fam/1.0/lib/a.so", i) for i in (1, 5, 6)]
            f = await repo.open(b"fam/1.0/lib/a.so")
            assert repo.fetcher.blocks.present(f.key, f.size) == [1, 5, 6]  # kept in the cache
            assert await repo.read(f, 5 * BS, BS) == a.read_bytes()[5 * BS:6 * BS]
            await repo.getattr(b"fam/1.0/lib/a.so")  # accessed before: never again
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(counting.reads) == 3
    c = repo.fetcher.counters
    assert (c.replay_blocks, c.replay_useful, c.replay_skipped) == (3, 1, 1)
    assert c.snapshot()["replay_waste"] == 2


def test_a_trace_directory_is_read_again_when_it_changes(tmp_path, store):
    traces = tmp_path / "traces"
    traces.mkdir()
    source = TraceDirectory(str(traces))
    assert source.roots() == set()
    a = store / "fam/1.0/lib/a.so"
    (traces / "one.trace").write_bytes(encode([trace_of({"lib/a.so": identity(a)}, [(0, 0)])]))
    (traces / "broken.trace").write_bytes(b"nonsense")  # logged, skipped
    assert source.roots() == {b"fam/1.0"}
    (traces / "two.trace").write_bytes(encode([trace_of({"lib/a.so": identity(a)}, [(0, 4)])]))
    assert source.roots() == {b"fam/1.0"}
    assert [b for _, b in source.trace(b"fam/1.0").reads] == [0, 4]
    (traces / "one.trace").unlink()
    source.roots()
    assert [b for _, b in source.trace(b"fam/1.0").reads] == [4]


def test_a_replay_keeps_to_the_cache_limit(tmp_path, store, caplog):
    repo, counting, index = make_repo(tmp_path, store)
    a = store / "fam/1.0/lib/a.so"
    index.put_trace(repo.store.root, trace_of({"lib/a.so": identity(a)},
                                              [(0, i) for i in range(8)]))
    room = [2 * BS]  # two blocks' worth left under the limit
    repo.fetcher.cache_room = lambda: room[0] - repo.fetcher.counters.store_bytes

    async def main():
        async with trio.open_nursery() as nursery:
            repo.fetcher.run_prefetches_in(nursery)
            await repo.refresh_traces()
            await repo.getattr(b"fam/1.0")
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()

    with caplog.at_level("INFO"):
        trio.run(main)
    # at most the two blocks, and the ones already under way when room ran out
    assert 2 <= len(counting.reads) <= 2 + repo.fetcher.background_limiter.total_tokens
    assert len(counting.reads) < 8
    assert "the cache is at its limit" in caplog.text


def test_a_traced_file_is_the_same_version_by_size_mtime_and_content_id():
    from cachecore.trace import same_version

    assert same_version((10, 5, 6, 7), (10, 5, 99, 123))      # renumbered inode, new ctime
    assert not same_version((10, 5, 6, 7), (10, 6, 6, 7))     # another mtime
    assert not same_version((10, 5, 6, 7), (11, 5, 6, 7))     # another size
    assert same_version((10, 5, 6, 7), (10, 5, 0, 1, 42))     # recorded on the tree, published
    assert not same_version((10, 5, 0, 1, 41), (10, 5, 0, 1, 42))  # other content


def test_a_traces_payload_counts_short_last_blocks():
    t = trace_of({"a": (BS + 100, 1, 1, 1), "b": (10, 2, 2, 2)}, [(0, 0), (0, 1), (1, 0)])
    assert t.payload_bytes() == BS + 100 + 10


def test_a_replay_cuts_its_blocks_into_batches_that_keep_every_worker_busy():
    from cachecore.fetcher import FileVersion
    from cachecore.fetcher import BATCH_BLOCKS
    from cachecore.replay import batches, within

    blocks = [(n, 0) for n in range(2000)]  # 2000 small files, a block each
    sizes = [100] * 2000
    cut = batches(blocks, sizes, BS, workers=8)
    assert [b for batch in cut for b in batch] == blocks  # every block, in order
    assert max(len(batch) for batch in cut) == BATCH_BLOCKS
    # a short trace: enough batches for the workers, not a few long ones
    assert len(batches(blocks[:64], sizes, BS, workers=8)) == 32
    assert len(batches(blocks[:10], sizes, BS, workers=8)) == 10
    # bytes: a batch of whole blocks stops at BATCH_BYTES
    cut = batches([(0, i) for i in range(4096)], [2**30], 2**18, workers=8)
    assert {len(batch) for batch in cut} == {4}  # 4 x 256K = 1 MiB
    # the cache's room: the blocks that fit, a short last block counted short
    tail = FileVersion(None, b"t", BS + 10, (BS + 10, 1, 1, 1), "t")
    assert within([(tail, 0), (tail, 1)], BS + 10, BS) == [(tail, 0), (tail, 1)]
    assert within([(tail, 0), (tail, 1)], BS + 9, BS) == [(tail, 0)]
    assert within([(tail, 0)], 10, BS) == []


def test_a_batch_leads_only_flights_nobody_leads_and_settles_each_as_it_comes():
    from cachecore.singleflight import SingleFlight

    flights = SingleFlight()
    seen = {}

    async def never():
        raise AssertionError("a joined flight is not fetched again")

    async def main():
        b_done, batch_done = trio.Event(), trio.Event()

        async def fetch_b():
            await b_done.wait()
            return "b"

        async def batch(led, settle):
            seen["led"] = list(led)  # b has a leader already
            await trio.testing.wait_all_tasks_blocked()  # a's and c's waiters have joined
            settle("a", "a")
            await batch_done.wait()  # set by a's waiter: only an early settle gets it there
            return {"a": "a", "c": ValueError("c failed")}

        async def join_a():
            seen["a"] = await flights.run("a", never)
            batch_done.set()

        async def join_c():
            try:
                await flights.run("c", never)
            except ValueError as e:
                seen["c"] = str(e)

        async def lead_b():
            seen["b"] = await flights.run("b", fetch_b)

        async def run_batch():
            seen["batch"] = await flights.run_many(["a", "b", "c"], batch)
            b_done.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lead_b)
                await trio.lowlevel.checkpoint()
                nursery.start_soon(run_batch)
                await trio.lowlevel.checkpoint()
                nursery.start_soon(join_a)
                nursery.start_soon(join_c)
        assert len(flights) == 0

    trio.run(main)
    assert seen["led"] == ["a", "c"]
    assert (seen["a"], seen["b"], seen["c"]) == ("a", "b", "c failed")
    assert set(seen["batch"]) == {"a", "c"}
