"""Trace packs: what a variant's launch trace reads, as a few large objects.

A replay through the HTTP store would otherwise ask for every traced chunk
on its own: a W1 launch is ~3,400 small objects, each a round trip through
the proxies, which is the per-request cost the trace exists to take away.
So the publisher also writes, per traced variant, the trace's chunks in
first-touch order, cut into packs of about PACK_BYTES:

* a pack is an object (objects.py) whose bytes are its members' object
  files one after the other, exactly as they are stored on their own (kind
  byte and payload), so a member out of a pack is checked against its own
  name like any object fetched alone;
* the pack list, an object named in the traces index (`packs`, next to
  `traces`; an index without it is an image without packs): JSON, each
  pack's name and its members' names and stored lengths, in order.

A mount that replays the trace fetches a pack when the first of its members
is wanted (stores/http.py), and the members it holds from then on. A pack
that does not arrive or does not check out costs nothing but the requests
it saves: its members are fetched one by one, as without packs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import LazyFSError
from .objects import MAX_OBJECT_SIZE, DamagedObject, check_name, decode_object, json_document

FORMAT = "rez-lazyfs-trace-packs"
VERSION = 1
# A pack's size: large enough that a launch is a few dozen requests, small
# enough that a replay's workers each have packs to fetch and a reader
# that wants one chunk of a pack does not wait long behind the rest.
PACK_BYTES = 2**20
MAX_PACK_MEMBERS = 4096
MAX_PACKS = 10_000  # in one pack list


class DamagedPackList(LazyFSError):
    """A pack list that matches its name but is not well formed."""


@dataclass(frozen=True)
class Pack:
    name: str
    members: tuple[tuple[str, int], ...]  # (object name, stored length), in order

    def split(self, data: bytes) -> dict[str, bytes]:
        """{member name: its verified bytes} from the pack's verified bytes;
        DamagedObject if they are not the members the list names."""
        if len(data) != sum(length for _, length in self.members):
            raise DamagedObject(f"pack {self.name} does not hold the members its list names")
        out, offset = {}, 0
        for name, length in self.members:
            out[name] = decode_object(name, data[offset:offset + length])
            offset += length
        return out


def plan(members: list[tuple[str, int]], pack_bytes: int = PACK_BYTES) -> list[list[tuple[str, int]]]:
    """(object name, stored length) in order, each once, cut into packs of
    at most `pack_bytes` (a member larger than that is a pack of its own)."""
    packs: list[list[tuple[str, int]]] = []
    size = 0
    for member in members:
        if not packs or size + member[1] > pack_bytes or len(packs[-1]) == MAX_PACK_MEMBERS:
            packs.append([])
            size = 0
        packs[-1].append(member)
        size += member[1]
    return packs


def encode_pack_list(packs: list[Pack]) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION,
                       "packs": [[p.name, [list(m) for m in p.members]] for p in packs]},
                      separators=(",", ":")).encode()


def decode_pack_list(blob: bytes) -> list[Pack]:
    """The packs of a pack list's verified bytes; DamagedPackList says what is wrong."""
    packs = json_document(blob, FORMAT, VERSION, DamagedPackList, "pack list").get("packs")
    if not isinstance(packs, list) or len(packs) > MAX_PACKS:
        raise DamagedPackList(f"damaged pack list: not a list of at most {MAX_PACKS} packs")
    out = []
    for entry in packs:
        try:
            name, members = entry
            check_name(name)
            if not isinstance(members, list) or not 0 < len(members) <= MAX_PACK_MEMBERS:
                raise DamagedPackList(f"pack {name}: not 1 to {MAX_PACK_MEMBERS} members")
            pack = Pack(name, tuple((check_name(m), length) for m, length in members))
        except (ValueError, TypeError, DamagedObject) as e:
            raise DamagedPackList(f"damaged pack list: {e}") from None
        if not all(type(length) is int and length > 1 for _, length in pack.members) \
                or sum(length for _, length in pack.members) > MAX_OBJECT_SIZE:
            raise DamagedPackList(f"damaged pack list: pack {pack.name}'s member lengths")
        out.append(pack)
    return out
