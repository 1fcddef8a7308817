"""The launch traces a published image carries (cachecore/trace.py), so every
mount of it can replay a variant's start-up with no trace file of its own.

Two kinds of object, content-addressed like every other (objects.py):

* a trace object per traced variant: that variant's trace in the trace file
  format (trace.encode([trace])), each file's identity the one the image
  gives it (size, mtime, ctime, inode and content id, as the HTTP store's
  attributes report them), so a replay applies it to exactly those versions
  and skips a file once a later revision changes it;
* the traces index, named by the manifest's `traces` field (and so signed
  with it): {variant root: trace object name}, JSON; and, in `packs`,
  {variant root: pack list object name} for the traces whose chunks are
  also published as packs (image/packs.py).

The publisher writes a variant's trace only after checking every traced
file's identity against the tree it publishes (mount/publish.py). A mount
reads the index when it looks for traces, and a trace object on the first
access to its variant; a revision whose traces did not change names the
same objects as the one before.
"""
from __future__ import annotations

import json
import os

from ..errors import LazyFSError
from ..paths import BadPath, relpath_from_text
from ..trace import BadTrace, VariantTrace, decode
from .objects import DamagedObject, check_name, json_document

FORMAT = "rez-lazyfs-image-traces"
VERSION = 1
MAX_TRACES = 100_000  # traced variants in one revision


class DamagedTraceIndex(LazyFSError):
    """A traces index that matches its name but is not well formed."""


def encode_trace_index(traces: dict[bytes, str], packs: dict[bytes, str] | None = None) -> bytes:
    doc = {"format": FORMAT, "version": VERSION,
           "traces": {os.fsdecode(root): name for root, name in sorted(traces.items())}}
    if packs:
        doc["packs"] = {os.fsdecode(root): name for root, name in sorted(packs.items())}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_trace_index(blob: bytes) -> dict[bytes, str]:
    """{variant root: trace object name}; DamagedTraceIndex says what is wrong."""
    return _roots_to_names(_index_document(blob), "traces")


def decode_pack_index(blob: bytes) -> dict[bytes, str]:
    """{variant root: pack list object name} (none in an index written
    before packs); DamagedTraceIndex says what is wrong."""
    doc = _index_document(blob)
    return _roots_to_names(doc, "packs") if "packs" in doc else {}


def _index_document(blob: bytes) -> dict:
    return json_document(blob, FORMAT, VERSION, DamagedTraceIndex, "traces index")


def _roots_to_names(doc: dict, field: str) -> dict[bytes, str]:
    traces = doc.get(field)
    if not isinstance(traces, dict) or len(traces) > MAX_TRACES:
        raise DamagedTraceIndex(f"damaged traces index: {field} is not a map of at most "
                                f"{MAX_TRACES} variants")
    out = {}
    for text, name in traces.items():
        try:
            root = relpath_from_text(text)
            check_name(name)
        except (BadPath, DamagedObject) as e:
            raise DamagedTraceIndex(f"damaged traces index: {e}") from None
        if root.count(b"/") < 1:
            raise DamagedTraceIndex(f"damaged traces index: {text[:80]!r} is not a variant root")
        out[root] = name
    return out


def decode_trace_object(root: bytes, data: bytes) -> VariantTrace:
    """The trace of `root` from its trace object's verified bytes; BadTrace
    if they are not one trace of that variant."""
    traces = decode(data)
    if len(traces) != 1 or traces[0].root != root:
        raise BadTrace(f"the trace object of {os.fsdecode(root)} holds other traces")
    return traces[0]
