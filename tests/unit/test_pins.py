"""Pins by path (cachecore/clean.py: PinnedFiles) on their own: a real cache,
a real store directory read through a real Repository, real cleans."""
from __future__ import annotations

import trio

from cachecore.blocks import unverified_key
from cachecore.cache import LocalCache, RepoSpec
from cachecore.clean import clean_cache, pinned_files, scan_cache
from cachecore.index import pin_record
from cachecore.stores import block_key

BS = 4096
PINNED = ["fam/1.0/package.py", "fam/1.0/bin/tool"]
UNPINNED = ["fam/2.0/package.py", "other/1.0/data"]


def make_store(root) -> None:
    for rel in PINNED + UNPINNED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 1000)


def read_through_cache(cache: LocalCache, store, relpaths: list[str]) -> None:
    """Read whole files as the mount does: blocks fetched, uses recorded."""
    async def run():
        repo = cache.repositories([RepoSpec("main", str(store))], metadata_ttl=60,
                                  store_timeout=5)["main"]
        for rel in relpaths:
            f = await repo.open(rel.encode())
            await repo.read(f, 0, f.size)
        await cache.flush("test", cache.counters)

    trio.run(run)


def cached_paths(cache: LocalCache) -> set[str]:
    return {f.info["path"] for f in scan_cache(cache.blocks, cache.index).values() if f.info}


def test_a_pin_of_a_path_keeps_what_is_listed_below_it_when_the_clean_runs(tmp_path):
    store = tmp_path / "store"
    make_store(store)
    cache = LocalCache(str(tmp_path / "cache"), BS)
    read_through_cache(cache, store, [PINNED[0], *UNPINNED])
    cache.index.change_pins(lambda records: {"package:fam-1.0": pin_record(
        [], paths=[[str(store), "fam/1.0"]], pin="fam-1.0", kind="package")})
    # Read after pinning: a frozen list of keys would not name it.
    read_through_cache(cache, store, [PINNED[1]])

    report = clean_cache(cache.blocks, cache.index, max_size=0)

    assert cached_paths(cache) == set(PINNED)
    assert (report.evicted_files, report.pins) == (len(UNPINNED), 1)
    cache.close()


def test_a_pin_of_a_path_keeps_unconfirmed_seeds_and_files_whose_listing_was_forgotten(tmp_path):
    store = tmp_path / "store"
    make_store(store)
    cache = LocalCache(str(tmp_path / "cache"), BS)
    read_through_cache(cache, store, PINNED)
    cache.index.change_pins(lambda records: {"package:fam-1.0": pin_record(
        [], paths=[[str(store), "fam/1.0"]], pin="fam-1.0", kind="package")})
    # A definition seeded from a context while the store was away: blocks
    # under their unverified key, with no use recorded.
    attr = cache.index.get_listing(str(store), b"fam/1.0")[0][b"package.py"]
    seeded = unverified_key(block_key(str(store), b"fam/1.0/package.py", attr.identity, BS))
    cache.blocks.write(seeded, 0, b"x" * 100)
    assert scan_cache(cache.blocks, cache.index)[seeded].pinned

    # `forget` drops the listings; the uses recorded still name the files.
    cache.index.forget_tree(str(store), b"fam/1.0")
    assert not pinned_files(cache.index, BS).by_key
    clean_cache(cache.blocks, cache.index, max_size=0)
    assert cached_paths(cache) == set(PINNED)
    cache.close()
