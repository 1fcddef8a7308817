"""Trace packs (cachecore/image/packs.py) alone: how a trace's chunks are cut
into packs, a pack split back into its members (each checked against its own
name), and pack lists and traces indexes from the network refused when they
are not well formed."""
from __future__ import annotations

import json
import os

import pytest

from cachecore.image.objects import MAX_OBJECT_SIZE, DamagedObject, encode_object, object_name
from cachecore.image.packs import (
    MAX_PACK_MEMBERS,
    DamagedPackList,
    Pack,
    decode_pack_list,
    encode_pack_list,
    plan,
)
from cachecore.image.traces import (
    DamagedTraceIndex,
    decode_pack_index,
    decode_trace_index,
    encode_trace_index,
)


def stored(data: bytes) -> tuple[str, bytes]:
    return object_name(data), encode_object(data)


def test_plan_keeps_the_order_and_cuts_at_the_pack_size():
    members = [(f"{n:064x}", length) for n, length in enumerate([400, 300, 400, 900, 5000, 10])]
    packs = plan(members, pack_bytes=1000)
    assert [m for p in packs for m in p] == members  # every member once, in order
    assert [[length for _, length in p] for p in packs] == [[400, 300], [400], [900], [5000], [10]]
    assert plan([]) == []


def test_a_pack_splits_into_its_members_each_checked_against_its_name():
    parts = [stored(os.urandom(n)) for n in (10, 3000)] + [stored(b"a" * 5000)]  # raw and zstd
    pack = Pack("f" * 64, tuple((name, len(blob)) for name, blob in parts))
    data = b"".join(blob for _, blob in parts)
    members = pack.split(data)
    assert list(members) == [name for name, _ in parts]
    assert [object_name(m) for m in members.values()] == list(members)

    flipped = bytearray(data)
    flipped[len(parts[0][1]) + 100] ^= 1  # a byte of the second member
    with pytest.raises(DamagedObject, match=parts[1][0]):
        pack.split(bytes(flipped))
    with pytest.raises(DamagedObject, match="does not hold the members"):
        pack.split(data + b"x")
    swapped = Pack(pack.name, (pack.members[1], pack.members[0], pack.members[2]))
    with pytest.raises(DamagedObject):
        swapped.split(data)


def test_a_pack_list_round_trips_and_bad_ones_are_refused():
    packs = [Pack("a" * 64, (("b" * 64, 10), ("c" * 64, 20))), Pack("d" * 64, (("e" * 64, 30),))]
    assert decode_pack_list(encode_pack_list(packs)) == packs
    good = json.loads(encode_pack_list(packs))

    def with_packs(value) -> bytes:
        return json.dumps({**good, "packs": value}).encode()

    cases = {
        b"\xff not json": "not JSON",
        json.dumps({**good, "version": 2}).encode(): "unknown version",
        json.dumps({**good, "format": "rez-lazyfs-traces"}).encode(): "not a pack list",
        with_packs("none"): "not a list",
        with_packs([["a" * 64]]): "damaged pack list",
        with_packs([["../etc", [["b" * 64, 10]]]]): "not an object name",
        with_packs([["a" * 64, []]]): "members",
        with_packs([["a" * 64, [["b" * 64, 10]] * (MAX_PACK_MEMBERS + 1)]]): "members",
        with_packs([["a" * 64, [["B" * 64, 10]]]]): "not an object name",
        with_packs([["a" * 64, [["b" * 64, -3]]]]): "member lengths",
        with_packs([["a" * 64, [["b" * 64, "10"]]]]): "member lengths",
        with_packs([["a" * 64, [["b" * 64, 10.0]]]]): "member lengths",
        with_packs([["a" * 64, [["b" * 64, MAX_OBJECT_SIZE // 2 + 1]] * 2]]): "member lengths",
        with_packs([["a" * 64, [["b" * 64, 10, 11]]]]): "damaged pack list",
    }
    for blob, expected in cases.items():
        with pytest.raises(DamagedPackList, match=expected):
            decode_pack_list(blob)


def test_the_traces_index_names_pack_lists_beside_traces_and_reads_without_them():
    traces = {b"fam/1.0": "a" * 64, b"fam/2.0": "b" * 64}
    with_packs = encode_trace_index(traces, {b"fam/1.0": "c" * 64})
    assert decode_trace_index(with_packs) == traces
    assert decode_pack_index(with_packs) == {b"fam/1.0": "c" * 64}
    before_packs = encode_trace_index(traces)  # an image published before packs
    assert b"packs" not in before_packs and decode_pack_index(before_packs) == {}
    doc = json.loads(with_packs)
    for bad, expected in ((["c" * 64], "packs is not a map"),
                          ({"fam": "c" * 64}, "not a variant root"),
                          ({"fam/1.0": "../c"}, "not an object name")):
        with pytest.raises(DamagedTraceIndex, match=expected):
            decode_pack_index(json.dumps({**doc, "packs": bad}).encode())
